"""The torch.export-based ONNX exporter (`torch.onnx.export(..., dynamo=True)`) for CU-Net.

`export_with_dynamo` is what onnx_export.trace_to_onnx calls for exporter="dynamo": it
returns the raw export (outputs heatmaps_0..L-1, batch symbolic), which onnx_export
cleans, names and verifies the same way whichever exporter made it.

What it takes to export our fake quantizers (torch 2.13, onnxscript 0.7):
- torch.export runs the model on fake tensors. `torch.fake_quantize_per_tensor_affine` with
  a tensor scale (every activation quantizer) dispatches to
  `aten::_fake_quantize_per_tensor_affine_cachemask_tensor_qparams`, which has no fake
  (Meta) kernel: the export stops with "UnsupportedOperatorException:
  aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams.default". We register
  shape-only Meta kernels for the cachemask ops for the duration of one export (only
  where torch has none), so the graph keeps the fake-quantize ops themselves.
- onnxscript's torchlib translates those ops to QuantizeLinear/DequantizeLinear, but
  only for the ranges an 8-bit type gives natively ((-128, 127), (0, 255), (0, 127)); a
  narrower range such as TensorRT's symmetric [-127, 127] raises NotImplementedError.
  `FAKE_QUANT_TRANSLATIONS` replaces them with the translation symbolics.py gives the
  TorchScript exporter: the same clamp before QuantizeLinear for a narrow range, the
  same scalar scale for per-tensor quantization, so both exporters yield one graph
  after clean-up.

Unlike the TorchScript tracer, torch.export does not run the network's arithmetic
(fake tensors carry shapes only), so its time does not grow with the input size; we
export at the real 256 px with static spatial dims and a symbolic batch.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

import onnx
import torch

from cunet_optimize.errors import CUNetError
from cunet_optimize.exporters.symbolics import check_quant_range, is_native_range
from cunet_optimize.onnx_tools.graph import opset_of

log = logging.getLogger(__name__)

TORCHLIB_OPSET = 18  # the opset torchlib's translations are written in; lower ones are converted down

# The cachemask ops torch's fake-quantize ops run beneath; shape-only kernels let
# torch.export trace them on fake tensors.
_CACHEMASK_OPS = (
    "aten::_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
    "aten::fake_quantize_per_tensor_affine_cachemask",
    "aten::fake_quantize_per_channel_affine_cachemask",
)


def _cachemask_shapes(x: torch.Tensor, *_args) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


@contextmanager
def fake_tensor_kernels() -> Iterator[None]:
    """Meta kernels for the fake-quantize cachemask ops that have none, for one export."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        for qualname in _CACHEMASK_OPS:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"):
                lib.impl(qualname.split("::")[1], _cachemask_shapes, "Meta")
        yield
    finally:
        lib._destroy()


def _fake_quantize(x, scale, zero_point, axis: int | None, quant_min: int, quant_max: int):
    """The ONNX form of fake quantization, as symbolics._fake_quantize builds it."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    zp_type = check_quant_range(quant_min, quant_max)
    if axis is None:
        # A one-element scale of shape [1] would read as per-axis on ONNX's default axis 1.
        scalar = op.Constant(value=ir.tensor([], dtype=ir.DataType.INT64))
        scale, zero_point = op.Reshape(scale, scalar), op.Reshape(zero_point, scalar)
    scale = op.Cast(scale, to=onnx.TensorProto.FLOAT)
    zp = op.Cast(zero_point, to=zp_type)
    if not is_native_range(quant_min, quant_max, zp_type):
        zp_float = op.Cast(zero_point, to=onnx.TensorProto.FLOAT)

        def bound(q: int):
            value = op.Mul(op.Sub(op.Constant(value_float=float(q)), zp_float), scale)
            if axis is None:
                return value
            shape = [1] * len(x.shape)
            shape[axis] = -1
            return op.Reshape(value, op.Constant(value_ints=shape))

        x = op.Max(op.Min(x, bound(quant_max)), bound(quant_min))
    kwargs = {} if axis is None else {"axis": axis}
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp, **kwargs), scale, zp, **kwargs)


def _per_tensor(x, scale, zero_point, quant_min: int, quant_max: int):
    if isinstance(scale, float):  # the overload with Python scalars
        from onnxscript import opset18 as op

        scale, zero_point = op.Constant(value_float=scale), op.Constant(value_int=int(zero_point))
    return _fake_quantize(x, scale, zero_point, None, quant_min, quant_max)


def _per_channel(x, scale, zero_point, axis: int, quant_min: int, quant_max: int):
    return _fake_quantize(x, scale, zero_point, axis, quant_min, quant_max)


FAKE_QUANT_TRANSLATIONS = {
    torch.ops.aten.fake_quantize_per_tensor_affine.default: _per_tensor,
    torch.ops.aten.fake_quantize_per_tensor_affine.tensor_qparams: _per_tensor,
    torch.ops.aten.fake_quantize_per_channel_affine.default: _per_channel,
}


_FOLDED = "which the torch.export-based exporter folds into a following BatchNormalization"


def unsupported(model: torch.nn.Module) -> str | None:
    """Why `model` cannot be exported to the TorchScript exporter's graph this way, or None.

    Weights fake-quantized by plain ops (INT4 per block or channel, the paper's binary,
    ternary and fixed-point weights) trace to constant-foldable arithmetic, and
    torch.onnx's optimizer folds a following BatchNormalization into the result, which
    the TorchScript exporter never does (it fuses BN into parameters only): measured with
    export_onnx on the embedded model, int4 and int4-pc at opset 21, the torch.export path
    kept 46 BatchNormalization nodes against the TorchScript path's 65 (547 nodes against
    566). BN folded into INT4-grid weights takes them off their grid, so
    `surgery.pack_int4_weights` cannot store them as INT4. INT8 weights export as Q/DQ,
    which nothing folds, so INT8 models export to the same graph
    (bench/results/exporters.json)."""
    from cunet_optimize.quant.quantizers import IntQuantizer

    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is None or not quantizer.enabled:
            continue
        if not (isinstance(quantizer, IntQuantizer) and quantizer.num_bits == 8):
            bits = f", {quantizer.num_bits} bits" if hasattr(quantizer, "num_bits") else ""
            kind = f"{type(quantizer).__name__}{bits}"
            return f"the weights of '{name}' are fake-quantized without Q/DQ ({kind}), " + _FOLDED
    return None


def unsupported_precision(precision: str) -> str | None:
    """`unsupported` decided from a build's precision spec, before any calibration."""
    from cunet_optimize.quant import parse_precision
    from cunet_optimize.quant.scheme import FLOAT, INT

    if precision in ("fp32", "fp16"):
        return None
    if precision == "auto":  # plans mix INT4 weights in
        return "--precision auto plans may hold INT4 weights, " + _FOLDED
    scheme = parse_precision(precision)
    if scheme.weight == FLOAT or (scheme.weight == INT and scheme.weight_bits == 8):
        return None
    return f"{precision} weights are fake-quantized without Q/DQ, " + _FOLDED


def export_with_dynamo(model: torch.nn.Module, example: torch.Tensor, *, input_name: str,
                       output_names: list[str], opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    """The raw torch.export-based ONNX export of `model` on `example` (batch symbolic
    when dynamic_batch); CUNetError with the exporter's first line on failure."""
    reason = unsupported(model)
    if reason:
        raise CUNetError(f"export: --exporter dynamo cannot export this model: {reason}; use --exporter legacy")
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    quiet = _quiet_loggers("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
    with warnings.catch_warnings(), fake_tensor_kernels(), quiet:
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[input_name],
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=FAKE_QUANT_TRANSLATIONS,
                optimize=True,
                verbose=False,
            )
        except CUNetError:
            raise
        except Exception as err:
            raise CUNetError(f"torch.onnx.export(dynamo=True) failed: {_first_line(err)}") from err
    raw = program.model_proto
    if opset_of(raw) != opset:  # torchlib writes opset 18 and keeps it when it cannot convert down
        raise CUNetError(f"torch.onnx.export(dynamo=True) could not convert its graph to opset {opset} (it wrote "
                         f"{opset_of(raw)}); export with --opset >= {TORCHLIB_OPSET} or --exporter legacy")
    return raw


@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from these loggers during the export: on every call the exporter logs
    a warning per missing optional package (torchvision) and per opset conversion, and
    its optimizer a line per deduplicated initializer."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _first_line(err: BaseException) -> str:
    """The exporter's own summary line (torch.onnx wraps the cause in a long banner)."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = f"{type(cause).__name__}: {str(cause).strip()}"
    return text.splitlines()[0]
