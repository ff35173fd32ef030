"""`build --precision auto`: per-layer mixed precision that meets an accuracy budget.

Three steps, each a plain function:

1. Sensitivity (`measure_sensitivity`): on the first images (DEFAULT_SENSITIVITY_IMAGES)
   of a held-out slice of the calibration split (images the scales never saw), the
   calibrated all-INT8 fake-quant model's metric, and for each group of convs the change
   when only that group moves to each other format the target executes or stores (INT4
   weights: lower; float: higher). Batched, under torch.inference_mode, each variant
   replaying what runs before its first change (`PrefixCache`).
2. Search (`search_plan`, pure): a multiple-choice knapsack solved greedily. Start
   with every group at its cheapest format; while the predicted degradation exceeds
   the budget, take the upgrade with the best (predicted gain / cost increase); then
   walk back down any group whose cheaper format still fits. The prediction is
   additive: (INT8 - FP32) + sum of each group's single-group change.
   The additive prediction is only a guide (on the embedded model, from 16 images, it put
   the chosen plan at +2.9 points; the plan measured +0.07 on all 64): `search_measured`
   then runs whole plans along the knapsack's order on the whole held-out slice
   (bisection: ~log2(groups) runs) and keeps the cheapest one measured within the budget.
3. Back-off (`back_off`, pure): when the real engine fails the gate, raise the group
   whose current format costs the most predicted accuracy one step, and rebuild.

Formats per target (`target_formats`): "int8" where the target executes INT8, "int4"
everywhere (a storage format: targets.py), "float" (FP32 on the CPU, FP16 on
NVIDIA targets). Binary / ternary weights are executed and stored by no target, so
the search never offers them. The stem and the last head never take INT4 (the int4
scheme's edge rule: tiny, and closest to the input and output).

Costs (`layer_cost`): deployed weight bytes (integers + their float32 scales; float
weights in the target's float type; on the CPU's integer path, the depthwise BatchNorm an
INT4 inner 1x1 conv keeps before it: `INT4_SINK_BYTES_PER_CHANNEL`), or an estimated
latency: multiply-accumulates times a relative cost per MAC of the arithmetic the engine
runs (`MAC_COST`; INT4 weights run as the target's float type plus a dequantization). The latency model is
relative and coarse: it ranks plans, it does not predict milliseconds.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from cunet_optimize.errors import CUNetError
from cunet_optimize.quant.scheme import DEFAULT_INT4_BLOCK

OBJECTIVES = ("size", "latency")
# Accuracy order, least accurate first (the search raises a group along it).
ACCURACY_ORDER = ("int4", "int8", "float")
# Relative cost of one multiply-accumulate by the arithmetic the engine performs.
MAC_COST = {"int8": 1.0, "fp16": 2.0, "bf16": 2.0, "fp32": 4.0}
INT4_DEQUANT_OVERHEAD = 1.1  # block INT4 weights are dequantized to float before the conv
EDGE_ROLES = ("stem", "last_head")
# On the CPU's integer path an inner 1x1 conv reads a dense concatenation through its own
# BatchNorm -> ReLU, which no earlier conv can absorb (the concatenation has other readers).
# Before an INT8 conv the clamp form folds it into the weights (integer_dataflow relu_form
# "clamp": the smaller graph, and the deployed one wherever the build times it faster and it
# passes the gate, as on VNNI CPUs); an INT4 conv's weights would leave the INT4 grid, so it
# keeps the BatchNorm as a depthwise conv: per input channel an int8 weight, a float32 scale
# and a float32 bias. Left out of the size cost, INT4 looked to save 2.5x what it does on these
# convs (embedded model: ~1,325 B a conv against ~525 B in the file). Where the build takes
# the exact "depthwise" form instead, INT8 convs keep the same BatchNorm and this overstates
# INT4's cost: the plan is searched before the form is timed.
INT4_SINK_BYTES_PER_CHANNEL = 1 + 4 + 4
DEFAULT_HELDOUT_IMAGES = 64
CONV_GRAIN_LIMIT = 96  # above this many convs the default grain is the U-Net block


# Held-out images the single-group changes are measured on; the joint runs of whole plans,
# which decide what fits the budget, use all of them. Measured on the embedded model (conv
# grain, budget 0.1, quiet 2-core EPYC; bench/results/auto_search_embedded_sens16_quiet.json,
# auto_search_embedded_sens32_quiet.json, auto_search_embedded_quiet.json): sensitivity on
# 16 / 32 / 64 images made the search 1.74x / 2.87x / 4.09x an INT8 build,
# for plans of 0.701x / 0.651x / 0.666x INT8's weight bytes, all within the budget: the joint
# runs, not the single-group noise, set the plan's accuracy.
DEFAULT_SENSITIVITY_IMAGES = 16


# --------------------------------------------------------------------------------------
# Layers, groups, costs (pure)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    group: str
    role: str  # qmodel.conv_roles, "conv1x1" for the inner 1x1 convs
    weight_shape: tuple[int, ...]
    macs: int  # multiply-accumulates per image at the model's input size
    out_numel: int = 0  # output elements per image (the sensitivity's prefix cache)

    @property
    def params(self) -> int:
        return math.prod(self.weight_shape)


def target_formats(target) -> tuple[str, ...]:
    """Formats a target executes or stores, least accurate first."""
    formats = ["int4"]  # stored everywhere (targets.py: never executed)
    if "int8" in target.precisions:
        formats.append("int8")
    formats.append("float")
    return tuple(formats)


def float_type(target, bf16_here: bool = False) -> str:
    """What a plan's float convs run as: FP16 on NVIDIA targets; bf16 on the CPU where this
    machine runs it (`bf16_here`: AVX-512 BF16 or AMX, and OpenVINO: pipeline/build.py
    plan_float_type), else FP32."""
    if "fp16" in target.precisions:
        return "fp16"
    return "bf16" if bf16_here and "bf16" in target.precisions else "fp32"


def allowed_formats(layer: LayerInfo, formats: Sequence[str]) -> tuple[str, ...]:
    return tuple(f for f in formats if not (f == "int4" and layer.role in EDGE_ROLES))


def layer_cost(layer: LayerInfo, fmt: str, objective: str, float_dtype: str = "fp32",
               int4_block: int | None = DEFAULT_INT4_BLOCK) -> float:
    """Weight bytes (objective "size") or relative latency units ("latency") of one conv.
    `int4_block` None: INT4 per output channel, which the CPU's integer path runs as INT8
    (quant.policy.int4_block_for), so it costs INT8's latency, and an inner 1x1 conv's bytes
    include the BatchNorm it keeps (INT4_SINK_BYTES_PER_CHANNEL)."""
    out_ch, in_ch, *kernel = layer.weight_shape
    kernel_size = math.prod(kernel)
    if objective == "size":
        if fmt == "int8":
            return layer.params + 4 * out_ch  # INT8 + one float32 scale per output channel
        if fmt == "int4":
            blocks = out_ch * math.ceil(in_ch / int4_block) * kernel_size if int4_block else out_ch
            sink = in_ch * INT4_SINK_BYTES_PER_CHANNEL if int4_block is None and layer.role == "conv1x1" else 0
            return math.ceil(layer.params / 2) + 4 * blocks + sink
        # bf16 weights stay float32 in the ONNX (OpenVINO converts them at compile time)
        return layer.params * (2 if float_dtype == "fp16" else 4)
    if objective == "latency":
        if fmt == "int8":
            return layer.macs * MAC_COST["int8"]
        if fmt == "int4":
            return layer.macs * (MAC_COST["int8"] if int4_block is None else
                                 MAC_COST[float_dtype] * INT4_DEQUANT_OVERHEAD)
        return layer.macs * MAC_COST[float_dtype]
    raise CUNetError(f"--objective {objective}: choose one of {', '.join(OBJECTIVES)}")


def group_costs(layers: Sequence[LayerInfo], formats: Sequence[str], objective: str,
                float_dtype: str = "fp32", int4_block: int | None = DEFAULT_INT4_BLOCK) -> dict[str, dict[str, float]]:
    """{group: {format: cost}} over the formats every layer of the group allows."""
    out: dict[str, dict[str, float]] = {}
    for layer in layers:
        costs = out.setdefault(layer.group, {f: 0.0 for f in formats})
        ok = allowed_formats(layer, formats)
        for f in list(costs):
            if f in ok:
                costs[f] += layer_cost(layer, f, objective, float_dtype, int4_block)
            else:
                del costs[f]
    return out


def plan_cost(costs: Mapping[str, Mapping[str, float]], plan: Mapping[str, str]) -> float:
    return float(sum(costs[g][f] for g, f in plan.items()))


def layer_plan(layers: Sequence[LayerInfo], group_plan: Mapping[str, str]) -> dict[str, str]:
    """{conv name: format} from {group: format}."""
    return {layer.name: group_plan[layer.group] for layer in layers}


def group_of(conv: str, grain: str) -> str:
    """A conv's group: itself ("conv"), or its U-Net block ("block"): the same module path
    with the U-Net index kept and the layer inside the block dropped, e.g.
    hg.down_blocks.2.layers.1.conv2 -> unet1/hg.down_blocks.2."""
    if grain == "conv":
        return conv
    if grain != "block":
        raise CUNetError(f"grain '{grain}': use conv or block")
    parts = conv.split(".")
    if parts[0] == "hg" and len(parts) >= 5:  # hg.<blocks>.<i>.<layers|adapters_*>.<unet>...
        return f"unet{parts[4]}/hg.{parts[1]}.{parts[2]}" if parts[1] != "neck_block" else f"unet{parts[3]}/hg.neck"
    if parts[0] == "hg" and parts[1] == "neck_block":
        return f"unet{parts[3]}/hg.neck"
    if parts[0] == "linears":
        return f"head{parts[1]}"
    if parts[0] == "intermedia":
        return f"intermedia{parts[2]}"
    return conv  # the stem


# --------------------------------------------------------------------------------------
# Prediction and search (pure)


@dataclass
class SensitivityTable:
    """Held-out metric of FP32 and all-INT8, and each group's change per format.

    `delta[group][format]`: degradation (metric points, positive = worse) when only
    that group takes `format` and the rest stays INT8; 0 for "int8"."""

    metric: str
    images: int
    fp32: float
    int8: float
    int8_degradation: float  # all-INT8 vs FP32, metric points (positive = worse)
    delta: dict[str, dict[str, float]]
    grain: str = "conv"
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def expected_delta(table: SensitivityTable, group: str, fmt: str) -> float:
    """A group's change at `fmt`, never better than INT8 for a lower format nor worse for a
    higher one: on a held-out slice of 64 images, "INT4 made it more accurate" is noise, and
    an additive sum would spend that noise on other groups (before this clamp a block-grain
    plan predicted at +0.095 NME points built at +0.136: bench/results/auto_precision_embedded.json,
    `auto_block_grain_before_noise_clamp`)."""
    d = table.delta[group].get(fmt, 0.0)
    if fmt in ACCURACY_ORDER and _rank(fmt) < _rank("int8"):
        return max(d, 0.0)
    if fmt in ACCURACY_ORDER and _rank(fmt) > _rank("int8"):
        return min(d, 0.0)
    return d


def predict_degradation(table: SensitivityTable, plan: Mapping[str, str]) -> float:
    """Additive prediction of a plan's degradation vs FP32 from single-group changes."""
    return table.int8_degradation + sum(expected_delta(table, g, f) for g, f in plan.items())


@dataclass
class SearchResult:
    plan: dict[str, str]  # group -> format
    predicted: float  # predicted degradation vs FP32 (metric points)
    cost: float
    feasible: bool  # False: even the most accurate plan is predicted over the budget
    visited: list[dict] = field(default_factory=list)  # {"cost", "predicted", "step"}


def _rank(fmt: str) -> int:
    return ACCURACY_ORDER.index(fmt)


def search_plan(table: SensitivityTable, costs: Mapping[str, Mapping[str, float]], budget: float,
                predict: Callable[[SensitivityTable, Mapping[str, str]], float] = predict_degradation
                ) -> SearchResult:
    """Cheapest plan whose predicted degradation is <= budget (greedy multiple-choice knapsack)."""
    groups = sorted(costs)
    plan = {g: min(costs[g], key=lambda f: (costs[g][f], -_rank(f))) for g in groups}
    visited = []

    def visit(step: str) -> float:
        p = predict(table, plan)
        visited.append({"step": step, "cost": plan_cost(costs, plan), "predicted": p})
        return p

    predicted = visit("cheapest")
    while predicted > budget:
        best = None
        for g in groups:
            current = expected_delta(table, g, plan[g])
            for f in costs[g]:
                gain = current - expected_delta(table, g, f)
                extra = costs[g][f] - costs[g][plan[g]]
                if gain <= 0 or (extra < 0 and gain <= 0):
                    continue
                ratio = gain / extra if extra > 0 else math.inf
                key = (ratio, gain)
                if best is None or key > best[0]:
                    best = (key, g, f)
        if best is None:
            break
        _, g, f = best
        plan[g] = f
        predicted = visit(f"raise {g} to {f}")
    # Walk back down: a group whose cheaper format still fits the budget (largest saving first).
    improved = predicted <= budget
    while improved:
        improved = False
        moves = []
        for g in groups:
            for f in costs[g]:
                saving = costs[g][plan[g]] - costs[g][f]
                if saving <= 0:
                    continue
                moves.append((saving, g, f))
        for saving, g, f in sorted(moves, key=lambda m: -m[0]):
            old = plan[g]
            plan[g] = f
            p = predict(table, plan)
            if p <= budget:
                predicted = visit(f"lower {g} to {f}")
                improved = True
                break
            plan[g] = old
    return SearchResult(dict(plan), predicted, plan_cost(costs, plan), predicted <= budget, visited)


def back_off(table: SensitivityTable, costs: Mapping[str, Mapping[str, float]], plan: Mapping[str, str]
             ) -> tuple[dict[str, str], str] | None:
    """Raise the group whose current format costs the most predicted accuracy by one step
    (toward float); None when every group is already at its most accurate format."""
    best = None
    for g, f in plan.items():
        higher = sorted((h for h in costs[g] if _rank(h) > _rank(f)), key=_rank)
        if not higher:
            continue
        gain = expected_delta(table, g, f) - expected_delta(table, g, higher[0])
        key = (gain, -costs[g][higher[0]] + costs[g][f])
        if best is None or key > best[0]:
            best = (key, g, higher[0])
    if best is None:
        return None
    _, g, f = best
    new = dict(plan)
    new[g] = f
    return new, f"raise {g} from {plan[g]} to {f}"


# --------------------------------------------------------------------------------------
# Measurement on the fake-quant model


def layer_infos(qmodel: nn.Module, grain: str, input_size: tuple[int, int]) -> list[LayerInfo]:
    """Every quantized conv of `qmodel`, its group and MACs (one traced forward at batch 1)."""
    from cunet_optimize.quant.qmodel import QuantConv2d, conv_roles

    roles = conv_roles(qmodel)
    macs: dict[str, int] = {}
    outs: dict[str, int] = {}
    hooks = []
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantConv2d):
            def hook(mod, inp, out, name=name):
                macs[name] = int(out[0].numel() * mod.weight[0].numel())
                outs[name] = int(out[0].numel())
            hooks.append(m.register_forward_hook(hook))
    from cunet_optimize.quant.qmodel import set_quantizers_enabled

    was_training = qmodel.training
    qmodel.eval()
    try:
        set_quantizers_enabled(qmodel, False)
        with torch.inference_mode():
            qmodel(torch.zeros(1, 3, *input_size))
    finally:
        set_quantizers_enabled(qmodel, True)
        for h in hooks:
            h.remove()
        qmodel.train(was_training)
    modules = dict(qmodel.named_modules())
    # in execution order (hooks fire as each conv finishes; convs do not nest)
    return [LayerInfo(n, group_of(n, grain), roles.get(n, "conv1x1"), tuple(modules[n].weight.shape), macs[n],
                      outs[n]) for n in macs]


@dataclass
class HeldOut:
    """A held-out slice of a data set, loaded once: images and what scoring needs."""

    images: torch.Tensor
    transforms: list
    landmarks: np.ndarray
    visible: np.ndarray | None
    head_size: np.ndarray | None
    task: object

    @classmethod
    def load(cls, dataset, indices: Sequence[int]) -> "HeldOut":
        from cunet_optimize.tasks import POSE, task_of_dataset

        task = task_of_dataset(dataset)
        items = [dataset[i] for i in indices]
        images = torch.stack([torch.as_tensor(np.asarray(it["image"], dtype=np.float32)) for it in items])
        return cls(
            images.contiguous(memory_format=torch.channels_last),  # the layout of `measurement_layout`
            [np.asarray(it["transform"], dtype=np.float64) for it in items],
            np.stack([np.asarray(it["landmarks"], dtype=np.float64) for it in items]),
            np.stack([np.asarray(it["visible"], dtype=bool) for it in items]) if task is POSE else None,
            np.asarray([float(it["head_size"]) for it in items]) if task is POSE else None,
            task,
        )

    def __len__(self) -> int:
        return len(self.images)

    def first(self, k: int) -> "HeldOut":
        """The first k images (the sensitivity's subset when it measures on fewer)."""
        return HeldOut(self.images[:k], self.transforms[:k], self.landmarks[:k],
                       None if self.visible is None else self.visible[:k],
                       None if self.head_size is None else self.head_size[:k], self.task)

    def degradation(self, model: nn.Module, reference: float, batch_size: int = 32) -> tuple[float, float]:
        """(metric, degradation vs `reference`) of `model` on the slice."""
        value = self.metric(model, batch_size)
        return value, self.task.degradation(value, reference)

    def metric(self, model: nn.Module, batch_size: int = 32, run=None) -> float:
        """The task's headline metric of `model` on the slice; `run(batch index, images)` may
        replace `model(images)` (the prefix cache of `measure_sensitivity`)."""
        from cunet_optimize.data.transforms import decode_heatmaps, heatmap_to_image_coords
        from cunet_optimize.tasks import score

        model.eval()
        heatmaps = []
        with torch.inference_mode():
            for b, start in enumerate(range(0, len(self.images), batch_size)):
                images = self.images[start:start + batch_size]
                out = run(b, images) if run is not None else model(images)
                heatmaps.append(out[-1].float().numpy())
        points = decode_heatmaps(np.concatenate(heatmaps))
        pred = np.stack([heatmap_to_image_coords(p, t) for p, t in zip(points, self.transforms)])
        summary, _, _ = score(self.task, pred, self.landmarks, self.visible, self.head_size)
        return self.task.headline(summary)


@contextmanager
def measurement_layout(*models: nn.Module) -> Iterator[None]:
    """The models' weights in channels-last layout while the held-out slice (stored so) runs
    through them, contiguous again after (the build exports from them). oneDNN's convolutions
    run the float and fake-quant models 1.6-1.7x faster so (embedded model, 64 images:
    bench/results/heldout_forward.json); the outputs differ from the contiguous layout's by
    float32 summation order, which the fake quantizers' rounding can amplify, so every
    metric of one search is taken in it."""
    for m in models:
        m.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in models:
            m.to(memory_format=torch.contiguous_format)


def formats_worth_measuring(formats: Sequence[str], layers: Sequence[LayerInfo], objective: str,
                            int8_degradation: float, budget: float, float_dtype: str = "fp32",
                            int4_block: int | None = DEFAULT_INT4_BLOCK) -> tuple[str, ...]:
    """The formats a plan for `objective` could use: those cheaper than INT8 for some conv,
    and the more accurate ones only when all-INT8 is already over the budget. The rest are
    dominated (costlier and no more needed), so measuring them would only cost time: e.g.
    INT4 for latency (at best INT8's speed), float for size while INT8 fits."""
    keep = ["int8"]
    for f in formats:
        if f == "int8":
            continue
        cheaper = any(layer_cost(layer, f, objective, float_dtype, int4_block)
                      < layer_cost(layer, "int8", objective, float_dtype)
                      for layer in layers if f in allowed_formats(layer, formats))
        needed = _rank(f) > _rank("int8") and int8_degradation > budget
        if cheaper or needed:
            keep.append(f)
    return tuple(f for f in formats if f in keep)


PREFIX_CACHE_BYTES = 1 << 30


class PrefixCache:
    """What the all-INT8 model computed on the held-out slice before each point of its
    execution, so that a variant changing convs from execution position k on replays
    everything before k instead of computing it (a conv's output cannot depend on a later
    conv): on average half the network per variant.

    Two grains. Whole U-Nets: the output of each U-Net (its `hg` call) and the dense-link
    FIFOs it leaves behind (a width-channel map and a few growth-rate-wide ones per level),
    replayed with everything inside them (BatchNorms, concatenations, pooling). Single convs:
    each conv's output, replayed for the convs before k that still run (in the first U-Net
    that runs, the heads, the adapters between U-Nets), as long as they fit `max_bytes` (the
    N=8 face model's conv outputs take 155 MB per image, so only a prefix of them is kept);
    0 keeps nothing at either grain."""

    def __init__(self, qmodel: nn.Module, layers: Sequence[LayerInfo], images: int,
                 max_bytes: int = PREFIX_CACHE_BYTES) -> None:
        self.qmodel = qmodel
        self.modules = dict(qmodel.named_modules())
        self.order = [layer.name for layer in layers]
        total, kept = 0, 0
        for layer in layers:
            total += layer.out_numel * images * 4
            if total > max_bytes:
                break
            kept += 1
        self.kept = self.order[:kept]
        self.outputs: list[dict[str, list[torch.Tensor]]] = []
        # U-Net grain: one `hg` call per U-Net and refinement pass; with one pass, a U-Net's
        # convs run in one stretch of the execution order (several passes re-run earlier convs)
        config = getattr(qmodel, "config", None)
        self.hg = qmodel.hg if max_bytes > 0 and getattr(config, "refine_iters", 0) == 1 else None
        self.unet_ends: list[int] = []  # execution position after each U-Net's last conv
        self.unet_states: list[list[tuple[torch.Tensor, dict]]] = []  # per batch: (output, FIFOs)

    def record(self, batch: int, images: torch.Tensor):
        store: dict[str, list[torch.Tensor]] = {}
        hooks = [self.modules[n].register_forward_hook(
            lambda mod, inp, out, n=n: store.setdefault(n, []).append(out.clone())) for n in self.kept]
        if self.hg is not None:
            executed: set[str] = set()
            hooks += [self.modules[n].register_forward_hook(lambda mod, inp, out, n=n: executed.add(n))
                      for n in self.order]
            states, ends, hg_forward = [], [], self.hg.forward

            def recording(x, i, fifos, memory_efficient):
                out = hg_forward(x, i, fifos, memory_efficient)
                states.append((out, {key: list(queue) for key, queue in fifos.items()}))
                ends.append(len(executed))  # convs run in `order`: these are order[:len(executed)]
                return out
            self.hg.forward = recording
        try:
            out = self.qmodel(images)
        finally:
            for h in hooks:
                h.remove()
            if self.hg is not None:
                del self.hg.forward
        self.outputs.append(store)
        if self.hg is not None:
            self.unet_states.append(states)
            self.unet_ends = ends
        return out

    @property
    def enabled(self) -> bool:
        return bool(self.kept) or self.hg is not None

    def replayed_unets(self, first: int) -> int:
        """How many U-Nets end before execution position `first` (replayed whole)."""
        return sum(end <= first for end in self.unet_ends)

    def runner(self, first: int):
        """run(batch, images) that replays what runs before execution position `first`."""
        skip = self.kept[:first]
        unets = self.replayed_unets(first)

        def run(batch: int, images: torch.Tensor):
            for n in skip:
                recorded = iter(self.outputs[batch][n])
                self.modules[n].forward = lambda *args, _it=recorded: next(_it)
            if unets:
                states, calls, hg_forward = self.unet_states[batch], iter(range(len(self.unet_ends))), self.hg.forward

                def replaying(x, i, fifos, memory_efficient):
                    call = next(calls)
                    if call >= unets:
                        return hg_forward(x, i, fifos, memory_efficient)
                    out, queues = states[call]
                    fifos.clear()  # the dict CUNet.forward passes to every U-Net of the pass
                    fifos.update({key: list(queue) for key, queue in queues.items()})
                    return out
                self.hg.forward = replaying
            try:
                return self.qmodel(images)
            finally:
                for n in skip:
                    del self.modules[n].forward
                if unets:
                    del self.hg.forward
        return run


def unequalized_convs(qmodel: nn.Module, layer_formats: Mapping[str, str]) -> dict[str, str]:
    """{conv: the BatchNorm it reads} of the INT4 convs of a plan that activation equalization
    (quant/equalize.py) would have touched. Equalization moves activation range into the weight
    columns, which per-tensor INT8 activations need and per-channel INT4 weights cannot afford
    (the embedded model, uniform INT4 on the CPU: NME +2.53 equalized at alpha 0.5, +0.51 not), so
    these convs keep the unequalized weights, BatchNorm and input scale (equalize_alpha_for's rule
    for whole INT4 schemes, per conv)."""
    from cunet_optimize.quant.equalize import norm_conv_pairs

    names = {id(module): name for name, module in qmodel.named_modules()}
    return {conv: names[id(norm)] for conv, (norm, _) in norm_conv_pairs(qmodel).items()
            if layer_formats.get(conv) == "int4"}


class FormatSwitch:
    """The calibrated INT8 fake-quant model whose convs can each take another format in place
    (their weight and input quantizers swapped, nothing rebuilt), measured on the held-out
    slice with the prefix cache: the single-group changes of the sensitivity table and the
    joint runs of whole plans both go through `metric`. `plain`: the same model calibrated
    without activation equalization, where `qmodel` has it: an INT4 conv then takes its weight,
    BatchNorm and input quantizer from there (unequalized_convs), as with_layer_formats builds it."""

    def __init__(self, qmodel: nn.Module, heldout: HeldOut, layers: Sequence[LayerInfo],
                 prefix_cache_bytes: int = PREFIX_CACHE_BYTES, int4_block: int | None = DEFAULT_INT4_BLOCK,
                 plain: nn.Module | None = None) -> None:
        self.qmodel, self.heldout, self.int4_block = qmodel, heldout, int4_block
        self.layers = {layer.name: layer for layer in layers}
        self.modules = dict(qmodel.named_modules())
        self.cache = PrefixCache(qmodel, layers, len(heldout), prefix_cache_bytes)
        self.position = {n: i for i, n in enumerate(self.cache.order)}
        self.plain = dict(plain.named_modules()) if plain is not None else None
        self.norm_of = unequalized_convs(qmodel, {n: "int4" for n in self.layers}) if plain is not None else {}
        # (conv, format) -> {(module, attribute): value}; the INT8 ones are the model's own
        self.swaps: dict[tuple[str, str], dict[tuple[str, str], Any]] = {(n, "int8"): self._own(n) for n in self.layers}
        self.int8: float | None = None
        self.runs = 0

    def _own(self, conv: str) -> dict[tuple[str, str], Any]:
        m = self.modules[conv]
        own = {(conv, "weight_quantizer"): m.weight_quantizer, (conv, "input_quantizer"): m.input_quantizer}
        if conv in self.norm_of:
            norm = self.modules[self.norm_of[conv]]
            own.update({(conv, "weight"): m.weight, (self.norm_of[conv], "weight"): norm.weight,
                        (self.norm_of[conv], "bias"): norm.bias})
        return own

    def record_int8(self) -> float:
        """The all-INT8 metric; records the convs' outputs the later runs replay."""
        self.int8 = self.heldout.metric(self.qmodel, run=self.cache.record)
        return self.int8

    def _swap(self, conv: str, fmt: str) -> dict[tuple[str, str], Any]:
        from cunet_optimize.quant.qmodel import _conv_quantizers, conv_scheme

        key = (conv, fmt)
        if key not in self.swaps:
            if fmt == "int4":
                source = self.plain[conv] if conv in self.norm_of else self.modules[conv]
                weight = _conv_quantizers(conv_scheme(self.qmodel.scheme, "int4", self.int4_block), self.layers[conv].role,
                                          source)["weight_quantizer"]
                weight.name = f"{conv}.weight"
                swap = {(conv, "weight_quantizer"): weight, (conv, "input_quantizer"): source.input_quantizer}
                if conv in self.norm_of:
                    norm = self.norm_of[conv]
                    swap.update({(conv, "weight"): source.weight, (norm, "weight"): self.plain[norm].weight,
                                 (norm, "bias"): self.plain[norm].bias})
            elif fmt == "float":
                swap = {(conv, "weight_quantizer"): None, (conv, "input_quantizer"): None}
            else:
                raise CUNetError(f"layer format '{fmt}' unknown; use one of {', '.join(ACCURACY_ORDER)}")
            self.swaps[key] = swap
        return self.swaps[key]

    def _put(self, conv_formats: Mapping[str, str]) -> None:
        for conv, fmt in conv_formats.items():
            for (module, attr), value in self._swap(conv, fmt).items():
                setattr(self.modules[module], attr, value)

    def metric(self, conv_formats: Mapping[str, str]) -> float:
        """The held-out metric with the convs of `conv_formats` in their formats, the rest INT8."""
        changed = {c: f for c, f in conv_formats.items() if f != "int8"}
        if self.int8 is None and (not changed or self.cache.enabled):
            self.record_int8()
        if not changed:
            return self.int8
        self._put(changed)
        try:
            self.runs += 1
            return self.heldout.metric(self.qmodel, run=self.cache.runner(min(self.position[c] for c in changed)))
        finally:
            self._put({c: "int8" for c in changed})


def measure_sensitivity(float_model: nn.Module, qmodel: nn.Module, heldout: HeldOut, layers: Sequence[LayerInfo],
                        formats: Sequence[str], grain: str, progress: bool = True,
                        choose_formats: Callable[[float], Sequence[str]] | None = None,
                        prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
                        switch: FormatSwitch | None = None) -> SensitivityTable:
    """Each group's degradation change when only it takes each non-INT8 format (module doc).
    `choose_formats(int8_degradation)` may narrow `formats` once the all-INT8 model is measured
    (see formats_worth_measuring). `switch` (made here when None) is left ready for joint runs."""
    from tqdm import tqdm

    start = time.perf_counter()
    fp32 = heldout.metric(float_model)
    switch = switch or FormatSwitch(qmodel, heldout, layers, prefix_cache_bytes)
    int8 = switch.record_int8()
    int8_deg = heldout.task.degradation(int8, fp32)
    if choose_formats is not None:
        formats = tuple(choose_formats(int8_deg))
    by_group: dict[str, list[LayerInfo]] = {}
    for layer in layers:
        by_group.setdefault(layer.group, []).append(layer)
    delta: dict[str, dict[str, float]] = {}
    todo = [(g, f) for g, members in by_group.items() for f in formats if f != "int8"
            and all(f in allowed_formats(m, formats) for m in members)]
    for g, f in tqdm(todo, desc="sensitivity", unit="variant", disable=not progress, leave=False):
        value = switch.metric({m.name: f for m in by_group[g]})
        delta.setdefault(g, {"int8": 0.0})[f] = heldout.task.degradation(value, fp32) - int8_deg
    for g in by_group:
        delta.setdefault(g, {"int8": 0.0})
    return SensitivityTable(heldout.task.metric, len(heldout), fp32, int8, int8_deg, delta, grain,
                            round(time.perf_counter() - start, 2))


def with_layer_formats(qmodel: nn.Module, layer_formats: Mapping[str, str],
                       int4_block: int | None = DEFAULT_INT4_BLOCK, plain: nn.Module | None = None) -> nn.Module:
    """The calibrated int8 `qmodel` rebuilt with per-conv formats: same (equalized) float
    weights, same activation scales for the quantizers that remain; INT4 in blocks of
    `int4_block` input channels (None: per output channel). `plain`: the same model calibrated
    without equalization, where `qmodel` has it: the INT4 convs take their weights, BatchNorm
    and input scales from there (unequalized_convs)."""
    from cunet_optimize.models.cunet import CUNet
    from cunet_optimize.quant.calibrate import activation_scales, apply_scales
    from cunet_optimize.quant.qmodel import float_state_dict, quantize_model

    state, scales = float_state_dict(qmodel), activation_scales(qmodel)
    if plain is not None:
        plain_state, plain_scales = float_state_dict(plain), activation_scales(plain)
        for conv, norm in unequalized_convs(qmodel, layer_formats).items():
            for key in (f"{conv}.weight", f"{norm}.weight", f"{norm}.bias"):
                state[key] = plain_state[key]
            scales[f"{conv}.input"] = plain_scales[f"{conv}.input"]
    base = CUNet(qmodel.config)
    base.load_state_dict(state)
    mixed = quantize_model(base.eval(), qmodel.scheme, layer_formats, int4_block)
    wanted = {n for n, _ in _activation_names(mixed)}
    apply_scales(mixed, {n: s for n, s in scales.items() if n in wanted})
    return mixed.eval()


def _activation_names(model):
    from cunet_optimize.quant.qmodel import activation_quantizers

    return activation_quantizers(model).items()


# --------------------------------------------------------------------------------------
# Joint runs: the additive prediction corrected by measuring whole plans


def lowering_moves(table: SensitivityTable, costs: Mapping[str, Mapping[str, float]],
                   start: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every (group, cheaper format) move from `start`, cheapest predicted degradation per
    byte (or latency unit) saved first: the order a knapsack would spend the budget in."""
    moves = []
    for g, fmt in start.items():
        for f, cost in costs[g].items():
            saving = costs[g][fmt] - cost
            if saving > 0:
                moves.append(((expected_delta(table, g, f) - expected_delta(table, g, fmt)) / saving, -saving, g, f))
    return [(g, f) for *_, g, f in sorted(moves)]


def plan_after(start: Mapping[str, str], costs: Mapping[str, Mapping[str, float]],
               moves: Sequence[tuple[str, str]]) -> dict[str, str]:
    """`start` with `moves` applied in order; a move to a format no cheaper than the group's
    current one is skipped (the group already went lower)."""
    plan = dict(start)
    for g, f in moves:
        if costs[g][f] < costs[g][plan[g]]:
            plan[g] = f
    return plan


def search_measured(table: SensitivityTable, costs: Mapping[str, Mapping[str, float]], budget: float,
                    measure: Callable[[Mapping[str, str]], float], additive: SearchResult) -> dict:
    """The cheapest plan whose *measured* held-out degradation fits the budget.

    Single-group changes do not add up: on 64 held-out images each one carries noise, a
    lower format's is clamped at 0 (`expected_delta`), and the sum of 60 clamped noises
    overstates a plan; real interactions can go either way. So the plans along the knapsack's
    order (`lowering_moves` from the additive plan's accurate groups) are measured jointly,
    by bisection on how many moves are taken (log2(moves) runs of the held-out slice), with
    the additive plan itself. `measure(group plan) -> degradation`.
    Returns {"plan", "measured", "cost", "runs": [{"moves", "cost", "predicted", "measured"}]}."""
    start = {g: f if "int8" not in costs[g] or _rank(f) >= _rank("int8") else "int8"
             for g, f in additive.plan.items()}
    moves = lowering_moves(table, costs, start)
    runs = []

    def run(plan: dict, taken: int | None) -> float:
        m = measure(plan)
        runs.append({"moves": taken, "cost": plan_cost(costs, plan), "predicted": predict_degradation(table, plan),
                     "measured": m})
        return m

    candidates = [(plan_cost(costs, additive.plan), run(dict(additive.plan), None), dict(additive.plan))]
    lo, hi = 0, len(moves)  # lo: most moves known to fit (0: the start, INT8 where the additive kept it)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        plan = plan_after(start, costs, moves[:mid])
        m = run(plan, mid)
        candidates.append((plan_cost(costs, plan), m, plan))
        if m <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0 and start != additive.plan:  # no move fits: the start itself was assumed to
        candidates.append((plan_cost(costs, start), run(dict(start), 0), dict(start)))
    fitting = [c for c in candidates if c[1] <= budget]
    cost, measured, plan = min(fitting, key=lambda c: (c[0], c[1])) if fitting else candidates[0]
    return {"plan": plan, "measured": measured, "cost": cost, "feasible": bool(fitting), "runs": runs}
