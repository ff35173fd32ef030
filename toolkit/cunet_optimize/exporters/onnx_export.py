"""CU-Net -> ONNX: trace, clean, name, verify, write.

`export_onnx` is the one entry point. Two exporters make the raw graph (EXPORTERS):
- "legacy", the TorchScript tracer (`dynamo=False`, deprecated since PyTorch 2.9). Most
  of its time is the traced forward pass, so we trace at 64x64 px with the spatial dims
  marked dynamic (CU-Net is fully convolutional; its Resize nodes carry constant scales,
  so the graph does not depend on the size) and fix them to 256 afterwards. The N=8 face
  model's FP32 export took 18.0 s in torch.onnx.export on 2 shared vCPUs at load average
  up to 8.9 (bench/results/surgery.json, `export_fp32`), and a build's whole export stage,
  verification included, 5.5 s on a quiet machine
  (bench/results/build_time_face_n8_fp32_quiet.json).
- "dynamo", torch.export (`dynamo=True`, dynamo.py), which traces on fake tensors and so
  exports at 256 px directly.
Both raw outputs are then cleaned the same way with onnx-graphsurgeon: constant folding
(Q/DQ nodes are never folded), Identity removal, dead nodes removed, topological
order; free-text fields are emptied so equal models give byte-identical files. After
that the two exporters give the same graph (same ops, same Q/DQ placement;
bench/results/exporters.json), so verification runs at 256 px on either.

The contract of the file:
- input "image": float32 [B, 3, 256, 256] in [0, 1] (B symbolic "batch" unless
  dynamic_batch=False, then 1);
- outputs "heatmaps" (the last supervised head) or, with heads="all",
  "heatmaps_0" .. "heatmaps_{L-1}", float32 [B, C, 64, 64];
- with decode_landmarks, "landmarks": float32 [B, C, 2], (x, y) in 0-based heatmap
  pixels, decoded in the graph (see landmarks.py);
- fp16: float16 weights and compute, float32 I/O (see fp16.py);
- metadata_props: toolkit version, model config (JSON), precision, heads.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from cunet_optimize import __version__
from cunet_optimize.atomic import write_atomic
from cunet_optimize.cache_seal import ProcessMemo, feed_digest
from cunet_optimize.data.synth import VERIFY_SEED, verification_batch
from cunet_optimize.data.transforms import decode_heatmaps
from cunet_optimize.errors import CUNetError
from cunet_optimize.exporters.dynamo import export_with_dynamo, unsupported_precision
from cunet_optimize.exporters.fp16 import convert_graph_to_fp16
from cunet_optimize.exporters.landmarks import add_landmark_decoder, landmark_decoding_error
from cunet_optimize.exporters.symbolics import fake_quant_symbolics, mark_int4_weights
from cunet_optimize.models.cunet import HEATMAP_SIZE, INPUT_SIZE
from cunet_optimize.onnx_tools.graph import clean_graph, finish, op_counts, save_model, to_model
from cunet_optimize.onnx_tools.verify import (
    QUANT_PROBE,
    VerificationResult,
    check_onnx,
    bypass_activation_qdq,
    compare_outputs,
    computes_in_fp16,
    graph_kind,
    ort_version,
    run_onnxruntime,
)

log = logging.getLogger(__name__)

INPUT_NAME = "image"
BATCH_DIM = "batch"
HEADS = ("last", "all")
EXPORTERS = ("legacy", "dynamo")  # torch.onnx.export(dynamo=False) | (dynamo=True)
# The TorchScript exporter stays the default, by measurement (bench/results/exporters.json,
# bench/bench_exporters.py; torch 2.13 CPU, 2 shared cores at load average 7-13, exporters
# alternating): both give the same graph after our clean-up (embedded and N=8 face models,
# FP32 and INT8: same op multiset, same 130 / 514 Q/DQ nodes on the same tensors, INT8 graphs
# bit-identical, FP32 conv weights within 4 float32 epsilon where BN was folded) and the same
# verification error, but torch.export took 1.9-7.5x as long (median export seconds:
# embedded FP32 10.6 vs 53.1, INT8 10.4 vs 78.2; N=8 FP32 26.3 vs 48.7, INT8 21.9 vs 114.5).
# "dynamo" is the path to take once the TorchScript exporter is removed; it cannot export
# weights fake-quantized without Q/DQ (INT4, the paper's modes: dynamo.unsupported says why).
DEFAULT_EXPORTER = "legacy"
MIN_OPSET, MAX_OPSET = 13, 21
# The TorchScript exporter stops at opset 20; higher opsets are reached with
# onnx.version_converter on the raw export.
TORCHSCRIPT_MAX_OPSET = 20
TRACE_SIZE = 64  # smallest input CU-Net accepts: stride 4 stem, then 4 poolings by 2
LANDMARK_TOLERANCE = 1e-5  # px: the in-graph decoder must match the NumPy one exactly
# Verified exports kept in this process (export_onnx): a build exports its FP32
# reference every time, and a sweep over precisions and targets in one process (the Python API,
# the test suite) exports the same models again. In the test suite 58 of 164 exports repeated
# one in the same process, 65 of the 250 CPU-seconds exporting took; with them kept, the
# suite ran in 305 s instead of 360-373 s (2-core Xeon, pytest alone).
EXPORT_MEMO_BYTES = 256 * 2**20


def check_exporter(exporter: str | None, precision: str) -> str:
    """The exporter a build of `precision` uses (None: the default); CUNetError, one line,
    for an unknown exporter or one that cannot export that precision."""
    exporter = exporter or DEFAULT_EXPORTER
    if exporter not in EXPORTERS:
        raise CUNetError(f"exporter must be one of {', '.join(EXPORTERS)}, got '{exporter}'")
    reason = unsupported_precision(precision) if exporter == "dynamo" else None
    if reason:
        raise CUNetError(f"--exporter dynamo cannot export --precision {precision}: {reason}; use --exporter legacy")
    return exporter


@dataclass
class ExportSummary:
    path: str
    exporter: str  # one of EXPORTERS
    opset: int
    precision: str  # "fp32" | "fp16"
    quantized: bool  # the graph holds Q/DQ nodes (a fake-quantized model)
    heads: str
    input_name: str
    output_names: list[str]
    dynamic_batch: bool
    decode_landmarks: bool
    raw_nodes: int  # as the exporter wrote them, before our clean-up
    num_nodes: int
    op_counts: dict[str, int]
    size_bytes: int
    sha256: str
    torch_export_seconds: float
    total_seconds: float
    verification: dict = field(default_factory=dict)
    # where an identical export earlier in this process was written: its graph, verified
    # then, was written again (export_onnx's memo); "" for an export made here
    reused_from: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


_exports = ProcessMemo(EXPORT_MEMO_BYTES, size=lambda kept: len(kept[0]))  # (graph bytes, ExportSummary)


def module_digest(model: torch.nn.Module) -> str | None:
    """A digest of everything a module's forward reads: each submodule's class, its parameters and
    buffers (dtype, shape, bytes) and its other attributes (quantizer bit widths, axes, flags,
    schemes). None where an attribute has no content to digest (an object shown by its address,
    such as a registered hook's function): such a model is never taken for another."""
    h = hashlib.sha256()

    def tensor_bytes(value) -> bytes | None:
        if not isinstance(value, torch.Tensor):
            return None
        t = value.detach().cpu().contiguous()
        head = f"T{t.dtype}{tuple(t.shape)}{value.requires_grad}".encode()
        return head + t.reshape(-1).view(torch.uint8).numpy().tobytes()

    for name, module in model.named_modules():
        h.update(f"M{name}:{type(module).__module__}.{type(module).__qualname__}".encode())
        for key, value in sorted(vars(module).items()):
            if key == "training":
                continue  # export traces in eval mode, whatever the module's mode
            h.update(f"K{key}".encode())
            if not feed_digest(h, value, tensor_bytes):
                return None
    return h.hexdigest()


def _export_key(model: torch.nn.Module, options: dict) -> str | None:
    digest = module_digest(model)
    if digest is None:
        return None
    return hashlib.sha256(json.dumps([digest, options, __version__, torch.__version__, onnx.__version__],
                                     sort_keys=True).encode()).hexdigest()


def _head_names(count: int) -> list[str]:
    return [f"heatmaps_{i}" for i in range(count)]


def _count_heads(model: torch.nn.Module, dummy: torch.Tensor) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_heads") and hasattr(config, "refine_iters"):
        return int(config.num_heads) * int(config.refine_iters)
    with torch.no_grad():
        return len(model(dummy))


def trace_to_onnx(model: torch.nn.Module, opset: int, dynamic_batch: bool,
                  exporter: str = "legacy") -> tuple[onnx.ModelProto, float]:
    """The raw export by `exporter` (outputs heatmaps_0..L-1) and the seconds it took."""
    size = TRACE_SIZE if exporter == "legacy" else INPUT_SIZE
    # Batch 2: torch.export specializes a dimension that is 1 in the example.
    dummy = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(VERIFY_SEED))
    outputs = _head_names(_count_heads(model, dummy[:1]))
    start = time.perf_counter()
    # Tracing without autograd is faster (and torch.export refuses fake quantization of
    # tensors that require grad); parameters get their flag back afterwards.
    grads = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grads:
        p.requires_grad_(False)
    with _restore_grads(grads):
        if exporter == "dynamo":
            raw = export_with_dynamo(model, dummy, input_name=INPUT_NAME, output_names=outputs, opset=opset,
                                     dynamic_batch=dynamic_batch)
        else:
            raw = _torchscript_export(model, dummy[:1], outputs, opset, dynamic_batch)
            if opset > TORCHSCRIPT_MAX_OPSET:
                raw = convert_opset(raw, opset)
    _fix_spatial_dims(raw)
    return raw, time.perf_counter() - start


def _torchscript_export(model: torch.nn.Module, dummy: torch.Tensor, outputs: list[str], opset: int,
                        dynamic_batch: bool) -> onnx.ModelProto:
    axes = {name: ({0: BATCH_DIM} if dynamic_batch else {}) | {2: "height", 3: "width"}
            for name in [INPUT_NAME, *outputs]}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), fake_quant_symbolics():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(
                model,
                (dummy,),
                buffer,
                dynamo=False,
                opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_axes=axes,
                do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
            )
        except CUNetError:
            raise
        except Exception as err:
            raise CUNetError(
                f"torch.onnx.export failed: {str(err).strip().splitlines()[0]}; "
                "is the model a CU-Net whose forward(image) returns a list of heatmaps?"
            ) from err
    return onnx.load_from_string(buffer.getvalue())


@contextmanager
def _restore_grads(grads: list) -> Iterator[None]:
    try:
        yield
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)


def _fix_spatial_dims(model: onnx.ModelProto) -> None:
    """Input 256x256, heatmaps 64x64; intermediate shapes are re-inferred later."""
    for value, size in [(v, INPUT_SIZE) for v in model.graph.input] + [(v, HEATMAP_SIZE) for v in model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis in (2, 3):
            dims[axis].Clear()
            dims[axis].dim_value = size
    del model.graph.value_info[:]


def _set_batch_dim(tensor: gs.Variable, dynamic: bool) -> None:
    if tensor.shape is not None and len(tensor.shape):
        tensor.shape = [BATCH_DIM if dynamic else 1, *tensor.shape[1:]]


def _metadata(model: torch.nn.Module, precision: str, heads: str) -> dict[str, str]:
    meta = {"cunet_optimize.version": __version__, "cunet_optimize.precision": precision, "cunet_optimize.heads": heads}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        meta["cunet_optimize.config"] = json.dumps(config.to_dict(), sort_keys=True)
    return meta


def build_graph(
    raw: onnx.ModelProto, *, heads: str, decode_landmarks: bool, fp16: bool, dynamic_batch: bool, opset: int
) -> tuple[gs.Graph, list[str]]:
    """Clean the raw export and give it the file's contract; returns (graph, output names)."""
    graph = clean_graph(gs.import_onnx(raw))
    if opset >= 21:
        mark_int4_weights(graph)
    heads_out = list(graph.outputs)
    if heads == "last":
        heads_out = heads_out[-1:]
        heads_out[0].name = "heatmaps"
    graph.outputs = heads_out
    finish(graph)
    if fp16:
        convert_graph_to_fp16(graph)
    for tensor in [*graph.inputs, *graph.outputs]:
        _set_batch_dim(tensor, dynamic_batch)
    if decode_landmarks:
        landmarks = add_landmark_decoder(graph, graph.outputs[-1])
        graph.outputs.append(landmarks)
    finish(graph)
    return graph, [t.name for t in graph.outputs]


def finalize(graph: gs.Graph, metadata: dict[str, str]) -> onnx.ModelProto:
    model = to_model(graph)
    model.producer_name = "cunet-optimize"
    model.producer_version = __version__
    model.doc_string = ""
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, dict(sorted(metadata.items())))
    return model


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Raise the opset of the raw export (the TorchScript exporter stops at 20)."""
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as err:
        raise CUNetError(f"cannot convert the exported graph to opset {opset}: {str(err).splitlines()[0]}") from err


def _heads(model: torch.nn.Module, image: np.ndarray, dtype: torch.dtype = torch.float32) -> list[np.ndarray]:
    with torch.no_grad():
        return [h.double().numpy() for h in model(torch.from_numpy(image).to(dtype))]


def _fp16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy that stores like float16: weights, buffers and every leaf module's
    output rounded to float16, arithmetic in float32 (what fp16 GPU kernels do; PyTorch's
    own float16 CPU kernels are much slower than this)."""
    rounded = copy.deepcopy(model).float()
    with torch.no_grad():
        for tensor in [*rounded.parameters(), *rounded.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    for module in rounded.modules():
        if not list(module.children()):
            module.register_forward_hook(lambda _m, _i, out: out.half().float() if torch.is_tensor(out) else out)
    return rounded


def reference_heads(torch_model: torch.nn.Module, image: np.ndarray, kind: str,
                    fp16: bool = False) -> tuple[list, list, str, str]:
    """(reference heads, noisy heads, reference name, noise name) for a graph of `kind`
    (onnx_tools/verify.py says why each pair is what it is)."""
    version = f"PyTorch {torch.__version__}"
    float32 = _heads(torch_model, image)
    if kind == "fake_quant" and fp16:
        return (float32, _heads(_fp16_rounded(torch_model), image), f"{version} (float32 fake quantization)",
                "the same model with float16 storage")
    if kind == "fake_quant":
        shifted = image + np.float32(QUANT_PROBE) * np.random.default_rng(VERIFY_SEED).standard_normal(
            image.shape, dtype=np.float32)
        return (float32, _heads(torch_model, shifted), f"{version} (float32 fake quantization)",
                f"the same model on inputs moved by {QUANT_PROBE:g}")
    float64 = _heads(copy.deepcopy(torch_model).double(), image, torch.float64)
    if kind == "fp16":
        noisy, what = _heads(_fp16_rounded(torch_model), image), "PyTorch with float16 storage"
    else:
        noisy, what = float32, "PyTorch float32"
    return float64, noisy, f"{version} (float64)", f"{what} (vs float64)"


def _as_onnx_dequantizes(quantizer, weight: torch.Tensor, fp16: bool = False) -> torch.Tensor:
    """The weight a graph's DequantizeLinear(QuantizeLinear(w)) computes. PyTorch's 8-bit
    fake quantization multiplies by the reciprocal scale where ONNX's QuantizeLinear
    divides, so a weight sitting on a rounding boundary can land one step apart; a deep
    network amplifies a few such steps far beyond float rounding (the N=8 face model's
    wiring check failed on them). A float16 graph quantizes float16 weights with float16
    scales: a scale's rounding shifts its whole channel, which float16 storage noise alone
    does not model. Other weight quantizers are traced into constants, exact as is."""
    from cunet_optimize.quant.quantizers import IntQuantizer

    if not (isinstance(quantizer, IntQuantizer) and quantizer.num_bits == 8):
        return quantizer(weight)
    scale = quantizer.scale.detach().reshape((-1,) + (1,) * (weight.dim() - 1))
    if fp16:
        weight, scale = weight.half().float(), scale.half().float()
    clamped = torch.clamp(weight, -scale * quantizer.qmax, scale * quantizer.qmax)
    return torch.clamp(torch.round(clamped / scale), -128, 127) * scale


def weights_quantized_float_model(qmodel: torch.nn.Module, fp16: bool = False) -> torch.nn.Module | None:
    """A copy of a fake-quantized CU-Net with its weights replaced by their quantized values
    and every quantizer off: the float network the graph computes when its activation
    Q/DQ pairs are bypassed. None for a model without quantizer modules."""
    from cunet_optimize.quant.qmodel import named_quantizers, set_quantizers_enabled

    if not any(True for _ in named_quantizers(qmodel)):
        return None
    plain = copy.deepcopy(qmodel).eval()
    with torch.no_grad():
        for module in plain.modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is not None and quantizer.enabled:
                module.weight.copy_(_as_onnx_dequantizes(quantizer, module.weight, fp16))
    set_quantizers_enabled(plain, False)
    return plain


def verify_wiring(onnx_model: onnx.ModelProto, qmodel: torch.nn.Module, image: np.ndarray,
                  head_names: list[str]) -> VerificationResult | None:
    """The fake-quant graph with its activation Q/DQ bypassed vs the model with activation
    quantization off, under the fp32 rule (fp16 for a float16 graph; onnx_tools/verify.py says
    why); None when the model's
    quantizers cannot be switched off or the graph has no activation Q/DQ."""
    # A graph computing in float16 (e.g. TensorRT 11's strongly typed DLA plans) is judged
    # by float16 storage noise, as its unquantized sibling would be.
    fp16 = computes_in_fp16(onnx_model)
    rule = "fp16" if fp16 else "fp32"
    plain = weights_quantized_float_model(qmodel, fp16)
    if plain is None:
        return None
    bypassed, pairs = bypass_activation_qdq(onnx_model)
    if not pairs:
        return None
    actual = run_onnxruntime(bypassed, {INPUT_NAME: image}, level="disable_all")
    reference, noisy, reference_name, noise_name = reference_heads(plain, image, rule)
    result = compare_outputs(
        actual, dict(zip(head_names, reference[-len(head_names):])), rule,
        noisy=dict(zip(head_names, noisy[-len(head_names):])),
        runtime=f"onnxruntime {ort_version()} CPU ORT_DISABLE_ALL, {pairs} activation Q/DQ pairs bypassed",
        reference_name=reference_name.replace("(float64)", "(float64, activation quantization off)"),
        noise_name=noise_name,
    )
    return result


def verify_against_torch(
    onnx_model: onnx.ModelProto, torch_model: torch.nn.Module, output_names: list[str], batch: int
) -> VerificationResult:
    """ORT (ORT_DISABLE_ALL) vs PyTorch on synthetic faces, judged by the model's own
    rounding noise (onnx_tools/verify.py); CUNetError on mismatch."""
    image = verification_batch(batch)
    actual = run_onnxruntime(onnx_model, {INPUT_NAME: image}, level="disable_all")
    kind = graph_kind(onnx_model)
    was_training = torch_model.training
    torch_model.eval()
    try:
        reference, noisy, reference_name, noise_name = reference_heads(torch_model, image, kind,
                                                                       computes_in_fp16(onnx_model))
    finally:
        torch_model.train(was_training)
    head_names = [n for n in output_names if n.startswith("heatmaps")]
    result = compare_outputs(
        actual,
        dict(zip(head_names, reference[-len(head_names):])),
        kind,
        noisy=dict(zip(head_names, noisy[-len(head_names):])),
        runtime=f"onnxruntime {ort_version()} CPU ORT_DISABLE_ALL",
        reference_name=reference_name,
        noise_name=noise_name,
    )
    result.raise_on_failure("export verification")
    if kind == "fake_quant":
        wiring = verify_wiring(onnx_model, torch_model, image, head_names)
        if wiring is not None:
            wiring.raise_on_failure("export verification (wiring, activation Q/DQ bypassed)")
            worst = max(o.max_abs_error / max(o.allowed, 1e-30) for o in wiring.outputs)
            result.notes.append(f"wiring: with the {wiring.runtime.split(', ')[-1]}, the graph is within "
                                f"{worst:.2f}x the allowance of the float model with quantized weights")
            result.wiring = wiring.to_dict()
    if "landmarks" in output_names:
        # The decoder is checked exactly against the NumPy decoding of the graph's own
        # heatmaps; against PyTorch's heatmaps only agreement is reported (near-ties
        # may flip the argmax under float rounding).
        worst = landmark_decoding_error(actual[head_names[-1]], actual["landmarks"])
        if not worst <= LANDMARK_TOLERANCE:
            raise CUNetError(
                f"export verification: in-graph landmark decoding differs from decode_heatmaps(method='quarter') "
                f"by {worst:.3g} px (allowed {LANDMARK_TOLERANCE}); this is a bug, report it"
            )
        torch_points = decode_heatmaps(reference[-1].astype(np.float32), method="quarter")
        agree = float(np.mean(np.all(np.abs(actual["landmarks"] - torch_points) <= LANDMARK_TOLERANCE, axis=-1)))
        result.notes.append(
            f"landmarks: equal to decode_heatmaps(quarter) of the graph's heatmaps (max diff {worst:.2g} px); "
            f"{agree:.1%} equal to decoding PyTorch's heatmaps"
        )
    return result


FP16_SCALE_RELATIVE_ERROR = 0.01  # worst float16 rounding of a scale we accept (1%)


def check_fp16_scales(model: torch.nn.Module) -> None:
    """Refuse a fake-quantized model whose activation scales a float16 graph cannot hold:
    float16 subnormals keep fewer significant bits the smaller they are, and below 2**-25 a
    scale becomes 0 (every value then quantizes to one point). Seen on untrained models,
    whose dead layers calibrate to near-zero ranges."""
    from cunet_optimize.quant.qmodel import is_activation_quantizer, named_quantizers

    for name, quantizer in named_quantizers(model):
        scale = getattr(quantizer, "scale", None)
        if scale is None or not (quantizer.enabled and is_activation_quantizer(quantizer)):
            continue
        scale = scale.detach().float()
        error = ((scale.half().float() - scale).abs() / scale).max()
        if float(error) > FP16_SCALE_RELATIVE_ERROR:
            raise CUNetError(
                f"export: quantizer '{name}' has scale {float(scale.min()):.3g}, which float16 rounds by "
                f"{float(error):.0%}, and this graph computes in float16 (e.g. TensorRT 11's strongly typed "
                "plans): its activations are all near zero (an untrained or dead layer?); check the model "
                "and its calibration images, or build for TensorRT 10 (--trt-major 10)")


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    *,
    opset: int = 17,
    heads: str = "last",
    decode_landmarks: bool = False,
    fp16: bool = False,
    dynamic_batch: bool = True,
    verify: bool = True,
    exporter: str = DEFAULT_EXPORTER,
) -> ExportSummary:
    """Export a CU-Net (plain or fake-quantized) to a verified ONNX file at `path`.

    Raises CUNetError if the options are invalid, the export fails, the file is not
    valid ONNX, or ONNX Runtime's outputs differ from PyTorch's by more than the
    model's own rounding noise (onnx_tools/verify.py); nothing is written then. verify=False skips
    only that last check (for benchmarks that time the exporter alone).
    """
    start = time.perf_counter()
    if heads not in HEADS:
        raise CUNetError(f"export: heads must be one of {HEADS}, got '{heads}'")
    if exporter not in EXPORTERS:
        raise CUNetError(f"export: exporter must be one of {', '.join(EXPORTERS)}, got '{exporter}'")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CUNetError(f"export: opset {opset} is outside the supported {MIN_OPSET}..{MAX_OPSET} (Q/DQ needs >= 13)")
    params = list(model.parameters())
    if params and params[0].dtype != torch.float32:
        raise CUNetError(
            f"export: the model's parameters are {params[0].dtype}; pass a float32 model "
            "(use fp16=True for a float16 graph)"
        )
    if fp16:
        check_fp16_scales(model)
    was_training = model.training
    model.eval()
    try:
        # verify=False is for timing the exporter: it exports anew
        key = _export_key(model, dict(opset=opset, heads=heads, decode_landmarks=decode_landmarks, fp16=fp16,
                                      dynamic_batch=dynamic_batch, exporter=exporter)) if verify else None
        kept = _exports.get(key)
        if kept is not None:
            data, earlier = kept
            write_atomic(Path(path), data)
            log.info("exported %s: the verified graph of the same model exported to %s", path, earlier.path)
            return replace(earlier, path=str(path), total_seconds=round(time.perf_counter() - start, 3),
                           reused_from=earlier.path)
        raw, torch_seconds = trace_to_onnx(model, opset, dynamic_batch, exporter)
        graph, output_names = build_graph(
            raw, heads=heads, decode_landmarks=decode_landmarks, fp16=fp16, dynamic_batch=dynamic_batch, opset=opset
        )
        precision = "fp16" if fp16 else "fp32"
        onnx_model = finalize(graph, _metadata(model, precision, heads))
        check_onnx(onnx_model, "exported model")
        verification = (verify_against_torch(onnx_model, model, output_names, batch=2 if dynamic_batch else 1)
                        if verify else None)
    finally:
        model.train(was_training)
    save_model(onnx_model, path)
    data = onnx_model.SerializeToString()
    summary = ExportSummary(
        path=str(path),
        exporter=exporter,
        opset=opset,
        precision=precision,
        quantized=any(n.op_type == "QuantizeLinear" or n.op_type == "DequantizeLinear" for n in onnx_model.graph.node),
        heads=heads,
        input_name=INPUT_NAME,
        output_names=output_names,
        dynamic_batch=dynamic_batch,
        decode_landmarks=decode_landmarks,
        raw_nodes=len(raw.graph.node),
        num_nodes=len(onnx_model.graph.node),
        op_counts=op_counts(onnx_model),
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        torch_export_seconds=round(torch_seconds, 3),
        total_seconds=round(time.perf_counter() - start, 3),
        verification=verification.to_dict() if verification else {},
    )
    _exports.put(key, (data, summary))
    log.info("exported %s (%d nodes, %s) in %.1f s", path, summary.num_nodes, precision, summary.total_seconds)
    return summary
