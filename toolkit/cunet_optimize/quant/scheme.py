"""What a quantized CU-Net quantizes: the `QuantScheme` dataclass and its compact spec.

Two families share one dataclass:

- TensorRT forms (`int8`, `int4`): symmetric integers, zero point 0, weights per
  output channel (or per block for INT4), activations per tensor, fake-quantized at
  the inputs of every convolution (TensorRT's placement), plus optional shared
  scales over each dense concatenation (`tie_concat_scales`).
- The paper's forms (`w<k>a<m>g<n>`, Tang et al. ECCV 2018): binary, ternary or
  k-bit fixed-point weights, k-bit unsigned fixed-point inputs of the 3x3 convs and
  of the heads, and k-bit weight gradients. Stem and last head stay float.

Spec grammar (case-insensitive, surrounding blanks ignored; modifiers joined by '-', in any
order)::

    fp32 | float                      no quantization (a baseline with the same module tree)
    int8[-tied|-untied|-convin][-lsq][-g<n>]
                                      W8A8, concat scales tied unless -untied;
                                      -convin: Q/DQ at conv inputs only, none on concats
    int4[-b<N>|-pc][-wo][-tied|-untied|-convin][-lsq][-g<n>]
                                      W4 (blocks of N input channels, default 32; -pc: per
                                      output channel) with INT8 activations, or float
                                      activations with -wo (weight-only, W4A16)
    w<k>[a<m>][g<n>]                  the paper: k=1 binary, k=2 ternary, k>=3 fixed point;
                                      a<m>: m-bit inputs (omitted: float); g<n>: n-bit gradients

`parse_precision(spec).spec` gives the canonical spelling, and parsing it back
gives an equal scheme. The default concat placement here (tied, as the scheme's own
fields say) is not the commands' (none): `quant.policy.quant_scheme` applies the
commands' rule and `quant.policy.canonical_precision` the commands' spelling (fp16 and
auto are build precisions, not schemes). GRAMMAR is the one-line summary every refusal
quotes.

Edge layers. TensorRT forms quantize the stem too (its input is the image in
[0, 1]: INT8 with a calibrated scale near 1/127; its 3x147 weights per channel) and
the last head (INT8 on TensorRT costs less than an FP16 island and a reformat at
the output). int4 keeps the stem and last-head weights at INT8 (`edge_weight_bits`):
they are a tiny share of the weights and the most sensitive ones. The paper's modes
leave both in float, as the paper does.

What runs where (docs/QUANT_RULES.md): int8 is TensorRT's explicit-quantization form.
int4 per channel (-pc) with INT8 activations is exactly representable as INT8
per-channel weights ([-7, 7] inside [-127, 127], same scale), so TensorRT can run it
as INT8; block-wise INT4 is a storage format (dequantized for execution), and
TensorRT's documented INT4 path is weight-only (-wo, W4A16) on MatMul/Gemm.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace

from cunet_optimize.errors import CUNetError

# Weight kinds
FLOAT = "float"
INT = "int"  # symmetric integer with calibrated scales (TensorRT form)
BINARY = "binary"  # alpha * sign(w), alpha = mean |w| per output filter
TERNARY = "ternary"  # alpha * {-1, 0, +1}, threshold 0.7 * mean |w| per output filter
FIXED = "fixed"  # the paper's k-bit fixed point: round(clip(w) * S) / S, S = 2^(k-1)

WEIGHT_KINDS = (FLOAT, INT, BINARY, TERNARY, FIXED)
ACTIVATION_KINDS = (FLOAT, INT, FIXED)
GRANULARITIES = ("per_channel", "block")

# INT4 blocks run along the input-channel axis of the weight (axis 1), one scale per
# (output channel, block of input channels, kernel position): the ONNX opset-21
# blocked DequantizeLinear layout. 32 input channels per scale is the usual size for
# INT4; a 1x1 conv with <= 32 input channels gets one block, i.e. per-channel INT4.
DEFAULT_INT4_BLOCK = 32


class QuantSpecError(CUNetError):
    """A precision spec that cannot be parsed or describes an impossible scheme."""


@dataclass(frozen=True)
class QuantScheme:
    """Every decision that `quantize_model` takes from the precision spec."""

    weight: str = FLOAT  # one of WEIGHT_KINDS
    weight_bits: int = 32
    weight_granularity: str = "per_channel"  # INT weights: "per_channel" | "block"
    block_size: int | None = None  # input channels per INT4 block (granularity "block")
    activation: str = FLOAT  # one of ACTIVATION_KINDS
    activation_bits: int = 32
    gradient_bits: int | None = None  # quantize weight gradients in backward
    tie_concat_scales: bool = False  # one shared scale per dense-concatenation group
    # Q/DQ on the dense concatenations (pre-BN tensors) at all. False = TensorRT's
    # basic placement, quantized conv inputs only: far more accurate after PTQ on CU-Net
    # (embedded model, percentile: NME 5.36% vs 5.90% untied and 6.37% tied, FP32 5.29%;
    # bench/results/quant_table_ptq_percentile.json), since BN rescales each channel of the
    # concatenation and so amplifies the per-tensor quantization error of small-variance channels.
    quantize_concats: bool = True
    quantize_stem: bool = True  # features.conv0
    quantize_last_head: bool = True  # the head of the last supervised U-Net
    # Integer bits of the stem and last-head weights when the body uses fewer
    # (int4 keeps both at INT8: they are tiny and closest to the input/output).
    edge_weight_bits: int | None = None
    learnable_scales: bool = False  # LSQ: scales are trained with the weights

    def __post_init__(self) -> None:
        self.validate()

    # -- derived facts -------------------------------------------------------------

    @property
    def is_float(self) -> bool:
        return self.weight == FLOAT and self.activation == FLOAT and self.gradient_bits is None

    @property
    def is_paper(self) -> bool:
        """The paper's placement: inputs of 3x3 convs and heads, stem/last head float."""
        return self.weight in (BINARY, TERNARY, FIXED) or self.activation == FIXED

    @property
    def spec(self) -> str:
        """Canonical spec string; `parse_precision(s.spec) == s`."""
        if self.is_float:
            return "fp32"
        if self.is_paper:
            text = f"w{self.weight_bits}" if self.weight != FLOAT else "w32"
            if self.activation == FIXED:
                text += f"a{self.activation_bits}"
            if self.gradient_bits is not None:
                text += f"g{self.gradient_bits}"
            return text
        parts = [f"int{self.weight_bits}"]
        if self.weight_bits == 4:
            if self.weight_granularity == "per_channel":
                parts.append("pc")
            elif self.block_size != DEFAULT_INT4_BLOCK:
                parts.append(f"b{self.block_size}")
            if self.activation == FLOAT:
                parts.append("wo")
        if self.activation == INT and not self.quantize_concats:
            parts.append("convin")
        elif self.activation == INT and not self.tie_concat_scales:
            parts.append("untied")
        if self.learnable_scales:
            parts.append("lsq")
        if self.gradient_bits is not None:
            parts.append(f"g{self.gradient_bits}")
        return "-".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantScheme":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QuantSpecError(f"quant scheme: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def validate(self) -> None:
        if self.weight not in WEIGHT_KINDS:
            raise QuantSpecError(f"quant scheme: weight kind '{self.weight}' not in {WEIGHT_KINDS}")
        if self.activation not in ACTIVATION_KINDS:
            raise QuantSpecError(
                f"quant scheme: activation kind '{self.activation}' not in {ACTIVATION_KINDS}"
            )
        if self.weight_granularity not in GRANULARITIES:
            raise QuantSpecError(
                f"quant scheme: weight granularity '{self.weight_granularity}' not in {GRANULARITIES}"
            )
        if self.weight == INT and self.weight_bits not in (4, 8):
            raise QuantSpecError(f"quant scheme: integer weights are 4 or 8 bits, got {self.weight_bits}")
        if self.weight == BINARY and self.weight_bits != 1 or self.weight == TERNARY and self.weight_bits != 2:
            raise QuantSpecError(f"quant scheme: {self.weight} weights need weight_bits 1/2 accordingly")
        if self.weight == FIXED and not 3 <= self.weight_bits <= 16:
            raise QuantSpecError(f"quant scheme: fixed-point weights need 3..16 bits, got {self.weight_bits}")
        if self.activation == INT and self.activation_bits != 8:
            raise QuantSpecError("quant scheme: integer activations are INT8 (TensorRT's only form)")
        if self.activation == FIXED and not 1 <= self.activation_bits <= 16:
            raise QuantSpecError(f"quant scheme: fixed-point inputs need 1..16 bits, got {self.activation_bits}")
        if self.gradient_bits is not None and not 2 <= self.gradient_bits <= 16:
            raise QuantSpecError(f"quant scheme: gradient bits must be 2..16, got {self.gradient_bits}")
        if self.weight_granularity == "block":
            if self.weight != INT or self.block_size is None or self.block_size < 1:
                raise QuantSpecError("quant scheme: block granularity needs integer weights and block_size >= 1")
        elif self.block_size is not None:
            raise QuantSpecError("quant scheme: block_size is only for weight_granularity 'block'")
        if self.tie_concat_scales and self.activation != INT:
            raise QuantSpecError(
                "quant scheme: tie_concat_scales needs integer activations (it ties their scales); "
                "drop -tied or use int8/int4"
            )
        if self.learnable_scales and INT not in (self.weight, self.activation):
            raise QuantSpecError("quant scheme: learnable scales need integer weights or activations")
        if self.edge_weight_bits is not None and self.edge_weight_bits not in (4, 8):
            raise QuantSpecError(f"quant scheme: edge_weight_bits must be 4 or 8, got {self.edge_weight_bits}")
        mixed = (self.weight in (BINARY, TERNARY, FIXED) and self.activation == INT) or (
            self.weight == INT and self.activation == FIXED
        )
        if mixed:
            raise QuantSpecError("quant scheme: paper weight kinds and TensorRT activations do not mix")


# Every command's precisions in one line, the one every refusal quotes: the specs of this module
# plus fp16 and auto, build precisions that are not schemes (quant/policy.py canonical_precision).
GRAMMAR = ("fp32, fp16 (build, export), int8[-convin|-tied|-untied], int4[-b<N>|-pc][-wo], the paper's "
           "w<k>[a<m>][g<n>] (e.g. w1a8, w2a8g8), auto (build; qat --plan)")

_PAPER = re.compile(r"^w(\d+)(?:a(\d+))?(?:g(\d+))?$")


def parse_precision(spec: str, **overrides) -> QuantScheme:
    """Parse a precision spec (see the module docstring); `overrides` replace fields."""
    text = spec.strip().lower()
    if not text:
        raise QuantSpecError(f"empty precision; use one of {GRAMMAR}")
    if text in ("fp32", "float", "float32"):
        scheme = QuantScheme()
    elif m := _PAPER.match(text):
        scheme = _parse_paper(text, *m.groups())
    elif text.startswith("int"):
        scheme = _parse_int(text)
    else:
        raise QuantSpecError(f"unknown precision '{spec}'; use one of {GRAMMAR}")
    if overrides:
        try:
            scheme = replace(scheme, **overrides)
        except TypeError as e:
            raise QuantSpecError(f"precision '{spec}': bad override ({e})") from None
    return scheme


def _parse_paper(text: str, w: str, a: str | None, g: str | None) -> QuantScheme:
    wb = int(w)
    if wb >= 32:
        weight = FLOAT
    elif wb == 1:
        weight = BINARY
    elif wb == 2:
        weight = TERNARY
    else:
        weight = FIXED
    ab = int(a) if a is not None else 32
    return QuantScheme(
        weight=weight,
        weight_bits=wb if weight != FLOAT else 32,
        activation=FIXED if ab < 32 else FLOAT,
        activation_bits=ab,
        gradient_bits=int(g) if g is not None else None,
        quantize_stem=False,
        quantize_last_head=False,
    )


def _parse_int(text: str) -> QuantScheme:
    base, *mods = text.split("-")
    if base not in ("int8", "int4"):
        raise QuantSpecError(f"precision '{text}': integer weights are int8 or int4, not '{base}'; "
                             f"use one of {GRAMMAR}")
    bits = int(base[3:])
    fields_: dict = dict(
        weight=INT,
        weight_bits=bits,
        activation=INT,
        activation_bits=8,
        tie_concat_scales=True,
    )
    if bits == 4:
        fields_.update(weight_granularity="block", block_size=DEFAULT_INT4_BLOCK, edge_weight_bits=8)
    for mod in mods:
        if mod == "untied":
            fields_["tie_concat_scales"] = False
        elif mod == "tied":
            fields_["tie_concat_scales"] = True
        elif mod == "convin":
            fields_.update(quantize_concats=False, tie_concat_scales=False)
        elif mod == "lsq":
            fields_["learnable_scales"] = True
        elif re.fullmatch(r"g\d+", mod):
            fields_["gradient_bits"] = int(mod[1:])
        elif bits == 4 and mod == "pc":
            fields_.update(weight_granularity="per_channel", block_size=None)
        elif bits == 4 and re.fullmatch(r"b\d+", mod):
            fields_.update(weight_granularity="block", block_size=int(mod[1:]))
        elif bits == 4 and mod in ("wo", "a16"):
            fields_.update(activation=FLOAT, activation_bits=32, tie_concat_scales=False)
        else:
            raise QuantSpecError(
                f"precision '{text}': unknown modifier '{mod}'; int8 takes -convin -tied -untied -lsq -g<n>, "
                "int4 also -b<N> -pc -wo"
            )
    if fields_["activation"] == FLOAT:
        fields_["tie_concat_scales"] = False
    return QuantScheme(**fields_)
