"""Synthetic 68-point face data set: the toolkit's embedded default data.

Real 300-W cannot ship with the toolkit, yet demos, tests and calibration need face
images whose landmarks are known. This module draws them: a parametric 3-D face in
the iBUG 68-point layout and order (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47,
mouth 48-67; the docs/EVAL.md flip permutation maps a mirrored face onto itself), posed
(yaw, pitch, roll), scaled and moved, then rendered with PIL and numpy with clutter,
occluders, lighting, blur and noise. Every visible feature is drawn from the same
projected geometry as the landmarks (the jaw points are the face outline, 36-41 the
eyelid margins, 48-67 the lip contours, ...), so a network can see each point.

`write_synthetic_faces` writes a data set in the 300-W layout: `images/NNNNN.png`
with a same-stem `.pts` (1-based, see `pts.py`), `train.txt` / `test.txt` (image
paths relative to the data set folder) and `dataset.json`. Image `i` of seed `s` is
drawn from its own random stream seeded with (s, i): the same seed gives
byte-identical files (with the same numpy, Pillow and zlib), and an image does not
depend on how many are written.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from tqdm import tqdm

from cunet_optimize.atomic import staged_folder
from cunet_optimize.data.pts import PTS_ORIGIN, format_pts
from cunet_optimize.errors import CUNetError

log = logging.getLogger(__name__)

SYNTH_GENERATOR = "cunet_optimize.data.synth"
# Bump whenever the pixels or landmarks for a given seed change.
SYNTH_VERSION = 2
NUM_LANDMARKS = 68
HEAD_DEPTH = 0.55  # face units from the jaw ends' plane to the chin and brow ridge
# Drawing happens on a canvas this many times larger, then is box-averaged down:
# anti-aliased edges put the features where the landmarks say, to a fraction of a pixel.
SUPERSAMPLE = 2
# .pts coordinates are rounded to this many decimals; the drawing uses the rounded
# values, so the files are exactly the ground truth.
PTS_DECIMALS = 4
# PNG: the images are noisy, so stronger zlib settings cost time and gain little;
# level 1 with run-length matching is the cheap end of zlib's settings.
PNG_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_RLE}


# --------------------------------------------------------------------------- shape


@dataclass(frozen=True, eq=False)
class FaceParams:
    """Shape, expression and head pose of one synthetic face.

    Lengths are in face units: the jaw ends (points 0 and 16) are about 1 unit either
    side of the face's vertical axis, y points down, the eye line is y = 0 and z points
    from the plane of the jaw ends towards the camera. Neutral values give
    `canonical_face_shape`.
    """

    jaw_width: float = 1.0  # half width at points 0/16
    jaw_squareness: float = 2.5  # superellipse exponent of the jaw: 2 = round, 3 = square
    chin_y: float = 1.55  # chin (point 8) below the eye line, mouth closed
    eye_spacing: float = 0.42  # eye centre from the axis
    eye_width: float = 0.40
    nose_base_y: float = 0.62  # point 33
    nose_width: float = 0.22  # half distance 31-35
    mouth_gap: float = 0.32  # from the nose base to the lips' meeting line
    mouth_width: float = 0.36  # half distance 48-54
    upper_lip: float = 0.10  # lip thicknesses
    lower_lip: float = 0.12
    # expression
    mouth_open: float = 0.0  # gap between the inner lip contours
    smile: float = 0.0  # lift of the mouth corners
    eye_open: float = 1.0  # lid opening relative to a relaxed eye
    brow_raise: float = 0.0
    # head pose, degrees
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    # per-point individuality in face units, (68, 2); zeros when None
    jitter: np.ndarray | None = field(default=None, repr=False)


def sample_face_params(rng: np.random.Generator) -> FaceParams:
    """A random face: shape, expression and pose drawn around the neutral values."""
    u = rng.uniform
    mouth_open = 0.0 if rng.random() < 0.45 else u(0.02, 0.32)
    return FaceParams(
        jaw_width=u(0.9, 1.1),
        jaw_squareness=u(2.0, 3.0),
        chin_y=u(1.42, 1.68),
        eye_spacing=u(0.38, 0.46),
        eye_width=u(0.34, 0.44),
        nose_base_y=u(0.54, 0.70),
        nose_width=u(0.18, 0.27),
        mouth_gap=u(0.26, 0.36),
        mouth_width=u(0.30, 0.44),
        upper_lip=u(0.06, 0.12),
        lower_lip=u(0.08, 0.15),
        mouth_open=mouth_open,
        smile=u(-0.04, 0.14),
        eye_open=float(np.clip(rng.normal(1.0, 0.25), 0.25, 1.4)),
        brow_raise=u(-0.05, 0.12),
        yaw=float(np.clip(rng.normal(0.0, 14.0), -35.0, 35.0)),
        pitch=float(np.clip(rng.normal(0.0, 6.0), -15.0, 15.0)),
        roll=float(np.clip(rng.normal(0.0, 10.0), -30.0, 30.0)),
        jitter=rng.normal(0.0, 0.012, size=(NUM_LANDMARKS, 2)),
    )


def _head_depth(x: np.ndarray, half_width: float) -> np.ndarray:
    """Depth of the face surface over the plane of the jaw ends (points 0/16): a parabola.

    Its slope at the face's edge, 2*HEAD_DEPTH/half_width, stays below cot(yaw) for
    every yaw drawn (|yaw| <= 35 deg, half width >= 0.9), so the jaw is always the
    silhouette: no feature is turned out past the outline.
    """
    return HEAD_DEPTH * np.clip(1.0 - (np.asarray(x) / half_width) ** 2, 0.0, None)


def _jaw(p: FaceParams) -> np.ndarray:
    """Points 0-16: a superellipse from ear to ear through the chin (x, y)."""
    theta = np.linspace(0.0, np.pi, 17)
    e = 2.0 / p.jaw_squareness
    c, s = np.cos(theta), np.sin(theta)
    top = 0.05
    chin = p.chin_y + 0.8 * p.mouth_open  # the jaw drops when the mouth opens
    x = -p.jaw_width * np.sign(c) * np.abs(c) ** e
    y = top + (chin - top) * np.abs(s) ** e
    return np.stack([x, y], axis=1)


def _brows(p: FaceParams) -> np.ndarray:
    """Points 17-21 (outer to inner) and their mirror 22-26, on the brows' upper edge."""
    t = np.linspace(0.0, 1.0, 5)  # outer -> inner
    outer = p.eye_spacing + 0.5 * p.eye_width + 0.05
    inner = 0.13 + 0.2 * (p.eye_spacing - 0.42)
    x = -(outer + (inner - outer) * t)
    y = -0.26 - p.brow_raise - 0.09 * np.sin(np.pi * (0.25 + 0.7 * t)) + 0.02 * t
    left = np.stack([x, y], axis=1)
    right = left[::-1] * [-1.0, 1.0]
    return np.concatenate([left, right])


def _nose(p: FaceParams) -> np.ndarray:
    """Bridge 27-30 (top to tip) and lower nose 31-35 (left to right)."""
    tip = p.nose_base_y - 0.09
    bridge_y = np.linspace(-0.12, tip, 4)
    bridge = np.stack([np.zeros(4), bridge_y], axis=1)
    w = p.nose_width
    lower = np.array([[-w, -0.05], [-0.5 * w, -0.01], [0.0, 0.0], [0.5 * w, -0.01], [w, -0.05]])
    lower[:, 1] += p.nose_base_y
    return np.concatenate([bridge, lower])


def _eyes(p: FaceParams) -> np.ndarray:
    """Points 36-41 (viewer's left eye) and 42-47, each corner, upper lid, corner, lower lid."""
    hw = 0.5 * p.eye_width
    up = 0.085 * p.eye_open * (p.eye_width / 0.4)
    low = 0.06 * min(p.eye_open, 1.1) * (p.eye_width / 0.4)
    # outer corner, upper 1/3, upper 2/3, inner corner, lower 2/3, lower 1/3 (left eye)
    local = np.array([
        [-hw, -0.015], [-hw / 3, -up], [hw / 3, -up], [hw, 0.0], [hw / 3, low], [-hw / 3, low],
    ])
    left = local + [-p.eye_spacing, 0.0]
    # Mirror image of the left eye, re-ordered inner corner first as in iBUG.
    right = (left * [-1.0, 1.0])[[3, 2, 1, 0, 5, 4]]
    return np.concatenate([left, right])


def _mouth(p: FaceParams) -> np.ndarray:
    """Outer lips 48-59 and inner lips 60-67, clockwise from the left corner."""
    w, o = p.mouth_width, p.mouth_open
    up_in, low_in = -0.5 * o, 0.5 * o
    tu, tl = p.upper_lip, p.lower_lip
    outer = np.array([
        [-w, 0.0],
        [-0.55 * w, up_in - 0.85 * tu], [-0.2 * w, up_in - tu], [0.0, up_in - 0.85 * tu],
        [0.2 * w, up_in - tu], [0.55 * w, up_in - 0.85 * tu],
        [w, 0.0],
        [0.55 * w, low_in + 0.8 * tl], [0.22 * w, low_in + tl], [0.0, low_in + tl],
        [-0.22 * w, low_in + tl], [-0.55 * w, low_in + 0.8 * tl],
    ])
    wi = 0.86 * w
    inner = np.array([
        [-wi, 0.0], [-0.4 * w, up_in], [0.0, up_in], [0.4 * w, up_in],
        [wi, 0.0], [0.4 * w, low_in], [0.0, low_in], [-0.4 * w, low_in],
    ])
    mouth = np.concatenate([outer, inner])
    # A smile lifts the corners, more the further from the middle.
    mouth[:, 1] -= p.smile * (mouth[:, 0] / w) ** 2
    mouth[:, 1] += p.nose_base_y + p.mouth_gap
    return mouth


# depth offsets over the head surface, per landmark group (why: a nose that sticks
# out and eyes that sit in is what makes yaw move the features differently)
_Z_OFFSET = np.concatenate([
    np.zeros(17),  # jaw
    np.full(10, 0.02),  # brows
    [0.12, 0.22, 0.32, 0.42],  # bridge to tip
    [0.10, 0.17, 0.24, 0.17, 0.10],  # lower nose
    np.full(12, -0.08),  # eyes
    np.full(20, 0.05),  # mouth
])


def face_landmarks_3d(p: FaceParams) -> np.ndarray:
    """The 68 landmarks of an unposed face, (68, 3) in face units."""
    xy = np.concatenate([_jaw(p), _brows(p), _nose(p), _eyes(p), _mouth(p)])
    if p.jitter is not None:
        xy = xy + p.jitter
    z = _head_depth(xy[:, 0], p.jaw_width) + _Z_OFFSET
    return np.concatenate([xy, z[:, None]], axis=1)


def canonical_face_shape() -> np.ndarray:
    """The neutral, frontal, symmetric face: (68, 2) in face units (eye line y = 0)."""
    return face_landmarks_3d(FaceParams())[:, :2]


def pose_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation (3, 3) applied to face points: yaw about y, then pitch about x, then roll."""
    a, b, c = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ rx @ ry


def face_landmarks(p: FaceParams) -> np.ndarray:
    """The 68 landmarks posed and projected (orthographic), (68, 2) in face units."""
    return face_landmarks_3d(p) @ pose_matrix(p.yaw, p.pitch, p.roll)[:2].T


# --------------------------------------------------------------------------- render


@functools.lru_cache(maxsize=None)
def _catmull_rom_basis(per_segment: int) -> np.ndarray:
    """(per_segment, 4) weights of the 4 control points at t = 0, 1/k, ..."""
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    return 0.5 * np.concatenate(
        [-t + 2 * t**2 - t**3, 2 - 5 * t**2 + 3 * t**3, t + 4 * t**2 - 3 * t**3, -(t**2) + t**3], axis=1
    )


def _smooth(points: np.ndarray, per_segment: int = 4, closed: bool = False) -> np.ndarray:
    """Catmull-Rom curve through the points, so drawn contours pass through the landmarks."""
    pts = np.asarray(points, dtype=np.float64)
    if closed:
        ext, n_seg = np.concatenate([pts[-1:], pts, pts[:2]]), len(pts)
    else:
        ext, n_seg = np.concatenate([pts[:1], pts, pts[-1:]]), len(pts) - 1
    windows = np.stack([ext[k : k + n_seg] for k in range(4)], axis=1)  # (n_seg, 4, 2)
    curve = (_catmull_rom_basis(per_segment) @ windows).reshape(-1, 2)
    return curve if closed else np.concatenate([curve, pts[-1:]])


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], axis=1)


def _rgb(colour) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.round(np.asarray(colour, dtype=np.float64)), 0, 255))


def _mix(a, b, t: float) -> tuple[int, int, int]:
    """Colour a*(1-t) + b*t."""
    return _rgb(np.asarray(a, dtype=np.float64) * (1 - t) + np.asarray(b, dtype=np.float64) * t)


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return _rgb(rng.integers(0, 256, size=3))


def _skin_colour(rng: np.random.Generator) -> np.ndarray:
    light, dark = np.array([242.0, 205.0, 180.0]), np.array([88.0, 58.0, 42.0])
    tone = light + (dark - light) * rng.uniform(0.0, 1.0) ** 1.3
    return np.clip(tone * rng.uniform(0.92, 1.08, size=3), 0, 255)


_BLACK = (0, 0, 0)
_WHITE = (255, 255, 255)
_HAIR = np.array([[20, 16, 14], [60, 40, 25], [110, 75, 40], [190, 150, 90], [140, 60, 30], [160, 160, 160]])
_IRIS = np.array([[70, 45, 25], [110, 75, 40], [60, 100, 150], [80, 110, 70], [40, 30, 25]])
# Lighting gains are stored as 8-bit images (PIL does the per-pixel work): value 255
# means this gain.
_GAIN_MAX = 1.6
_GAIN_GRID = 64  # lighting is smooth: computed on this grid, then resized


class _Canvas:
    """A supersampled RGB canvas addressed in final-image pixel coordinates."""

    def __init__(self, image: Image.Image, size: int):
        self.size = size
        self.image = image
        self.draw = ImageDraw.Draw(image)

    @staticmethod
    def _canvas_array(xy: np.ndarray) -> np.ndarray:
        # final pixel j covers canvas pixels j*S .. j*S+S-1, whose centre is j*S + (S-1)/2
        return np.asarray(xy, dtype=np.float64) * SUPERSAMPLE + (SUPERSAMPLE - 1) / 2

    @classmethod
    def to_canvas(cls, xy: np.ndarray) -> list[tuple[float, float]]:
        return [tuple(v) for v in cls._canvas_array(xy).tolist()]

    def polygon(self, xy: np.ndarray, colour) -> None:
        self.draw.polygon(self.to_canvas(xy), fill=colour)

    def line(self, xy: np.ndarray, colour, width: float) -> None:
        w = max(1, int(round(width * SUPERSAMPLE)))
        self.draw.line(self.to_canvas(xy), fill=colour, width=w, joint="curve")

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, colour) -> None:
        (x0, y0), (x1, y1) = self.to_canvas(np.array([[cx - rx, cy - ry], [cx + rx, cy + ry]]))
        if x1 >= x0 and y1 >= y0:
            self.draw.ellipse([x0, y0, x1, y1], fill=colour)

    def polygon_clipped(self, shape: np.ndarray, clip: np.ndarray, colour) -> None:
        """Fill shape ∩ clip (both polygons): an iris inside the lids, teeth inside the lips."""
        polys = [self._canvas_array(shape), self._canvas_array(clip)]
        both = np.concatenate(polys)
        n = self.image.size[0]
        x0, y0 = np.clip(np.floor(both.min(0)).astype(int) - 1, 0, n).tolist()
        x1, y1 = np.clip(np.ceil(both.max(0)).astype(int) + 2, 0, n).tolist()
        if x1 <= x0 or y1 <= y0:
            return
        masks = []
        for poly in polys:
            m = Image.new("L", (x1 - x0, y1 - y0), 0)
            ImageDraw.Draw(m).polygon([tuple(v) for v in (poly - [x0, y0]).tolist()], fill=255)
            masks.append(m)
        self.image.paste(colour, (x0, y0), ImageChops.darker(*masks))

    def coverage(self, xy: np.ndarray) -> Image.Image:
        """Anti-aliased final-size mask of a polygon."""
        mask = Image.new("L", self.image.size, 0)
        ImageDraw.Draw(mask).polygon(self.to_canvas(xy), fill=255)
        return mask.reduce(SUPERSAMPLE)

    def finish(self) -> Image.Image:
        """The canvas box-averaged down to the final size."""
        return self.image.reduce(SUPERSAMPLE)


class _Projection:
    """Face units -> image pixels: pose rotation, orthographic projection, scale, shift."""

    def __init__(self, rot: np.ndarray, scale: float, offset: np.ndarray):
        self.rot, self.scale, self.offset = rot, scale, offset

    def __call__(self, xyz: np.ndarray) -> np.ndarray:
        return np.asarray(xyz, dtype=np.float64) @ self.rot[:2].T * self.scale + self.offset

    def at_depth(self, xy: np.ndarray, z) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64)
        return self(np.concatenate([xy, np.broadcast_to(np.asarray(z, dtype=np.float64), len(xy))[:, None]], axis=1))


def _place(lm_unit: np.ndarray, rng: np.random.Generator, size: int) -> tuple[float, np.ndarray]:
    """Scale and shift so the landmark box side is 40-70 % of the image, fully inside."""
    lo, hi = lm_unit.min(0), lm_unit.max(0)
    scale = rng.uniform(0.40, 0.70) * size / (hi - lo).max()
    margin = 0.03 * size
    box = (hi - lo) * scale
    corner = np.array([rng.uniform(margin, max(margin, size - 1 - margin - box[k])) for k in range(2)])
    return float(scale), corner - lo * scale


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A two-colour linear gradient the size of the supersampled canvas."""
    a, b = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    r = np.linspace(-0.5, 0.5, 16)
    ramp = np.cos(angle) * r[None, :] + np.sin(angle) * r[:, None] + 0.5
    small = a + (b - a) * ramp[..., None]
    n = size * SUPERSAMPLE
    # smooth up to the final size, then repeat pixels (the canvas is averaged back down)
    image = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return image.resize((n, n), Image.NEAREST)


def _clutter(canvas: _Canvas, rng: np.random.Generator, count: int) -> None:
    s = canvas.size
    for _ in range(count):
        colour = _random_colour(rng)
        kind = rng.integers(4)
        cx, cy = rng.uniform(-0.1, 1.1, size=2) * s
        r = rng.uniform(0.03, 0.35) * s
        if kind == 0:
            canvas.ellipse(cx, cy, r, r * rng.uniform(0.3, 1.0), colour)
        elif kind == 1:
            n = rng.integers(3, 7)
            canvas.polygon(np.array([cx, cy]) + rng.uniform(-r, r, size=(n, 2)), colour)
        elif kind == 2:
            ang = rng.uniform(0, np.pi)
            d = np.array([np.cos(ang), np.sin(ang)]) * r * 2
            canvas.line(np.array([[cx, cy] - d, [cx, cy] + d]), colour, rng.uniform(1, 0.06 * s))
        else:
            w, h = r, r * rng.uniform(0.2, 1.5)
            canvas.polygon(np.array([[cx - w, cy - h], [cx + w, cy - h], [cx + w, cy + h], [cx - w, cy + h]]), colour)


def _forehead(lm3: np.ndarray, height: float) -> np.ndarray:
    """Face-plane points over the top of the head, from jaw point 16 round to point 0."""
    top = (lm3[0, 1] + lm3[16, 1]) / 2
    half = (lm3[16, 0] - lm3[0, 0]) / 2
    phi = np.linspace(0.0, np.pi, 15)[1:-1]
    return np.stack([half * np.cos(phi), top - height * np.sin(phi)], axis=1)


def _draw_head(canvas, rng, p, proj, lm3, landmarks, skin, hair) -> np.ndarray:
    """Body, neck, back hair, ears, the face and the fringe; returns the face outline."""
    scale = proj.scale
    half = (lm3[16, 0] - lm3[0, 0]) / 2
    forehead_xy = _forehead(lm3, rng.uniform(1.05, 1.3))
    forehead = proj.at_depth(forehead_xy, _head_depth(forehead_xy[:, 0], half))

    down = proj.rot[:2, 1]  # the face's "down" in the image
    shoulders = landmarks[8] + down * scale * rng.uniform(2.2, 2.7)
    canvas.ellipse(shoulders[0], shoulders[1], scale * rng.uniform(1.6, 2.4), scale * 1.4, _random_colour(rng))
    neck = proj(np.array([[-0.55, 0.9, -0.1], [0.55, 0.9, -0.1], [0.65, 3.0, -0.2], [-0.65, 3.0, -0.2]]))
    canvas.polygon(neck, _mix(skin, _BLACK, rng.uniform(0.2, 0.4)))
    hair_style = rng.integers(4)  # 0 bald, 1 short, 2 long, 3 short with a fringe
    if hair_style:
        grow = rng.uniform(1.06, 1.18)
        back = np.concatenate([[[half * grow, 0.25]], forehead_xy * [grow, 1.0] + [0.0, -0.08], [[-half * grow, 0.25]]])
        if hair_style == 2:
            length = rng.uniform(1.6, 3.0)
            back = np.concatenate([[[half * 1.1, length]], back, [[-half * 1.1, length]]])
        canvas.polygon(proj.at_depth(back, -0.2), _mix(hair, _BLACK, 0.15))
    ear_tone = _mix(skin, _BLACK, 0.12)
    for side in (-1.0, 1.0):
        canvas.polygon(proj.at_depth(_ellipse(side * half * 1.02, 0.28, 0.13, 0.27, 16), -0.15), ear_tone)

    # The face: the jaw points are its lower outline.
    outline = np.concatenate([landmarks[:17], forehead])
    canvas.polygon(outline, _rgb(skin))
    if hair_style in (1, 3):
        hairline = rng.uniform(-1.0, -0.75) if hair_style == 1 else rng.uniform(-0.75, -0.58)
        cap = forehead_xy[forehead_xy[:, 1] < hairline]
        if len(cap):
            edge = np.stack([np.linspace(cap[-1, 0], cap[0, 0], 7), hairline + rng.normal(0, 0.03, size=7)], axis=1)
            fringe = np.concatenate([cap, edge])
            canvas.polygon(proj.at_depth(fringe, _head_depth(fringe[:, 0], half)), _rgb(hair))
    return outline


def _luma(colour) -> float:
    return float(np.dot(colour, [0.299, 0.587, 0.114]))


def _draw_brows(canvas, rng, proj, lm3, landmarks, skin, hair) -> None:
    """Brow bands hanging from points 17-26 (the landmarks are the brows' upper edge)."""
    colour = _mix(hair, (20, 15, 10), rng.uniform(0.2, 0.7))
    if abs(_luma(colour) - _luma(skin)) < 30:
        colour = _mix(skin, _BLACK, 0.45)  # brows of the skin's shade would be invisible
    thickness = rng.uniform(0.04, 0.09)
    for idx, taper in ((slice(17, 22), np.linspace(0.45, 1.0, 5)), (slice(22, 27), np.linspace(1.0, 0.45, 5))):
        lower = lm3[idx] + np.stack([np.zeros(5), thickness * taper, np.zeros(5)], axis=1)
        canvas.polygon(np.concatenate([_smooth(landmarks[idx], 3), proj(lower)[::-1]]), colour)


def _draw_eyes(canvas, rng, p, proj, lm3, landmarks, skin) -> None:
    """White, iris and pupil inside the lids (36-41, 42-47), lash line, lower lid, crease."""
    white = _mix((235, 230, 225), skin, rng.uniform(0.0, 0.3))
    iris_colour = _rgb(_IRIS[rng.integers(len(_IRIS))])
    gaze = rng.normal(0.0, [0.06, 0.02])
    lash = _mix(skin, (15, 10, 10), rng.uniform(0.6, 0.9))
    crease = _mix(skin, _BLACK, rng.uniform(0.05, 0.25))
    lid = max(0.6, 0.018 * proj.scale)
    r_iris = 0.225 * p.eye_width
    for first in (36, 42):
        eye = slice(first, first + 6)
        outline = _smooth(landmarks[eye], 4, closed=True)
        canvas.polygon(outline, white)
        c = lm3[eye].mean(0)
        for radius, colour in ((r_iris, iris_colour), (0.4 * r_iris, (10, 8, 8))):
            disc = proj.at_depth(_ellipse(c[0] + gaze[0], c[1] + gaze[1], radius, radius, 20), c[2])
            canvas.polygon_clipped(disc, outline, colour)
        upper = [first, first + 1, first + 2, first + 3]
        lower = [first + 3, first + 4, first + 5, first]
        canvas.line(_smooth(landmarks[upper], 4), lash, lid * 1.6)
        canvas.line(_smooth(landmarks[lower], 4), _mix(skin, lash, 0.5), lid * 0.7)
        fold = lm3[upper] + [0.0, -0.05 - 0.03 * p.eye_open, 0.0]
        canvas.line(_smooth(proj(fold), 3), crease, lid * 0.6)


def _draw_nose(canvas, rng, p, proj, lm3, landmarks, skin) -> None:
    """Side shadow from the bridge (27-29) to one wing, darker underside along 31-35,
    nostrils by 32 and 34, highlight down the bridge to the tip (30)."""
    scale = proj.scale
    wing = 31 if rng.random() < 0.5 else 35
    side = np.stack([
        landmarks[27] * 0.6 + landmarks[wing] * 0.4, landmarks[28] * 0.5 + landmarks[wing] * 0.5, landmarks[wing]
    ])
    canvas.line(_smooth(side, 4), _mix(skin, _BLACK, rng.uniform(0.15, 0.3)), max(0.8, 0.03 * scale))
    tip = lm3[30]
    flank = proj(np.array([tip + [0.4 * p.nose_width, 0.0, 0.0], tip - [0.4 * p.nose_width, 0.0, 0.0]]))
    canvas.polygon(np.concatenate([_smooth(landmarks[31:36], 3), flank]), _mix(skin, _BLACK, 0.12))
    nostril_colour = _mix(skin, (20, 5, 5), 0.7)
    for k, sx in ((32, -1), (34, 1)):
        c = lm3[k] + [0.1 * sx * p.nose_width, -0.03, 0.0]
        canvas.polygon(proj.at_depth(_ellipse(c[0], c[1], 0.45 * p.nose_width, 0.035, 12), c[2]), nostril_colour)
    canvas.line(_smooth(landmarks[31:36], 3), _mix(skin, (20, 5, 5), 0.45), max(0.7, 0.012 * scale))
    canvas.line(landmarks[28:31], _mix(skin, _WHITE, rng.uniform(0.1, 0.3)), max(0.7, 0.025 * scale))
    canvas.ellipse(landmarks[30, 0], landmarks[30, 1], 0.035 * scale, 0.03 * scale, _mix(skin, _WHITE, 0.3))


def _draw_mouth(canvas, rng, p, proj, lm3, landmarks, skin) -> None:
    """Lips between the outer (48-59) and inner (60-67) contours, dark inside and teeth
    when open, and the dark line where the lips meet."""
    lip = _mix(skin, (170, 40, 50), rng.uniform(0.25, 0.6))
    canvas.polygon(_smooth(landmarks[48:60], 4, closed=True), lip)
    inner = _smooth(landmarks[60:68], 4, closed=True)
    if p.mouth_open > 0.02:
        canvas.polygon(inner, (45, 12, 15))
        if rng.random() < 0.7:
            edge = lm3[60:65]
            teeth = np.concatenate([edge, (edge + [0.0, min(0.09, 0.6 * p.mouth_open), 0.0])[::-1]])
            canvas.polygon_clipped(proj(teeth), inner, _mix((240, 235, 220), skin, 0.15))
    upper_lip = np.concatenate([_smooth(landmarks[48:55], 4), _smooth(landmarks[[64, 63, 62, 61, 60]], 4)])
    canvas.polygon(upper_lip, _mix(lip, _BLACK, 0.12))
    meet, width = _mix(lip, (30, 5, 5), 0.6), max(0.7, 0.012 * proj.scale)
    canvas.line(_smooth(landmarks[60:65], 4), meet, width)
    canvas.line(_smooth(landmarks[[64, 65, 66, 67, 60]], 4), meet, width)


def _draw_occluder(canvas, rng, scale, landmarks, skin) -> None:
    """A bar or a blob over part of the face; the landmarks under it stay labelled."""
    target = landmarks[rng.integers(NUM_LANDMARKS)] + rng.normal(0, 0.2 * scale, size=2)
    colour = _random_colour(rng) if rng.random() < 0.7 else _rgb(skin)
    if rng.random() < 0.5:
        ang = rng.uniform(0, np.pi)
        d = np.array([np.cos(ang), np.sin(ang)]) * scale * rng.uniform(0.6, 2.5)
        canvas.line(np.array([target - d, target + d]), colour, scale * rng.uniform(0.12, 0.4))
    else:
        n = int(rng.integers(5, 9))
        r = scale * rng.uniform(0.2, 0.5) * rng.uniform(0.6, 1.0, size=n)
        a = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        canvas.polygon(target + np.stack([r * np.cos(a), r * np.sin(a)], axis=1), colour)


def _lighting_gains(rng, p, proj, size: int) -> tuple[Image.Image, Image.Image]:
    """(face gain, elsewhere gain) as 8-bit images, 255 = _GAIN_MAX.

    Both carry a weak global ramp and blotchy low-frequency texture; the face adds a
    stronger directional ramp and darkens towards its sides, which gives it relief
    and sets the jaw off from a background of the same colour.
    """
    g = _GAIN_GRID
    centres = (np.arange(g) + 0.5) * (size / g) - 0.5  # grid cell centres in pixels
    dx = centres[None, :] - proj.offset[0]
    dy = centres[:, None] - proj.offset[1]
    inv = np.linalg.inv(proj.rot[:2, :2] * proj.scale * p.jaw_width)
    across = np.minimum((inv[0, 0] * dx + inv[0, 1] * dy) ** 2, 1.0)  # (face x / jaw half width)^2
    light = rng.uniform(0, 2 * np.pi)
    towards = np.cos(light) * dx + np.sin(light) * dy
    elsewhere = 1.0 + rng.uniform(0.0, 0.2) * towards / size
    cells = int(rng.integers(4, 12))
    blotch = rng.normal(0.0, rng.uniform(0.01, 0.06), size=(cells, cells)).astype(np.float32)
    elsewhere = elsewhere * (1.0 + np.asarray(Image.fromarray(blotch).resize((g, g), Image.BICUBIC)))
    face = elsewhere * (1.0 + rng.uniform(0.0, 0.35) * towards / (2 * proj.scale) - rng.uniform(0.1, 0.35) * across**2)

    def to_image(gain: np.ndarray) -> Image.Image:
        gain8 = np.clip(np.round(gain / _GAIN_MAX * 255), 0, 255).astype(np.uint8)
        return Image.fromarray(gain8).resize((size, size), Image.BILINEAR)

    return to_image(face), to_image(elsewhere)


def _camera(img: Image.Image, rng: np.random.Generator, face_mask: Image.Image, gains) -> Image.Image:
    """Lighting, colour cast, contrast, brightness, sometimes grey, defocus and noise.

    All per-pixel work is done by PIL on 8-bit images: several times faster than
    float arrays, which matters at 50+ images a second.
    """
    size = img.size[0]
    gain = Image.composite(gains[0], gains[1], face_mask)
    img = ImageChops.multiply(img, Image.merge("RGB", (gain, gain, gain)))
    cast = rng.uniform(0.9, 1.1, size=3) * rng.uniform(0.75, 1.2) * _GAIN_MAX
    lut = np.arange(256)[None, :] * cast[:, None] + rng.uniform(-15, 15)
    img = img.point(np.clip(np.round(lut), 0, 255).astype(int).ravel().tolist())
    if rng.random() < 0.07:
        img = img.convert("L").convert("RGB")
    blur = rng.uniform(0.0, 1.5) if rng.random() < 0.7 else 0.0
    if blur > 0.3:
        img = img.filter(ImageFilter.BoxBlur(blur))  # one box pass: a third of GaussianBlur's cost
    amp = int(rng.integers(0, 15))
    if amp >= 2:
        noise = Image.fromarray(rng.integers(0, 2 * amp + 1, size=(size, size, 3), dtype=np.uint8))
        img = ImageChops.add(img, noise, scale=1.0, offset=-amp)
    return img


def render_face(p: FaceParams, rng: np.random.Generator, image_size: int = 256) -> tuple[Image.Image, np.ndarray]:
    """Draw face `p` at a random place and scale; appearance comes from `rng`.

    Returns the RGB image and its (68, 2) landmarks in 0-based pixel coordinates.
    """
    rot = pose_matrix(p.yaw, p.pitch, p.roll)
    lm3 = face_landmarks_3d(p)
    scale, offset = _place(lm3 @ rot[:2].T, rng, image_size)
    proj = _Projection(rot, scale, offset)
    # What the .pts file will say (to PTS_DECIMALS) is what gets drawn.
    landmarks = np.round(proj(lm3) + PTS_ORIGIN, PTS_DECIMALS) - PTS_ORIGIN

    skin = _skin_colour(rng)
    hair = np.clip(_HAIR[rng.integers(len(_HAIR))] * rng.uniform(0.8, 1.2, size=3), 0, 255)
    canvas = _Canvas(_background(rng, image_size), image_size)
    _clutter(canvas, rng, int(rng.integers(2, 9)))
    outline = _draw_head(canvas, rng, p, proj, lm3, landmarks, skin, hair)
    _draw_brows(canvas, rng, proj, lm3, landmarks, skin, hair)
    _draw_eyes(canvas, rng, p, proj, lm3, landmarks, skin)
    _draw_nose(canvas, rng, p, proj, lm3, landmarks, skin)
    _draw_mouth(canvas, rng, p, proj, lm3, landmarks, skin)
    if rng.random() < 0.2:
        _draw_occluder(canvas, rng, scale, landmarks, skin)
    gains = _lighting_gains(rng, p, proj, image_size)
    return _camera(canvas.finish(), rng, canvas.coverage(outline), gains), landmarks


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of image `index` of data set `seed` (independent of the count)."""
    return np.random.default_rng([seed, index])


def synth_face(seed: int, index: int, image_size: int = 256) -> tuple[Image.Image, np.ndarray]:
    """Image `index` of data set `seed`: (RGB image, (68, 2) 0-based landmarks)."""
    rng = image_rng(seed, index)
    return render_face(sample_face_params(rng), rng, image_size)


# Graph verification (export, every surgery pass, thread timing) runs on these faces.
VERIFY_SEED = 0
VERIFY_SIZE = 256  # the network's input size


def verification_batch(batch: int) -> np.ndarray:
    """Synthetic faces (deterministic, no data needed), float32 [batch, 3, 256, 256] in
    [0, 1]: inputs from the distribution the model was calibrated on. Uniform noise lies
    far outside the calibrated ranges, and on a quantized graph the rounding-boundary
    flips then cascade, so the same correct graph errs far more on noise than on faces."""
    faces = [np.asarray(synth_face(VERIFY_SEED, i, VERIFY_SIZE)[0], dtype=np.float32) for i in range(batch)]
    return np.ascontiguousarray(np.stack(faces).transpose(0, 3, 1, 2) / np.float32(255.0))


# --------------------------------------------------------------------------- data set


@dataclass(frozen=True)
class SynthSummary:
    """What `write_synthetic_faces` wrote."""

    out_dir: Path
    count: int
    train_count: int
    test_count: int
    image_size: int
    seed: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["images_per_second"] = round(self.images_per_second, 1)
        return d


def image_name(index: int, count: int) -> str:
    """Relative path of image `index` in a set of `count` (its .pts sits beside it)."""
    return f"images/{index:0{max(5, len(str(count - 1)))}d}.png"


def write_face(root: Path, seed: int, index: int, count: int, image_size: int = 256) -> str:
    """Write synthetic face `index` (PNG + .pts) under `root`; returns its relative path."""
    name = image_name(index, count)
    image, landmarks = synth_face(seed, index, image_size)
    image.save(root / name, "PNG", **PNG_OPTIONS)
    (root / name).with_suffix(".pts").write_text(format_pts(landmarks), encoding="utf-8")
    return name


def split_test_indices(count: int, seed: int, test_fraction: float) -> list[int]:
    """Indices of the test images: the round(count*fraction) images with the smallest
    per-image split draw (at least one image on each side)."""
    n_test = min(count - 1, max(1, round(count * test_fraction)))
    draws = np.array([np.random.default_rng([seed, i, 1]).random() for i in range(count)])
    return sorted(np.argsort(draws, kind="stable")[:n_test].tolist())


def check_synth_args(what: str, count: int, seed: int, test_fraction: float, image_size: int) -> None:
    """The arguments every synthetic set takes (`what`: "faces", "poses"), as one-line errors."""
    if not isinstance(count, int) or count < 2:
        raise CUNetError(f"synthetic {what}: count must be an integer >= 2 (one train, one test image), got {count!r}")
    if not isinstance(seed, int) or seed < 0:
        raise CUNetError(f"synthetic {what}: seed must be a non-negative integer, got {seed!r}")
    if not 0.0 < test_fraction < 1.0:
        raise CUNetError(f"synthetic {what}: test fraction must be between 0 and 1 (exclusive), got {test_fraction!r}")
    if not isinstance(image_size, int) or not 64 <= image_size <= 4096:
        raise CUNetError(f"synthetic {what}: image size must be an integer in 64..4096, got {image_size!r}")


def write_synthetic_faces(
    out_dir: str | os.PathLike,
    count: int,
    seed: int,
    test_fraction: float = 0.2,
    image_size: int = 256,
    progress: bool = True,
    overwrite: bool = False,
) -> SynthSummary:
    """Write `count` synthetic faces to `out_dir` in the 300-W layout (see module doc).

    The set is written to a hidden folder next to `out_dir` and renamed into place at
    the end, so an interrupted run leaves nothing behind. An existing non-empty
    `out_dir` is an error unless `overwrite`.
    """
    check_synth_args("faces", count, seed, test_fraction, image_size)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CUNetError(f"synthetic faces: {out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CUNetError(f"synthetic faces: {out} is not empty; choose another folder or overwrite it (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    with staged_folder(out) as tmp:  # an existing `out` is replaced only when allowed (above)
        (tmp / "images").mkdir()
        names = [image_name(i, count) for i in range(count)]
        for i in tqdm(range(count), desc="synthetic faces", unit="img", disable=not progress):
            write_face(tmp, seed, i, count, image_size)
        test = set(split_test_indices(count, seed, test_fraction))
        splits = {
            "train": [names[i] for i in range(count) if i not in test],
            "test": [names[i] for i in sorted(test)],
        }
        for split, lines in splits.items():
            (tmp / f"{split}.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        manifest = {
            "generator": SYNTH_GENERATOR,
            "version": SYNTH_VERSION,
            "seed": seed,
            "count": count,
            "test_fraction": test_fraction,
            "splits": {k: len(v) for k, v in splits.items()},
            "image_size": image_size,
            "num_landmarks": NUM_LANDMARKS,
            "landmark_layout": "ibug68",
            "pts_coordinates": "1-based (subtract 1 for 0-based pixel centres)",
        }
        (tmp / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - start
    summary = SynthSummary(out, count, len(splits["train"]), len(splits["test"]), image_size, seed, seconds)
    log.debug("wrote %d synthetic faces to %s in %.1f s (%.0f images/s)",
              count, out, seconds, summary.images_per_second)
    return summary


