"""MPII human-pose dataset (16 joints) over the CU-Net authors' annotation JSON.

The JSON is a list of person records (the stacked-hourglass / pytorch-pose format the
authors use): ``img_paths`` (relative to the image folder), ``joint_self`` (16 x [x, y,
visible]), ``objpos`` (person centre), ``scale_provided`` (person height / 200),
``normalizer`` (head-box diagonal), ``isValidation`` and ``dataset``.

Conventions, matching the authors' code and HRNet:

* MPII annotations are 1-based (Matlab); joints and objpos are shifted by -1 to the
  toolkit's 0-based pixel centres.
* Crop: centre.y += 15 * scale, then scale *= 1.25 (scale in units of 200 px).
* A joint *counts* for PCKh when it is annotated: both raw coordinates > 0 (the
  authors' `PCKh` and the official evaluation's "not missing"); the JSON's third
  column (occlusion flag) is returned separately and is not used for scoring.
* Head size = 0.6 * ``normalizer``: the authors' loader multiplies the JSON value by
  0.6, i.e. ``normalizer`` is the head-box diagonal and PCKh@0.5 uses 0.5 * head size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cunet_optimize.data.face300w import DataError, load_rgb
from cunet_optimize.data.transforms import (
    HEATMAP_SIGMA,
    MPII_FLIP_PERM,
    crop_sample,
    random_augment,
    rng_for_sample,
)
from cunet_optimize.models.cunet import HEATMAP_SIZE, INPUT_SIZE

MPII_NUM_JOINTS = 16
MPII_ORIGIN = 1.0  # what the annotation adds to a 0-based coordinate
HEAD_SIZE_FACTOR = 0.6  # head size = 0.6 * head-box diagonal (`normalizer`)
CENTER_SHIFT_Y = 15.0  # px per unit of scale, moves the centre down toward the legs
SCALE_PAD = 1.25
CROP_POLICY = "mpii: objpos with y += 15*scale, scale = scale_provided*1.25 (x200 px)"
ANNOTATION_FILE = "mpii_annotations.json"  # its name in the authors' (pytorch-pose) data/mpii/
IMAGE_FOLDER = "images"  # beside it; img_paths are relative to this folder
MPII_SPLITS = ("valid", "train", "all")  # by isValidation; "all" takes both
_REQUIRED = ("img_paths", "joint_self", "objpos", "scale_provided", "normalizer", "isValidation")


def _field(record: dict, name: str, where: str, expected: str, dtype, shape: tuple) -> np.ndarray:
    """record[name] as a `dtype` array of `shape`; DataError naming the field otherwise (a string,
    a list where a number belongs, ragged rows...)."""
    value = record[name]
    try:
        if isinstance(value, (str, bytes, dict)) or value is None:
            raise TypeError
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != shape:
        got = f"shape {array.shape}" if array is not None else f"{type(value).__name__} {str(value)[:40]!r}"
        raise DataError(f"{where}: {name} is {got}, expected {expected}; fix the record (the CU-Net authors' "
                        "MPII JSON format)")
    return array


class MPIIDataset(Dataset):
    """Single-person crops of MPII for training (``split="train"``) or PCKh evaluation (``"valid"``;
    ``"all"`` for both).

    Item (dict): image float32 (3, 256, 256); heatmaps float32 (16, 64, 64); landmarks
    float32 (16, 2) 0-based original coords; transform float32 (2, 3) original ->
    input; target_mask float32 (16,) (heatmap holds a Gaussian: annotated and inside
    the crop); visible float32 (16,) (annotated, counts in PCKh); vis_flag float32
    (16,) (the JSON's third column); normalizer float32 (the JSON value, head-box
    diagonal); head_size float32 (0.6 * normalizer, what `metrics.pckh` takes);
    path str; index int. With a flip augmentation all per-joint arrays are permuted
    by `MPII_FLIP_PERM` together.
    """

    task = "pose"  # cunet_optimize.tasks.TASKS key

    def __init__(
        self,
        json_path: str | os.PathLike,
        image_root: str | os.PathLike,
        split: str = "valid",
        augment: bool = False,
        seed: int = 0,
        sigma: float = HEATMAP_SIGMA,
        input_size: int = INPUT_SIZE,
        heatmap_size: int = HEATMAP_SIZE,
    ) -> None:
        if split not in MPII_SPLITS:
            raise DataError(f"unknown MPII split {split!r}; use one of: {', '.join(MPII_SPLITS)}")
        self.json_path = Path(json_path)
        self.image_root = Path(image_root)
        self.split = split
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.sigma = float(sigma)
        self.input_size = int(input_size)
        self.heatmap_size = int(heatmap_size)
        self.crop_policy = CROP_POLICY
        if not self.image_root.is_dir():
            raise DataError(f"{self.image_root}: MPII image folder not found; pass the folder holding images/")
        self.records = self._read_annotations()
        if not self.records:
            raise DataError(f"{self.json_path}: no MPII records for split {split!r}")

    def _read_annotations(self) -> list[dict]:
        try:
            with open(self.json_path, encoding="utf-8") as f:
                anno = json.load(f)
        except OSError as exc:
            raise DataError(f"{self.json_path}: cannot read MPII annotations ({exc}); check the path") from exc
        except json.JSONDecodeError as exc:
            raise DataError(f"{self.json_path}: not valid JSON ({exc})") from exc
        if not isinstance(anno, list):
            raise DataError(f"{self.json_path}: expected a JSON list of person records")
        want_valid = self.split == "valid"
        records = []
        for i, a in enumerate(anno):
            where = f"{self.json_path}[{i}]"
            if not isinstance(a, dict) or any(k not in a for k in _REQUIRED):
                missing = [k for k in _REQUIRED if not isinstance(a, dict) or k not in a]
                raise DataError(f"{where}: record lacks {', '.join(missing)}; expected the CU-Net authors' MPII JSON")
            if a.get("dataset", "MPII") != "MPII" or (self.split != "all" and bool(a["isValidation"]) != want_valid):
                continue
            joints = _field(a, "joint_self", where, "16 rows of [x, y, visible]", np.float64, (MPII_NUM_JOINTS, 3))
            center = _field(a, "objpos", where, "[x, y]", np.float64, (2,))
            scale = float(_field(a, "scale_provided", where, "a number", np.float64, ()))
            normalizer = float(_field(a, "normalizer", where, "a number", np.float64, ()))
            if not (scale > 0 and normalizer > 0 and np.all(np.isfinite([*center, scale, normalizer]))):
                raise DataError(
                    f"{where}: invalid objpos {a['objpos']}, scale_provided {scale} or normalizer {normalizer}"
                )
            if not isinstance(a["img_paths"], str) or not a["img_paths"]:
                raise DataError(f"{where}: img_paths is {a['img_paths']!r:.60}, expected an image path (a string); "
                                "fix the record (the CU-Net authors' MPII JSON format)")
            image_path = self.image_root / a["img_paths"]
            if not image_path.is_file():
                raise DataError(f"{image_path}: image of {where} not found; check image_root")
            annotated = (joints[:, 0] > 0) & (joints[:, 1] > 0)
            records.append(
                dict(
                    image_path=image_path,
                    joints=joints[:, :2] - MPII_ORIGIN,
                    annotated=annotated,
                    vis_flag=joints[:, 2].copy(),
                    # authors' rule in 1-based pixels, then to 0-based
                    center=np.array([center[0], center[1] + CENTER_SHIFT_Y * scale]) - MPII_ORIGIN,
                    scale=scale * SCALE_PAD,
                    normalizer=normalizer,
                )
            )
        return records

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of this epoch (call before iterating, in every worker's copy)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.records):
            raise IndexError(index)
        rec = self.records[index]
        aug = random_augment(rng_for_sample(self.seed, self.epoch, index)) if self.augment else None
        sample = crop_sample(
            load_rgb(rec["image_path"]),
            rec["joints"],
            rec["center"],
            rec["scale"],
            augmentation=aug,
            flip_perm=MPII_FLIP_PERM,
            valid=rec["annotated"],
            input_size=self.input_size,
            heatmap_size=self.heatmap_size,
            sigma=self.sigma,
        )
        perm = sample.perm
        return {
            "image": torch.from_numpy(sample.image),
            "heatmaps": torch.from_numpy(sample.heatmaps),
            "landmarks": torch.from_numpy(sample.landmarks.astype(np.float32)),
            "transform": torch.from_numpy(sample.transform.astype(np.float32)),
            "target_mask": torch.from_numpy(sample.target_mask.astype(np.float32)),
            "visible": torch.from_numpy(rec["annotated"][perm].astype(np.float32)),
            "vis_flag": torch.from_numpy(rec["vis_flag"][perm].astype(np.float32)),
            "normalizer": torch.tensor(rec["normalizer"], dtype=torch.float32),
            "head_size": torch.tensor(HEAD_SIZE_FACTOR * rec["normalizer"], dtype=torch.float32),
            "path": str(rec["image_path"]),
            "index": index,
        }
