"""Crop geometry, augmentation and heatmap coding for landmark networks (pure numpy).

Coordinate conventions (one set, used everywhere in the toolkit):

* Points are (x, y) in pixels, 0-based, and integer values are pixel *centres*: the
  pixel (row r, col c) covers [c - 0.5, c + 0.5] x [r - 0.5, r + 0.5].
* A crop is a 2x3 affine ``A`` mapping original-image coordinates to input-crop
  coordinates (``p_in = A[:, :2] @ p + A[:, 2]``). ``scale`` is in units of 200 px
  (MPII / HRNet convention): the crop's side covers ``scale * 200`` original pixels,
  and the crop centre ``center`` lands on the input's centre ``(size - 1) / 2``.
* Heatmap coordinate u (stride 4 on the 256 input) corresponds to input coordinate
  ``(u + 0.5) * 4 - 0.5``: map pixel u covers input pixels 4u .. 4u+3, whose centre is
  4u + 1.5. `encode_heatmaps` draws Gaussians at exactly these positions and
  `decode_heatmaps` returns positions in the same frame, so encode -> decode -> map
  back is unbiased.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from cunet_optimize.models.cunet import HEATMAP_SIZE, INPUT_SIZE

PIXEL_STD = 200.0  # `scale` unit in px (MPII annotations, HRNet, the CU-Net authors)
HEATMAP_STRIDE = INPUT_SIZE // HEATMAP_SIZE

# The CU-Net authors draw exp(-d^2 / 9) (their `draw_gaussian` with sigma=1 uses
# tmp_size = 3 as the width), i.e. a Gaussian with standard deviation 3/sqrt(2) ~ 2.12
# map pixels. We use that width but centre it at the exact sub-pixel position and do
# not cut it to a 7x7 window (their window leaves a step of height exp(-1) at its edge).
HEATMAP_SIGMA = 3.0 / 2.0**0.5

TIGHT_BOX_FACTOR = 1.25  # HRNet-Facial: scale = max(w, h) / 200 * 1.25 of the gt landmark box
DETECTOR_BOX_FACTOR = 1.1  # CU-Net authors: 300-W detector box, scale_provided_det * 1.1


def _perm_from_pairs(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    perm = np.arange(n, dtype=np.int64)
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


# perm[i] = index that point i takes after a horizontal flip (an involution), so the
# landmarks of a flipped image are ``mirrored_points[perm]``.
FACE68_FLIP_PERM = _perm_from_pairs(
    68,
    [(i, 16 - i) for i in range(8)]  # jaw 0-16 .. 7-9
    + [(17 + i, 26 - i) for i in range(5)]  # brows 17-26 .. 21-22
    + [(31, 35), (32, 34)]  # nose
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer mouth
    + [(60, 64), (61, 63), (65, 67)],  # inner mouth
)
MPII_FLIP_PERM = np.array([5, 4, 3, 2, 1, 0, 6, 7, 8, 9, 15, 14, 13, 12, 11, 10], dtype=np.int64)


# --------------------------------------------------------------------------- geometry


def crop_transform(
    center: np.ndarray | tuple[float, float],
    scale: float,
    rotation_deg: float = 0.0,
    out_size: int = INPUT_SIZE,
    flip: bool = False,
) -> np.ndarray:
    """2x3 affine from original-image coordinates to a square crop of ``out_size`` px.

    The crop covers ``scale * 200`` original pixels around ``center``; the content is
    rotated by ``rotation_deg`` degrees counter-clockwise as seen on screen, then
    mirrored left-right if ``flip`` (the caller permutes the landmarks, see
    `FACE68_FLIP_PERM`). Pixel edges map to pixel edges, so ``center`` lands on
    ``(out_size - 1) / 2``.
    """
    cx, cy = float(center[0]), float(center[1])
    if not scale > 0:
        raise ValueError(f"crop scale must be positive, got {scale}")
    s = out_size / (float(scale) * PIXEL_STD)
    t = np.deg2rad(rotation_deg)
    cos, sin = np.cos(t), np.sin(t)
    # y points down: a point right of the centre (1, 0) goes to (cos, -sin), i.e. up.
    linear = s * np.array([[cos, sin], [-sin, cos]])
    mid = out_size / 2.0 - 0.5
    offset = np.array([mid, mid]) - linear @ np.array([cx, cy])
    A = np.concatenate([linear, offset[:, None]], axis=1)
    if flip:
        # mirror about the crop's vertical centre line: x -> (out_size - 1) - x
        A = np.array([[-1.0, 0.0], [0.0, 1.0]]) @ A + np.array([[0.0, 0.0, out_size - 1.0], [0.0, 0.0, 0.0]])
    return A


def invert_affine(A: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine (or a stack ...x2x3)."""
    A = np.asarray(A, dtype=np.float64)
    inv_linear = np.linalg.inv(A[..., :2])
    inv_offset = -np.einsum("...ij,...j->...i", inv_linear, A[..., 2])
    return np.concatenate([inv_linear, inv_offset[..., None]], axis=-1)


def apply_affine(points: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Map points (..., 2) through a 2x3 affine; a stack (B, 2, 3) maps points (B, ..., 2)."""
    pts = np.asarray(points, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    if A.ndim == 2:
        return pts @ A[:, :2].T + A[:, 2]
    batch = A.shape[0]
    if pts.shape[0] != batch:
        raise ValueError(f"{batch} transforms for {pts.shape[0]} point sets")
    flat = pts.reshape(batch, -1, 2)
    out = np.einsum("bij,bnj->bni", A[:, :, :2], flat) + A[:, None, :, 2]
    return out.reshape(pts.shape)


def warp_image(image: np.ndarray | Image.Image, A: np.ndarray, out_size: int = INPUT_SIZE) -> np.ndarray:
    """Resample an HxWx3 uint8 image into the ``out_size`` crop defined by ``A`` (bilinear, black fill).

    PIL's AFFINE takes the output->input map in pixel-*edge* coordinates (a pixel
    centre is at i + 0.5), so the centre-convention inverse gets a half-pixel shift.
    """
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    inv = invert_affine(A)
    linear, offset = inv[:, :2], inv[:, 2]
    offset_edges = offset + 0.5 - linear @ np.array([0.5, 0.5])
    coeffs = (linear[0, 0], linear[0, 1], offset_edges[0], linear[1, 0], linear[1, 1], offset_edges[1])
    out = pil.transform((out_size, out_size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return np.asarray(out)


# ------------------------------------------------------------------------ crop policies


def tight_box_crop(landmarks: np.ndarray, factor: float = TIGHT_BOX_FACTOR) -> tuple[np.ndarray, float]:
    """(center, scale) from the ground-truth landmark box: centre of the box, max(w, h) / 200 * 1.25 (HRNet)."""
    pts = np.asarray(landmarks, dtype=np.float64)
    lo, hi = np.nanmin(pts, axis=0), np.nanmax(pts, axis=0)
    size = float(np.max(hi - lo))
    if not size > 0:
        raise ValueError("landmark box has zero size")
    return (lo + hi) / 2.0, size / PIXEL_STD * factor


def detector_box_crop(box: np.ndarray | list[float], factor: float = DETECTOR_BOX_FACTOR) -> tuple[np.ndarray, float]:
    """(center, scale) from a face-detector box [x1, y1, x2, y2]: box centre, max(w, h) / 200 * 1.1 (CU-Net authors)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    size = max(x2 - x1, y2 - y1)
    if not size > 0:
        raise ValueError(f"detector box {list(box)} has no area")
    return np.array([(x1 + x2) / 2.0, (y1 + y2) / 2.0]), size / PIXEL_STD * factor


# ------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Augmentation:
    """One draw of the authors' training augmentation; the identity when default-constructed."""

    scale_factor: float = 1.0  # multiplies the crop scale (>1 = zoom out)
    rotation_deg: float = 0.0
    flip: bool = False
    color_gain: np.ndarray = field(default_factory=lambda: np.ones(3))  # per RGB channel


def random_augment(
    rng: np.random.Generator,
    *,
    scale_sigma: float = 0.25,
    scale_clip: float = 0.5,
    rotation_sigma: float = 30.0,
    rotation_clip: float = 60.0,
    rotation_prob: float = 0.4,
    color_gain_range: tuple[float, float] = (0.6, 1.4),
    flip_prob: float = 0.5,
) -> Augmentation:
    """Draw scale 2^clip(N(0, .25), +-.5), rotation clip(N(0, 30), +-60) w.p. 0.4, gain U(.6, 1.4)^3, flip w.p. .5.

    The same number of values is drawn whatever the outcome, so a given generator
    state always yields the same augmentation (and flip_prob=0 changes nothing else).
    """
    scale_exp = float(np.clip(rng.normal(0.0, scale_sigma), -scale_clip, scale_clip))
    rotation = float(np.clip(rng.normal(0.0, rotation_sigma), -rotation_clip, rotation_clip))
    rotate = rng.random() < rotation_prob
    gain = rng.uniform(color_gain_range[0], color_gain_range[1], size=3)
    flip = rng.random() < flip_prob
    return Augmentation(
        scale_factor=2.0**scale_exp,
        rotation_deg=rotation if rotate else 0.0,
        flip=bool(flip),
        color_gain=gain,
    )


def rng_for_sample(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Independent, reproducible stream per (seed, epoch, sample): same result in any worker or order."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


# ----------------------------------------------------------------------------- heatmaps


def input_to_heatmap_coords(points: np.ndarray, stride: int = HEATMAP_STRIDE) -> np.ndarray:
    """Input-crop coordinates -> heatmap coordinates: u = (x + 0.5) / stride - 0.5."""
    return (np.asarray(points, dtype=np.float64) + 0.5) / stride - 0.5


def heatmap_to_input_coords(points: np.ndarray, stride: int = HEATMAP_STRIDE) -> np.ndarray:
    """Heatmap coordinates -> input-crop coordinates: x = (u + 0.5) * stride - 0.5."""
    return (np.asarray(points, dtype=np.float64) + 0.5) * stride - 0.5


def image_to_heatmap_coords(
    points: np.ndarray, A_orig_to_input: np.ndarray, stride: int = HEATMAP_STRIDE
) -> np.ndarray:
    """Original-image points -> heatmap coordinates through the crop transform."""
    return input_to_heatmap_coords(apply_affine(points, A_orig_to_input), stride)


def heatmap_to_image_coords(
    points_64: np.ndarray, A_orig_to_input: np.ndarray, stride: int = HEATMAP_STRIDE
) -> np.ndarray:
    """Heatmap coordinates (..., C, 2) -> original-image coordinates through the inverse crop.

    ``A_orig_to_input`` is one 2x3 affine or a stack (B, 2, 3) for points (B, C, 2),
    e.g. the ``transform`` entries of a batch.
    """
    A = np.asarray(A_orig_to_input.detach().cpu() if hasattr(A_orig_to_input, "detach") else A_orig_to_input)
    return apply_affine(heatmap_to_input_coords(points_64, stride), invert_affine(A))


def encode_heatmaps(
    points_64: np.ndarray,
    size: int = HEATMAP_SIZE,
    sigma: float = HEATMAP_SIGMA,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian target maps (C, size, size) float32 with peak 1 at each sub-pixel point.

    A point that is not finite, is marked invalid, or lies outside the map
    (outside [-0.5, size - 0.5)) gets an all-zero map. Returns (heatmaps, mask) where
    mask (C,) bool says which channels hold a Gaussian.
    """
    pts = np.asarray(points_64, dtype=np.float64).reshape(-1, 2)
    mask = np.all(np.isfinite(pts), axis=1)
    mask &= np.all((pts >= -0.5) & (pts < size - 0.5), axis=1)
    if valid is not None:
        mask &= np.asarray(valid, dtype=bool).reshape(-1)
    grid = np.arange(size, dtype=np.float64)
    safe = np.where(mask[:, None], pts, 0.0)
    # separable: exp(-(dx^2 + dy^2) / 2s^2) = gx(x) * gy(y)
    gx = np.exp(-((grid[None, :] - safe[:, 0:1]) ** 2) / (2.0 * sigma**2))
    gy = np.exp(-((grid[None, :] - safe[:, 1:2]) ** 2) / (2.0 * sigma**2))
    maps = gy[:, :, None] * gx[:, None, :]
    maps[~mask] = 0.0
    return maps.astype(np.float32), mask


DecodeMethod = Literal["quadratic", "quarter", "argmax"]


def _parabola_vertex(left: np.ndarray, centre: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Vertex of the parabola through (-1, left), (0, centre), (1, right); 0 where it has no maximum."""
    denom = left - 2.0 * centre + right
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom < 0, 0.5 * (left - right) / denom, 0.0)


def _refine_axis(profile: np.ndarray, peak: np.ndarray, method: str) -> np.ndarray:
    """Sub-pixel position along one axis from the values ``profile`` (M, L) through each peak (M,)."""
    length = profile.shape[1]
    rows = np.arange(len(peak))
    pos = peak.astype(np.float64)
    if method == "argmax" or length < 3:
        return pos
    if method == "quarter":
        # the authors' rule: interior peaks only, 0.25 px toward the larger neighbour
        inner = (peak > 0) & (peak < length - 1)
        left = profile[rows, np.clip(peak - 1, 0, length - 1)]
        right = profile[rows, np.clip(peak + 1, 0, length - 1)]
        return pos + np.where(inner, 0.25 * np.sign(right - left), 0.0)
    # Fit a parabola to three consecutive samples around the peak (moved inward at the
    # map border), in the log domain where the values allow it: a sampled Gaussian is
    # exactly a parabola there, so clean targets decode exactly, even on the border.
    # Network outputs with non-positive samples fall back to a parabola on raw values.
    mid = np.clip(peak, 1, length - 2)
    v = np.stack([profile[rows, mid - 1], profile[rows, mid], profile[rows, mid + 1]])
    tiny = 1e-10
    positive = np.all(v > tiny, axis=0)
    log_vertex = _parabola_vertex(*np.log(np.maximum(v, tiny)))
    raw_vertex = _parabola_vertex(*v)
    vertex = mid + np.where(positive, log_vertex, raw_vertex)
    # the true peak lies within the argmax pixel
    return np.clip(np.where(np.isfinite(vertex), vertex, pos), pos - 0.5, pos + 0.5)


def decode_heatmaps(
    heatmaps,
    method: DecodeMethod = "quadratic",
    return_scores: bool = False,
):
    """Heatmaps (..., C, H, W) (numpy or torch) -> points (..., C, 2) float64 in heatmap coordinates.

    Argmax, then a sub-pixel refinement per axis: ``"quadratic"`` (default) fits a
    parabola to the log of the peak and its two neighbours (three inward samples on
    the map border), exact for a Gaussian peak (about 1e-6 map px on clean targets);
    ``"quarter"`` is the CU-Net authors' shift of 0.25 px toward the larger neighbour
    (kept as floats, not truncated; error up to ~0.25 map px); ``"argmax"`` applies no
    shift. A map containing NaN/inf decodes to NaN so that a broken model cannot
    produce a plausible-looking point. With ``return_scores`` also returns the peak
    values (..., C).
    """
    if hasattr(heatmaps, "detach"):
        heatmaps = heatmaps.detach().float().cpu().numpy()
    h = np.asarray(heatmaps, dtype=np.float64)
    if h.ndim < 3:
        raise ValueError(f"heatmaps must be (..., C, H, W), got shape {h.shape}")
    if method not in ("quadratic", "quarter", "argmax"):
        raise ValueError(f"unknown decode method {method!r}: use 'quadratic', 'quarter' or 'argmax'")
    lead, (H, W) = h.shape[:-2], h.shape[-2:]
    flat = h.reshape(-1, H, W)
    n = np.arange(flat.shape[0])
    finite = np.all(np.isfinite(flat.reshape(len(n), -1)), axis=1)
    flat = np.where(np.isfinite(flat), flat, -np.inf)
    py, px = np.divmod(np.argmax(flat.reshape(len(n), -1), axis=1), W)
    x = _refine_axis(flat[n, py, :], px, method)
    y = _refine_axis(flat[n, :, px], py, method)

    pts = np.stack([x, y], axis=-1)
    pts[~finite] = np.nan
    pts = pts.reshape(*lead, 2)
    if return_scores:
        scores = np.where(finite, flat[n, py, px], np.nan).reshape(lead)
        return pts, scores
    return pts


# ---------------------------------------------------------------- one training sample


@dataclass
class CropSample:
    """A cropped input with its targets; the layout every landmark dataset returns."""

    image: np.ndarray  # (3, S, S) float32 in [0, 1]
    heatmaps: np.ndarray  # (C, S/4, S/4) float32
    landmarks: np.ndarray  # (C, 2) float64, original-image coordinates, in output channel order
    transform: np.ndarray  # (2, 3) float64, original -> input crop
    target_mask: np.ndarray  # (C,) bool, channel holds a Gaussian
    perm: np.ndarray  # (C,) int64, output channel i is input landmark perm[i] (identity unless flipped)


def crop_sample(
    image: np.ndarray | Image.Image,
    landmarks: np.ndarray,
    center: np.ndarray,
    scale: float,
    augmentation: Augmentation | None = None,
    flip_perm: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    input_size: int = INPUT_SIZE,
    heatmap_size: int = HEATMAP_SIZE,
    sigma: float = HEATMAP_SIGMA,
) -> CropSample:
    """Crop, augment and encode one image: the shared path of all datasets.

    With a flip, landmarks (and the caller's per-point arrays, via ``perm``) are
    reordered so that channel i is still "point i" of the mirrored face/body; the
    returned landmarks are then the original-image positions of those points, so
    ``heatmap_to_image_coords(decode_heatmaps(heatmaps), transform) ~= landmarks``
    holds with and without augmentation.
    """
    aug = augmentation or Augmentation()
    pts = np.asarray(landmarks, dtype=np.float64)
    flip = bool(aug.flip)
    if flip and flip_perm is None:
        raise ValueError("flip augmentation needs a flip permutation for these landmarks")
    A = crop_transform(center, scale * aug.scale_factor, aug.rotation_deg, input_size, flip=flip)
    crop = warp_image(image, A, input_size).astype(np.float32) / 255.0
    gain = np.asarray(aug.color_gain, dtype=np.float32)
    if not np.all(gain == 1.0):
        crop = np.clip(crop * gain[None, None, :], 0.0, 1.0)
    perm = np.asarray(flip_perm, dtype=np.int64) if flip else np.arange(len(pts), dtype=np.int64)
    pts = pts[perm]
    valid_p = None if valid is None else np.asarray(valid, dtype=bool)[perm]
    stride = input_size // heatmap_size
    heatmaps, mask = encode_heatmaps(image_to_heatmap_coords(pts, A, stride), heatmap_size, sigma, valid_p)
    return CropSample(
        image=np.ascontiguousarray(crop.transpose(2, 0, 1)),
        heatmaps=heatmaps,
        landmarks=pts,
        transform=A,
        target_mask=mask,
        perm=perm,
    )
