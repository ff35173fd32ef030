"""Activation equalization before calibration: SmoothQuant for pre-activation CU-Net.

INT8 activations are quantized per tensor, so in a conv input whose channels have
very different ranges the small channels get only a few of the 255 levels. Every
conv of CU-Net but the stem reads ReLU(BN(x)) through a BatchNorm of its own (one
per consumer, since each dense layer, adapter and head normalises the concatenation
itself), and ReLU is positively homogeneous, so for any s_c > 0

    Conv(W, ReLU(BN(x)))  ==  Conv(W * s, ReLU(BN(x) / s))

with BN(x) / s the same BatchNorm with gamma / s and beta / s. This float-exact
rewrite moves range from the activation (quantized per tensor) into the weight
columns (quantized per output channel). The factor is SmoothQuant's (Xiao et al.,
ICML 2023): s_c = r_c^alpha / w_c^(1 - alpha), r_c the largest value of input
channel c over the calibration batches, w_c = max |W[:, c]|. NVIDIA ModelOpt
offers the same algorithm for Linear layers ("smoothquant"); here it needs no
extra node in the exported graph, because the factors live in BN and conv weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn
from tqdm import tqdm

from cunet_optimize import distributed
from cunet_optimize.errors import CUNetError
from cunet_optimize.models.cunet import Adapter, CUNet, DenseLayer, Head

DEFAULT_ALPHA = 0.5


def norm_conv_pairs(model: CUNet) -> dict[str, tuple[nn.BatchNorm2d, nn.Conv2d]]:
    """Conv name -> (the BatchNorm whose ReLU output it reads, the conv): all but the stem."""
    pairs = {}
    for name, m in model.named_modules():
        if isinstance(m, Adapter):
            pairs[f"{name}.adapter_conv"] = (m.adapter_norm, m.adapter_conv)
        elif isinstance(m, DenseLayer):
            pairs[f"{name}.conv1"] = (m.norm1, m.conv1)
            pairs[f"{name}.conv2"] = (m.norm2, m.conv2)
        elif isinstance(m, Head):
            pairs[f"{name}.conv"] = (m.norm, m.conv)
    return pairs


@torch.inference_mode()
def input_channel_ranges(
    model: CUNet, batches: Iterable[torch.Tensor], progress: bool = False, sharded: bool = False
) -> dict[str, torch.Tensor]:
    """Per-channel max of every paired conv's input (a ReLU output, so >= 0) over `batches`
    (`sharded`: this rank's parts of the batches; the maxima are taken over all ranks)."""
    pairs = norm_conv_pairs(model)
    ranges: dict[str, torch.Tensor] = {}

    def observe(name):
        def hook(module, args):
            if args[0].numel() == 0:  # a rank's empty part of a batch smaller than the world
                return
            r = args[0].detach().amax(dim=(0, 2, 3)).float()
            ranges[name] = r if name not in ranges else torch.maximum(ranges[name], r)

        return hook

    handles = [conv.register_forward_pre_hook(observe(n)) for n, (_, conv) in pairs.items()]
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, desc="equalization ranges", unit="batch", total=total, disable=not progress):
            model(batch.to(device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if sharded:
        for part in distributed.all_gather_objects(ranges):
            for name, r in part.items():
                ranges[name] = r if name not in ranges else torch.maximum(ranges[name], r)
    if not ranges:
        raise CUNetError("activation equalization saw no data: the calibration set is empty")
    return ranges


def smoothing_factors(
    model: CUNet, ranges: Mapping[str, torch.Tensor], alpha: float = DEFAULT_ALPHA
) -> dict[str, torch.Tensor]:
    """s per input channel of each conv; 1 where a channel is dead (r = 0) or has zero weights."""
    if not 0.0 <= alpha <= 1.0:
        raise CUNetError(f"equalization alpha must be in [0, 1], got {alpha}")
    factors = {}
    for name, (_, conv) in norm_conv_pairs(model).items():
        if name not in ranges:  # a head the forward does not use
            continue
        r = ranges[name].double()
        w = conv.weight.detach().abs().amax(dim=(0, 2, 3)).double()
        s = torch.ones_like(r)
        ok = (r > 0) & (w > 0)
        s[ok] = r[ok].pow(alpha) / w[ok].pow(1.0 - alpha)
        # Normalise to geometric mean 1: only the ratios between channels matter.
        if ok.any():
            s[ok] = s[ok] / s[ok].log().mean().exp()
        factors[name] = s.float()
    return factors


@torch.no_grad()
def apply_equalization(model: CUNet, factors: Mapping[str, torch.Tensor]) -> CUNet:
    """A copy of `model` with BN / s and conv input columns * s (`model` is untouched)."""
    out = copy.deepcopy(model)
    pairs = norm_conv_pairs(out)
    unknown = sorted(set(factors) - set(pairs))
    if unknown:
        raise CUNetError(f"equalization factors for unknown conv '{unknown[0]}': made for another model")
    for name, s in factors.items():
        norm, conv = pairs[name]
        s = torch.as_tensor(s, dtype=conv.weight.dtype, device=conv.weight.device)
        if s.shape != (conv.in_channels,) or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
            raise CUNetError(f"equalization factors of '{name}' must be {conv.in_channels} positive numbers")
        norm.weight.div_(s)
        norm.bias.div_(s)
        conv.weight.mul_(s.view(1, -1, 1, 1))
    return out


@dataclass(frozen=True)
class EqualizationReport:
    alpha: float
    convs: int
    # median over convs of (largest channel range / median channel range) of the conv input
    spread_before: float
    spread_after: float

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "convs": self.convs, "median_channel_spread_before": self.spread_before,
                "median_channel_spread_after": self.spread_after}


def _spread(ranges: Mapping[str, torch.Tensor]) -> float:
    values = []
    for r in ranges.values():
        live = r[r > 0]
        if live.numel():
            values.append(float(live.max() / live.median()))
    return float(torch.tensor(values).median()) if values else 1.0


def equalize_activations(
    model: CUNet, batches: Iterable[torch.Tensor], alpha: float = DEFAULT_ALPHA, progress: bool = False,
    sharded: bool = False,
) -> tuple[CUNet, dict[str, torch.Tensor], EqualizationReport]:
    """(equalized copy of `model`, its factors, a report) from the calibration batches."""
    ranges = input_channel_ranges(model, batches, progress, sharded)
    factors = smoothing_factors(model, ranges, alpha)
    equalized = apply_equalization(model, factors)
    after = {n: r / factors[n] for n, r in ranges.items() if n in factors}
    return equalized, factors, EqualizationReport(alpha, len(factors), _spread(ranges), _spread(after))
