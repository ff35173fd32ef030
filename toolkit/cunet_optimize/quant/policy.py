"""Which quantization a build, `calibrate` and `qat` apply: the one rule each for INT8 Q/DQ
placement on the dense concatenations, activation equalization, and the precision the
exported graph and the engine take.

`build`, `calibrate` and `qat` all ask `quant_scheme` (so a QAT checkpoint matches the
build that exports it); quant/scheme.py parses the spec, this module decides what a
command's options make of it. Every command reads its --precision through
`precision_argument` (one spelling: `canonical_precision`), and every decision below
reads the parsed scheme, never the spelling. The decisions are pure functions of the
options; `opts` below is anything with the `BuildOptions` fields they read (precision,
layer_formats, trt_major, dla_core, qat_checkpoint).
"""

from __future__ import annotations

import argparse
import re

from cunet_optimize.errors import CUNetError
from cunet_optimize.quant.scheme import DEFAULT_INT4_BLOCK, GRAMMAR, INT, QuantSpecError, parse_precision

# Build precisions that are not quantization schemes (quant/scheme.py): the float model in
# float16 or computed in bfloat16 (the CPU's bf16 path: engines/openvino.py), and a per-conv plan
# (quant/auto.py). Commands other than build take a subset.
FP16, BF16, AUTO = "fp16", "bf16", "auto"
BUILD_WORDS = (FP16, BF16, AUTO)
FLOAT_WORDS = (FP16, BF16)  # float builds whose engine computes in a 16-bit float
# Engine precisions a target may run (targets.py PRECISIONS) that no build produces yet.
NOT_BUILT = ("fp8",)
_FP32_ALIASES = ("float", "float32")


def precision_spelling(text: str) -> str:
    """The one spelling of a precision: stripped and lower case (`INT8`, ` int8 `, `Int8-Tied`
    are int8 / int8-tied; build names and build.json carry it), fp32's aliases as fp32."""
    word = str(text).strip().lower()
    return "fp32" if word in _FP32_ALIASES else word


def canonical_precision(text: str, words: tuple[str, ...] = BUILD_WORDS) -> str:
    """`text` in its one spelling (precision_spelling), checked against the grammar: a scheme of
    quant/scheme.py, or one of `words`, the build precisions the command takes (fp16, auto).
    Anything else is a QuantSpecError, one line listing the grammar."""
    word = precision_spelling(text)
    if word in words:
        return word
    if word in NOT_BUILT:
        raise QuantSpecError(f"precision '{word}' is a target capability (`cunet-optimize targets`) that no build "
                             f"produces yet; use one of {GRAMMAR}")
    if word in BUILD_WORDS:
        raise QuantSpecError(f"precision '{word}' is a build precision, not a quantization scheme this command "
                             f"applies; use one of {GRAMMAR}")
    parse_precision(word)  # a spec, or the grammar's one-line refusal
    return word


def precision_argument(words: tuple[str, ...] = BUILD_WORDS, *, schemes: bool = True):
    """canonical_precision as an argparse `type=`: the refusal is the command's one error line
    at parse time, before any work. schemes=False: the spelling only, for a command whose
    `choices` name the few precisions it takes (export: fp32, fp16)."""
    def precision(text: str) -> str:
        if not schemes:
            return precision_spelling(text)
        try:
            return canonical_precision(text, words)
        except QuantSpecError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return precision

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


# INT4 on ONNX Runtime's CPU is per output channel: those integers are INT8 integers with the
# same scale, so the integer path (surgery/integer_dataflow.py) runs them exactly as INT8 convs,
# BatchNorm folded; block-wise INT4 has several scales per output channel and only runs
# dequantized to float (3.6x slower than INT8 for an auto plan, issue 24). On TensorRT INT4 stays
# in blocks of DEFAULT_INT4_BLOCK (weight-only, dequantized to FP16 either way).
INT4_PER_CHANNEL_BACKENDS = ("onnxruntime",)


def int4_block_for(backend: str) -> int | None:
    """Input channels per INT4 weight scale on `backend` (None: one scale per output channel)
    for the INT4 convs of auto plans and an `int4` spec that names no block size."""
    return None if backend in INT4_PER_CHANNEL_BACKENDS else DEFAULT_INT4_BLOCK


def _names_block(precision: str) -> bool:
    return any(re.fullmatch(r"b\d+|pc", m) for m in precision.strip().lower().split("-")[1:])


def quant_scheme(precision: str, concat_qdq: str | None = None, backend: str = "onnxruntime"):
    """The QuantScheme of `precision` with INT activations placed per concat_placement(precision,
    concat_qdq): what build, calibrate and qat quantize (one rule, so a QAT checkpoint matches a
    build). On TensorRT, INT4 weights are built dequantized to FP16 (targets.py: no INT4
    convolution kernels), so INT4 schemes there are weight-only: activations stay float, as the
    engine computes them; asking for Q/DQ on the concatenations of such a scheme is an error."""
    placement = concat_placement(precision, concat_qdq)
    scheme = parse_precision(precision)
    if (scheme.weight == "int" and scheme.weight_bits == 4 and scheme.activation == "int"
            and int4_block_for(backend) is None and not _names_block(precision)):
        precision, scheme = f"{precision}-pc", parse_precision(f"{precision}-pc")  # int4_block_for
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
    """The precision the engine is built as (targets.py check_precision), from the parsed
    scheme, not its spelling: INT8 weights build as int8 whatever the placement or training
    modifiers (int8-tied, -untied, -convin, -lsq); INT4 weights as int4 (a storage format on
    every target); float schemes as fp32; the paper's binary, ternary and fixed-point modes as
    fp32 (PAPER_ENGINE_NOTE); `auto` plans as int4 when any conv stores INT4 weights (opset 21,
    packed), else as int8."""
    if opts.precision == AUTO:
        formats = set((opts.layer_formats or {}).values())
        return "int4" if "int4" in formats else "int8"
    if opts.precision in FLOAT_WORDS:
        return opts.precision
    scheme = parse_precision(opts.precision)
    return f"int{scheme.weight_bits}" if scheme.weight == INT else "fp32"


# What a build of the paper's modes deploys (build.json notes): their quantizers are plain ops,
# not Q/DQ (exporters/dynamo.py unsupported), so the exported graph is a float graph whose weights
# hold the binary / ternary / k-bit values and whose fixed-point inputs are Clip/Round ops.
PAPER_ENGINE_NOTE = ("the paper's {spec}: a float graph whose weights hold their {grid} values and whose "
                     "fixed-point inputs are float ops (Clip, Round), computed in FP32; no engine has binary or "
                     "ternary kernels, so this is an accuracy format, not a faster or smaller one")


def base_precision(opts) -> str:
    """The scheme a build quantizes with (`auto` plans override convs of an int8 scheme)."""
    return "int8" if opts.precision == AUTO else opts.precision


def quantizes(precision: str) -> bool:
    """Whether a build of `precision` quantizes at all (calibration or a QAT checkpoint): not
    fp16, bf16 nor a float scheme (fp32)."""
    return precision == AUTO or precision not in FLOAT_WORDS and not parse_precision(precision).is_float


def exports_qdq(precision: str) -> bool:
    """Whether a build's exported graph holds Q/DQ, so the passes for quantized graphs apply
    (surgery/pipeline.py default_passes): it quantizes and is not one of the paper's modes, whose
    quantizers export as plain float ops (PAPER_ENGINE_NOTE)."""
    return quantizes(precision) and (precision == AUTO or not parse_precision(precision).is_paper)


def check_precision_options(opts) -> None:
    """What a build's precision options contradict by themselves, whatever the target: a
    placement modifier against --concat-qdq, --concat-qdq on a precision without INT8
    activations, PTQ of the paper's modes (trained, not calibrated). BuildOptions checks them
    when it is made, so the command line is refused before any work."""
    if not quantizes(opts.precision):
        if opts.concat_qdq not in (None, "none"):
            raise CUNetError(f"precision {opts.precision} has no INT8 activations, so there is no Q/DQ to place "
                             f"{PLACEMENT_WORDS[opts.concat_qdq]}; drop --concat-qdq")
        return
    concat_placement(base_precision(opts), opts.concat_qdq)
    if opts.precision != AUTO and parse_precision(opts.precision).is_paper and not opts.qat_checkpoint:
        raise CUNetError(f"--precision {opts.precision} is one of the paper's binary/ternary/k-bit modes, which are "
                         f"trained, not calibrated: run `cunet-optimize qat --precision {opts.precision}` first, "
                         f"then build --precision {opts.precision} --qat RUN/best.safetensors")


def check_placement_request(opts, backend: str) -> None:
    """A build's quantization requests that the target's backend cannot meet stop here, before
    any work (e.g. Q/DQ placed on INT4, which is weight-only on TensorRT), after the checks of
    check_precision_options."""
    check_precision_options(opts)
    if quantizes(opts.precision):
        quant_scheme(base_precision(opts), opts.concat_qdq, backend)


def precision_notes(opts) -> list[str]:
    """What build.json's notes say about how the precision is deployed (beyond the target's
    check_precision note): the paper's modes are float graphs (PAPER_ENGINE_NOTE)."""
    if opts.precision in (AUTO, *FLOAT_WORDS):
        return []
    scheme = parse_precision(opts.precision)
    if not scheme.is_paper:
        return []
    grid = {"binary": "binary", "ternary": "ternary", "fixed": f"{scheme.weight_bits}-bit fixed-point"}
    return [PAPER_ENGINE_NOTE.format(spec=scheme.spec, grid=grid.get(scheme.weight, "float"))]


def _deployed_form(scheme) -> tuple:
    """What a scheme computes at inference (gradient bits and scale training do not matter)."""
    return scheme.weight, scheme.weight_bits, scheme.activation, scheme.activation_bits


def _per_channel_int4(qmodel) -> bool:
    """Whether `qmodel`'s INT4 convs (its scheme's, or its auto plan's) have one scale per output channel."""
    if "int4" in getattr(qmodel, "layer_formats", {}).values():
        return getattr(qmodel, "int4_block", DEFAULT_INT4_BLOCK) is None
    s = qmodel.scheme
    return s.weight == INT and s.weight_bits == 4 and s.weight_granularity == "per_channel"


def check_qat_checkpoint(qmodel, opts, backend: str = "onnxruntime") -> None:
    """A QAT checkpoint (opts.qat_checkpoint, loaded as `qmodel`) is exported with its own scheme,
    concat placement included: a build asking for another weight width (or, for the paper's
    modes, another weight or input form), placement, or an auto plan the checkpoint was not
    fine-tuned from is a CUNetError. So is INT4 fine-tuned per output channel (the CPU's,
    int4_block_for) for a `backend` whose INT4 is block-wise, unless the build names -pc;
    block INT4 on the CPU (plan checkpoints before per-channel INT4) builds, dequantized."""
    if opts.precision == AUTO and not getattr(qmodel, "layer_formats", None):
        raise CUNetError(f"{opts.qat_checkpoint}: QAT checkpoint is {qmodel.scheme.spec}, not an auto plan; "
                         f"build it with --precision {qmodel.scheme.spec}, or run qat --plan BUILD.json")
    if opts.precision != AUTO:
        asked, trained = parse_precision(opts.precision), qmodel.scheme
        paper = asked.is_paper or trained.is_paper
        if (_deployed_form(asked) != _deployed_form(trained)) if paper else asked.weight_bits != trained.weight_bits:
            raise CUNetError(f"{opts.qat_checkpoint}: QAT checkpoint is {trained.spec}, "
                             f"not {opts.precision}; build it with --precision {trained.spec}")
    if (_per_channel_int4(qmodel) and int4_block_for(backend) is not None
            and (opts.precision == AUTO or not _names_block(opts.precision))):
        redo = ("run qat --plan on an auto build for this target" if opts.precision == AUTO
                else f"run qat --precision {opts.precision}-b{DEFAULT_INT4_BLOCK}, or build --precision int4-pc")
        raise CUNetError(f"{opts.qat_checkpoint}: QAT checkpoint fine-tuned INT4 per output channel (the CPU's "
                         f"INT4), but INT4 on {backend} is in blocks of {DEFAULT_INT4_BLOCK} input channels; {redo}")
    wanted = concat_placement(base_precision(opts), opts.concat_qdq)
    if (opts.concat_qdq is not None or wanted != "none") and placement_of(qmodel.scheme) not in (None, wanted):
        raise CUNetError(f"{opts.qat_checkpoint}: QAT checkpoint places INT8 Q/DQ "
                         f"{PLACEMENT_WORDS[placement_of(qmodel.scheme)]}, but the build asks for "
                         f"{PLACEMENT_WORDS[wanted]}; drop --concat-qdq / the modifier, or run qat with it")
