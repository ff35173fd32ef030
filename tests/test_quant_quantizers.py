"""Fake quantizers on hand-made tensors, the precision spec, and their ONNX form."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from cunet_optimize.errors import CUNetError
from cunet_optimize.quant import (
    BinaryWeightQuantizer,
    BlockQuantizer,
    FixedPointInputQuantizer,
    FixedPointWeightQuantizer,
    GradientQuantizer,
    IntQuantizer,
    QuantizerError,
    QuantScheme,
    QuantSpecError,
    TernaryWeightQuantizer,
    parse_precision,
    quantize_gradient,
)


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# -- INT8, TensorRT form --------------------------------------------------------------


def test_int8_activation_rounds_half_to_even_and_saturates_at_minus128_127():
    q = IntQuantizer(8)
    q.set_amax(63.5)  # scale 0.5, exact in float32
    assert float(q.scale) == 0.5
    x = t(0.25, 0.75, 1.25, -0.25, 63.5, 64.0, -64.0, -64.5, 100.0)
    # x / 0.5 = 0.5, 1.5, 2.5, -0.5, 127, 128, -128, -129, 200
    expected = t(0.0, 1.0, 1.0, 0.0, 63.5, 63.5, -64.0, -64.0, 63.5)
    assert torch.equal(q.eval()(x), expected)


@pytest.mark.parametrize("scale", [0.5, 0.0371, 1.7e-3, 3.3])
def test_int8_activation_inference_path_equals_torch_op_bit_for_bit(scale):
    """Without autograd the activation quantizer skips torch's op (which also builds its
    backward mask); the values must stay those of the op, ties and saturation included."""
    q = IntQuantizer(8).eval()
    q.set_amax(scale * 127)
    s = q.scale.detach()
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4096, generator=g) * 100 * scale,  # beyond +-128 steps: saturates
                   (torch.arange(-300, 300) + 0.5) * s,  # exact half steps: round half to even
                   torch.arange(-300, 300) * s])
    zero = torch.zeros((), dtype=torch.int32)
    with torch.no_grad():
        fast = q(x)
    with torch.enable_grad():
        op = torch.fake_quantize_per_tensor_affine(x, s, zero, -128, 127)
        assert torch.equal(q(x), op)  # the autograd path still calls the op
    assert torch.equal(fast, op)
    assert torch.equal(fast.abs().amax(), 128 * s)  # the test reaches the range's end


def test_int8_weight_is_per_output_channel_with_narrow_range():
    w = torch.zeros(2, 3, 1, 1)
    w[0, :, 0, 0] = t(127 / 128, -127 / 128, 0.5 / 128)  # max 127/128 -> scale 1/128
    w[1, :, 0, 0] = t(127 / 64, 1.5 / 64, -0.5 / 64)  # max 127/64 -> scale 1/64
    q = IntQuantizer(8, num_channels=2)
    q.reset_from_weight(w)
    assert q.scale.tolist() == [1 / 128, 1 / 64]
    assert (q.qmin, q.qmax) == (-127, 127)
    out = q.eval()(w)
    assert out[0, :, 0, 0].tolist() == [127 / 128, -127 / 128, 0.0]  # 0.5 -> 0 (half to even)
    assert out[1, :, 0, 0].tolist() == [127 / 64, 2 / 64, 0.0]  # 1.5 -> 2, -0.5 -> 0
    ints, scale = q.to_integer(w)
    assert ints.dtype == torch.int8 and ints[0, :, 0, 0].tolist() == [127, -127, 0]


def test_int8_weight_scale_below_max_clips_to_minus127_not_minus128():
    q = IntQuantizer(8, num_channels=1)
    q.set_amax(torch.tensor([127 / 128]), fixed=True)
    w = t(-2.0, 2.0).reshape(1, 2, 1, 1)
    out = q.eval()(w).flatten().tolist()
    assert out == [-127 / 128, 127 / 128]
    assert not q.dynamic  # a fixed scale is kept when the model trains


def test_dynamic_weight_scale_follows_weights_in_training():
    q = IntQuantizer(8, num_channels=1)
    q.reset_from_weight(torch.ones(1, 1, 1, 1))
    q.train()
    q(torch.full((1, 1, 1, 1), 2.54))
    assert float(q.amax) == pytest.approx(2.54)


def test_uncalibrated_activation_quantizer_refuses_to_run():
    q = IntQuantizer(8)
    q.name = "x.input"
    with pytest.raises(QuantizerError, match="x.input") as err:
        q(t(1.0))
    assert isinstance(err.value, CUNetError)


def test_learnable_scale_forward_matches_torch_op_and_has_lsq_gradient():
    q = IntQuantizer(8, learnable=True)
    q.set_amax(0.25 * 127)  # scale 0.25
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 20
    eval_out = q.eval()(x)
    train_out = q.train()(x)
    assert torch.equal(eval_out, train_out.detach())
    # d(q*s)/ds = round(x/s) - x/s inside the range, qmax above it (LSQ), times 1/sqrt(N*qmax)
    q.scale.grad = None
    x2 = t(0.3, 100.0)  # 0.3/0.25 = 1.2 -> 1; 100 clips at 127
    q(x2).sum().backward()
    expected = ((1 - 1.2) + 127) / math.sqrt(2 * 127)
    assert float(q.scale.grad) == pytest.approx(expected, rel=1e-5)


def test_int8_train_mode_gradient_is_straight_through_inside_range():
    q = IntQuantizer(8)
    q.set_amax(1.27)  # scale 0.01
    x = t(0.5, 3.0, -3.0).requires_grad_()
    q.train()(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0]


# -- INT4 -----------------------------------------------------------------------------


def test_int4_blocks_run_along_input_channels_with_symmetric_range():
    w = torch.zeros(1, 5, 1, 1)
    w[0, :, 0, 0] = t(7.0, -3.5, 0.875, 0.3125, 14.0)  # blocks of 2: [7, -3.5] [0.875, 0.3125] [14]
    q = BlockQuantizer(tuple(w.shape), block_size=2)
    q.reset_from_weight(w)
    assert tuple(q.scale.shape) == (1, 3, 1, 1)
    assert q.scale.flatten().tolist() == [1.0, 0.125, 2.0]
    out = q.eval()(w).flatten().tolist()
    # -3.5 -> -4 and 0.3125 / 0.125 = 2.5 -> 2 (half to even)
    assert out == [7.0, -4.0, 0.875, 0.25, 14.0]
    ints, _ = q.to_integer(w)
    assert ints.flatten().tolist() == [7, -4, 7, 2, 7]
    assert (q.qmin, q.qmax) == (-7, 7)


def test_int4_fixed_scale_never_reaches_minus8():
    q = BlockQuantizer((1, 2, 1, 1), block_size=2)
    q.set_amax(torch.full((1, 1, 1, 1), 7.0), fixed=True)
    out = q.eval()(t(-10.0, 10.0).reshape(1, 2, 1, 1)).flatten().tolist()
    assert out == [-7.0, 7.0]


def test_int4_block_scales_are_per_kernel_position_as_onnx_blocked_layout():
    w = torch.full((1, 4, 3, 3), 1.0)
    w[0, 1, 0, 0] = 7.0  # block 0 (channels 0-1), kernel position (0, 0) only
    q = BlockQuantizer(tuple(w.shape), block_size=2)
    q.reset_from_weight(w)
    amax = q.amax
    assert tuple(amax.shape) == (1, 2, 3, 3)
    assert float(amax[0, 0, 0, 0]) == pytest.approx(7.0)
    assert float(amax[0, 0, 1, 1]) == pytest.approx(1.0) and float(amax[0, 1, 0, 0]) == pytest.approx(1.0)


def test_int4_per_channel_uses_the_int_quantizer_with_7_levels():
    q = IntQuantizer(4, num_channels=1)
    w = t(0.875, 0.3125, -0.4375).reshape(1, 3, 1, 1)
    q.reset_from_weight(w)  # scale 0.125
    assert q.eval()(w).flatten().tolist() == [0.875, 0.25, -0.5]  # 2.5 -> 2, -3.5 -> -4


# -- The paper's modes ----------------------------------------------------------------


def test_binary_keeps_alpha_per_output_filter_and_has_xnor_gradient():
    w = torch.tensor([[0.25, -0.75], [2.0, 0.0]]).reshape(2, 2, 1, 1).requires_grad_()
    q = BinaryWeightQuantizer().train()
    out = q(w)
    assert out.flatten().tolist() == [0.5, -0.5, 1.0, 1.0]  # alpha 0.5 and 1.0; sign(0) = +1
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
    (out * g).sum().backward()
    # filter 0: alpha*g*1[|w|<=1] + sign(w)/n * sum(g*sign(w)) = 0.5*g + sign(w)/2 * (1 - 2)
    # filter 1: w=2 is outside hardtanh's range: only the alpha term; sign(0) = 0 in the alpha path
    expected = torch.tensor([[0.5 - 0.5, 1.0 + 0.5], [0.0 + 0.5 * (3 + 4), 4.0 + 0.0]])
    assert torch.allclose(w.grad.reshape(2, 2), expected)


def test_ternary_threshold_and_twn_scale():
    w = t(0.1, -0.8, 0.5, 0.2).reshape(1, 4, 1, 1)
    # mean|w| = 0.4, delta = 0.28: -0.8 and 0.5 survive, alpha = (0.8 + 0.5) / 2
    out = TernaryWeightQuantizer()(w).flatten().tolist()
    assert out == pytest.approx([0.0, -0.65, 0.65, 0.0])


def test_fixed_point_weights_clip_then_round():
    w = t(0.1, 0.125, 0.375, -0.9, 0.8)
    # k=3: S=4, clip +-0.75; *4 = 0.4, 0.5, 1.5, -3, 3 -> 0, 0, 2, -3, 3
    assert FixedPointWeightQuantizer(3)(w).tolist() == [0.0, 0.0, 0.5, -0.75, 0.75]


def test_fixed_point_inputs_are_unsigned_k_bit_with_ste():
    x = t(-0.3, 0.1, 0.125, 0.375, 0.6, 2.0).requires_grad_()
    # k=2: step 1/4, range [0, 3/4]
    out = FixedPointInputQuantizer(2)(x)
    assert out.tolist() == [0.0, 0.0, 0.0, 0.5, 0.5, 0.75]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_gradient_quantizer_quantizes_weight_gradient_in_backward_only():
    w = t(1.0, 2.0, 3.0, 4.0).requires_grad_()
    q = GradientQuantizer(3).train()
    y = q(w)
    assert torch.equal(y, w)
    g = t(0.5, -0.25, 0.01, 1.0)
    (y * g).sum().backward()
    # peak 1: clip to +-0.75, steps of 1/4: 0.5, -0.25, 0, 0.75
    assert w.grad.tolist() == [0.5, -0.25, 0.0, 0.75]
    assert quantize_gradient(g * 1e-4, 3).tolist() == pytest.approx((w.grad * 1e-4).tolist())
    q.eval()
    assert q(w) is w  # no custom Function outside training (export, inference)


# -- Spec -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    "fp32 int8 int8-untied int8-lsq int8-g8 int4 int4-pc int4-b16 int4-wo w1a8 w2a8g8 w4a8 w8 w32a4".split(),
)
def test_spec_round_trips_through_its_canonical_form(spec):
    scheme = parse_precision(spec)
    assert parse_precision(scheme.spec) == scheme
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme


def test_spec_meanings():
    int8 = parse_precision("int8")
    assert (int8.weight, int8.weight_bits, int8.activation, int8.tie_concat_scales) == ("int", 8, "int", True)
    assert int8.quantize_stem and int8.quantize_last_head
    assert not parse_precision("int8-untied").tie_concat_scales
    int4 = parse_precision("int4")
    assert (int4.weight_granularity, int4.block_size, int4.activation, int4.edge_weight_bits) == ("block", 32, "int", 8)
    assert parse_precision("int4-wo").activation == "float"
    w2 = parse_precision("w2a8g8")
    assert (w2.weight, w2.activation, w2.activation_bits, w2.gradient_bits) == ("ternary", "fixed", 8, 8)
    assert not w2.quantize_stem and not w2.quantize_last_head
    assert parse_precision("w1a8").weight == "binary" and parse_precision("w4a8").weight == "fixed"


@pytest.mark.parametrize("spec", ["int16", "int8-b32", "w1a8-tied", "bogus", "", "int4-x"])
def test_bad_specs_are_one_line_user_errors(spec):
    with pytest.raises(QuantSpecError) as err:
        parse_precision(spec)
    assert isinstance(err.value, CUNetError) and "\n" not in str(err.value)


# -- ONNX -----------------------------------------------------------------------------


class _QConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.xq = IntQuantizer(8)
        self.xq.set_amax(2.0)
        self.wq = IntQuantizer(8, num_channels=6)
        self.wq.reset_from_weight(self.conv.weight)

    def forward(self, x):
        return nn.functional.conv2d(self.xq(x), self.wq(self.conv.weight), padding=1)


def _value(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


def test_exports_to_quantize_dequantize_with_zero_points_0_and_axis_0():
    torch.manual_seed(0)
    m = _QConv().eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(1, 4, 8, 8),), f, dynamo=False, opset_version=17)
    model = onnx.load_from_string(f.getvalue())
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) == 4
    axes = set()
    for node in qdq:
        zero = _value(model, node.input[2])
        assert zero.dtype == np.int8 and not zero.any()
        scale = _value(model, node.input[1])
        axis = {a.name: a.i for a in node.attribute}.get("axis")
        axes.add(axis)
        if scale.size > 1:
            assert axis == 0 and scale.shape == (6,)
            assert np.array_equal(scale, m.wq.scale.detach().numpy())
        else:
            assert float(scale) == float(m.xq.scale)
    assert 0 in axes
