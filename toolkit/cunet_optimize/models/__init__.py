"""CU-Net models: the network, its named configurations, checkpoints, and `load_model`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cunet_optimize.errors import CUNetError
from cunet_optimize.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from cunet_optimize.models.cunet import (
    DEFAULT_CONFIG_NAME,
    HEATMAP_SIZE,
    INPUT_SIZE,
    MODEL_REGISTRY,
    CUNet,
    CUNetConfig,
    registered_names,
)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_CHECKPOINT = ASSETS / "cunet-face-small.safetensors"


def create_model(name: str, *, memory_efficient: bool = False, **overrides) -> CUNet:
    """Build a registered configuration, untrained, with optional field overrides."""
    if name not in MODEL_REGISTRY:
        raise CUNetError(
            f"unknown model '{name}': not a registered configuration nor an existing file; "
            f"registered: {', '.join(registered_names())} (see `cunet-optimize models`)"
        )
    fields = MODEL_REGISTRY[name].config.to_dict()
    if "num_unets" in overrides and "num_heads" not in overrides:
        fields["num_heads"] = 0  # keep one head per U-Net when N changes
    fields.update(overrides)
    return CUNet(CUNetConfig.from_dict(fields), memory_efficient=memory_efficient)


def load_model(
    name_or_path: str | os.PathLike | None = None, *, memory_efficient: bool = False, **overrides
) -> torch.nn.Module:
    """A CU-Net from a registered name (untrained), a checkpoint of either format, or,
    with no argument, the embedded default model (trained on the synthetic face set).

    The module's forward(x) takes Bx3x256x256 images in [0, 1] and returns the list
    of supervised heads' heatmaps (BxCx64x64); the last one is the prediction.
    Checkpoints come back in eval mode; registered names in train mode.
    """
    if name_or_path is None:
        if not DEFAULT_CHECKPOINT.is_file():
            raise CUNetError(
                f"the embedded default model is missing ({DEFAULT_CHECKPOINT}); reinstall the package"
            )
        return load_checkpoint(DEFAULT_CHECKPOINT, memory_efficient=memory_efficient, **overrides)
    if isinstance(name_or_path, str) and name_or_path in MODEL_REGISTRY:
        return create_model(name_or_path, memory_efficient=memory_efficient, **overrides)
    if Path(name_or_path).exists():
        return load_checkpoint(name_or_path, memory_efficient=memory_efficient, **overrides)
    return create_model(str(name_or_path), memory_efficient=memory_efficient, **overrides)


def resolve_model(spec: str | None) -> tuple[torch.nn.Module, Path, str, str]:
    """(model in eval mode, checkpoint path, how to name its source, file stem) of a --model
    that must carry trained weights (build, calibrate, qat): a checkpoint or, with None, the
    embedded default; an untrained registered name is a CUNetError."""
    if spec is None:
        path = DEFAULT_CHECKPOINT
        source, stem = "embedded default", "cunet-face-small"
    elif spec in MODEL_REGISTRY and not Path(spec).exists():
        raise CUNetError(
            f"build needs trained weights; '{spec}' is an untrained registered configuration. "
            "Pass a checkpoint (--model FILE) or train one with `cunet-optimize train`"
        )
    else:
        path, source = Path(spec), str(spec)
        stem = path.name.lstrip(".").split(".")[0]  # `.face.safetensors` -> face
    model = load_model(None if spec is None else path).eval()
    return model, Path(path).resolve(), source, stem


__all__ = [
    "CUNet",
    "CUNetConfig",
    "MODEL_REGISTRY",
    "DEFAULT_CONFIG_NAME",
    "DEFAULT_CHECKPOINT",
    "INPUT_SIZE",
    "HEATMAP_SIZE",
    "create_model",
    "load_model",
    "resolve_model",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]
