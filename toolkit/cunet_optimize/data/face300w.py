"""300-W style face-landmark dataset: a folder of images with same-stem `.pts` files.

Each item is one face cropped to the network input (3x256x256 float32 in [0, 1]) with
its Gaussian target heatmaps (C x 64 x 64), the landmarks in original-image
coordinates and the crop transform, so predictions map back exactly (see
`cunet_optimize.data.transforms` for the coordinate conventions).

Two crop policies change NME noticeably and are recorded in `Face300W.crop_policy`:
``"tight"`` (HRNet: box of the ground-truth landmarks, scale = max(w, h) / 200 * 1.25)
and ``"detector"`` (CU-Net authors: a face-detector box per image, max(w, h) / 200 * 1.1).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from cunet_optimize.data.pts import PtsError, read_pts
from cunet_optimize.data.transforms import (
    FACE68_FLIP_PERM,
    HEATMAP_SIGMA,
    crop_sample,
    detector_box_crop,
    random_augment,
    rng_for_sample,
    tight_box_crop,
)
from cunet_optimize.errors import CUNetError
from cunet_optimize.models.cunet import HEATMAP_SIZE, INPUT_SIZE

log = logging.getLogger(__name__)

# Every format `predict` reads is also a data set image (300-W itself has .png and .jpg).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# Smaller than this, a face crop has no detail left: 1x1 "images" are refused, not predicted.
MIN_IMAGE_SIDE = 16
SPLIT_NAMES = ("train", "test", "common", "challenging", "full")
# A landmark further past the image border than the image is wide (or high) is not a point of a
# face in this picture: 300-W's faces cut by the border have their hidden points (the jaw, a
# cheek) within a fraction of the face's size past it, and a face is no larger than its photo.
# Such a point is a damaged or foreign .pts; one alone moves the NME by orders of magnitude.
FAR_OUTSIDE_IMAGE_SIZES = 1.0
CROP_POLICIES = {
    "tight": "tight: ground-truth landmark box, centre = box centre, scale = max(w,h)/200*1.25 (HRNet)",
    "detector": "detector: face-detector box, centre = box centre, scale = max(w,h)/200*1.1 (CU-Net authors)",
}


class DataError(CUNetError):
    """A data set on disk that cannot be used as given (missing, corrupt or inconsistent files)."""


@dataclass(frozen=True)
class DataFlags:
    """How a hint names the data options of whoever opened the set: the command's flags (a
    build's evaluation data is --eval-data/--eval-split), by default those of the commands
    with --data/--split/--skip-bad, with the Python arguments beside them."""

    data: str = "--data DIR"
    split_all: str = "--split all (split=None)"
    skip_bad: str | None = "--skip-bad (skip_bad=True)"  # None: the caller cannot skip bad samples


EVAL_DATA_FLAGS = DataFlags("--eval-data DIR", "--eval-split all", None)
CALIB_DATA_FLAGS = DataFlags("--calib-data DIR", "--calib-split all", None)


# Pillow's own errors for unreadable files; DecompressionBombError is none of these.
_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def _image_error(path, exc: Exception, what: str) -> "DataError":
    if isinstance(exc, Image.DecompressionBombError):
        return DataError(f"{path}: image too large to decode safely ({exc.args[0].split('(')[0].strip()}); "
                         "downscale it (a face crop needs a few hundred pixels)")
    return DataError(f"{path}: {what} ({exc}); replace or remove the file")


def to_rgb8(im: Image.Image) -> Image.Image:
    """8-bit RGB of any Pillow mode. convert("RGB") clips 16-bit and 32-bit grey to 255
    (an all-white picture), so those are rescaled from their own range first."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str | os.PathLike, exif_transpose: bool = False) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of an image file (grey/16-bit/palette/alpha converted); DataError
    if unreadable. exif_transpose: turn a camera photo upright by its EXIF orientation (what an
    image viewer shows); data sets keep the stored pixels their .pts files were drawn on."""
    try:
        with Image.open(path) as im:
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            return np.asarray(to_rgb8(im))
    except _IMAGE_ERRORS as exc:
        raise _image_error(path, exc, "cannot decode image") from exc


def verify_image(path: Path) -> tuple[int, int]:
    """Cheap integrity check without decoding the pixels: (width, height); DataError if bad.

    PIL's verify reads the header (and every PNG chunk with its CRC) but passes a
    truncated JPEG, so for JPEGs we also look for the end-of-image marker near the end.
    """
    try:
        with Image.open(path) as im:
            fmt, size = im.format, im.size
            im.verify()
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 1024))
                if b"\xff\xd9" not in f.read():
                    raise OSError("JPEG end-of-image marker missing, the file is truncated")
    except _IMAGE_ERRORS as exc:
        raise _image_error(path, exc, "unreadable or corrupt image") from exc
    if min(size) < MIN_IMAGE_SIDE:
        raise DataError(f"{path}: image is {size[0]}x{size[1]} pixels, too small for a face "
                        f"(at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}); replace or remove the file")
    return size


@dataclass(frozen=True)
class FaceRecord:
    """One validated sample: where it is and its landmarks (0-based original pixels)."""

    image_path: Path
    pts_path: Path
    key: str  # image path relative to the data root, '/'-separated (the key of the boxes JSON)
    landmarks: np.ndarray  # (C, 2) float64
    box: np.ndarray | None  # [x1, y1, x2, y2] for the detector crop


def subset_split_hint(root: Path, split: str, data_flag: str = "--data DIR") -> str | None:
    """Why `split` is missing from `root` when root is the default data's cache: it holds only
    the test split and the calibration slice, so say how to write the whole set (the same
    images), e.g. the training split that `qat` fine-tunes on, to pass as `data_flag`. None for
    any other folder."""
    try:
        info = json.loads((Path(root) / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or "subset" not in info or info.get("generator") != "cunet_optimize.data.synth":
        return None
    return (f"{root} is the cached part of a synthetic set ({', '.join(sorted(info['subset']))} only), with no "
            f"{split} split; write the whole set (the same images) with `cunet-optimize data synth --out DIR "
            f"--count {info['count']} --seed {info['seed']} --test-fraction {info['test_fraction']}` "
            f"and pass {data_flag}")


def resolve_split_list(root: Path, split: str | os.PathLike, flags: DataFlags = DataFlags()) -> Path:
    """``"train"`` -> root/train.txt; anything that looks like a path is taken as the list file itself.
    A missing list's hint names the options in `flags`."""
    text = os.fspath(split)
    is_path = os.sep in text or "/" in text or text.endswith(".txt") or Path(text).is_file()
    path = Path(text) if is_path else root / f"{text}.txt"
    if not path.is_file():
        hint = None if is_path else subset_split_hint(root, text, flags.data)
        if hint:
            raise DataError(hint)
        names = ", ".join(SPLIT_NAMES)
        raise DataError(
            f"{path}: split list not found; write one image path (relative to {root}) per line, "
            f"or pass {flags.split_all} for every image (usual names: {names})"
        )
    return path


def _find_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _image_for_entry(root: Path, entry: str) -> Path | None:
    """A list line names an image, or a .pts / extension-less stem whose image is found by extension."""
    p = root / entry
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return p if p.is_file() else None
    stem = p.with_suffix("") if p.suffix.lower() == ".pts" else p
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        cand = stem.with_name(stem.name + ext)
        if cand.is_file():
            return cand
    return None


def _one_image_per_stem(images: list[Path]) -> tuple[list[Path], list[str]]:
    """(images whose stem has no other image beside it, a problem per stem that has several).
    Siblings are found by the names the folder lists (a case-insensitive disk has one name)."""
    by_stem: dict[Path, dict[str, list[str]]] = {}  # folder -> stem -> its image names
    kept, problems, seen = [], [], set()
    for image in images:
        if image.parent not in by_stem:
            stems: dict[str, list[str]] = {}
            for name in sorted(os.listdir(image.parent)):
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    stems.setdefault(Path(name).stem, []).append(name)
            by_stem[image.parent] = stems
        same = by_stem[image.parent].get(image.stem, [image.name])
        if len(same) < 2:
            kept.append(image)
        elif (image.parent, image.stem) not in seen:
            seen.add((image.parent, image.stem))
            problems.append(f"{' and '.join(str(image.parent / n) for n in same)}: {len(same)} images share the "
                            f"landmark file {image.stem}.pts (scoring both would count the face twice; keep only the "
                            "one it was drawn on)")
    return kept, problems


def _read_boxes(path: str | os.PathLike) -> dict[str, list[float]]:
    try:
        with open(path, encoding="utf-8") as f:
            boxes = json.load(f)
    except OSError as exc:
        raise DataError(f"{path}: cannot read face-box file ({exc}); check the path") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); expected {{relative_image_path: [x1, y1, x2, y2]}}") from exc
    if not isinstance(boxes, dict):
        raise DataError(f"{path}: expected a JSON object {{relative_image_path: [x1, y1, x2, y2]}}")
    return {str(k).replace("\\", "/"): v for k, v in boxes.items()}


class Face300W(Dataset):
    """Faces with 68 (``num_points``) landmarks from a folder tree of images + `.pts` files.

    Args:
        root: data folder; images (.png/.jpg/.jpeg, any depth) with a same-stem `.pts`.
        split: None for every image under ``root``; a list name (``"train"`` ->
            ``root/train.txt``; also test/common/challenging/full); or a path to a list
            file. A list has one image path per line, relative to ``root`` ('#' comments
            and blank lines ignored; a `.pts` path or a stem without extension also works).
        crop: ``"tight"`` or ``"detector"`` (needs ``boxes``), see module docstring.
        boxes: JSON file ``{relative_image_path: [x1, y1, x2, y2]}`` in 0-based pixels.
        augment: the CU-Net authors' training augmentation (scale, rotation, colour,
            flip with `FACE68_FLIP_PERM` when num_points == 68). Deterministic: the
            draw for item i depends only on (seed, epoch, i); call `set_epoch` each epoch.
        skip_bad: drop unusable samples with a logged warning naming each file instead of
            raising. Problems are found at construction: `.pts` files are parsed and
            images verified (header / PNG CRC) eagerly, so a run never dies halfway.
        verify_images: set False to skip the eager image check on very large sets; a
            corrupt image then raises DataError when its item is loaded (and landmarks are
            not checked against the image size).
        flags: how error hints name the data options (a command's flags; `DataFlags`).

    Two images of one stem (``a.png`` beside ``a.PNG`` or ``a.jpg``) share one ``a.pts``:
    which one it annotates is unknown, so both are a bad sample (never two samples).

    Item (dict): image float32 (3, 256, 256); heatmaps float32 (C, 64, 64); landmarks
    float32 (C, 2) original coords; transform float32 (2, 3) original -> input;
    target_mask float32 (C,) (1 where the heatmap holds a Gaussian); path str; index int.
    With a flip augmentation, channel i is point i of the mirrored face and
    ``landmarks[i]`` is where that point is in the original image.
    """

    task = "face"  # cunet_optimize.tasks.TASKS key

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | os.PathLike | None = None,
        crop: str = "tight",
        boxes: str | os.PathLike | None = None,
        augment: bool = False,
        seed: int = 0,
        skip_bad: bool = False,
        num_points: int = 68,
        sigma: float = HEATMAP_SIGMA,
        verify_images: bool = True,
        input_size: int = INPUT_SIZE,
        heatmap_size: int = HEATMAP_SIZE,
        flags: DataFlags = DataFlags(),
    ) -> None:
        self.root = Path(root)
        self.flags = flags
        if crop not in CROP_POLICIES:
            raise DataError(f"unknown crop policy {crop!r}; use one of: {', '.join(CROP_POLICIES)}")
        if crop == "detector" and boxes is None:
            raise DataError("crop='detector' needs boxes=<JSON file {relative_image_path: [x1, y1, x2, y2]}>")
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data folder not found; pass the folder holding the images and .pts files")
        self.crop = crop
        self.crop_policy = CROP_POLICIES[crop]
        self.split = None if split is None else os.fspath(split)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.num_points = int(num_points)
        self.sigma = float(sigma)
        self.input_size = int(input_size)
        self.heatmap_size = int(heatmap_size)
        self.flip_perm = FACE68_FLIP_PERM if self.num_points == 68 else None
        box_table = _read_boxes(boxes) if boxes is not None else None

        images, problems = self._list_images(split)
        images, doubled = _one_image_per_stem(images)
        problems += doubled
        if not images and not problems:
            where = self.root if split is None else resolve_split_list(self.root, split, flags)
            raise DataError(f"{where}: no images ({'/'.join(IMAGE_EXTENSIONS)}) found; check the data folder")

        self.records: list[FaceRecord] = []
        for image_path in images:
            try:
                self.records.append(self._load_record(image_path, box_table, verify_images))
            except DataError as exc:
                problems.append(str(exc))
        self.skipped = problems
        if problems:
            if not skip_bad:
                more = f" (and {len(problems) - 1} more bad samples)" if len(problems) > 1 else ""
                fix = (f"fix the data or pass {flags.skip_bad} to skip bad samples" if flags.skip_bad
                       else "fix or remove the bad samples")
                raise DataError(f"{problems[0]}{more}; {fix}")
            for p in problems:
                log.warning("skipping bad sample: %s", p)
            total = len(problems) + len(self.records)
            log.warning("skipped %d bad samples of %d in %s", len(problems), total, self.root)
        if not self.records:
            raise DataError(f"{self.root}: no usable samples left after skipping {len(problems)} bad ones")

    # ------------------------------------------------------------------ construction

    def _list_images(self, split: str | os.PathLike | None) -> tuple[list[Path], list[str]]:
        if split is None:
            images = _find_images(self.root)
            stems = {p.with_suffix("") for p in images}
            orphans = sorted(p for p in self.root.rglob("*") if p.suffix.lower() == ".pts"
                             and p.with_suffix("") not in stems and p.is_file())
            return images, [f"{p}: landmark file without an image ({'/'.join(IMAGE_EXTENSIONS)}) of the same "
                            "name; add the image or remove the .pts" for p in orphans]
        list_path = resolve_split_list(self.root, split, self.flags)
        images, problems = [], []
        for lineno, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            image = _image_for_entry(self.root, entry)
            if image is None:
                problems.append(f"{list_path}:{lineno}: listed image {entry!r} not found under {self.root}")
            else:
                images.append(image)
        return images, problems

    def _load_record(self, image_path: Path, box_table: dict | None, verify: bool) -> FaceRecord:
        pts_path = next(
            (p for p in (image_path.with_suffix(".pts"), image_path.with_suffix(".PTS")) if p.is_file()), None
        )
        if pts_path is None:
            raise DataError(f"{image_path}: no landmark file {image_path.with_suffix('.pts').name} next to the image")
        try:
            landmarks = read_pts(pts_path)
        except PtsError as exc:
            raise DataError(str(exc)) from exc
        if len(landmarks) != self.num_points:
            raise DataError(f"{pts_path}: {len(landmarks)} landmarks, expected {self.num_points} (num_points)")
        key = image_path.relative_to(self.root).as_posix()
        box = None
        if box_table is not None:
            if key not in box_table:
                raise DataError(f"{image_path}: no face box for key {key!r} in the boxes JSON")
            box = np.asarray(box_table[key], dtype=np.float64)
            if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
                raise DataError(f"{image_path}: face box {box_table[key]!r} is not [x1, y1, x2, y2] with x2>x1, y2>y1")
        if self.crop == "tight" and not np.max(np.ptp(landmarks, axis=0)) > 0:
            raise DataError(f"{pts_path}: all landmarks coincide; cannot build a tight crop")
        if verify:
            width, height = verify_image(image_path)
            inside = ((landmarks[:, 0] >= -0.5) & (landmarks[:, 0] <= width - 0.5)
                      & (landmarks[:, 1] >= -0.5) & (landmarks[:, 1] <= height - 0.5))
            if inside.mean() < 0.5:  # a few points past the border are normal for cropped faces
                raise DataError(f"{pts_path}: {int((~inside).sum())} of {len(landmarks)} landmarks lie outside "
                                f"the {width}x{height} image; is the .pts for another image (or 0/1-based)?")
            size = np.array([width, height], dtype=np.float64)
            beyond = np.maximum(-0.5 - landmarks, landmarks - (size - 0.5))  # past the border, per axis
            far = np.any(beyond > FAR_OUTSIDE_IMAGE_SIZES * size, axis=1)
            if far.any():
                i = int(np.argmax(far))
                raise DataError(f"{pts_path}: {int(far.sum())} of {len(landmarks)} landmarks lie far outside the "
                                f"{width}x{height} image (further past its border than the image is wide or high; "
                                f"e.g. point {i + 1} at ({landmarks[i, 0]:.6g}, {landmarks[i, 1]:.6g})); "
                                "is the .pts damaged or for another image?")
        return FaceRecord(image_path=image_path, pts_path=pts_path, key=key, landmarks=landmarks, box=box)

    # ----------------------------------------------------------------------- access

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of this epoch (call before iterating, in every worker's copy)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def crop_box(self, index: int) -> tuple[np.ndarray, float]:
        """(center, scale) of the un-augmented crop of item ``index`` under this dataset's policy."""
        rec = self.records[index]
        return tight_box_crop(rec.landmarks) if self.crop == "tight" else detector_box_crop(rec.box)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.records):
            raise IndexError(index)
        rec = self.records[index]
        center, scale = self.crop_box(index)
        aug = None
        if self.augment:
            aug = random_augment(
                rng_for_sample(self.seed, self.epoch, index), flip_prob=0.5 if self.flip_perm is not None else 0.0
            )
        sample = crop_sample(
            load_rgb(rec.image_path),
            rec.landmarks,
            center,
            scale,
            augmentation=aug,
            flip_perm=self.flip_perm,
            input_size=self.input_size,
            heatmap_size=self.heatmap_size,
            sigma=self.sigma,
        )
        return {
            "image": torch.from_numpy(sample.image),
            "heatmaps": torch.from_numpy(sample.heatmaps),
            "landmarks": torch.from_numpy(sample.landmarks.astype(np.float32)),
            "transform": torch.from_numpy(sample.transform.astype(np.float32)),
            "target_mask": torch.from_numpy(sample.target_mask.astype(np.float32)),
            "path": str(rec.image_path),
            "index": index,
        }


class FirstSamples(Dataset):
    """The first `count` samples of a landmark data set (keeps crop_policy and set_epoch)."""

    def __init__(self, base, count: int) -> None:
        self.base, self.count = base, min(int(count), len(base))
        self.crop_policy = base.crop_policy
        self.task = getattr(base, "task", "face")

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        return self.base[index]
