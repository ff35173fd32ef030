"""`build --dla-core N` and the one rule for INT8 Q/DQ placement on the dense concatenations
(precision modifiers -tied/-untied/-convin and --concat-qdq spell the same choice)."""

from __future__ import annotations

import json
import shlex

import onnx
import pytest
import torch

from cunet_optimize.quant.policy import concat_placement, quant_scheme
from cunet_optimize.cli import main
from cunet_optimize.errors import CUNetError

# --------------------------------------------------------------------------------------
# Placement: one rule, contradictions are errors


@pytest.mark.parametrize("precision, concat_qdq, placement, spec", [
    ("int8", None, "none", "int8-convin"),  # the default: conv inputs only
    ("int8", "tied", "tied", "int8"),
    ("int8", "untied", "untied", "int8-untied"),
    ("int8-untied", None, "untied", "int8-untied"),  # was silently conv inputs only
    ("int8-tied", None, "tied", "int8"),
    ("int8-convin", None, "none", "int8-convin"),
    ("int8-untied", "untied", "untied", "int8-untied"),  # both, agreeing
    ("int8-lsq-tied", "tied", "tied", "int8-lsq"),
    # INT4 on ONNX Runtime (quant_scheme's default backend) is per output channel (int4_block_for)
    ("int4-untied", None, "untied", "int4-pc-untied"),
    ("int4", None, "none", "int4-pc-convin"),
    ("int4-b32", None, "none", "int4-convin"),  # blocks where the spec names them
])
def test_placement_from_the_modifier_or_the_flag(precision, concat_qdq, placement, spec):
    assert concat_placement(precision, concat_qdq) == placement
    assert quant_scheme(precision, concat_qdq).spec == spec


@pytest.mark.parametrize("precision, concat_qdq, message", [
    ("int8-untied", "none", "--precision int8-untied puts INT8 Q/DQ on the concatenations, untied but "
                            "--concat-qdq none asks for on conv inputs only; give only one of them"),
    ("int8-convin", "tied", "--concat-qdq tied asks for on the concatenations, tied"),
    ("int8-tied", "untied", "give only one of them"),
    ("int8-tied-untied", None, "names two concat placements"),
])
def test_contradictory_placements_are_refused(precision, concat_qdq, message):
    with pytest.raises(CUNetError, match=message):
        quant_scheme(precision, concat_qdq)


def test_placement_on_a_scheme_without_int8_activations_is_refused():
    assert quant_scheme("int4-wo").activation == "float"
    assert quant_scheme("int4", None, "tensorrt").spec == "int4-wo"  # weight-only there, as before
    assert quant_scheme("int4", "none", "tensorrt").spec == "int4-wo"
    with pytest.raises(CUNetError, match=r"no INT8 activations \(INT4 on TensorRT is weight-only\)"):
        quant_scheme("int4", "tied", "tensorrt")
    with pytest.raises(CUNetError, match="no INT8 activations"):
        quant_scheme("int4-wo-untied")


@pytest.mark.parametrize("argv, message", [
    (["build", "--precision", "fp32", "--concat-qdq", "tied"], "precision fp32 has no INT8 activations"),
    (["build", "--precision", "int4", "--target", "h100", "--concat-qdq", "untied"], "INT4 on TensorRT is weight-only"),
    (["calibrate", "--precision", "int8-untied", "--concat-qdq", "none"], "give only one of them"),
    (["calibrate", "--precision", "int8-convin", "--concat-qdq", "tied"], "give only one of them"),
])
def test_cli_refuses_contradictions_in_one_line_before_any_work(tmp_path, capsys, argv, message):
    assert main([*argv, "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and err.startswith(f"cunet-optimize {argv[0]}: error:")
    assert not (tmp_path / "engines").exists() and not (tmp_path / "calib").exists()


# --------------------------------------------------------------------------------------
# --dla-core: flag by flag


@pytest.mark.parametrize("argv, message", [
    (["--target", "t4", "--dla-core", "0"], "target t4 has no DLA cores; drop --dla-core"),
    (["--target", "jetson-orin-nano", "--dla-core", "0"], "target jetson-orin-nano has no DLA cores"),
    (["--target", "cpu", "--dla-core", "0"], "target cpu has no DLA cores"),
    (["--target", "jetson-agx-orin", "--dla-core", "2"], "DLA core 2 does not exist on jetson-agx-orin; it has cores 0..1"),
    (["--target", "jetson-orin-nx", "--dla-core", "-1"], "DLA core -1 does not exist on jetson-orin-nx"),
    (["--target", "jetson-agx-orin", "--dla-core", "0", "--precision", "fp32"],
     "target jetson-agx-orin DLA cannot run precision fp32; it runs: fp16, int8"),
])
def test_build_cli_dla_core_errors(tmp_path, capsys, argv, message):
    assert main(["build", *argv, "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (tmp_path / "engines").exists()


def test_surgery_and_lint_cli_take_the_dla_core(tmp_path, capsys):
    from conftest import tiny_config
    from cunet_optimize.exporters import export_onnx
    from cunet_optimize.models import CUNet

    torch.manual_seed(0)
    model = tmp_path / "tiny.onnx"
    export_onnx(CUNet(tiny_config()), model)  # dynamic batch: fine on the GPU, an error on the DLA
    assert main(["lint", str(model), "--target", "jetson-orin-nx"]) == 0
    assert main(["lint", str(model), "--target", "jetson-orin-nx", "--dla-core", "1"]) == 1
    assert "dla-dynamic-shape" in capsys.readouterr().out
    assert main(["lint", str(model), "--target", "jetson-orin-nx-dla"]) == 2
    assert "--target jetson-orin-nx --dla-core N" in capsys.readouterr().err
    assert main(["surgery", str(model), "--target", "jetson-orin-nano", "--dla-core", "0", "--no-verify",
                 "--workdir", str(tmp_path)]) == 2
    assert "has no DLA cores" in capsys.readouterr().err


def _dla_build(tiny, faces, workdir, capsys, *extra):
    # (--trt-major 11 builds the strongly typed FP16-cast Q/DQ form at opset 19; this tiny
    # untrained model's near-zero activation scales do not survive float16, which export
    # refuses in one line (tests/test_verify.py): only TensorRT 10 runs end to end on it)
    argv = ["build", "--model", str(tiny), "--target", "jetson-agx-orin", "--dla-core", "0", "--precision", "int8",
            "--calib-data", str(faces), "--calib-images", "4", "--eval-data", str(faces), "--workdir", str(workdir),
            "--no-accuracy-gate", "--json", *extra]
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_build_int8_for_agx_orin_dla_core_0_writes_a_dla_bundle(tiny, faces, tmp_path, capsys):
    manifest = _dla_build(tiny, faces, tmp_path, capsys)
    out = tmp_path / "engines" / "tiny-int8-jetson-agx-orin-dla0"
    assert manifest["dla_core"] == 0 and manifest["engine_built"] is False
    plan = json.loads((out / "trt_plan.json").read_text())
    assert plan["dla_core"] == 0 and plan["gpu_fallback"] is True and plan["batch"] == [1, 1, 1]
    assert plan["trt_major"] == 10 and plan["min_trt_version"] == "10.3" and plan["max_trt_version"] == "10.7"
    assert plan["builder_flags"] == ["INT8", "FP16", "GPU_FALLBACK"]
    recipe = (out / "build_engine.sh").read_text()
    argv = next(shlex.split(line) for line in recipe.splitlines() if line.startswith('"$TRTEXEC"'))
    for flag in ("--useDLACore=0", "--allowGPUFallback", "--int8", "--fp16", "--minShapes=image:1x3x256x256",
                 "--maxShapes=image:1x3x256x256"):
        assert flag in argv, flag
    assert 'if [ "$code" -lt 100300 ]' in recipe  # TensorRT >= 10.3 ...
    assert 'if [ "$code" -ge 100800 ]' in recipe  # ... and <= 10.7: the last 10.x with DLA
    # static batch 1 in the ONNX, the DLA passes and the DLA lint rules
    shape = onnx.load(out / "model.onnx").graph.input[0].type.tensor_type.shape.dim
    assert shape[0].dim_value == 1
    assert "tie_concat_qdq_scales" in manifest["surgery"]["passes"]
    assert not [f for f in manifest["lint"] if f["severity"] == "error"]
    assert manifest["accuracy"]["quantized"]["count"] == 4  # evaluated at the model's static batch
