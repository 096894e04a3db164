"""check-trt: lint a Q/DQ graph against TensorRT's explicit-quantization rules (analysis only).

Every rule is checked on every node it applies to; the result goes to
``model.annotations["check_trt"]``::

    {"rules": {rule id: what it requires},
     "nodes": {node: {rule id: "ok" | "<what is wrong>"}},    # only nodes a rule applies to
     "violations": [{"rule", "node", "message"}], "ok": bool}

Rules (TensorRT 10/11, strongly typed networks):

=====================  ======================================================================
``qdq-inputs``         a Conv/ConvTranspose/Gemm/MatMul with a quantized (DQ) weight reads its
                       activation input through a DequantizeLinear (INT8 layers are quantized on
                       their inputs); weight-only INT4 (blocked DQ on Gemm/MatMul) is exempt
``qdq-weights``        such a layer with a DQ activation input also has a DQ weight
``residual-add``       an Add of two activations, one of them the output of an INT8 layer,
                       reads *both* inputs through DequantizeLinear (so TensorRT fuses the add
                       into the convolution)
``pool-commute``       no QuantizeLinear right after a max pool whose input is already
                       dequantized: max pooling commutes with DQ, the second Q/DQ only adds
                       error (not average pools: DQ→AveragePool→Q is TensorRT's INT8 pool)
``bias-float``         biases of Conv/ConvTranspose/Gemm are float tensors, not DQ(int32)
                       (TensorRT's ONNX parser rejects them)
``symmetric``          every Q/DQ zero point is 0 and of a signed type (int8 / int4): TensorRT
                       quantization is symmetric
``weight-axis``        weight DQ is per-tensor or per-channel on axis 0 (Conv/ConvTranspose,
                       Gemm with transB=1); MatMul weights on their last axis; a blocked DQ
                       (INT4) only on Gemm/MatMul weights
``positive-scales``    every Q/DQ scale is finite and > 0
``fp16-cast``          a layer with FP16 weights reads an FP16 input made by an explicit Cast
=====================  ======================================================================
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from hqpc.graphutil import GraphIndex, attributes
from hqpc.passmanager import Pass, PassInfo
from hqpc.registry import register_pass

RULES = {
    "qdq-inputs": "quantized layers read their activation inputs through DequantizeLinear",
    "qdq-weights": "a layer with a dequantized activation input has a dequantized weight",
    "residual-add": "a residual Add fed by an INT8 layer reads both inputs through DequantizeLinear",
    "pool-commute": "no QuantizeLinear right after a max pool whose input is already dequantized",
    "bias-float": "Conv/ConvTranspose/Gemm biases are float, not DequantizeLinear(int32)",
    "symmetric": "Q/DQ zero points are 0 and signed (int8/int4)",
    "weight-axis": "weight DQ per-tensor or per-channel on axis 0 (MatMul: last axis); blocked only on Gemm/MatMul",
    "positive-scales": "Q/DQ scales are finite and > 0",
    "fp16-cast": "FP16 layers read an FP16 input made by an explicit Cast",
}
LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
# DQ commutes with max pooling only; DQ→AveragePool→Q is TensorRT's INT8 average pool, and the
# requantization after an average pool is needed (the mean of grid values is off the grid)
COMMUTING_POOLS = ("MaxPool", "GlobalMaxPool")
TRT_TARGETS = ("orin", "xavier", "t4", "rtx")
SIGNED = (TensorProto.INT8, TensorProto.INT4, TensorProto.INT16)


def lint(proto: onnx.ModelProto) -> dict:
    """Check every rule on ``proto``; returns the annotation dict (see module docstring)."""
    graph = proto.graph
    index = GraphIndex.build(graph)
    nodes: dict[str, dict[str, str]] = {}
    violations: list[dict] = []

    def report(node: onnx.NodeProto, rule: str, problem: str | None) -> None:
        nodes.setdefault(node.name, {})[rule] = "ok" if problem is None else problem
        if problem is not None:
            violations.append({"rule": rule, "node": node.name, "message": problem})

    def producer(name: str):
        return index.producer.get(name) if name else None

    def is_dq(name: str) -> bool:
        p = producer(name)
        return p is not None and p.op_type == "DequantizeLinear"

    def act_is_dq(name: str) -> bool:
        # TensorRT propagates DQ forward through max pools (DQ→MaxPool→Conv is an INT8 conv)
        p, hops = producer(name), 0
        while p is not None and p.op_type in COMMUTING_POOLS and p.input and hops < 8:
            p, hops = producer(p.input[0]), hops + 1
        return p is not None and p.op_type == "DequantizeLinear"

    def const(name: str):
        return index.constant(name) if name else None

    def weight_dq(node) -> onnx.NodeProto | None:
        p = producer(node.input[1]) if len(node.input) > 1 else None
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    def blocked(dq) -> bool:
        return int(attributes(dq).get("block_size", 0) or 0) > 0

    int8_layers = set()
    for node in graph.node:
        if node.op_type not in LAYERS:
            continue
        wdq = weight_dq(node)
        acts = [0] if node.op_type != "MatMul" or const(node.input[1]) is not None or wdq is not None else [0, 1]
        act_dq = [act_is_dq(node.input[i]) for i in acts]
        if wdq is not None:
            weight_only = blocked(wdq) and node.op_type in ("Gemm", "MatMul")
            if weight_only:
                report(node, "qdq-inputs", None)
            else:
                missing = [node.input[i] for i, ok in zip(acts, act_dq) if not ok]
                report(node, "qdq-inputs", None if not missing else
                       f"weight is quantized but activation input '{missing[0]}' is not dequantized")
                if not missing:
                    int8_layers.add(node.name)
            axis_problem = _weight_axis_problem(node, wdq, index)
            report(node, "weight-axis", axis_problem)
        if any(act_dq) and node.op_type != "MatMul" or (node.op_type == "MatMul" and acts == [0] and act_dq[0]):
            report(node, "qdq-weights", None if wdq is not None else "activation is dequantized but the weight is float")
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2]:
            p = producer(node.input[2])
            report(node, "bias-float", None if p is None or p.op_type != "DequantizeLinear" else
                   f"bias '{node.input[2]}' is DequantizeLinear({_type_name(index, p.input[0])}); keep it float")
        w = const(node.input[1]) if len(node.input) > 1 else None
        if w is not None and w.dtype == np.float16:
            x = producer(node.input[0])
            ok = x is not None and x.op_type == "Cast" and attributes(x).get("to") == TensorProto.FLOAT16
            report(node, "fp16-cast", None if ok else "FP16 weights but the input is not an explicit Cast to FP16")
    for node in graph.node:
        if node.op_type == "Add" and len(node.input) == 2 and all(const(i) is None for i in node.input):
            fed = []
            for name in node.input:
                p = producer(name)
                if p is not None and p.op_type in ("Relu", "Clip") and p.input:
                    p = producer(p.input[0]) or p
                fed.append(p)
            if any(p is not None and p.name in int8_layers for p in fed):
                missing = [n for n in node.input if not is_dq(n)]
                report(node, "residual-add", None if not missing else
                       f"residual Add of an INT8 layer: input '{missing[0]}' is not dequantized")
        if node.op_type in COMMUTING_POOLS and is_dq(node.input[0]):
            readers = index.consumers.get(node.output[0], [])
            q = [r for r in readers if r.op_type == "QuantizeLinear"]
            report(node, "pool-commute", None if not q else
                   f"QuantizeLinear '{q[0].name}' requantizes the output of a pool over a dequantized input")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            report(node, "positive-scales", _scale_problem(node, index))
            report(node, "symmetric", _zero_point_problem(node, index))
    return {"rules": dict(RULES), "nodes": nodes, "violations": violations, "ok": not violations}


def _type_name(index: GraphIndex, name: str) -> str:
    t = index.initializers.get(name)
    return TensorProto.DataType.Name(t.data_type).lower() if t is not None else "tensor"


def _scale_problem(node, index) -> str | None:
    s = index.constant(node.input[1]) if len(node.input) > 1 else None
    if s is None:
        return "scale is not a constant"
    s = np.asarray(s, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        return "scale is not finite"
    if np.any(s <= 0):
        return f"scale has {int(np.sum(s <= 0))} zero or negative value(s) (min {float(s.min()):.3g})"
    return None


def _zero_point_problem(node, index) -> str | None:
    if len(node.input) < 3 or not node.input[2]:
        return None  # absent zero point: 0 (uint8 type for Q without output_dtype — checked below)
    t = index.initializers.get(node.input[2])
    if t is None:
        return "zero point is not a constant initializer"
    if t.data_type not in SIGNED:
        return f"zero point type {TensorProto.DataType.Name(t.data_type).lower()}: TensorRT needs signed (int8/int4)"
    z = numpy_helper.to_array(t)
    if np.any(np.asarray(z) != 0):
        return "non-zero zero point (TensorRT quantization is symmetric)"
    return None


def _weight_axis_problem(node, dq, index) -> str | None:
    scale = index.constant(dq.input[1])
    if scale is None:
        return "weight scale is not a constant"
    if np.asarray(scale).size == 1:
        return None
    attrs = attributes(dq)
    w = index.constant(dq.input[0])
    rank = w.ndim if w is not None else 2
    axis = int(attrs.get("axis", 1))
    axis = axis + rank if axis < 0 else axis
    if int(attrs.get("block_size", 0) or 0) > 0:
        return None if node.op_type in ("Gemm", "MatMul") else f"blocked weight DQ on {node.op_type} (only Gemm/MatMul)"
    if node.op_type == "MatMul":
        return None if axis == rank - 1 else f"MatMul weight per-channel on axis {axis}, expected {rank - 1}"
    if node.op_type == "Gemm" and not attributes(node).get("transB", 0):
        return f"Gemm with transB=0 has its output channels on axis 1; use transB=1 and axis 0 (got axis {axis})"
    return None if axis == 0 else f"per-channel weight on axis {axis}, expected 0"


@register_pass
class CheckTRT(Pass):
    """Lint the model against TensorRT's explicit-quantization rules (module docstring)."""

    info = PassInfo("check-trt", opt_level=2, analysis=True, targets=TRT_TARGETS,
                    description="lint Q/DQ placement against TensorRT rules, per rule and node")
    options = {"fail": False}

    def run(self, model, ctx) -> bool:
        result = lint(model.proto)
        model.annotations["check_trt"] = result
        if result["violations"]:
            counts: dict[str, int] = {}
            for v in result["violations"]:
                counts[v["rule"]] = counts.get(v["rule"], 0) + 1
            ctx.log("check-trt: " + ", ".join(f"{r}: {c} violation(s)" for r, c in sorted(counts.items())))
            if self.config["fail"]:
                first = result["violations"][0]
                raise RuntimeError(f"check-trt: rule {first['rule']} violated at node '{first['node']}': {first['message']}")
        else:
            ctx.log(f"check-trt: all {len(RULES)} rules hold on {len(result['nodes'])} nodes")
        return False  # analysis: annotations only, the graph is unchanged
