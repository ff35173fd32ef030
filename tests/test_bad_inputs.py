"""Bad inputs and faults, one row each: what a hostile new user tries (issue 13).

Every row runs the CLI on small inputs generated here and asserts the exit status, the
one-line message (what, where, what to do) and what must not be on disk afterwards.
Rows marked slow run real builds / calibrations / kills.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from cunet_optimize.cli import main

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO / "toolkit") + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from cunet_optimize.data.synth import write_synthetic_faces
    from cunet_optimize.models import create_model, save_checkpoint

    root = tmp_path_factory.mktemp("bad")
    faces = root / "faces"
    write_synthetic_faces(faces, 6, seed=5, test_fraction=2 / 6, progress=False)
    model = root / "tiny.safetensors"
    save_checkpoint(create_model("cunet-face-small", width=8, growth_rate=4, neck_size=2), model)
    return SimpleNamespace(root=root, faces=faces, model=str(model),
                           images=sorted((faces / "images").glob("*.png")))


def plain_folder(env, tmp: Path, n: int = 4) -> Path:
    """A folder of image + .pts pairs without split lists, as people keep photos."""
    folder = tmp / "plain"
    folder.mkdir()
    for image in env.images[:n]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".pts"), folder / image.with_suffix(".pts").name)
    return folder


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height (no pixels needed: Pillow refuses it at open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


def relu_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", io[:1], io[1:])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def damaged_checkpoint(env, tmp: Path, kind: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    import torch

    with safe_open(env.model, "pt") as f:
        meta = f.metadata()
    tensors = load_file(env.model)
    key = next(k for k in tensors if k.endswith("weight"))
    if kind == "shape":
        tensors[key] = torch.zeros(3)
    else:
        del tensors[key]
    out = tmp / f"{kind}.safetensors"
    save_file(tensors, out, metadata=meta)
    return out


class NotATensor:
    """An arbitrary pickled object: torch's weights_only loader refuses it."""


def pickled_checkpoint(tmp: Path) -> Path:
    import torch

    out = tmp / "pickled.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NotATensor()}, out)
    return out


def bad_profile(tmp: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_report import full_profile

    profile = full_profile()
    profile["variants"][0]["latency"] = "fast"
    out = tmp / "p.json"
    out.write_text(json.dumps(profile, default=str))
    return out


def with_pts_outside(env, tmp: Path) -> Path:
    folder = plain_folder(env, tmp)
    from cunet_optimize.data.pts import read_pts, write_pts

    pts = folder / env.images[0].with_suffix(".pts").name
    write_pts(pts, read_pts(pts) + 5000.0)
    return folder


def with_orphan_pts(env, tmp: Path) -> Path:
    folder = plain_folder(env, tmp)
    shutil.copy(env.images[0].with_suffix(".pts"), folder / "lonely.pts")
    return folder


def with_bomb(env, tmp: Path) -> Path:
    folder = plain_folder(env, tmp)
    png_header_only(folder / "huge.png", 30000, 30000)
    shutil.copy(env.images[0].with_suffix(".pts"), folder / "huge.pts")
    return folder


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    argv: Callable  # (env, tmp) -> list[str]
    status: int
    message: str | None = None  # in the error line of stderr (exit 2) or anywhere in stderr (exit 0)
    absent: tuple[str, ...] = ()  # paths under tmp that must not exist afterwards
    check: Callable | None = field(default=None)  # (env, tmp, stdout, stderr) -> None
    marks: tuple = ()


def nme_of(stdout: str) -> float:
    return json.loads(stdout)["metrics"]["nme_percent"]


CASES = [
    # 2. a plain folder: every pair, whatever the format, and it says so
    Case("eval-plain-folder-all-formats",
         lambda e, t: ["eval", "--model", e.model, "--data", str(_formats_folder(e, t)), "--json"], 0,
         "no split lists",
         check=lambda e, t, out, err: _assert(json.loads(out)["metrics"]["count"] == 4
                                              and json.loads(out)["data"]["split"] == "all", out)),
    # 3. nothing trained, nothing claimed
    Case("train-epochs-0", lambda e, t: ["train", "--data", str(e.faces), "--epochs", "0", "--out", str(t / "run")], 2,
         "argument --epochs: expected an integer >= 1, got '0'", absent=("run",)),
    # 4. lint of an empty file; --json is JSON only
    Case("lint-empty-file", lambda e, t: ["lint", str(_touch(t / "empty.onnx")), "--target", "cpu"], 2,
         "empty.onnx: empty file, not an ONNX model; pass a model written by `cunet-optimize export`"),
    # 5. tensors checked, not just metadata
    Case("models-wrong-shape", lambda e, t: ["models", "--checkpoint", str(damaged_checkpoint(e, t, "shape"))], 2,
         "has shape [3], the model expects"),
    Case("models-missing-key", lambda e, t: ["models", "--checkpoint", str(damaged_checkpoint(e, t, "missing"))], 2,
         "missing tensor"),
    # 6. degenerate images and annotations
    Case("predict-1x1", lambda e, t: ["predict", str(_image(t / "one.png", 1, 1)), "--model", e.model,
                                      "--out-dir", str(t / "out")], 2,
         "one.png: image is 1x1 pixels, too small for a face", absent=("out",)),
    Case("eval-pts-outside", lambda e, t: ["eval", "--model", e.model, "--data", str(with_pts_outside(e, t))], 2,
         "landmarks lie outside the 256x256 image"),
    Case("eval-orphan-pts", lambda e, t: ["eval", "--model", e.model, "--data", str(with_orphan_pts(e, t))], 2,
         "lonely.pts: landmark file without an image"),
    # 7. decompression bomb: a clear refusal, and --skip-bad skips it
    Case("predict-30000px", lambda e, t: ["predict", str(png_header_only(t / "huge.png", 30000, 30000)),
                                          "--model", e.model], 2, "huge.png: image too large to decode safely"),
    Case("eval-30000px-skip-bad", lambda e, t: ["eval", "--model", e.model, "--data", str(with_bomb(e, t)),
                                                "--skip-bad", "--json"], 0, "image too large",
         check=lambda e, t, out, err: _assert(json.loads(out)["metrics"]["count"] == 4, out)),
    # 8. every number checked before any work
    Case("build-calib-images-0", lambda e, t: ["build", "--calib-images", "0", "--workdir", str(t / "w")], 2,
         "argument --calib-images: expected an integer >= 1", absent=("w",)),
    Case("build-calib-images-neg", lambda e, t: ["build", "--calib-images", "-5", "--workdir", str(t / "w")], 2,
         "argument --calib-images: expected an integer >= 1", absent=("w",)),
    Case("build-max-nme-increase-neg", lambda e, t: ["build", "--max-nme-increase", "-1", "--workdir", str(t / "w")],
         2, "argument --max-nme-increase: expected a number >= 0", absent=("w",)),
    Case("build-equalize-2", lambda e, t: ["build", "--equalize", "2", "--workdir", str(t / "w")], 2,
         "argument --equalize: expected a number in [0, 1]", absent=("w",)),
    Case("train-lr-neg", lambda e, t: ["train", "--data", str(e.faces), "--lr", "-1", "--out", str(t / "run")], 2,
         "argument --lr: expected a number > 0", absent=("run",)),
    Case("train-batch-size-0", lambda e, t: ["train", "--data", str(e.faces), "--batch-size", "0",
                                             "--out", str(t / "run")], 2,
         "argument --batch-size: expected an integer >= 1", absent=("run",)),
    Case("train-lr-nan", lambda e, t: ["train", "--data", str(e.faces), "--lr", "nan", "--out", str(t / "run")], 2,
         "argument --lr: expected a number > 0", absent=("run",)),
    Case("qat-epochs-0", lambda e, t: ["qat", "--data", str(e.faces), "--out", str(t / "q"), "--epochs", "0"], 2,
         "argument --epochs: expected an integer >= 1", absent=("q",)),
    Case("calibrate-images-0", lambda e, t: ["calibrate", "--images", "0", "--workdir", str(t / "w")], 2,
         "argument --images: expected an integer >= 1", absent=("w",)),
    Case("eval-batch-size-0", lambda e, t: ["eval", "--data", str(e.faces), "--batch-size", "0"], 2,
         "argument --batch-size: expected an integer >= 1"),
    Case("profile-runs-0", lambda e, t: ["profile", "--runs", "0", "--workdir", str(t / "w")], 2,
         "argument --runs: expected an integer >= 1", absent=("w",)),
    Case("data-synth-count-0", lambda e, t: ["data", "synth", "--out", str(t / "d"), "--count", "0"], 2,
         "argument --count: expected an integer >= 1", absent=("d",)),
    # 9. surgery of an empty file / of something that is not a CU-Net
    Case("surgery-empty-file", lambda e, t: ["surgery", str(_touch(t / "empty.onnx")), "--workdir", str(t)], 2,
         "empty.onnx: empty file, not an ONNX model", absent=("empty-surgery.onnx",)),
    Case("surgery-not-cunet", lambda e, t: ["surgery", str(relu_onnx(t / "relu.onnx")), "--workdir", str(t)], 2,
         "relu.onnx: not a CU-Net graph (no convolution in the graph)", absent=("relu-surgery.onnx",)),
    Case("lint-not-cunet-json", lambda e, t: ["lint", str(relu_onnx(t / "relu.onnx")), "--target", "cpu", "--json"],
         0, None, check=lambda e, t, out, err: _assert(
             [f["rule"] for f in json.loads(out)["findings"]] == ["cunet-graph"], out)),
    # 10. a profile with the right tag and wrong types
    Case("report-wrong-types", lambda e, t: ["report", str(bad_profile(t)), "--out", str(t / "r.html")], 2,
         "p.json: variants[0].latency is str 'fast', expected an object; re-run `cunet-optimize profile`",
         absent=("r.html",)),
    # 12. output folders checked before any work
    Case("build-workdir-under-a-file", lambda e, t: ["build", "--workdir", str(_touch(t / "f") / "w")], 2,
         "--workdir", absent=("f/w",)),
    Case("predict-out-dir-under-a-file", lambda e, t: ["predict", str(e.images[0]), "--model", e.model,
                                                       "--out-dir", str(_touch(t / "f") / "o")], 2,
         "is a file, not a folder; choose another --out-dir"),
    # 15. flags, not Python arguments; never the unsafe pickle advice
    Case("eval-missing-split-names-flag", lambda e, t: ["eval", "--model", e.model, "--data", str(e.faces),
                                                        "--split", "nosuch"], 2, "pass --split all"),
    Case("eval-bad-pts-names-flag", lambda e, t: ["eval", "--model", e.model, "--data", str(with_orphan_pts(e, t))],
         2, "pass --skip-bad"),
    Case("eval-pickled-checkpoint", lambda e, t: ["eval", "--model", str(pickled_checkpoint(t)), "--data",
                                                  str(e.faces)], 2, "refuses to load",
         check=lambda e, t, out, err: _assert("weights_only" not in err and "False" not in err, err)),
]


def _assert(condition: bool, context: str) -> None:
    assert condition, context[-2000:]


def _touch(path: Path) -> Path:
    path.touch()
    return path


def _image(path: Path, w: int, h: int) -> Path:
    Image.new("RGB", (w, h)).save(path)
    return path


def _formats_folder(env, tmp: Path) -> Path:
    folder = tmp / "formats"
    folder.mkdir()
    for image, ext in zip(env.images, (".bmp", ".ppm", ".tif", ".png")):
        Image.open(image).save(folder / (image.stem + ext))
        shutil.copy(image.with_suffix(".pts"), folder / (image.stem + ".pts"))
    return folder


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case, env, tmp_path, capsys, caplog):
    status, out, err = run_cli(case.argv(env, tmp_path), capsys, caplog)
    assert status == case.status, err[-2000:]
    if case.message is not None:
        # exit 2: the refusal's one line (argparse's is followed by where --help is)
        where = next((line for line in err.splitlines() if line.startswith("cunet-optimize") and ": error: " in line),
                     "") if case.status == 2 else err
        assert case.message in where, err[-2000:]
        if case.status == 2:
            assert "Traceback" not in err
    if case.check:
        case.check(env, tmp_path, out, err)
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel


# ----------------------------------------------------------------------------- right results


def test_16bit_png_reads_as_its_8bit_picture(env, tmp_path, capsys):
    """1. An I;16 PNG is the same picture as its 8-bit version, not an all-white image."""
    grey8 = np.asarray(Image.open(env.images[0]).convert("L"))
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "i16.png")
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    results = {}
    for name in ("i16", "g8"):
        assert main(["predict", str(tmp_path / f"{name}.png"), "--model", env.model, "--no-detect",
                     "--no-draw", "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out)[0]["landmarks"]
    assert results["i16"] == results["g8"]


def test_eval_nme_unchanged_by_a_16bit_copy(env, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = plain_folder(env, tmp_path / "a"), plain_folder(env, tmp_path / "b")
    first = env.images[0].name
    grey8 = np.asarray(Image.open(a / first).convert("L"))
    Image.fromarray(grey8).save(a / first)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(b / first)
    nmes = []
    for folder in (a, b):
        assert main(["eval", "--model", env.model, "--data", str(folder), "--json"]) == 0
        nmes.append(nme_of(capsys.readouterr().out))
    assert nmes[0] == nmes[1]


def test_predict_respects_exif_orientation(env, tmp_path, capsys):
    image = Image.open(env.images[0]).convert("RGB").resize((200, 120))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "photo.jpg", exif=exif)
    assert main(["predict", str(tmp_path / "photo.jpg"), "--model", env.model, "--out-dir", str(tmp_path),
                 "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert Image.open(entry["annotated"]).size == (120, 200)  # upright, as a viewer shows it


def test_predict_without_the_detector_extra_uses_the_whole_image(env, tmp_path, capsys, caplog, monkeypatch):
    import cunet_optimize.detect as detect

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    monkeypatch.setattr(detect, "_cascade", None)
    monkeypatch.setattr(detect, "_told_unavailable", False)
    assert main(["predict", str(env.images[0]), "--model", env.model, "--no-draw", "--json"]) == 0
    out, err = capsys.readouterr()
    err += caplog.text
    assert json.loads(out)[0]["crop"] == "whole image"
    assert "pip install 'cunet-optimize[face]'" in err and "whole image" in err


def test_predict_uses_the_detector_box_when_it_finds_a_face(env, tmp_path, capsys, monkeypatch):
    import cunet_optimize.detect as detect

    monkeypatch.setattr(detect, "detect_face", lambda image: [40.0, 50.0, 200.0, 210.0])
    assert main(["predict", str(env.images[0]), "--model", env.model, "--no-draw", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)[0]
    assert entry["crop"] == "detector" and entry["box"] == [40.0, 50.0, 200.0, 210.0]


def test_opencv_detector_when_installed(env):
    pytest.importorskip("cv2", reason="the optional face-detector extra (pip install 'cunet-optimize[face]') is not installed; the whole-image fallback is tested without it")
    from cunet_optimize.detect import detect_face

    box = detect_face(np.zeros((64, 64, 3), np.uint8))
    assert box is None  # a blank picture has no face; the cascade loaded from inside the package


def test_train_never_claims_a_best_checkpoint_it_did_not_write(env, tmp_path, capsys, monkeypatch):
    """3. A run whose validation never scores (here: forced NaN) says so and names only real files."""
    import cunet_optimize.train.loop as loop

    real = loop.evaluate_landmarks

    def nan_eval(*a, **k):
        result = real(*a, **k)
        result.metrics["nme_percent"] = float("nan")
        return result

    monkeypatch.setattr(loop, "evaluate_landmarks", nan_eval)
    assert main(["train", "--model", "cunet-face-small", "--set", "width=8", "--set", "growth_rate=4",
                 "--set", "neck_size=2", "--data", str(env.faces), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--batch-size", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "run" / "best.safetensors").exists()
    assert "best.safetensors" not in out and "inf%" not in out and "no best checkpoint" in out


# ----------------------------------------------------------------------------- faults


@pytest.mark.slow
def test_closed_stdout_ends_quietly(env):
    """13. `predict --json | head -c 100`: no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "cunet_optimize.cli", "predict", *map(str, env.images),
                             "--model", env.model, "--no-draw", "--no-detect", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_full_disk_is_one_line(env, tmp_path, capsys, monkeypatch):
    """A write failing with ENOSPC mid-command: one line, exit 2, nothing written."""
    import errno

    import cunet_optimize.commands.predict as predict

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "x.png"))

    monkeypatch.setattr(predict, "draw_landmarks", full)
    assert main(["predict", str(env.images[0]), "--model", env.model, "--no-detect",
                 "--out-dir", str(tmp_path / "out")]) in (2,)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device; free disk space" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only-permission folders")
def test_read_only_workdir_is_refused_before_any_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["profile", "--workdir", str(ro)]) == 2
        assert "--workdir" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_stale_partial_build_folders_are_removed_under_the_lock(env, tmp_path, capsys):
    """14. Staging folders of killed builds go at the next build into the workdir (a refused
    build, which never takes the lock, leaves them and everything else as it was)."""
    partial = tmp_path / "engines" / ".tiny-int8-cpu.partial-abc123"
    partial.mkdir(parents=True)
    (partial / "export.onnx").write_bytes(b"x")
    assert main(["build", "--target", "no-such-target", "--workdir", str(tmp_path)]) == 2
    assert partial.exists()
    assert main(_build_args(env, tmp_path)) == 0
    assert not partial.exists() and [p.name for p in (tmp_path / "engines").iterdir()] == ["tiny-fp32-cpu"]


def test_a_second_writer_waits_for_the_lock(tmp_path):
    """Two builds into one workdir: the second waits (and says why) until the first is done."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from cunet_optimize.workdir_lock import workdir_lock
        with workdir_lock({str(tmp_path)!r}, "first build"):
            print("locked", flush=True)
            sys.stdin.readline()  # hold it until the test says so
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "locked"
    second = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import logging
        logging.basicConfig(format="%(message)s")
        from cunet_optimize.workdir_lock import workdir_lock
        with workdir_lock({str(tmp_path)!r}, "second build"):
            print("got it", flush=True)
        """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    told = second.stderr.readline()
    assert "in use by first build" in told and "waiting" in told
    assert second.poll() is None  # still waiting
    holder.stdin.write("\n")
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0 and out.strip() == "got it"


# ----------------------------------------------------------------------------- slow: builds, caches, kills


def _calibrate_args(env, workdir):
    return ["calibrate", "--model", env.model, "--data", str(env.faces), "--images", "4", "--workdir", str(workdir)]


@pytest.mark.slow
def test_damaged_calibration_cache_is_recomputed(env, tmp_path, capsys, caplog):
    """11. A truncated calib/<id>/scales.json fails its checksum and is recomputed."""
    assert main(_calibrate_args(env, tmp_path) + ["--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    scales = Path(first["scales_file"])
    good = scales.read_bytes()
    scales.write_bytes(good[: len(good) // 2])
    assert main(_calibrate_args(env, tmp_path) + ["--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["cached"] is False and "not reusable" in caplog.text
    assert scales.read_bytes() == good  # recomputed: same data, same scales
    assert main(_calibrate_args(env, tmp_path) + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is True


@pytest.mark.slow
def test_calibrate_killed_mid_write_restarts_cleanly(env, tmp_path, capsys):
    """kill -9 after the equalization factors, before the scales: the rerun (in this process:
    only the killed run needs its own) recomputes and seals."""
    killer = textwrap.dedent(f"""
        import os, signal
        import cunet_optimize.quant as quant
        def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        quant.save_scales = die
        from cunet_optimize.cli import main
        main({_calibrate_args(env, tmp_path)!r})
    """)
    killed = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, env=ENV)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (calib,) = (tmp_path / "calib").iterdir()
    assert not (calib / "scales.json").exists() and not (calib / "checksums.json").exists()
    capsys.readouterr()
    assert main(_calibrate_args(env, tmp_path) + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is False
    assert (calib / "checksums.json").is_file() and not list(calib.glob(".*.tmp"))


@pytest.mark.slow
def test_qat_killed_resumes(env, tmp_path, capsys):
    """kill -9 inside QAT's third optimizer step; the same command (in this process: only the
    killed run needs its own) resumes and finishes."""
    args = ["qat", "--model", env.model, "--data", str(env.faces), "--out", str(tmp_path / "q"), "--epochs", "2",
            "--lr", "1e-4", "--batch-size", "2", "--calib-images", "4", "--checkpoint-every", "1",
            "--no-equalize", "--threads", "1", "--json"]
    killer = textwrap.dedent(f"""
        import os, signal, torch
        calls = [0]
        for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop):
            step = cls.step
            def killing_step(self, *a, _step=step, **k):
                calls[0] += 1
                if calls[0] == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                return _step(self, *a, **k)
            cls.step = killing_step
        from cunet_optimize.cli import main
        main({args!r})
    """)
    killed = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, env=ENV)
    assert killed.returncode == -9, killed.stderr[-2000:]
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [h["epoch"] for h in summary["history"]] == [1, 2] and Path(summary["qat_checkpoint"]).is_file()


def _build_args(env, workdir, *extra):
    return ["build", "--precision", "fp32", "--model", env.model, "--eval-data", str(env.faces),
            "--eval-split", "all", "--no-accuracy-gate", "--workdir", str(workdir), *extra]


@pytest.mark.slow
def test_full_disk_mid_build_leaves_nothing(env, tmp_path, capsys, monkeypatch):
    import errno

    import onnx

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save", full)  # the surgery stage's write
    assert main(_build_args(env, tmp_path)) == 2
    assert "No space left on device; free disk space" in capsys.readouterr().err.splitlines()[-1]
    assert list((tmp_path / "engines").iterdir()) == []


@pytest.mark.slow
def test_two_builds_into_one_workdir(env, tmp_path):
    """Both start at once: one builds, the other waits for it, then refuses to overwrite it."""
    procs = [subprocess.Popen([sys.executable, "-m", "cunet_optimize.cli", *_build_args(env, tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "already exists; pass --force" in refused
    assert [p.name for p in (tmp_path / "engines").iterdir()] == ["tiny-fp32-cpu"]
    assert json.loads((tmp_path / "engines" / "tiny-fp32-cpu" / "build.json").read_text())["name"] == "tiny-fp32-cpu"
