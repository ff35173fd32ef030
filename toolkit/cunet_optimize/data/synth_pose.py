"""Synthetic 16-joint human poses in the MPII layout: the pose task's default data.

MPII cannot ship with the toolkit, yet the pose path (calibration, the build's PCKh
gate, profiling, tests) needs person images whose joints are known. This module
draws articulated figures in MPII joint order (0 r-ankle, 1 r-knee, 2 r-hip, 3 l-hip,
4 l-knee, 5 l-ankle, 6 pelvis, 7 thorax, 8 upper neck, 9 head top, 10 r-wrist,
11 r-elbow, 12 r-shoulder, 13 l-shoulder, 14 l-elbow, 15 l-wrist) as limbs on the
face renderer's cluttered backgrounds: random limb angles, foreshortening, body lean,
scale and position. Every figure faces the camera (its right side on the image's
left at the torso, a face on the head), so left and right can be told apart and the
MPII flip permutation maps a mirrored figure onto itself.

What the annotation says follows MPII: a joint under an occluder keeps its position
with the visibility flag 0; a joint outside the image is unannotated ([-1, -1, 0]:
coordinates <= 0, which PCKh skips). `write_synthetic_poses` writes the CU-Net
authors' layout, which `MPIIDataset` reads: `images/NNNNN.png` and
`mpii_annotations.json` (a list of person records with img_paths relative to
images/, joint_self 16x3 and objpos 1-based, scale_provided, normalizer = head-box
diagonal, isValidation, dataset "MPII"), plus `dataset.json`. Image `i` of seed `s`
depends on (s, i) alone, as for the faces.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from cunet_optimize.atomic import staged_folder
from cunet_optimize.data.synth import (PNG_OPTIONS, SynthSummary, _background, _Canvas, _clutter, _mix,
                                       _random_colour, _rgb, _skin_colour, check_synth_args, image_rng,
                                       split_test_indices)
from cunet_optimize.data.mpii import ANNOTATION_FILE, IMAGE_FOLDER
from cunet_optimize.errors import CUNetError

log = logging.getLogger(__name__)

SYNTH_POSE_GENERATOR = "cunet_optimize.data.synth_pose"
# Bump whenever the pixels or annotations for a given seed change.
SYNTH_POSE_VERSION = 1
NUM_JOINTS = 16
MPII_ORIGIN = 1.0  # the JSON is 1-based (Matlab), as MPII's own annotations
DECIMALS = 3  # annotations are rounded; the drawing uses the rounded values
UNANNOTATED = [-1.0, -1.0, 0.0]

# Limb lengths in units of the standing height (head top to ankles).
TORSO, NECK, HEAD = 0.30, 0.06, 0.12
THIGH, SHIN = 0.23, 0.23
UPPER_ARM, FOREARM = 0.16, 0.15
HIP_HALF, SHOULDER_HALF = 0.065, 0.105


def _direction(angle_deg: np.ndarray | float, side: float) -> np.ndarray:
    """Unit vector `angle` degrees away from straight down, turned towards `side`
    (-1: the image's left, the person's right; +1: the image's right)."""
    a = np.radians(angle_deg)
    return np.array([side * np.sin(a), np.cos(a)])


def figure_joints(rng: np.random.Generator) -> np.ndarray:
    """The 16 joints of a random pose in height units, pelvis at the origin, y down, upright."""
    u = rng.uniform
    lean = float(np.clip(rng.normal(0.0, 8.0), -25.0, 25.0))
    up = -_direction(lean, 1.0)  # the torso's axis, pointing to the head
    across = np.array([-up[1], up[0]])  # towards the image's right
    j = np.zeros((NUM_JOINTS, 2))
    j[6] = 0.0
    j[7] = up * TORSO * u(0.85, 1.05)
    j[8] = j[7] + up * NECK * u(0.8, 1.2)
    j[9] = j[8] + _direction(180.0 + lean + rng.normal(0.0, 12.0), 1.0) * HEAD * u(0.9, 1.1)
    for side, (hip, knee, ankle), (shoulder, elbow, wrist) in ((-1.0, (2, 1, 0), (12, 11, 10)),
                                                               (1.0, (3, 4, 5), (13, 14, 15))):
        j[hip] = j[6] + across * side * HIP_HALF * u(0.85, 1.15)
        thigh = float(np.clip(rng.normal(8.0, 20.0), -25.0, 80.0))
        knee_bend = u(-5.0, 70.0) if rng.random() < 0.6 else u(-5.0, 120.0)
        j[knee] = j[hip] + _direction(thigh + lean, side) * THIGH * u(0.6, 1.0)  # foreshortened
        j[ankle] = j[knee] + _direction(thigh + lean - knee_bend * rng.choice([-1.0, 1.0]) * 0.5, side) \
            * SHIN * u(0.6, 1.0)
        j[shoulder] = j[7] + across * side * SHOULDER_HALF * u(0.85, 1.1) + up * u(-0.03, 0.0)
        arm = u(-20.0, 170.0) if rng.random() < 0.5 else float(np.clip(rng.normal(20.0, 25.0), -20.0, 90.0))
        j[elbow] = j[shoulder] + _direction(arm + lean, side) * UPPER_ARM * u(0.55, 1.0)
        j[wrist] = j[elbow] + _direction(arm + lean + u(-150.0, 30.0), side) * FOREARM * u(0.55, 1.0)
    return j


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return points @ rot.T


def _capsule(canvas: _Canvas, a: np.ndarray, b: np.ndarray, colour, width: float) -> None:
    """A limb: a thick segment with round ends."""
    canvas.line(np.stack([a, b]), colour, width)
    for p in (a, b):
        canvas.ellipse(p[0], p[1], width / 2, width / 2, colour)


def _draw_figure(canvas: _Canvas, rng: np.random.Generator, j: np.ndarray, height: float) -> np.ndarray:
    """Legs, torso, head with a face, arms; returns the head ellipse's polygon (for its box)."""
    skin = _skin_colour(rng)
    shirt, trousers = _random_colour(rng), _random_colour(rng)
    shoes = _mix(_random_colour(rng), (0, 0, 0), 0.6)
    long_sleeves = rng.random() < 0.5
    w = height * rng.uniform(0.8, 1.2)
    # legs, the far side first (which side is nearer varies)
    sides = [((2, 1, 0), -1), ((3, 4, 5), 1)]
    if rng.random() < 0.5:
        sides.reverse()
    for (hip, knee, ankle), _ in sides:
        _capsule(canvas, j[hip], j[knee], trousers, 0.075 * w)
        _capsule(canvas, j[knee], j[ankle], _mix(trousers, (0, 0, 0), 0.15), 0.06 * w)
        canvas.ellipse(j[ankle][0], j[ankle][1], 0.04 * w, 0.03 * w, _rgb(shoes))
    # torso: a quad from the shoulders to the hips, and the neck
    torso = np.stack([j[12], j[13], j[3] + (j[3] - j[2]) * 0.15, j[2] - (j[3] - j[2]) * 0.15])
    canvas.polygon(torso, shirt)
    _capsule(canvas, j[7], j[8], _rgb(skin * 0.9), 0.045 * w)
    # head: an ellipse from the upper neck to the head top, a face and hair
    axis = j[9] - j[8]
    length = float(np.linalg.norm(axis)) or 1e-6
    along, normal = axis / length, np.array([-axis[1], axis[0]]) / length
    centre = j[8] + axis * 0.5
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    head = centre + np.outer(np.cos(t), along) * length * 0.5 + np.outer(np.sin(t), normal) * length * 0.38
    canvas.polygon(head, _rgb(skin))
    # hair over the top: the half of the head ellipse towards the head top, lifted a little
    phi = np.linspace(0, np.pi, 13)
    cap = centre + along * length * 0.12 + np.outer(np.cos(phi), normal) * length * 0.4 \
        + np.outer(np.sin(phi), along) * length * 0.4
    canvas.polygon(cap, _rgb(_mix(_random_colour(rng), (0, 0, 0), 0.5)))
    eye_line = centre - along * length * 0.02
    for s in (-1.0, 1.0):
        e = eye_line + normal * s * length * 0.15
        canvas.ellipse(e[0], e[1], 0.03 * length, 0.03 * length, (20, 15, 10))
    mouth = centre - along * length * 0.28
    canvas.line(np.stack([mouth - normal * length * 0.1, mouth + normal * length * 0.1]),
                _mix(skin, (120, 20, 30), 0.6), max(1.0, 0.03 * length))
    # arms, in front of the torso
    for shoulder, elbow, wrist in ((12, 11, 10), (13, 14, 15)):
        _capsule(canvas, j[shoulder], j[elbow], shirt, 0.055 * w)
        _capsule(canvas, j[elbow], j[wrist], shirt if long_sleeves else _rgb(skin), 0.045 * w)
        canvas.ellipse(j[wrist][0], j[wrist][1], 0.03 * w, 0.03 * w, _rgb(skin))
    return head


def _draw_occluder(canvas: _Canvas, rng: np.random.Generator, target: np.ndarray, size: float) -> np.ndarray:
    """A rectangle over `target`; returns its corners (joints inside count as occluded)."""
    half = rng.uniform(0.5, 1.0, size=2) * size
    c = target + rng.normal(0.0, 0.25 * size, size=2)
    box = np.array([c - half, [c[0] + half[0], c[1] - half[1]], c + half, [c[0] - half[0], c[1] + half[1]]])
    canvas.polygon(box, _random_colour(rng))
    return box


def _camera(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Colour cast, contrast, blur and noise, on 8-bit images (PIL does the pixel work)."""
    cast = rng.uniform(0.85, 1.15, size=3) * rng.uniform(0.7, 1.15)
    lut = np.arange(256)[None, :] * cast[:, None] + rng.uniform(-20, 20)
    img = img.point(np.clip(np.round(lut), 0, 255).astype(int).ravel().tolist())
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 1.2)))
    amp = int(rng.integers(0, 12))
    if amp >= 2:
        size = img.size
        noise = rng.integers(-amp, amp + 1, size=(size[1], size[0], 3), dtype=np.int16)
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    return img


def synth_pose(seed: int, index: int, image_size: int = 256) -> tuple[Image.Image, dict]:
    """Image `index` of pose set `seed`: (RGB image, MPII record without img_paths / isValidation).

    The record holds 1-based joint_self (16 x [x, y, visible]), objpos, scale_provided
    and normalizer (head-box diagonal), as MPII's annotation JSON.
    """
    rng = image_rng(seed, index)
    unit = figure_joints(rng)
    unit = _rotate(unit, float(np.clip(rng.normal(0.0, 12.0), -40.0, 40.0)))
    height = rng.uniform(0.45, 0.85) * image_size
    joints = unit * height
    lo, hi = joints.min(0), joints.max(0)
    # mostly inside; sometimes pushed over an edge so that some joints leave the image
    spill = 0.35 * (hi - lo) if rng.random() < 0.2 else np.zeros(2)
    offset = np.array([rng.uniform(-lo[k] - spill[k], image_size - 1 - hi[k] + spill[k]) for k in range(2)])
    joints = np.round(joints + offset + MPII_ORIGIN, DECIMALS) - MPII_ORIGIN  # draw what the file says

    canvas = _Canvas(_background(rng, image_size), image_size)
    _clutter(canvas, rng, int(rng.integers(2, 9)))
    head = _draw_figure(canvas, rng, joints, height)
    visible = np.ones(NUM_JOINTS, dtype=bool)
    if rng.random() < 0.35:
        box = _draw_occluder(canvas, rng, joints[rng.integers(NUM_JOINTS)], 0.08 * height)
        inside = np.all((joints >= box.min(0)) & (joints <= box.max(0)), axis=1)
        visible &= ~inside
    image = _camera(canvas.finish(), rng)

    in_image = np.all((joints >= 0) & (joints <= image_size - 1), axis=1)
    joint_self = [[round(float(x) + MPII_ORIGIN, DECIMALS), round(float(y) + MPII_ORIGIN, DECIMALS), float(v)]
                  if ok else list(UNANNOTATED) for (x, y), v, ok in zip(joints, visible, in_image)]
    head_box = head.max(0) - head.min(0)
    extent = float((hi - lo).max() * 1.0)  # the whole figure, annotated or not, as MPII's scale
    scale = extent / 200.0
    centre = (joints.min(0) + joints.max(0)) / 2
    # MPIIDataset moves objpos down by 15*scale; the stored objpos makes that land on the centre
    objpos = centre - [0.0, 15.0 * scale] + MPII_ORIGIN
    record = {
        "joint_self": joint_self,
        "objpos": [round(float(objpos[0]), DECIMALS), round(float(objpos[1]), DECIMALS)],
        "scale_provided": round(scale, 6),
        "normalizer": round(float(np.hypot(*head_box)), 6),
        "dataset": "MPII",
    }
    return image, record


def pose_image_name(index: int, count: int) -> str:
    """Image file of `index`, relative to the images/ folder (as MPII's img_paths)."""
    return f"{index:0{max(5, len(str(count - 1)))}d}.png"


def write_pose(root: Path, seed: int, index: int, count: int, valid: bool, image_size: int = 256) -> dict:
    """Write synthetic pose `index` under root/images/; returns its annotation record."""
    name = pose_image_name(index, count)
    image, record = synth_pose(seed, index, image_size)
    image.save(root / IMAGE_FOLDER / name, "PNG", **PNG_OPTIONS)
    return {"img_paths": name, **record, "isValidation": 1.0 if valid else 0.0}


def write_pose_set(out: Path, seed: int, indices: list[int], valid: set[int], count: int,
                   image_size: int, progress: bool, manifest: dict, replace: bool = True) -> None:
    """Write the listed images and their annotation JSON into `out`, atomically (`replace`: as
    atomic.staged_folder's)."""
    with staged_folder(out, replace=replace) as tmp:
        (tmp / IMAGE_FOLDER).mkdir()
        records = [write_pose(tmp, seed, i, count, i in valid, image_size)
                   for i in tqdm(indices, desc="synthetic poses", unit="img", disable=not progress, leave=False)]
        (tmp / ANNOTATION_FILE).write_text(json.dumps(records) + "\n", encoding="utf-8")
        (tmp / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def write_synthetic_poses(
    out_dir: str | os.PathLike,
    count: int,
    seed: int,
    test_fraction: float = 0.2,
    image_size: int = 256,
    progress: bool = True,
    overwrite: bool = False,
) -> SynthSummary:
    """Write `count` synthetic poses to `out_dir` in the authors' MPII layout (module doc);
    round(count * test_fraction) of them are validation records (isValidation = 1)."""
    check_synth_args("poses", count, seed, test_fraction, image_size)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CUNetError(f"synthetic poses: {out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CUNetError(f"synthetic poses: {out} is not empty; choose another folder or overwrite it (--overwrite)")
    start = time.perf_counter()
    valid = set(split_test_indices(count, seed, test_fraction))
    manifest = {"generator": SYNTH_POSE_GENERATOR, "version": SYNTH_POSE_VERSION, "task": "pose", "seed": seed,
                "count": count, "test_fraction": test_fraction,
                "splits": {"train": count - len(valid), "valid": len(valid)}, "image_size": image_size,
                "num_joints": NUM_JOINTS, "layout": "mpii (CU-Net authors' annotation JSON)",
                "annotations": ANNOTATION_FILE, "coordinates": "1-based (subtract 1 for 0-based pixel centres)"}
    write_pose_set(out, seed, list(range(count)), valid, count, image_size, progress, manifest)
    seconds = time.perf_counter() - start
    return SynthSummary(out, count, count - len(valid), len(valid), image_size, seed, seconds)
