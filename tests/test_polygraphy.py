"""Polygraphy (NVIDIA's inspection/run tool) accepts every graph the export stage writes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from conftest import tiny_config
from cunet_optimize.data.synth import verification_batch
from cunet_optimize.exporters import export_onnx
from cunet_optimize.models import CUNet
from cunet_optimize.quant import calibrate, quantize_model
from cunet_optimize.surgery import run_surgery

pytestmark = pytest.mark.slow
POLYGRAPHY = Path(sys.executable).with_name("polygraphy")


@pytest.mark.skipif(not POLYGRAPHY.exists() and not shutil.which("polygraphy"), reason="polygraphy CLI not installed")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int8-convin", "int4"])
def test_polygraphy_inspects_and_runs_exported_graphs(tmp_path, precision):
    torch.manual_seed(0)
    model = CUNet(tiny_config(num_classes=68)).eval()
    opset = 21 if precision == "int4" else 17
    if precision.startswith("int"):
        model = quantize_model(model, precision)
        calibrate(model, [torch.rand(2, 3, 256, 256)], "max", progress=False)
        model.eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, path, opset=opset, fp16=precision == "fp16")
    images = {"integer_dataflow": {"calibration": verification_batch(4)}}
    onnx.save(run_surgery(onnx.load(path), target="cpu", pass_options=images).model, path)
    exe = str(POLYGRAPHY if POLYGRAPHY.exists() else shutil.which("polygraphy"))
    inspect = subprocess.run([exe, "inspect", "model", str(path)], capture_output=True, text=True)
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    assert "image" in inspect.stdout and "heatmaps" in inspect.stdout
    run = subprocess.run([exe, "run", str(path), "--onnxrt", "--input-shapes", "image:[1,3,256,256]"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "PASSED" in run.stdout + run.stderr, (run.stdout + run.stderr)[-2000:]
