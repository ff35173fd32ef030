"""Fake quantizers: nn.Modules that round a tensor to a low-precision grid in float.

TensorRT form (`IntQuantizer`): symmetric, zero point 0. Activations per tensor in
[-128, 127]; conv weights per output channel (axis 0) in [-127, 127]. In eval mode
and in plain (non-learnable) training they call `torch.fake_quantize_per_tensor_affine`
/ `torch.fake_quantize_per_channel_affine`, which the ONNX exporters turn into
QuantizeLinear/DequantizeLinear; their backward is the straight-through estimator
(STE) masked outside the range. The exporter accepts only the (-128, 127) range,
so the weights' narrow range [-127, 127] comes from the scale (max|w| / 127 never
reaches -128) and, where a scale may clip (MSE or learned scales), from clamping the
weights to +-127 * scale first. With learnable scales, training uses an LSQ
(learned step size, Esser et al. 2020) STE written with plain torch ops, equal in
value to the torch op; eval and export still use the torch op.

Scales are stored, not amax: the float32 scale in the module is the one ONNX, the
JSON scale file and the legacy TensorRT cache carry, bit for bit (amax = scale * qmax).
An uncalibrated quantizer holds NaN and refuses to run.

INT4 weights (`BlockQuantizer`, or `IntQuantizer(num_bits=4)` per channel): range
[-7, 7], not [-8, 7]: with scale = amax / 7 the value -8 is only reachable by
weights beyond -amax, so [-8, 7] would just clip positive and negative weights
differently; [-7, 7] keeps the grid symmetric like INT8's [-127, 127], and fits the
ONNX INT4 container unchanged. Blocks follow ONNX's blocked quantization: one scale
per (output channel, block of `block_size` input channels, kernel position).

The paper's modes (Tang et al. 2018): `BinaryWeightQuantizer` (alpha * sign(w), alpha
= mean |w| per output filter: the authors' code loses alpha, we keep it),
`TernaryWeightQuantizer` (TWN), `FixedPointWeightQuantizer` (round(clip(w) * S) / S),
`FixedPointInputQuantizer` (unsigned k-bit inputs), `GradientQuantizer` (k-bit
weight gradients in backward). These have no calibrated state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cunet_optimize import distributed
from cunet_optimize.errors import CUNetError

# A scale must stay positive: an all-zero channel would otherwise divide by zero.
MIN_AMAX = 1e-8


class QuantizerError(CUNetError):
    """A quantizer used before it has a scale, or given an impossible one."""


def _exporting() -> bool:
    """Tracing or compiling (both ONNX exporters): no data-dependent Python checks then."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (as torch's fake-quant ops and ONNX QuantizeLinear) with identity gradient."""
    return x + (torch.round(x) - x).detach()


def fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """clamp(round(x / scale), qmin, qmax) * scale, differentiable in x (STE) and scale (LSQ).

    Multiplies by the float32 reciprocal as torch's fake-quant kernels do, so both
    give the same values.
    """
    return torch.clamp(round_ste(x * (1.0 / scale)), qmin, qmax) * scale


def fake_quant_inference(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The per-tensor fake quantization without autograd, equal to torch's op bit for bit
    (the same float32 reciprocal, round half to even) in one new tensor updated in place:
    torch's op also computes the mask its backward would need, which makes it 2.3x slower
    on a [32, 128, 64, 64] activation (82 ms vs 36 ms on the 2-core EPYC of
    bench/results/fake_quant_inference.json, `python bench/bench_fake_quant.py`).
    Every evaluation of a fake-quant model (sensitivity, accuracy checks) runs through it."""
    y = x * (1.0 / scale)
    return y.round_().clamp_(qmin, qmax).mul_(scale)


def _grad_scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Exactly t in forward; gradient multiplied by `factor` (LSQ's step-size gradient scale)."""
    return t.detach() + (t - t.detach()) * factor


def _per_channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((-1,) + (1,) * (ndim - 1))


class Quantizer(nn.Module):
    """Base: a stable `name` (for scale files) and an `enabled` switch (off = identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}" + ("" if self.enabled else ", disabled")


class ScaledQuantizer(Quantizer):
    """A quantizer with a `scale` tensor and an integer range [-qmax, qmax]."""

    scale: torch.Tensor
    qmax: int

    @property
    def amax(self) -> torch.Tensor:
        return self.scale.detach() * self.qmax

    @property
    def calibrated(self) -> bool:
        s = self.scale.detach()
        return bool(torch.isfinite(s).all() and (s > 0).all())


class IntQuantizer(ScaledQuantizer):
    """Symmetric signed integer fake quantizer with zero point 0 (TensorRT's Q/DQ form).

    num_channels None: one scale (activations, [-2^(b-1), 2^(b-1)-1]).
    num_channels C: one scale per index of axis 0 (conv weights), narrow range
    [-(2^(b-1)-1), 2^(b-1)-1]. Weight quantizers are `dynamic` by default: in training
    their scales follow max|w| per channel at every step (`reset_from_weight`);
    `fixed_scale` (persisted) marks scales calibrated otherwise (MSE) or learned.
    """

    def __init__(
        self,
        num_bits: int = 8,
        *,
        num_channels: int | None = None,
        narrow_range: bool | None = None,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        if not 2 <= num_bits <= 8:
            raise QuantizerError(f"integer quantizer: {num_bits} bits not supported (2..8)")
        self.num_bits = num_bits
        self.axis = None if num_channels is None else 0
        narrow = num_channels is not None if narrow_range is None else narrow_range
        self.qmax = 2 ** (num_bits - 1) - 1
        self.qmin = -self.qmax if narrow else -self.qmax - 1
        shape = () if num_channels is None else (num_channels,)
        self.scale = nn.Parameter(torch.full(shape, float("nan")), requires_grad=learnable)
        self._fixed = False  # mirrors the persisted `fixed_scale` buffer (no tensor reads in forward)
        if self.axis is not None:
            self.register_buffer("fixed_scale", torch.tensor(False))

    # -- state --------------------------------------------------------------------

    @property
    def is_weight(self) -> bool:
        return self.axis is not None

    @property
    def learnable(self) -> bool:
        return self.scale.requires_grad

    @property
    def dynamic(self) -> bool:
        """Weight scales that track max|w| (neither calibrated otherwise nor learned)."""
        return self.is_weight and not self._fixed and not self.learnable

    @torch.no_grad()
    def set_amax(self, amax: torch.Tensor | float, *, fixed: bool | None = None) -> None:
        """Scale = amax / qmax, stored as float32 (amax below MIN_AMAX is raised to it)."""
        amax = torch.as_tensor(amax, dtype=torch.float32, device=self.scale.device)
        if amax.shape != self.scale.shape:
            amax = amax.reshape(self.scale.shape)
        if not torch.isfinite(amax).all():
            raise QuantizerError(f"quantizer '{self.name}': amax is not finite; check the calibration data")
        self.scale.copy_(amax.clamp_min(MIN_AMAX) / self.qmax)
        if fixed is not None and self.is_weight:
            self.fixed_scale.fill_(fixed)
            self._fixed = bool(fixed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.is_weight:
            self._fixed = bool(self.fixed_scale)

    @torch.no_grad()
    def reset_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Scale from max|w| per output channel (no weight is clipped); returns it as a new tensor.

        Forward quantizes with the returned tensor, never with the stored Parameter, so
        autograd never saves a tensor that a later call (module reuse in one forward,
        recomputation) overwrites.
        """
        if not self.is_weight:
            raise QuantizerError(f"quantizer '{self.name}' quantizes activations, not weights")
        self.set_amax(weight.detach().abs().flatten(1).amax(dim=1))
        return self.scale.detach().clone()

    def to_integer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integers as int8, scale): what a DequantizeLinear initializer would hold."""
        self._check_scale()
        scale = self.scale.detach()
        s = _per_channel_view(scale, x.dim()) if self.is_weight else scale
        q = torch.clamp(torch.round(x.detach() * (1.0 / s)), self.qmin, self.qmax)
        return q.to(torch.int8), scale.clone()

    # -- forward ------------------------------------------------------------------

    def _check_scale(self) -> None:
        if _exporting() or self.calibrated:
            return
        if torch.isnan(self.scale.detach()).all():
            raise QuantizerError(
                f"quantizer '{self.name}' has no scale: calibrate the model "
                "(cunet_optimize.quant.calibrate) or load its scales before running it"
            )
        hint = ": a learned scale diverged; lower the learning rate of quantizer_parameters()"
        raise QuantizerError(
            f"quantizer '{self.name}' has a non-positive or non-finite scale" + (hint if self.learnable else "")
        )

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dynamic:
            scale = self.reset_from_weight(x)
        else:
            self._check_scale()
            if self.training and self.learnable:
                return self._quantize_lsq(x)
            scale = self.scale.detach().clone() if self.training else self.scale.detach()
        if self.num_bits != 8:
            if self.is_weight:
                scale = _per_channel_view(scale, x.dim())
            return fake_quant_ste(x, scale, self.qmin, self.qmax)
        if self.is_weight:
            if not self.dynamic:
                # A scale below max|w|/127 would let QuantizeLinear saturate at -128.
                bound = _per_channel_view(scale, x.dim()) * self.qmax
                x = torch.clamp(x, -bound, bound)
            zero = torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
            return torch.fake_quantize_per_channel_affine(x, scale, zero, 0, -128, 127)
        if not torch.is_grad_enabled() and not _exporting():
            return fake_quant_inference(x, scale, -128, 127)
        zero = torch.zeros((), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, -128, 127)

    def _quantize_lsq(self, x: torch.Tensor) -> torch.Tensor:
        per_scale = x.numel() / max(1, self.scale.numel())
        if not self.is_weight:
            # LSQ's gradient scale 1/sqrt(N * Qp) counts the elements N an activation scale
            # covers in the global batch; under DDP this rank holds only its part of it.
            per_scale /= distributed.local_batch_fraction()
        scale = _grad_scaled(self.scale.abs().clamp_min(MIN_AMAX / self.qmax), 1.0 / math.sqrt(per_scale * self.qmax))
        if self.is_weight:
            scale = _per_channel_view(scale, x.dim())
        return fake_quant_ste(x, scale, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        kind = "per-channel axis 0" if self.is_weight else "per-tensor"
        return f"{super().extra_repr()}, int{self.num_bits} [{self.qmin}, {self.qmax}] {kind}" + (
            ", learnable" if self.learnable else ""
        )


class BlockQuantizer(ScaledQuantizer):
    """INT-b weights with one scale per (output channel, block of input channels, kernel position).

    The scale tensor has the weight's rank, [O, ceil(I / block_size), kh, kw], i.e.
    ONNX's blocked DequantizeLinear layout (axis 1, attribute block_size); the last
    block may be shorter. Range [-(2^(b-1)-1), 2^(b-1)-1]. Always the STE path: the
    torch exporters have no INT4 fake-quant op, so the export stage writes the INT4
    DequantizeLinear itself from `to_integer`.
    """

    def __init__(self, weight_shape: tuple[int, ...], block_size: int, num_bits: int = 4, *, learnable: bool = False):
        super().__init__()
        if len(weight_shape) < 2:
            raise QuantizerError(f"block quantizer: weight shape {weight_shape} has no input-channel axis")
        self.num_bits = num_bits
        self.block_size = block_size
        self.qmax = 2 ** (num_bits - 1) - 1
        self.qmin = -self.qmax
        out_ch, in_ch, *kernel = weight_shape
        self.in_channels = in_ch
        num_blocks = math.ceil(in_ch / block_size)
        self.scale = nn.Parameter(torch.full((out_ch, num_blocks, *kernel), float("nan")), requires_grad=learnable)
        self._fixed = False  # mirrors the persisted `fixed_scale` buffer
        self.register_buffer("fixed_scale", torch.tensor(False))

    is_weight = True

    @property
    def learnable(self) -> bool:
        return self.scale.requires_grad

    @property
    def dynamic(self) -> bool:
        return not self._fixed and not self.learnable

    def blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as [O, num_blocks, block_size, *kernel], zero-padded in the last block."""
        out_ch, in_ch, *kernel = weight.shape
        pad = self.scale.shape[1] * self.block_size - in_ch
        if pad:
            weight = torch.cat([weight, weight.new_zeros(out_ch, pad, *kernel)], 1)
        return weight.reshape(out_ch, -1, self.block_size, *kernel)

    def expand(self, scale: torch.Tensor) -> torch.Tensor:
        """Block scales -> one per weight element (shape of the weight)."""
        return scale.repeat_interleave(self.block_size, dim=1)[:, : self.in_channels]

    @torch.no_grad()
    def set_amax(self, amax: torch.Tensor, *, fixed: bool | None = None) -> None:
        amax = torch.as_tensor(amax, dtype=torch.float32, device=self.scale.device).reshape(self.scale.shape)
        self.scale.copy_(amax.clamp_min(MIN_AMAX) / self.qmax)
        if fixed is not None:
            self.fixed_scale.fill_(fixed)
            self._fixed = bool(fixed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fixed = bool(self.fixed_scale)

    @torch.no_grad()
    def reset_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Scale from max|w| per block (zero padding never raises a block's max); returns a copy."""
        self.set_amax(self.blocks(weight.detach()).abs().amax(dim=2))
        return self.scale.detach().clone()

    def to_integer(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integers in [-qmax, qmax] as int8, block scales [O, nb, *kernel])."""
        scale = self.scale.detach()
        q = torch.clamp(torch.round(weight.detach() * (1.0 / self.expand(scale))), self.qmin, self.qmax)
        return q.to(torch.int8), scale.clone()

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        if self.training and self.dynamic:
            scale = self.reset_from_weight(w)
        elif not _exporting() and not self.calibrated:
            raise QuantizerError(f"quantizer '{self.name}' has no valid scale; run reset_from_weight")
        elif self.training and self.learnable:
            scale = self.scale.abs().clamp_min(MIN_AMAX / self.qmax)
            scale = _grad_scaled(scale, 1.0 / math.sqrt(self.block_size * self.qmax))
        else:
            scale = self.scale.detach()
        return fake_quant_ste(w, self.expand(scale), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, int{self.num_bits} [{self.qmin}, {self.qmax}], "
            f"blocks of {self.block_size} input channels"
        )


# --------------------------------------------------------------------------------------
# The paper's quantizers (no calibrated state)


def _sign_ste(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """`levels` in forward; gradient of hardtanh(w) (1 inside [-1, 1], 0 outside)."""
    clipped = torch.clamp(w, -1.0, 1.0)
    return clipped + (levels - clipped).detach()


class BinaryWeightQuantizer(Quantizer):
    """alpha * sign(w), alpha = mean |w| of each output filter (XNOR-Net's BWN).

    sign(0) is taken as +1 so the weights stay binary. Gradient (XNOR-Net's): through
    sign by the hardtanh STE and through alpha by autograd, i.e.
    dL/dw_i = alpha * g_i * 1[|w_i| <= 1] + sign(w_i) / n * sum_j g_j * sign(w_j)
    with g = dL/dw_q and n the filter's weight count.
    """

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, w.dim()))
        alpha = w.abs().mean(dim=dims, keepdim=True)
        signs = torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))
        return alpha * _sign_ste(w, signs)


class TernaryWeightQuantizer(Quantizer):
    """alpha * {-1, 0, +1} (Ternary Weight Networks, Li & Liu 2016), per output filter.

    Threshold delta = 0.7 * mean |w| of the filter; w maps to sign(w) where |w| > delta,
    else 0; alpha = mean of |w| over the weights above the threshold (TWN's optimal
    scale for that threshold; the authors' code uses alpha = 1, i.e. none).
    """

    def __init__(self, threshold_ratio: float = 0.7) -> None:
        super().__init__()
        self.threshold_ratio = threshold_ratio

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, w.dim()))
        delta = self.threshold_ratio * w.detach().abs().mean(dim=dims, keepdim=True)
        mask = (w.detach().abs() > delta).to(w.dtype)
        alpha = (w.abs() * mask).sum(dim=dims, keepdim=True) / mask.sum(dim=dims, keepdim=True).clamp_min(1.0)
        return alpha * _sign_ste(w, torch.sign(w.detach()) * mask)


class FixedPointWeightQuantizer(Quantizer):
    """The paper's k-bit weights: round(clip(w, -(1 - 1/S), 1 - 1/S) * S) / S, S = 2^(k-1).

    A fixed grid of step 1/S with 2S - 1 levels, the same for every layer (no scale).
    STE inside the clip range, zero gradient outside.
    """

    def __init__(self, num_bits: int) -> None:
        super().__init__()
        self.num_bits = num_bits
        self.steps = 2.0 ** (num_bits - 1)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        limit = 1.0 - 1.0 / self.steps
        return round_ste(torch.clamp(w, -limit, limit) * self.steps) / self.steps


class FixedPointInputQuantizer(Quantizer):
    """The paper's k-bit inputs, as unsigned fixed point: round(clip(x, 0, 1 - 2^-k) * 2^k) / 2^k.

    The inputs it quantizes follow a ReLU, so no bit is spent on a sign (the authors'
    code clips to +-(1 - 2^(1-k)) and wastes one); 2^k levels of step 2^-k in [0, 1).
    STE inside the range, zero gradient outside (as the authors' backward).
    """

    def __init__(self, num_bits: int) -> None:
        super().__init__()
        self.num_bits = num_bits
        self.steps = 2.0**num_bits

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return round_ste(torch.clamp(x, 0.0, 1.0 - 1.0 / self.steps) * self.steps) / self.steps


class _QuantizeGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, num_bits: int) -> torch.Tensor:
        ctx.num_bits = num_bits
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return quantize_gradient(grad, ctx.num_bits), None


def quantize_gradient(grad: torch.Tensor, num_bits: int) -> torch.Tensor:
    """The paper's Q(C(g)) on the gradient normalised by its largest magnitude.

    g / max|g| is clipped to +-(1 - 1/S) and rounded to multiples of 1/S (S = 2^(k-1)),
    then scaled back. The authors apply Q(C(.)) to raw gradients, which, for a loss
    of ordinary scale (|g| << 1/S), rounds nearly every weight gradient to zero.
    """
    peak = grad.abs().max()
    if not torch.isfinite(peak) or peak == 0:
        return grad
    steps = 2.0 ** (num_bits - 1)
    limit = 1.0 - 1.0 / steps
    normalised = torch.clamp(grad / peak, -limit, limit)
    return torch.round(normalised * steps) / steps * peak


class GradientQuantizer(Quantizer):
    """Identity in forward; k-bit quantization of the weight gradient in backward."""

    def __init__(self, num_bits: int = 8) -> None:
        super().__init__()
        self.num_bits = num_bits

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        # Export and inference have no backward: keep the custom Function out of the graph.
        if not self.training or not torch.is_grad_enabled() or _exporting():
            return w
        return _QuantizeGradient.apply(w, self.num_bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.num_bits}-bit gradients"
