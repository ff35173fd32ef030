"""Trust what it writes (issue 22; the promises are docs/PROMISES.md): one row per way a user's
files, caches or numbers could be lost or silently wrong, grouped by family.

Families (the `family` of each row):
  data-loss     nothing the user did not ask to replace is deleted or overwritten
  integrity     caches keyed by content and sealed; artifacts checked by hash before use
  wrong-result  inputs that would give a wrong number are refused, or named
  grammar       one precision grammar: what the docs promise is accepted, nothing else
  one-line      errors a user can fix are one line (what, where, what to do), exit 2

Every row runs the CLI in-process with the test's tmp folder as the working directory
(so a default --workdir lands there). For a refusal (exit 2) the runner also checks the
rule behind every row: the tree under tmp is exactly as before the command (no file
changed, removed or added, the workdir lock included), unless the row names what may
appear (`may_create`). `item` is the numbered item of issue 22 the row reproduces.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from cunet_optimize.cli import main

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny face model, 6 synthetic faces (4 train, 2 test), and one finished fp32 build of
    them (rows that need a build copy `env.workdir`)."""
    import torch

    from cunet_optimize.data.synth import write_synthetic_faces
    from cunet_optimize.models import create_model, save_checkpoint

    root = tmp_path_factory.mktemp("trust")
    faces = root / "faces"
    write_synthetic_faces(faces, 6, seed=5, test_fraction=2 / 6, progress=False)
    torch.manual_seed(0)
    model = root / "tiny.safetensors"
    save_checkpoint(create_model("cunet-face-small", width=8, growth_rate=4, neck_size=2), model)
    workdir = root / "built"
    assert main(["build", "--precision", "fp32", "--model", str(model), "--eval-data", str(faces),
                 "--eval-split", "all", "--no-accuracy-gate", "--workdir", str(workdir)]) == 0
    return SimpleNamespace(root=root, faces=faces, model=str(model), workdir=workdir,
                           build=workdir / "engines" / "tiny-fp32-cpu",
                           images=sorted((faces / "images").glob("*.png")))


def built_workdir(env, tmp: Path, name: str = "w") -> Path:
    """A copy of the module's finished build in tmp/<name>."""
    return Path(shutil.copytree(env.workdir, tmp / name, symlinks=True))


def build_args(env, workdir, *extra) -> list[str]:
    """A quick build of the tiny model (fp32 unless `extra` says otherwise)."""
    return ["build", "--precision", "fp32", "--model", env.model, "--eval-data", str(env.faces),
            "--eval-split", "all", "--calib-data", str(env.faces), "--calib-split", "all",
            "--no-accuracy-gate", "--workdir", str(workdir), *extra]


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---- grammar (10): helpers

def grammar_built(precision: str, name: str):
    """check: the build is engines/<name>/ and its build.json records `precision` (the
    canonical spelling); returns the manifest for further checks."""
    def check(env, tmp, out, err):
        manifest = json.loads((tmp / "w" / "engines" / name / "build.json").read_text())
        assert manifest["precision"] == precision and manifest["name"] == name, manifest["name"]
        return manifest
    return check


def grammar_same_calibration(env, tmp, out, err):
    """int8-untied builds what int8 --concat-qdq untied builds: the same calibrated scheme, the
    same scales (calibrate with the flag finds the build's calib/<id>/ and adds none)."""
    spelt = grammar_built("int8-untied", "tiny-int8-untied-cpu")(env, tmp, out, err)
    assert spelt["calibration"]["scheme"] == "int8-untied"
    ids = sorted(p.name for p in (tmp / "w" / "calib").iterdir())
    assert spelt["calibration"]["id"] in ids
    assert main(["calibrate", "--model", env.model, "--data", str(env.faces), "--split", "all",
                 "--precision", "int8", "--concat-qdq", "untied", "--workdir", str(tmp / "w")]) == 0
    assert sorted(p.name for p in (tmp / "w" / "calib").iterdir()) == ids


def grammar_calibrate_then_build(env, tmp, out, err):
    """`calibrate --precision Int8` and `build --precision INT8` read the same precision: the
    build reuses the scales calibrate cached."""
    calibrated = [line for line in out.splitlines() if line.endswith("scales.json")]
    assert len(calibrated) == 1, out
    assert main(build_args(env, tmp / "w", "--precision", "INT8", "--calib-images", "2")) == 0
    built = json.loads((tmp / "w" / "engines" / "tiny-int8-cpu" / "build.json").read_text())
    assert built["calibration"]["cached"] and calibrated[0].endswith(built["calibration"]["scales_file"])


def grammar_qat_w1a8(env, tmp) -> str:
    """A one-step w1a8 QAT checkpoint of the tiny model (tmp/qat/best.safetensors)."""
    assert main(["qat", "--model", env.model, "--data", str(env.faces), "--split", "all", "--val-split", "none",
                 "--precision", "w1a8", "--epochs", "1", "--train-images", "2", "--batch-size", "2",
                 "--calib-images", "2", "--out", str(tmp / "qat")]) == 0
    return str(tmp / "qat" / "best.safetensors")


def grammar_binary_weights(env, tmp, out, err):
    """The w1a8 build deploys a float graph whose convs (all but the stem and the last head, as
    the paper) hold one magnitude per output filter, and says so in build.json's notes."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    manifest = grammar_built("w1a8", "tiny-w1a8-cpu")(env, tmp, out, err)
    assert any("binary" in note and "FP32" in note for note in manifest["notes"]), manifest["notes"]
    graph = onnx.load(tmp / "w" / "engines" / "tiny-w1a8-cpu" / "model.onnx").graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [weights[n.input[1]] for n in graph.node if n.op_type == "Conv" and n.input[1] in weights]
    binary = [w for w in convs if all(len(np.unique(np.abs(f))) == 1 for f in w)]
    assert len(binary) == len(convs) - 2, (len(binary), len(convs))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    family: str  # data-loss | integrity | wrong-result | grammar | one-line
    item: int  # issue 22's numbered item (0: the review note)
    argv: Callable  # (env, tmp) -> argv; may prepare files under tmp first
    status: int
    message: str | None = None  # exit 2: in the error line; exit 0: anywhere in stderr
    may_create: tuple[str, ...] = ()  # exit 2: globs (relative to tmp) of files allowed to appear
    check: Callable | None = None  # (env, tmp, stdout, stderr) -> None, after the generic checks
    marks: tuple = ()


FAMILIES = ("data-loss", "integrity", "wrong-result", "grammar", "one-line")

CASES: list[Case] = [
    # ------------------------------------------------------------------- data loss (1, 2, 3, 11)
    Case("build-name-dotdot", "data-loss", 1,
         lambda e, t: build_args(e, t / "w", "--name", "..") if touch(t / "w" / "mine.txt", "user file") else [],
         2, "--name '..'"),
    # ------------------------------------------------------------------- end data loss

    # ------------------------------------------------------------------- integrity (4, 5, 6)
    # ------------------------------------------------------------------- end integrity

    # ------------------------------------------------------------------- wrong results (7, 8, 9)
    # ------------------------------------------------------------------- end wrong results

    # ------------------------------------------------------------------- grammar (10)
    Case("build-upper-case", "grammar", 10,
         lambda e, t: build_args(e, t / "w", "--precision", " INT8 "),
         0, check=grammar_built("int8", "tiny-int8-cpu")),
    Case("build-int8-tied", "grammar", 10,
         lambda e, t: build_args(e, t / "w", "--precision", "Int8-Tied"),
         0, check=grammar_built("int8-tied", "tiny-int8-tied-cpu")),
    Case("build-int8-untied-as-flag", "grammar", 10,
         lambda e, t: build_args(e, t / "w", "--precision", "int8-untied"),
         0, check=grammar_same_calibration),
    Case("build-modifier-contradicts-flag", "grammar", 10,
         lambda e, t: build_args(e, built_workdir(e, t), "--precision", "int8-untied", "--concat-qdq", "none"),
         2, "--precision int8-untied puts INT8 Q/DQ on the concatenations, untied but --concat-qdq none"),
    Case("build-unknown-lists-grammar", "grammar", 10,
         lambda e, t: build_args(e, t / "w", "--precision", "nonsense"),
         2, "unknown precision 'nonsense'; use one of fp32, fp16 (build, export), int8[-convin|-tied|-untied], "
            "int4[-b<N>|-pc][-wo], the paper's w<k>[a<m>][g<n>] (e.g. w1a8, w2a8g8), auto (build; qat --plan)"),
    Case("calibrate-any-case", "grammar", 10,
         lambda e, t: ["calibrate", "--model", e.model, "--data", str(e.faces), "--split", "all", "--images", "2",
                       "--precision", "Int8", "--workdir", str(t / "w")],
         0, check=grammar_calibrate_then_build),
    Case("qat-unknown-lists-grammar", "grammar", 10,
         lambda e, t: ["qat", "--model", e.model, "--data", str(e.faces), "--out", str(t / "q"),
                       "--precision", "INT16"],
         2, "not 'int16'; use one of fp32, fp16 (build, export)"),
    Case("calibrate-build-only-word", "grammar", 10,
         lambda e, t: ["calibrate", "--model", e.model, "--data", str(e.faces), "--precision", "AUTO"],
         2, "precision 'auto' is a build precision"),
    Case("export-any-case", "grammar", 10,
         lambda e, t: ["export", "--model", e.model, "--precision", "FP16", "--out", str(t / "m.onnx")],
         0, check=lambda e, t, out, err: (t / "m.onnx").is_file() or pytest.fail(out)),
    Case("build-w1a8-ptq-refused", "grammar", 10,
         lambda e, t: build_args(e, built_workdir(e, t), "--precision", "W1A8"),
         2, "trained, not calibrated: run `cunet-optimize qat --precision w1a8` first"),
    Case("build-w1a8-qat", "grammar", 10,
         lambda e, t: build_args(e, t / "w", "--precision", "w1a8", "--qat", grammar_qat_w1a8(e, t)),
         0, check=grammar_binary_weights),
    # ------------------------------------------------------------------- end grammar

    # ------------------------------------------------------------------- one line (12, 13)
    # ------------------------------------------------------------------- end one line
]


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (links as their target path)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            found[rel] = (f"link:{os.readlink(path)}" if path.is_symlink()
                          else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def error_line(err: str, command: str) -> str:
    """The one line a refusal prints: `cunet-optimize <command>: error: ...`."""
    lines = [line for line in err.splitlines() if line.startswith(f"cunet-optimize {command}: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c.family}-{c.id}", marks=c.marks) for c in CASES])
def test_trust(case, env, tmp_path, capsys, caplog, monkeypatch):
    assert case.family in FAMILIES
    monkeypatch.chdir(tmp_path)
    argv = [str(a) for a in case.argv(env, tmp_path)]
    before = tree(tmp_path)
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse refusals
        status = exc.code
    out, err = capsys.readouterr()
    err += caplog.text  # warnings go through logging (to stderr outside pytest)
    assert status == case.status, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    if case.status == 2:
        line = error_line(err, argv[0])
        if case.message is not None:
            assert case.message in line, err[-3000:]
        after = tree(tmp_path)
        changed = sorted(p for p in before if after.get(p) != before[p])
        added = sorted(p for p in after if p not in before
                       and not any(fnmatch.fnmatch(p, g) for g in case.may_create))
        assert not changed and not added, f"changed {changed}, added {added}"
    elif case.message is not None:
        assert case.message in err, err[-3000:]
    if case.check:
        case.check(env, tmp_path, out, err)


def test_every_family_has_rows():
    assert {c.family for c in CASES} == set(FAMILIES)
    assert len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- grammar (10): the Python API


def test_grammar_api_reads_a_precision_as_the_commands_do():
    """BuildOptions (the Python API's build) spells and checks --precision as the CLI does, and
    the engine precision comes from the parsed scheme, not the spelling."""
    from cunet_optimize.build import BuildOptions
    from cunet_optimize.errors import CUNetError
    from cunet_optimize.quant.policy import engine_precision, quant_scheme

    opts = BuildOptions(precision=" Int8-Untied ")
    assert opts.precision == "int8-untied" and engine_precision(opts) == "int8"
    assert engine_precision(BuildOptions(precision="INT4-PC-WO")) == "int4"
    assert quant_scheme("int8").spec == "int8-convin"  # the quant API's documented flow = the CLI's
    with pytest.raises(CUNetError, match="give only one of them"):
        BuildOptions(precision="int8-untied", concat_qdq="none")
    with pytest.raises(CUNetError, match=r"unknown precision 'nonsense'; use one of fp32, fp16 .* auto"):
        BuildOptions(precision="nonsense")
