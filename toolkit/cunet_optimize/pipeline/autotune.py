"""Graph forms `build` chooses by timing them in ONNX Runtime on the build machine, as
TensorRT times its tactics: whether a float graph's dense concatenations are folded
(surgery.pipeline.FOLD_DENSE_CONCATS), and an INT8 graph's integer-dataflow variant with
its thread count and thread-pool setting (surgery.pipeline.INTEGER_DATAFLOW). Where OpenVINO
is installed (the `openvino` extra), the CPU runtime too: ONNX Runtime's engine against OpenVINO
on the forms that suit it (choose_cpu_runtime). A variant that changes outputs is taken only
once it passes the accuracy gate here.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from cunet_optimize.surgery.pipeline import SurgeryResult, run_surgery


def choose_concat_form(concat: SurgeryResult, target: str, workdir: Path) -> tuple[SurgeryResult, dict]:
    """A float graph for ONNX Runtime with its dense concatenations and folded
    (fold_dense_concats): time both at each usable intra-op thread count on this machine,
    keep the faster form (see surgery.pipeline.FOLD_DENSE_CONCATS). Returns the result
    to build and what was measured, with the thread count that won."""
    from cunet_optimize.engines.onnxrt import OrtSettings, thread_candidates, time_variants

    folded = run_surgery(concat.model, ["fold_dense_concats", "fold_batchnorm"], target=target)
    forms = {"concat": concat, "folded": SurgeryResult(folded.model, concat.reports + folded.reports,
                                                       concat.passes + folded.passes)}
    paths = {form: workdir / f"form-{form}.onnx" for form in forms}
    try:
        for form, path in paths.items():
            onnx.save(forms[form].model, path)
        timed = time_variants(paths, OrtSettings(), thread_candidates(), level="all")
    finally:
        for path in paths.values():
            path.unlink(missing_ok=True)
    form, threads = min(timed, key=timed.get)
    return forms[form], {"chosen": form, "intra_op_threads": threads,
                         "median_ms_batch1": {f"{f} x{n}": round(ms, 3) for (f, n), ms in timed.items()}}


# The INT8 CPU integer-form variants `build` times (surgery/integer_dataflow.py, relu_form): "depthwise"
# is the pass's default and its reference; the others change outputs, so each must pass the
# accuracy gate on this machine before it may be chosen.
INT8_CPU_RELU_FORMS = ("depthwise", "clamp")
EXACT_INT8_CPU_FORM = "depthwise"


def int8_form_path(workdir: Path, form: str) -> Path:
    """Where choose_int8_form writes a form while it times and checks it (removed afterwards)."""
    return workdir / f"int8-form-{form}.onnx"


def choose_int8_form(result: SurgeryResult, pass_options: dict, target: str, workdir: Path,
                     accuracy_check) -> tuple[SurgeryResult, dict]:
    """An INT8 graph in ONNX Runtime's integer form (integer_dataflow), chosen by timing, as
    TensorRT picks tactics: each relu_form variant of INT8_CPU_RELU_FORMS at each usable
    intra-op thread count and, above one thread, each thread-pool setting
    (onnxrt.THREAD_POOL_VARIANTS), each timed in a block of its own on this machine. The fastest
    wins; where the timer cannot tell candidates from the fastest (base.within_drift_of_fastest),
    the form with fewer nodes does (a smaller file, fewer kernels), so the choice does not follow
    the noise. A variant other than EXACT_INT8_CPU_FORM is taken only once
    `accuracy_check(onnx_path, OrtSettings) -> dict` (with "passed") says it passes the gate
    here; a variant whose graph equals the exact form's (nothing it rewrites here) is not timed.
    Returns the result to build and the record (candidates, timings, the CPU's int8 ISA)."""
    from cunet_optimize.engines.base import within_drift_of_fastest
    from cunet_optimize.engines.cpu_isa import cpu_int8_isa, cpu_model
    from cunet_optimize.engines.onnxrt import (THREAD_POOL_VARIANTS, OrtSettings, thread_candidates,
                                               time_candidate_timings)

    if result.passes[-1:] != ["integer_dataflow"]:
        raise ValueError(f"choose_int8_form: integer_dataflow must be the last pass, got {result.passes}")
    forms, same_graph = {EXACT_INT8_CPU_FORM: result}, []
    for form in INT8_CPU_RELU_FORMS:
        if form in forms:
            continue
        options = {**pass_options, "integer_dataflow": {**pass_options.get("integer_dataflow", {}), "relu_form": form}}
        # the passes before integer_dataflow (the last) were verified in `result`: the variant
        # runs integer_dataflow alone on the graph they left
        variant = run_surgery(result.before_last, result.passes[-1:], target=target, verify=False,
                              pass_options=options)
        if variant.model.SerializeToString() == result.model.SerializeToString():
            same_graph.append(form)  # e.g. clamp where every sink is before an INT4 conv: nothing to time
            continue
        forms[form] = SurgeryResult(variant.model, result.reports[:-1] + variant.reports, result.passes)
    paths = {form: int8_form_path(workdir, form) for form in forms}
    candidates = {}
    for form in forms:
        for n in thread_candidates():
            for pool, config in (THREAD_POOL_VARIANTS.items() if n > 1 else [("spin", {})]):
                candidates[form, n, pool] = (paths[form], OrtSettings(intra_op_threads=n, session_config=dict(config)))
    checks: dict[str, dict] = {}
    try:
        for form, path in paths.items():
            onnx.save(forms[form].model, path)
        timed = time_candidate_timings(candidates, level="all")
        tied = within_drift_of_fastest(timed)
        nodes = {form: len(r.model.graph.node) for form, r in forms.items()}
        chosen = None
        for key in sorted(timed, key=lambda k: (k not in tied, nodes[k[0]], timed[k].median_ms)):
            form = key[0]
            if form != EXACT_INT8_CPU_FORM and form not in checks:
                checks[form] = accuracy_check(paths[form], candidates[key][1])
            if form == EXACT_INT8_CPU_FORM or checks[form]["passed"]:
                chosen = key
                break
    finally:
        for path in paths.values():
            path.unlink(missing_ok=True)
    form, threads, pool = chosen
    record = {
        "chosen": {"relu_form": form, "intra_op_threads": threads, "thread_pool": pool,
                   "session_config": candidates[chosen][1].session_config},
        "median_ms_batch1": {f"{f} x{n} {p}": round(t.median_ms, 3) for (f, n, p), t in timed.items()},
        "round_ms_batch1": {f"{f} x{n} {p}": [round(ms, 3) for ms in t.round_ms] for (f, n, p), t in timed.items()},
        "within_drift_of_fastest": sorted(f"{f} x{n} {p}" for f, n, p in tied),
        "nodes": nodes,
        "accuracy_checks": checks,
        "same_graph_as_exact": same_graph,  # forms not timed: they rewrote nothing here
        "cpu": {"model": cpu_model(), "int8_isa": cpu_int8_isa(), "usable_cpus": thread_candidates()[-1]},
    }
    return forms[form], record


# Rounds of the second timing of candidates the first cannot tell apart (ONNX Runtime against
# OpenVINO; OpenVINO's settings and forms among themselves). On the N=8 face model (2-core AMD
# EPYC) OpenVINO led by 7.4% in a build's timing and by 8-10% in bench/bench_cpu_runtimes.py's: a
# real difference of the size a shared machine's drift can hide, worth the seconds a longer
# timing costs.
RETIMING_ROUNDS = 6


def choose_cpu_runtime(ort_runner, ov_forms: dict[str, Path], precision: str, accuracy_check,
                       pinned: bool = False, bf16_float: bool = False) -> dict:
    """The CPU runtime a build deploys, chosen by timing, as TensorRT picks tactics: ONNX Runtime's
    engine as built (`ort_runner`, None where ONNX Runtime cannot run the precision: bf16) against
    OpenVINO on each ONNX form of `ov_forms` (label -> file) at each usable thread count and
    performance hint (engines/openvino.py settings_candidates; `bf16_float`: at bf16 too, for an
    auto plan's bf16 float convs), each timed in a block of its own
    (engines/base.py time_in_blocks). An OpenVINO candidate is taken only once
    `accuracy_check(runner) -> dict` (with "passed") says it passes the gate here (against FP32; with
    the build's gate off, against ONNX Runtime's engine: pipeline/build.py _variant_gate); ONNX
    Runtime's engine goes through the build's own gate. OpenVINO candidates within the timer's
    drift of the fastest (base.within_drift_of_fastest: on a 2-core machine one and two threads
    often are) are timed again over RETIMING_ROUNDS rounds, and that timing orders them; a form
    that deploys in fewer bytes (engines/openvino.py compact_bytes) goes first where it runs
    within PACKED_LATENCY_TOLERANCE of the fastest, as the storage choices keep the smaller file
    within it. The faster of ONNX Runtime and OpenVINO's best passing candidate is chosen; where
    the two are within the timer's drift of each other (base.within_drift_of_fastest), they are
    timed again over RETIMING_ROUNDS rounds first, and that timing decides. The OpenVINO candidate
    is kept beside the choice either way (so `profile` measures both runtimes); where none passes
    and ONNX Runtime cannot run the build, or `pinned` (--cpu-runtime openvino) asks for OpenVINO, the fastest is
    chosen and the build's gate judges it.
    Returns the record: "chosen" (onnxruntime | openvino), "openvino" (its form and settings, or
    None), the timings and the accuracy checks."""
    from dataclasses import asdict

    from cunet_optimize.data.synth import verification_batch
    from cunet_optimize.engines.base import time_in_blocks, within_drift_of_fastest
    from cunet_optimize.engines.cpu_isa import cpu_bf16_isa, cpu_model
    from cunet_optimize.engines.onnxrt import THREAD_TUNING_RUNS, thread_candidates
    from cunet_optimize.engines.openvino import PACKED_LATENCY_TOLERANCE, OpenVinoSessionRunner, compact_bytes, \
        openvino_version, settings_candidates

    runners = {("onnxruntime",): ort_runner} if ort_runner is not None else {}
    for form, path in ov_forms.items():
        for settings in settings_candidates(precision, thread_candidates(), bf16_float):
            runners["openvino", form, settings] = OpenVinoSessionRunner(path, settings)
    image = verification_batch(1)
    timings = time_in_blocks(runners, image, THREAD_TUNING_RUNS)
    timed = {key: t.median_ms for key, t in timings.items()}
    retimed = None
    checks: dict[str, dict] = {}
    best_ov = None
    ov_keys = [key for key in timed if key[0] == "openvino"]
    ov_timings = {key: timings[key] for key in ov_keys}
    tied = within_drift_of_fastest(ov_timings) if ov_keys else set()
    ov_retimed = None
    if len(tied) > 1:  # OpenVINO candidates this timing cannot tell apart: timed again, longer
        ov_retimed = time_in_blocks({k: runners[k] for k in tied}, image, THREAD_TUNING_RUNS, RETIMING_ROUNDS)
        ov_timings.update(ov_retimed)
        # (the spread of six round medians is no measure of a tie: one slow round widens it)
        fastest_ms = min(t.median_ms for t in ov_retimed.values())
        tied = {k for k, t in ov_retimed.items() if t.median_ms <= fastest_ms * (1 + PACKED_LATENCY_TOLERANCE)}
    else:
        tied = set()
    tied_forms = {key[1] for key in tied}
    form_bytes = {form: compact_bytes(ov_forms[form]) for form in sorted(tied_forms)} if len(tied_forms) > 1 else {}
    for key in sorted(ov_keys, key=lambda k: (k not in tied, form_bytes.get(k[1], 0), ov_timings[k].median_ms)):
        _, form, settings = key
        check = f"{form} {settings.inference_precision}"  # threads and hints do not change outputs
        if check not in checks:
            checks[check] = accuracy_check(OpenVinoSessionRunner(ov_forms[form], settings))
        if checks[check]["passed"]:
            best_ov = key
            break
    fastest_ov = min((k for k in timed if k[0] == "openvino"), key=timed.get, default=None)
    if ort_runner is None or pinned:
        best_ov = best_ov or fastest_ov
        chosen = "openvino"
    else:
        ort, decisive = ("onnxruntime",), timings
        if best_ov is not None and len(within_drift_of_fastest({k: timings[k] for k in (ort, best_ov)})) == 2:
            # the two finalists within the drift of each other: this timing cannot tell them
            # apart, so they are timed again, longer, and that timing decides
            retimed = decisive = time_in_blocks({k: runners[k] for k in (ort, best_ov)}, image,
                                                THREAD_TUNING_RUNS, RETIMING_ROUNDS)
        faster = best_ov is not None and decisive[best_ov].median_ms < decisive[ort].median_ms
        chosen = "openvino" if faster else "onnxruntime"

    def label(key) -> str:
        return "onnxruntime (as built)" if key[0] == "onnxruntime" else f"openvino {key[1]} {key[2].label()}"

    return {
        "chosen": chosen,
        "pinned": "openvino (--cpu-runtime)" if pinned else None,
        "openvino": None if best_ov is None else {"form": best_ov[1], "settings": asdict(best_ov[2]),
                                                  "median_ms_batch1": round(timed[best_ov], 3)},
        "openvino_retimed_ms_batch1": None if ov_retimed is None else {label(k): round(t.median_ms, 3)
                                                                       for k, t in ov_retimed.items()},
        "openvino_tied": sorted(label(k) for k in tied) if len(tied) > 1 else [],
        "openvino_form_bytes": form_bytes,
        "median_ms_batch1": {label(k): round(ms, 3) for k, ms in sorted(timed.items(), key=lambda kv: kv[1])},
        "round_ms_batch1": {label(k): [round(ms, 3) for ms in t.round_ms] for k, t in timings.items()},
        "retimed_ms_batch1": None if retimed is None else {label(k): round(t.median_ms, 3) for k, t in retimed.items()},
        "accuracy_checks": checks,
        "openvino_version": openvino_version(),
        "timing": "each candidate in a block of its own (warm-up 2, "
                  f"{THREAD_TUNING_RUNS} runs), blocks alternating over 2 rounds, batch 1",
        "cpu": {"model": cpu_model(), "bf16_isa": cpu_bf16_isa(), "usable_cpus": thread_candidates()[-1]},
    }
