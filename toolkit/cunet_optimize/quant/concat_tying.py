"""Which CU-Net tensors must share one INT8 scale so TensorRT can elide Concat and pooling.

TensorRT writes the inputs of a Concat straight into its output buffer only when
every input and the output have one scale, and runs MaxPool / nearest Resize in
INT8 only with equal input and output scales. In CU-Net one feature tensor enters
several dense concatenations (a dense layer's, its adapters', the next U-Nets'), so
the tensors that must agree form connected components: union-find over tensors,
joining the inputs of each concatenation and the two ends of each pass-through op.
(NVIDIA ModelOpt's ONNX PTQ does the same on the ONNX graph.)

`trace_dataflow` runs the float model once on a tiny input and records who consumes
what; `plan_concat_tying` is the pure decision on top of that record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cunet_optimize.errors import CUNetError
from cunet_optimize.models.cunet import Adapter, CUNet, DenseLayer

log = logging.getLogger(__name__)

# The smallest input a CU-Net accepts: stem /4, four 2x2 pools /16, so the neck is 1x1.
TRACE_INPUT_SIZE = 64

# Ops that commute with a per-tensor quantizer: same values out as in, only moved.
_POOLING = ("max_pool2d", "_max_pool2d", "max_pool2d_with_indices")
_RESIZE = ("interpolate",)


@dataclass
class DataflowTrace:
    """What one forward pass did, with tensors identified by id() (all kept alive)."""

    concat_calls: list[tuple[str, list[int]]] = field(default_factory=list)  # (site, input ids)
    passthroughs: list[tuple[int, int]] = field(default_factory=list)  # (input id, output id)
    slots: list[tuple[str, int]] = field(default_factory=list)  # (slot quantizer name, tensor id)
    called_convs: list[str] = field(default_factory=list)  # conv modules in first-call order


@dataclass(frozen=True)
class ConcatPlan:
    """Where concat quantizers go and which of them share one scale.

    sites: dense-concatenation modules (DenseLayer / Adapter names) -> number of inputs.
    groups: with tying, each list holds the sites and pass-through slots whose
        quantizers share one scale; without tying, empty.
    slots: pass-through slots to quantize (tied only): quantizer names such as
        "hg.down_blocks.0.adapters_ahead.1.output" or "features.pool0.input".
    """

    sites: dict[str, int]
    groups: list[list[str]]
    slots: list[str]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


class _PassThroughRecorder(TorchFunctionMode):
    def __init__(self, trace: DataflowTrace, keep: list):
        super().__init__()
        self.trace = trace
        self.keep = keep

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        is_pool = name in _POOLING
        is_nearest = name in _RESIZE and kwargs.get("mode", args[3] if len(args) > 3 else "nearest") == "nearest"
        if (is_pool or is_nearest) and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            self.trace.passthroughs.append((id(args[0]), id(out)))
            self.keep.extend([args[0], out])
        return out


def trace_dataflow(model: CUNet, input_size: int = TRACE_INPUT_SIZE) -> DataflowTrace:
    """Run `model` once (eval mode, no grad, zeros of 1x3xSxS) and record its dataflow.

    Recorded: every DenseLayer/Adapter call with its input tensors (the dense
    concatenations), every MaxPool / nearest-Upsample (in -> out), every Adapter
    output and MaxPool2d-module input (places a pass-through quantizer can sit), and
    which convs run (heads that no loss uses do not).
    """
    trace = DataflowTrace()
    keep: list = []  # ids stay unique only while their tensors live
    handles = []
    seen_convs: set[str] = set()

    def on_site(name):
        def hook(module, args):
            inputs = args[0]
            if isinstance(inputs, (list, tuple)):
                trace.concat_calls.append((name, [id(t) for t in inputs]))
                keep.extend(inputs)

        return hook

    def on_adapter_output(name):
        def hook(module, args, out):
            trace.slots.append((f"{name}.output", id(out)))
            keep.append(out)

        return hook

    def on_pool_input(name):
        def hook(module, args):
            trace.slots.append((f"{name}.input", id(args[0])))
            keep.append(args[0])

        return hook

    def on_conv(name):
        def hook(module, args):
            if name not in seen_convs:
                seen_convs.add(name)
                trace.called_convs.append(name)

        return hook

    for name, m in model.named_modules():
        if isinstance(m, (DenseLayer, Adapter)):
            handles.append(m.register_forward_pre_hook(on_site(name)))
        if isinstance(m, Adapter):
            handles.append(m.register_forward_hook(on_adapter_output(name)))
        if isinstance(m, nn.MaxPool2d):
            handles.append(m.register_forward_pre_hook(on_pool_input(name)))
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_pre_hook(on_conv(name)))
    was_training = model.training
    param = next(model.parameters())
    x = torch.zeros(1, 3, input_size, input_size, dtype=param.dtype, device=param.device)
    try:
        model.eval()
        with torch.no_grad(), _PassThroughRecorder(trace, keep):
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return trace


def plan_concat_tying(trace: DataflowTrace, tie: bool) -> ConcatPlan:
    """Concat sites (calls with >= 2 inputs) and, if `tie`, their scale-sharing groups.

    Rule: two tensors share a scale when they enter the same concatenation, when one
    is a pass-through (MaxPool, nearest Upsample) of the other, or when one quantizer
    sees both (a module reused by iterative refinement). A slot (adapter output,
    stem pool input) is quantized when its tensor enters a pass-through whose
    component reaches a concatenation.
    """
    sites: dict[str, int] = {}
    for site, ids in trace.concat_calls:
        if len(ids) < 2:
            continue
        if sites.setdefault(site, len(ids)) != len(ids):
            raise CUNetError(
                f"{site}: concatenates {sites[site]} tensors in one call and {len(ids)} in another; "
                "one concat quantizer cannot serve both"
            )
    for site, ids in trace.concat_calls:
        if site not in sites and len(ids) != 1:
            raise CUNetError(f"{site}: called with no input tensors")
        if site in sites and len(ids) == 1:
            raise CUNetError(f"{site}: called with 1 and with {sites[site]} input tensors")
    if not tie:
        return ConcatPlan(sites=sites, groups=[], slots=[])

    uf = _UnionFind()
    for site, ids in trace.concat_calls:
        if site in sites:
            for i in ids:
                uf.union(("site", site), ("tensor", i))
    for src, dst in trace.passthroughs:
        uf.union(("tensor", src), ("tensor", dst))

    passthrough_inputs = {src for src, _ in trace.passthroughs}
    roots_with_sites = {uf.find(("site", s)) for s in sites}
    slot_tensors: dict[str, list[int]] = {}
    for slot, tid in trace.slots:
        slot_tensors.setdefault(slot, []).append(tid)
    slots = [
        slot
        for slot, tids in slot_tensors.items()
        if any(t in passthrough_inputs and uf.find(("tensor", t)) in roots_with_sites for t in tids)
    ]
    slot_inputs = {t for tids in slot_tensors.values() for t in tids}
    for src, dst in trace.passthroughs:
        if src not in slot_inputs and uf.find(("tensor", dst)) in roots_with_sites:
            log.warning("a pooling/upsampling input feeding a concatenation has no quantizer slot; "
                        "TensorRT will requantize there")
    for slot in slots:  # one quantizer: every tensor it sees shares its scale
        for t in slot_tensors[slot]:
            uf.union(("slot", slot), ("tensor", t))
    members: dict = {}
    for node in [("site", s) for s in sites] + [("slot", s) for s in slots]:
        members.setdefault(uf.find(node), []).append(node[1])  # first-call order: deterministic
    return ConcatPlan(sites=sites, groups=list(members.values()), slots=slots)
