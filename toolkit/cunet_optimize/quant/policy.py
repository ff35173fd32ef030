"""Which quantization a build, `calibrate` and `qat` apply: the one rule each for INT8 Q/DQ
placement on the dense concatenations, activation equalization, and the precision the
exported graph and the engine take.

`build`, `calibrate` and `qat` all ask `quant_scheme` (so a QAT checkpoint matches the
build that exports it); quant/scheme.py parses the spec, this module decides what a
command's options make of it. The decisions are pure functions of the options; `opts`
below is anything with the `BuildOptions` fields they read (precision, layer_formats,
trt_major, dla_core).
"""

from __future__ import annotations

from cunet_optimize.errors import CUNetError

# Where INT8 Q/DQ sits around CU-Net's dense concatenations (docs/QUANT_RULES.md, design space).
# "none" is the default: the most accurate after PTQ, since BN right after each concatenation
# amplifies the per-tensor error of its small-variance channels (embedded model, percentile,
# equalized: NME 5.36% none, 5.90% untied, 6.37% tied, FP32 5.29%;
# bench/results/quant_table_ptq_percentile.json). "tied" lets TensorRT elide the Concats and is
# meant to be paired with QAT.
CONCAT_QDQ = {
    "none": {"quantize_concats": False, "tie_concat_scales": False},
    "tied": {"quantize_concats": True, "tie_concat_scales": True},
    "untied": {"quantize_concats": True, "tie_concat_scales": False},
}

# The same choice spelt in a precision spec (quant/scheme.py modifiers) -> CONCAT_QDQ key.
PLACEMENT_MODIFIERS = {"tied": "tied", "untied": "untied", "convin": "none"}
PLACEMENT_WORDS = {"none": "on conv inputs only", "tied": "on the concatenations, tied",
                   "untied": "on the concatenations, untied"}


def concat_placement(precision: str, concat_qdq: str | None = None) -> str:
    """The one rule for where INT8 Q/DQ sits on the dense concatenations (a CONCAT_QDQ key).

    The precision's placement modifier (int8-tied, int8-untied, int8-convin) and
    --concat-qdq spell the same choice: either may be given, or both when they agree;
    neither means "none". Contradictory requests are a CUNetError, never a silent override.
    """
    if concat_qdq is not None and concat_qdq not in CONCAT_QDQ:
        raise CUNetError(f"--concat-qdq {concat_qdq}: choose one of {', '.join(sorted(CONCAT_QDQ))}")
    named = {PLACEMENT_MODIFIERS[m] for m in precision.strip().lower().split("-")[1:] if m in PLACEMENT_MODIFIERS}
    if len(named) > 1:
        raise CUNetError(f"precision '{precision}' names two concat placements; keep one of "
                         "-tied, -untied, -convin (or drop them and pass --concat-qdq)")
    from_spec = named.pop() if named else None
    if from_spec is not None and concat_qdq is not None and from_spec != concat_qdq:
        raise CUNetError(f"--precision {precision} puts INT8 Q/DQ {PLACEMENT_WORDS[from_spec]} but --concat-qdq "
                         f"{concat_qdq} asks for {PLACEMENT_WORDS[concat_qdq]}; give only one of them")
    return from_spec or concat_qdq or "none"


def placement_of(scheme) -> str | None:
    """The CONCAT_QDQ key a scheme realises (None without integer activations)."""
    if scheme.activation != "int":
        return None
    return "none" if not scheme.quantize_concats else "tied" if scheme.tie_concat_scales else "untied"


def quant_scheme(precision: str, concat_qdq: str | None = None, backend: str = "onnxruntime"):
    """The QuantScheme of `precision` with INT activations placed per concat_placement(precision,
    concat_qdq): what build, calibrate and qat quantize (one rule, so a QAT checkpoint matches a
    build). On TensorRT, INT4 weights are built dequantized to FP16 (engines/targets.py: no INT4
    convolution kernels), so INT4 schemes there are weight-only: activations stay float, as the
    engine computes them; asking for Q/DQ on the concatenations of such a scheme is an error."""
    from cunet_optimize.quant import parse_precision

    placement = concat_placement(precision, concat_qdq)
    scheme = parse_precision(precision)
    if backend == "tensorrt" and scheme.weight == "int" and scheme.weight_bits == 4 and scheme.activation == "int":
        scheme = parse_precision("-".join(m for m in precision.split("-") if m.lower() not in PLACEMENT_MODIFIERS)
                                 + "-wo")
    if scheme.activation != "int":
        if placement != "none":
            why = " (INT4 on TensorRT is weight-only)" if backend == "tensorrt" and scheme.weight_bits == 4 else ""
            raise CUNetError(f"precision {precision} has no INT8 activations{why}, so there is no Q/DQ to place "
                             f"{PLACEMENT_WORDS[placement]}; drop --concat-qdq / the -{placement} modifier")
        return scheme
    return parse_precision(precision, **CONCAT_QDQ[placement])


# Activation equalization before PTQ (quant/equalize.py), SmoothQuant's alpha, for INT8 weights.
# It moves activation range into the weights, which 8-bit weights absorb and 4-bit weights cannot
# afford, so INT4 builds skip it unless --equalize is given explicitly. Embedded model, percentile
# PTQ, NME without -> with alpha 0.5 (FP32 5.29%): int8 5.53% -> 5.36%, int4-convin 5.72% -> 6.43%,
# int4-pc-convin 5.82% -> 7.62% (bench/results/quant_table_ptq_percentile.json).
DEFAULT_EQUALIZE_ALPHA = 0.5


def equalize_alpha_for(scheme, requested: float | str | None = "default") -> float | None:
    """The equalization alpha a scheme gets: None without INT8 activations; "default" is
    DEFAULT_EQUALIZE_ALPHA for INT8 weights and off for INT4 (see DEFAULT_EQUALIZE_ALPHA)."""
    if scheme.activation != "int" or requested is None:
        return None
    if requested == "default":
        return DEFAULT_EQUALIZE_ALPHA if scheme.weight_bits == 8 else None
    return float(requested)


def engine_precision(opts) -> str:
    """The precision the engine is built as: `auto` plans build as int4 when any conv stores
    INT4 weights (opset 21, packed), else as int8."""
    if opts.precision != "auto":
        return opts.precision
    formats = set((opts.layer_formats or {}).values())
    return "int4" if "int4" in formats else "int8"


def base_precision(opts) -> str:
    """The scheme a build quantizes with (`auto` plans override convs of an int8 scheme)."""
    return "int8" if opts.precision == "auto" else opts.precision


def computes_in_fp16(target, opts) -> bool:
    """Whether the exported graph computes in FP16: asked for, or what a strongly typed
    TensorRT plan takes precision from (e.g. INT4 weights dequantized to FP16 on TensorRT 11)."""
    from cunet_optimize.engines.trt_plan import make_build_plan

    if opts.precision == "fp16":
        return True
    if target.backend != "tensorrt":
        return False
    plan = make_build_plan(target, engine_precision(opts), "model.onnx", trt_major=opts.trt_major, dla_core=opts.dla_core)
    return plan.onnx_form.endswith("fp16-cast")


def quantizes(precision: str) -> bool:
    """Whether a build of `precision` quantizes at all (calibration, Q/DQ): not fp32 or fp16."""
    return precision not in ("fp32", "fp16")


def check_placement_request(opts, backend: str) -> None:
    """Contradictory Q/DQ placement requests of a build (precision modifier vs --concat-qdq, or
    --concat-qdq on a precision without INT8 activations) stop here, before any work."""
    if quantizes(opts.precision):
        quant_scheme(base_precision(opts), opts.concat_qdq, backend)
    elif opts.concat_qdq not in (None, "none"):
        raise CUNetError(f"precision {opts.precision} has no INT8 activations, so there is no Q/DQ to place "
                         f"{PLACEMENT_WORDS[opts.concat_qdq]}; drop --concat-qdq")


def check_qat_checkpoint(qmodel, opts) -> None:
    """A QAT checkpoint (opts.qat_checkpoint, loaded as `qmodel`) is exported with its own scheme,
    concat placement included: a build asking for another weight width, placement, or an auto
    plan the checkpoint was not fine-tuned from is a CUNetError."""
    from cunet_optimize.quant import parse_precision

    if opts.precision == "auto" and not getattr(qmodel, "layer_formats", None):
        raise CUNetError(f"{opts.qat_checkpoint}: QAT checkpoint is {qmodel.scheme.spec}, not an auto plan; "
                         f"build it with --precision {qmodel.scheme.spec}, or run qat --plan BUILD.json")
    if opts.precision != "auto" and qmodel.scheme.weight_bits != parse_precision(opts.precision).weight_bits:
        raise CUNetError(f"{opts.qat_checkpoint}: QAT checkpoint is {qmodel.scheme.spec}, "
                         f"not {opts.precision}")
    wanted = concat_placement(base_precision(opts), opts.concat_qdq)
    if (opts.concat_qdq is not None or wanted != "none") and placement_of(qmodel.scheme) not in (None, wanted):
        raise CUNetError(f"{opts.qat_checkpoint}: QAT checkpoint places INT8 Q/DQ "
                         f"{PLACEMENT_WORDS[placement_of(qmodel.scheme)]}, but the build asks for "
                         f"{PLACEMENT_WORDS[wanted]}; drop --concat-qdq / the modifier, or run qat with it")
