"""The Python API (cunet_optimize.api): the commands' code paths on a user's objects. The same build
through the CLI and through build() gives the same build.json; a DataLoader calibrates as the
folder it reads; quantize -> save_quantized is what `build --qat` reads; bad inputs are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import cunet_optimize as co
from cunet_optimize.cli import main
from cunet_optimize.data.face300w import Face300W
from cunet_optimize.errors import CUNetError
from cunet_optimize.quant import activation_scales

REPO = Path(__file__).resolve().parent.parent


def _images(faces: Path, split: str = "train") -> torch.Tensor:
    data = Face300W(faces, split=split)
    return torch.stack([data[i]["image"] for i in range(len(data))])


@pytest.fixture(scope="module")
def cli_and_api_builds(tiny, faces, tmp_path_factory):
    """The same int8 build through `cunet-optimize build` and through build(). For a TensorRT target:
    the CPU's int8 build times its integer forms on this machine and keeps the fastest, so two CPU
    builds (CLI or API alike) may deploy different forms with slightly different accuracy."""
    root = tmp_path_factory.mktemp("builds")
    common = ["--model", str(tiny), "--precision", "int8", "--target", "h100", "--calib-data", str(faces),
              "--calib-images", "4", "--eval-data", str(faces)]
    assert main(["build", *common, "--workdir", str(root / "cli")]) == 0
    report = co.build(str(tiny), precision="int8", target="h100", calib_data=str(faces), eval_data=str(faces),
                      workdir=root / "api", calib_images=4)
    return json.loads((root / "cli" / "engines" / "tiny-int8-h100" / "build.json").read_text()), report


@pytest.fixture(scope="module")
def cpu_build(tiny, faces, tmp_path_factory):
    """build() of a module: an FP32 engine for the CPU."""
    return co.build(co.load_model(tiny), precision="fp32", eval_data=str(faces),
                    workdir=tmp_path_factory.mktemp("cpu"))


def test_build_through_the_api_is_the_cli_build(cli_and_api_builds):
    cli, api = cli_and_api_builds
    assert Path(api.path).name == cli["name"] == "tiny-int8-h100"
    assert api.accuracy["quantized_value"] == cli["accuracy"]["quantized_value"]
    assert api.accuracy["reference_value"] == cli["accuracy"]["reference_value"]
    assert api.manifest["calibration"]["id"] == cli["calibration"]["id"]  # same model, data, scheme, method
    scales = [json.loads(Path(m["calibration"]["scales_file"]).read_text())["scales"] for m in (cli, api.manifest)]
    assert scales[0] == scales[1] and scales[0]
    assert api.manifest["artifact_sha256"]["model.onnx"] == cli["artifact_sha256"]["model.onnx"]
    # build.json records the command line that repeats the API's build
    assert api.manifest["command"].startswith("cunet-optimize build --precision int8 --target h100")
    assert "--calib-images 4" in api.manifest["command"]


def test_load_engine_runs_and_evaluates_the_build(cpu_build, faces):
    report = cpu_build
    assert Path(report.manifest["model"]["checkpoint"]).parent.name == "models"  # WORKDIR/calib/models/
    images = _images(faces, "test")
    with co.load_engine(report.path) as engine:
        out = engine.infer({"image": images})
        assert out["heatmaps"].shape == (len(images), 68, 64, 64) and out["landmarks"].shape == (len(images), 68, 2)
        np.testing.assert_array_equal(engine(images.numpy()), out["heatmaps"])
        metrics = co.evaluate(engine, faces, split="test")
    assert metrics["nme_percent"] == pytest.approx(report.accuracy["quantized_value"])  # the gate's number
    # an iterable of (images, landmarks in their pixels) is scored as the folder's crops are
    data = Face300W(faces, split="test")
    from cunet_optimize.data.transforms import apply_affine

    points = torch.stack([torch.as_tensor(apply_affine(data[i]["landmarks"].numpy(), data[i]["transform"].numpy()))
                          for i in range(len(data))])
    by_batches = co.evaluate(report.path, [(images[:2], points[:2]), (images[2:], points[2:])])
    assert by_batches["count"] == len(data)
    assert by_batches["nme_percent"] == pytest.approx(metrics["nme_percent"], rel=1e-4)  # NME ignores the crop


def test_load_engine_checks_the_files_first(cpu_build, cli_and_api_builds, tmp_path):
    import shutil

    report = cpu_build
    copy = tmp_path / "copy"
    shutil.copytree(report.path, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CUNetError, match="model.onnx does not match the sha256"):
        co.load_engine(copy)
    with pytest.raises(CUNetError, match="deployment bundle without an engine"):
        co.load_engine(cli_and_api_builds[1].path)


def test_a_dataloader_calibrates_as_the_folder_it_reads(tiny, faces):
    from_folder = co.quantize(str(tiny), "int8", str(faces), images=6)
    images = _images(faces)  # the folder's calibration images: its train list
    plain = DataLoader(TensorDataset(images), batch_size=4)  # (images,) tuples, batched otherwise than build's 16
    dicts = DataLoader(Face300W(faces, split="train"), batch_size=5)  # {"image": ...} samples
    for loader in (plain, dicts):
        qmodel = co.quantize(co.load_model(tiny), "int8", loader, images=6)
        assert activation_scales(qmodel) == activation_scales(from_folder)
    assert from_folder.scheme.spec == "int8-convin"  # build's int8: no Q/DQ on the dense concatenations


def test_quantize_save_then_cli_build_qat_is_build_with_a_loader(tiny, faces, tmp_path):
    loader = DataLoader(TensorDataset(_images(faces)), batch_size=3)
    qmodel = co.quantize(str(tiny), "int8", loader, images=4)
    path = co.save_quantized(qmodel, tmp_path / "q.safetensors")
    assert torch.equal(co.load_quantized(path).state_dict()["features.conv0.weight"],
                       qmodel.state_dict()["features.conv0.weight"])
    # a TensorRT bundle: the same --qat reading as the CPU's, without timing the CPU's int8 forms
    assert main(["build", "--qat", str(path), "--model", str(tiny), "--precision", "int8", "--target", "h100",
                 "--eval-data", str(faces), "--workdir", str(tmp_path / "cli")]) == 0
    built = json.loads((tmp_path / "cli" / "engines" / "tiny-int8-h100" / "build.json").read_text())
    assert built["calibration"] == {"method": "qat", "checkpoint": str(path)}
    # build(model, calib_data=loader) is build(quantize(model, precision, loader))
    report = co.build(str(tiny), precision="int8", target="h100", calib_data=loader, eval_data=str(faces),
                      workdir=tmp_path / "api", calib_images=4)
    assert report.accuracy["quantized_value"] == built["accuracy"]["quantized_value"]
    assert report.manifest["artifact_sha256"]["model.onnx"] == built["artifact_sha256"]["model.onnx"]


@pytest.mark.parametrize("call, message", [
    (lambda t, f: co.quantize(str(t), "int9", str(f)), "int9"),
    (lambda t, f: co.quantize(str(t), "fp32", str(f)), "nothing to quantize"),
    (lambda t, f: co.quantize(str(t), "int8", [torch.rand(2, 1, 8, 8)]), "expected images Bx3xHxW"),
    (lambda t, f: co.quantize(str(t), "int8", [torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)]),
     "divide 0..255 images by 255"),
    (lambda t, f: co.quantize(str(t), "int8", 42), "iterable of image batches"),
    (lambda t, f: co.quantize(str(t), "int8", str(f), method="median"), "not a calibration method"),
    (lambda t, f: co.quantize(str(t), "int8", str(f), images=0), "images must be an integer >= 1"),
    (lambda t, f: co.quantize(torch.nn.Linear(2, 2)), "not a CU-Net"),
    (lambda t, f: co.build(str(t), calib_imags=4), "unknown option 'calib_imags'; the options are"),
    (lambda t, f: co.build(str(t), calib_images=0), "expected an integer >= 1"),
    (lambda t, f: co.build(str(t), target="cpu9"), "cpu9"),
    (lambda t, f: co.build(str(t), no_accuracy_gate="yes"), "is a switch"),
    (lambda t, f: co.save_quantized(co.load_model(t), "x.safetensors"), "expects a quantized model"),
    (lambda t, f: co.load_quantized(t), "not a QAT checkpoint"),
    (lambda t, f: co.load_engine(f), "no build.json"),
    (lambda t, f: co.evaluate(str(t), 3.5), "pass a data folder or an iterable"),
    (lambda t, f: co.export(str(t), "m.onnx", precision="int8"), "quantize(model, 'int8') first"),
    (lambda t, f: co.profile([], workdir=f, runz=3), "unknown option 'runz'"),
])
def test_bad_inputs_are_one_line(tiny, faces, tmp_path, monkeypatch, call, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CUNetError) as error:
        call(tiny, faces)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_build_of_a_module_keeps_its_checkpoint_by_content_and_writes_nothing_when_refused(tiny, faces, tmp_path):
    module = co.load_model(tiny)
    (tmp_path / "engines" / "m").mkdir(parents=True)
    (tmp_path / "engines" / "m" / "build.json").write_text("{}")
    with pytest.raises(CUNetError, match="already exists"):
        co.build(module, precision="fp32", eval_data=str(faces), workdir=tmp_path, name="m")
    assert not (tmp_path / "calib").exists()  # checked before the module's checkpoint was kept


def test_the_api_is_lazy_and_its_names_are_the_functions():
    code = ("import sys, cunet_optimize as co; assert 'torch' not in sys.modules; "
            "import cunet_optimize.pipeline.build, cunet_optimize.profiling; "
            "assert callable(co.build) and co.build.__module__ == 'cunet_optimize.api', co.build; "
            "assert co.profile.__module__ == 'cunet_optimize.api'")
    env = {**os.environ, "PYTHONPATH": str(REPO / "toolkit")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.slow
def test_the_qat_example_runs(tmp_path, monkeypatch, capsys):
    """The example as a script (__main__), in this process: it needs no process of its own. Batches
    of 2 (the QAT steps and the calibration's batches; the same 8 calibration images)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["qat_own_loop.py", "--workdir", str(tmp_path), "--steps", "2", "--images", "8",
                                      "--batch-size", "2"])
    runpy.run_path(str(REPO / "examples" / "qat_own_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "gate 0.3: pass" in out and "test NME: engine" in out
    assert (tmp_path / "qat.safetensors").is_file()
    assert (tmp_path / "engines" / "qat-example-int8-cpu" / "build.json").is_file()
