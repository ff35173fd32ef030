"""Quantization of CU-Net: fake quantizers, the quantized model, calibration, scale files.

Typical post-training flow, quantizing as `build` and `calibrate` do::

    from cunet_optimize.quant import quantize_model, calibrate, save_scales
    from cunet_optimize.quant.policy import quant_scheme
    qmodel = quantize_model(model, quant_scheme("int8"))           # a copy; model untouched
    amax = calibrate(qmodel, batches, method="entropy")            # sets scales = amax / 127
    save_scales("calib/scales.json", activation_scales(qmodel), "entropy")

`quant_scheme` (quant/policy.py) is the commands' rule: a bare int8 puts no Q/DQ on the
dense concatenations (-tied / -untied or its concat_qdq argument ask for them). The lower
level `parse_precision("int8")` is the scheme's own default, scales tied over the
concatenations (quant/scheme.py), which the tests and stored QAT specs rely on.

`post_training_quantize` takes the equalization alpha as given (None: off); the commands use
`quant.policy.equalize_alpha_for` (0.5 for INT8 weights). `cunet_optimize.quantize` (api.py)
does all of it as `build` does, on any model and DataLoader.

QAT: train `qmodel` as any nn.Module (STE gradients; `freeze_bn(qmodel)`; learnable
scales with the "-lsq" spec modifier) and save it with `cunet_optimize.save_quantized`
(quant/qat.py `save_qat_checkpoint`): the file `build --qat` reads.
"""

from cunet_optimize.quant.calibrate import (
    METHODS,
    CalibrationError,
    HistogramObserver,
    MaxObserver,
    ScaleFile,
    activation_scales,
    apply_scales,
    calibrate,
    calibrate_weights,
    entropy_amax,
    load_scales,
    mse_amax,
    percentile_amax,
    post_training_quantize,
    save_scales,
    tie_amax,
)
from cunet_optimize.quant.concat_tying import ConcatPlan, DataflowTrace, plan_concat_tying, trace_dataflow
from cunet_optimize.quant.legacy_cache import (
    LegacyCache,
    LegacyCacheError,
    format_legacy_cache,
    parse_legacy_cache,
    read_legacy_cache,
    write_legacy_cache,
)
from cunet_optimize.quant.qmodel import (
    ConcatQuantizer,
    QuantAdapter,
    QuantConv2d,
    QuantCUNet,
    QuantDenseLayer,
    QuantMaxPool2d,
    activation_quantizers,
    concat_quantizers,
    float_state_dict,
    freeze_bn,
    load_quant_state,
    named_quantizers,
    quant_state_dict,
    quantize_model,
    quantizer_parameters,
    refresh_dynamic_weight_scales,
    requantization_points,
    set_learnable_scales,
    set_quantizers_enabled,
    tied_groups,
)
from cunet_optimize.quant.quantizers import (
    BinaryWeightQuantizer,
    BlockQuantizer,
    FixedPointInputQuantizer,
    FixedPointWeightQuantizer,
    GradientQuantizer,
    IntQuantizer,
    Quantizer,
    QuantizerError,
    TernaryWeightQuantizer,
    quantize_gradient,
)
from cunet_optimize.quant.scheme import QuantScheme, QuantSpecError, parse_precision

__all__ = [
    "activation_quantizers",
    "activation_scales",
    "apply_scales",
    "BinaryWeightQuantizer",
    "BlockQuantizer",
    "calibrate",
    "calibrate_weights",
    "CalibrationError",
    "concat_quantizers",
    "ConcatPlan",
    "ConcatQuantizer",
    "DataflowTrace",
    "entropy_amax",
    "FixedPointInputQuantizer",
    "FixedPointWeightQuantizer",
    "float_state_dict",
    "format_legacy_cache",
    "freeze_bn",
    "GradientQuantizer",
    "HistogramObserver",
    "IntQuantizer",
    "LegacyCache",
    "LegacyCacheError",
    "load_quant_state",
    "load_scales",
    "MaxObserver",
    "METHODS",
    "mse_amax",
    "named_quantizers",
    "parse_legacy_cache",
    "parse_precision",
    "percentile_amax",
    "plan_concat_tying",
    "post_training_quantize",
    "quant_state_dict",
    "QuantAdapter",
    "QuantConv2d",
    "QuantCUNet",
    "QuantDenseLayer",
    "quantize_gradient",
    "quantize_model",
    "Quantizer",
    "quantizer_parameters",
    "QuantizerError",
    "QuantMaxPool2d",
    "QuantScheme",
    "QuantSpecError",
    "read_legacy_cache",
    "refresh_dynamic_weight_scales",
    "requantization_points",
    "save_scales",
    "ScaleFile",
    "set_learnable_scales",
    "set_quantizers_enabled",
    "TernaryWeightQuantizer",
    "tie_amax",
    "tied_groups",
    "trace_dataflow",
    "write_legacy_cache",
]
