"""The embedded default data: the synthetic face set the default model was trained on.

Commands that need data and were given none (calibrate, build, profile) use its
test split for accuracy and a slice of its training split for calibration. Only
those images are written (once, into a cache folder); they are byte-identical to
the same indices of `cunet-optimize data synth --count 3000 --seed 0
--test-fraction 0.1`, because every synthetic image depends on (seed, index) alone.
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from cunet_optimize.atomic import staged_folder
from cunet_optimize.data.synth import SYNTH_VERSION, image_name, split_test_indices, write_face
from cunet_optimize.errors import CUNetError

DEFAULT_SYNTH = {"count": 3000, "seed": 0, "test_fraction": 0.1}
CALIBRATION_IMAGES = 128  # taken from the training split: never from the test split


CACHE_VARIABLE = "CUNET_OPTIMIZE_CACHE"


def cache_root() -> Path:
    """Where the default data sets are written: $CUNET_OPTIMIZE_CACHE, else ~/.cache/cunet-optimize."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "cunet-optimize")


def _cache_error(exc: OSError | None = None) -> CUNetError:
    """One line naming what sets the cache folder (the variable, when set; never --workdir)."""
    root = cache_root()
    where = f"{CACHE_VARIABLE}={root}" if os.environ.get(CACHE_VARIABLE) else f"the cache folder {root}"
    why = "is a file, not a folder" if exc is None else f"cannot be written ({exc.strerror or exc})"
    return CUNetError(f"{where}: {why}; point {CACHE_VARIABLE} at a writable folder, or pass a data folder "
                      "so that the default data is not needed")


# Errors that mean "this place cannot hold the cache"; a full disk stays the CLI's own line.
_CACHE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOENT, errno.EEXIST}


@contextmanager
def _writing_cache():
    """Around creating and writing the default data: a cache root that cannot be one is named
    by what sets it (the CLI would otherwise blame --workdir/--out)."""
    if cache_root().exists() and not cache_root().is_dir():
        raise _cache_error()
    try:
        yield
    except OSError as exc:
        if exc.errno not in _CACHE_ERRNOS:
            raise
        raise _cache_error(exc) from None


def default_data_dir() -> Path:
    s = DEFAULT_SYNTH
    return cache_root() / f"synth-faces-v{SYNTH_VERSION}-seed{s['seed']}-n{s['count']}"


def ensure_default_dataset(progress: bool = True) -> Path:
    """Folder with images/, test.txt and calib.txt of the default set; written on first use."""
    out = default_data_dir()
    with _writing_cache():
        if (out / "dataset.json").is_file():
            return out
        count, seed, fraction = DEFAULT_SYNTH["count"], DEFAULT_SYNTH["seed"], DEFAULT_SYNTH["test_fraction"]
        test = split_test_indices(count, seed, fraction)
        test_set = set(test)
        calib = [i for i in range(count) if i not in test_set][:CALIBRATION_IMAGES]
        _write_default_faces(out, seed, count, test, calib, progress)
    return out


def _write_default_faces(out: Path, seed: int, count: int, test: list[int], calib: list[int], progress: bool) -> None:
    with staged_folder(out, replace=False) as tmp:  # a concurrent first writer's copy is kept
        (tmp / "images").mkdir()
        for i in tqdm(sorted(test + calib), desc="default data (synthetic faces)", unit="img",
                      disable=not progress, leave=False):
            write_face(tmp, seed, i, count)
        (tmp / "test.txt").write_text("".join(f"{image_name(i, count)}\n" for i in test))
        (tmp / "calib.txt").write_text("".join(f"{image_name(i, count)}\n" for i in calib))
        (tmp / "dataset.json").write_text(json.dumps(
            {"generator": "cunet_optimize.data.synth", "version": SYNTH_VERSION, **DEFAULT_SYNTH,
             "subset": {"test": len(test), "calib": len(calib)},
             "note": "test split + first training images of `data synth --count 3000 --seed 0 "
                     "--test-fraction 0.1`"}, indent=2) + "\n")


# The pose task's default data: the validation split and a calibration slice of
# `data synth --task pose --count 1200 --seed 0 --test-fraction 0.1`, in the MPII layout.
DEFAULT_POSE_SYNTH = {"count": 1200, "seed": 0, "test_fraction": 0.1}


def default_pose_data_dir() -> Path:
    from cunet_optimize.data.synth_pose import SYNTH_POSE_VERSION

    s = DEFAULT_POSE_SYNTH
    return cache_root() / f"synth-poses-v{SYNTH_POSE_VERSION}-seed{s['seed']}-n{s['count']}"


def ensure_default_pose_dataset(progress: bool = True) -> Path:
    """Folder with mpii_annotations.json (valid records + CALIBRATION_IMAGES train records)
    and images/ of the default pose set; written on first use."""
    from cunet_optimize.data.synth_pose import SYNTH_POSE_GENERATOR, SYNTH_POSE_VERSION, write_pose_set

    out = default_pose_data_dir()
    with _writing_cache():
        if (out / "dataset.json").is_file():
            return out
    count, seed, fraction = (DEFAULT_POSE_SYNTH[k] for k in ("count", "seed", "test_fraction"))
    valid = set(split_test_indices(count, seed, fraction))
    calib = [i for i in range(count) if i not in valid][:CALIBRATION_IMAGES]
    manifest = {"generator": SYNTH_POSE_GENERATOR, "version": SYNTH_POSE_VERSION, "task": "pose",
                **DEFAULT_POSE_SYNTH, "subset": {"valid": len(valid), "train (calibration)": len(calib)},
                "note": "valid split + first training images of `data synth --task pose --count 1200 --seed 0 "
                        "--test-fraction 0.1`"}
    with _writing_cache():  # a concurrent first writer's copy is kept
        write_pose_set(out, seed, sorted(valid | set(calib)), valid, count, 256, progress, manifest, replace=False)
    return out
