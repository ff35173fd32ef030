"""Activation equalization: float-exact, shrinks channel spread, lowers INT8 error; cached with the scales."""

from __future__ import annotations

import json

import pytest
import torch

from cunet_optimize.errors import CUNetError
from cunet_optimize.models import CUNet
from cunet_optimize.quant import parse_precision, post_training_quantize
from cunet_optimize.quant.equalize import (apply_equalization, equalize_activations, input_channel_ranges,
                                           norm_conv_pairs)

from conftest import tiny_config


def skewed_model(**config) -> CUNet:
    """A tiny CU-Net whose conv inputs have channels 30x apart in range: every other BN channel
    is scaled up and the conv weight column that reads it down by the same factor (float-exact)."""
    torch.manual_seed(0)
    model = CUNet(tiny_config(**config)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.2, 0.2)
        for norm, conv in norm_conv_pairs(model).values():
            s = torch.ones(conv.in_channels)
            s[::2] = 30.0
            norm.weight.mul_(s)
            norm.bias.mul_(s)
            conv.weight.div_(s.view(1, -1, 1, 1))
    return model


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.rand(2, 3, 64, 64, generator=g) for _ in range(n)]


def test_equalization_is_exact_in_float_and_leaves_the_input_model_alone():
    model = skewed_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    equalized, factors, report = equalize_activations(model, batches(), alpha=0.5)
    x = batches(1)[0]
    with torch.no_grad():
        for a, b in zip(model(x), equalized(x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert set(factors) == set(norm_conv_pairs(model))  # every conv but the stem
    assert report.spread_after < report.spread_before / 3


def test_alpha_one_equalizes_activation_ranges_completely():
    model = skewed_model()
    equalized, _, _ = equalize_activations(model, batches(), alpha=1.0)
    for name, r in input_channel_ranges(equalized, batches()).items():
        live = r[r > 1e-6]
        # s = r (up to a common factor) flattens every live channel to the same range
        assert float(live.max() / live.min()) == pytest.approx(1.0, abs=1e-3), name


def test_equalization_lowers_int8_error_on_skewed_channels():
    model = skewed_model()
    x = batches(1)[0]
    with torch.no_grad():
        ref = model(x)[-1]
    errors = {}
    for alpha in (None, 0.5):
        q, _, _ = post_training_quantize(model, parse_precision("int8-convin"), batches(), "max", alpha,
                                         progress=False)
        with torch.no_grad():
            errors[alpha] = float((q.eval()(x)[-1] - ref).pow(2).mean())
    assert errors[0.5] < 0.5 * errors[None]


def test_factors_for_another_model_are_refused():
    model = skewed_model()
    with pytest.raises(CUNetError, match="unknown conv"):
        apply_equalization(model, {"nope.conv": torch.ones(3)})
    name, (_, conv) = next(iter(norm_conv_pairs(model).items()))
    with pytest.raises(CUNetError, match="positive numbers"):
        apply_equalization(model, {name: -torch.ones(conv.in_channels)})
    with pytest.raises(CUNetError, match="alpha"):
        equalize_activations(model, batches(1), alpha=1.5)


@pytest.mark.slow
def test_calibration_cache_is_reused_with_its_equalization(tmp_path, capsys):
    from cunet_optimize.cli import main
    from cunet_optimize.data.synth import write_synthetic_faces
    from cunet_optimize.models import save_checkpoint

    faces = tmp_path / "faces"
    write_synthetic_faces(faces, 6, seed=3, test_fraction=0.5, progress=False)
    ckpt = tmp_path / "skewed.safetensors"
    save_checkpoint(skewed_model(), ckpt)
    common = ["calibrate", "--model", str(ckpt), "--data", str(faces), "--images", "3",
              "--workdir", str(tmp_path), "--json"]

    def run(*extra):
        assert main([*common, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    first, again, plain = run(), run(), run("--no-equalize")
    assert not first["cached"] and again["cached"] and not plain["cached"]
    assert again["id"] == first["id"] != plain["id"]
    assert first["equalization"]["alpha"] == 0.5 and plain["equalization"] is None
    assert again["equalization"] == first["equalization"]
    scales = [json.loads(open(r["scales_file"]).read())["scales"] for r in (first, again, plain)]
    assert scales[0] == scales[1] != scales[2]
    assert (tmp_path / "calib" / first["id"] / "equalization.safetensors").is_file()
    assert not (tmp_path / "calib" / plain["id"] / "equalization.safetensors").exists()


def test_int4_convs_of_a_plan_keep_their_unequalized_weights_and_scales(faces):
    """An auto plan over an equalized INT8 model: its INT4 convs take the weights, BatchNorm and input
    scale of the calibration without equalization (quant/auto.py unequalized_convs), its INT8 convs
    keep the equalized ones; the search's FormatSwitch measures exactly the model the build makes."""
    from cunet_optimize.quant import auto
    from cunet_optimize.quant.calibrate import activation_scales
    from cunet_optimize.quant.qmodel import float_state_dict
    from cunet_optimize.tasks import FACE, open_dataset

    model = skewed_model(num_classes=68)
    heldout = auto.HeldOut.load(open_dataset(FACE, faces, None), range(6))
    calib = [heldout.images[:4].contiguous()]
    scheme = parse_precision("int8-convin")
    equalized, _, _ = post_training_quantize(model, scheme, calib, "max", 0.5, progress=False)
    plain, _, _ = post_training_quantize(model, scheme, calib, "max", None, progress=False)
    layers = auto.layer_infos(equalized.eval(), "conv", tuple(heldout.images.shape[-2:]))
    inner = [layer.name for layer in layers if layer.role not in auto.EDGE_ROLES]
    plan = {n: "int4" for n in inner[::2]}
    norms = auto.unequalized_convs(equalized, plan)
    assert sorted(norms) == sorted(plan)
    mixed = auto.with_layer_formats(equalized, plan, None, plain.eval())
    state, original, eq_state = float_state_dict(mixed), model.state_dict(), float_state_dict(equalized)
    scales, plain_scales, eq_scales = activation_scales(mixed), activation_scales(plain), activation_scales(equalized)
    for conv, norm in norms.items():
        for key in (f"{conv}.weight", f"{norm}.weight", f"{norm}.bias"):
            assert torch.equal(state[key], original[key])
        assert scales[f"{conv}.input"] == plain_scales[f"{conv}.input"] != eq_scales[f"{conv}.input"]
    int8_conv = inner[1]
    assert torch.equal(state[f"{int8_conv}.weight"], eq_state[f"{int8_conv}.weight"])
    assert not torch.equal(state[f"{int8_conv}.weight"], original[f"{int8_conv}.weight"])
    switch = auto.FormatSwitch(equalized, heldout, layers, int4_block=None, plain=plain)
    int8 = switch.record_int8()
    assert switch.metric(plan) == heldout.metric(mixed)
    assert switch.metric({}) == int8 == heldout.metric(equalized)  # weights and BatchNorms put back
    without = auto.FormatSwitch(equalized, heldout, layers, int4_block=None)
    assert without.metric(plan) == heldout.metric(auto.with_layer_formats(equalized, plan, None))
    assert without.metric(plan) != switch.metric(plan)
