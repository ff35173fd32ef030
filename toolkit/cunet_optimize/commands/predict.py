"""`cunet-optimize predict`: landmarks (faces) or joints (pose) of images, in original image coordinates."""

from __future__ import annotations

import math
from pathlib import Path

from cunet_optimize.commands.common import add_force_argument, add_model_argument, check_new_output, print_json
from cunet_optimize.errors import CUNetError
from cunet_optimize.detect import face_box_or_whole_image
from cunet_optimize.evaluation import torch_infer
from cunet_optimize.models import load_model
from cunet_optimize.data.face300w import MIN_IMAGE_SIDE, DataError, load_rgb
from cunet_optimize.predict import draw_landmarks, predict_landmarks
from cunet_optimize.tasks import FACE, POSE, task_of_model


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="landmarks / joints of images (+ an annotated PNG per image)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_argument(p)
    p.add_argument("--box", metavar="X1,Y1,X2,Y2",
                   help="face box (cropped x1.1) or, for a pose model, person box (x1.25) in pixels; default: "
                        "for faces the largest face OpenCV's detector finds (extra: pip install "
                        "'cunet-optimize[face]'), else the whole image")
    p.add_argument("--no-detect", action="store_true",
                   help="no face detector: the whole image is the face crop (images already cropped to a face)")
    p.add_argument("--out-dir", default=".", help="where the annotated PNGs go (default: current folder)")
    p.add_argument("--no-draw", action="store_true", help="do not write annotated PNGs")
    add_force_argument(p, "an annotated PNG (IMAGE-stem.landmarks.png)")
    p.add_argument("--json", action="store_true", help="print [{image, landmarks}] as JSON")
    p.set_defaults(func=run)


def _parse_box(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or not all(map(math.isfinite, box)) or box[2] <= box[0] or box[3] <= box[1]:
        raise CUNetError(f"--box {text!r}: expected four finite numbers X1,Y1,X2,Y2 (pixels) with X2 > X1 and Y2 > Y1")
    return box


def _annotated_paths(images: list[str], out_dir: Path, force: bool) -> dict[str, Path]:
    """Where each image's annotated PNG goes (OUT_DIR/<stem>.landmarks.png), checked before any
    image is read: two images of one stem (a/face.jpg, b/face.png) would draw over each
    other, which --force cannot make right; an earlier run's PNG is replaced only with
    --force; an input, never."""
    paths: dict[str, Path] = {}
    drawn_by: dict[Path, str] = {}
    for image in images:
        path = out_dir / f"{Path(image).stem}.landmarks.png"
        if path in drawn_by and drawn_by[path] != image:
            raise CUNetError(f"{drawn_by[path]} and {image} would both be drawn to {path}; "
                             "predict them into separate --out-dir folders (or pass --no-draw)")
        check_new_output(path, "--out-dir", force=force, inputs=images)
        paths[image] = drawn_by[path] = path
    return paths


def _load_image(path: str):
    image = load_rgb(path, exif_transpose=True)  # landmarks in the upright picture a viewer shows
    h, w = image.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise DataError(f"{path}: image is {w}x{h} pixels, too small for a face "
                        f"(at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}); pass a larger image")
    return image


def run(args) -> int:
    box = _parse_box(args.box)
    annotated = {} if args.no_draw else _annotated_paths(args.images, Path(args.out_dir), args.force)
    images = {path: _load_image(path) for path in args.images}  # all readable before any output
    model = load_model(args.model)
    task = task_of_model(model)
    infer = torch_infer(model)
    results = []
    for path, image in images.items():
        region, crop = box, "--box"
        if region is None and task is FACE and not args.no_detect:
            region, crop = face_box_or_whole_image(image, path), "detector"
        points = predict_landmarks(infer, image, region, task.box_factor)
        entry = {"image": path, "landmarks": [[round(float(x), 3), round(float(y), 3)] for x, y in points],
                 "box": region, "crop": crop if region is not None else "whole image"}
        if path in annotated:
            annotated[path].parent.mkdir(parents=True, exist_ok=True)
            entry["annotated"] = str(draw_landmarks(image, points, annotated[path], task.limbs))
        results.append(entry)
        if not args.json:
            what = "joints" if task is POSE else "landmarks"
            print(f"{path}: {len(points)} {what}" + (f" -> {entry['annotated']}" if "annotated" in entry else ""))
    if args.json:
        print_json(results)
    return 0
