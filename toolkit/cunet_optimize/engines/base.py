"""The backend-neutral half of engines/: runners, the builder protocol, build results.

Polygraphy's split, kept small: a *builder* turns an ONNX file into an artifact on
disk for one target and precision; a *runner* loads an artifact and maps a batch of
images to the final head's heatmaps. The profiler and the accuracy evaluator see only
runners, so PyTorch, ONNX Runtime and TensorRT are measured by the same code.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np

from cunet_optimize.errors import CUNetError

# One image as the CU-Net stem expects it; the batch dimension is left free.
IMAGE_CHW = (3, 256, 256)

# The decoded output a deployed graph may have beside its heatmaps (exporters/landmarks.py
# appends it: export --landmarks, build --landmarks), and what it holds, as build.json and the
# serving configs state it (data/transforms.py's heatmap_to_input_coords maps it into the crop).
LANDMARKS = "landmarks"
LANDMARK_UNITS = "(x, y) per point in heatmap pixels (64x64, 0-based); in the 256x256 crop: (u + 0.5) x 4 - 0.5"


def final_head(outputs: list[tuple[str, int | None]]) -> str:
    """The prediction among a model's outputs, given as (name, rank) pairs in graph order.

    The export writes heatmaps_0..L-1 (U-Net order, the last is the prediction) and may
    append a decoded `landmarks` output; so: the last 4-D output, preferring the
    heatmaps_* names, else the last output of all.
    """
    if not outputs:
        raise CUNetError("the model has no outputs; re-export it")
    four_d = [name for name, rank in outputs if rank == 4]
    named = [name for name in four_d if name.startswith("heatmaps")]
    return (named or four_d or [outputs[-1][0]])[-1]


class Runner:
    """Loads one artifact and runs it: `infer(Bx3x256x256 float32) -> BxCx64x64 float32`.

    Use it as a context manager; activation is where sessions are created and memory
    is allocated, so constructing a runner is cheap and never touches the backend.
    Subclasses override `activate_impl`, `infer_impl` and `deactivate_impl`.
    """

    prefix = "runner"

    def __init__(self, name: str | None = None):
        self.name = name or self.prefix
        self.is_active = False
        # Wall time of the last infer() call, seconds (backend call only, no checks).
        self.inference_time: float | None = None

    # Shape of the input the artifact accepts; None marks a free (dynamic) dimension.
    @property
    def input_shape(self) -> tuple[int | None, ...]:
        return (None, *IMAGE_CHW)

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.deactivate()

    def activate(self) -> None:
        if self.is_active:
            return
        self.activate_impl()
        self.is_active = True

    def deactivate(self) -> None:
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False
            self.inference_time = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Heatmaps of the final head for `batch` (Bx3x256x256 float32 in [0, 1])."""
        if not self.is_active:
            raise RuntimeError(f"{self.name}: activate the runner (use `with runner:`) before infer()")
        self.check_batch(batch)
        start = time.perf_counter()
        out = self.infer_impl(np.ascontiguousarray(batch))
        self.inference_time = time.perf_counter() - start
        return out

    def check_batch(self, batch: np.ndarray) -> None:
        expected = self.input_shape
        if not isinstance(batch, np.ndarray) or batch.dtype != np.float32:
            got = getattr(batch, "dtype", type(batch).__name__)
            raise CUNetError(
                f"{self.name}: input batch must be a float32 numpy array, got {got}; "
                "convert with np.asarray(x, dtype=np.float32)"
            )
        shape_ok = batch.ndim == len(expected) and all(
            e is None or e == g for e, g in zip(expected, batch.shape, strict=True)
        )
        if not shape_ok:
            want = "x".join("B" if e is None else str(e) for e in expected)
            raise CUNetError(
                f"{self.name}: input batch has shape {tuple(batch.shape)}, this artifact takes {want}; "
                "resize images to 256x256 and stack them as NCHW"
            )

    def activate_impl(self) -> None:
        pass

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass


def time_blocks(open_block: Mapping[Any, Callable[[], ContextManager[Callable[[], object]]]], runs: int,
                warmup: int = 2, rounds: int = 2) -> dict[Any, list[float]]:
    """Wall time in ms of `runs` calls of each candidate, each timed in a block of its own:
    `open_block[key]()` enters a context that makes the call (a session opened, a model
    compiled), `warmup` untimed calls, `runs` timed ones, then the context is left (released);
    the blocks in alternating order over `rounds` rounds, so a drift in machine load hits them
    alike. Blocks, not run-by-run turns: a runtime's idle workers keep spinning after a call
    (ONNX Runtime's intra-op pool by default, OpenVINO's streams) and take the cores from the
    next candidate. Measured on the embedded model's INT4 engine (2-core AMD EPYC, ONNX Runtime
    1.32, 2 spinning threads), one engine timed against itself: 10.1 and 8.0 ms run by run, 3.4
    and 3.6 ms in blocks; an OpenVINO session made an interleaved ONNX Runtime one ~1.6x slower
    (N=8 face model, 2-core Xeon)."""
    times: dict[Any, list[float]] = {key: [] for key in open_block}
    keys = list(open_block)
    for r in range(rounds):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            with open_block[key]() as call:
                for i in range(warmup + runs):
                    start = time.perf_counter()
                    call()
                    if i >= warmup:
                        times[key].append((time.perf_counter() - start) * 1e3)
    return times


@dataclass(frozen=True)
class Timing:
    """One candidate's timing from time_blocks: the median over all its timed runs, and the
    median of each round (their spread is the drift this machine showed while timing it)."""

    median_ms: float
    round_ms: tuple[float, ...]

    @classmethod
    def of(cls, times: list[float], rounds: int) -> "Timing":
        per_round = len(times) // rounds  # (time_blocks appends a round's runs in turn)
        return cls(float(np.median(times)),
                   tuple(float(np.median(times[r * per_round:(r + 1) * per_round])) for r in range(rounds)))

    @property
    def drift_ms(self) -> float:
        return max(self.round_ms) - min(self.round_ms)


def within_drift_of_fastest(timed: Mapping[Any, Timing]) -> set:
    """The candidates this machine could not tell from the fastest: the gap between their
    medians within the two candidates' round-to-round drifts together. On a quiet machine the
    drifts are small and only the fastest is left. On a shared one (2-core AMD EPYC), the
    embedded model's two INT8 forms at 2 threads were timed 7.49 and 7.48 ms in one build and
    3.45 and 4.38 ms in the next: a choice between such timings is the timer's noise, not the graphs'."""
    fastest = min(timed, key=lambda key: timed[key].median_ms)
    best = timed[fastest]
    return {key for key, t in timed.items() if t.median_ms - best.median_ms <= t.drift_ms + best.drift_ms}


def time_in_blocks(runners: Mapping[Any, Runner], image: np.ndarray, runs: int, rounds: int = 2) -> dict[Any, Timing]:
    """The batch-1 timing (median ms, and per round) of each runner on `image`, each timed in a
    block of its own (activate, two warm-up runs, `runs` timed runs, deactivate: time_blocks)."""
    @contextmanager
    def block(runner: Runner) -> Iterator[Callable[[], object]]:
        with runner:
            yield lambda: runner.infer(image)

    timed = time_blocks({key: partial(block, runner) for key, runner in runners.items()}, runs, rounds=rounds)
    return {key: Timing.of(t, rounds) for key, t in timed.items()}


class TorchRunner(Runner):
    """The PyTorch FP32 baseline: a CU-Net in eval mode, last head as numpy."""

    prefix = "pytorch"

    def __init__(self, model, name: str | None = None, device: str = "cpu"):
        super().__init__(name)
        self.model = model
        self.device = device

    def activate_impl(self) -> None:
        self.model.eval().to(self.device)

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            heads = self.model(torch.from_numpy(batch).to(self.device))
        last = heads[-1] if isinstance(heads, (list, tuple)) else heads
        return last.detach().float().cpu().numpy()


@dataclass
class EngineArtifacts:
    """What a builder wrote and how; the build stage copies it into build.json.

    `engine_built` is True only when an executable engine exists on disk now; a
    TensorRT deployment bundle built where TensorRT is missing says False and its
    `notes` say what to run on the device.
    """

    backend: str
    backend_version: str
    target: str
    precision: str
    artifacts: dict[str, str] = field(default_factory=dict)  # role -> path
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    engine_built: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class EngineBuilder(Protocol):
    """ONNX + target + precision -> artifact(s) in out_dir, described by a EngineArtifacts."""

    def build(
        self,
        onnx_path: str | os.PathLike,
        target: str,
        precision: str,
        out_dir: str | os.PathLike,
        options: Mapping[str, Any] | None = None,
    ) -> EngineArtifacts: ...


@dataclass(frozen=True)
class OnnxContent:
    """What an ONNX file holds that decides which precisions it can be built as."""

    has_qdq: bool  # QuantizeLinear / DequantizeLinear present
    has_int4: bool  # INT4/UINT4 initializers (packed 4-bit weights)
    has_fp16: bool  # FP16 initializers or casts to FP16 (a model already cast)
    opset: int
    outputs: tuple[tuple[str, int | None], ...] = ()  # (name, rank) in graph order


def inspect_onnx(path: str | os.PathLike) -> OnnxContent:
    """Read the graph (not the weights' external data) and report its numeric forms."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CUNetError(f"ONNX file not found: {path}; run `cunet-optimize export` first")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise CUNetError(f"{path}: not a readable ONNX model ({exc}); re-export it") from exc
    tp = onnx.TensorProto
    four_bit = {tp.INT4, tp.UINT4}
    graph = model.graph
    ops = {n.op_type for n in graph.node}
    init_types = {t.data_type for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    init_types.add(attr.t.data_type)
    cast_to_fp16 = any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == tp.FLOAT16 for a in n.attribute)
        for n in graph.node
    )
    io_fp16 = any(v.type.tensor_type.elem_type == tp.FLOAT16 for v in list(graph.input) + list(graph.output))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return OnnxContent(
        has_qdq=bool(ops & {"QuantizeLinear", "DequantizeLinear"}),
        has_int4=bool(init_types & four_bit),
        has_fp16=tp.FLOAT16 in init_types or cast_to_fp16 or io_fp16,
        opset=opset,
        outputs=tuple(
            (
                o.name,
                len(o.type.tensor_type.shape.dim) if o.type.tensor_type.HasField("shape") else None,
            )
            for o in graph.output
        ),
    )
