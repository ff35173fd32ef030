"""Post-training calibration of activation scales, and the scale file.

`calibrate(qmodel, batches, method)` runs the model in float (quantizers off, eval
mode) over the calibration batches, lets one observer per activation quantizer
collect |x|, turns each observer into an amax with the chosen method, and sets
scale = amax / 127:

- max: the largest |x| seen.
- percentile: the p-th percentile of |x| (default 99.99), read off the histogram
  with linear interpolation inside the bin.
- entropy: TensorRT's KL-divergence calibration (EntropyCalibration2): for each
  threshold bin i from 128 to the histogram's end, P = the first i bins with the
  outliers added to bin i-1; Q = the same i bins merged into 128 levels and spread
  back evenly over each level's non-empty bins; amax = i * bin width of the i
  minimising KL(P || Q).
- mse: the amax (a histogram bin edge) minimising the expected squared error of
  int8 quantization over the histogram (bin centres stand for their values).

Histograms have 2048 bins over [0, R]; R starts at the first batch's max and
doubles (merging bin pairs, exactly) whenever a later batch exceeds it, so one pass
suffices and the result only depends on the batches and their order. Each tensor
contributes a deterministic strided sample of at most HISTOGRAM_SAMPLES values per
batch (max_samples=None: all of them); the max is always taken over every value.

Sharded over ranks (torchrun; `calibrate(..., sharded=True)`): each rank observes its
part of every global batch; a histogram observer takes the batch's max over all ranks
before binning (so every rank's range doubles at the same batch), and the observers'
counts and maxima are summed/maxed at the end (`merge_observers`): the scales equal
those of one process seeing the whole batches, exactly. A sampled tensor is sampled as
one process would: the stride comes from the global batch's size and each rank starts
at its part's offset in the global flat order, so the ranks' samples are, together, the
one process's sample.

Tied groups (quant.qmodel, `tie_concat_scales`): every member's amax is computed
from its own statistics, then the group takes the largest: tying never clips a
member more than its own calibration would.

Images of zero range (every pixel the same value, e.g. an all-black set) are refused
before any scale is set: they give the input quantizer a zero amax (a 1e-10 scale) and
every later activation the statistics of one constant image. An internal activation
whose amax is 0 is a dead channel, not bad data, and keeps the smallest scale.

Weight scales are max|w| per output channel (or block), set by `quantize_model` and
refreshed as weights change; `calibrate_weights(qmodel, "mse")` optionally searches
a clipping ratio per channel/block instead (useful for INT4).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cunet_optimize import distributed as _distributed
from cunet_optimize.atomic import write_atomic
from cunet_optimize.errors import CUNetError
from cunet_optimize.quant.equalize import EqualizationReport, equalize_activations
from cunet_optimize.quant.qmodel import (
    QuantConv2d,
    activation_quantizers,
    named_quantizers,
    quantize_model,
    refresh_dynamic_weight_scales,
    requantization_points,
)
from cunet_optimize.quant.scheme import INT, QuantScheme
from cunet_optimize.quant.quantizers import BlockQuantizer, IntQuantizer

log = logging.getLogger(__name__)

METHODS = ("max", "percentile", "entropy", "mse")
DEFAULT_PERCENTILE = 99.99
NUM_BINS = 2048
SCALE_FILE_FORMAT = "cunet-optimize-scales"
# Values each histogram bins per tensor and batch (HistogramObserver.max_samples). The
# authors' N=8 face model has 264 histograms over large activations, and binning every value
# (torch.histc) is a sizeable share of a calibration forward; sampled, percentile 99.99 still
# rests on ~800 values above it over 8 batches (2^20 x 8 x 1e-4). How close the sampled amax
# stays to the exact histogram's, per method, is asserted in tests/test_quant_calibrate.py
# (test_sampled_histogram_is_deterministic_and_close_to_the_exact_one).
HISTOGRAM_SAMPLES = 1 << 20


class CalibrationError(CUNetError):
    """Calibration that cannot proceed: empty set, bad batch, unknown method, bad file."""


# --------------------------------------------------------------------------------------
# Observers


def abs_max(x: torch.Tensor) -> float:
    """max |x| in one read of the tensor (no |x| copy)."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x.detach())
    return max(-float(lo), float(hi))


def sample_stride(numel: int, max_samples: int | None) -> int:
    """1 if `numel` values fit in `max_samples` (None: no bound), else the smallest odd k
    with ceil(numel / k) <= max_samples."""
    if max_samples is None or numel <= max_samples:
        return 1
    k = -(-numel // max_samples)
    return k if k % 2 else k + 1


class MaxObserver:
    """The largest |x| seen."""

    def __init__(self) -> None:
        self.amax = 0.0
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        if x.numel():  # distributed: a rank's part of a small batch may be empty
            self.amax = max(self.amax, abs_max(x))
        self.count += x.numel()


class HistogramObserver:
    """A histogram of |x| with `num_bins` bins over [0, R], R doubling as needed.

    `max_samples` bounds what each update bins: a larger tensor contributes every
    k-th element of its flat (NCHW) order, k the smallest odd stride that fits (odd so
    the picks walk across columns, rows and channels instead of repeating a few
    columns). The sample is deterministic; `amax` is always the whole tensor's.
    None bins every element (the exact histogram).
    """

    def __init__(self, num_bins: int = NUM_BINS, max_samples: int | None = None,
                 global_batch: Callable[[float, int], tuple[float, int, int]] | None = None) -> None:
        if num_bins < 2 or num_bins % 2:
            raise CalibrationError(f"histogram: num_bins must be even and >= 2, got {num_bins}")
        if max_samples is not None and max_samples < 1:
            raise CalibrationError(f"histogram: max_samples must be >= 1 or None, got {max_samples}")
        self.num_bins = num_bins
        self.max_samples = max_samples
        self.hist = np.zeros(num_bins, dtype=np.int64)
        self.range = 0.0
        self.amax = 0.0
        self.zeros_before_range = 0  # values seen while every value so far was 0
        self.at_top = 0  # values equal to `range`: in the last bin, which is closed above
        self.count = 0
        # distributed calibration, x being this rank's part of the global batch: (this part's
        # max, size) -> (the global batch's max, size, this part's offset in its flat order)
        self.global_batch = global_batch

    @property
    def bin_width(self) -> float:
        return self.range / self.num_bins

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        lo, hi = torch.aminmax(x) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
        m = max(-float(lo), float(hi))
        a = x.flatten()
        total, offset = a.numel(), 0
        if self.global_batch is not None:
            m, total, offset = self.global_batch(m, a.numel())
        self.amax = max(self.amax, m)
        stride = sample_stride(total, self.max_samples)
        if stride > 1:  # the global sample's elements that fall in this part
            a = a[(-offset) % stride::stride]
        # Conv inputs are ReLU outputs: |x| is x, and skipping abs saves a copy of the tensor.
        a = (a if float(lo) >= 0 else a.abs()).float()
        self.count += a.numel()
        if m == 0.0 and self.range == 0.0:
            self.zeros_before_range += a.numel()
            return
        if self.range == 0.0:
            self.range = m
            self.hist[0] += self.zeros_before_range
        half = self.num_bins // 2
        while m > self.range:
            self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(axis=1), np.zeros(half, np.int64)])
            # Values equal to the old range now open bin `half` (bins are [lo, hi) but the last).
            self.hist[half - 1] -= self.at_top
            self.hist[half] += self.at_top
            self.at_top = 0
            self.range *= 2.0
        # Binned where the tensor lives; counts are integers (exact in float32 below 2^24).
        counts = torch.histc(a, bins=self.num_bins, min=0.0, max=self.range)
        self.hist += counts.to(torch.int64).cpu().numpy()
        if m == self.range:  # only then can a value sit on the top edge: skip the full compare otherwise
            self.at_top += int((a == self.range).sum())

    def compute_amax(self, method: str, *, percentile: float = DEFAULT_PERCENTILE, num_bits: int = 8) -> float:
        if self.range == 0.0:
            return 0.0
        hist = self.hist.astype(np.float64)
        if method == "percentile":
            amax = percentile_amax(hist, self.bin_width, percentile)
        elif method == "entropy":
            amax = entropy_amax(hist, self.bin_width, num_levels=2 ** (num_bits - 1))
        elif method == "mse":
            amax = mse_amax(hist, self.bin_width, qmax=2 ** (num_bits - 1) - 1)
        else:
            raise CalibrationError(f"histogram observer: unknown method '{method}'")
        return min(amax, self.amax)


# --------------------------------------------------------------------------------------
# amax from a histogram of |x| (pure functions; bins of width `bin_width` from 0)


def percentile_amax(hist: np.ndarray, bin_width: float, percentile: float) -> float:
    """The value below which `percentile` % of the histogram's mass lies."""
    if not 0.0 < percentile <= 100.0:
        raise CalibrationError(f"percentile must be in (0, 100], got {percentile}")
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    cdf = np.cumsum(hist)
    target = percentile / 100.0 * total
    b = int(np.searchsorted(cdf, target, side="left"))
    b = min(b, len(hist) - 1)
    before = cdf[b - 1] if b > 0 else 0.0
    frac = (target - before) / hist[b] if hist[b] > 0 else 1.0
    return (b + min(max(frac, 0.0), 1.0)) * bin_width


# KL(P || Q) where Q has a hole (P > 0, Q = 0: only possible in the last bin, which
# holds the outliers): the hole's probability is taken as this, as smoothing does.
_HOLE_PROBABILITY = 1e-10


def entropy_amax(hist: np.ndarray, bin_width: float, num_levels: int = 128, start_bin: int | None = None) -> float:
    """TensorRT's entropy calibration: the threshold minimising KL(reference || quantized).

    For each candidate i (start_bin = num_levels .. last non-empty bin + 1): P = bins
    [0, i) with the outliers (bins >= i) added to bin i-1; Q = bins [0, i) merged into
    `num_levels` levels of i // num_levels bins (the last level takes the rest), each
    level's mass spread evenly over its non-empty bins; both normalised. Returns
    i * bin_width of the smallest KL(P || Q). Evaluated for all i at once with prefix
    sums (O(levels) per candidate).
    """
    h = np.asarray(hist, dtype=np.float64)
    nonzero = np.nonzero(h)[0]
    if len(nonzero) == 0:
        return 0.0
    end = int(nonzero[-1]) + 1  # bins past the last non-empty one change nothing
    start = num_levels if start_bin is None else max(start_bin, num_levels)
    if end <= start:
        return end * bin_width
    total = h.sum()
    zero = np.zeros(1)
    mass_before = np.concatenate([zero, np.cumsum(h)])  # mass of bins [0, k)
    filled_before = np.concatenate([zero, np.cumsum(h > 0)])  # non-empty bins in [0, k)
    hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    hlogh_before = np.concatenate([zero, np.cumsum(hlogh)])

    i = np.arange(start, end + 1)[:, None]  # candidates, as a column
    width = i // num_levels
    edges = np.minimum(np.arange(num_levels + 1)[None, :] * width, i)
    edges[:, -1] = i[:, 0]
    level_mass = mass_before[edges[:, 1:]] - mass_before[edges[:, :-1]]
    level_filled = filled_before[edges[:, 1:]] - filled_before[edges[:, :-1]]
    kept = mass_before[i[:, 0]]  # mass inside the threshold: the sum of Q
    outliers = total - kept
    last = h[i[:, 0] - 1]
    p_last = last + outliers
    # log of Q's per-bin value (before normalisation) in each level
    log_level = np.log(np.where(level_filled > 0, level_mass, 1.0) / np.maximum(level_filled, 1.0))
    # Mass of P that falls in each level, except bin i-1 (handled apart)
    p_in_level = level_mass.copy()
    p_in_level[:, -1] -= last
    cross = (p_in_level * log_level).sum(axis=1) - (total - p_last) * np.log(np.maximum(kept, 1e-300))
    q_last_log = np.where(last > 0, log_level[:, -1] - np.log(np.maximum(kept, 1e-300)), np.log(_HOLE_PROBABILITY))
    cross += np.where(p_last > 0, p_last * q_last_log, 0.0)
    p_log_p = hlogh_before[i[:, 0] - 1] + np.where(p_last > 0, p_last * np.log(np.maximum(p_last, 1e-300)), 0.0)
    kl = (p_log_p - cross) / total - np.log(total)
    kl = np.where(kept > 0, kl, np.inf)
    best = int(np.argmin(kl))  # first minimum: the smallest such threshold
    return float(i[best, 0]) * bin_width


def mse_amax(hist: np.ndarray, bin_width: float, qmax: int = 127, start_bin: int = 1) -> float:
    """The bin edge amax minimising sum_b hist[b] * (c_b - Q(c_b))^2, c_b the bin centres."""
    h = np.asarray(hist, dtype=np.float64)
    nonzero = np.nonzero(h)[0]
    if len(nonzero) == 0:
        return 0.0
    end = int(nonzero[-1]) + 1
    centres = (nonzero + 0.5) * bin_width  # empty bins add no error
    counts = h[nonzero]
    best_amax, best_err = end * bin_width, math.inf
    chunk = max(1, 2**20 // len(nonzero))
    candidates = np.arange(max(1, start_bin), end + 1)
    for lo in range(0, len(candidates), chunk):
        amax = candidates[lo : lo + chunk, None] * bin_width
        scale = amax / qmax
        q = np.minimum(np.round(centres[None, :] / scale), qmax) * scale
        err = ((centres[None, :] - q) ** 2 * counts[None, :]).sum(axis=1)
        k = int(np.argmin(err))
        if err[k] < best_err:
            best_err, best_amax = float(err[k]), float(amax[k, 0])
    return best_amax


# --------------------------------------------------------------------------------------
# Calibration


def _as_images(batch, index: int) -> torch.Tensor:
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if isinstance(batch, Mapping) and "image" in batch:
        batch = batch["image"]
    if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or batch.shape[1] != 3:
        what = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise CalibrationError(
            f"calibration batch {index}: expected images Bx3xHxW, got {what}; "
            "pass image tensors (or (images, ...) tuples)"
        )
    return batch


def _known_length(batches, limit: int | None) -> int | None:
    """How many batches a progress bar can expect (None when the iterable cannot say)."""
    try:
        n = len(batches)
    except TypeError:
        return limit
    return n if limit is None else min(n, limit)


def calibrate(
    qmodel: nn.Module,
    batches: Iterable,
    method: str = "max",
    progress: bool = True,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    num_bins: int = NUM_BINS,
    max_batches: int | None = None,
    max_samples: int | None = HISTOGRAM_SAMPLES,
    sharded: bool = False,
) -> dict[str, float]:
    """Calibrate every INT8 activation quantizer of `qmodel`; return {name: amax}.

    `sharded`: `batches` are this rank's parts of the global batches (every rank passes the
    same number of batches); the statistics are combined over ranks (`merge_observers`).

    The scales (amax / 127) are applied to the model; tied groups get their largest
    member amax (the returned dict holds that shared amax for each member). Weight
    scales are refreshed from the weights. The model's train/eval mode is restored.
    `max_samples` bounds the values each histogram bins per tensor and batch (see
    HistogramObserver; None: every value).
    """
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method '{method}'; use one of {', '.join(METHODS)}")
    if method == "percentile" and not 0.0 < percentile <= 100.0:
        raise CalibrationError(f"percentile must be in (0, 100], got {percentile}")
    quantizers = activation_quantizers(qmodel)
    if not quantizers:
        log.info("calibrate: no integer activation quantizers; nothing to calibrate")
        return {}
    global_batch = _global_batch if sharded else None
    observers = {n: MaxObserver() if method == "max" else HistogramObserver(num_bins, max_samples, global_batch)
                 for n in quantizers}
    seen, pixels = _observe_float_network(qmodel, quantizers, observers, batches, method, progress, max_batches)
    if sharded:
        merge_observers(observers)
        pixels = _distributed.all_reduce(pixels * torch.tensor([-1.0, 1.0], dtype=torch.float64), "max") \
            * torch.tensor([-1.0, 1.0], dtype=torch.float64)
    _check_observed(observers, seen, pixels)
    amax = _observed_amax(observers, method, percentile, progress)
    amax = tie_amax(qmodel, amax)
    for name, q in quantizers.items():
        q.set_amax(amax[name])
    refresh_dynamic_weight_scales(qmodel)
    log.info(
        "calibrated %d activation quantizers with %s over %d batches; %d requantization points",
        len(amax), method, seen, requantization_points(qmodel),
    )
    return amax


def _observe_float_network(qmodel: nn.Module, quantizers: Mapping[str, nn.Module],
                           observers: Mapping[str, MaxObserver | HistogramObserver], batches: Iterable,
                           method: str, progress: bool, max_batches: int | None) -> tuple[int, torch.Tensor]:
    """Run the batches through the float network, each activation quantizer's input feeding
    its observer; the quantizers' switches and the train/eval mode are restored after.
    Returns (batches run, the images' (min, max) as float64)."""
    handles = []
    enabled = {id(q): q.enabled for _, q in named_quantizers(qmodel)}

    def observe(name):
        def hook(module, args):
            observers[name].update(args[0])

        return hook

    for name, q in quantizers.items():
        handles.append(q.register_forward_pre_hook(observe(name)))
    was_training = qmodel.training
    try:
        # Observe the float network (as TensorRT calibrates): every quantizer off; the
        # pre-hooks still see each activation quantizer's input.
        for _, q in named_quantizers(qmodel):
            q.enabled = False
        qmodel.eval()
        return _run_batches(qmodel, batches, method, progress, max_batches)
    finally:
        for h in handles:
            h.remove()
        for _, q in named_quantizers(qmodel):
            q.enabled = enabled[id(q)]
        qmodel.train(was_training)


def _run_batches(qmodel: nn.Module, batches: Iterable, method: str, progress: bool,
                 max_batches: int | None) -> tuple[int, torch.Tensor]:
    """Forward the first `max_batches` batches (None: all); (batches run, the images' (min, max))."""
    param = next(qmodel.parameters())
    seen = 0
    pixels = torch.tensor([math.inf, -math.inf], dtype=torch.float64)  # the images' (min, max)
    iterator = batches
    if progress:
        total = _known_length(batches, max_batches)
        iterator = tqdm(batches, desc=f"calibrating ({method})", unit="batch", total=total)
    with torch.inference_mode():
        for i, batch in enumerate(iterator):
            if max_batches is not None and i >= max_batches:
                break
            images = _as_images(batch, i).to(device=param.device, dtype=param.dtype)
            if images.numel():  # a rank's part of a small sharded batch may be empty
                low, high = torch.aminmax(images)
                pixels = torch.stack([torch.minimum(pixels[0], low.double().cpu()),
                                      torch.maximum(pixels[1], high.double().cpu())])
            qmodel(images)
            seen += 1
    return seen, pixels


def _check_observed(observers: Mapping[str, MaxObserver | HistogramObserver], seen: int,
                    pixels: torch.Tensor) -> None:
    """Refuse what would set a meaningless scale: no batch, images of zero range, a
    quantizer that saw nothing."""
    if seen == 0:
        raise CalibrationError("calibration set is empty: no batch was given; pass at least one image batch")
    low, high = float(pixels[0]), float(pixels[1])
    if low == high:  # the network input's range, not an internal activation's (a dead channel is fine)
        raise CalibrationError(
            f"calibration images have zero range (every pixel of the {seen} batch(es) is {high:g}: blank or "
            "constant images) and would give the input a zero scale; calibrate on real images (check the "
            "calibration data folder and its split)")
    unseen = [n for n, o in observers.items() if o.count == 0]
    if unseen:
        raise CalibrationError(f"quantizer '{unseen[0]}' saw no data during calibration; is it on the forward path?")


def post_training_quantize(
    model: nn.Module,
    scheme: QuantScheme,
    batches: Iterable,
    method: str = "percentile",
    equalize_alpha: float | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, torch.Tensor], EqualizationReport | None]:
    """PTQ in one call: activation equalization (INT8 activations only; alpha None = off),
    `quantize_model`, `calibrate`. Returns (qmodel, equalization factors, report)."""
    batches = list(batches)  # equalization and calibration both walk them
    sharded = _distributed.is_active()
    if sharded:  # this rank's part of every batch; the statistics are merged over ranks
        batches = [_distributed.shard(b) for b in batches]
    factors: dict[str, torch.Tensor] = {}
    report = None
    if equalize_alpha is not None and scheme.activation == INT:
        model, factors, report = equalize_activations(model, batches, equalize_alpha, progress, sharded=sharded)
    qmodel = quantize_model(model, scheme)
    calibrate(qmodel, batches, method, progress=progress and _distributed.is_main(), sharded=sharded)
    return qmodel, factors, report


def _observed_amax(
    observers: Mapping[str, MaxObserver | HistogramObserver], method: str, percentile: float, progress: bool = False
) -> dict[str, float]:
    """amax per observer; equal histograms (one tensor feeding several concats) computed once."""
    done: dict[bytes, float] = {}
    out = {}
    items = observers.items()
    if progress and method != "max":
        items = tqdm(items, desc=f"{method} thresholds", unit="tensor", total=len(observers))
    for name, o in items:
        if isinstance(o, MaxObserver):
            out[name] = o.amax
            continue
        key = hashlib.sha1(o.hist.tobytes() + struct.pack("<dd", o.range, o.amax)).digest()
        if key not in done:
            done[key] = o.compute_amax(method, percentile=percentile)
        out[name] = done[key]
    return out


# --------------------------------------------------------------------------------------
# Distributed calibration: statistics of rank-sharded batches combined over ranks


def _global_batch(m: float, numel: int) -> tuple[float, int, int]:
    """(max over ranks, global size, this rank's offset) of a batch tensor split over ranks
    in rank order: one max-reduce of [max_0, ..., max_N-1, size_0, ..., size_N-1]."""
    world, r = _distributed.world_size(), _distributed.rank()
    both = torch.zeros(2 * world, dtype=torch.float64)  # sizes < 2**53: exact in float64
    both[r], both[world + r] = m, numel
    both = _distributed.all_reduce(both, "max")
    sizes = both[world:].to(torch.int64)
    return float(both[:world].max()), int(sizes.sum()), int(sizes[:r].sum())


def merge_observers(observers: Mapping[str, MaxObserver | HistogramObserver]) -> None:
    """Combine every rank's observers in place (counts summed, maxima maxed), on every rank.

    Histogram bins are exact: all ranks' ranges doubled at the same batches (the batch max
    was reduced before binning), and merging bin pairs is linear, so the summed counts are
    the counts of one process that saw every rank's images.
    """
    if not _distributed.is_active():
        return
    names = sorted(observers)
    amax = torch.tensor([observers[n].amax for n in names], dtype=torch.float64)
    amax = _distributed.all_reduce(amax, "max")
    counts = [[observers[n].count] for n in names]
    hists = [n for n in names if isinstance(observers[n], HistogramObserver)]
    ranges = torch.tensor([observers[n].range for n in hists], dtype=torch.float64)
    if not torch.equal(_distributed.all_reduce(ranges, "max"), _distributed.all_reduce(ranges, "min")):
        raise CalibrationError("histogram ranges differ between ranks; every rank must observe its part "
                               "of the same global batches")
    counts = torch.tensor(counts, dtype=torch.int64)
    counts = _distributed.all_reduce(counts, "sum")
    if hists:
        packed = torch.from_numpy(np.stack([np.concatenate(
            [observers[n].hist, [observers[n].zeros_before_range, observers[n].at_top]]) for n in hists]))
        packed = _distributed.all_reduce(packed, "sum").numpy()
        for n, row in zip(hists, packed):
            o = observers[n]
            o.hist, o.zeros_before_range, o.at_top = row[:-2].copy(), int(row[-2]), int(row[-1])
    for i, n in enumerate(names):
        observers[n].amax = float(amax[i])
        observers[n].count = int(counts[i, 0])


def tie_amax(qmodel: nn.Module, amax: Mapping[str, float]) -> dict[str, float]:
    """Give every member of a tied group (quantizers sharing one scale) the group's largest amax."""
    out = dict(amax)
    groups: dict[int, list[str]] = {}
    for name, q in activation_quantizers(qmodel).items():
        if name in out:
            groups.setdefault(id(q.scale), []).append(name)
    for names in groups.values():
        top = max(out[n] for n in names)
        for n in names:
            out[n] = top
    return out


def _weight_mse_amax(blocks: torch.Tensor, qmax: int, ratios: torch.Tensor) -> torch.Tensor:
    """Per row of `blocks` ([R, n] weights), the clipping amax (ratio * max|w|) with least MSE."""
    peak = blocks.abs().amax(dim=1).clamp_min(1e-12)
    best_err = torch.full_like(peak, math.inf)
    best = peak.clone()
    for r in ratios.tolist():
        amax = peak * r
        scale = (amax / qmax)[:, None]
        q = torch.clamp(torch.round(blocks / scale), -qmax, qmax) * scale
        err = ((blocks - q) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, amax, best)
    return best


@torch.no_grad()
def calibrate_weights(qmodel: nn.Module, method: str = "max", num_ratios: int = 100) -> None:
    """Weight scales: "max" (max|w|, dynamic: follows the weights in training) or "mse"
    (clip ratio in [0.5, 1] per channel/block minimising the weights' squared error;
    fixed afterwards, persisted with the model's state)."""
    if method not in ("max", "mse"):
        raise CalibrationError(f"weight calibration method must be 'max' or 'mse', got '{method}'")
    ratios = torch.linspace(0.5, 1.0, num_ratios)
    for m in qmodel.modules():
        if not isinstance(m, QuantConv2d):
            continue
        wq = m.weight_quantizer
        if not isinstance(wq, (IntQuantizer, BlockQuantizer)):
            continue
        w = m.weight.detach().float()
        if method == "max":
            wq.set_amax(wq.amax, fixed=False)
            wq.reset_from_weight(w)
            continue
        if isinstance(wq, BlockQuantizer):
            blocks = wq.blocks(w)  # [O, nb, B, *k]: rows = (o, block, kernel position)
            rows = blocks.movedim(2, -1).reshape(-1, wq.block_size)
            amax = _weight_mse_amax(rows, wq.qmax, ratios).reshape(wq.scale.shape)
        else:
            amax = _weight_mse_amax(w.flatten(1), wq.qmax, ratios)
        wq.set_amax(amax, fixed=True)


# --------------------------------------------------------------------------------------
# Scale files


@dataclass(frozen=True)
class ScaleFile:
    """Activation scales keyed by quantizer name, and how they were calibrated."""

    method: str
    scales: dict[str, float]
    # the activation equalization the scales were calibrated after (None: none)
    equalization: dict | None = None


def activation_scales(qmodel: nn.Module) -> dict[str, float]:
    """{quantizer name: scale} of every calibrated activation quantizer (float32 values)."""
    return {n: float(q.scale.detach()) for n, q in activation_quantizers(qmodel).items() if q.calibrated}


def apply_scales(qmodel: nn.Module, scales: Mapping[str, float]) -> None:
    """Set activation scales by name; every activation quantizer needs one, tied ones equal."""
    quantizers = activation_quantizers(qmodel)
    unknown = sorted(set(scales) - set(quantizers))
    if unknown:
        raise CalibrationError(
            f"scale for unknown quantizer '{unknown[0]}': the scales were made for another model or scheme"
        )
    missing = [n for n in quantizers if n not in scales]
    if missing:
        raise CalibrationError(f"no scale for quantizer '{missing[0]}' ({len(missing)} missing); recalibrate")
    by_scale: dict[int, str] = {}
    for name, q in quantizers.items():
        first = by_scale.setdefault(id(q.scale), name)
        if scales[first] != scales[name]:
            raise CalibrationError(
                f"tied quantizers '{first}' and '{name}' have different scales ({scales[first]} vs {scales[name]})"
            )
    with torch.no_grad():
        for name, q in quantizers.items():
            value = float(scales[name])
            if not math.isfinite(value) or value <= 0:
                raise CalibrationError(f"scale of '{name}' is {value}; scales must be positive and finite")
            q.scale.fill_(value)


def save_scales(path: str | os.PathLike, scales: Mapping[str, float], method: str, **extra) -> Path:
    """Write {"format", "method", "scales": {name: scale}} (+ extra fields) atomically.

    Floats are written with Python's shortest round-trip repr, so reading gives the
    same float32 values back.
    """
    path = Path(path)
    doc = {"format": SCALE_FILE_FORMAT, "method": method, **extra}
    doc["scales"] = {k: float(scales[k]) for k in sorted(scales)}
    write_atomic(path, json.dumps(doc, indent=1) + "\n")
    return path


def load_scales(path: str | os.PathLike) -> ScaleFile:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such scale file") from None
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path}: not a JSON scale file ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("scales"), dict) or "method" not in doc:
        raise CalibrationError(f"{path}: a scale file needs 'method' and 'scales' fields")
    try:
        scales = {str(k): float(v) for k, v in doc["scales"].items()}
    except (TypeError, ValueError):
        raise CalibrationError(f"{path}: every scale must be a number") from None
    return ScaleFile(method=str(doc["method"]), scales=scales, equalization=doc.get("equalization"))
