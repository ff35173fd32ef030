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

import contextlib
import fnmatch
import hashlib
import io
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


# ---- integrity helpers (items 4, 5, 6; and item 8's zero-range calibration set)


def calibrate_args(env, faces, workdir) -> list[str]:
    """`calibrate` of the tiny model on `faces` (all 6 images), JSON out."""
    return ["calibrate", "--model", env.model, "--data", str(faces), "--split", "all", "--images", "6",
            "--workdir", str(workdir), "--json"]


def calibrated(env, tmp: Path) -> Path:
    """tmp/faces (a copy of the fixture's faces) calibrated once into tmp/w; returns tmp/faces."""
    faces = Path(shutil.copytree(env.faces, tmp / "faces"))
    assert main(calibrate_args(env, faces, tmp / "w")) == 0
    return faces


def repainted(env, tmp: Path) -> list[str]:
    """Calibrated once, then one image's pixels replaced under the same name."""
    faces = calibrated(env, tmp)
    repaint(faces / "images" / env.images[0].name)
    return calibrate_args(env, faces, tmp / "w")


def check_recalibrated(env, tmp, out, err):
    assert json_out(out)["cached"] is False, "the old scales were reused for new pixels"
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        assert main(calibrate_args(env, tmp / "faces", tmp / "w")) == 0
    assert json_out(again.getvalue())["cached"] is True  # the new pixels' scales are the cache now


def repaint(image: Path) -> None:
    """New pixels under the same name (the image's negative)."""
    from PIL import Image, ImageOps

    with Image.open(image) as im:
        ImageOps.invert(im.convert("RGB")).save(image)


def json_out(out: str) -> dict:
    return json.loads(out[out.index("{"):])


def fp32_references(workdir: Path) -> list[Path]:
    """The FP32 reference records of a workdir (whatever the cache's layout)."""
    return sorted(p for p in (workdir / "calib" / "fp32-reference").rglob("*.json") if p.name != "checksums.json")


def edit_fp32_reference(env, tmp: Path, text: Callable[[dict], str]) -> list[str]:
    """A copy of the module's build whose FP32 reference record(s) now read `text(record)`; argv
    rebuilds it (the same graph on the same data: the cache's key)."""
    w = built_workdir(env, tmp)
    refs = fp32_references(w)
    assert refs
    for ref in refs:
        ref.write_text(text(json.loads(ref.read_text())))
    return build_args(env, w, "--force")


def resealed_empty_list(env, tmp: Path) -> list[str]:
    """The record replaced by `[]` and its seal updated to match: only the content check is left."""
    argv = edit_fp32_reference(env, tmp, lambda r: "[]")
    for ref in fp32_references(tmp / "w"):
        seal = ref.parent / "checksums.json"
        if seal.is_file():
            sums = json.loads(seal.read_text())
            sums[ref.name] = hashlib.sha256(ref.read_bytes()).hexdigest()
            seal.write_text(json.dumps(sums))
    return argv


def gate_reference(tmp: Path) -> dict:
    return json.loads((tmp / "w" / "engines" / "tiny-fp32-cpu" / "build.json").read_text())["accuracy"]


def nme_99(record: dict) -> str:
    record["metrics"]["nme_percent"] = 99.0
    return json.dumps(record)


def check_reference_recomputed(env, tmp, out, err):
    acc = gate_reference(tmp)
    assert "cached" not in acc["reference_runtime"], acc["reference_runtime"]
    assert acc["reference_value"] < 99 and abs(acc["reference_value"] - acc["quantized_value"]) < 1.0, acc
    assert "recomputing the FP32 reference" in err


def same_size_edit(pts: Path) -> None:
    """One landmark moved by a pixel without changing the file's size or modification time (as
    `cp -p` / `rsync -t` of a corrected annotation would leave it)."""
    st = pts.stat()
    lines = pts.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        parts = line.split()
        if len(parts) == 2 and parts[0][:1].isdigit():
            x = parts[0]
            last = x[-1]
            lines[i] = line.replace(x, x[:-1] + ("1" if last == "0" else "0"), 1)
            break
    pts.write_text("".join(lines))
    assert pts.stat().st_size == st.st_size
    os.utime(pts, ns=(st.st_atime_ns, st.st_mtime_ns))


def eval_data_edited(env, tmp: Path) -> list[str]:
    """tmp/faces built once in tmp/w, then one annotation changed under the same size and mtime."""
    faces = Path(shutil.copytree(env.faces, tmp / "faces"))
    args = ["build", "--precision", "fp32", "--model", env.model, "--eval-data", str(faces), "--eval-split", "all",
            "--no-accuracy-gate", "--workdir", str(tmp / "w")]
    assert main(args) == 0
    for pts in sorted((faces / "images").glob("*.pts"))[:3]:
        same_size_edit(pts)
    return args + ["--force"]


def check_reference_not_cached(env, tmp, out, err):
    assert "cached" not in gate_reference(tmp)["reference_runtime"]


def truncated_legacy_cache(env, tmp: Path) -> list[str]:
    faces = calibrated(env, tmp)
    (legacy,) = (tmp / "w" / "calib").glob("*/calibration.cache")
    (tmp / "good.cache").write_bytes(legacy.read_bytes())
    legacy.write_bytes(legacy.read_bytes()[:40])
    return calibrate_args(env, faces, tmp / "w")


def check_legacy_rewritten(env, tmp, out, err):
    (legacy,) = (tmp / "w" / "calib").glob("*/calibration.cache")
    assert legacy.read_bytes() == (tmp / "good.cache").read_bytes()
    assert json_out(out)["legacy_cache_cached"] is False


def swapped_engine(env, tmp: Path) -> list[str]:
    """The build's model.ort.onnx replaced by another runnable engine (its own model.onnx)."""
    w = built_workdir(env, tmp)
    build = w / "engines" / "tiny-fp32-cpu"
    shutil.copyfile(build / "model.onnx", build / "model.ort.onnx")
    return ["profile", str(build), "--runs", "1", "--warmup", "0", "--batch-sizes", "1", "--memory", "off",
            "--layer-runs", "0", "--no-progress", "--workdir", str(w)]


def black_faces(env, tmp: Path) -> Path:
    """The fixture's faces with every image painted black (annotations kept)."""
    from PIL import Image

    faces = Path(shutil.copytree(env.faces, tmp / "black"))
    for image in (faces / "images").glob("*.png"):
        with Image.open(image) as im:
            size = im.size
        Image.new("RGB", size).save(image)
    return faces


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
    Case("calib-cache-keyed-by-pixels", "integrity", 4, repainted, 0, check=check_recalibrated),
    Case("fp32-reference-edited", "integrity", 5,
         lambda e, t: edit_fp32_reference(e, t, nme_99), 0, check=check_reference_recomputed),
    Case("fp32-reference-empty-list", "integrity", 5,
         lambda e, t: edit_fp32_reference(e, t, lambda r: "[]"), 0, check=check_reference_recomputed),
    Case("fp32-reference-resealed-malformed", "integrity", 5,
         resealed_empty_list, 0, check=check_reference_recomputed),
    Case("fp32-reference-keyed-by-content", "integrity", 5,
         eval_data_edited, 0, check=check_reference_not_cached),
    Case("legacy-cache-truncated", "integrity", 5,
         truncated_legacy_cache, 0, check=check_legacy_rewritten),
    Case("profile-swapped-engine", "integrity", 6,
         swapped_engine, 2, "model.ort.onnx does not match the sha256 build.json recorded; rebuild with"),
    # ------------------------------------------------------------------- end integrity

    # ------------------------------------------------------------------- wrong results (7, 8, 9)
    Case("calib-zero-range", "wrong-result", 8,
         lambda e, t: build_args(e, t / "w", "--precision", "int8", "--calib-data", black_faces(e, t)),
         # refused in the calibrate stage, under the workdir lock: its (empty) lock file may stay
         2, "calibration images have zero range", may_create=("w/.cunet-optimize.lock",)),
    # ------------------------------------------------------------------- end wrong results

    # ------------------------------------------------------------------- grammar (10)
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


# ----------------------------------------------------------------------------- wrong results (item 8: zero range)
# The threshold of the zero-range refusal is exact (every pixel equal): the row above refuses a
# black set end to end; here one lit pixel in one image is enough to calibrate, and an internal
# activation whose amax is 0 (a dead channel) keeps the smallest scale instead of being refused.


def test_zero_range_threshold_and_dead_channels():
    import torch

    from cunet_optimize.models import CUNet, CUNetConfig
    from cunet_optimize.quant import CalibrationError, activation_quantizers, calibrate, quantize_model
    from cunet_optimize.quant.policy import quant_scheme

    def qmodel():
        torch.manual_seed(0)
        return quantize_model(CUNet(CUNetConfig(num_unets=2, order=1, num_classes=4, width=8, growth_rate=4)).eval(),
                              quant_scheme("int8", None, "onnxruntime"))

    black = torch.zeros(2, 3, 64, 64)
    with pytest.raises(CalibrationError, match="calibration images have zero range"):
        calibrate(qmodel(), [black, black], "max", progress=False)
    with pytest.raises(CalibrationError, match="zero range"):  # constant but not black: no range either
        calibrate(qmodel(), [torch.full_like(black, 0.5)], "max", progress=False)
    lit = black.clone()
    lit[1, 0, 7, 7] = 1 / 255
    amax = calibrate(qmodel(), [black, lit], "max", progress=False)
    assert amax and all(v >= 0 for v in amax.values())
    dead = qmodel()  # every conv dead: the activations after the first are all zero
    with torch.no_grad():
        for m in dead.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
    amax = calibrate(dead, [black, lit], "max", progress=False)
    assert set(amax) == set(activation_quantizers(dead)) and 0.0 in amax.values() and max(amax.values()) > 0
