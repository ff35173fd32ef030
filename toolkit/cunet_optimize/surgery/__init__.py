"""Surgery: onnx-graphsurgeon passes over exported CU-Net graphs, memory accounting, and the lint.

Every pass takes a gs.Graph, rewrites it in place and returns a PassReport;
`run_surgery` chains named passes over a model and verifies each in ONNX Runtime.
"""

from cunet_optimize.surgery.batchnorm import cleanup, fold_batchnorm
from cunet_optimize.surgery.dense_concat import flatten_nested_concats, fold_dense_concats
from cunet_optimize.surgery.int4 import dequantize_weights, pack_int4_weights
from cunet_optimize.surgery.lint import Finding, lint_model, lint_target
from cunet_optimize.surgery.memory import activation_memory
from cunet_optimize.surgery.pipeline import PASSES, SurgeryResult, default_passes, run_surgery
from cunet_optimize.surgery.qdq import check_weight_axes, check_zero_points, remove_redundant_qdq, tie_concat_qdq_scales
from cunet_optimize.surgery.report import PassReport

__all__ = [
    "PassReport",
    "activation_memory",
    "cleanup",
    "check_weight_axes",
    "check_zero_points",
    "default_passes",
    "flatten_nested_concats",
    "fold_batchnorm",
    "fold_dense_concats",
    "pack_int4_weights",
    "dequantize_weights",
    "remove_redundant_qdq",
    "tie_concat_qdq_scales",
    "run_surgery",
    "PASSES",
    "SurgeryResult",
    "Finding",
    "lint_model",
    "lint_target",
]
