"""Hand-made ONNX graphs for the surgery and lint tests (builders only, no tests here).

Small on purpose: a few nodes on 8x8 maps, every Q/DQ parameter explicit, so that each
test can break exactly one rule or exercise exactly one rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INT8 = TensorProto.INT8
FLOAT = TensorProto.FLOAT


class GraphBuilder:
    """A tiny DSL over onnx.helper: inputs, constants, nodes, outputs -> ModelProto."""

    def __init__(self, opset: int = 17, seed: int = 0):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def input(self, name: str, shape, elem_type: int = FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def const(self, values, name: str | None = None, onnx_type: int | None = None) -> str:
        self.count += 1
        name = name or f"c{self.count}"
        values = np.asarray(values)
        if onnx_type in (TensorProto.INT4, TensorProto.UINT4):
            self.inits.append(helper.make_tensor(name, onnx_type, list(values.shape), values.astype(np.int32).ravel().tolist()))
        else:
            self.inits.append(numpy_helper.from_array(values, name))
        return name

    def node(self, op: str, inputs, name: str | None = None, n_out: int = 1, **attrs) -> str:
        self.count += 1
        name = name or f"{op}_{self.count}"
        outs = [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0]

    def output(self, tensor: str, elem_type: int = FLOAT) -> None:
        self.outputs.append(helper.make_tensor_value_info(tensor, elem_type, None))

    def model(self) -> onnx.ModelProto:
        opsets = [helper.make_opsetid("", self.opset)]
        # Output shapes from inference (the checker wants them): read them off a probe graph
        # in which every output feeds an Identity, so it shows up in value_info.
        probe_outputs = [helper.make_tensor_value_info(o.name + "__probe", o.type.tensor_type.elem_type, None)
                         for o in self.outputs]
        probes = [helper.make_node("Identity", [o.name], [o.name + "__probe"]) for o in self.outputs]
        probe = helper.make_model(helper.make_graph(self.nodes + probes, "probe", self.inputs, probe_outputs, self.inits),
                                  opset_imports=opsets)
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(probe).graph.value_info}
        outputs = [inferred.get(o.name, o) for o in self.outputs]
        model = helper.make_model(helper.make_graph(self.nodes, "test", self.inputs, outputs, self.inits), opset_imports=opsets)
        model.ir_version = 10 if self.opset >= 21 else 8
        return model

    # -------- common pieces

    def qdq(self, x: str, scale: float, zero_point: int = 0, zp_type=np.int8, name: str | None = None) -> str:
        s = self.const(np.float32(scale))
        z = self.const(np.array(zero_point, dtype=zp_type))
        q = self.node("QuantizeLinear", [x, s, z], name=f"{name}_q" if name else None)
        return self.node("DequantizeLinear", [q, s, z], name=f"{name}_dq" if name else None)

    def bn(self, x: str, channels: int, name: str | None = None) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, channels), r.normal(0, 0.2, channels), r.normal(0, 0.2, channels), r.uniform(0.5, 2, channels)]
        return self.node("BatchNormalization", [x, *[self.const(p.astype(np.float32)) for p in params]], name=name, epsilon=1e-5)

    def weight(self, shape, form: str = "float", axis: int = 0, qmin: int = -127) -> str:
        """Conv weight: 'float', 'dq' (int8 initializer -> per-channel DQ), 'qdq' (float -> Q -> DQ)."""
        w = self.rng.normal(0, 0.3, shape).astype(np.float32)
        if form == "float":
            return self.const(w)
        reduce = tuple(i for i in range(len(shape)) if i != axis)
        scale = (np.abs(w).max(axis=reduce) / 127).astype(np.float32)
        zp = np.zeros(scale.shape, dtype=np.int8)
        s, z = self.const(scale), self.const(zp)
        view = [1] * len(shape)
        view[axis] = -1
        if form == "dq":
            ints = np.clip(np.rint(w / scale.reshape(view)), qmin, 127).astype(np.int8)
            return self.node("DequantizeLinear", [self.const(ints), s, z], axis=axis)
        q = self.node("QuantizeLinear", [self.const(w), s, z], axis=axis)
        return self.node("DequantizeLinear", [q, s, z], axis=axis)


def dense_concat_model(*, widths=(4, 3), consumers: int = 2, quantized: bool = False, weight_form: str = "float",
                       out_channels: int = 5, extra_consumer: bool = False, opset: int = 17) -> onnx.ModelProto:
    """Concat(x_1..x_n) feeding `consumers` BN -> ReLU -> [Q -> DQ ->] Conv1x1 chains (CU-Net's
    dense layer: the ahead and skip adapters share one concat)."""
    g = GraphBuilder(opset)
    xs = [g.input(f"x{i}", [1, c, 8, 8]) for i, c in enumerate(widths)]
    cat = g.node("Concat", xs, name="concat", axis=1)
    total = sum(widths)
    for k in range(consumers):
        act = g.node("Relu", [g.bn(cat, total, name=f"bn{k}")], name=f"relu{k}")
        if quantized:
            act = g.qdq(act, 0.05, name=f"act{k}")
        w = g.weight([out_channels, total, 1, 1], weight_form)
        g.output(g.node("Conv", [act, w], name=f"conv{k}"))
    if extra_consumer:
        g.output(g.node("Sigmoid", [cat], name="other_reader"))
    return g.model()


def clean_int8_model() -> onnx.ModelProto:
    """A TensorRT-clean INT8 graph: symmetric int8, weights per channel on axis 0 in
    [-127, 127], activations per tensor, one scale around Concat, MaxPool and Resize."""
    g = GraphBuilder(17)
    x = g.qdq(g.input("image", ["batch", 3, 16, 16]), 0.02)
    a = g.node("Relu", [g.node("Conv", [x, g.weight([8, 3, 3, 3], "dq")], pads=[1, 1, 1, 1])])
    a = g.qdq(a, 0.1)
    p = g.qdq(g.node("MaxPool", [a], kernel_shape=[2, 2], strides=[2, 2]), 0.1)
    b = g.qdq(g.node("Relu", [g.node("Conv", [p, g.weight([8, 8, 1, 1], "qdq")])]), 0.1)
    cat = g.qdq(g.node("Concat", [p, b], axis=1), 0.1)
    up = g.node("Resize", [cat, "", g.const(np.array([1, 1, 2, 2], dtype=np.float32))], mode="nearest")
    up = g.qdq(up, 0.1)
    g.output(g.node("Conv", [up, g.weight([4, 16, 1, 1], "dq")]))
    return g.model()
