"""`build --precision auto`: calibrate INT8, measure sensitivity, search a per-conv plan,
then build it and back off on the real accuracy gate (quant/auto.py holds the decisions).

The builds themselves are ordinary builds (pipeline/build.py `run_stages`) with
`BuildOptions.layer_formats` set; this module only drives them and adds the `auto` section to
build.json (pipeline/plans.py: the plan's fields).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from cunet_optimize.atomic import replace_folder, write_atomic
from cunet_optimize.errors import CUNetError
from cunet_optimize.manifests.build import BUILD_FILE, checked_build_json
from cunet_optimize.pipeline.build import (StageTimer, calibrated_models, check_build, locked_workdir,
                                           plan_float_type, run_stages)
from cunet_optimize.pipeline.plans import plan_fields
from cunet_optimize.quant.policy import int4_block_for
from cunet_optimize.quant import auto

log = logging.getLogger(__name__)

MAX_BUILDS = 8  # the first plan and at most 7 back-off steps


def run_auto_build(opts, echo=print, progress: bool = True):

    if opts.objective not in auto.OBJECTIVES:
        raise CUNetError(f"--objective {opts.objective}: choose one of {', '.join(auto.OBJECTIVES)}")
    if opts.dla_core is not None:
        raise CUNetError("--precision auto with --dla-core: DLA runs whole networks in INT8 or FP16; "
                         "build --precision int8 for the DLA, or drop --dla-core")
    checked = check_build(opts)  # an existing build, a bad name, the data, ...: refused before the search
    calib_set, calib_root = checked.calib_data
    n = len(calib_set)
    if min(opts.auto_heldout_images, n // 2) < 2:
        raise CUNetError(f"--precision auto: the calibration set {calib_root} has {n} images; the sensitivity "
                         "needs at least 4 (half held out from the scales); pass a larger --calib-data")
    with locked_workdir(checked.workdir):
        return _search_and_build(opts, checked, calib_set, calib_root, echo, progress)


@dataclass
class _Search:
    """What the search found, and from what: the builds start from `joint["plan"]` and back
    off along `table` and `costs`; build.json's `auto` section records the rest."""

    budget: float
    float_dtype: str
    int4_block: int | None  # quant.policy.int4_block_for the target: None is per output channel
    formats: tuple
    layers: list
    grain: str
    grain_reason: str
    first_heldout: int  # calibration images from this index on are held out from the scales
    held: int
    scale_images: int
    sensitivity_images: int
    calib_info: dict
    table: auto.SensitivityTable
    measured: list  # the formats the sensitivity measured
    costs: dict
    additive: auto.SearchResult
    joint: dict  # auto.search_measured's record: the plan, its held-out degradation, the runs
    joint_fp32: float
    seconds: float


def _search_and_build(opts, checked, calib_set, calib_root, echo, progress: bool):
    """The search, then builds of its plan (backing off while the gate fails), each assembled
    in its own staging folder; only the last one is renamed into place, with its build.json
    complete, and only if it passed (or the gate is not enforced)."""
    start = time.perf_counter()
    timer = StageTimer(total=3, echo=echo)
    search = _search(opts, checked, calib_set, timer, progress)
    joint = search.joint
    echo(f"search: {len(search.costs)} groups ({search.grain} grain), additive prediction "
         f"{search.additive.predicted:.4f} at {search.additive.cost:.0f}; {len(joint['runs'])} joint held-out "
         f"runs: {joint['measured']:.4f} at {joint['cost']:.0f} (budget {search.budget}), "
         f"{dict(Counter(joint['plan'].values()))}, {search.seconds:.1f} s")
    if not joint["feasible"]:
        echo(f"search: no plan measured within the budget on the held-out images (the additive plan: "
             f"{joint['measured']:.4f} > {search.budget}); building it and letting the gate decide")
    report, plan, fields, builds, back_offs = _build_until_gate_passes(opts, checked.task, search, echo, progress)
    report.manifest["auto"] = _auto_record(opts, checked.task, search, calib_root, plan, fields, builds,
                                           back_offs, total_seconds=round(time.perf_counter() - start, 2))
    return _finish(opts, checked.task, report, timer, search.budget, len(builds))


def _search(opts, checked, calib_set, timer: StageTimer, progress: bool) -> _Search:
    """Calibrate INT8 scales on the first calibration images, group the convs, then measure
    each group's sensitivity on the held-out rest and search the cheapest plan within budget."""
    start = time.perf_counter()
    target, model, task = checked.target, checked.model, checked.task
    n = len(calib_set)
    held = min(opts.auto_heldout_images, n // 2)
    scale_images = min(opts.calib_images, n - held)
    budget = opts.tolerance(task)
    float_dtype = plan_float_type(opts, target)
    int4_block = int4_block_for(target.backend)  # per output channel on ONNX Runtime: it runs as INT8
    base = replace(opts, precision="int8", calib_images=scale_images, layer_formats=None, qat_checkpoint=None)
    qmodel, plain, calib_info = calibrated_models(base, model, checked.ckpt_path, timer, progress,
                                                  calib_data=checked.calib_data, unequalized=True)
    heldout = auto.HeldOut.load(calib_set, range(n - held, n))
    formats = auto.target_formats(target)
    convs = auto.layer_infos(qmodel, "conv", tuple(heldout.images.shape[-2:]))
    grain = opts.auto_grain or ("conv" if len(convs) <= auto.CONV_GRAIN_LIMIT else "block")
    grain_reason = ("--auto-grain" if opts.auto_grain else
                    f"{len(convs)} convs {'<=' if grain == 'conv' else '>'} {auto.CONV_GRAIN_LIMIT}")
    layers = [replace(layer, group=auto.group_of(layer.name, grain)) for layer in convs]
    sensitivity_images = min(held, opts.auto_sensitivity_images or auto.DEFAULT_SENSITIVITY_IMAGES)
    with auto.measurement_layout(model, qmodel, *([plain] if plain is not None else [])):
        table, measured, costs, additive, joint, joint_fp32 = _measure_and_search(
            opts, task, model, qmodel, plain, heldout, layers, formats, grain, budget, float_dtype, int4_block,
            sensitivity_images, timer, progress)
    return _Search(budget=budget, float_dtype=float_dtype, int4_block=int4_block, formats=formats, layers=layers,
                   grain=grain,
                   grain_reason=grain_reason, first_heldout=n - held, held=held, scale_images=scale_images,
                   sensitivity_images=sensitivity_images, calib_info=calib_info, table=table, measured=measured,
                   costs=costs, additive=additive, joint=joint, joint_fp32=joint_fp32,
                   seconds=round(time.perf_counter() - start, 2))


def _measure_and_search(opts, task, model, qmodel, plain, heldout, layers, formats, grain, budget, float_dtype,
                        int4_block, sensitivity_images: int, timer: StageTimer, progress: bool):
    """The sensitivity table on the first `sensitivity_images` held-out images, the additive
    plan, then joint runs of whole plans on every held-out image. Returns (table, measured
    formats, costs, the additive result, the joint record, the joint runs' FP32 metric)."""
    held = len(heldout)
    probe = heldout.first(sensitivity_images)
    with timer.stage("sensitivity", f"{task.metric} of each group's formats ({', '.join(formats)}) on "
                                    f"{sensitivity_images} held-out calibration images"):
        switch = auto.FormatSwitch(qmodel, probe, layers, int4_block=int4_block, plain=plain)
        table = auto.measure_sensitivity(
            model, qmodel, probe, layers, formats, grain, progress,
            lambda int8_deg: auto.formats_worth_measuring(formats, layers, opts.objective, int8_deg, budget,
                                                          float_dtype, int4_block), switch=switch)
        measured = sorted({f for d in table.delta.values() for f in d}, key=auto.ACCURACY_ORDER.index)
    with timer.stage("search", f"cheapest {opts.objective} plan with {task.metric} degradation <= {budget}: "
                               f"additive prediction, then joint runs on {held} held-out images"):
        costs = auto.group_costs(layers, measured, opts.objective, float_dtype, int4_block)
        result = auto.search_plan(table, costs, budget)
        if len(probe) < held:  # the joint runs decide what fits: on every held-out image
            # whole plans change early groups too: a prefix cache would rarely be replayed
            del switch  # (and the sensitivity's cache is freed)
            switch = auto.FormatSwitch(qmodel, heldout, layers, prefix_cache_bytes=0, int4_block=int4_block,
                                       plain=plain)
            joint_fp32 = heldout.metric(model)
        else:
            joint_fp32 = table.fp32

        def heldout_degradation(group_plan):
            return task.degradation(switch.metric(auto.layer_plan(layers, group_plan)), joint_fp32)

        joint = auto.search_measured(table, costs, budget, heldout_degradation, result)
        del switch
    return table, measured, costs, result, joint, joint_fp32


def _build_until_gate_passes(opts, task, s: _Search, echo, progress: bool):
    """Build the searched plan and read the real accuracy gate; while it fails, back off
    (auto.back_off) and build again, at most MAX_BUILDS builds. Returns the last build's
    report (still in its staging folder), its plan and plan_fields, and the record of each
    build and each back-off."""
    plan = s.joint["plan"]
    builds, back_offs = [], []
    report = None
    for step in range(MAX_BUILDS):
        t0 = time.perf_counter()
        if report is not None:  # the plan backed off from: never renamed into place
            shutil.rmtree(report.path, ignore_errors=True)
        report = run_stages(replace(opts, precision="auto", layer_formats=auto.layer_plan(s.layers, plan),
                                   calib_images=s.scale_images, accuracy_gate=False),
                           echo, progress, lock=False, commit=False)
        acc = report.manifest["accuracy"]
        fields = plan_fields(s.layers, plan, s.formats, s.float_dtype, s.int4_block)
        builds.append({"step": step, "formats": dict(Counter(plan.values())),
                       "predicted": auto.predict_degradation(s.table, plan),
                       "heldout_degradation": s.joint["measured"] if step == 0 else None,
                       "degradation": acc["degradation_points"], "passed": acc["passed"],
                       "weight_bytes": fields["weight_bytes"], "latency_units": fields["latency_units"],
                       "seconds": round(time.perf_counter() - t0, 2)})
        if acc["passed"] or step + 1 == MAX_BUILDS:  # `plan` stays the one built last
            break
        nxt = auto.back_off(s.table, s.costs, plan)
        if nxt is None:
            break
        plan, why = nxt
        back_offs.append({"after_build": step, "degradation": acc["degradation_points"], "action": why})
        echo(f"back-off: {task.metric} {acc['degradation_points']:.4f} points worse > {s.budget}; {why}")
    return report, plan, fields, builds, back_offs


def _auto_record(opts, task, s: _Search, calib_root: Path, plan: dict, fields: dict, builds: list,
                 back_offs: list, total_seconds: float) -> dict:
    """build.json's `auto` section: the search's settings and measurements, the plan built
    last (`fields`: its plan_fields), and every build and back-off."""
    return {
        "objective": opts.objective,
        "budget": s.budget,
        "budget_option": task.gate_option,
        "grain": s.grain,
        "grain_reason": s.grain_reason,
        "formats": list(s.formats),
        "formats_measured": s.measured,
        "float_type": s.float_dtype,
        "heldout": {"data": str(calib_root.resolve()), "split": opts.calib_split, "first": s.first_heldout,
                    "images": s.held, "sensitivity_images": s.sensitivity_images,
                    "scale_images": s.scale_images, "fp32": s.joint_fp32},
        **fields,
        "sensitivity": s.table.to_dict(),
        "predicted_degradation": auto.predict_degradation(s.table, plan),
        "visited": s.additive.visited,
        # what the search tried: the additive plan, then plans along the knapsack order
        # measured jointly on the held-out images (moves None: the additive plan)
        "additive": {"cost": s.additive.cost, "predicted": s.additive.predicted, "feasible": s.additive.feasible},
        "joint_runs": s.joint["runs"],
        "heldout_degradation": s.joint["measured"],
        "builds": builds,
        "back_off": back_offs,
        "search_seconds": s.seconds,
        "total_seconds": total_seconds,
        "calibration": s.calib_info,
    }


def _finish(opts, task, report, timer: StageTimer, budget: float, n_builds: int):
    """Complete the last build's build.json in its staging folder, then refuse it (the folder
    removed) if it failed an enforced gate, or rename it into place."""
    staging = Path(report.path)
    manifest = report.manifest
    acc = manifest["accuracy"]
    acc["gate_enforced"] = opts.accuracy_gate
    # the search's stages and the final build's; calibrate in both (the build reloads the cache)
    built = manifest.get("timings_seconds", {})
    manifest["timings_seconds"] = {stage: round(timer.seconds.get(stage, 0.0) + built.get(stage, 0.0), 2)
                                   for stage in {**timer.seconds, **built}}
    write_atomic(staging / BUILD_FILE, checked_build_json(manifest))
    if not acc["passed"] and opts.accuracy_gate:
        shutil.rmtree(staging, ignore_errors=True)
        raise CUNetError(
            f"--precision auto: no plan met the gate after {n_builds} build(s): {acc['metric']} "
            f"{acc['degradation_points']:.3f} points worse than FP32 > {budget}; raise {task.gate_option}, "
            "run `cunet-optimize qat --plan` on the plan, or build --precision int8")
    final = staging.parent / manifest["name"]
    replace_folder(staging, final)
    report.path = str(final)
    return report
