"""A quantized model's scales under the names of its exported ONNX graph.

- `legacy_cache_scales`: the per-tensor activation scales, keyed by ONNX tensor name, as
  TensorRT's legacy calibration cache is (quant/legacy_cache.py writes them);
- `int4_block_scales`: the block scales of the INT4 convs, keyed by ONNX conv name, as
  surgery's pack_int4_weights takes them (the exporter folds a BlockQuantizer into a float
  initializer on the 4-bit grid, so the scales are not in the graph).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from cunet_optimize.errors import CUNetError


def legacy_cache_scales(model: onnx.ModelProto) -> dict[str, float]:
    """{activation tensor: scale} of the per-tensor QuantizeLinear nodes, named as in the ONNX
    (what TensorRT's legacy calibration cache is keyed by)."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            scale = inits.get(node.input[1])
            if scale is not None and scale.size == 1:
                out[node.input[0]] = float(scale.reshape(()))
    return out


def int4_block_scales(qmodel, model: onnx.ModelProto) -> dict:
    """Conv node name -> (block scales, block size) for every INT4 conv of `qmodel`: block-wise,
    or per output channel written as one block over all input channels (the scale repeated at
    every kernel position), the layout pack_int4_weights stores and integer_dataflow reads as
    per-channel.

    The exporter folds the fake quantization into the weight initializer, so the
    ONNX conv is found by its weight: the fake-quantized weight of the module.
    """
    from onnx import numpy_helper

    from cunet_optimize.quant.quantizers import BlockQuantizer, IntQuantizer

    wanted = []
    with torch.no_grad():
        for module in qmodel.modules():
            q = getattr(module, "weight_quantizer", None)
            if isinstance(q, BlockQuantizer):
                wanted.append((q.quantize(module.weight).numpy(), q.scale.detach().numpy(), q.block_size))
            elif isinstance(q, IntQuantizer) and q.num_bits == 4:
                out_ch, in_ch, *kernel = module.weight.shape
                scale = q.scale.detach().numpy().reshape(out_ch, 1, *([1] * len(kernel)))
                wanted.append((q.quantize(module.weight).numpy(),
                               np.ascontiguousarray(np.broadcast_to(scale, (out_ch, 1, *kernel))), in_ch))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if w is None:
            continue
        for weight, scale, block in wanted:
            if weight.shape == w.shape and np.allclose(weight, w, rtol=0, atol=1e-6 * max(1e-12, np.abs(weight).max())):
                found[node.name] = (scale, block)
                break
    # Convs of heads that are not exported (only the last head is, by default) match nothing.
    if wanted and not found:
        raise CUNetError("INT4 packing: none of the block-quantized convs was found in the exported graph")
    return found
