"""Generated graphs of every channel-coupling pattern, for the channel-group and pruning tests
(a helper module: it defines no tests itself).

``build(kind, rng)`` returns a small float32 ONNX model (ir_version 8, opset 17, input "x"
[2, 3, 8, 8], one output) whose channel counts are drawn from ``rng``.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PATTERNS = ("chain", "residual", "inverted", "concat", "split_slice", "se", "flatten_gemm", "option_a", "grouped",
            "reshape", "transpose_matmul")


class _G:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes, self.inits, self.count = [], [], 0

    def w(self, *shape, positive=False) -> str:
        self.count += 1
        name = f"p{self.count}"
        value = self.rng.uniform(0.5, 1.5, shape) if positive else self.rng.normal(0, 0.4, shape)
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def c(self, value, dtype=np.int64) -> str:
        self.count += 1
        name = f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        out = f"t{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 1, group: int = 1, bias=True, stride=1) -> str:
        inputs = [x, self.w(cout, cin // group, k, k)] + ([self.w(cout)] if bias else [])
        return self.op("Conv", inputs, pads=[k // 2] * 4, group=group, strides=[stride, stride])

    def bn(self, x: str, c: int) -> str:
        return self.op("BatchNormalization", [x, self.w(c, positive=True), self.w(c), self.w(c),
                                              self.w(c, positive=True)], epsilon=1e-5)

    def model(self, out: str, out_shape) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [out], ["y"]))
        graph = helper.make_graph(self.nodes, "pattern", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ch(rng, low=2, high=12) -> int:
    return int(rng.integers(low, high + 1))


def build(kind: str, rng: np.random.Generator) -> onnx.ModelProto:
    g = _G(rng)
    c0 = _ch(rng)
    x = g.op("Relu", [g.conv("x", 3, c0, 3)])
    if kind == "chain":
        c1 = _ch(rng)
        h = g.op("HardSwish", [g.bn(g.conv(x, c0, c1, 3, bias=False), c1)])
        h = g.op("Clip", [h, g.c(0.0, np.float32), g.c(6.0, np.float32)])
        h = g.op("HardSigmoid", [h])
        h = g.op("Mul", [h, g.w(1, c1, 1, 1)])
        out = g.conv(h, c1, 4)
    elif kind == "residual":
        h = x
        for _ in range(2):
            mid = _ch(rng)
            branch = g.conv(g.op("Relu", [g.conv(h, c0, mid, 3)]), mid, c0, 3)
            h = g.op("Relu", [g.op("Add", [branch, h])])
        out = g.conv(h, c0, 4)
    elif kind == "inverted":
        e = _ch(rng, 4, 16)
        h = g.op("Clip", [g.conv(x, c0, e), g.c(0.0, np.float32), g.c(6.0, np.float32)])
        h = g.op("Relu", [g.conv(h, e, e, 3, group=e)])
        proj = g.conv(h, e, c0)
        out = g.conv(g.op("Add", [proj, x]), c0, 4)
    elif kind == "concat":
        c1, c2 = _ch(rng), _ch(rng)
        a = g.op("Relu", [g.conv(x, c0, c1)])
        b = g.conv(x, c0, c2, 3)
        cat = g.op("Concat", [a, b, a], axis=1)
        out = g.conv(cat, 2 * c1 + c2, 4)
    elif kind == "split_slice":
        c1, c2 = _ch(rng), _ch(rng)
        y = g.conv(x, c0, c1 + c2)
        p0 = g.op("Split", [y, g.c([c1, c2])], axis=1)
        node = g.nodes[-1]
        node.output[:] = [p0, p0 + "_b"]
        start = int(rng.integers(0, c1 + c2 - 1))
        stop = int(rng.integers(start + 1, c1 + c2 + 1))
        sl = g.op("Slice", [y, g.c([start]), g.c([stop]), g.c([1])])
        m = g.op("Add", [g.conv(p0, c1, 4), g.conv(p0 + "_b", c2, 4)])
        out = g.op("Add", [m, g.conv(sl, stop - start, 4)])
    elif kind == "se":
        sq = _ch(rng, 2, 6)
        f = g.op("HardSwish", [g.conv(x, c0, c0 * 2, 3)])
        pool = g.op("GlobalAveragePool", [f])
        s = g.op("Relu", [g.conv(pool, c0 * 2, sq)])
        gate = g.op("HardSigmoid", [g.conv(s, sq, c0 * 2)], alpha=1 / 6, beta=0.5)
        out = g.conv(g.op("Mul", [f, gate]), c0 * 2, 4)
    elif kind == "flatten_gemm":
        p = g.op("MaxPool", [x], kernel_shape=[4, 4], strides=[4, 4])
        flat = g.op("Flatten", [p], axis=1)
        hidden = _ch(rng)
        z = g.op("Relu", [g.op("Gemm", [flat, g.w(hidden, c0 * 4), g.w(hidden)], transB=1)])
        z = g.op("Reshape", [z, g.c([2, hidden, 1, 1])])
        z = g.op("Reshape", [z, g.c([2, hidden])])
        logits = g.op("Gemm", [z, g.w(hidden, 5), g.w(5)])
        return g.model(logits, [2, 5])
    elif kind == "option_a":
        mid = _ch(rng)
        a = g.conv(g.op("Relu", [g.conv(x, c0, mid, 3, stride=2)]), mid, 2 * c0, 3)
        sl = g.op("Slice", [x, g.c([0, 0]), g.c([8, 8]), g.c([2, 3]), g.c([2, 2])])
        pb, pe = int(rng.integers(0, c0 + 1)), 0
        pe = c0 - pb
        pd = g.op("Pad", [sl, g.c([0, pb, 0, 0, 0, pe, 0, 0])], mode="constant")
        h = g.op("Relu", [g.op("Add", [a, pd])])
        out = g.conv(h, 2 * c0, 4)
        return g.model(out, [2, 4, 4, 4])
    elif kind == "grouped":
        groups = int(rng.integers(2, 4))
        cin, cout = groups * _ch(rng, 1, 4), groups * _ch(rng, 1, 4)
        a = g.op("Relu", [g.conv(x, c0, cin)])
        h = g.op("Relu", [g.conv(a, cin, cout, 3, group=groups)])
        out = g.conv(h, cout, 4)
    elif kind == "reshape":
        c1 = _ch(rng)
        a = g.conv(x, c0, c1)
        r = g.op("Reshape", [a, g.c([0, c1, 4, 16])])
        r = g.op("Sigmoid", [r])
        r = g.op("Reshape", [r, g.c([2, c1, 8, 8])])
        r = g.op("Unsqueeze", [r, g.c([0])])
        r = g.op("Squeeze", [r, g.c([0])])
        out = g.conv(r, c1, 4)
    elif kind == "transpose_matmul":
        c1 = _ch(rng)
        a = g.op("Relu", [g.conv(x, c0, c1)])
        t = g.op("Transpose", [a], perm=[0, 2, 3, 1])
        mm = g.op("MatMul", [t, g.w(c1, 6)])
        mm = g.op("Add", [mm, g.w(6)])
        out = g.op("Transpose", [mm], perm=[0, 3, 1, 2])
        return g.model(out, [2, 6, 8, 8])
    else:
        raise ValueError(kind)
    return g.model(out, [2, 4, 8, 8])


def random_plan(groups, rng: np.random.Generator, probability: float = 0.8) -> dict[int, list[int]]:
    plan = {}
    for group in groups.prunable:
        if rng.random() < probability:
            keep = int(rng.integers(1, group.channels + 1))
            plan[group.id] = sorted(rng.choice(group.channels, keep, replace=False).tolist())
    return plan
