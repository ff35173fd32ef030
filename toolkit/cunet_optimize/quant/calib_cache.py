"""The calibration cache, <workdir>/calib/<id>/: calibrated scales kept per (model, data,
split, method, scheme, image count, equalization), so a second build, `calibrate` or
`build --precision auto` of the same inputs reuses them instead of recalibrating.

A folder holds scales.json (the scale file of quant/calibrate.py, with where the scales
came from) and, when the weights were equalized, equalization.safetensors: the scales
belong to the equalized weights, so both files make the cache. Their checksums are sealed
last (cache_seal.py): an incomplete or damaged folder is recomputed with a warning, never
trusted and never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from cunet_optimize.atomic import sha256_file
from cunet_optimize.data.mpii import ANNOTATION_FILE as MPII_ANNOTATION_FILE

log = logging.getLogger(__name__)


def calibration_id(model_sha: str, data_root: Path, split: str | None, method: str, spec: str,
                   images: int, equalize_alpha: float | None = None) -> str:
    """Same model, data, method, scheme and equalization -> same id -> the cached scales are reused."""
    if data_root.is_dir():
        listing = sorted(str(p.relative_to(data_root)) for p in data_root.rglob("*.pts"))
    else:
        listing = []
    annotations = data_root if data_root.is_file() else data_root / MPII_ANNOTATION_FILE
    if annotations.is_file():  # MPII: the records are in one JSON
        listing.append(sha256_file(annotations))
    key = json.dumps([model_sha, listing, split, method, spec, images]
                     + ([] if equalize_alpha is None else [equalize_alpha]))
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
        save_scales(self.scales_file, activation_scales(qmodel), method, **provenance, equalization=equalization)
        seal(self.folder, self.files)
