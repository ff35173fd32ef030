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
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from conftest import run_cli
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


def symlinked(link: Path, target: Path) -> Path:
    """`link` -> `target` (a new folder)."""
    target.mkdir(parents=True)
    link.symlink_to(target, target_is_directory=True)
    return link


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------- helpers: data loss (item 2) and one line (12, 13)


def profile_json(tmp: Path, name: str = "p") -> Path:
    """A valid profile JSON, as `profile` writes it (test_report's), in tmp/<name>.json."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_report import full_profile

    return touch(tmp / f"{name}.json", json.dumps(full_profile(name=name), default=str))


def two_faces_one_stem(env, tmp: Path) -> list[Path]:
    """a/face.png and b/face.png: two images whose annotated PNGs have one name."""
    faces = [tmp / "a" / "face.png", tmp / "b" / "face.png"]
    for image, face in zip(env.images, faces):
        face.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, face)
    return faces


def quick_profile(workdir: Path, *extra) -> list[str]:
    """`profile` of a built workdir at the least cost (one image, one run, batch 1)."""
    return ["profile", "--workdir", str(workdir), "--runs", "1", "--warmup", "0", "--batch-sizes", "1",
            "--memory", "off", "--layer-runs", "0", "--max-images", "1", "--no-progress", *extra]


def built_with_report(env, tmp: Path, file: str) -> Path:
    """A built workdir whose reports/ already holds `file` (the user's)."""
    workdir = built_workdir(env, tmp)
    touch(workdir / "reports" / file, "user file")
    return workdir


def replaced_by_html(path: str):
    """check: the user's file at `path` (under tmp) now holds the report."""
    return lambda e, t, out, err: _expect("<html" in (t / path).read_text().lower(), (t / path).read_text()[:200])


def _expect(condition: bool, context: str) -> None:
    assert condition, context


def argparse_refusal_only(e, t, out, err) -> None:
    """check: an argparse refusal prints its error line and where --help is, no usage block."""
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("see 'cunet-optimize ") and lines[1].endswith(" --help'"), err


# ---- helpers of the wrong-result (7, 8) and one-line (12, 13) rows: inputs a checkpoint or a data
# set should be refused for (models/checkpoint.py, evaluate.check_finite, data/face300w.py, data/mpii.py)


def tiny_state(env) -> tuple[dict, dict]:
    """(tensors, metadata) of the module's tiny checkpoint, to damage."""
    from safetensors import safe_open

    with safe_open(env.model, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def tiny_variant(env, path: Path, edit_tensors=None, edit_meta=None) -> Path:
    """The tiny checkpoint with its tensors and/or metadata edited in place by the callables."""
    from safetensors.torch import save_file

    tensors, meta = tiny_state(env)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(path), metadata=meta)
    return path


def with_nan(tensors: dict, key: str, count: int = 3, value: float = float("nan")) -> None:
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[:count] = value


def with_config(**fields):
    """A metadata edit: these config fields changed."""
    def edit(meta: dict) -> None:
        meta["config"] = json.dumps({**json.loads(meta["config"]), **fields})
    return edit


def authors_file(env, path: Path, edit=None) -> Path:
    """The tiny model as the authors' torch.save'd DataParallel dict, optionally edited."""
    import torch

    state = {f"module.{k}": v for k, v in tiny_state(env)[0].items()}
    if edit:
        edit(state)
    torch.save({"state_dict": state, "epoch": 1}, path)
    return path


def grown_last_layer(state: dict) -> None:
    """U-Net N-1's first dense layer made wider (c0 + N*g inputs) than any order K < N gives."""
    n = 1 + max(int(m.group(1)) for k in state
                if (m := re.match(r"module\.hg\.down_blocks\.0\.layers\.(\d+)\.norm1\.weight$", k)))
    width = state["module.features.conv0.weight"].shape[0]
    growth = state["module.hg.down_blocks.0.layers.0.conv2.weight"].shape[0]
    key = f"module.hg.down_blocks.0.layers.{n - 1}.norm1.weight"
    state[key] = state[key].new_ones(width + n * growth)


def run_folder(env, tmp: Path) -> Path:
    """A training run's folder, holding its best.safetensors."""
    (tmp / "run").mkdir()
    shutil.copy(env.model, tmp / "run" / "best.safetensors")
    return tmp / "run"


def without_version_record(env, path: Path) -> Path:
    """A torch zip file with its `version` record missing: torch.load's message for it asks the
    reader to report an enhancement request to PyTorch."""
    import zipfile

    src = authors_file(env, path.with_name("whole.pth.tar"))
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for name in z.namelist():
            if not name.endswith("/version"):
                out.writestr(name, z.read(name))
    src.unlink()
    return path


def faces_copy(env, tmp: Path, edit_pts=None) -> Path:
    """A copy of the 6 faces; edit_pts(index, landmarks) -> landmarks rewrites .pts files."""
    from cunet_optimize.data.pts import read_pts, write_pts

    faces = Path(shutil.copytree(env.faces, tmp / "faces"))
    if edit_pts:
        for i, pts in enumerate(sorted((faces / "images").glob("*.pts"))):
            new = edit_pts(i, read_pts(pts).copy())
            if new is not None:
                write_pts(pts, new)
    return faces


def far_outside(i: int, points):
    """Image 1: 27 of 68 points 1e5 px away; image 2: one point 0.9 image sizes past the right
    border (kept: within the image's own size); image 3: one 1.1 image sizes past (refused)."""
    if i == 1:
        points[:27] += 1e5
    elif i in (2, 3):
        points[0, 0] = 255.5 + (0.9 if i == 2 else 1.1) * 256
    else:
        return None
    return points


def zero_inter_ocular(i: int, points):
    if i == 0:
        points[45] = points[36]
        return points
    return None


def two_images_of_one_stem(env, tmp: Path, other: str) -> Path:
    faces = faces_copy(env, tmp)
    shutil.copy(faces / "images" / "00001.png", faces / "images" / f"00001{other}")
    return faces


def pose_model(tmp: Path) -> Path:
    """A tiny 16-joint (pose) model."""
    import torch

    from cunet_optimize.models import create_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp / "pose.safetensors"
    save_checkpoint(create_model("cunet-face-small", width=8, growth_rate=4, neck_size=2, num_classes=16), path,
                    {"task": "pose"})
    return path


def mpii_with(tmp: Path, **fields) -> Path:
    """An MPII annotation JSON of one valid record with `fields` replaced, and its image."""
    from PIL import Image

    (tmp / "mpii" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp / "mpii" / "images" / "a.png")
    record = {"img_paths": "a.png", "joint_self": [[20.0, 20.0, 1.0]] * 16, "objpos": [32.0, 32.0],
              "scale_provided": 0.3, "normalizer": 10.0, "isValidation": 1.0, "dataset": "MPII", **fields}
    path = tmp / "mpii" / "mpii_annotations.json"
    path.write_text(json.dumps([record]))
    return path


def json_count(expected: int):
    def check(env, tmp, out, err):
        assert json.loads(out)["metrics"]["count"] == expected, out
    return check


def no_torch_advice(env, tmp, out, err):
    assert "PyTorch" not in err and "report" not in err, err


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
    spelt = grammar_built("int8-untied", "tiny-int8-untied-h100")(env, tmp, out, err)
    assert spelt["calibration"]["scheme"] == "int8-untied"
    ids = sorted(p.name for p in (tmp / "w" / "calib").iterdir())
    assert spelt["calibration"]["id"] in ids
    assert main(["calibrate", "--model", env.model, "--data", str(env.faces), "--split", "all",
                 "--precision", "int8", "--concat-qdq", "untied", "--workdir", str(tmp / "w")]) == 0
    assert sorted(p.name for p in (tmp / "w" / "calib").iterdir()) == ids


def grammar_calibrate_then_build(env, tmp, out, err):
    """`calibrate --precision Int8` and `build --precision ' INT8 '` read the same precision: the
    build (spelt in upper case, with spaces) is engines/tiny-int8-h100/, records int8, and reuses
    the scales calibrate cached."""
    calibrated = [line for line in out.splitlines() if line.endswith("scales.json")]
    assert len(calibrated) == 1, out
    assert main(build_args(env, tmp / "w", "--precision", " INT8 ", "--calib-images", "2", "--target", "h100")) == 0
    built = grammar_built("int8", "tiny-int8-h100")(env, tmp, out, err)
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
         2, "--name '..' is not a build folder name"),
    Case("build-name-dotdot-force", "data-loss", 1,
         lambda e, t: build_args(e, built_workdir(e, t), "--name", "..", "--force"), 2,
         "--name '..' is not a build folder name"),
    Case("build-name-with-slash", "data-loss", 1, lambda e, t: build_args(e, t / "w", "--name", "a/b"), 2,
         "--name 'a/b' is not a build folder name"),
    Case("build-name-hidden", "data-loss", 1, lambda e, t: build_args(e, t / "w", "--name", ".x"), 2,
         "--name '.x' is not a build folder name"),
    Case("build-name-dash", "data-loss", 1, lambda e, t: build_args(e, t / "w", "--name=-x"), 2,
         "--name '-x' is not a build folder name"),
    Case("build-model-named-like-a-dotfile", "data-loss", 1,
         lambda e, t: build_args(e, t / "w") + ["--model", str(shutil.copy(e.model, t / ".face.safetensors"))], 0,
         check=lambda e, t, out, err: _expect([p.name for p in (t / "w" / "engines").iterdir()]
                                              == ["face-fp32-cpu"], err)),
    Case("build-force-over-a-file", "data-loss", 3,
         lambda e, t: build_args(e, t / "w", "--force") if touch(t / "w" / "engines" / "tiny-fp32-cpu", "x") else [],
         2, "engines/tiny-fp32-cpu exists and is not a build folder"),
    Case("build-force-over-a-folder-that-is-not-a-build", "data-loss", 3,
         lambda e, t: build_args(e, t / "w", "--force")
         if touch(t / "w" / "engines" / "tiny-fp32-cpu" / "notes.txt", "mine") else [],
         2, "engines/tiny-fp32-cpu exists and is not a build (no build.json)"),
    Case("build-force-replaces-a-build", "data-loss", 3,
         lambda e, t: build_args(e, built_workdir(e, t), "--force"), 0,
         check=lambda e, t, out, err: _expect(sorted(p.name for p in (t / "w" / "engines").iterdir())
                                              == ["tiny-fp32-cpu"], err)),
    Case("build-refused-leaves-no-workdir", "data-loss", 11,
         lambda e, t: build_args(e, t / "new", "--target", "no-such-target"), 2, "no-such-target"),
    Case("build-refused-existing-build-leaves-no-lock", "data-loss", 11,
         lambda e, t: build_args(e, built_workdir(e, t)), 2, "already exists; pass --force"),
    # item 2: an output is replaced only with --force, an input never (check_new_output)
    Case("out-report-over-own-input", "data-loss", 2,
         lambda e, t: ["report", profile_json(t), "--out", t / "p.json"], 2, "is the input"),
    Case("out-report-over-own-input-force", "data-loss", 2,
         lambda e, t: ["report", profile_json(t), "--out", "p.json", "--force"], 2, "is the input"),
    Case("out-report-over-compare", "data-loss", 2,
         lambda e, t: ["report", profile_json(t), "--compare", profile_json(t, "o"), "--out", "o.json"],
         2, "is the input"),
    Case("out-report-over-a-file", "data-loss", 2,
         lambda e, t: ["report", profile_json(t), "--out", touch(t / "mine.html", "user file")], 2,
         "mine.html already exists; pass --force to replace it or choose another --out"),
    Case("out-report-over-a-file-force", "data-loss", 2,
         lambda e, t: ["report", profile_json(t), "--out", touch(t / "mine.html", "user file"), "--force"], 0,
         check=replaced_by_html("mine.html")),
    Case("out-report-default-exists", "data-loss", 2,
         lambda e, t: ["report", profile_json(t)] if touch(t / "p.html", "user file") else [], 2,
         "p.html already exists; pass --force"),
    Case("out-profile-out-exists", "data-loss", 2,
         lambda e, t: quick_profile(built_with_report(e, t, "r.html"), "--out", "r"), 2,
         "r.html already exists; pass --force to replace it or choose another --out"),
    Case("out-profile-out-exists-force", "data-loss", 2,
         lambda e, t: quick_profile(built_with_report(e, t, "r.json"), "--out", "r", "--force"), 0,
         check=lambda e, t, out, err: _expect(json.loads((t / "w" / "reports" / "r.json").read_text())["name"] == "r",
                                              "r.json not replaced")),
    Case("out-surgery-over-a-file", "data-loss", 2,
         lambda e, t: ["surgery", e.build / "model.onnx", "--passes", "cleanup", "--no-verify",
                       "--out", touch(t / "o.onnx", "user file")], 2, "o.onnx already exists; pass --force"),
    Case("out-surgery-default-exists", "data-loss", 2,
         lambda e, t: ["surgery", e.build / "model.onnx", "--passes", "cleanup", "--no-verify", "--workdir", t]
         if touch(t / "model-surgery.onnx", "user file") else [], 2, "model-surgery.onnx already exists"),
    Case("out-surgery-over-a-file-force", "data-loss", 2,
         lambda e, t: ["surgery", e.build / "model.onnx", "--passes", "cleanup", "--no-verify",
                       "--out", touch(t / "o.onnx", "user file"), "--force"], 0,
         check=lambda e, t, out, err: _expect((t / "o.onnx").stat().st_size > 1000, "o.onnx not replaced")),
    Case("out-surgery-over-own-input", "data-loss", 2,
         lambda e, t: ["surgery", shutil.copy(e.build / "model.onnx", t / "m.onnx"), "--passes", "cleanup",
                       "--no-verify", "--out", "m.onnx"], 2, "is the input"),
    Case("out-predict-same-stem", "data-loss", 2,
         lambda e, t: ["predict", *two_faces_one_stem(e, t), "--model", e.model, "--no-detect", "--out-dir", "o"], 2,
         "would both be drawn to o/face.landmarks.png"),
    Case("out-predict-same-stem-force", "data-loss", 2,  # --force replaces an earlier run's PNG, not this run's
         lambda e, t: ["predict", *two_faces_one_stem(e, t), "--model", e.model, "--no-detect", "--out-dir", "o",
                       "--force"], 2, "would both be drawn to o/face.landmarks.png"),
    Case("out-predict-png-exists", "data-loss", 2,
         lambda e, t: ["predict", e.images[0], "--model", e.model, "--no-detect", "--out-dir", "o"]
         if touch(t / "o" / f"{e.images[0].stem}.landmarks.png", "user file") else [], 2,
         "landmarks.png already exists; pass --force to replace it or choose another --out-dir"),
    Case("out-predict-png-exists-force", "data-loss", 2,
         lambda e, t: ["predict", e.images[0], "--model", e.model, "--no-detect", "--out-dir", "o", "--force"]
         if touch(t / "o" / f"{e.images[0].stem}.landmarks.png", "user file") else [], 0,
         check=lambda e, t, out, err: _expect(
             (t / "o" / f"{e.images[0].stem}.landmarks.png").read_bytes().startswith(b"\x89PNG"), "not replaced")),
    Case("out-predict-over-an-input", "data-loss", 2,
         lambda e, t: ["predict", shutil.copy(e.images[0], t / "a.png"),
                       shutil.copy(e.images[1], t / "a.landmarks.png"),  # where a.png's PNG would go
                       "--model", e.model, "--no-detect", "--out-dir", "."], 2, "is the input"),
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
    # item 7: a checkpoint with NaN/inf values is refused at load, naming the tensor (BatchNorm
    # statistics too, the authors' format too); a model whose outputs are NaN/inf, or a ground
    # truth that cannot be scored, is an error, never an "NME nan" printed with exit 0
    Case("eval-nan-weight", "wrong-result", 7,
         lambda e, t: ["eval", "--model", tiny_variant(e, t / "nan.safetensors", lambda d: with_nan(
             d, "hg.down_blocks.0.layers.0.conv1.weight")), "--data", e.faces, "--split", "all"],
         2, "tensor 'hg.down_blocks.0.layers.0.conv1.weight' has 3 NaN value(s); the checkpoint is damaged"),
    Case("eval-inf-running-var", "wrong-result", 7,
         lambda e, t: ["eval", "--model", tiny_variant(e, t / "inf.safetensors", lambda d: with_nan(
             d, "features.norm0.running_var", 1, float("inf"))), "--data", e.faces, "--split", "all"],
         2, "tensor 'features.norm0.running_var' has 1 inf value(s)"),
    Case("models-authors-nan", "wrong-result", 7,
         lambda e, t: ["models", "--checkpoint", authors_file(e, t / "a.pth.tar", lambda d: with_nan(
             d, "module.linears.0.conv.weight"))], 2, "tensor 'linears.0.conv.weight' has 3 NaN value(s)"),
    Case("eval-overflowing-model", "wrong-result", 7,
         lambda e, t: ["eval", "--model", tiny_variant(e, t / "big.safetensors", lambda d: d.update(
             {k: v * 1e30 for k, v in d.items() if k.endswith("conv.weight")})), "--data", e.faces, "--split", "all"],
         2, "NME is not a result here: PyTorch FP32 (CPU) outputs NaN/inf heatmaps for 6 of 6 images"),
    Case("eval-zero-inter-ocular", "wrong-result", 7,
         lambda e, t: ["eval", "--model", e.model, "--data", faces_copy(e, t, zero_inter_ocular), "--split", "all"],
         2, "inter_ocular distance is zero for 1 image(s)"),
    # item 8: a landmark further past the border than the image is large is a damaged .pts
    # (both directions in one row: 0.9 image sizes past is kept, 1.1 and 1e5 px are skipped)
    Case("eval-pts-far-outside", "wrong-result", 8,
         lambda e, t: ["eval", "--model", e.model, "--data", faces_copy(e, t, far_outside), "--split", "all"],
         2, "00001.pts: 27 of 68 landmarks lie far outside the 256x256 image"),
    Case("eval-pts-far-outside-skip-bad", "wrong-result", 8,
         lambda e, t: ["eval", "--model", e.model, "--data", faces_copy(e, t, far_outside), "--split", "all",
                       "--skip-bad", "--json"],
         0, "00003.pts: 1 of 68 landmarks lie far outside", check=json_count(4)),
    # item 8: two images of one .pts stem are an error naming both, never two samples
    Case("eval-png-and-PNG", "wrong-result", 8,
         lambda e, t: ["eval", "--model", e.model, "--data", two_images_of_one_stem(e, t, ".PNG"), "--split", "all"],
         2, "00001.PNG and "),
    Case("eval-png-and-jpg-skip-bad", "wrong-result", 8,
         lambda e, t: ["eval", "--model", e.model, "--data", two_images_of_one_stem(e, t, ".jpg"), "--split", "all",
                       "--skip-bad", "--json"],
         0, "2 images share the landmark file 00001.pts", check=json_count(5)),


    Case("calib-zero-range", "wrong-result", 8,
         lambda e, t: build_args(e, t / "w", "--precision", "int8", "--calib-data", black_faces(e, t)),
         # refused in the calibrate stage, under the workdir lock: its (empty) lock file may stay
         2, "calibration images have zero range", may_create=("w/.cunet-optimize.lock",)),
    # item 9: a symlinked --workdir gives a build whose artifact paths stay inside it, and profile runs it
    Case("build-symlinked-workdir", "wrong-result", 9,
         lambda e, t: build_args(e, symlinked(t / "link", t / "real")), 0,
         check=lambda e, t, out, err: _expect(
             main(["profile", "--workdir", str(t / "link"), "--runs", "2", "--warmup", "0", "--batch-sizes", "1",
                   "--memory", "off", "--layer-runs", "0", "--out", "p"]) == 0
             and (t / "real" / "reports" / "p.html").is_file(), err)),
    # ------------------------------------------------------------------- end wrong results

    # ------------------------------------------------------------------- grammar (10)
    Case("build-int8-tied", "grammar", 10,
         lambda e, t: build_args(e, t / "w", "--precision", "Int8-Tied", "--target", "h100"),
         0, check=grammar_built("int8-tied", "tiny-int8-tied-h100")),
    Case("build-int8-untied-as-flag", "grammar", 10,
         lambda e, t: build_args(e, t / "w", "--precision", "int8-untied", "--target", "h100"),
         0, check=grammar_same_calibration),
    Case("build-modifier-contradicts-flag", "grammar", 10,
         lambda e, t: build_args(e, built_workdir(e, t), "--precision", "int8-untied", "--concat-qdq", "none"),
         2, "--precision int8-untied puts INT8 Q/DQ on the concatenations, untied but --concat-qdq none"),
    Case("build-unknown-lists-grammar", "grammar", 10,
         lambda e, t: build_args(e, t / "w", "--precision", "nonsense"),
         2, "unknown precision 'nonsense'; use one of fp32, fp16 (build, export), int8[-convin|-tied|-untied], "
            "int4[-b<N>|-pc][-wo], the paper's w<k>[a<m>][g<n>] (e.g. w1a8, w2a8g8), auto (build; qat --plan)"),
    # (and the build in its check: `build --precision ' INT8 '`, upper case with spaces)
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
    # item 12: --box and --batch-sizes checked before any work
    Case("predict-box-nan", "one-line", 12,
         lambda e, t: ["predict", e.images[0], "--model", e.model, "--box", "nan,0,100,100"], 2,
         "--box 'nan,0,100,100': expected four finite numbers"),
    Case("predict-box-inf", "one-line", 12,
         lambda e, t: ["predict", e.images[0], "--model", e.model, "--box", "0,0,inf,inf"], 2,
         "--box '0,0,inf,inf': expected four finite numbers"),
    Case("profile-batch-100000", "one-line", 12,
         lambda e, t: ["profile", "--workdir", t / "w", "--batch-sizes", "1,100000"], 2,
         "at most 64 images per batch"),
    # item 13: the closest target; any letter case; argparse's error line first
    Case("target-did-you-mean", "one-line", 13,
         lambda e, t: ["lint", e.build / "model.onnx", "--target", "jetson-orin-nan"], 2,
         "did you mean jetson-orin-nano?"),
    Case("target-any-case", "one-line", 13,
         lambda e, t: ["surgery", e.build / "model.onnx", "--target", "H100", "--passes", "cleanup", "--no-verify",
                       "--out", "o.onnx", "--json"], 0,
         check=lambda e, t, out, err: _expect(json.loads(out)["target"] == "h100", out)),
    Case("target-any-case-build-records-registry-name", "one-line", 13,
         lambda e, t: build_args(e, t / "w", "--target", "CPU"), 0,
         check=lambda e, t, out, err: _expect(json.loads((t / "w" / "engines" / "tiny-fp32-cpu" / "build.json")
                                                         .read_text())["target"] == "cpu", out)),
    Case("argparse-error-first", "one-line", 13,
         lambda e, t: ["build", "--calib-images", "0", "--workdir", t / "w"], 2,
         "argument --calib-images: expected an integer >= 1", check=argparse_refusal_only),
    Case("argparse-unknown-option-names-command", "one-line", 13,
         lambda e, t: ["report", profile_json(t), "--nosuch"], 2, "unrecognized arguments: --nosuch",
         check=argparse_refusal_only),
    # item 12: checkpoints and annotations of the wrong types or sizes are one line
    Case("models-authors-values-not-tensors", "one-line", 12,
         lambda e, t: ["models", "--checkpoint", authors_file(e, t / "a.pth.tar", lambda d: d.update(
             {"module.features.conv0.weight": 3}))], 2, "'module.features.conv0.weight' is int 3, not a tensor"),
    Case("models-config-metadata-a-list", "one-line", 12,
         lambda e, t: ["models", "--checkpoint", tiny_variant(e, t / "m.safetensors", edit_meta=lambda m: m.update(
             config="[1,2]"))], 2, "its config metadata is not a JSON object"),
    Case("models-config-metadata-not-json", "one-line", 12,
         lambda e, t: ["models", "--checkpoint", tiny_variant(e, t / "m.safetensors", edit_meta=lambda m: m.update(
             config="{width: 8"))], 2, "its config metadata is not a JSON object"),
    Case("models-config-width-2-40", "one-line", 12,
         lambda e, t: ["models", "--checkpoint", tiny_variant(e, t / "m.safetensors",
                                                              edit_meta=with_config(width=2 ** 40))],
         2, "its config says width = 1099511627776, more than any dimension of its tensors"),
    Case("eval-68-channels-task-pose", "one-line", 12,
         lambda e, t: ["eval", "--model", tiny_variant(e, t / "m.safetensors", edit_meta=lambda m: m.update(
             task="pose")), "--data", e.faces], 2, "says task 'pose' (16 points), but the model has 68 heatmap"),
    Case("eval-mpii-joint-self-a-string", "one-line", 12,
         lambda e, t: ["eval", "--model", pose_model(t), "--data", mpii_with(t, joint_self="abc")],
         2, "mpii_annotations.json[0]: joint_self is str 'abc', expected 16 rows of [x, y, visible]"),
    Case("eval-mpii-scale-a-list", "one-line", 12,
         lambda e, t: ["eval", "--model", pose_model(t), "--data", mpii_with(t, scale_provided=[1, 2])],
         2, "mpii_annotations.json[0]: scale_provided is shape (2,), expected a number"),
    # item 13: messages that point the right way
    Case("models-checkpoint-a-folder", "one-line", 13,
         lambda e, t: ["models", "--checkpoint", run_folder(e, t)],
         2, "run: is a folder, not a checkpoint file; pass one of the checkpoint files in it (best.safetensors)"),
    Case("models-shapes-fit-no-config", "one-line", 13,
         lambda e, t: ["models", "--checkpoint", authors_file(e, t / "a.pth.tar", grown_last_layer)],
         2, "the tensor shapes fit no CU-Net configuration: 'hg.down_blocks.0.layers."),
    Case("build-eval-split-hint-names-its-flag", "one-line", 13,
         lambda e, t: build_args(e, t / "w", "--eval-split", "nosuch"), 2, "pass --eval-split all for every image"),
    Case("build-calib-split-hint-names-its-flag", "one-line", 13,
         lambda e, t: build_args(e, t / "w", "--precision", "int8", "--calib-split", "nosuch"), 2,
         "pass --calib-split all for every image"),
    Case("models-torch-asks-for-a-report", "one-line", 13,
         lambda e, t: ["models", "--checkpoint", without_version_record(e, t / "v.pth.tar")], 2,
         "v.pth.tar: cannot be read as a torch checkpoint", check=no_torch_advice),
    # item 12: --workdir is a folder
    Case("build-workdir-a-file", "one-line", 12, lambda e, t: build_args(e, touch(t / "f")), 2,
         "f: is a file, not a folder; choose a folder for --workdir"),
    Case("calibrate-workdir-a-file", "one-line", 12,
         lambda e, t: ["calibrate", "--model", e.model, "--data", e.faces, "--workdir", touch(t / "f")], 2,
         "f: is a file, not a folder; choose a folder for --workdir"),
    Case("profile-workdir-a-file", "one-line", 12, lambda e, t: ["profile", "--workdir", touch(t / "f")], 2,
         "f: is a file, not a folder; choose a folder for --workdir"),
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
    status, out, err = run_cli(argv, capsys, caplog)
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


# ----------------------------------------------------------------------------- data loss: the auto build (review note)


@pytest.mark.slow
def test_failed_auto_build_leaves_the_build_it_would_replace(env, tmp_path, capsys, monkeypatch):
    """`build --precision auto --force` whose plan fails the gate (one build allowed): the
    existing build is untouched, and no staging folder is left (each plan is assembled in
    staging, renamed once). (A back-off that passes:
    tests/test_quant_auto.py::test_auto_build_backs_off_when_the_prediction_is_too_optimistic.)"""
    import importlib

    build_module = importlib.import_module("cunet_optimize.pipeline.build")
    from cunet_optimize.pipeline import auto_build

    workdir = built_workdir(env, tmp_path)
    existing = workdir / "engines" / "tiny-auto-cpu"
    shutil.copytree(env.build, existing)
    before = tree(existing)
    monkeypatch.setattr(auto_build, "MAX_BUILDS", 1)
    real_gate = build_module._accuracy_gate
    monkeypatch.setattr(build_module, "_accuracy_gate", lambda *a, **k: {**real_gate(*a, **k), "passed": False})
    argv = ["build", "--model", env.model, "--precision", "auto", "--calib-data", str(env.faces), "--calib-split",
            "all", "--eval-data", str(env.faces), "--eval-split", "all", "--workdir", str(workdir), "--force"]
    assert main(argv) == 2
    assert "no plan met the gate after 1 build(s)" in error_line(capsys.readouterr().err, "build")
    assert tree(existing) == before
    assert sorted(p.name for p in (workdir / "engines").iterdir()) == ["tiny-auto-cpu", "tiny-fp32-cpu"]


@pytest.mark.slow
def test_build_killed_while_replacing_keeps_the_old_build(env, tmp_path):
    """kill -9 between renaming the old build aside and the new one in: the next build into
    the workdir puts the old one back (and then refuses to overwrite it without --force)."""
    import subprocess
    import sys
    import textwrap

    workdir = built_workdir(env, tmp_path)
    before = tree(workdir / "engines" / "tiny-fp32-cpu")
    killer = textwrap.dedent(f"""
        import os, signal
        import importlib
        build = importlib.import_module("cunet_optimize.pipeline.build")
        real = os.replace
        def replace(a, b):
            real(a, b)
            if ".partial-replaced-" in str(b):
                os.kill(os.getpid(), signal.SIGKILL)  # the old build is aside, the new one not in
        build.os.replace = replace
        from cunet_optimize.cli import main
        main({build_args(env, workdir, "--force")!r})
    """)
    env_vars = {**os.environ, "PYTHONPATH": str(REPO / "toolkit") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    killed = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, env=env_vars)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (workdir / "engines" / "tiny-fp32-cpu").exists()
    assert main(build_args(env, workdir)) == 2  # restored under the lock, then refused: it exists
    assert tree(workdir / "engines" / "tiny-fp32-cpu") == before
    assert [p.name for p in (workdir / "engines").iterdir()] == ["tiny-fp32-cpu"]
# ----------------------------------------------------------------------------- one line: both sides of the bounds


def test_batch_size_bound_is_the_largest_engine_profile():
    """--batch-sizes up to the largest optimisation profile of any target is taken, one more is not."""
    from cunet_optimize.commands.profile import MAX_BATCH_SIZE, parse_batch_sizes
    from cunet_optimize.targets import TARGETS
    from cunet_optimize.errors import CUNetError

    assert MAX_BATCH_SIZE == max(spec.batch[2] for spec in TARGETS.values()) == 64
    assert parse_batch_sizes(f"1,{MAX_BATCH_SIZE}") == [1, MAX_BATCH_SIZE]
    with pytest.raises(CUNetError, match=f"at most {MAX_BATCH_SIZE} images per batch"):
        parse_batch_sizes(f"1,{MAX_BATCH_SIZE + 1}")


def test_a_finite_box_is_used(env, tmp_path, capsys):
    """--box with finite corners (x2 > x1, y2 > y1) still predicts, from that crop."""
    assert main(["predict", str(env.images[0]), "--model", env.model, "--box", "10,10.5,200,220", "--no-draw",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["box"] == [10.0, 10.5, 200.0, 220.0]


# ----------------------------------------------------------------------------- one line (12): the cache variable
# CUNET_OPTIMIZE_CACHE needs the environment, so these rows run through test_trust with it set.


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_trust_cache_variable(where, env, tmp_path, capsys, caplog, monkeypatch):
    cache = touch(tmp_path / "cache", "not a folder")
    monkeypatch.setenv("CUNET_OPTIMIZE_CACHE", str(cache if where == "a-file" else cache / "sub"))
    case = Case(f"calibrate-cache-variable-{where}", "one-line", 12,
                lambda e, t: ["calibrate", "--model", e.model, "--workdir", t / "w"], 2,
                "CUNET_OPTIMIZE_CACHE=")
    test_trust(case, env, tmp_path, capsys, caplog, monkeypatch)


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


# ----------------------------------------------------------------------------- grammar (10): the Python API


def test_grammar_api_reads_a_precision_as_the_commands_do():
    """BuildOptions (the Python API's build) spells and checks --precision as the CLI does, and
    the engine precision comes from the parsed scheme, not the spelling."""
    from cunet_optimize.pipeline.build import BuildOptions
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
