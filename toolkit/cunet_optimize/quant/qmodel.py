"""The quantized CU-Net: `quantize_model` and what a QAT loop and the export stage need.

`quantize_model(model, scheme)` deep-copies a CU-Net and converts modules in place
(class swap, as NVIDIA ModelOpt converts modules), so every float tensor keeps its
state-dict key and the inherited `CUNet.forward` runs unchanged:

- every Conv2d the forward uses -> `QuantConv2d`: optional input, weight and
  gradient quantizers (TensorRT placement: the inputs of weighted ops; BN is not
  folded). In the BN -> ReLU -> Conv pattern the input quantizer sees the ReLU output.
- every DenseLayer / Adapter whose input is a real concatenation (>= 2 tensors) ->
  `ConcatQuantizer` on each concat input and on the concat output (INT8 activations
  only). With `tie_concat_scales` all quantizers of one dataflow component
  (concat_tying.py) share a single scale Parameter, including pass-through slots: the
  adapter outputs that enter a MaxPool / nearest Upsample and the stem's MaxPool
  input, so TensorRT can elide Concat and run pooling in INT8 with no requantization.

Quantizer names are stable and derived from module names, e.g.
"hg.down_blocks.0.layers.1.conv1.input", "hg.down_blocks.0.layers.1.conv1.weight",
"hg.down_blocks.0.layers.1.concat.input.0", "hg.down_blocks.0.layers.1.concat.output",
"hg.down_blocks.0.adapters_ahead.1.output", "features.pool0.input"; scale files are
keyed by them.

The paper's modes place weight quantizers on every conv but the stem and the last
head, and input quantizers on the 3x3 convs (DenseLayer.conv2) and the other heads.
"""

from __future__ import annotations

import copy
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cunet_optimize.errors import CUNetError
from cunet_optimize.models.cunet import Adapter, CUNet, DenseLayer, Head, concat_bn_relu_conv, recomputed
from cunet_optimize.quant.concat_tying import ConcatPlan, plan_concat_tying, trace_dataflow
from cunet_optimize.quant.quantizers import (
    BinaryWeightQuantizer,
    BlockQuantizer,
    FixedPointInputQuantizer,
    FixedPointWeightQuantizer,
    GradientQuantizer,
    IntQuantizer,
    Quantizer,
    QuantizerError,
    TernaryWeightQuantizer,
)
from cunet_optimize.quant.scheme import BINARY, DEFAULT_INT4_BLOCK, FIXED, INT, TERNARY, QuantScheme, parse_precision


# --------------------------------------------------------------------------------------
# Quantized modules (converted in place from the float ones)


class QuantConv2d(nn.Conv2d):
    """Conv2d with optional input, weight and weight-gradient quantizers."""

    input_quantizer: Quantizer | None
    weight_quantizer: Quantizer | None
    gradient_quantizer: Quantizer | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight
        if self.gradient_quantizer is not None:
            w = self.gradient_quantizer(w)
        if self.weight_quantizer is not None:
            w = self.weight_quantizer(w)
        return self._conv_forward(x, w, self.bias)

    def train(self, mode: bool = True) -> "QuantConv2d":
        super().train(mode)
        if not mode:
            refresh_dynamic_weight_scale(self)
        return self


def refresh_dynamic_weight_scale(conv: nn.Module) -> None:
    """Dynamic weight scales follow max|w|: refreshed on eval() (export uses the stored scale)."""
    wq = getattr(conv, "weight_quantizer", None)
    if wq is not None and getattr(wq, "dynamic", False):
        wq.reset_from_weight(conv.weight)


class ConcatQuantizer(nn.Module):
    """Per-tensor quantizers on the n inputs and the output of one dense concatenation."""

    def __init__(self, site: str, num_inputs: int, learnable: bool = False) -> None:
        super().__init__()
        self.site = site
        self.inputs = nn.ModuleList(IntQuantizer(8, learnable=learnable) for _ in range(num_inputs))
        self.output = IntQuantizer(8, learnable=learnable)
        for k, q in enumerate(self.inputs):
            q.name = f"{site}.concat.input.{k}"
        self.output.name = f"{site}.concat.output"

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        if len(xs) != len(self.inputs):
            raise CUNetError(
                f"{self.site}: concatenation of {len(xs)} tensors, quantized for {len(self.inputs)}; "
                "quantize the model again for this configuration"
            )
        return self.output(torch.cat([q(x) for q, x in zip(self.inputs, xs)], 1))


def quant_concat_bn_relu_conv(
    inputs: list[torch.Tensor],
    concat_quantizer: ConcatQuantizer | None,
    norm: nn.BatchNorm2d,
    conv: nn.Module,
    memory_efficient: bool = False,
) -> torch.Tensor:
    """models.cunet.concat_bn_relu_conv with the concatenation (inputs and output) quantized."""
    if concat_quantizer is None:
        return concat_bn_relu_conv(inputs, norm, conv, memory_efficient)
    if memory_efficient:
        return recomputed(lambda *xs: quant_concat_bn_relu_conv(list(xs), concat_quantizer, norm, conv), *inputs)
    return conv(F.relu(norm(concat_quantizer(inputs)), inplace=True))


class QuantDenseLayer(DenseLayer):
    concat_quantizer: ConcatQuantizer | None

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        bottleneck = quant_concat_bn_relu_conv(inputs, self.concat_quantizer, self.norm1, self.conv1)
        return self.conv2(F.relu(self.norm2(bottleneck), inplace=True))


class QuantAdapter(Adapter):
    concat_quantizer: ConcatQuantizer | None
    output_quantizer: IntQuantizer | None  # a pass-through slot (feeds MaxPool / Upsample)

    def forward(self, inputs: list[torch.Tensor], memory_efficient: bool = False) -> torch.Tensor:
        y = quant_concat_bn_relu_conv(
            inputs, self.concat_quantizer, self.adapter_norm, self.adapter_conv, memory_efficient
        )
        return y if self.output_quantizer is None else self.output_quantizer(y)


class QuantMaxPool2d(nn.MaxPool2d):
    input_quantizer: IntQuantizer | None  # a pass-through slot (the stem's pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return super().forward(x)


class QuantCUNet(CUNet):
    """A CU-Net with fake quantizers; made by `quantize_model`, never constructed directly.

    Attributes: `scheme` (QuantScheme), `concat_plan` (dataflow.ConcatPlan),
    `bn_frozen` (see `freeze_bn`).
    """

    scheme: QuantScheme
    layer_formats: dict[str, str]  # convs that differ from the scheme (mixed precision)
    int4_block: int | None  # input channels per scale of the plan's INT4 convs (None: per output channel)
    concat_plan: ConcatPlan
    bn_frozen: bool

    def train(self, mode: bool = True) -> "QuantCUNet":
        super().train(mode)
        if mode and getattr(self, "bn_frozen", False):
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(False)
        return self

    def extra_repr(self) -> str:
        return f"scheme={self.scheme.spec!r}"


def _convert(module: nn.Module, cls: type, **slots) -> None:
    module.__class__ = cls
    for name, value in slots.items():
        module.register_module(name, value)


# --------------------------------------------------------------------------------------
# Placement decisions


def conv_roles(model: CUNet) -> dict[str, str]:
    """Conv module name -> "stem" | "last_head" | "head" | "conv3x3" (absent: an inner 1x1)."""
    roles = {"features.conv0": "stem"}
    last = f"linears.{model.config.loss_anchors[-1] - 1}.conv"
    for name, m in model.named_modules():
        if isinstance(m, Head):
            roles[f"{name}.conv"] = "last_head" if f"{name}.conv" == last else "head"
        elif isinstance(m, DenseLayer):
            roles[f"{name}.conv2"] = "conv3x3"
    return roles


def _conv_quantizers(scheme: QuantScheme, role: str, conv: nn.Conv2d) -> dict[str, Quantizer | None]:
    edge = role in ("stem", "last_head")
    if (role == "stem" and not scheme.quantize_stem) or (role == "last_head" and not scheme.quantize_last_head):
        return {"weight_quantizer": None, "input_quantizer": None, "gradient_quantizer": None}
    learnable = scheme.learnable_scales
    wq: Quantizer | None = None
    if scheme.weight == INT:
        bits = scheme.edge_weight_bits if edge and scheme.edge_weight_bits else scheme.weight_bits
        if scheme.weight_granularity == "block" and bits == scheme.weight_bits:
            wq = BlockQuantizer(tuple(conv.weight.shape), scheme.block_size, bits, learnable=learnable)
        else:
            wq = IntQuantizer(bits, num_channels=conv.out_channels, learnable=learnable)
        wq.reset_from_weight(conv.weight)
    elif scheme.weight == BINARY:
        wq = BinaryWeightQuantizer()
    elif scheme.weight == TERNARY:
        wq = TernaryWeightQuantizer()
    elif scheme.weight == FIXED:
        wq = FixedPointWeightQuantizer(scheme.weight_bits)
    iq: Quantizer | None = None
    if scheme.activation == INT:
        iq = IntQuantizer(8, learnable=learnable)
    elif scheme.activation == FIXED and role in ("conv3x3", "head"):
        iq = FixedPointInputQuantizer(scheme.activation_bits)
    gq = GradientQuantizer(scheme.gradient_bits) if scheme.gradient_bits and wq is not None else None
    return {"weight_quantizer": wq, "input_quantizer": iq, "gradient_quantizer": gq}


# Per-conv weight formats of a mixed-precision plan (`quantize_model(layer_formats=...)`):
# "int8" = the scheme's own INT8 conv, "int4" = INT4 weights (INT8 input as the scheme says),
# in blocks of `int4_block` input channels, or per output channel where int4_block is None
# (quant.policy.int4_block_for: the CPU, whose integer path runs them as INT8), "float" = no
# quantizer at all (the conv runs in the target's float type).
LAYER_FORMATS = ("int4", "int8", "float")


def conv_scheme(scheme: QuantScheme, layer_format: str, int4_block: int | None = DEFAULT_INT4_BLOCK) -> QuantScheme:
    """The scheme one conv of a mixed plan follows; the base must be int8 (TensorRT form).
    `int4_block`: input channels per INT4 scale, None for one scale per output channel."""
    from dataclasses import replace

    from cunet_optimize.quant.scheme import FLOAT

    if layer_format not in LAYER_FORMATS:
        raise CUNetError(f"layer format '{layer_format}' unknown; use one of {', '.join(LAYER_FORMATS)}")
    if layer_format == "int8":
        return scheme
    if layer_format == "int4":
        return replace(scheme, weight_bits=4, weight_granularity="block" if int4_block else "per_channel",
                       block_size=int4_block or None, edge_weight_bits=None)
    return replace(scheme, weight=FLOAT, weight_bits=32, weight_granularity="per_channel", block_size=None,
                   activation=FLOAT, activation_bits=32, tie_concat_scales=False, learnable_scales=False,
                   gradient_bits=None, edge_weight_bits=None)


def quantize_model(model: CUNet, scheme: QuantScheme | str,
                   layer_formats: Mapping[str, str] | None = None,
                   int4_block: int | None = DEFAULT_INT4_BLOCK) -> QuantCUNet:
    """A quantized copy of `model` (left untouched) following `scheme` (or a spec string).

    Weight scales start at max|w|; INT8 activation scales are NaN until `calibrate`
    or `apply_scales` sets them (the model refuses to run before).
    `layer_formats` {conv name: "int4" | "int8" | "float"} overrides single convs of an
    int8 scheme (a mixed-precision plan, quant/auto.py); kept as `qmodel.layer_formats`, and
    `int4_block` (conv_scheme) as `qmodel.int4_block`.
    """
    if not isinstance(model, CUNet):
        raise CUNetError(f"quantize_model needs a CUNet, got {type(model).__name__}")
    if isinstance(model, QuantCUNet):
        raise CUNetError("quantize_model: the model is already quantized; pass the float CU-Net")
    if isinstance(scheme, str):
        scheme = parse_precision(scheme)
    qmodel = copy.deepcopy(model)
    trace = trace_dataflow(qmodel)
    if scheme.activation == INT and scheme.quantize_concats:
        plan = plan_concat_tying(trace, scheme.tie_concat_scales)
    else:
        plan = ConcatPlan(sites={}, groups=[], slots=[])

    modules = dict(qmodel.named_modules())
    roles = conv_roles(qmodel)
    layer_formats = dict(layer_formats or {})
    if layer_formats:
        if scheme.weight != INT or scheme.weight_bits != 8 or scheme.learnable_scales:
            raise CUNetError(f"per-layer formats need an int8 base scheme without -lsq, not '{scheme.spec}'")
        unknown = sorted(set(layer_formats) - set(trace.called_convs))
        if unknown:
            raise CUNetError(f"layer formats name '{unknown[0]}', not a conv of this model; "
                             "the plan was made for another model configuration")
    for name in trace.called_convs:
        conv = modules[name]
        conv_sch = conv_scheme(scheme, layer_formats[name], int4_block) if name in layer_formats else scheme
        quantizers = _conv_quantizers(conv_sch, roles.get(name, "conv1x1"), conv)
        suffixes = {"input_quantizer": "input", "weight_quantizer": "weight", "gradient_quantizer": "weight_grad"}
        for attr, suffix in suffixes.items():
            if quantizers[attr] is not None:
                quantizers[attr].name = f"{name}.{suffix}"
        _convert(conv, QuantConv2d, **quantizers)
    for name, m in modules.items():
        concat = ConcatQuantizer(name, plan.sites[name], scheme.learnable_scales) if name in plan.sites else None
        if isinstance(m, DenseLayer):
            _convert(m, QuantDenseLayer, concat_quantizer=concat)
        elif isinstance(m, Adapter):
            slot = f"{name}.output"
            out = _slot_quantizer(slot, scheme) if slot in plan.slots else None
            _convert(m, QuantAdapter, concat_quantizer=concat, output_quantizer=out)
        elif isinstance(m, nn.MaxPool2d) and f"{name}.input" in plan.slots:
            _convert(m, QuantMaxPool2d, input_quantizer=_slot_quantizer(f"{name}.input", scheme))

    qmodel.to(next(model.parameters()).device)  # new quantizers start on the CPU
    _convert(qmodel, QuantCUNet)
    qmodel.scheme = scheme
    qmodel.layer_formats = {k: v for k, v in layer_formats.items() if v != "int8"}
    qmodel.int4_block = int4_block
    qmodel.concat_plan = plan
    qmodel.bn_frozen = False
    _tie_groups(qmodel, plan)
    return qmodel


def _slot_quantizer(name: str, scheme: QuantScheme) -> IntQuantizer:
    q = IntQuantizer(8, learnable=scheme.learnable_scales)
    q.name = name
    return q


def _tie_groups(qmodel: QuantCUNet, plan: ConcatPlan) -> None:
    """Make every quantizer of a group hold the same scale Parameter object."""
    by_name = dict(named_quantizers(qmodel))
    for group in plan.groups:
        names = []
        for member in group:
            if member in plan.sites:
                names += [f"{member}.concat.input.{k}" for k in range(plan.sites[member])]
                names.append(f"{member}.concat.output")
            else:
                names.append(member)
        shared = by_name[names[0]].scale
        for n in names[1:]:
            by_name[n].scale = shared


# --------------------------------------------------------------------------------------
# Inspection


def named_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """(stable name, quantizer) for every quantizer, in module order."""
    for _, m in model.named_modules():
        if isinstance(m, Quantizer):
            yield m.name, m


def is_activation_quantizer(q: Quantizer) -> bool:
    return isinstance(q, FixedPointInputQuantizer) or (isinstance(q, IntQuantizer) and not q.is_weight)


def activation_quantizers(model: nn.Module) -> dict[str, IntQuantizer]:
    """The calibrated (per-tensor integer) activation quantizers by name."""
    return {n: q for n, q in named_quantizers(model) if isinstance(q, IntQuantizer) and not q.is_weight}


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of the quantizers that share one scale object (groups of 2 or more)."""
    groups: dict[int, list[str]] = {}
    for name, q in activation_quantizers(model).items():
        groups.setdefault(id(q.scale), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def concat_quantizers(model: nn.Module) -> list[ConcatQuantizer]:
    return [m for m in model.modules() if isinstance(m, ConcatQuantizer)]


def requantization_points(model: nn.Module, scales: Mapping[str, float] | None = None) -> int:
    """Concat inputs whose scale differs from their concat output's (each costs TensorRT a
    requantization instead of writing straight into the concat buffer).

    Uses the model's scales, or `scales` {quantizer name: scale} (e.g. a scale file's).
    An untied, uncalibrated input counts: nothing makes its scale equal the output's.
    """
    count = 0
    for cq in concat_quantizers(model):
        out = cq.output
        for q in cq.inputs:
            if scales is not None:
                for n in (q.name, out.name):
                    if n not in scales:
                        raise CUNetError(f"requantization_points: no scale for quantizer '{n}'; recalibrate")
                count += scales[q.name] != scales[out.name]
            else:
                same = q.scale is out.scale or torch.equal(q.scale.detach(), out.scale.detach())
                count += not same
    return count


# --------------------------------------------------------------------------------------
# Training helpers


def set_quantizers_enabled(model: nn.Module, enabled: bool, *, weights: bool = True, activations: bool = True) -> None:
    """Switch quantizers on or off (off = identity); e.g. the float reference of a QuantCUNet."""
    for _, q in named_quantizers(model):
        if is_activation_quantizer(q):
            if activations:
                q.enabled = enabled
        elif weights:
            q.enabled = enabled


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every quantizer scale, once each (tied scales are one Parameter): give them their own
    optimizer group (LSQ scales usually need a smaller learning rate than the weights)."""
    seen: dict[int, nn.Parameter] = {}
    for _, q in named_quantizers(model):
        scale = getattr(q, "scale", None)
        if isinstance(scale, nn.Parameter):
            seen.setdefault(id(scale), scale)
    return list(seen.values())


def set_learnable_scales(model: nn.Module, learnable: bool = True) -> None:
    """Train integer scales with the weights (LSQ) or keep them fixed."""
    for _, q in named_quantizers(model):
        if isinstance(q, (IntQuantizer, BlockQuantizer)):
            q.scale.requires_grad_(learnable)


def freeze_bn(model: nn.Module, frozen: bool = True) -> None:
    """Freeze (or release) BatchNorm statistics: BN normalises with its running statistics
    and stops updating them. On a QuantCUNet this survives later `.train()` calls; on
    any other module call it again after `.train()`. BN's affine weights still train.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(model.training and not frozen)
    if isinstance(model, QuantCUNet):
        model.bn_frozen = frozen


def refresh_dynamic_weight_scales(model: nn.Module) -> None:
    """Set every dynamic weight scale to max|w| of the current weights."""
    for m in model.modules():
        if isinstance(m, QuantConv2d):
            refresh_dynamic_weight_scale(m)


def quant_state_dict(model: QuantCUNet) -> dict[str, torch.Tensor]:
    """Weights, BN statistics and every quantizer's scale, as independent tensors.

    Keys are the module paths (float weights keep their CUNet keys; a shared scale
    appears once per quantizer). Safe for safetensors. Store `model.scheme.spec`
    (or `scheme.to_dict()`) next to it to rebuild the model with `quantize_model`.
    """
    refresh_dynamic_weight_scales(model)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def load_quant_state(model: QuantCUNet, state: Mapping[str, torch.Tensor]) -> None:
    """Load a `quant_state_dict` into a model quantized with the same scheme and config."""
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise QuantizerError(
                f"quantized state lacks '{key}': was it saved from a model with scheme "
                f"'{model.scheme.spec}' and this configuration?"
            )
        if tuple(state[key].shape) != tuple(ref.shape):
            raise QuantizerError(
                f"quantized state: '{key}' has shape {list(state[key].shape)}, the model expects {list(ref.shape)}"
            )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise QuantizerError(f"quantized state: unexpected tensor '{unexpected[0]}' (scheme '{model.scheme.spec}')")
    keys_of_param: dict[int, list[str]] = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        keys_of_param.setdefault(id(p), []).append(key)
    for keys in keys_of_param.values():
        first = state[keys[0]]
        for k in keys[1:]:
            if not torch.allclose(state[k].float(), first.float(), rtol=0, atol=0, equal_nan=True):
                raise QuantizerError(
                    f"quantized state: tied scales '{keys[0]}' and '{k}' differ; the file is inconsistent"
                )
    model.load_state_dict(dict(state), strict=True)
    refresh_dynamic_weight_scales(model)


def float_state_dict(model: QuantCUNet) -> dict[str, torch.Tensor]:
    """The float CU-Net part of the state (loads into a plain CUNet of the same config)."""
    prefixes = tuple(
        f"{name}." for name, m in model.named_modules() if isinstance(m, (Quantizer, ConcatQuantizer))
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(prefixes)}
