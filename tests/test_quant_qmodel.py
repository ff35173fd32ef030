"""The quantized CU-Net: placement, names, concat scale tying, accuracy, ONNX, QAT, state."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from cunet_optimize.errors import CUNetError
from cunet_optimize.models import CUNet, CUNetConfig
from cunet_optimize.quant import (
    BinaryWeightQuantizer,
    BlockQuantizer,
    ConcatPlan,
    DataflowTrace,
    FixedPointInputQuantizer,
    GradientQuantizer,
    IntQuantizer,
    QuantConv2d,
    QuantCUNet,
    QuantizerError,
    activation_quantizers,
    activation_scales,
    calibrate,
    float_state_dict,
    freeze_bn,
    load_quant_state,
    named_quantizers,
    plan_concat_tying,
    quant_state_dict,
    quantize_model,
    requantization_points,
    set_quantizers_enabled,
    tied_groups,
)

CONFIG = dict(num_unets=2, order=1, num_classes=4, width=8, growth_rate=4)


def tiny_model(memory_efficient: bool = False, **overrides) -> CUNet:
    """A small, well-conditioned random CU-Net.

    With the authors' init (BN gamma ~ U(0, 1)) a deep random CU-Net is chaotic: input
    noise of 1/254 changes its output by about 10%, which would drown any quantization
    check. BN gamma = 1 and a conv gain of sqrt(3) keep it smooth (about 0.3%).
    """
    torch.manual_seed(0)
    m = CUNet(CUNetConfig(**{**CONFIG, **overrides}), memory_efficient=memory_efficient)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.fill_(1.0)
            elif isinstance(mod, torch.nn.Conv2d):
                mod.weight.mul_(math.sqrt(3))
    return m.eval()


def images(n: int = 2, seed: int = 1, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, 64, 64, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def model() -> CUNet:
    return tiny_model()


@pytest.fixture(scope="module")
def int8(model) -> QuantCUNet:
    q = quantize_model(model, "int8")
    calibrate(q, images(), "max", progress=False)
    return q.eval()


@pytest.fixture(scope="module")
def int8_untied(model) -> QuantCUNet:
    q = quantize_model(model, "int8-untied")
    calibrate(q, images(), "max", progress=False)
    return q.eval()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


# -- Copy and placement ---------------------------------------------------------------


def test_quantize_model_returns_a_copy_and_leaves_the_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_model(model, "int8-lsq")
    calibrate(q, images(1), "max", progress=False)
    q.train()
    sum(h.square().mean() for h in q(images(1)[0])).backward()
    torch.optim.SGD(q.parameters(), lr=0.1).step()
    assert type(model) is CUNet and isinstance(q, QuantCUNet)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(q.features.conv0.weight, model.features.conv0.weight)


def test_fp32_scheme_and_disabled_quantizers_reproduce_the_float_model(model, int8):
    x = images(1, seed=3)[0]
    with torch.no_grad():
        ref = model(x)
        same = quantize_model(model, "fp32").eval()(x)
        set_quantizers_enabled(int8, False)
        try:
            off = int8(x)
        finally:
            set_quantizers_enabled(int8, True)
    assert all(torch.equal(a, b) for a, b in zip(ref, same))
    assert all(torch.equal(a, b) for a, b in zip(ref, off))


def test_int8_quantizes_input_and_weight_of_every_conv_that_runs():
    q = quantize_model(tiny_model(num_heads=1), "int8")
    convs = {n: m for n, m in q.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert type(convs["linears.0.conv"]) is torch.nn.Conv2d  # head of no loss: never runs
    used = {n: m for n, m in convs.items() if n != "linears.0.conv"}
    for name, conv in used.items():
        assert isinstance(conv, QuantConv2d), name
        assert isinstance(conv.input_quantizer, IntQuantizer) and not conv.input_quantizer.is_weight
        assert isinstance(conv.weight_quantizer, IntQuantizer) and conv.weight_quantizer.is_weight
        assert conv.weight_quantizer.num_bits == 8 and conv.weight_quantizer.scale.shape == (conv.out_channels,)
        assert (conv.input_quantizer.name, conv.weight_quantizer.name) == (f"{name}.input", f"{name}.weight")
    # BN is not folded: every BatchNorm is still there
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in q.modules()) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in tiny_model(num_heads=1).modules()
    )


def test_quantizer_names_are_stable_module_paths(int8):
    names = {n for n, _ in named_quantizers(int8)}
    for expected in (
        "features.conv0.input",
        "features.pool0.input",
        "hg.down_blocks.0.layers.1.conv1.input",
        "hg.down_blocks.0.layers.1.conv2.weight",
        "hg.down_blocks.0.layers.1.concat.input.0",
        "hg.down_blocks.0.layers.1.concat.output",
        "hg.down_blocks.0.adapters_ahead.1.output",
        "intermedia.adapters.0.concat.input.1",
        "linears.1.conv.input",
    ):
        assert expected in names
    assert len(names) == len(list(named_quantizers(int8)))  # unique


def test_conv_input_quantizer_sees_the_relu_output(int8):
    seen = []
    q = int8.hg.down_blocks[1].layers[1].conv1.input_quantizer
    handle = q.register_forward_pre_hook(lambda m, args: seen.append(float(args[0].min())))
    try:
        with torch.no_grad():
            int8(images(1)[0])
    finally:
        handle.remove()
    assert seen and min(seen) >= 0.0


def test_int4_keeps_stem_and_last_head_at_int8_and_blocks_the_rest(model):
    q = quantize_model(model, "int4")
    stem = q.features.conv0.weight_quantizer
    assert isinstance(stem, IntQuantizer) and stem.num_bits == 8
    assert isinstance(q.linears[1].conv.weight_quantizer, IntQuantizer)
    assert isinstance(q.linears[0].conv.weight_quantizer, BlockQuantizer)
    blocked = q.hg.up_blocks[0].adapters_ahead[1].adapter_conv
    assert isinstance(blocked.weight_quantizer, BlockQuantizer)
    assert blocked.weight_quantizer.scale.shape == (8, math.ceil(blocked.in_channels / 32), 1, 1)
    assert isinstance(blocked.input_quantizer, IntQuantizer)


def test_paper_modes_quantize_3x3_and_head_inputs_and_spare_stem_and_last_head(model):
    q = quantize_model(model, "w1a8g8")
    assert q.features.conv0.weight_quantizer is None and q.features.conv0.input_quantizer is None
    last = q.linears[1].conv
    assert last.weight_quantizer is None and last.input_quantizer is None
    assert isinstance(q.linears[0].conv.input_quantizer, FixedPointInputQuantizer)
    layer = q.hg.down_blocks[2].layers[1]
    assert isinstance(layer.conv2.input_quantizer, FixedPointInputQuantizer)
    assert layer.conv1.input_quantizer is None
    assert q.hg.down_blocks[2].adapters_ahead[1].adapter_conv.input_quantizer is None
    assert isinstance(layer.conv1.weight_quantizer, BinaryWeightQuantizer)
    assert isinstance(layer.conv1.gradient_quantizer, GradientQuantizer)
    assert not list(activation_quantizers(q))  # nothing to calibrate: fixed ranges
    with torch.no_grad():
        assert torch.isfinite(q.eval()(images(1)[0])[-1]).all()


# -- Concat scale tying ---------------------------------------------------------------


def test_tying_plan_on_a_hand_made_dataflow():
    trace = DataflowTrace(
        concat_calls=[("A", [1, 2]), ("B", [2, 3]), ("C", [4, 5]), ("D", [8])],
        passthroughs=[(6, 4)],  # MaxPool: 6 -> 4
        slots=[("s.output", 6), ("u.output", 7)],
    )
    plan = plan_concat_tying(trace, tie=True)
    assert plan.sites == {"A": 2, "B": 2, "C": 2}  # D is no concatenation
    assert plan.groups == [["A", "B"], ["C", "s.output"]]
    assert plan.slots == ["s.output"]
    assert plan_concat_tying(trace, tie=False) == ConcatPlan(sites=plan.sites, groups=[], slots=[])


def test_tied_quantizers_follow_shared_tensors_and_pass_throughs(int8):
    quantizers = activation_quantizers(int8)
    group_of = {n: i for i, g in enumerate(tied_groups(int8)) for n in g}
    same = [
        # U-Net 1's dense layer and adapters at down position 0 share x and the FIFO;
        # the U-Net input is also in the between-U-Net adapter's concat and comes
        # from the stem's pool.
        ("hg.down_blocks.0.layers.1.concat.input.0", "hg.down_blocks.0.adapters_ahead.1.concat.output"),
        ("hg.down_blocks.0.layers.1.concat.input.1", "hg.down_blocks.0.adapters_skip.0.concat.input.1"),
        ("intermedia.adapters.0.concat.input.1", "features.pool0.input"),
        # a MaxPool input joins the next position's concatenations
        ("hg.down_blocks.0.adapters_ahead.0.output", "hg.down_blocks.1.layers.1.concat.input.0"),
        ("hg.neck_block.adapters_ahead.1.output", "hg.up_blocks.3.layers.1.concat.input.0"),
    ]
    for a, b in same:
        assert group_of[a] == group_of[b], (a, b)
        assert quantizers[a].scale is quantizers[b].scale
    assert group_of["hg.down_blocks.0.layers.1.concat.input.0"] != group_of["hg.down_blocks.1.layers.1.concat.input.0"]
    assert "hg.down_blocks.0.layers.1.conv1.input" not in group_of  # conv inputs keep their own scale


def test_requantization_points_tied_zero_untied_positive(int8, int8_untied):
    assert requantization_points(int8) == 0
    untied = requantization_points(int8_untied)
    assert untied > 0
    assert requantization_points(int8_untied, activation_scales(int8_untied)) == untied
    scales = activation_scales(int8)
    scales["hg.down_blocks.0.layers.1.concat.input.0"] *= 2
    assert requantization_points(int8, scales) == 1
    total_inputs = sum(len(cq.inputs) for cq in int8_untied.modules() if hasattr(cq, "inputs"))
    assert untied <= total_inputs


# -- Accuracy and ONNX ----------------------------------------------------------------


def test_int8_outputs_are_close_to_float(model, int8, int8_untied):
    x, other = images(2, seed=7)
    with torch.no_grad():
        ref, ref_other = model(x)[-1], model(other)[-1]
        spread = rel_error(ref, ref_other)  # how much the output depends on the input
        for q in (int8, int8_untied):
            err = rel_error(ref, q(x)[-1])
            assert err < 0.05 and err < 0.25 * spread


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    """A constant's value, through the Identity nodes the exporter puts on duplicate initializers."""
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.output and node.output[0] == name:
            if node.op_type == "Constant":
                return numpy_helper.to_array(node.attribute[0].t)
            if node.op_type == "Identity":
                return _array(model, node.input[0])
    raise KeyError(name)


def test_int8_exports_to_qdq_onnx_that_onnxruntime_runs_identically(int8):
    x = images(1, seed=9, batch=1)[0]
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(int8, (x,), f, dynamo=False, opset_version=17, input_names=["image"])
    graph = onnx.load_from_string(f.getvalue()).graph
    model = onnx.load_from_string(f.getvalue())
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Concat", "BatchNormalization"} <= ops
    assert not ops & {"QLinearConv", "DynamicQuantizeLinear", "ConvInteger"}
    producer = {o: n for n in graph.node for o in n.output}
    per_channel = 0
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = _array(model, node.input[2])
            assert zero.dtype == np.int8 and not zero.any()
            scale = _array(model, node.input[1])
            if scale.size > 1:
                assert {a.name: a.i for a in node.attribute}["axis"] == 0
                per_channel += 1
    assert per_channel == 2 * sum(isinstance(m, QuantConv2d) for m in int8.modules())
    # Tied: every Concat's inputs are dequantized with one scale (TensorRT can elide it)
    for node in graph.node:
        if node.op_type == "Concat" and all(producer.get(i) is not None for i in node.input):
            dqs = [producer[i] for i in node.input]
            if all(d.op_type == "DequantizeLinear" for d in dqs):
                assert len({float(_array(model, d.input[1])) for d in dqs}) == 1
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(f.getvalue(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[-1]
    with torch.no_grad():
        want = int8(x)[-1].numpy()
    assert np.allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


# -- Training -------------------------------------------------------------------------


def test_uncalibrated_int8_model_refuses_to_run_with_a_clear_error(model):
    q = quantize_model(model, "int8")
    with pytest.raises(QuantizerError, match="calibrate") as err:
        q(images(1)[0])
    assert isinstance(err.value, CUNetError)


def test_qat_step_trains_weights_and_learnable_scales(model):
    q = quantize_model(model, "int8-lsq")
    calibrate(q, images(1), "max", progress=False)
    q.train()
    loss = sum(h.square().mean() for h in q(images(1, seed=4)[0]))
    loss.backward()
    conv = q.hg.down_blocks[1].layers[1].conv1
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert conv.input_quantizer.scale.grad is not None and conv.input_quantizer.scale.grad != 0
    assert conv.weight_quantizer.scale.grad is not None


def test_paper_gradients_are_quantized_to_k_bits(model):
    q = quantize_model(model, "w2a8g4").train()
    loss = sum(h.square().mean() for h in q(images(1)[0]))
    loss.backward()
    grad = q.hg.down_blocks[0].layers[1].conv1.weight.grad
    # S = 2^(4-1): multiples of peak/8, the largest clipped to 7/8 of the peak
    levels = grad / grad.abs().max() * 7
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert len(levels.round().unique()) > 3


def test_memory_efficient_training_gives_the_same_gradients():
    grads = []
    for efficient in (False, True):
        q = quantize_model(tiny_model(memory_efficient=efficient), "int8")
        calibrate(q, images(1), "max", progress=False)
        q.train()
        sum(h.square().mean() for h in q(images(1, seed=4)[0])).backward()
        grads.append({n: p.grad for n, p in q.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-7) for k in grads[0])


def test_freeze_bn_keeps_running_statistics_through_train_calls(model):
    q = quantize_model(model, "int8")
    calibrate(q, images(1), "max", progress=False)
    freeze_bn(q)
    q.train()
    bn = q.hg.down_blocks[0].layers[1].norm1
    before = bn.running_mean.clone()
    q(images(1, seed=6)[0])
    assert not bn.training and torch.equal(bn.running_mean, before)
    freeze_bn(q, frozen=False)
    q.train()
    q(images(1, seed=6)[0])
    assert bn.training and not torch.equal(bn.running_mean, before)


def test_quant_state_round_trip_restores_weights_and_every_scale(model, tmp_path):
    q = quantize_model(model, "int8-lsq")
    calibrate(q, images(1), "max", progress=False)
    q.train()
    sum(h.square().mean() for h in q(images(1)[0])).backward()
    torch.optim.SGD(q.parameters(), lr=1e-6).step()
    state = quant_state_dict(q)
    assert "hg.down_blocks.0.layers.1.concat_quantizer.output.scale" in state
    from safetensors.torch import load_file, save_file

    save_file(state, str(tmp_path / "qat.safetensors"))  # no shared storage
    restored = quantize_model(model, q.scheme.spec)
    load_quant_state(restored, load_file(str(tmp_path / "qat.safetensors")))
    x = images(1, seed=8)[0]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(q.eval()(x), restored.eval()(x)))
    plain = CUNet(model.config)
    plain.load_state_dict(float_state_dict(q), strict=True)


def test_load_quant_state_names_the_problem(int8, model):
    state = quant_state_dict(int8)
    target = quantize_model(model, "int8")
    missing = dict(state)
    del missing["features.conv0.input_quantizer.scale"]
    with pytest.raises(QuantizerError, match="features.conv0.input_quantizer.scale"):
        load_quant_state(target, missing)
    keys_of: dict[int, list[str]] = {}
    for key, p in int8.named_parameters(remove_duplicate=False):
        keys_of.setdefault(id(p), []).append(key)
    shared = next(keys for keys in keys_of.values() if len(keys) > 1)  # a tied scale
    broken = dict(state)
    broken[shared[1]] = broken[shared[1]] * 2
    with pytest.raises(QuantizerError, match="tied scales"):
        load_quant_state(target, broken)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CPU siblings: the tests above")
def test_quantized_model_calibrates_and_trains_on_the_gpu():
    model = tiny_model().cuda()
    q = quantize_model(model, "int8-lsq")
    assert all(p.is_cuda for p in q.parameters())
    calibrate(q, images(1), "entropy", progress=False)
    q.train()
    sum(h.square().mean() for h in q(images(1, seed=4)[0].cuda())).backward()
    assert q.features.conv0.input_quantizer.scale.grad is not None
    with torch.no_grad():
        ref, got = model(images(1)[0].cuda())[-1], q.eval()(images(1)[0].cuda())[-1]
    assert rel_error(ref, got) < 0.05


def test_convin_places_qdq_on_conv_inputs_only():
    """int8-convin: no quantizer on any dense concatenation, every conv input quantized."""
    from cunet_optimize.models import CUNet, CUNetConfig
    from cunet_optimize.quant import concat_quantizers, named_quantizers, parse_precision, quantize_model

    model = CUNet(CUNetConfig(num_unets=2, order=1, num_classes=4, width=8, growth_rate=4))
    scheme = parse_precision("int8-convin")
    assert scheme.spec == "int8-convin" and parse_precision(scheme.spec) == scheme
    q = quantize_model(model, scheme)
    assert concat_quantizers(q) == []
    names = [n for n, _ in named_quantizers(q)]
    assert not any(".concat." in n or n.endswith(".output") for n in names)
    assert any(n.endswith("conv1.input") for n in names) and any(n.endswith("conv2.input") for n in names)
    tied = quantize_model(model, parse_precision("int8"))
    assert len(concat_quantizers(tied)) > 0


def test_qat_recipe_is_a_short_low_lr_cosine_schedule_with_bn_frozen_after_warmup():
    from cunet_optimize.quant import parse_precision
    from cunet_optimize.quant.qat import qat_recipe
    from cunet_optimize.train.loop import TrainRecipe

    original = TrainRecipe(epochs=10, lr=1e-3)
    short = qat_recipe(original)
    assert (short.epochs, short.lr, short.lr_schedule) == (1, 1e-5, "cosine")
    assert short.freeze_bn_after == 0  # one epoch: no room for a warm-up, frozen from the start
    assert qat_recipe(TrainRecipe(epochs=100, lr=1e-3)).freeze_bn_after == 2  # a quarter of 10 epochs
    assert qat_recipe(original, parse_precision("int8")) == short
    int4 = qat_recipe(original, parse_precision("int4"))  # 4-bit weights: 30% of the epochs at 10% of the lr
    assert (int4.epochs, int4.lr, int4.freeze_bn_after) == (3, 1e-4, 0)
    assert qat_recipe(original, parse_precision("int4"), epochs=1, lr=1e-5).epochs == 1  # explicit values win
    binary = qat_recipe(original, parse_precision("w1a8"))  # most of a schedule at the original lr
    assert (binary.epochs, binary.lr, binary.freeze_bn_after) == (6, 1e-3, 1)
