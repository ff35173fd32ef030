"""Reading and writing CU-Net checkpoints.

Two formats:
- ours: safetensors, with the model configuration as JSON in the metadata, so a
  file says what network it holds;
- the authors': a torch.save'd dict whose `state_dict` comes from a DataParallel
  model (every key starts with `module.`); read with weights_only=True so no
  pickled code runs. Its configuration is inferred from the tensors' shapes.

A checkpoint that does not fit is an error naming the first mismatch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from cunet_optimize.atomic import atomic_path
from cunet_optimize.errors import CheckpointError, ConfigError
from cunet_optimize.models.cunet import CUNet, CUNetConfig

FORMAT_NAME = "cunet-optimize"
FORMAT_VERSION = "1"


def strip_dataparallel_prefix(state_dict: dict) -> dict:
    """The authors' keys -> ours: only the DataParallel `module.` prefix differs."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def infer_config(state_dict: dict, **overrides) -> CUNetConfig:
    """Recover N, K, C, c0, g, b from the tensor shapes of a CU-Net state dict.

    L (the number of supervised heads) is not recorded in the authors' files (all N
    heads are stored); it defaults to N unless given in `overrides`.
    """

    def shape(key: str) -> tuple:
        if key not in state_dict:
            raise CheckpointError(f"missing key '{key}': this is not a CU-Net state dict")
        return tuple(state_dict[key].shape)

    width = shape("features.conv0.weight")[0]
    layer_keys = {
        int(m.group(1))
        for k in state_dict
        if (m := re.match(r"hg\.down_blocks\.0\.layers\.(\d+)\.norm1\.weight$", k))
    }
    if not layer_keys:
        raise CheckpointError("no 'hg.down_blocks.0.layers.*' keys: this is not a CU-Net state dict")
    num_unets = max(layer_keys) + 1
    growth_rate = shape("hg.down_blocks.0.layers.0.conv2.weight")[0]
    neck_size = shape("hg.down_blocks.0.layers.0.conv1.weight")[0] // growth_rate
    last_in = shape(f"hg.down_blocks.0.layers.{num_unets - 1}.norm1.weight")[0]
    order = (last_in - width) // growth_rate
    num_classes = shape("linears.0.conv.weight")[0]
    inferred = dict(
        num_unets=num_unets,
        order=order,
        num_classes=num_classes,
        width=width,
        growth_rate=growth_rate,
        neck_size=neck_size,
    )
    if "refine_adapters.0.adapter_conv.weight" in state_dict and "refine_iters" not in overrides:
        raise CheckpointError(
            "checkpoint has iterative-refinement adapters but no refine_iters: pass refine_iters=R"
        )
    return _apply_overrides(inferred, overrides, source="checkpoint")


def _apply_overrides(stored: dict, overrides: dict, source: str) -> CUNetConfig:
    """User overrides may add what the file lacks, never contradict what it holds."""
    merged = dict(stored)
    for key, value in overrides.items():
        if key in stored and stored[key] != value:
            what = "landmark count (heatmap channels)" if key == "num_classes" else key
            raise CheckpointError(
                f"{source} has {what} = {stored[key]} but {value} was asked for; "
                f"drop the override or use a checkpoint trained with {key}={value}"
            )
        merged[key] = value
    try:
        return CUNetConfig.from_dict(merged)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


_MISMATCH_FIX = "the tensors do not fit the configuration it declares; use the checkpoint file the training run wrote"


def check_state_dict(model: CUNet, state_dict: dict, path: str) -> dict:
    """Name the first missing, unexpected or mis-shaped tensor; fill what old files lack."""
    expected = model.state_dict()
    fixed = dict(state_dict)
    for key, ref in expected.items():
        if key not in fixed:
            # PyTorch 0.4 files have no BatchNorm counters; they carry no weights.
            if key.endswith("num_batches_tracked"):
                fixed[key] = torch.zeros_like(ref)
                continue
            raise CheckpointError(f"{path}: missing tensor '{key}' (expected shape {list(ref.shape)}); {_MISMATCH_FIX}")
        if tuple(fixed[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{path}: tensor '{key}' has shape {list(fixed[key].shape)}, "
                f"the model expects {list(ref.shape)}; {_MISMATCH_FIX}"
            )
    for key in fixed:
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected tensor '{key}': not part of this CU-Net; {_MISMATCH_FIX}")
    return fixed


def _sniff_format(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    raise CheckpointError(
        f"{path}: not a checkpoint (neither safetensors nor a torch.save file); "
        "pass a .safetensors file written by cunet-optimize or the authors' .pth.tar"
    )


def read_checkpoint(path: str | os.PathLike, **overrides) -> tuple[CUNetConfig, dict, dict]:
    """Return (config, state_dict with our key names, metadata) from either format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    fmt = _sniff_format(path)
    if fmt == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                state_dict = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own types for truncation
            raise CheckpointError(f"{path}: unreadable safetensors file ({e}); is it truncated?") from None
        if metadata.get("format") != FORMAT_NAME or "config" not in metadata:
            raise CheckpointError(
                f"{path}: safetensors file without a cunet-optimize model config in its metadata"
            )
        stored = json.loads(metadata["config"])
        config = _apply_overrides(stored, overrides, source=str(path))
        return config, state_dict, metadata
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights only load failed" in str(e).lower():
            # torch's own message goes on to suggest weights_only=False, which runs the
            # file's pickled code: never repeat that advice
            raise CheckpointError(
                f"{path}: holds pickled Python objects besides tensors, which cunet-optimize refuses to load "
                "(unpickling can run code); use a .safetensors file or a torch file of tensors only "
                "({'state_dict': {name: tensor}}), e.g. from the checkpoint's author"
            ) from None
        raise CheckpointError(
            f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "is it truncated or not a checkpoint?"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state_dict = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict = obj
    else:
        raise CheckpointError(f"{path}: a torch file but not a checkpoint (no 'state_dict' of tensors)")
    state_dict = strip_dataparallel_prefix(state_dict)
    try:
        config = infer_config(state_dict, **overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, state_dict, {"format": "authors-pth"}


def load_checkpoint(path: str | os.PathLike, memory_efficient: bool = False, **overrides) -> CUNet:
    config, state_dict, metadata = read_checkpoint(path, **overrides)
    model = CUNet(config, memory_efficient=memory_efficient)
    state_dict = check_state_dict(model, state_dict, str(path))
    model.load_state_dict(state_dict, strict=True)
    model.checkpoint_metadata = metadata
    model.eval()
    return model


def save_checkpoint(model: CUNet, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write our self-describing safetensors file atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "config": json.dumps(model.config.to_dict(), sort_keys=True)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                 for k, v in (metadata or {}).items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path
