"""Landmark metrics on hand-computed cases (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cunet_optimize.errors import CUNetError
from cunet_optimize.metrics import auc, ced_curve, face_metrics, failure_rate, nme, pckh, pose_metrics


def _face_gt() -> np.ndarray:
    """68 points on a 17 x 4 grid (x = 2*(i % 17), y = 3*(i // 17)), then the eye points placed by hand."""
    i = np.arange(68)
    gt = np.stack([2.0 * (i % 17), 3.0 * (i // 17)], axis=-1)
    gt[36] = (10.0, 20.0)
    gt[45] = (40.0, 60.0)  # inter-ocular = |(30, 40)| = 50
    return gt


def test_nme_inter_ocular_hand_computed():
    gt = _face_gt()
    pred_a = gt + (3.0, 4.0)  # every point off by |(3, 4)| = 5 -> 5 / 50 = 0.1
    pred_b = gt.copy()
    pred_b[:17] += (6.0, 8.0)  # 17 points off by 10 -> mean 17*10/68 = 2.5 -> 2.5 / 50 = 0.05
    got = nme(np.stack([pred_a, pred_b]), np.stack([gt, gt]))
    np.testing.assert_allclose(got, [0.1, 0.05])


def test_nme_inter_pupil_hand_computed():
    gt = _face_gt()
    # left eye 36-41 at x in {0, 2, 4}, y in {0, 6}: centre (2, 3); right eye the same +24 in x: centre (26, 3)
    eye = np.array([(0, 0), (2, 0), (4, 0), (0, 6), (2, 6), (4, 6)], dtype=float)
    gt[36:42] = eye
    gt[42:48] = eye + (24.0, 0.0)  # inter-pupil = 24
    pred = gt + (3.0, 4.0)  # error 5 everywhere -> 5 / 24
    np.testing.assert_allclose(nme(pred[None], gt[None], "inter_pupil"), [5.0 / 24.0])


def test_nme_box_hand_computed():
    # gt on a 17 x 4 grid: box x in [0, 32], y in [0, 8] -> sqrt(32 * 8) = 16
    i = np.arange(68)
    gt = np.stack([2.0 * (i % 17), 2.0 * (i // 17) * 8 / 6], axis=-1)
    pred = gt + (0.6, 0.8)  # error 1 -> 1 / 16
    np.testing.assert_allclose(nme(pred[None], gt[None], "box"), [1.0 / 16.0])


def test_nme_explicit_normalizer_and_errors():
    gt = np.zeros((2, 3, 2))
    pred = gt + (0.0, 2.0)  # error 2
    np.testing.assert_allclose(nme(pred, gt, np.array([4.0, 8.0])), [0.5, 0.25])
    with pytest.raises(CUNetError, match="68-point"):
        nme(pred, gt, "inter_ocular")
    with pytest.raises(CUNetError, match="unknown NME normaliser"):
        nme(pred, gt, "eyes")


def test_failure_rate_hand_computed():
    nmes = [0.01, 0.05, 0.08, 0.09, 0.2]
    assert failure_rate(nmes, 0.08) == pytest.approx(2 / 5)  # 0.09, 0.2 (0.08 itself is not > 0.08)
    assert failure_rate(nmes, 0.10) == pytest.approx(1 / 5)  # 0.2
    assert failure_rate([0.01, float("nan")], 0.08) == pytest.approx(0.5)  # a NaN image is a failure


def test_ced_curve_hand_computed():
    # thresholds linspace(0, .04, 5) = 0, .01, .02, .03, .04; fraction with NME < t
    t, frac = ced_curve([0.015, 0.035], max_threshold=0.04, steps=5)
    np.testing.assert_allclose(t, [0.0, 0.01, 0.02, 0.03, 0.04])
    np.testing.assert_allclose(frac, [0.0, 0.0, 0.5, 0.5, 1.0])


def test_auc_hand_computed():
    # one image at 0.04; t = 0, .02, .04, .06, .08 -> CED 0, 0, 0, 1, 1 (0.04 < 0.04 is false)
    # trapezoids: 0 + 0 + (0+1)/2*.02 + 1*.02 = .03 -> / .08 = 0.375
    assert auc([0.04], max_threshold=0.08, steps=5) == pytest.approx(0.375)
    # perfect predictions: CED 0 at t=0 then 1: area = .08 - dt/2, dt = .08/1999 -> 1 - 1/3998
    assert auc([0.0, 0.0], 0.08, 2000) == pytest.approx(1 - 1 / 3998)
    assert auc([0.5, float("inf"), float("nan")]) == 0.0  # all beyond the range


def test_face_metrics_summary():
    gt = np.stack([_face_gt()] * 4)
    pred = gt.copy()
    pred[0] += (0.6, 0.8)  # error 1 -> 1/50 = 0.02
    pred[1] += (1.8, 2.4)  # error 3 -> 0.06
    pred[2] += (2.7, 3.6)  # error 4.5 -> 0.09
    pred[3] += (6.0, 8.0)  # error 10 -> 0.2
    m = face_metrics(pred, gt)
    assert m["normalizer"] == "inter_ocular" and m["count"] == 4
    assert m["nme_percent"] == pytest.approx((0.02 + 0.06 + 0.09 + 0.2) / 4 * 100)  # 9.25
    assert m["failure_rate_0.08_percent"] == pytest.approx(50.0)  # 0.09, 0.2
    assert m["failure_rate_0.10_percent"] == pytest.approx(25.0)  # 0.2
    # CED at 2000 steps: 1/4 from t just above 0.02, 2/4 from t just above 0.06; the trapezoid
    # area is (0.08 - 0.02)/4 + (0.08 - 0.06)/4 = 0.02 up to one step (0.08/1999) -> 25 % of 0.08
    assert m["auc_0.08_percent"] == pytest.approx(25.0, abs=0.1)


def test_face_metrics_broken_model_is_not_hidden():
    gt = np.stack([_face_gt()] * 2)
    pred = gt.copy()
    pred[1, 5] = np.nan
    m = face_metrics(pred, gt)
    assert math.isnan(m["nme_percent"])
    assert m["failure_rate_0.08_percent"] == pytest.approx(50.0)


def test_pckh_hand_computed():
    n, c = 2, 16
    gt = np.zeros((n, c, 2))
    pred = gt.copy()
    head = np.array([10.0, 20.0])  # threshold 0.5 -> radius 5 px (image 0), 10 px (image 1)
    visible = np.ones((n, c), dtype=bool)
    pred[0, :] += (0.0, 4.0)  # image 0: error 4 <= 5, correct ...
    pred[0, 0] = (0.0, 6.0)  # ... except joint 0: 6 > 5
    pred[0, 4] = (3.0, 4.0)  # exactly 5 = 0.5 * head: correct (<=)
    pred[1, 0:4] = (0.0, 12.0)  # image 1: joints 0-3 wrong (12 > 10), the rest exact
    pred[:, 6:8] = (100.0, 0.0)  # pelvis, thorax wrong everywhere: excluded from the mean
    pred[1, 15] = (100.0, 0.0)
    visible[1, 15] = False  # ... and invisible, so it does not count
    r = pckh(pred, gt, visible, head)
    expected = np.ones(c)
    expected[0] = 0.0  # wrong in both images
    expected[1:4] = 0.5  # right in image 0 only
    expected[6:8] = 0.0
    expected[15] = 1.0  # 1 of 1 visible
    np.testing.assert_allclose(r["per_joint"], expected)
    np.testing.assert_array_equal(r["count"], [2] * 15 + [1])
    # kept joints 0-5, 8-15: hits 0 + 3 + 4 (j4, j5) + 14 (j8-14) + 1 (j15) = 22 of 13*2 + 1 = 27 visible
    assert r["mean"] == pytest.approx(22 / 27)
    m = pose_metrics(pred, gt, visible, head)
    assert m["pckh_percent"] == pytest.approx(22 / 27 * 100)
    assert m["per_joint_percent"]["r_ankle"] == 0.0 and m["per_joint_percent"]["l_wrist"] == 100.0
    assert m["excluded_joints"] == ["pelvis", "thorax"]


def test_pckh_joint_never_visible_is_nan():
    gt = np.zeros((1, 16, 2))
    visible = np.ones((1, 16), dtype=bool)
    visible[0, 9] = False
    r = pckh(gt, gt, visible, np.array([10.0]))
    assert math.isnan(r["per_joint"][9])
    assert r["mean"] == 1.0  # 13 kept visible joints, all exact
