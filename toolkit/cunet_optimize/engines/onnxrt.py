"""ONNX Runtime on the CPU: the backend that really builds and runs on our machines.

The builder optimises an ONNX file offline (SessionOptions.optimized_model_filepath)
and writes the result next to session.json, the settings that produced it; the runner
reloads both. The reference runner runs an ONNX file at ORT_DISABLE_ALL, which keeps
the Q/DQ semantics bit-faithful: the accuracy reference for quantized graphs.

INT8 on the CPU comes in Q/DQ *flavours*: "uint8-integer-dataflow" (the CPU form that
`build` makes with surgery's integer_dataflow pass: uint8 tensors between the convs)
and "int8-symmetric" (TensorRT's form). The builder records the flavour it is given
and applies its session entries, nothing more; for int8-symmetric that is
session.qdqisint8allowed=1, which docs/QUANT_RULES.md says x86 needs for QLinearConv.
Observed on ONNX Runtime 1.32, x86-64 AVX2: DQ->Conv->Q fuses into QLinearConv at
ORT_ENABLE_EXTENDED and above for int8 and uint8 activations alike, with or without
that entry (tests/test_onnxrt_backend.py keeps an eye on it).

Intra-op threads are timed at build time, as TensorRT times its tactics: unless the
caller pins `intra_op_threads`, the builder runs the optimised model at batch 1 with
1, 2, 4, ... threads (up to usable_cpus(): the CPUs this process may use, the container's
quota, $CUNET_CPU_THREADS) and records the fastest.
Small networks lose to the thread pool's synchronisation: on a quiet 2-vCPU machine
(bench/results/int8_cpu_quiet.json, written by `python bench/bench_int8_cpu.py`, load
average under 1.7) the embedded model's INT8 engine (depthwise form) took 5.6 ms median on
one thread and 10.6 ms on two (8.9 without spinning), while the authors' N=8 face
configuration was faster with two (45.7 vs 75.9 ms). Under load the second core may be
busy: in bench/results/int8_cpu-run1.json (load average 7) one thread won for both (N=8:
103 vs 178 ms). INT8 builds
time more (pipeline/autotune.py, choose_int8_form): the integer form's variants and, above one thread,
the thread pool spinning or not (THREAD_POOL_VARIANTS); the winner's thread count and
session entries are pinned in session.json, with the CPU's int8 instruction set.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from cunet_optimize.atomic import sha256_file, write_atomic
from cunet_optimize.engines.base import EngineArtifacts, Runner, Timing, final_head, inspect_onnx, time_blocks
from cunet_optimize.engines.cpu_isa import cpu_int8_isa, cpu_model
from cunet_optimize.targets import check_precision, get_target
from cunet_optimize.errors import CUNetError
from cunet_optimize.onnx_tools.storage import ORT_WEIGHT_INPUTS, drop_default_attributes, opset, \
    pack_int4_initializers, share_constants, shorten_names
from cunet_optimize.onnx_tools.verify import open_session

SESSION_SCHEMA = "cunet-optimize/ort-session/1"
SESSION_FILE = "session.json"
OPTIMIZED_MODEL_FILE = "model.ort.onnx"

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
THREAD_TUNING_RUNS = 10  # timed runs per thread count, after 2 warm-up runs
EXECUTION_MODES = ("sequential", "parallel")

# Session config entries per Q/DQ export flavour (see the module docstring).
QDQ_FLAVOURS: dict[str, dict[str, str]] = {
    "int8-symmetric": {"session.qdqisint8allowed": "1"},
    "uint8-integer-dataflow": {},
}
# INT4 weights: keep DequantizeLinear exact (a MatMul would otherwise become MatMulNBits,
# which quantizes activations; CU-Net has no MatMul, so this is a guard, not a speed knob).
PRECISION_SESSION_CONFIG: dict[str, dict[str, str]] = {
    "int4": {"session.qdq_matmulnbits_accuracy_level": "0"},
}


def _ort():
    import onnxruntime  # noqa: PLC0415  (heavy import, only where sessions are made)

    return onnxruntime


def _level(ort, name: str):
    return {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[name]


@dataclass(frozen=True)
class OrtSettings:
    """How a session is made; session.json stores these (plus provenance)."""

    optimization: str = "all"  # graph optimisation level applied at build time
    intra_op_threads: int = 0  # 0 = ONNX Runtime's default (one per physical core)
    inter_op_threads: int = 0
    tune_threads: bool = True  # builder: time intra-op thread counts when intra_op_threads is 0
    execution_mode: str = "sequential"
    qdq_flavour: str | None = None
    session_config: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise CUNetError(
                f"unknown ONNX Runtime optimisation level '{self.optimization}'; "
                f"choose one of {', '.join(OPTIMIZATION_LEVELS)}"
            )
        if self.execution_mode not in EXECUTION_MODES:
            raise CUNetError(
                f"unknown execution mode '{self.execution_mode}'; choose one of {', '.join(EXECUTION_MODES)}"
            )
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CUNetError(f"{name} must be an integer >= 0 (0 = ONNX Runtime default), got {value!r}")
        if self.qdq_flavour is not None and self.qdq_flavour not in QDQ_FLAVOURS:
            raise CUNetError(
                f"unknown Q/DQ flavour '{self.qdq_flavour}'; known flavours: {', '.join(QDQ_FLAVOURS)}"
            )


def session_options(settings: OrtSettings, level: str, optimized_model_path: str | None = None):
    """SessionOptions for `settings`, at graph optimisation `level`."""
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = _level(ort, level)
    so.intra_op_num_threads = settings.intra_op_threads
    so.inter_op_num_threads = settings.inter_op_threads
    so.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if settings.execution_mode == "parallel"
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    # Errors only: the "hardware specific optimizations" warning of an offline
    # ORT_ENABLE_ALL model is recorded in the build notes instead.
    so.log_severity_level = 3
    for key, value in settings.session_config.items():
        so.add_session_config_entry(key, value)
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return so


def thread_candidates(cpus: int | None = None) -> list[int]:
    """1, 2, 4, ... up to `cpus` (default: usable_cpus()), and `cpus` itself."""
    cpus = cpus or usable_cpus()
    out = [1]
    while out[-1] * 2 <= cpus:
        out.append(out[-1] * 2)
    return out + ([cpus] if cpus > out[-1] else [])


CPU_THREADS_ENV = "CUNET_CPU_THREADS"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def usable_cpus() -> int:
    """The most threads a CPU engine is timed and deployed with: the CPUs this process may run on
    (its affinity), at most the container's CPU quota rounded up (`docker run --cpus 2` on a
    64-core host leaves the affinity at 64, and 64 threads on 2 CPUs' worth of time only queue),
    at most $CUNET_CPU_THREADS where set (the deployment's thread budget, e.g. one core per
    Triton model instance)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):  # no cgroup v2 limit here
        pass
    budget = os.environ.get(CPU_THREADS_ENV)
    if budget is not None:
        if not budget.strip().isdigit() or int(budget) < 1:
            raise CUNetError(f"${CPU_THREADS_ENV}={budget!r}: expected a whole number of threads >= 1; "
                             f"set it to the threads the deployed engine may use, or unset it to use all {cpus} CPUs")
        cpus = min(cpus, int(budget))
    return cpus


def time_variants(models: Mapping[str, Path], settings: OrtSettings, threads: list[int], level: str = "disable",
                  runs: int = THREAD_TUNING_RUNS) -> dict[tuple[str, int], float]:
    """Median batch-1 latency in ms of each (model label, intra-op thread count), the
    models loaded at graph optimisation `level`, each timed in a block of its own (time_candidates)."""
    candidates = {(label, n): (Path(path), OrtSettings(**{**asdict(settings), "intra_op_threads": n}))
                  for label, path in models.items() for n in threads}
    return time_candidates(candidates, level, runs)


# Thread-pool settings timed beside the thread count when it is above 1 (session config
# entries): ONNX Runtime's workers spin between nodes by default, which pays on a quiet
# machine with few, large nodes and costs where nodes are many and small or the cores are
# shared. Timed, never assumed: see pipeline/autotune.py, choose_int8_form.
THREAD_POOL_VARIANTS: dict[str, dict[str, str]] = {
    "spin": {},
    "nospin": {"session.intra_op.allow_spinning": "0"},
}


def time_candidates(candidates: Mapping[Any, tuple[Path, OrtSettings]], level: str | Mapping[Any, str] = "disable",
                    runs: int = THREAD_TUNING_RUNS) -> dict[Any, float]:
    """Median batch-1 latency in ms of each candidate (time_candidate_timings)."""
    return {key: t.median_ms for key, t in time_candidate_timings(candidates, level, runs).items()}


def time_candidate_timings(candidates: Mapping[Any, tuple[Path, OrtSettings]],
                           level: str | Mapping[Any, str] = "disable", runs: int = THREAD_TUNING_RUNS,
                           rounds: int = 2) -> dict[Any, Timing]:
    """The batch-1 timing (base.Timing: median ms, and per round) of each candidate (model file,
    session settings), loaded at graph optimisation `level` (or {candidate: level}), each in a
    block of its own: its session opened, timed and released before the next (base.time_blocks:
    an idle session's spinning threads would slow the next candidate)."""
    from cunet_optimize.data.synth import VERIFY_SIZE as INPUT_SIZE, verification_batch

    levels = level if isinstance(level, Mapping) else {key: level for key in candidates}
    path, settings = next(iter(candidates.values()))
    first = open_session(Path(path), session_options(settings, "disable")).get_inputs()[0]
    size = [d if isinstance(d, int) and d > 0 else INPUT_SIZE for d in first.shape[2:]]
    # a synthetic face where the size allows: random float inputs can hit slow denormal paths
    image = (verification_batch(1) if size == [INPUT_SIZE, INPUT_SIZE]
             else np.random.default_rng(0).random((1, first.shape[1], *size), dtype=np.float32))
    feed = {first.name: image.astype(np.float16 if first.type == "tensor(float16)" else np.float32)}

    @contextmanager
    def block(key) -> Iterator[Callable[[], object]]:
        path, settings = candidates[key]
        session = open_session(Path(path), session_options(settings, levels[key]))
        yield lambda: session.run(None, feed)
        del session  # (its thread pool with it)

    timed = time_blocks({key: partial(block, key) for key in candidates}, runs, rounds=rounds)
    return {key: Timing.of(t, rounds) for key, t in timed.items()}


class OnnxRuntimeBuilder:
    """ONNX -> optimised ONNX Runtime model + session.json, for the `cpu` target."""

    backend = "onnxruntime"

    def __init__(self, **settings: Any):
        self.defaults = _settings_from(settings, OrtSettings())

    def build(
        self,
        onnx_path: str | os.PathLike,
        target: str = "cpu",
        precision: str = "fp32",
        out_dir: str | os.PathLike = ".",
        options: Mapping[str, Any] | None = None,
    ) -> EngineArtifacts:
        ort = _ort()
        spec = get_target(target)
        if spec.backend != "onnxruntime":
            raise CUNetError(
                f"target {spec.name} is a {spec.backend} target; the ONNX Runtime builder builds for: cpu"
            )
        support = check_precision(spec, precision)
        onnx_path = Path(onnx_path)
        settings = self._checked_settings(onnx_path, precision, options)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        final, names = _save_optimized(onnx_path, settings, out)

        notes = [n for n in (support.note,) if n]
        settings, tuning = _tune_threads(final, settings, notes)
        storage = None
        if precision == "int4":
            storage = choose_weight_storage(final, settings, out)
            notes.append(storage["why"])
        if settings.optimization == "all":
            notes.append(
                "optimised at ORT_ENABLE_ALL: the saved model may hold CPU-specific layouts (NCHWc); "
                f"rebuild it on the machine that runs it (ONNX Runtime {ort.__version__})"
            )
        if precision == "int8" and settings.qdq_flavour is None:
            notes.append("no Q/DQ flavour given: no int8 session entries applied")
        record = {
            "schema": SESSION_SCHEMA,
            "model": final.name,
            "model_sha256": sha256_file(final),  # the runner runs only this file
            "source_onnx": str(onnx_path),
            "source_onnx_sha256": sha256_file(onnx_path),
            "target": spec.name,
            "precision": precision,
            "executed_as": support.executed_as,
            "onnxruntime_version": ort.__version__,
            "providers": ["CPUExecutionProvider"],
            **asdict(settings),
            "thread_tuning_ms": None if tuning is None else {str(n): round(ms, 3) for n, ms in tuning.items()},
            "cpu": {"model": cpu_model(), "int8_isa": cpu_int8_isa(), "usable_cpus": usable_cpus()},
            # The graph is already optimised: loading it again skips the passes (but for the
            # constant folding that unpacks INT4 weights, see choose_weight_storage).
            "load_optimization": storage["load_optimization"] if storage else "disable",
            "weight_storage": storage,
            "compact_storage": names,
        }
        session_json = write_atomic(out / SESSION_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
        return EngineArtifacts(
            backend=self.backend,
            backend_version=ort.__version__,
            target=spec.name,
            precision=precision,
            artifacts={"model": str(final), "session": str(session_json), "source_onnx": str(onnx_path)},
            settings=record,
            notes=notes,
            engine_built=True,
        )

    def _checked_settings(self, onnx_path: Path, precision: str, options: Mapping[str, Any] | None) -> OrtSettings:
        """The session settings of this build: the options over the builder's defaults, checked
        against the precision and the ONNX, with the Q/DQ flavour's and the precision's session
        entries (explicit entries win)."""
        if precision == "bf16":  # engines/openvino.py: no bf16 Conv kernel in ONNX Runtime's CPU provider
            raise CUNetError("ONNX Runtime's CPU provider has no bf16 convolution; bf16 builds run on OpenVINO "
                             "(`cunet-optimize build --precision bf16` with the openvino extra)")
        settings = _settings_from(dict(options or {}), self.defaults)
        _check_onnx_matches(onnx_path, precision)
        if settings.qdq_flavour is not None and precision not in ("int8", "int4"):
            raise CUNetError(
                f"Q/DQ flavour '{settings.qdq_flavour}' applies to int8 and int4 builds only, not {precision}; drop it"
            )
        config = dict(QDQ_FLAVOURS.get(settings.qdq_flavour or "", {}))
        config.update(PRECISION_SESSION_CONFIG.get(precision, {}))
        config.update(settings.session_config)
        return OrtSettings(**{**asdict(settings), "session_config": config})


def _save_optimized(onnx_path: Path, settings: OrtSettings, out: Path) -> tuple[Path, dict]:
    """ONNX Runtime's optimised model of `onnx_path` at the settings' level, its tensors renamed
    short, its small constants stored once and its default attribute values left out
    (onnx_tools/storage.py), written atomically to
    out/OPTIMIZED_MODEL_FILE (the file the runner loads); and the record: bytes before and after,
    outputs compared."""
    import onnx

    from cunet_optimize.data.synth import verification_batch

    final = out / OPTIMIZED_MODEL_FILE
    # (ONNX Runtime picks the format by the extension: ".ort" would write its flatbuffer format)
    written, partial = out / f".written.{OPTIMIZED_MODEL_FILE}", out / f".{OPTIMIZED_MODEL_FILE}.partial"
    try:
        open_session(onnx_path, session_options(settings, settings.optimization, str(written)))
        if not written.is_file():
            raise CUNetError(f"ONNX Runtime wrote no optimised model for {onnx_path} in {out}")
        model = onnx.load(written)
        renamed = shorten_names(model)
        shared = share_constants(model)
        defaults = drop_default_attributes(model)
        onnx.save(model, partial)
        image = verification_batch(1)
        outputs = []
        for path in (written, partial):
            session = open_session(path, session_options(settings, "disable"))
            outputs.append(session.run(None, {session.get_inputs()[0].name: image}))
        if not all(np.array_equal(a, b) for a, b in zip(*outputs)):  # labels and equal values: a bug
            raise CUNetError(f"renaming the tensors of {onnx_path}'s optimised model, sharing its constants or "
                             "dropping its default attribute values changed its outputs; this is a bug, report it")
        record = {"renamed_tensors": renamed, "value_info_dropped": True, "shared_constants": shared,
                  "default_attributes_dropped": defaults,
                  "outputs_identical": True,
                  "bytes": {"as_written": written.stat().st_size, "compact": partial.stat().st_size}}
        os.replace(partial, final)
    finally:
        for path in (written, partial):
            path.unlink(missing_ok=True)
    return final, record


def _tune_threads(model: Path, settings: OrtSettings, notes: list[str]) -> tuple[OrtSettings, dict | None]:
    """Where asked (tune_threads, threads not pinned): the intra-op thread count timed fastest at
    batch 1 on this machine, and the timings; a note says so."""
    if not (settings.tune_threads and settings.intra_op_threads == 0):
        return settings, None
    timed = time_variants({"model": model}, settings, thread_candidates())
    tuning = {n: ms for (_, n), ms in timed.items()}
    best = min(tuning, key=tuning.get)
    notes.append("intra-op threads timed at batch 1 on this machine: "
                 + ", ".join(f"{n}: {ms:.2f} ms" for n, ms in tuning.items())
                 + f"; using {best} (rebuild on the machine that runs it, or pin intra_op_threads)")
    return OrtSettings(**{**asdict(settings), "intra_op_threads": best}), tuning


# What an INT4 engine's model.ort.onnx stores (choose_weight_storage). ONNX Runtime's integer
# kernels (QLinearConv) take INT8 weights; per-channel INT4 weights are INT8 integers in
# [-8, 7], so they can be stored packed (ONNX INT4, half a byte each) behind a Cast to INT8
# (onnx_tools/storage.py pack_int4_initializers),
# which a session at ORT_ENABLE_BASIC constant-folds at load into the INT8 initializer the
# kernel prepacks: the same kernels, the same outputs, a smaller file, a longer load.
# Measured per build (file bytes, load ms, median ms) and recorded in session.json and
# build.json; packed wins unless it runs slower than INT8 by more than this fraction
# (timing noise between blocks) while its loaded graph differs from INT8's (the same graph
# runs the same kernels: then a timing difference is noise), its outputs differ, or it is
# not smaller (tiny models: the Cast nodes outweigh the saving).
PACKED_LATENCY_TOLERANCE = 0.05
LOAD_TIMING_RUNS = 5


def choose_weight_storage(final: Path, settings: OrtSettings, out: Path) -> dict:
    """Measure an INT4 engine's model.ort.onnx with its INT4-valued weights as INT8 (as ONNX
    Runtime wrote it) and packed (pack_int4_initializers), keep one in `final` (see
    PACKED_LATENCY_TOLERANCE) and return the record: bytes, load ms, median ms, the choice, why."""
    import onnx

    from cunet_optimize.data.synth import verification_batch

    model = onnx.load(final)
    packed = pack_int4_initializers(model, ORT_WEIGHT_INPUTS) if opset(model) >= 21 else 0
    record: dict[str, Any] = {"chosen": "int8", "packed_initializers": packed, "load_optimization": "disable"}
    if not packed:
        record["why"] = ("weight storage: INT8 initializers (no INT4-valued integer-kernel weight"
                         + (" in an opset < 21 graph)" if opset(model) < 21 else ")"))
        return record
    packed_path = out / f".packed-{final.name}"
    try:
        onnx.save(model, packed_path)
        forms = {"int8": (final, "disable"), "packed-int4": (packed_path, "basic")}
        loads: dict[str, list[float]] = {form: [] for form in forms}
        outputs = {}
        image = verification_batch(1)
        for _ in range(LOAD_TIMING_RUNS):
            for form, (path, level) in forms.items():
                start = time.perf_counter()
                session = open_session(path, session_options(settings, level))
                loads[form].append((time.perf_counter() - start) * 1e3)
                outputs[form] = session.run(None, {session.get_inputs()[0].name: image})
        same = all(np.array_equal(a, b) for a, b in zip(outputs["int8"], outputs["packed-int4"]))
        timed = time_candidates({form: (path, settings) for form, (path, _) in forms.items()},
                                {form: level for form, (_, level) in forms.items()})
        # where the packed form loads into the very graph the INT8 form is, the same kernels run:
        # a timing difference is noise, and the smaller file is taken
        loaded_same = _loads_as(packed_path, "basic", final, settings, out)
        record.update(
            bytes={form: path.stat().st_size for form, (path, _) in forms.items()},
            load_ms={form: round(float(np.median(t)), 2) for form, t in loads.items()},
            median_ms_batch1={form: round(ms, 3) for form, ms in timed.items()},
            outputs_identical=same, same_graph_after_load=loaded_same)
        fast = loaded_same or timed["packed-int4"] <= timed["int8"] * (1 + PACKED_LATENCY_TOLERANCE)
        smaller = record["bytes"]["packed-int4"] < record["bytes"]["int8"]  # the Cast nodes cost bytes too
        if same and fast and smaller:
            os.replace(packed_path, final)
            record.update(chosen="packed-int4", load_optimization="basic")
        b, ld = record["bytes"], record["load_ms"]
        record["why"] = (
            f"weight storage: {record['chosen']}: {packed} INT4-valued weight(s) packed "
            f"{b['int8']} -> {b['packed-int4']} bytes, load {ld['int8']} -> {ld['packed-int4']} ms "
            f"(Cast to INT8 folded at ORT_ENABLE_BASIC"
            + (": the same graph as INT8 once loaded" if loaded_same else "")
            + f"), median {timed['int8']:.2f} vs {timed['packed-int4']:.2f} ms, "
            + ("outputs identical" if same else "outputs DIFFER: kept INT8")
            + ("" if fast else f"; packed slower than INT8 by more than {PACKED_LATENCY_TOLERANCE:.0%}: kept INT8")
            + ("" if smaller else "; packed is not smaller: kept INT8"))
    finally:
        packed_path.unlink(missing_ok=True)
    return record


def _loads_as(path: Path, level: str, reference: Path, settings: OrtSettings, out: Path) -> bool:
    """Whether ONNX Runtime, loading `path` at `level`, makes the graph in `reference`: the same
    nodes (their attributes too, an attribute at its default value the same as an absent one),
    reading the same tensors, where an initializer counts by its type, shape and bytes, not its
    name (the loader sorts nodes, drops unread initializers and merges equal ones)."""
    import hashlib

    import onnx

    dumped = out / f".loaded-{path.name}"
    try:
        open_session(path, session_options(settings, level, str(dumped)))
        got, want = onnx.load(dumped), onnx.load(reference)
    finally:
        dumped.unlink(missing_ok=True)

    def graph(model):
        drop_default_attributes(model)  # (the loader writes some back)
        content = {i.name: f"{i.data_type}:{list(i.dims)}:"
                           + hashlib.sha256(onnx.numpy_helper.to_array(i).tobytes()).hexdigest()
                   for i in model.graph.initializer}
        return sorted((n.op_type, n.domain, [content.get(x, x) for x in n.input], list(n.output),
                       sorted(a.SerializeToString() for a in n.attribute)) for n in model.graph.node)

    return graph(got) == graph(want)


def _settings_from(values: Mapping[str, Any], base: OrtSettings) -> OrtSettings:
    names = {f.name for f in fields(OrtSettings)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CUNetError(f"unknown ONNX Runtime option(s) {unknown}; known: {sorted(names)}")
    merged = OrtSettings(**{**asdict(base), **values})
    merged.validate()
    return merged


def _check_onnx_matches(onnx_path: Path, precision: str) -> None:
    content = inspect_onnx(onnx_path)
    if precision == "int8" and not content.has_qdq:
        raise CUNetError(
            f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes, so it cannot be an int8 build; "
            "export it with --precision int8 first"
        )
    # per-channel INT4 in the integer form is stored as INT8 integers until the engine packs them
    if precision == "int4" and not (content.has_int4 or content.has_qdq):
        raise CUNetError(f"{onnx_path} holds no INT4 weights; export it with --precision int4 first")
    if precision == "fp32" and (content.has_qdq or content.has_int4):
        raise CUNetError(
            f"{onnx_path} is a quantized model (Q/DQ nodes) but precision fp32 was asked; "
            "pass its real precision (int8 or int4) or use the float export"
        )


class OnnxRuntimeSessionRunner(Runner):
    """Runs one ONNX model file in an ONNX Runtime CPU session made from `settings`."""

    prefix = "onnxruntime"

    def __init__(
        self,
        model_path: str | os.PathLike,
        settings: OrtSettings | None = None,
        load_optimization: str = "disable",
        name: str | None = None,
    ):
        super().__init__(name)
        self.model_path = Path(model_path)
        self.settings = settings or OrtSettings()
        self.settings.validate()
        if load_optimization not in OPTIMIZATION_LEVELS:
            raise CUNetError(
                f"unknown optimisation level '{load_optimization}'; use one of {OPTIMIZATION_LEVELS}"
            )
        self.load_optimization = load_optimization
        self._shape: tuple[int | None, ...] = super().input_shape

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        return self._shape

    def activate_impl(self) -> None:
        if not self.model_path.is_file():
            raise CUNetError(f"model not found: {self.model_path}; rebuild it")
        self._session = open_session(self.model_path, session_options(self.settings, self.load_optimization))
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise CUNetError(f"{self.model_path}: expected one image input, found {[i.name for i in inputs]}")
        self._input = inputs[0]
        self._output = final_head([(o.name, len(o.shape)) for o in self._session.get_outputs()])
        self._input_dtype = np.float16 if self._input.type == "tensor(float16)" else np.float32
        self._shape = tuple(d if isinstance(d, int) and d > 0 else None for d in self._input.shape)

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        feed = {self._input.name: batch.astype(self._input_dtype, copy=False)}
        (out,) = self._session.run([self._output], feed)
        return np.asarray(out, dtype=np.float32)

    def infer_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the graph for `batch`, by name (`infer` returns the final head only):
        what a server returns, e.g. the heatmaps and a decoded `landmarks` output."""
        if not self.is_active:
            raise RuntimeError(f"{self.name}: activate the runner (use `with runner:`) before infer_all()")
        self.check_batch(batch)
        feed = {self._input.name: np.ascontiguousarray(batch).astype(self._input_dtype, copy=False)}
        names = [o.name for o in self._session.get_outputs()]
        return dict(zip(names, self._session.run(names, feed)))

    @property
    def head_name(self) -> str:
        """The output `infer` returns (engines.base.final_head), once active."""
        return self._output

    def deactivate_impl(self) -> None:
        self._session = None


class OnnxRuntimeRunner(OnnxRuntimeSessionRunner):
    """Runs what OnnxRuntimeBuilder wrote: the optimised model with its session.json settings."""

    def __init__(self, build: str | os.PathLike, name: str | None = None):
        path = Path(build)
        session_json = path / SESSION_FILE if path.is_dir() else path
        if not session_json.is_file():
            raise CUNetError(
                f"no ONNX Runtime build at {build} (missing {SESSION_FILE}); "
                "run `cunet-optimize build --target cpu` first"
            )
        try:
            record = json.loads(session_json.read_text())
        except ValueError as exc:
            raise CUNetError(f"{session_json} is not valid JSON ({exc}); rebuild") from exc
        if record.get("schema") != SESSION_SCHEMA:
            raise CUNetError(
                f"{session_json} has schema {record.get('schema')!r}, not {SESSION_SCHEMA!r}; rebuild"
            )
        self.record = record
        model = session_json.parent / record["model"]
        if record.get("model_sha256") and model.is_file() and sha256_file(model) != record["model_sha256"]:
            raise CUNetError(f"{model} does not match the sha256 {session_json} recorded (replaced or edited "
                             "after the build); rebuild it with `cunet-optimize build ... --force`")
        settings = OrtSettings(**{f.name: record[f.name] for f in fields(OrtSettings) if f.name in record})
        super().__init__(
            model,
            settings,
            load_optimization=record.get("load_optimization", "disable"),
            name=name,
        )


def session_source_problem(session_json: str | os.PathLike, onnx_path: str | os.PathLike) -> str | None:
    """Why `onnx_path` is not the source ONNX that session.json says its model was optimised
    from (None: it is, or session.json records no source hash)."""
    try:
        recorded = json.loads(Path(session_json).read_text()).get("source_onnx_sha256")
    except (OSError, ValueError, AttributeError):
        return "is not a readable session record"
    if recorded and sha256_file(onnx_path) != recorded:
        return f"records another source ONNX (sha256 {str(recorded)[:12]}) than {Path(onnx_path).name}"
    return None


class OnnxRuntimeReferenceRunner(OnnxRuntimeSessionRunner):
    """An ONNX file at ORT_DISABLE_ALL: Q/DQ computed exactly as the graph says."""

    prefix = "onnxruntime-reference"

    def __init__(self, onnx_path: str | os.PathLike, name: str | None = None, intra_op_threads: int = 0):
        settings = OrtSettings(optimization="disable", intra_op_threads=intra_op_threads)
        super().__init__(onnx_path, settings, load_optimization="disable", name=name)
