"""Quantization-aware fine-tuning: calibrated start, short schedule, the shared train loop.

Defaults follow common QAT practice (NVIDIA's QAT guides, ModelOpt): start from
calibrated scales, about 10% of the original schedule at 1% of its learning rate
with cosine decay, BatchNorm statistics frozen after a warm-up of a quarter of the
epochs (none for a 1-epoch QAT) so the quantization ranges stop chasing them.
Weights of 4 bits and fewer sit further from the float ones and get a longer, hotter
schedule (QAT_SCHEDULES). The checkpoint holds the weights and every quantizer's
scale, and rebuilds the exact fake-quantized model for export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cunet_optimize.atomic import atomic_path
from cunet_optimize.errors import CheckpointError
from cunet_optimize.models import CUNet, CUNetConfig
from cunet_optimize.models.checkpoint import _sniff_format
from cunet_optimize.quant.calibrate import post_training_quantize
from cunet_optimize.quant.qmodel import (
    QuantCUNet,
    freeze_bn,
    load_quant_state,
    quant_state_dict,
    quantize_model,
    set_learnable_scales,
)
from cunet_optimize.quant.scheme import DEFAULT_INT4_BLOCK, QuantScheme, parse_precision
from cunet_optimize.train.loop import TrainRecipe, TrainResult, train

QAT_FORMAT = "cunet-optimize-qat"
# (fraction of the original epochs, fraction of its learning rate) by weight bits; a
# scheme uses the entry of the fewest bits >= its own (float weights: the 8-bit one).
# Fewer bits move the weights further from the float ones, so the schedule gets longer and
# hotter; the paper trains its binary and ternary networks from scratch, so fine-tuning them
# needs most of a schedule at the full rate. The trials behind these entries were not kept;
# `python bench/bench_quant_table.py --data DIR` measures QAT at them (its QAT rows).
QAT_SCHEDULES: dict[int, tuple[float, float]] = {8: (0.1, 0.01), 4: (0.3, 0.1), 2: (0.6, 1.0)}
BN_WARMUP_FRACTION = 0.25  # of the QAT epochs, before BatchNorm statistics are frozen


def schedule_fractions(scheme: QuantScheme | None) -> tuple[float, float]:
    """(epoch fraction, learning-rate fraction) of the original recipe for `scheme`."""
    bits = scheme.weight_bits if scheme is not None else 8
    key = min((b for b in QAT_SCHEDULES if b >= bits), default=max(QAT_SCHEDULES))
    return QAT_SCHEDULES[key]


def qat_recipe(original: TrainRecipe, scheme: QuantScheme | None = None, epochs: int | None = None,
               lr: float | None = None, **changes) -> TrainRecipe:
    """The short QAT schedule for `scheme` derived from the recipe the model was trained with."""
    fields = dict(original.__dict__)
    epoch_fraction, lr_fraction = schedule_fractions(scheme)
    epochs = epochs or max(1, round(original.epochs * epoch_fraction))
    fields.update(
        epochs=epochs,
        lr=lr or original.lr * lr_fraction,
        lr_schedule="cosine",
        lr_steps=(),
        freeze_bn_after=int(epochs * BN_WARMUP_FRACTION),
    )
    fields.update(changes)
    return TrainRecipe(**fields)


def save_qat_checkpoint(qmodel: QuantCUNet, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": QAT_FORMAT, "config": json.dumps(qmodel.config.to_dict(), sort_keys=True),
            "scheme": qmodel.scheme.spec}
    if getattr(qmodel, "layer_formats", None):  # a mixed-precision plan (quant/auto.py)
        meta["layer_formats"] = json.dumps(qmodel.layer_formats, sort_keys=True)
        meta["int4_block"] = json.dumps(qmodel.int4_block)  # null: INT4 per output channel
    meta.update({k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
                 for k, v in (metadata or {}).items()})
    with atomic_path(path) as tmp:
        save_file(quant_state_dict(qmodel), tmp, metadata=meta)
    return path


def load_qat_checkpoint(path: str | os.PathLike) -> QuantCUNet:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such QAT checkpoint")
    if _sniff_format(path) != "safetensors":
        raise CheckpointError(f"{path}: not a QAT checkpoint (expected a .safetensors written by `qat`)")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != QAT_FORMAT:
        raise CheckpointError(f"{path}: not a QAT checkpoint (format {meta.get('format')!r}); "
                              "plain checkpoints go to --model")
    model = CUNet(CUNetConfig.from_dict(json.loads(meta["config"])))
    # plan checkpoints written before the field fine-tuned their INT4 convs in blocks
    int4_block = json.loads(meta["int4_block"]) if "int4_block" in meta else DEFAULT_INT4_BLOCK
    qmodel = quantize_model(model, parse_precision(meta["scheme"]), json.loads(meta.get("layer_formats", "{}")),
                            int4_block)
    load_quant_state(qmodel, state)
    qmodel.checkpoint_metadata = meta
    return qmodel.eval()


def run_qat(
    model: CUNet,
    scheme: QuantScheme,
    train_set,
    val_set,
    calibration_batches,
    recipe: TrainRecipe,
    out_dir: str | os.PathLike,
    *,
    calib_method: str = "percentile",
    equalize_alpha: float | None = None,
    learnable_scales: bool = False,
    resume: bool = True,
    progress: bool = True,
    metadata: dict | None = None,
    sync_batchnorm: bool = False,
    layer_formats: dict | None = None,
    int4_block: int | None = DEFAULT_INT4_BLOCK,
) -> TrainResult:
    """Fine-tune `model` quantized by `scheme` from calibrated scales (the checkpoint in
    out_dir/best.safetensors). `layer_formats`: an auto plan's per-conv formats, its INT4 convs
    in blocks of `int4_block` input channels (None: per output channel, as the plan's target
    runs them, quant.policy.int4_block_for)."""
    torch.manual_seed(recipe.seed)
    calibration_batches = list(calibration_batches)  # a plan with INT4 convs calibrates twice
    qmodel, _, equalization = post_training_quantize(model, scheme, calibration_batches, calib_method,
                                                     equalize_alpha, progress=progress)
    if layer_formats:  # fine-tune a mixed plan of `build --precision auto` (quant/auto.py)
        from cunet_optimize.quant.auto import with_layer_formats

        plain = None  # its INT4 convs unequalized, as the build of the plan makes them
        if equalization is not None and "int4" in layer_formats.values():
            plain, _, _ = post_training_quantize(model, scheme, calibration_batches, calib_method, None,
                                                 progress=progress)
        qmodel = with_layer_formats(qmodel, layer_formats, int4_block, plain)
    if learnable_scales:
        set_learnable_scales(qmodel, True)

    def on_epoch_start(epoch: int) -> None:
        freeze_bn(qmodel, recipe.freeze_bn_after is not None and epoch >= recipe.freeze_bn_after)

    meta = {**(metadata or {}), "calibration": calib_method, "learnable_scales": learnable_scales,
            "equalization": equalization.to_dict() if equalization else None}
    return train(qmodel, train_set, val_set, recipe, out_dir, resume=resume, progress=progress,
                 metadata=meta, save_fn=save_qat_checkpoint, on_epoch_start=on_epoch_start,
                 sync_batchnorm=sync_batchnorm)
