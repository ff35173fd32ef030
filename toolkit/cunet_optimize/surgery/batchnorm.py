"""BatchNormalization folding and the general clean-up pass.

Exact folds (inference-mode BN is an affine map per channel, a = gamma/sqrt(var+eps),
t = beta - mean*a):
- Conv -> BN, the Conv's output read by nothing else: W' = W*a (per output channel),
  b' = b*a + t. The TorchScript exporter already does this for eval-mode models, so
  on our exports it mostly finds nothing; it matters for graphs from elsewhere.
- BN -> Conv without padding, the BN's output read only by that Conv: W' = W*a (per
  input channel), b' = b + sum over (i, kh, kw) of W*t. With zero padding this would not
  be exact at the borders (the padded zeros are not normalised), so padded convs are
  left alone.
Not foldable: BN -> ReLU -> Conv, CU-Net's dominant pattern (the ReLU between does not
commute with the affine map). Those stay BatchNormalization nodes (TensorRT turns them
into a scale layer fused with the ReLU; ONNX Runtime runs them as is).
Weights behind Q/DQ are never folded: changing them would change the quantized values
(TensorRT's rule: do not simulate BN folding in a Q/DQ graph, it fuses Conv+BN+ReLU itself).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from cunet_optimize.onnx_tools.graph import clean_graph, constant_values, finish, only_consumer, producer
from cunet_optimize.onnx_tools.patterns import make_constant
from cunet_optimize.surgery.report import PassRecorder, PassReport


def _bn_affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    params = [constant_values(t) for t in bn.inputs[1:5]]
    if any(p is None for p in params) or int(bn.attrs.get("training_mode", 0)) or len(bn.outputs) != 1:
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    a = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return a, beta - mean * a


def _float_conv_params(conv: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    if conv.op != "Conv" or not isinstance(conv.inputs[1], gs.Constant):
        return None
    w = constant_values(conv.inputs[1])
    if w.dtype not in (np.float32, np.float64):
        return None
    bias = None
    if len(conv.inputs) > 2 and not conv.inputs[2].is_empty():
        bias = constant_values(conv.inputs[2])
        if bias is None:
            return None
    return w, bias


def _set_conv_params(conv: gs.Node, w: np.ndarray, bias: np.ndarray, dtype) -> None:
    base = conv.name or conv.outputs[0].name
    new_inputs = [conv.inputs[0], make_constant(f"{base}/W_bn_folded", w.astype(dtype)),
                  make_constant(f"{base}/B_bn_folded", bias.astype(dtype))]
    conv.inputs = new_inputs


def fold_batchnorm(graph: gs.Graph) -> PassReport:
    """Fold BatchNormalization into an adjacent float Conv where that is exact (see module doc)."""
    rec = PassRecorder("fold_batchnorm", graph)
    kept_relu = kept_other = 0
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        affine = _bn_affine(bn)
        if affine is None:
            kept_other += 1
            continue
        a, t = affine
        src = producer(bn.inputs[0])
        # Conv -> BN
        if src is not None and only_consumer(bn.inputs[0], graph) is bn:
            conv_params = _float_conv_params(src)
            if conv_params is not None:
                w, bias = conv_params
                shape = (-1,) + (1,) * (w.ndim - 1)
                new_bias = (bias.astype(np.float64) if bias is not None else 0.0) * a + t
                _set_conv_params(src, w.astype(np.float64) * a.reshape(shape), new_bias, w.dtype)
                out = bn.outputs[0]
                bn.inputs.clear()
                bn.outputs.clear()
                src.outputs = [out]
                rec.rewrites += 1
                continue
        # BN -> Conv (no padding, group 1)
        dst = only_consumer(bn.outputs[0], graph)
        if dst is not None and dst.op == "Conv" and dst.inputs[0] is bn.outputs[0]:
            conv_params = _float_conv_params(dst)
            pads = dst.attrs.get("pads", [0])
            padded = any(int(p) for p in pads) or dst.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", b"NOTSET", b"VALID")
            if conv_params is not None and not padded and int(dst.attrs.get("group", 1)) == 1:
                w, bias = conv_params
                w64 = w.astype(np.float64)
                shape = (1, -1) + (1,) * (w.ndim - 2)
                shift = (w64 * t.reshape(shape)).sum(axis=tuple(range(1, w.ndim)))
                new_bias = (bias.astype(np.float64) if bias is not None else 0.0) + shift
                _set_conv_params(dst, w64 * a.reshape(shape), new_bias, w.dtype)
                x = bn.inputs[0]
                bn.inputs.clear()
                dst.inputs[0] = x
                bn.outputs.clear()
                rec.rewrites += 1
                continue
        relu = only_consumer(bn.outputs[0], graph)
        if relu is not None and relu.op == "Relu":
            kept_relu += 1
        else:
            kept_other += 1
    finish(graph)
    if kept_relu:
        rec.note(f"kept {kept_relu} BN -> ReLU chain(s): not foldable exactly (ReLU between BN and Conv)")
    if kept_other:
        rec.note(f"kept {kept_other} other BatchNormalization node(s) (shared input, padded/quantized/grouped conv, or none adjacent)")
    return rec.finish(graph)


def batchnorm_record(model, reports, backend: str) -> dict:
    """build.json's account of BatchNorm in the deployed graph `model` (an onnx.ModelProto):
    how many BatchNormalization nodes it holds (`kept`), each counted by what it reads and
    what reads it (`patterns`, e.g. "Concat -> BN -> Relu": CU-Net's pre-activation dense
    layers), and the notes of the passes that left them (`why_kept`)."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    patterns: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            read = "+".join(readers.get(node.output[0], [])) or "output"
            key = f"{producers.get(node.input[0], 'input')} -> BN -> {read}"
            patterns[key] = patterns.get(key, 0) + 1
    kept = sum(patterns.values())
    integer = any(r.name == "integer_dataflow" for r in reports)  # it takes over what fold_batchnorm kept
    why = [note for r in reports for note in r.notes
           if r.name == "fold_batchnorm" and not integer and note.startswith("kept")
           or r.name == "integer_dataflow" and note.startswith("left in float")]
    if kept and backend == "tensorrt":
        # No pass folds a BN -> ReLU chain for TensorRT (integer_dataflow is ONNX Runtime's), and
        # weight-only INT4 is no reason: dequantize_weights runs before fold_batchnorm.
        why.append("TensorRT: the bundle's ONNX hands these to TensorRT as BatchNormalization nodes (whether "
                   "it fuses them is not checked here)")
    return {"kept": kept, "patterns": dict(sorted(patterns.items())), "why_kept": why if kept else []}


def cleanup(graph: gs.Graph) -> PassReport:
    """Constant folding (never through Q/DQ), Identity removal, dead nodes, depth-first order."""
    rec = PassRecorder("cleanup", graph)
    nodes = len(graph.nodes)
    identities = sum(1 for n in graph.nodes if n.op == "Identity")
    clean_graph(graph)
    rec.rewrites = nodes - len(graph.nodes)
    if identities:
        rec.note(f"removed {identities} Identity node(s)")
    return rec.finish(graph)
