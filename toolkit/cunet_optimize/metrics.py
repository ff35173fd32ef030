"""Landmark accuracy metrics: NME / failure rate / CED-AUC for faces, PCKh for human pose.

Pure numpy; inputs are predictions and ground truth as (N, C, 2) arrays in the same
pixel frame (original-image coordinates). Definitions follow docs/EVAL.md:

* NME of one image = mean over points of ||pred - gt|| / d, with d chosen by
  ``normalizer``: ``"inter_ocular"`` (default) = ||gt[36] - gt[45]||, the outer eye
  corners (HRNet, mmpose, the CU-Net authors); ``"inter_pupil"`` = distance between the
  means of gt[36:42] and gt[42:48]; ``"box"`` = sqrt(w * h) of the ground-truth
  landmark bounding box. Reports must name the normaliser used.
* Failure rate@t = fraction of images with NME > t.
* CED(t) = fraction of images with NME < t, on ``steps`` thresholds linspace(0, max);
  AUC = trapezoidal area under CED / max (Supervision-by-Registration common_eval.py).
* PCKh@0.5: a joint is correct when its error <= 0.5 * head size; only visible
  (annotated) joints count; the mean excludes pelvis and thorax (6, 7) and is
  weighted by joint counts.

A non-finite prediction gives a non-finite NME, which counts as a failure, lies
beyond every CED threshold, and makes the mean NME NaN: a broken model is never
reported as a good one.
"""

from __future__ import annotations

import numpy as np

from cunet_optimize.errors import CUNetError

# The accuracy gate's default allowed degradation in metric percentage points, by headline
# metric (tasks.Task.metric). Kept here, torch-free, so that reports read the same numbers.
DEFAULT_TOLERANCE_POINTS = {
    "NME": 0.30,  # under 6% of the embedded model's 5.293% (assets/MODEL_CARD.md)
    "PCKh@0.5": 1.0,
}

NORMALIZERS = ("inter_ocular", "inter_pupil", "box")
FACE_FAILURE_THRESHOLDS = (0.08, 0.10)
AUC_THRESHOLD = 0.08
CED_STEPS = 2000

# 68-point (iBUG/300-W) indices, 0-based
LEFT_EYE_OUTER, RIGHT_EYE_OUTER = 36, 45
LEFT_EYE = slice(36, 42)
RIGHT_EYE = slice(42, 48)

MPII_JOINT_NAMES = (
    "r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax",
    "upper_neck", "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist",
)  # fmt: skip
PCKH_EXCLUDED_JOINTS = (6, 7)  # pelvis, thorax


def _points(name: str, x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 3 or a.shape[-1] != 2:
        raise ValueError(f"{name} must be (N, C, 2), got shape {a.shape}")
    return a


def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    p, g = _points("pred", pred), _points("gt", gt)
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} differ in shape")
    return p, g


def normalizing_distance(gt, normalizer: str = "inter_ocular") -> np.ndarray:
    """Per-image normalising distance d (N,) of ground truth (N, C, 2); see module docstring."""
    g = _points("gt", gt)
    if normalizer in ("inter_ocular", "inter_pupil") and g.shape[1] != 68:
        raise CUNetError(
            f"normaliser '{normalizer}' needs the 68-point 300-W layout, got {g.shape[1]} points; use normalizer='box'"
        )
    if normalizer == "inter_ocular":
        return np.linalg.norm(g[:, LEFT_EYE_OUTER] - g[:, RIGHT_EYE_OUTER], axis=-1)
    if normalizer == "inter_pupil":
        return np.linalg.norm(g[:, LEFT_EYE].mean(axis=1) - g[:, RIGHT_EYE].mean(axis=1), axis=-1)
    if normalizer == "box":
        wh = g.max(axis=1) - g.min(axis=1)
        return np.sqrt(wh[:, 0] * wh[:, 1])
    raise CUNetError(f"unknown NME normaliser '{normalizer}'; use one of: {', '.join(NORMALIZERS)}")


def nme(pred, gt, normalizer: str | np.ndarray = "inter_ocular") -> np.ndarray:
    """Per-image normalised mean error (N,), as a fraction (x100 for percent).

    ``normalizer`` is a name from `NORMALIZERS` or an explicit per-image array (N,).
    """
    p, g = _pair(pred, gt)
    if isinstance(normalizer, str):
        d = normalizing_distance(g, normalizer)
    else:
        d = np.asarray(normalizer, dtype=np.float64).reshape(-1)
        if d.shape[0] != p.shape[0]:
            raise ValueError(f"{d.shape[0]} normalisers for {p.shape[0]} images")
    err = np.linalg.norm(p - g, axis=-1).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return err / d


def _as_errors(nmes) -> np.ndarray:
    e = np.asarray(nmes, dtype=np.float64).reshape(-1)
    if e.size == 0:
        raise ValueError("no NME values")
    return np.where(np.isfinite(e), e, np.inf)  # NaN would compare False and hide a failure


def failure_rate(nmes, threshold: float = FACE_FAILURE_THRESHOLDS[0]) -> float:
    """Fraction of images with NME > threshold (non-finite NME = failure)."""
    return float(np.mean(_as_errors(nmes) > threshold))


def ced_curve(nmes, max_threshold: float = AUC_THRESHOLD, steps: int = CED_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative error distribution: (thresholds, fraction of images with NME < threshold)."""
    e = np.sort(_as_errors(nmes))
    thresholds = np.linspace(0.0, max_threshold, num=steps)
    return thresholds, np.searchsorted(e, thresholds, side="left") / e.size


def auc(nmes, max_threshold: float = AUC_THRESHOLD, steps: int = CED_STEPS) -> float:
    """Area under the CED from 0 to ``max_threshold`` divided by ``max_threshold`` (in [0, 1])."""
    t, frac = ced_curve(nmes, max_threshold, steps)
    area = float(np.sum((frac[1:] + frac[:-1]) * np.diff(t)) / 2.0)  # trapezoid rule
    return area / max_threshold


def face_metrics(pred, gt, normalizer: str = "inter_ocular") -> dict:
    """Summary of a face-alignment evaluation, percentages where the field reports them."""
    e = nme(pred, gt, normalizer)
    return {
        "normalizer": normalizer,
        "count": int(e.size),
        "nme_percent": float(np.mean(e) * 100.0),
        **{f"failure_rate_{t:.2f}_percent": failure_rate(e, t) * 100.0 for t in FACE_FAILURE_THRESHOLDS},
        f"auc_{AUC_THRESHOLD:.2f}_percent": auc(e, AUC_THRESHOLD) * 100.0,
    }


def pckh(
    pred,
    gt,
    visible,
    head_size,
    threshold: float = 0.5,
    exclude: tuple[int, ...] = PCKH_EXCLUDED_JOINTS,
) -> dict:
    """PCKh: per-joint and mean fraction of visible joints within ``threshold * head_size``.

    ``visible`` (N, C) bool/0-1, ``head_size`` (N,) in pixels (MPII: 0.6 * head-box
    diagonal). Returns ``per_joint`` (C,) fractions (NaN for a joint never visible),
    ``count`` (C,) visible joints, and ``mean``: correct / visible over all joints not
    in ``exclude`` (i.e. weighted by joint counts). A non-finite prediction is wrong.
    """
    p, g = _pair(pred, gt)
    vis = np.asarray(visible.detach().cpu() if hasattr(visible, "detach") else visible).astype(bool)
    hs = np.asarray(head_size.detach().cpu() if hasattr(head_size, "detach") else head_size, dtype=np.float64)
    hs = hs.reshape(-1)
    if vis.shape != p.shape[:2] or hs.shape[0] != p.shape[0]:
        raise ValueError(f"visible {vis.shape} / head_size {hs.shape} do not match predictions {p.shape}")
    dist = np.linalg.norm(p - g, axis=-1)
    correct = (dist <= threshold * hs[:, None]) & vis  # NaN distance compares False
    count = vis.sum(axis=0)
    hits = correct.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_joint = np.where(count > 0, hits / np.maximum(count, 1), np.nan)
    keep = np.ones(p.shape[1], dtype=bool)
    keep[[j for j in exclude if j < p.shape[1]]] = False
    total = count[keep].sum()
    mean = float(hits[keep].sum() / total) if total > 0 else float("nan")
    return {"per_joint": per_joint, "count": count, "mean": mean, "threshold": threshold}


def pose_metrics(pred, gt, visible, head_size, threshold: float = 0.5) -> dict:
    """Summary of an MPII evaluation: PCKh@threshold mean and per joint, in percent."""
    r = pckh(pred, gt, visible, head_size, threshold)
    num_joints = len(r["per_joint"])
    names = MPII_JOINT_NAMES if num_joints == len(MPII_JOINT_NAMES) else tuple(map(str, range(num_joints)))
    return {
        "metric": f"PCKh@{threshold:g}",
        "count": int(_points("gt", gt).shape[0]),
        "pckh_percent": r["mean"] * 100.0,
        "per_joint_percent": {n: float(v * 100.0) for n, v in zip(names, r["per_joint"])},
        "excluded_joints": [names[j] for j in PCKH_EXCLUDED_JOINTS if j < len(names)],
    }


PCKH_CURVE_MAX_THRESHOLD = 0.5
PCKH_CURVE_STEPS = 51


def pckh_errors(pred, gt, head_size) -> np.ndarray:
    """Joint errors in head sizes (N, C): ||pred - gt|| / head_size (non-finite where the prediction is)."""
    p, g = _pair(pred, gt)
    hs = np.asarray(head_size.detach().cpu() if hasattr(head_size, "detach") else head_size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.linalg.norm(p - g, axis=-1) / hs.reshape(-1, 1)


def pckh_curve(
    errors,
    visible,
    max_threshold: float = PCKH_CURVE_MAX_THRESHOLD,
    steps: int = PCKH_CURVE_STEPS,
    exclude: tuple[int, ...] = PCKH_EXCLUDED_JOINTS,
) -> tuple[np.ndarray, np.ndarray]:
    """PCKh at each of `steps` thresholds linspace(0, max) (the pose task's CED): fraction of
    visible joints, pelvis and thorax excluded, whose error in head sizes is <= threshold."""
    e = np.asarray(errors, dtype=np.float64)
    vis = np.asarray(visible).astype(bool)
    keep = np.ones(e.shape[1], dtype=bool)
    keep[[j for j in exclude if j < e.shape[1]]] = False
    counted = e[:, keep][vis[:, keep]]
    counted = np.sort(np.where(np.isfinite(counted), counted, np.inf))  # a broken prediction is wrong
    thresholds = np.linspace(0.0, max_threshold, num=steps)
    if counted.size == 0:
        return thresholds, np.full(steps, np.nan)
    return thresholds, np.searchsorted(counted, thresholds, side="right") / counted.size
