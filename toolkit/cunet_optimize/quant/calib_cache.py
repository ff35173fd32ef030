"""The calibration cache, <workdir>/calib/<id>/: calibrated scales kept per (model, the
bytes of the calibration images and annotations, method, scheme, image count,
equalization, the calibration's own settings), so a second build, `calibrate` or
`build --precision auto` of the same inputs reuses them instead of recalibrating.

A folder holds scales.json (the scale file of quant/calibrate.py, with where the scales
came from) and, when the weights were equalized, equalization.safetensors: the scales
belong to the equalized weights, so both files make the cache. `calibrate` adds
calibration.cache (TensorRT's legacy cache of the same scales). Their checksums are sealed
last (cache_seal.py): an incomplete or damaged folder is recomputed with a warning, never
trusted and never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def calibration_id(model_sha: str, dataset, method: str, spec: str, images: int,
                   equalize_alpha: float | None = None) -> str:
    """Same model, calibration bytes, method, scheme, image count, equalization and calibration
    settings -> same id -> the cached scales are reused. `dataset` (the opened calibration
    split) is keyed by the content of the files the calibration reads (its first `images`
    samples: images and annotations), so replaced images under the same names are
    calibrated again."""
    from cunet_optimize import __version__
    from cunet_optimize.cache_seal import dataset_digest
    from cunet_optimize.quant.calibrate import DEFAULT_PERCENTILE, HISTOGRAM_SAMPLES, NUM_BINS

    used = min(images, len(dataset))
    key = json.dumps([__version__, model_sha, dataset_digest(dataset, used), getattr(dataset, "task", ""),
                      getattr(dataset, "crop_policy", ""), method, spec, used,
                      [DEFAULT_PERCENTILE, NUM_BINS, HISTOGRAM_SAMPLES]]
                     + ([] if equalize_alpha is None else [equalize_alpha]), default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CalibrationCache:
    """One calib/<id>/ folder; `equalized`: its scales belong to equalized weights."""

    folder: Path
    equalized: bool

    @property
    def scales_file(self) -> Path:
        return self.folder / "scales.json"

    @property
    def factors_file(self) -> Path:
        return self.folder / "equalization.safetensors"

    @property
    def legacy_cache_file(self) -> Path:
        return self.folder / "calibration.cache"

    @property
    def files(self) -> list[Path]:
        return [self.scales_file] + ([self.factors_file] if self.equalized else [])

    def reusable(self) -> bool:
        """Whether the folder holds a complete, undamaged cache (a damaged one is logged)."""
        from cunet_optimize.cache_seal import check_seal

        cached, damage = check_seal(self.folder, self.files)
        if damage:  # recompute rather than fail or trust it
            log.warning("%s: calibration cache not reusable (%s); recomputing it", self.folder, damage)
        return cached

    def load(self, model, scheme):
        """(`model` quantized with `scheme` and the cached scales, the equalization record)."""
        from safetensors.torch import load_file

        from cunet_optimize.quant import apply_scales, load_scales, quantize_model
        from cunet_optimize.quant.equalize import apply_equalization

        if self.equalized:
            model = apply_equalization(model, load_file(str(self.factors_file)))
        qmodel = quantize_model(model, scheme)
        scale_file = load_scales(self.scales_file)
        apply_scales(qmodel, scale_file.scales)
        return qmodel, scale_file.equalization

    def store(self, qmodel, factors: dict, method: str, equalization: dict | None, **provenance) -> None:
        """Write the calibrated model's scales (and the equalization factors), then seal them."""
        from safetensors.torch import save_file

        from cunet_optimize.atomic import atomic_path
        from cunet_optimize.cache_seal import seal
        from cunet_optimize.quant import activation_scales, save_scales

        if factors:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.factors_file) as tmp:
                save_file({k: v.contiguous() for k, v in factors.items()}, str(tmp))
        # a legacy cache left by the scales being replaced is theirs, not these scales'
        self.legacy_cache_file.unlink(missing_ok=True)
        save_scales(self.scales_file, activation_scales(qmodel), method, **provenance, equalization=equalization)
        seal(self.folder, self.files)

    def legacy_cache_reusable(self) -> bool:
        """Whether calibration.cache was written from these scales and is undamaged (sealed with
        them by `store_legacy_cache`); a damaged one is logged, a missing one is just not there."""
        from cunet_optimize.cache_seal import check_seal

        if not self.legacy_cache_file.is_file():
            return False
        cached, damage = check_seal(self.folder, self.files + [self.legacy_cache_file])
        if damage:
            log.warning("%s: not reusable (%s); writing it again", self.legacy_cache_file, damage)
        return cached

    def store_legacy_cache(self, scales: dict[str, float]) -> Path:
        """Write calibration.cache ({ONNX tensor name: scale}), then seal it with the scales."""
        from cunet_optimize.cache_seal import seal
        from cunet_optimize.quant.legacy_cache import write_legacy_cache

        write_legacy_cache(self.legacy_cache_file, scales)
        seal(self.folder, self.files + [self.legacy_cache_file])
        return self.legacy_cache_file
