"""Shared test fixtures: paths to ../shared (CI has it, a user's clone does not), tiny models,
a handful of synthetic faces, and finished builds of them made once per test run (`made_once`:
under pytest-xdist, once for all the workers, not once per worker).

The session's builds (`fp32_build`, `int8_build`, `auto_build`) are read-only: a test that
changes one copies its workdir first (`copy_workdir`)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
AUTHORS_FIXTURE = SHARED / "fixtures" / "cunet-original"

torch.set_num_threads(1)  # the CI machine has 2 cores; tests stay deterministic and light
# ... and so do the processes the tests start (the CLI, examples, torchrun's ranks): one OpenMP
# thread each, not a pool per process spinning on cores the two workers already use.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite's CPU builds deploy on ONNX Runtime without timing OpenVINO's candidates (fast, and the
# same runtime whichever is faster here); tests/test_openvino.py asks for `--cpu-runtime auto`.
os.environ.setdefault("CUNET_CPU_RUNTIME", "onnxruntime")
# Two pytest-xdist workers share the 2 cores: a build times and deploys one thread, not candidates
# a busy second core makes noise of (tests that time more threads set it themselves).
os.environ.setdefault("CUNET_CPU_THREADS", "1")


def tiny_config(**overrides):
    from cunet_optimize.models import CUNetConfig

    fields = dict(num_unets=2, order=1, num_classes=4, width=8, growth_rate=4, neck_size=2)
    fields.update(overrides)
    return CUNetConfig(**fields)


def tiny_cunet_with_varied_batchnorm(negative_gamma: bool = False):
    """The tiny CU-Net (seed 0) with BatchNorm statistics and shifts drawn away from the identity,
    so folding them changes the graph's numbers; `negative_gamma`: every other channel's BatchNorm
    scale negative (ReLU(BN) then falls as its input rises, and integer signs flip)."""
    from cunet_optimize.models import CUNet

    torch.manual_seed(0)
    model = CUNet(tiny_config()).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.3, 0.3)
                if negative_gamma:
                    m.weight[::2] *= -1
    return model


def _openvino_missing() -> bool:
    from cunet_optimize.engines.openvino import openvino_version

    return openvino_version() is None


# OpenVINO is an optional extra, like TensorRT: its tests skip without it (each has a CPU sibling
# on ONNX Runtime or a pure rule: tests/test_openvino.py, tests/test_int4_cpu.py).
needs_openvino = pytest.mark.skipif(_openvino_missing(),
                                    reason="OpenVINO is not installed (pip install 'cunet-optimize[openvino]')")


@pytest.fixture
def authors_fixture() -> Path:
    if not AUTHORS_FIXTURE.is_dir():
        pytest.skip(f"needs the authors' checkpoint fixture in {AUTHORS_FIXTURE} (../shared is only in CI and dev checkouts)")
    return AUTHORS_FIXTURE


def made_once(tmp_path_factory, name: str, make: Callable[[Path], object]) -> tuple[Path, object]:
    """(folder, value) of a session fixture made once per test run: `make(folder)` writes its
    files under `folder` (new and empty) and returns a JSON value. Each pytest-xdist worker runs
    its own session, so there the first worker that needs `name` makes it in the run's temporary
    folder (the workers' common parent) under a lock, and the others wait for it, then read the
    value back: the files are read-only for every test (copy them to change them)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # one process: this session's temporary folder
        folder = tmp_path_factory.mktemp(name)
        return folder, make(folder)
    shared = tmp_path_factory.getbasetemp().parent / "made-once"  # <run>/popen-gwN -> <run>/made-once
    shared.mkdir(exist_ok=True)
    folder, record = shared / name, shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not record.is_file():  # first here (or the first try failed: start again)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            record.write_text(json.dumps(make(folder)))
        return folder, json.loads(record.read_text())


@pytest.fixture(scope="session")
def faces(tmp_path_factory) -> Path:
    """10 synthetic faces: 6 in the train split, 4 in test (a module may define its own set).
    Shared by the test run: a test that changes them copies them first."""
    from cunet_optimize.data.synth import write_synthetic_faces

    def make(folder: Path) -> None:
        write_synthetic_faces(folder / "synth", 10, seed=5, test_fraction=0.4, progress=False)

    return made_once(tmp_path_factory, "faces", make)[0] / "synth"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A checkpoint of the small face model at width 8 (random weights, seed 0)."""
    from cunet_optimize.models import create_model, save_checkpoint

    torch.manual_seed(0)  # (in every worker: the global generator is left as the model's draws leave it)
    model = create_model("cunet-face-small", width=8, growth_rate=4, neck_size=2)

    def make(folder: Path) -> None:
        save_checkpoint(model, folder / "tiny.safetensors")

    return made_once(tmp_path_factory, "model", make)[0] / "tiny.safetensors"


def tiny_build_args(tiny: Path, faces: Path, workdir: Path, precision: str, *extra: str) -> list[str]:
    """`build` of the tiny model on the faces: 4 calibration images, evaluated on the test split,
    no accuracy gate (random weights)."""
    return ["build", "--model", str(tiny), "--precision", precision, "--calib-data", str(faces),
            "--calib-images", "4", "--eval-data", str(faces), "--workdir", str(workdir),
            "--no-accuracy-gate", *extra]


def tiny_auto_args(tiny: Path, faces: Path, workdir: Path, *extra: str) -> list[str]:
    """`build --precision auto` of the tiny model on the faces, with the search's defaults."""
    return ["build", "--model", str(tiny), "--precision", "auto", "--calib-data", str(faces),
            "--eval-data", str(faces), "--workdir", str(workdir), *extra]


def run_build_json(argv: list[str]) -> dict:
    """Runs `build ... --json` in-process; returns the manifest it printed."""
    from cunet_optimize.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--json"]) == 0
    return json.loads(out.getvalue())


def _finished_build(tmp_path_factory, argv_for, name: str) -> SimpleNamespace:
    workdir, manifest = made_once(tmp_path_factory, name, lambda folder: run_build_json(argv_for(folder)))
    return SimpleNamespace(workdir=workdir, out=workdir / "engines" / manifest["name"], manifest=manifest)


@pytest.fixture(scope="session")
def fp32_build(tmp_path_factory, tiny, faces) -> SimpleNamespace:
    """The tiny model built in FP32 for the CPU (`tiny_build_args`): workdir, out (the engine
    folder) and manifest (what --json printed). Read-only: copy_workdir before changing it."""
    return _finished_build(tmp_path_factory, lambda w: tiny_build_args(tiny, faces, w, "fp32"), "fp32-build")


@pytest.fixture(scope="session")
def int8_build(tmp_path_factory, tiny, faces) -> SimpleNamespace:
    """The tiny model built in INT8 for the CPU, as fp32_build."""
    return _finished_build(tmp_path_factory, lambda w: tiny_build_args(tiny, faces, w, "int8"), "int8-build")


@pytest.fixture(scope="session")
def landmarks_build(tmp_path_factory, tiny, faces) -> SimpleNamespace:
    """The tiny model built in INT8 for the CPU with the landmark decoder (`build --landmarks`), as fp32_build."""
    return _finished_build(tmp_path_factory, lambda w: tiny_build_args(tiny, faces, w, "int8", "--landmarks"),
                           "landmarks-build")


@pytest.fixture(scope="session")
def auto_build(tmp_path_factory, tiny, faces) -> SimpleNamespace:
    """The tiny model built with --precision auto for the CPU under a huge budget (every conv
    that may take INT4 does), as fp32_build."""
    return _finished_build(tmp_path_factory, lambda w: tiny_auto_args(tiny, faces, w, "--max-nme-increase", "100",
                                                                      "--no-accuracy-gate"), "auto-build")


def copy_workdir(build: SimpleNamespace, dest: Path) -> Path:
    """A copy of a session build's workdir at `dest`, for a test that changes it."""
    return Path(shutil.copytree(build.workdir, dest, symlinks=True))


def run_cli(argv: list, capsys, caplog) -> tuple[int, str, str]:
    """`cunet-optimize ARGV` in this process: (exit status, stdout, stderr with the log's lines:
    warnings go through logging, to stderr outside pytest). argparse refusals exit 2."""
    from cunet_optimize.cli import main

    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err + caplog.text
