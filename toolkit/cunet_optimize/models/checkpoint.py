"""Reading and writing CU-Net checkpoints.

Two formats:
- ours: safetensors, with the model configuration as JSON in the metadata, so a
  file says what network it holds;
- the authors': a torch.save'd dict whose `state_dict` comes from a DataParallel
  model (every key starts with `module.`); read with weights_only=True so no
  pickled code runs. Its configuration is inferred from the tensors' shapes.

A checkpoint that does not fit is an error naming the first mismatch, found before
any real allocation (a shapes-only model on the meta device); a NaN or inf value is an
error naming its tensor.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from cunet_optimize.atomic import atomic_path
from cunet_optimize.errors import CheckpointError, ConfigError
from cunet_optimize.models.cunet import POINTS_PER_TASK, CUNet, CUNetConfig

FORMAT_NAME = "cunet-optimize"
FORMAT_VERSION = "1"


def strip_dataparallel_prefix(state_dict: dict) -> dict:
    """The authors' keys -> ours: only the DataParallel `module.` prefix differs."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def _unet_count(state_dict: dict) -> int:
    """N as the keys say: U-Net i has dense layer i at every position (0 when there are none)."""
    layers = [int(m.group(1)) for k in state_dict
              if (m := re.match(r"hg\.down_blocks\.0\.layers\.(\d+)\.norm1\.weight$", k))]
    return max(layers) + 1 if layers else 0


def _shape_fields(state_dict: dict) -> dict:
    """N, K, C, c0, g, b as the tensor shapes say.

    A shape that no configuration has is named here, as the tensor's fault (the
    configuration's own checks would give advice for someone choosing the values)."""

    def shape(key: str) -> tuple:
        if key not in state_dict:
            raise CheckpointError(f"missing key '{key}': this is not a CU-Net state dict")
        return tuple(state_dict[key].shape)

    def misfit(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"the tensor shapes fit no CU-Net configuration: '{key}' has shape "
                               f"{list(shape(key))}, {why}; is this an undamaged CU-Net checkpoint?")

    num_unets = _unet_count(state_dict)
    if not num_unets:
        raise CheckpointError("no 'hg.down_blocks.0.layers.*' keys: this is not a CU-Net state dict")
    conv0, conv1, conv2 = ("features.conv0.weight", "hg.down_blocks.0.layers.0.conv1.weight",
                           "hg.down_blocks.0.layers.0.conv2.weight")
    head, last = "linears.0.conv.weight", f"hg.down_blocks.0.layers.{num_unets - 1}.norm1.weight"
    for key in (conv0, conv1, conv2, head):
        if len(shape(key)) != 4 or min(shape(key)) < 1:
            raise misfit(key, "not a non-empty 4-D convolution weight")
    width, bottleneck, growth_rate = shape(conv0)[0], shape(conv1)[0], shape(conv2)[0]
    if bottleneck % growth_rate:
        raise misfit(conv1, f"{bottleneck} output channels, not a multiple of the growth rate {growth_rate}")
    # U-Net N-1 at the first position sees c0 + K*g channels (K < N previous U-Nets' features)
    order, extra = divmod(shape(last)[0] - width, growth_rate) if len(shape(last)) == 1 else (-1, 0)
    if extra or not 0 <= order < num_unets:
        raise misfit(last, f"not width {width} + K x growth rate {growth_rate} channels for an order "
                           f"0 <= K < {num_unets} (the number of U-Nets)")
    return dict(num_unets=num_unets, order=order, num_classes=shape(head)[0], width=width,
                growth_rate=growth_rate, neck_size=bottleneck // growth_rate)


def infer_config(state_dict: dict, **overrides) -> CUNetConfig:
    """Recover N, K, C, c0, g, b from the tensor shapes of a CU-Net state dict.

    L (the number of supervised heads) is not recorded in the authors' files (all N
    heads are stored); it defaults to N unless given in `overrides`.
    """
    inferred = _shape_fields(state_dict)
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
    """Name the first missing, unexpected or mis-shaped tensor; fill what old files lack.

    `model` may live on the meta device (shapes only): the filled counters are real tensors."""
    expected = model.state_dict()
    fixed = dict(state_dict)
    for key, ref in expected.items():
        if key not in fixed:
            # PyTorch 0.4 files have no BatchNorm counters; they carry no weights.
            if key.endswith("num_batches_tracked"):
                fixed[key] = torch.zeros(ref.shape, dtype=ref.dtype)
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


def check_finite(state_dict: dict, path: str | os.PathLike) -> None:
    """Every floating tensor finite (weights and BatchNorm running statistics alike): a NaN
    or inf weight makes every output NaN, which later stages would only report as an
    unexplained calibration or export failure, or as an NME of nan."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point():
            bad = int(tensor.numel() - torch.isfinite(tensor).sum())
            if bad:
                nan = int(torch.isnan(tensor).sum())
                what = " and ".join(f"{n} {kind} value(s)" for n, kind in ((nan, "NaN"), (bad - nan, "inf")) if n)
                raise CheckpointError(f"{path}: tensor '{key}' has {what}; the checkpoint is damaged "
                                      "(retrain or re-export it)")


def _check_fits(config: CUNetConfig, state_dict: dict, path: Path) -> dict:
    """The configuration against the tensors without allocating them: a config claiming width
    2**40 must not ask for terabytes, nor N = 10**9 build a billion modules. The number of
    U-Nets is counted from the keys first (it bounds the module count), then every tensor's
    shape is compared with a shapes-only (meta device) model of the config."""
    held = _unet_count(state_dict)
    if config.num_unets != held:
        raise CheckpointError(f"{path}: its config says num_unets = {config.num_unets}, but its tensors "
                              f"'hg.down_blocks.0.layers.*' hold {held} U-Nets; {_MISMATCH_FIX}")
    # c0, g, b*g and C are each some tensor's dimension: larger than every one, the config
    # cannot describe this file (and its shapes could overflow even on the meta device)
    largest = max((max(t.shape) for t in state_dict.values() if t.dim()), default=0)
    for name in ("width", "growth_rate", "neck_size", "num_classes"):
        if getattr(config, name) > largest:
            raise CheckpointError(f"{path}: its config says {name} = {getattr(config, name)}, more than any "
                                  f"dimension of its tensors (the largest is {largest}); {_MISMATCH_FIX}")
    with torch.device("meta"):
        skeleton = CUNet(config)
    return check_state_dict(skeleton, state_dict, str(path))


def _check_task(config: CUNetConfig, metadata: dict, path: Path) -> None:
    """A recorded task must agree with the heatmap channels (a pose file has 16)."""
    task = metadata.get("task")
    points = POINTS_PER_TASK.get(task)
    if points is not None and points != config.num_classes:
        raise CheckpointError(
            f"{path}: its metadata says task '{task}' ({points} points), but the model has "
            f"{config.num_classes} heatmap channels; the file contradicts itself: use the checkpoint file the "
            "training run wrote"
        )


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


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir()
                        if p.is_file() and p.name.endswith((".safetensors", ".pth.tar", ".pth", ".pt")))
        which = (f"one of the checkpoint files in it ({', '.join(inside[:4])}{', ...' if len(inside) > 4 else ''})"
                 if inside else "a checkpoint file, e.g. the best.safetensors `cunet-optimize train` writes in --out")
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file; pass {which}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")


def _torch_reason(exc: Exception) -> str:
    """torch.load's complaint, shortened to its first sentence; torch's own advice (report it to
    PyTorch, retry with other arguments) is about torch, not about this file, and is dropped."""
    first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0].split(" (")[0].strip().rstrip(".")
    if not first or re.search(r"report|pytorch|weights_only", first, re.IGNORECASE):
        return type(exc).__name__
    return f"{type(exc).__name__}: {first[:160]}"


def _read_ours(path: Path, overrides: dict) -> tuple[CUNetConfig, dict, dict]:
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
    try:
        stored = json.loads(metadata["config"])
    except ValueError:
        stored = None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: its config metadata is not a JSON object of model fields "
                              f"({metadata['config'][:60]!r}); the file is damaged: re-export it")
    return _apply_overrides(stored, overrides, source=str(path)), state_dict, metadata


def _read_authors(path: Path, overrides: dict) -> tuple[CUNetConfig, dict, dict]:
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
            f"{path}: cannot be read as a torch checkpoint ({_torch_reason(e)}); "
            "is it truncated or not a checkpoint? Download or copy it again"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state_dict = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict = obj
    else:
        raise CheckpointError(f"{path}: a torch file but not a checkpoint (no 'state_dict' of tensors)")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict entry {str(key)[:80]!r} is {type(value).__name__} "
                                  f"{repr(value)[:40]}, not a tensor; this is not a CU-Net checkpoint "
                                  "(or it is damaged)")
    state_dict = strip_dataparallel_prefix(state_dict)
    try:
        config = infer_config(state_dict, **overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, state_dict, {"format": "authors-pth"}


def read_checkpoint(path: str | os.PathLike, **overrides) -> tuple[CUNetConfig, dict, dict]:
    """Return (config, state_dict with our key names, metadata) from either format.

    Everything is checked before a model is built: the configuration against every tensor's
    shape, every value finite, a recorded task against the landmark count."""
    path = Path(path)
    _check_is_file(path)
    reader = _read_ours if _sniff_format(path) == "safetensors" else _read_authors
    config, state_dict, metadata = reader(path, overrides)
    state_dict = _check_fits(config, state_dict, path)
    check_finite(state_dict, path)
    _check_task(config, metadata, path)
    return config, state_dict, metadata


def load_checkpoint(path: str | os.PathLike, memory_efficient: bool = False, **overrides) -> CUNet:
    config, state_dict, metadata = read_checkpoint(path, **overrides)
    model = CUNet(config, memory_efficient=memory_efficient)
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
