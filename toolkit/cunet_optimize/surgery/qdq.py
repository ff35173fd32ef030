"""Q/DQ hygiene passes for TensorRT-style (symmetric INT8, explicit Q/DQ) graphs.

- `tie_concat_qdq_scales`: one scale across each Concat's inputs and output, and
  across MaxPool and nearest Resize, so TensorRT can elide the Concat and keep pooling
  in INT8 (DLA requires it). Tensors are grouped with a union-find over Concat
  inputs+output, pooling input+output and each Q -> DQ pair; every per-tensor Q/DQ
  touching a group gets the group's largest scale (no member is clipped; the others
  lose resolution: this changes the outputs on purpose, and QAT is what absorbs it).
- `remove_redundant_qdq`: Q(s) -> DQ(s) -> Q(s) -> DQ(s) collapses to one pair
  (exact: re-quantizing a dequantized value with the same scale and zero point gives
  the same integers).
- `check_zero_points`, `check_weight_axes`: raise CUNetError (one line, node named) on
  what TensorRT rejects; the detection is the lint's (lint.py), in one place.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from cunet_optimize.onnx_tools.graph import finish, producer, replace_all_uses
from cunet_optimize.onnx_tools.patterns import make_constant, qdq_params
from cunet_optimize.surgery.lint import lint_model, raise_on_errors
from cunet_optimize.surgery.report import PassRecorder, PassReport

SCALE_COMMUTING_OPS = ("Concat", "MaxPool", "Resize")


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller name wins: groups get the same representative in every run
            self.parent[max(ra, rb)] = min(ra, rb)


def _per_tensor(node: gs.Node) -> bool:
    p = qdq_params(node)
    return p.scale is not None and p.scale.size == 1 and isinstance(node.inputs[1], gs.Constant)


def tie_concat_qdq_scales(graph: gs.Graph) -> PassReport:
    """Give every per-tensor Q/DQ around each Concat / MaxPool / nearest Resize group one
    scale (the group's largest). Not output-preserving by design (see module doc)."""
    rec = PassRecorder("tie_concat_qdq_scales", graph)
    uf = _UnionFind()
    for node in graph.nodes:
        if node.op not in SCALE_COMMUTING_OPS:
            continue
        if node.op == "Resize" and node.attrs.get("mode", "nearest") not in ("nearest", b"nearest"):
            continue
        data = [t for t in (node.inputs if node.op == "Concat" else node.inputs[:1]) if not isinstance(t, gs.Constant)]
        for t in data:
            uf.union(t.name, node.outputs[0].name)
    for node in graph.nodes:
        if node.op == "QuantizeLinear" and _per_tensor(node):
            for dq in node.outputs[0].outputs:
                if dq.op == "DequantizeLinear":
                    uf.union(node.inputs[0].name, dq.outputs[0].name)

    # Q/DQ nodes attached to each group: Q reading a member, DQ producing a member,
    # plus each Q's DQ partners (they must keep the Q's scale).
    members: dict[str, list[gs.Node]] = defaultdict(list)
    grouped = {name for name in uf.parent}
    for node in graph.nodes:
        if node.op not in ("QuantizeLinear", "DequantizeLinear") or not _per_tensor(node):
            continue
        tensor = node.inputs[0] if node.op == "QuantizeLinear" else node.outputs[0]
        if tensor.name in grouped:
            members[uf.find(tensor.name)].append(node)

    ratios = []
    for root, nodes in sorted(members.items()):
        scales = sorted({float(qdq_params(n).scale.reshape(-1)[0]) for n in nodes})
        zps = {float(np.asarray(qdq_params(n).zero_point if qdq_params(n).zero_point is not None else 0).reshape(-1)[0]) for n in nodes}
        if len(scales) < 2:
            continue
        if zps != {0.0}:
            rec.note(f"group of {root}: not tied, non-zero zero points")
            continue
        dtype = qdq_params(nodes[0]).scale.dtype
        tied = make_constant(f"{root}/tied_scale", np.asarray(max(scales), dtype=dtype))
        for node in nodes:
            node.inputs[1] = tied
        ratios.append(max(scales) / min(scales) if min(scales) > 0 else float("inf"))
        rec.rewrites += 1
    finish(graph)
    if ratios:
        rec.note(f"tied {len(ratios)} group(s) to their largest scale; largest/smallest scale ratio up to {max(ratios):.3g}")
    rec.note("changes outputs on purpose: a tied scale loses resolution on the smaller-range members")
    return rec.finish(graph)


def _same_quantization(a: gs.Node, b: gs.Node) -> bool:
    pa, pb = qdq_params(a), qdq_params(b)
    if pa.scale is None or pb.scale is None or pa.scale.shape != pb.scale.shape or not np.array_equal(pa.scale, pb.scale):
        return False
    za = pa.zero_point if pa.zero_point is not None else np.zeros_like(pa.scale, dtype=np.uint8)
    zb = pb.zero_point if pb.zero_point is not None else np.zeros_like(pb.scale, dtype=np.uint8)
    same_axis = pa.scale.size == 1 or pa.axis == pb.axis
    return same_axis and pa.block_size == pb.block_size and za.dtype == zb.dtype and np.array_equal(za, zb)


def remove_redundant_qdq(graph: gs.Graph) -> PassReport:
    """Collapse Q -> DQ -> Q -> DQ with equal scale and zero point into Q -> DQ (exact)."""
    rec = PassRecorder("remove_redundant_qdq", graph)
    touched: list[gs.Tensor] = []
    for q2 in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        dq1 = producer(q2.inputs[0])
        if dq1 is None or dq1.op != "DequantizeLinear" or not _same_quantization(dq1, q2):
            continue
        # Q(DQ(x)) == x: readers of q2's integers read dq1's input instead.
        replace_all_uses(graph, q2.outputs[0], dq1.inputs[0])
        touched.append(dq1.inputs[0])
        rec.rewrites += 1
    # The second DQ now duplicates the first one: merge DQs of the same integers.
    merged = 0
    for ints in touched:
        dqs = [n for n in ints.outputs if n.op == "DequantizeLinear"]
        for dup in dqs[1:]:
            if _same_quantization(dqs[0], dup) and not any(t is dup.outputs[0] for t in graph.outputs):
                replace_all_uses(graph, dup.outputs[0], dqs[0].outputs[0])
                merged += 1
    finish(graph)
    if merged:
        rec.note(f"merged {merged} duplicate DequantizeLinear node(s)")
    return rec.finish(graph)


def check_zero_points(graph: gs.Graph) -> PassReport:
    """Raise CUNetError unless every Q/DQ zero point is explicit (Q) and exactly 0."""
    rec = PassRecorder("check_zero_points", graph)
    findings = lint_model(graph, "h100", rules=["qdq-zero-point", "qdq-int8-type"])
    raise_on_errors(findings, "check_zero_points")
    rec.note(f"{sum(1 for n in graph.nodes if n.op in ('QuantizeLinear', 'DequantizeLinear'))} Q/DQ node(s) symmetric")
    return rec.finish(graph)


def check_weight_axes(graph: gs.Graph) -> PassReport:
    """Raise CUNetError unless Conv weights are per-tensor or per-channel on axis 0 and
    activations per-tensor."""
    rec = PassRecorder("check_weight_axes", graph)
    findings = lint_model(graph, "h100", rules=["qdq-weight-axis", "qdq-activation-per-tensor"])
    raise_on_errors(findings, "check_weight_axes")
    return rec.finish(graph)
