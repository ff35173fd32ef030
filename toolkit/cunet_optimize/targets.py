"""Deployment targets as data: what each device can execute and how we build for it.

A target is a registry entry, not a code path: builders and build plans read these
fields and never test a target's name. Facts come from NVIDIA's TensorRT 10.x/11.x
documentation and docs/QUANT_RULES.md; rows we could not confirm there are marked
unverified (`unverified_precisions`, `TensorRTRelease.verified`) and every plan built
on them says so in its notes.

Precision rule for INT4 (decided here, used everywhere): no target in this registry has
INT4 convolution kernels (TensorRT applies INT4 to MatMul/Gemm weights; its INT4 conv
support is unverified and ModelOpt inserts nothing for convs; ONNX Runtime's CPU Conv has
no INT4 kernel), so `int4` is allowed on every target and never reported as native. How
it runs depends on the backend (quant.policy.int4_block_for):
- ONNX Runtime (cpu): INT4 weights per output channel, whose integers are INT8 integers
  with the same scale, run as the INT8 convolutions they equal on the integer path
  (surgery/integer_dataflow.py, BatchNorm folded): INT8 speed, INT4 accuracy; the engine
  stores them packed where it measured that no slower (engines/onnxrt.py, weight_storage).
  Block-wise INT4 (`int4-b<N>`) has no integer form and runs dequantized to FP32.
- TensorRT: weight-only INT4 in blocks, built as weights dequantized to the target's float
  compute type (FP16 on NVIDIA GPUs and DLA): INT4 accuracy at FP16 speed, the bundle
  holding FP16 weights on the INT4 grid.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass

from cunet_optimize.errors import CUNetError

MiB = 1 << 20
GiB = 1 << 30

# Every precision an engine is built as, in the order tables show them. A build's --precision is
# a spec (int8-untied, int4-pc, w1a8, auto ...; quant/scheme.py GRAMMAR) that quant/policy.py
# engine_precision maps onto one of these; fp8 is a target capability no build produces yet;
# bf16 is the CPU's (OpenVINO on AVX-512 BF16 or AMX; engines/openvino.py).
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")

BACKENDS = ("onnxruntime", "tensorrt")
DEVICES = ("cpu", "gpu", "jetson")


@dataclass(frozen=True)
class TensorRTRelease:
    """A TensorRT major line a target can build with, and from which release."""

    major: int
    min_version: str  # first release of this major usable on the target ("10.3", "11.4.1")
    verified: bool
    note: str


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    backend: str  # "onnxruntime" | "tensorrt"
    device: str  # "cpu" | "gpu" | "jetson"
    compute_capability: tuple[int, int] | None  # None for the CPU
    dla_cores: int  # Deep Learning Accelerator cores (Jetson Orin only)
    precisions: tuple[str, ...]  # executed natively (INT4 never is: see module doc)
    unverified_precisions: tuple[str, ...]  # subset of `precisions` not confirmed in docs
    dla_precisions: tuple[str, ...]  # what DLA cores execute (empty without DLA)
    workspace_bytes: int | None  # default TensorRT workspace pool cap (our default, not a hardware limit)
    batch: tuple[int, int, int]  # default optimisation profile (min, opt, max)
    build_on_device: bool  # engines must be built on this very device type
    tensorrt_releases: tuple[TensorRTRelease, ...]
    default_tensorrt_major: int | None  # major used by bundle recipes unless told otherwise
    notes: tuple[str, ...] = ()

    @property
    def tensorrt_majors(self) -> tuple[int, ...]:
        return tuple(r.major for r in self.tensorrt_releases)

    @property
    def tensorrt_versions(self) -> tuple[str, ...]:
        """Human-readable, e.g. ('10.3+', '11.4.1+ (unverified)')."""
        return tuple(
            f"{r.min_version}+" + ("" if r.verified else " (unverified)") for r in self.tensorrt_releases
        )

    def tensorrt_release(self, major: int) -> TensorRTRelease:
        for release in self.tensorrt_releases:
            if release.major == major:
                return release
        if not self.tensorrt_releases:
            raise CUNetError(f"target {self.name} is an {self.backend} target; it has no TensorRT builds")
        raise CUNetError(
            f"target {self.name} cannot build with TensorRT {major}; it supports TensorRT "
            f"{', '.join(self.tensorrt_versions)} (see `cunet-optimize targets`)"
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["tensorrt_versions"] = list(self.tensorrt_versions)
        return data


@dataclass(frozen=True)
class PrecisionSupport:
    """How a target runs a precision: natively, or built as another compute type."""

    target: str
    precision: str
    native: bool
    executed_as: str  # the arithmetic the engine performs: "int8", "fp16", "fp32", "fp8"
    verified: bool
    note: str  # empty when native and verified


# --------------------------------------------------------------------------------------
# The registry

_GPU_PRECISIONS = ("fp32", "fp16", "int8")
_DLA_PRECISIONS = ("fp16", "int8")  # "DLA support is limited to networks running in FP16 and INT8"

_TRT10_DATACENTER = TensorRTRelease(10, "10.0", True, "datacenter Linux x86-64 / SBSA packages")
_TRT11_DATACENTER = TensorRTRelease(
    11, "11.0", True, "strongly typed only: no precision flags, the ONNX carries the types"
)
_TRT10_JETPACK6 = TensorRTRelease(
    10, "10.3", True, "JetPack 6.x ships TensorRT 10.3; DLA is supported up to TensorRT 10.7"
)


def _jetson_notes(extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return (
        "build on the device: tactics are timed on its GPU and engines are not portable "
        "across GPU architectures or TensorRT versions",
    ) + extra


TARGETS: dict[str, TargetSpec] = {}


def _register(spec: TargetSpec) -> None:
    assert spec.backend in BACKENDS and spec.device in DEVICES, spec
    assert set(spec.precisions) <= set(PRECISIONS) and "int4" not in spec.precisions, spec
    assert set(spec.unverified_precisions) <= set(spec.precisions), spec
    assert spec.default_tensorrt_major in (None, *spec.tensorrt_majors), spec
    assert spec.name == spec.name.lower(), spec  # get_target looks names up in lower case
    TARGETS[spec.name] = spec


_register(
    TargetSpec(
        name="cpu",
        description="ONNX Runtime on this machine's CPU (x86-64); the accuracy reference backend",
        backend="onnxruntime",
        device="cpu",
        compute_capability=None,
        dla_cores=0,
        precisions=("fp32", "int8", "bf16"),
        unverified_precisions=(),
        dla_precisions=(),
        workspace_bytes=None,
        batch=(1, 1, 8),
        build_on_device=False,
        tensorrt_releases=(),
        default_tensorrt_major=None,
        notes=(
            "int8 runs Q/DQ graphs; at ORT_ENABLE_EXTENDED+ DQ->Conv->Q becomes QLinearConv "
            "(seen for int8 and uint8 activations on ONNX Runtime 1.32, x86-64)",
            "an ORT_ENABLE_ALL optimised model is tied to the CPU kind and ONNX Runtime version "
            "it was optimised with: rebuild it where it runs",
            "with the `openvino` extra, build also times OpenVINO and keeps the faster runtime that passes "
            "the gate; bf16 runs on OpenVINO only, on CPUs with AVX-512 BF16 or AMX",
        ),
    )
)
_register(
    TargetSpec(
        name="jetson-orin-nano",
        description="Jetson Orin Nano (Ampere GPU, no DLA), JetPack 6",
        backend="tensorrt",
        device="jetson",
        compute_capability=(8, 7),
        dla_cores=0,
        precisions=_GPU_PRECISIONS,
        unverified_precisions=(),
        dla_precisions=(),
        workspace_bytes=1 * GiB,
        batch=(1, 1, 4),
        build_on_device=True,
        tensorrt_releases=(_TRT10_JETPACK6,),
        default_tensorrt_major=10,
        notes=_jetson_notes(
            (
                "TensorRT 11.4.1 names only Jetson AGX Orin and Thor (JetPack 7.2.2+); "
                "Orin Nano stays on TensorRT 10 until NVIDIA says otherwise",
            )
        ),
    )
)
_register(
    TargetSpec(
        name="jetson-orin-nx",
        description="Jetson Orin NX 16GB (Ampere GPU, 2 DLA cores; the 8GB module has 1), JetPack 6",
        backend="tensorrt",
        device="jetson",
        compute_capability=(8, 7),
        dla_cores=2,
        precisions=_GPU_PRECISIONS,
        unverified_precisions=(),
        dla_precisions=_DLA_PRECISIONS,
        workspace_bytes=2 * GiB,
        batch=(1, 2, 8),
        build_on_device=True,
        tensorrt_releases=(_TRT10_JETPACK6,),
        default_tensorrt_major=10,
        notes=_jetson_notes(
            (
                "DLA core count: 2 on Orin NX 16GB, 1 on Orin NX 8GB (use --dla-core 0 there); "
                "from NVIDIA's module specifications, not re-checked in the stored docs",
                "TensorRT 11.4.1 names only Jetson AGX Orin and Thor (JetPack 7.2.2+)",
            )
        ),
    )
)
_register(
    TargetSpec(
        name="jetson-agx-orin",
        description="Jetson AGX Orin (Ampere GPU, 2 DLA cores), JetPack 6 or 7.2.2+",
        backend="tensorrt",
        device="jetson",
        compute_capability=(8, 7),
        dla_cores=2,
        precisions=_GPU_PRECISIONS,
        unverified_precisions=(),
        dla_precisions=_DLA_PRECISIONS,
        workspace_bytes=4 * GiB,
        batch=(1, 4, 16),
        build_on_device=True,
        tensorrt_releases=(
            _TRT10_JETPACK6,
            TensorRTRelease(
                11,
                "11.4.1",
                True,
                "JetPack 7.2.2+ (SBSA package); DLA restored on AGX Orin in 11.4.1 "
                "(absent in 11.0-11.4.0); strongly typed only",
            ),
        ),
        default_tensorrt_major=10,
        notes=_jetson_notes(),
    )
)
_register(
    TargetSpec(
        name="t4",
        description="NVIDIA T4 (Turing, datacenter)",
        backend="tensorrt",
        device="gpu",
        compute_capability=(7, 5),
        dla_cores=0,
        precisions=_GPU_PRECISIONS,
        unverified_precisions=(),
        dla_precisions=(),
        workspace_bytes=2 * GiB,
        batch=(1, 8, 32),
        build_on_device=True,
        tensorrt_releases=(
            _TRT10_DATACENTER,
            TensorRTRelease(
                11, "11.0", False, "Turing support in TensorRT 11 not confirmed in the stored docs"
            ),
        ),
        default_tensorrt_major=10,
        notes=("hardware-compatible (ampere+) engines need Ampere or newer: not available here",),
    )
)
_register(
    TargetSpec(
        name="a100",
        description="NVIDIA A100 (Ampere, datacenter)",
        backend="tensorrt",
        device="gpu",
        compute_capability=(8, 0),
        dla_cores=0,
        precisions=_GPU_PRECISIONS,
        unverified_precisions=(),
        dla_precisions=(),
        workspace_bytes=8 * GiB,
        batch=(1, 16, 64),
        build_on_device=True,
        tensorrt_releases=(_TRT10_DATACENTER, _TRT11_DATACENTER),
        default_tensorrt_major=10,
    )
)
_register(
    TargetSpec(
        name="l4",
        description="NVIDIA L4 (Ada Lovelace, datacenter)",
        backend="tensorrt",
        device="gpu",
        compute_capability=(8, 9),
        dla_cores=0,
        precisions=_GPU_PRECISIONS + ("fp8",),
        unverified_precisions=("fp8",),
        dla_precisions=(),
        workspace_bytes=4 * GiB,
        batch=(1, 8, 32),
        build_on_device=True,
        tensorrt_releases=(_TRT10_DATACENTER, _TRT11_DATACENTER),
        default_tensorrt_major=10,
        notes=("fp8 (E4M3) needs compute capability 8.9+; FP8 convolution speed for CU-Net is unmeasured",),
    )
)
_register(
    TargetSpec(
        name="h100",
        description="NVIDIA H100 (Hopper, datacenter)",
        backend="tensorrt",
        device="gpu",
        compute_capability=(9, 0),
        dla_cores=0,
        precisions=_GPU_PRECISIONS + ("fp8",),
        unverified_precisions=("fp8",),
        dla_precisions=(),
        workspace_bytes=8 * GiB,
        batch=(1, 16, 64),
        build_on_device=True,
        tensorrt_releases=(_TRT10_DATACENTER, _TRT11_DATACENTER),
        default_tensorrt_major=11,
        notes=("fp8 (E4M3) needs compute capability 8.9+; FP8 convolution speed for CU-Net is unmeasured",),
    )
)


def target_names() -> list[str]:
    return list(TARGETS)


def get_target(name: str | TargetSpec) -> TargetSpec:
    """The registered target called `name`, in any letter case (`H100` is h100: a name people
    type; the spec carries the registry's spelling for build names and manifests). A
    TargetSpec passes through; an unknown name is refused with the closest known one."""
    if isinstance(name, TargetSpec):
        return name
    key = str(name).lower()
    spec = TARGETS.get(key)
    if spec is None:
        close = difflib.get_close_matches(key, TARGETS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise CUNetError(
            f"unknown target '{name}'; {hint}known targets: {', '.join(TARGETS)} (see `cunet-optimize targets`)"
        )
    return spec


def check_dla_core(target: str | TargetSpec, dla_core: int | None) -> int | None:
    """`dla_core` if `target` has that DLA core (None: the GPU); CUNetError otherwise."""
    spec = get_target(target)
    if dla_core is None:
        return None
    if spec.dla_cores == 0:
        raise CUNetError(
            f"target {spec.name} has no DLA cores; drop --dla-core or pick jetson-orin-nx / jetson-agx-orin"
        )
    if isinstance(dla_core, bool) or not isinstance(dla_core, int) or not 0 <= dla_core < spec.dla_cores:
        raise CUNetError(
            f"DLA core {dla_core!r} does not exist on {spec.name}; it has cores 0..{spec.dla_cores - 1} "
            "(--dla-core N)"
        )
    return dla_core


def _runs_list(spec: TargetSpec) -> str:
    runs = [p + (" (unverified)" if p in spec.unverified_precisions else "") for p in spec.precisions]
    runs.append("int4 (as int8)" if spec.backend == "onnxruntime" and "int8" in spec.precisions
                else "int4 (weights dequantized)")
    return ", ".join(runs)


def check_precision(target: str | TargetSpec, precision: str, *, on_dla: bool = False) -> PrecisionSupport:
    """How `target` runs `precision` (on its DLA with on_dla=True); CUNetError if it cannot.

    int4 always passes with native=False: see the module docstring for how each backend runs it.
    """
    spec = get_target(target)
    precision = precision.strip().lower()  # the spelling rule of every precision (quant.policy)
    if precision not in PRECISIONS:
        raise CUNetError(f"unknown precision '{precision}' for an engine; engines build as {', '.join(PRECISIONS)} "
                         "(a build's --precision spec, auto included, maps onto one: quant.policy.engine_precision)")
    if on_dla and spec.dla_cores == 0:
        raise CUNetError(
            f"target {spec.name} has no DLA cores; drop --dla-core or pick jetson-orin-nx / jetson-agx-orin"
        )
    runs = spec.dla_precisions if on_dla else spec.precisions
    where = f"target {spec.name}" + (" DLA" if on_dla else "")
    float_type = "fp16" if "fp16" in runs else "fp32"
    if precision == "int4" and spec.backend == "onnxruntime" and "int8" in runs:
        # quant.policy.int4_block_for: INT4 here is per output channel, INT8 integers with the same scale
        return PrecisionSupport(
            target=spec.name,
            precision="int4",
            native=False,
            executed_as="int8",
            verified=True,
            note=(
                f"{where}: INT4 weights per output channel run as the INT8 convolutions they equal (the "
                "integer form, BatchNorm folded) and are stored packed; block-wise INT4 (-b<N>) has no "
                "integer form and runs dequantized to fp32"
            ),
        )
    if precision == "int4":
        return PrecisionSupport(
            target=spec.name,
            precision="int4",
            native=False,
            executed_as=float_type,
            verified=True,
            note=(
                f"{where} has no INT4 convolution kernels: INT4 weights are a storage format here, "
                f"built as weights dequantized to {float_type} (INT4-grid values, {float_type} speed, "
                "smaller file only)"
            ),
        )
    if precision not in runs:
        if on_dla:
            its = ", ".join(runs)
        else:
            its = _runs_list(spec)
        raise CUNetError(
            f"{where} cannot run precision {precision}; it runs: {its}"
            + ("" if on_dla else " (see `cunet-optimize targets`)")
        )
    verified = precision not in spec.unverified_precisions
    return PrecisionSupport(
        target=spec.name,
        precision=precision,
        native=True,
        executed_as=precision,
        verified=verified,
        note="" if verified else f"{precision} on {spec.name} is an unverified row of the target registry",
    )
