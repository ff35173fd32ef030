"""Calibration: observers and amax methods on known data, determinism, tying, scale files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cunet_optimize.errors import CUNetError
from cunet_optimize.models import CUNet, CUNetConfig
from cunet_optimize.quant import (
    CalibrationError,
    HistogramObserver,
    MaxObserver,
    activation_quantizers,
    activation_scales,
    apply_scales,
    calibrate,
    calibrate_weights,
    entropy_amax,
    load_scales,
    mse_amax,
    percentile_amax,
    quantize_model,
    save_scales,
    tie_amax,
    tied_groups,
)
from cunet_optimize.quant.calibrate import sample_stride

RNG = np.random.default_rng(0)


def tiny_model() -> CUNet:
    """A small, well-conditioned random CU-Net (see test_quant_qmodel.tiny_model)."""
    torch.manual_seed(0)
    m = CUNet(CUNetConfig(num_unets=2, order=1, num_classes=4, width=8, growth_rate=4))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.fill_(1.0)
            elif isinstance(mod, torch.nn.Conv2d):
                mod.weight.mul_(math.sqrt(3))
    return m.eval()


def batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 3, 64, 64, generator=g) for _ in range(n)]


# -- Observers and methods ------------------------------------------------------------


def test_max_observer_is_the_exact_max_of_abs():
    o = MaxObserver()
    o.update(torch.tensor([0.5, -3.25]))
    o.update(torch.tensor([2.0]))
    assert o.amax == 3.25


def test_histogram_growth_equals_binning_everything_at_once():
    a = torch.rand(10000, generator=torch.Generator().manual_seed(0))
    a[0] = 1.0  # range starts at exactly 1, then doubles twice to 4
    b = torch.rand(10000, generator=torch.Generator().manual_seed(1)) * 3.5
    o = HistogramObserver(2048)
    o.update(a)
    o.update(-b)  # |x| is what counts
    assert o.range == 4.0
    direct = torch.histc(torch.cat([a, b]), bins=2048, min=0.0, max=4.0).to(torch.int64).numpy()
    assert np.array_equal(o.hist, direct)
    assert o.amax == float(b.max())


def test_percentile_interpolates_inside_the_bin_by_hand():
    hist = np.array([10, 10, 0, 80])  # bins of width 1
    assert percentile_amax(hist, 1.0, 10.0) == 1.0  # the first bin holds exactly 10%
    assert percentile_amax(hist, 1.0, 50.0) == 3.375  # 30 of the last bin's 80 needed


def test_percentile_is_close_to_the_quantile():
    data = RNG.standard_normal(200_000)
    o = HistogramObserver()
    o.update(torch.from_numpy(data).float())
    for p in (99.0, 99.9, 99.99):
        expected = np.percentile(np.abs(data), p)
        assert o.compute_amax("percentile", percentile=p) == pytest.approx(expected, abs=2 * o.bin_width)


def _entropy_reference(hist, bin_width, levels=128):
    """TensorRT's entropy calibration written out step by step (slow, obvious)."""
    hist = np.asarray(hist, float)
    end = np.nonzero(hist)[0][-1] + 1
    best_i, best_kl = end, math.inf
    for i in range(levels, end + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        q = np.zeros(i)
        per = i // levels
        for j in range(levels):
            lo, hi = j * per, ((j + 1) * per if j < levels - 1 else i)
            seg = hist[lo:hi]
            filled = seg > 0
            if filled.any():
                q[lo:hi][filled] = seg.sum() / filled.sum()
        p, q = p / p.sum(), q / q.sum()
        q = np.where((p > 0) & (q == 0), 1e-10, q)
        kl = float(np.sum(p[p > 0] * np.log(p[p > 0] / q[p > 0])))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i * bin_width


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_follows_tensorrt_algorithm(seed):
    rng = np.random.default_rng(seed)
    hist = np.histogram(np.abs(rng.standard_t(3, 20_000)), bins=400)[0]
    hist[rng.integers(0, 400, 30)] = 0  # holes, as sparse tails have
    hist[-1] = 0
    hist[-2] = 3
    assert entropy_amax(hist, 0.01) == pytest.approx(_entropy_reference(hist, 0.01))


def test_mse_is_the_brute_force_minimum():
    hist = np.histogram(np.abs(RNG.laplace(size=20_000)), bins=300)[0].astype(float)
    w = 0.05
    centres = (np.arange(300) + 0.5) * w
    errors = []
    for i in range(1, 301):
        s = i * w / 127
        q = np.minimum(np.round(centres / s), 127) * s
        errors.append(((centres - q) ** 2 * hist).sum())
    assert mse_amax(hist, w) == pytest.approx((int(np.argmin(errors)) + 1) * w)


@pytest.mark.parametrize("method", ["entropy", "mse", "percentile"])
def test_clipping_methods_clip_heavy_tails_not_bounded_data(method):
    heavy = HistogramObserver()
    heavy.update(torch.from_numpy(RNG.standard_t(2, 200_000)).float())
    assert heavy.compute_amax(method) < 0.8 * heavy.amax
    flat = HistogramObserver()
    flat.update(torch.from_numpy(RNG.uniform(-1, 1, 200_000)).float())
    assert 0.9 * flat.amax < flat.compute_amax(method) <= flat.amax


# -- Bounded histogram samples (the fast path) versus every value ----------------------


def _conv_input_like(seed: int) -> torch.Tensor:
    """ReLU output whose channels have different ranges, as a conv input's are (4 M values)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(1, 32, 1, 1, generator=g))
    return torch.relu(torch.randn(8, 32, 128, 128, generator=g) * scale + 0.3 * scale)


def test_sample_stride_is_odd_and_keeps_the_bound():
    assert sample_stride(100, None) == 1 and sample_stride(100, 100) == 1
    for numel, bound in [(101, 100), (4 << 20, 1 << 18), (10**7, 12345)]:
        k = sample_stride(numel, bound)
        assert k % 2 == 1 and -(-numel // k) <= bound


def test_sampled_histogram_is_deterministic_and_close_to_the_exact_one():
    # Tolerances from measuring 4 draws of this data (1/17 of 16 M values binned): percentile
    # amax within 2.7 %, entropy identical, mse within 4.6 % (its error curve is flat near
    # the minimum). calibrate.HISTOGRAM_SAMPLES cites this test for the default bound.
    exact = HistogramObserver()
    fast, again = HistogramObserver(max_samples=1 << 18), HistogramObserver(max_samples=1 << 18)
    for seed in range(4):
        x = _conv_input_like(seed)
        for o in (exact, fast, again):
            o.update(x)
    assert fast.amax == exact.amax  # the max is always the whole tensor's
    assert np.array_equal(fast.hist, again.hist)
    assert fast.count < exact.count / 16
    for method, tolerance in [("percentile", 0.05), ("entropy", 1e-12), ("mse", 0.08)]:
        e = exact.compute_amax(method)
        assert fast.compute_amax(method) == pytest.approx(e, rel=tolerance), method


@pytest.mark.parametrize("method", ["max", "percentile"])
def test_fast_calibration_matches_the_exact_path_on_a_tiny_model(method):
    """max: identical even when every histogram would be sampled; histograms: identical
    while tensors fit the default bound (a tiny model's all do)."""
    model = tiny_model()
    exact = calibrate(quantize_model(model, "int8-untied"), batches(3), method, progress=False, max_samples=None)
    fast = calibrate(quantize_model(model, "int8-untied"), batches(3), method, progress=False)
    assert fast == exact
    if method == "max":
        assert calibrate(quantize_model(model, "int8-untied"), batches(3), method, progress=False,
                         max_samples=64) == exact


def test_observers_match_the_definition_of_max_abs():
    x = torch.randn(4, 5, 6, 7, generator=torch.Generator().manual_seed(3))
    o, h = MaxObserver(), HistogramObserver()
    o.update(x)
    h.update(x)
    assert o.amax == h.amax == float(x.abs().max())
    relu = torch.relu(x)  # non-negative input skips the |x| copy: same histogram
    h1, h2 = HistogramObserver(), HistogramObserver()
    h1.update(relu)
    h2.update(relu.abs() + 0.0)
    assert np.array_equal(h1.hist, h2.hist)


# -- calibrate() on a quantized CU-Net ------------------------------------------------


def test_max_calibration_of_the_image_input_is_the_image_max():
    q = quantize_model(tiny_model(), "int8-untied")
    data = batches()
    amax = calibrate(q, data, "max", progress=False)
    assert amax["features.conv0.input"] == max(float(b.max()) for b in data)
    expected_scale = np.float32(amax["features.conv0.input"]) / np.float32(127)
    assert float(q.features.conv0.input_quantizer.scale) == expected_scale


def test_calibration_is_deterministic():
    model = tiny_model()
    results = []
    for _ in range(2):
        q = quantize_model(model, "int8")
        results.append((calibrate(q, batches(), "entropy", progress=False), activation_scales(q)))
    assert results[0] == results[1]
    assert len(results[0][0]) == len(activation_quantizers(quantize_model(model, "int8")))


def test_tied_quantizers_share_one_scale_holding_the_group_max():
    q = quantize_model(tiny_model(), "int8")
    groups = tied_groups(q)
    assert groups
    fake = {name: float(k + 1) for k, name in enumerate(activation_quantizers(q))}
    tied = tie_amax(q, fake)
    grouped = {n for g in groups for n in g}
    for g in groups:
        assert {tied[n] for n in g} == {max(fake[n] for n in g)}
    assert all(tied[n] == fake[n] for n in fake if n not in grouped)

    amax = calibrate(q, batches(), "percentile", progress=False)
    quantizers = activation_quantizers(q)
    for g in groups:
        first = quantizers[g[0]].scale
        assert all(quantizers[n].scale is first for n in g)
        assert len({amax[n] for n in g}) == 1


def test_scale_file_round_trip_reproduces_the_model(tmp_path):
    model = tiny_model()
    q = quantize_model(model, "int8")
    calibrate(q, batches(), "mse", progress=False)
    path = save_scales(tmp_path / "calib" / "scales.json", activation_scales(q), "mse")
    loaded = load_scales(path)
    assert loaded.method == "mse" and loaded.scales == activation_scales(q)
    fresh = quantize_model(model, "int8")
    apply_scales(fresh, loaded.scales)
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(q.eval()(x), fresh.eval()(x)))


def test_apply_scales_rejects_unknown_missing_and_untied_values():
    q = quantize_model(tiny_model(), "int8")
    names = list(activation_quantizers(q))
    good = {n: 0.01 for n in names}
    with pytest.raises(CalibrationError, match="unknown quantizer 'nope'"):
        apply_scales(q, {**good, "nope": 0.1})
    with pytest.raises(CalibrationError, match="no scale for quantizer"):
        apply_scales(q, {n: 0.01 for n in names[1:]})
    group = tied_groups(q)[0]
    with pytest.raises(CalibrationError, match="tied quantizers"):
        apply_scales(q, {**good, group[1]: 0.02})


def test_calibration_errors_are_user_errors():
    q = quantize_model(tiny_model(), "int8")
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(q, [], "max", progress=False)
    with pytest.raises(CalibrationError, match="batch 0"):
        calibrate(q, [torch.rand(2, 1, 64, 64)], "max", progress=False)
    with pytest.raises(CalibrationError, match="unknown calibration method"):
        calibrate(q, batches(), "kl", progress=False)
    assert issubclass(CalibrationError, CUNetError)


def test_mse_weight_scales_reduce_int4_weight_error_and_stay_fixed():
    q = quantize_model(tiny_model(), "int4-pc")
    conv = q.hg.down_blocks[0].layers[0].conv2
    wq = conv.weight_quantizer
    before = float(((wq.eval()(conv.weight) - conv.weight) ** 2).sum().detach())
    calibrate_weights(q, "mse")
    after = float(((wq.eval()(conv.weight) - conv.weight) ** 2).sum().detach())
    assert after < before and not wq.dynamic
    kept = wq.scale.detach().clone()
    with torch.no_grad():
        wq.train()(conv.weight)  # a training step would refresh a dynamic scale here
    assert torch.equal(wq.scale.detach(), kept)
    calibrate_weights(q, "max")
    assert wq.dynamic
