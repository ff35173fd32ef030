"""Package layering: no import cycle between subpackages (bench/import_graph.py), and
`cunet-optimize report`, which only turns JSON into HTML, runs without torch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from test_report import full_profile

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "onnxruntime", "onnx")


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "bench" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_no_cycle_between_subpackages_nor_modules_lazy_imports_included():
    """Imports inside functions count: a cycle hidden behind one is still a cycle of ideas
    (the stage packages never call back into the pipeline above them)."""
    graph = _import_graph()
    edges = graph.import_graph()
    assert ("surgery", "onnx_tools") in edges and ("exporters", "onnx_tools") in edges  # the graph is read
    assert graph.cycles(edges, (graph.MODULE_LEVEL, graph.LAZY)) == [], graph.as_text(edges)
    modules = graph.import_graph(node=graph.module_of)
    assert ("cunet_optimize.pipeline.auto_build", "cunet_optimize.pipeline.build") in modules
    assert graph.cycles(modules, (graph.MODULE_LEVEL, graph.LAZY)) == []


def test_the_graph_finds_a_cycle_and_leaves_lazy_imports_out(tmp_path):
    pkg = tmp_path / "cunet_optimize"
    for name, body in {"a": "from cunet_optimize.b import x\n",
                       "b": "x = 1\n\ndef f():\n    from cunet_optimize.c import y\n",
                       "c": "from cunet_optimize.a import z\n"}.items():
        (pkg / name).mkdir(parents=True)
        (pkg / name / "__init__.py").write_text(body)
    graph = _import_graph()
    edges = graph.import_graph(pkg)
    assert graph.cycles(edges) == []  # b -> c is lazy: no import-time cycle
    assert graph.cycles(edges, (graph.MODULE_LEVEL, graph.LAZY)) == [["a", "b", "c"]]
    (pkg / "b" / "__init__.py").write_text("from cunet_optimize.a import z\n")
    assert graph.cycles(graph.import_graph(pkg)) == [["a", "b"]]


def _imported(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "cunet_optimize.cli", *args],
                         capture_output=True, text=True, cwd=cwd)
    modules = {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    return run, modules


def test_report_imports_neither_torch_nor_onnx(tmp_path):
    run, modules = _imported(["report", "--help"], tmp_path)
    assert run.returncode == 0 and "PROFILE.json" in run.stdout
    assert "cunet_optimize.report.html" in modules  # importtime did list the imports
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))

    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(full_profile()))
    run, modules = _imported(["report", str(profile), "--out", str(tmp_path / "p.html")], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Latency vs" in (tmp_path / "p.html").read_text()
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
