"""Landmarks for arbitrary images: crop, infer, decode back to image coordinates, draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cunet_optimize.atomic import atomic_path
from cunet_optimize.data.transforms import (
    DETECTOR_BOX_FACTOR,
    PIXEL_STD,
    crop_transform,
    decode_heatmaps,
    detector_box_crop,
    heatmap_to_image_coords,
    warp_image,
)
from cunet_optimize.evaluation import InferFn


def crop_for(image: np.ndarray, box: list[float] | None, box_factor: float = DETECTOR_BOX_FACTOR) -> np.ndarray:
    """Original -> 256 px input affine: the box x `box_factor` when a box is given (faces:
    x1.1, the authors' detector policy; a person box: x1.25, MPII's), else the whole image
    (the image is taken to be the crop)."""
    if box is not None:
        center, scale = detector_box_crop(box, box_factor)
    else:
        h, w = image.shape[:2]
        center, scale = np.array([(w - 1) / 2.0, (h - 1) / 2.0]), max(h, w) / PIXEL_STD
    return crop_transform(center, scale)


def predict_landmarks(infer: InferFn, image: np.ndarray, box: list[float] | None = None,
                      box_factor: float = DETECTOR_BOX_FACTOR) -> np.ndarray:
    """(C, 2) landmarks in the original image's 0-based pixel coordinates (sub-pixel)."""
    A = crop_for(image, box, box_factor)
    x = warp_image(image, A).astype(np.float32).transpose(2, 0, 1)[None] / 255.0
    heatmaps = infer(np.ascontiguousarray(x))
    return heatmap_to_image_coords(decode_heatmaps(heatmaps)[0], A)


def draw_landmarks(image: np.ndarray, points: np.ndarray, path: Path,
                   limbs: tuple[tuple[int, int], ...] = ()) -> Path:
    """The points (and the skeleton's `limbs`, pairs of point indices) over the image, as a PNG."""
    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    r = max(1.5, min(im.size) / 160)
    for a, b in limbs:
        draw.line([tuple(points[a]), tuple(points[b])], fill=(255, 200, 0), width=max(1, int(r)))
    for x, y in points:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 255, 0), outline=(0, 0, 0))
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return path

