"""Q/DQ placement per backend, emission of the Q/DQ graph, and its fake-quantized float reference.

Not a pass: ``insert-qdq`` (passes/qdq.py) drives it. Three steps:

1. **Plan the placement** (:func:`place`): which nodes run quantized ("Q" domain), which stay
   FP32 ("F") or FP16 ("H"), which activation tensors get a QuantizeLinear/DequantizeLinear
   pair and with which parameters, and how every weight is stored. Everything is expressed in
   terms of the *input* graph's tensor and node names, so the same :class:`Placement` drives both
   the emitted graph and its reference.
2. **Emit** (:func:`emit`) the Q/DQ graph, then simplify it with rewrites that are exact on the
   quantized grid (see :func:`simplify`).
3. **Reference** (:func:`reference_model`): the *input* graph fake-quantized with the same
   scales, built straight from the placement by separate code: a QuantizeLinear→
   DequantizeLinear pair on every quantized activation (at the same readers), weights and int32
   biases through DequantizeLinear nodes made from the codes, FP16 layers as FP16-typed layers
   (Cast to float16 on their activation inputs, FP16 weights and bias, Cast back to float) —
   and none of the emission's rewrites (no absorbed Relu/Clip, no scalar folded into a scale, no
   HardSigmoid-as-Add, no fence, no int4 Cast, no Gemm transposition). ONNX Runtime then runs
   the same float kernels on both sides at the guard's optimization level, so a correct
   emission matches it bit for bit on real data; what the guard catches is a placement or
   rewrite bug (a reader wired to the wrong tensor, a wrong axis, zero point or scale, an
   inexact simplification). Quantization error itself is identical on both sides by
   construction; accuracy is measured separately, end to end.

ONNX Runtime (backend ``onnxruntime``, target ``cpu``) placement
----------------------------------------------------------------
ORT fuses DQ→op→Q groups into integer kernels (QLinearConv, QGemm, QLinearMatMul,
QLinearAdd/Mul, QLinearAveragePool/GlobalAveragePool, QLinearSigmoid/LeakyRelu/Softmax,
QLinearConcat) and drops DQ/Q pairs with equal parameters around data-movement ops (MaxPool,
Reshape, Transpose, Slice, ...). Hence:

* every quantized node's output is quantized right after it (producer mode: the producer's
  output is renamed, Q→DQ write the original name, every reader sees the quantized value) —
  except a Gemm/MatMul output that is a graph output (QGemm / MatMulIntegerToFloat give float
  logits) and an output whose only reader is a quantized Relu/Clip (the activation is absorbed:
  ``Relu→Q`` with the Q range inside the Relu's is the same as ``Q``);
* Relu/Clip become no-ops on the grid and are removed, a positive scalar Mul/Div after a DQ is
  folded into the DQ's scale, and DQ→Q pairs with equal parameters are removed;
* HardSigmoid(x) (alpha, beta) followed by Q(s, 0) with ``qmax·s ≤ 1`` is rewritten as
  ``Add(x, beta/alpha)→Q(s/alpha, 0)`` — the clip at 0 and 1 is the grid's saturation — so
  hard-swish ``x·HardSigmoid(x)`` runs as QLinearAdd + QLinearMul instead of a float island
  (DQ→HardSigmoid→Q), the MobileNetV3 problem;
* FP32 regions stay FP32: ORT's WeightBiasQuantization quantizes a float-weight Conv/Gemm by
  itself when its input comes from a per-tensor DQ and its output leads to a Q. Such a node's
  input is *fenced*: it reads a per-axis DQ (axis 1, equal scales: the same values), which no
  ORT fusion accepts. The insert-qdq pass audits the optimized ORT graph to prove it.
* INT4 weights of Conv/Gemm are stored as int4 (opset 21) and widened by a Cast to int8 before
  the per-channel DQ; ORT constant-folds the Cast, so the layer still runs as QLinearConv/QGemm
  while the file holds 4 bits per weight. MatMul int4 weights are block-wise (axis 0, block 32):
  ORT runs DQ→MatMul as MatMulNBits.
* biases are int32 with scale ``s_x·s_w`` (ORT's QLinearConv/QGemm form); activations uint8
  asymmetric (or what ``calibrate`` chose); weights int8 per output channel, zero point 0.

TensorRT (backend ``tensorrt``, e.g. ``orin``) placement
--------------------------------------------------------
Explicit quantization as TensorRT's optimizer expects it: Q/DQ on the *inputs* of
Conv/ConvTranspose/Gemm/MatMul (never after them), on both inputs of a residual Add fed by a
quantized layer (so the add fuses into the conv), on a max pool's *input* rather than its
output when the pooled tensor feeds a quantized layer (max pooling commutes with DQ; average
pooling does not: TensorRT fuses DQ→AveragePool→Q into an INT8 pool, and a Conv behind an
average pool over a DQ without its own Q/DQ stays FP32), weights as
int8 initializers behind a per-channel DQ on axis 0 (Gemm is normalised to transB=1; MatMul
weights use their output axis), biases left float (TensorRT's ONNX parser rejects int32
biases behind DequantizeLinear), symmetric int8 with zero point 0 and strictly positive scales.
INT4 is weight-only and block-wise (axis = the reduction axis, block 32) on Gemm/MatMul;
FP16 layers get explicit Casts (strongly typed networks take precision from the graph types).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hqpc.graphutil import GraphIndex, NameGenerator, attributes, remove_unused_initializers, replace_nodes, toposort
from hqpc.passes._rewrite import ShapeTable, is_op
from hqpc.runtime import quant as Q

COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ORT_QLINEAR = ("Add", "Mul", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Softmax", "Concat")
ORT_TRANSPARENT = ("MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Gather",
                   "Expand", "Tile")
ACTIVATIONS = ("Relu", "Clip")
POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool")
# pools TensorRT commutes with DQ (the max of grid values is on the grid); an average pool is a
# *quantizable* layer instead (DQ→AvgPool→Q fuses into an INT8 pool): its output is requantized
COMMUTING_POOLS = ("MaxPool", "GlobalMaxPool")
FENCE_OPS = ("Conv", "ConvTranspose", "Gemm")
INT4_BLOCK = 32
CPU_INT4_BLOCK = 64
CPU_INT4_MIN_K = 128
ONNX_TYPE = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8, "int4": TensorProto.INT4,
             "uint4": TensorProto.UINT4}


# --------------------------------------------------------------------------- data
@dataclass
class ActQ:
    """Per-tensor quantization of one activation tensor."""

    scale: float
    zero_point: int
    dtype: str

    def key(self):
        return (float(np.float32(self.scale)), int(self.zero_point), self.dtype)

    def bounds(self) -> tuple[float, float]:
        qmin, qmax = Q.qrange(self.dtype)
        s = float(np.float32(self.scale))
        return (qmin - self.zero_point) * s, (qmax - self.zero_point) * s


@dataclass
class WeightSpec:
    """How one compute node's weight (input 1) and bias (input 2) are stored."""

    precision: str                    # int8 | int4 | fp16
    wq: Q.WeightQuant | None          # codes and scales for int8 / int4
    storage: str                      # "dq" | "cast-dq" (int4 widened to int8 by a Cast) | "fp16"
    bias: np.ndarray | None = None    # the float bias the layer uses (after any correction)
    bias_mode: str = "float"          # "int32" | "float" | "fp16" | "none"
    transpose_b: bool = False         # TensorRT: Gemm transB=0 rewritten to transB=1
    bias_codes: np.ndarray | None = None   # int32 bias as emitted (set by emit)
    bias_scale: np.ndarray | None = None

    def dequantized(self, original: np.ndarray) -> np.ndarray:
        if self.precision == "fp16":
            return Q.fp16_round(original)
        w = self.wq.dequantized()
        return w.T.copy() if self.transpose_b else w


@dataclass
class Placement:
    backend: str
    domain: dict[str, str] = field(default_factory=dict)          # node -> Q | F | H
    acts: dict[str, ActQ] = field(default_factory=dict)           # tensor -> params
    mode: dict[str, str] = field(default_factory=dict)            # tensor -> producer | consumer
    readers: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # consumer mode
    consts: dict[tuple[str, int], tuple[np.ndarray, ActQ]] = field(default_factory=dict)
    weights: dict[str, WeightSpec] = field(default_factory=dict)
    absorbed_scalars: set[str] = field(default_factory=set)       # positive scalar Mul/Div nodes
    reasons: dict[str, str] = field(default_factory=dict)         # why a node is not quantized
    blocked: set[str] = field(default_factory=set)                # cpu INT4 layers with blocked weights
    needs_opset21: bool = False

    def summary(self) -> dict:
        counts: dict[str, int] = defaultdict(int)
        for d in self.domain.values():
            counts[d] += 1
        return {"backend": self.backend, "domains": dict(counts), "quantized_tensors": len(self.acts),
                "weights": {p: sum(1 for w in self.weights.values() if w.precision == p)
                            for p in ("int8", "int4", "fp16")},
                "not_quantized": dict(sorted(self.reasons.items()))}


# --------------------------------------------------------------------------- helpers
def weight_axis(node: onnx.NodeProto, w: np.ndarray) -> int:
    """Output-channel axis of a compute node's weight."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if attributes(node).get("transB", 0) else 1
    return w.ndim - 1  # MatMul B [..., K, N]


def const_weight(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    if len(node.input) < 2 or node.input[1] in index.inputs:
        return None
    w = index.constant(node.input[1])
    if w is None or w.dtype != np.float32:
        return None
    return w


def const_bias(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return None
    b = index.constant(node.input[2])
    return None if b is None or b.dtype != np.float32 else b


def scalar_constant(index: GraphIndex, name: str) -> float | None:
    if name in index.inputs:
        return None
    v = index.constant(name)
    if v is None or v.size != 1 or not np.issubdtype(v.dtype, np.floating):
        return None
    return float(v.reshape(()))


def act_from_calibration(calib: dict, name: str) -> ActQ | None:
    entry = calib.get("tensors", {}).get(name)
    if entry is None:
        return None
    dtype = calib.get("activation_type", "uint8")
    symmetric = bool(calib.get("symmetric", False))
    scale, zero = Q.qparams_from_range(entry["lo"], entry["hi"], dtype, symmetric)
    return ActQ(float(scale), int(zero), dtype)


def quantize_constant(value: np.ndarray, dtype: str, symmetric: bool) -> tuple[np.ndarray, ActQ]:
    """Per-tensor quantization of a constant operand (an Add/Mul/Concat operand in the Q domain)."""
    lo, hi = float(np.min(value)), float(np.max(value))
    scale, zero = Q.qparams_from_range(lo, hi, dtype, symmetric)
    act = ActQ(float(scale), int(zero), dtype)
    codes = Q.quantize(value, act.scale, act.zero_point, dtype)
    return codes, act


def data_inputs(node: onnx.NodeProto) -> list[int]:
    """Input positions that carry activations an integer kernel reads."""
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        return [0]
    if node.op_type == "MatMul":
        return [0, 1]
    if node.op_type in ("Add", "Mul", "Concat"):
        return list(range(len(node.input)))
    return [0] if node.input else []


# --------------------------------------------------------------------------- planning
def place(model, plan: dict[str, str], calib: dict, backend: str, conventions: dict) -> Placement:
    """The placement for ``backend`` ("onnxruntime" or "tensorrt")."""
    graph = model.proto.graph
    index = GraphIndex.build(graph)
    shapes = ShapeTable(model.proto)
    placement = Placement(backend=backend)
    if backend == "onnxruntime":
        _place_ort(graph, index, shapes, plan, calib, placement)
    else:
        _place_trt(graph, index, shapes, plan, calib, placement, conventions)
    return placement


def _is_float(shapes: ShapeTable, name: str) -> bool:
    return bool(name) and shapes.elem_type(name) == TensorProto.FLOAT


def _compute_precisions(graph, index, plan, placement: Placement, allowed: set[str]) -> dict[str, str]:
    """Node -> precision for every compute node (plan value, default int8), with reasons for
    nodes that cannot be quantized."""
    out = {}
    for node in graph.node:
        if not is_op(node, *COMPUTE):
            continue
        w = const_weight(index, node)
        want = plan.get(node.name, "int8")
        if want not in ("int8", "int4", "fp16", "fp32"):
            want = "int8"
        if node.op_type != "MatMul" and w is None:
            placement.reasons[node.name] = "weight is not a constant float tensor"
            want = "fp32"
        if want not in allowed and want != "fp32":
            placement.reasons[node.name] = f"{want} not supported for {node.op_type} on this target"
            want = "fp32" if want != "int4" else ("int8" if "int8" in allowed else "fp32")
        if want == "fp32" and node.name not in placement.reasons:
            placement.reasons[node.name] = "precision plan: fp32"
        out[node.name] = want
    return out


def _place_ort(graph, index, shapes, plan, calib, placement: Placement) -> None:
    dtype = calib.get("activation_type", "uint8")
    symmetric = bool(calib.get("symmetric", False))
    precisions = _compute_precisions(graph, index, plan, placement, {"int8", "int4", "fp16"})
    for node in graph.node:
        if node.name in precisions:
            p = precisions[node.name]
            if node.op_type == "ConvTranspose" and p in ("int8", "int4"):
                placement.reasons[node.name] = "ONNX Runtime CPU has no integer ConvTranspose kernel"
                p = precisions[node.name] = "fp32"
            placement.domain[node.name] = {"int8": "Q", "int4": "Q", "fp16": "H"}.get(p, "F")
            if node.op_type == "MatMul" and p == "int4":
                placement.domain[node.name] = "W"  # weight-only: DQ(int4, blocked)→MatMul = MatMulNBits
    candidates = set(ORT_QLINEAR) | set(ORT_TRANSPARENT) | set(ACTIVATIONS) | {"HardSigmoid", "Div"}

    def eligible(node) -> bool:
        if not is_op(node, *candidates) or not node.output or not _is_float(shapes, node.output[0]):
            return False
        if node.op_type == "Div":  # only as an absorbed positive scalar division
            k = scalar_constant(index, node.input[1]) if len(node.input) > 1 else None
            return k is not None and k > 0
        return True

    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if node.name in placement.domain or not eligible(node):
                continue
            neighbours = [index.producer.get(n) for n in node.input if n] + \
                [c for o in node.output for c in index.consumers.get(o, [])]
            if any(nb is not None and placement.domain.get(nb.name) == "Q" for nb in neighbours):
                placement.domain[node.name] = "Q"
                changed = True
    for node in graph.node:
        placement.domain.setdefault(node.name, "F")

    def domain(node):
        return placement.domain.get(node.name, "F") if node is not None else "F"

    # positive scalar Mul/Div in the Q domain: folded into the DQ scale, not an integer kernel
    for node in graph.node:
        if domain(node) == "Q" and node.op_type in ("Mul", "Div") and len(node.input) == 2:
            k = scalar_constant(index, node.input[1])
            if k is not None and k > 0:
                placement.absorbed_scalars.add(node.name)
    need: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for node in graph.node:
        if domain(node) != "Q" or node.op_type in ACTIVATIONS:
            continue
        positions = [0] if node.name in placement.absorbed_scalars else data_inputs(node)
        for pos in positions:
            if pos >= len(node.input) or not node.input[pos]:
                continue
            name = node.input[pos]
            if index.constant(name) is not None and name not in index.inputs:
                if node.op_type in ("Add", "Mul", "Concat"):
                    value = index.constant(name).astype(np.float32)
                    codes, act = quantize_constant(value, dtype, symmetric)
                    placement.consts[(node.name, pos)] = (codes, act)
                continue
            if _is_float(shapes, name):
                need[name].append((node.name, pos))
    # producer-mode tensors (outputs of quantized nodes), in topological order so that
    # transparent ops inherit their input's parameters
    for node in graph.node:
        if domain(node) != "Q":
            continue
        out = node.output[0] if node.output else ""
        if not _is_float(shapes, out):
            continue
        readers = index.consumers.get(out, [])
        if (len(readers) == 1 and out not in index.outputs and readers[0].op_type in ACTIVATIONS
                and domain(readers[0]) == "Q"):
            continue  # activation absorbed into this node's output quantization
        if node.op_type in ("Gemm", "MatMul") and out in index.outputs:
            continue  # float output straight from QGemm / MatMulIntegerToFloat
        act = _inherited(node, placement, index) or act_from_calibration(calib, out)
        if act is None:
            raise ValueError(f"insert-qdq: no calibration range for tensor '{out}' (run calibrate first)")
        placement.acts[out] = act
        placement.mode[out] = "producer"
    for name, readers in need.items():
        if name in placement.acts:
            continue
        act = act_from_calibration(calib, name)
        if act is None:
            raise ValueError(f"insert-qdq: no calibration range for tensor '{name}' (run calibrate first)")
        placement.acts[name] = act
        placement.mode[name] = "consumer"
        placement.readers[name] = readers
    _weights(graph, index, precisions, placement, backend="onnxruntime")


def _inherited(node, placement: Placement, index: GraphIndex) -> ActQ | None:
    """Output parameters of ops that are exact on their input's grid (the DQ→op→Q pair then
    cancels): data movement and MaxPool keep them, positive scalar Mul/Div scale them,
    Relu/Clip keep them when every representable input value is inside the clip range."""
    if not node.input or node.input[0] not in placement.acts:
        return None
    p = placement.acts[node.input[0]]
    if node.op_type in ORT_TRANSPARENT:
        return ActQ(p.scale, p.zero_point, p.dtype)
    if node.name in placement.absorbed_scalars:
        k = scalar_constant(index, node.input[1])
        scale = p.scale * k if node.op_type == "Mul" else p.scale / k
        return ActQ(float(np.float32(scale)), p.zero_point, p.dtype)
    if node.op_type in ACTIVATIONS:
        lo, hi = clip_interval(node, index)
        a, b = p.bounds()
        if a >= lo and b <= hi:
            return ActQ(p.scale, p.zero_point, p.dtype)
    return None


def clip_interval(node: onnx.NodeProto, index: GraphIndex) -> tuple[float, float]:
    if node.op_type == "Relu":
        return 0.0, np.inf
    attrs = attributes(node)
    lo = attrs.get("min", -np.inf)
    hi = attrs.get("max", np.inf)
    if len(node.input) > 1 and node.input[1]:
        v = index.constant(node.input[1])
        lo = float(v) if v is not None else -np.inf
    if len(node.input) > 2 and node.input[2]:
        v = index.constant(node.input[2])
        hi = float(v) if v is not None else np.inf
    return float(lo), float(hi)


def _weights(graph, index, precisions, placement: Placement, backend: str) -> None:
    """Weight and bias storage for every quantized / FP16 compute node."""
    for node in graph.node:
        p = precisions.get(node.name)
        w = const_weight(index, node) if node.name in precisions else None
        if p is None or p == "fp32" or w is None:
            continue
        bias = const_bias(index, node)
        if p == "fp16":
            placement.weights[node.name] = WeightSpec("fp16", None, "fp16", bias=bias,
                                                      bias_mode="fp16" if bias is not None else "none")
            continue
        transpose_b = False
        wt = w
        if backend == "tensorrt" and node.op_type == "Gemm" and not attributes(node).get("transB", 0):
            transpose_b, wt = True, w.T.copy()
        # TensorRT: per-channel weights on axis 0 (Conv, ConvTranspose, Gemm after transB=1)
        axis = 0 if transpose_b or (backend == "tensorrt" and node.op_type != "MatMul") else weight_axis(node, wt)
        if p == "int4" and node.op_type == "MatMul" or (p == "int4" and backend == "tensorrt"):
            # block-wise along the reduction axis (MatMul B [K, N]: axis 0; Gemm transB=1 [N, K]: axis 1)
            red = wt.ndim - 2 if node.op_type == "MatMul" else 1
            block = INT4_BLOCK if wt.shape[red] >= INT4_BLOCK else 16
            wq = Q.weight_quant(wt, red, "int4", block_size=block, grid=False)
            storage = "dq"
        elif p == "int4" and _blocked_on_cpu(node, wt):
            # long reductions (1x1 Conv / Gemm with K >= 128): blocks of 64 along K keep INT4
            # accurate; ORT then runs DQ + a float layer (no integer kernel takes blocked weights)
            red = 1 if node.op_type == "Conv" or attributes(node).get("transB", 0) else 0
            wq = Q.weight_quant(wt, red, "int4", block_size=CPU_INT4_BLOCK, grid=False)
            storage = "dq"
            placement.blocked.add(node.name)
        elif p == "int4":
            wq = Q.weight_quant(wt, axis, "int4", grid=True)
            storage = "cast-dq"
        else:
            wq = Q.weight_quant(wt, axis, "int8", grid=True)
            storage = "dq"
        if p == "int4":
            placement.needs_opset21 = True
        mode = "none" if bias is None else ("int32" if backend == "onnxruntime" and not wq.block_size else "float")
        spec = WeightSpec(p, wq, storage, bias=bias, bias_mode=mode, transpose_b=transpose_b)
        placement.weights[node.name] = spec


def _blocked_on_cpu(node, w: np.ndarray) -> bool:
    if node.op_type == "Gemm":
        k = w.shape[1] if attributes(node).get("transB", 0) else w.shape[0]
        return k >= CPU_INT4_MIN_K
    if node.op_type == "Conv" and w.ndim == 4 and w.shape[2:] == (1, 1) and int(attributes(node).get("group", 1)) == 1:
        return w.shape[1] >= CPU_INT4_MIN_K
    return False


def _place_trt(graph, index, shapes, plan, calib, placement: Placement, conventions: dict) -> None:
    precisions = _compute_precisions(graph, index, plan, placement, {"int8", "int4", "fp16"})
    for node in graph.node:
        p = precisions.get(node.name)
        if p == "int4" and node.op_type not in ("Gemm", "MatMul"):
            placement.reasons[node.name] = "TensorRT int4 is weight-only for Gemm/MatMul; int8 instead"
            p = precisions[node.name] = "int8"
        if p is not None:
            placement.domain[node.name] = {"int8": "Q", "int4": "W", "fp16": "H"}.get(p, "F")
    for node in graph.node:
        placement.domain.setdefault(node.name, "F")
    need: dict[str, list[tuple[str, int]]] = defaultdict(list)

    def request(name: str, reader: str, pos: int) -> None:
        # max pooling commutes with DQ: quantize the pooling op's input instead of its output.
        # Not average pooling: TensorRT(-RTX) then runs the reading Conv in FP32 ("int8-weights",
        # measured on mobilenet_v2's Logits conv and mobilenet_v3_small's squeeze-excite convs)
        producer = index.producer.get(name)
        if (producer is not None and producer.op_type in COMMUTING_POOLS and len(index.consumers.get(name, [])) == 1
                and name not in index.outputs and _is_float(shapes, producer.input[0])):
            need[producer.input[0]].append((producer.name, 0))
            return
        need[name].append((reader, pos))

    for node in graph.node:
        if placement.domain[node.name] != "Q":
            continue
        positions = [0] if node.op_type != "MatMul" else [0, 1]
        for pos in positions:
            name = node.input[pos] if pos < len(node.input) else ""
            if not name or (index.constant(name) is not None and name not in index.inputs):
                continue
            if _is_float(shapes, name):
                request(name, node.name, pos)
    # residual Add: both inputs quantized when one of them comes from a quantized layer
    quantized_layers = {n for n, d in placement.domain.items() if d == "Q"}
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        if any(index.constant(n) is not None and n not in index.inputs for n in node.input):
            continue
        fed = [index.producer.get(n) for n in node.input]
        if any(p is not None and p.name in quantized_layers and p.op_type in COMPUTE for p in fed):
            for pos, name in enumerate(node.input):
                if _is_float(shapes, name):
                    need[name].append((node.name, pos))
    for name, readers in need.items():
        act = act_from_calibration(calib, name)
        if act is None:
            raise ValueError(f"insert-qdq: no calibration range for tensor '{name}' (run calibrate first)")
        if act.zero_point != 0 or act.dtype != "int8":
            entry = calib["tensors"][name]
            scale, _ = Q.qparams_from_range(entry["lo"], entry["hi"], "int8", True)
            act = ActQ(float(scale), 0, "int8")
        placement.acts[name] = act
        placement.mode[name] = "consumer"
        placement.readers[name] = readers
    _weights(graph, index, precisions, placement, backend="tensorrt")


def build_qdq(model, plan: dict[str, str], calib: dict, backend: str, conventions: dict | None = None):
    """A copy of ``model`` with the plan's Q/DQ graph emitted (opset 21 when INT4 is placed)."""
    out = model.copy()
    placement = place(out, plan, calib, backend, conventions or {})
    if placement.needs_opset21:
        upgrade_opset(out)
        placement = place(out, plan, calib, backend, conventions or {})
    emit(out, placement)
    return out, placement


def upgrade_opset(model, opset: int = 21) -> None:
    """Raise the default-domain opset (for INT4 types) and the IR version to 10."""
    if model.opset < opset:
        model.proto = onnx.version_converter.convert_version(model.proto, opset)
    model.proto.ir_version = max(model.proto.ir_version, 10)


# --------------------------------------------------------------------------- emission
class _Builder:
    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.names = NameGenerator(graph)
        self.nodes: list[onnx.NodeProto] = []

    def init(self, base: str, value: np.ndarray, elem_type: int | None = None) -> str:
        name = self.names(base)
        if elem_type in (TensorProto.INT4, TensorProto.UINT4):
            tensor = helper.make_tensor(name, elem_type, list(value.shape), value.astype(np.int64).ravel().tolist())
        else:
            tensor = numpy_helper.from_array(np.array(value, copy=True, order="C"), name)
        self.graph.initializer.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], base: str, **attrs) -> onnx.NodeProto:
        n = helper.make_node(op, inputs, outputs, name=self.names(base), **attrs)
        self.nodes.append(n)
        return n

    def qparams(self, base: str, act: ActQ) -> tuple[str, str]:
        s = self.init(f"{base}_scale", np.array(act.scale, dtype=np.float32))
        z = self.init(f"{base}_zero_point", np.array(act.zero_point, dtype=Q.NUMPY_STORAGE[act.dtype]))
        return s, z


def emit(model, placement: Placement) -> dict:
    """Rewrite ``model`` in place into the Q/DQ graph of ``placement``; returns statistics."""
    graph = model.proto.graph
    index = GraphIndex.build(graph)
    shapes = ShapeTable(model.proto)  # before any renaming
    by_name = {n.name: n for n in graph.node}
    b = _Builder(graph)
    fences = 0
    dq_of: dict[str, tuple[str, ActQ]] = {}  # tensor -> (quantized codes name, params)
    for t, act in placement.acts.items():
        s, z = b.qparams(t, act)
        if placement.mode[t] == "producer":
            producer = index.producer[t]
            raw = b.names(f"{t}_float")
            for i, o in enumerate(producer.output):
                if o == t:
                    producer.output[i] = raw
            q = b.names(f"{t}_quantized")
            b.node("QuantizeLinear", [raw, s, z], [q], f"{t}_Q")
            b.node("DequantizeLinear", [q, s, z], [t], f"{t}_DQ")
            dq_of[t] = (q, act)
        else:
            q, d = b.names(f"{t}_quantized"), b.names(f"{t}_dequantized")
            b.node("QuantizeLinear", [t, s, z], [q], f"{t}_Q")
            b.node("DequantizeLinear", [q, s, z], [d], f"{t}_DQ")
            for node_name, pos in placement.readers[t]:
                by_name[node_name].input[pos] = d
    # fences: float Conv/Gemm reading a per-tensor DQ (ORT would quantize them by itself)
    if placement.backend == "onnxruntime":
        for node in graph.node:
            if placement.domain.get(node.name) in ("F", "H") and node.op_type in FENCE_OPS:
                t = node.input[0]
                if t in dq_of:
                    q, act = dq_of[t]
                    shape = shapes.shape(t)
                    channels = shape[1] if shape and len(shape) > 1 and isinstance(shape[1], int) else None
                    if channels is None:
                        continue
                    s = b.init(f"{t}_fence_scale", np.full(channels, act.scale, np.float32))
                    z = b.init(f"{t}_fence_zero_point", np.full(channels, act.zero_point, Q.NUMPY_STORAGE[act.dtype]))
                    d = b.names(f"{t}_fenced")
                    b.node("DequantizeLinear", [q, s, z], [d], f"{t}_fence_DQ", axis=1)
                    node.input[0] = d
                    fences += 1
    # constant operands of integer kernels
    for (node_name, pos), (codes, act) in placement.consts.items():
        node = by_name[node_name]
        base = node.input[pos]
        c = b.init(f"{base}_quantized", codes.astype(Q.NUMPY_STORAGE[act.dtype]))
        s, z = b.qparams(f"{base}_q", act)
        d = b.names(f"{base}_dequantized")
        b.node("DequantizeLinear", [c, s, z], [d], f"{base}_DQ")
        node.input[pos] = d
    # weights and biases
    for node_name, spec in placement.weights.items():
        node = by_name[node_name]
        _emit_weight(b, node, spec, placement, model, index)
    # FP16 layers: Cast in, Cast out
    for node in list(graph.node):
        if placement.domain.get(node.name) == "H":
            _emit_fp16(b, node, index, shapes, placement.weights.get(node.name))
    graph.node.extend(b.nodes)
    toposort(graph)
    stats = simplify(graph)
    stats["fences"] = fences
    remove_dead_nodes(graph)
    remove_unused_initializers(graph)
    toposort(graph)
    return stats


def _input_scale(node: onnx.NodeProto, graph_nodes: dict[str, onnx.NodeProto], b: _Builder) -> float | None:
    """Scale of the per-tensor DQ feeding input 0 of ``node`` (for int32 bias)."""
    producer = graph_nodes.get(node.input[0])
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    for t in b.graph.initializer:
        if t.name == producer.input[1]:
            v = numpy_helper.to_array(t)
            return float(v.reshape(-1)[0]) if v.size == 1 else None
    return None


def _emit_weight(b: _Builder, node, spec: WeightSpec, placement: Placement, model, index) -> None:
    base = node.input[1]
    if spec.precision == "fp16":
        node.input[1] = b.init(f"{base}_fp16", Q.fp16_round(index.constant(base)).astype(np.float16))
        if spec.bias is not None:
            node.input[2] = b.init(f"{node.input[2]}_fp16", Q.fp16_round(spec.bias).astype(np.float16))
        return
    wq = spec.wq
    zeros = wq.zero_points.astype(Q.NUMPY_STORAGE[wq.dtype])
    s = b.init(f"{base}_scale", wq.scale.astype(np.float32))
    attrs = {"axis": wq.axis}
    if wq.block_size:
        attrs["block_size"] = wq.block_size
    d = b.names(f"{base}_dequantized")
    if spec.storage == "cast-dq":
        codes = b.init(f"{base}_int4", wq.q, TensorProto.INT4)
        widened = b.names(f"{base}_int8")
        b.node("Cast", [codes], [widened], f"{base}_widen", to=TensorProto.INT8)
        z = b.init(f"{base}_zero_point", np.zeros(wq.scale.shape, np.int8))
        b.node("DequantizeLinear", [widened, s, z], [d], f"{base}_DQ", **attrs)
    else:
        elem = ONNX_TYPE[wq.dtype]
        codes = b.init(f"{base}_quantized", wq.q if wq.dtype == "int4" else wq.storage(), elem if wq.dtype == "int4" else None)
        if wq.dtype == "int4":
            z = b.init(f"{base}_zero_point", np.zeros(wq.scale.shape, np.int64), TensorProto.INT4)
        else:
            z = b.init(f"{base}_zero_point", zeros)
        b.node("DequantizeLinear", [codes, s, z], [d], f"{base}_DQ", **attrs)
    node.input[1] = d
    if spec.transpose_b:
        from hqpc.graphutil import set_attribute
        set_attribute(node, "transB", 1)
    if spec.bias is not None and spec.bias_mode == "int32":
        producers = {o: n for n in list(b.graph.node) + b.nodes for o in n.output}
        sx = _input_scale(node, producers, b)
        if sx is None:
            spec.bias_mode = "float"
        else:
            bscale = (sx * wq.scale.astype(np.float64)).astype(np.float32)
            codes = np.clip(np.rint(spec.bias.astype(np.float64) / bscale), -2**31, 2**31 - 1).astype(np.int32)
            spec.bias = (codes.astype(np.float64) * bscale).astype(np.float32)  # what the layer uses
            spec.bias_codes, spec.bias_scale = codes, bscale
            bc = b.init(f"{node.input[2]}_int32", codes)
            bs = b.init(f"{node.input[2]}_scale", bscale)
            bd = b.names(f"{node.input[2]}_dequantized")
            b.node("DequantizeLinear", [bc, bs], [bd], f"{node.input[2]}_DQ", axis=0)
            node.input[2] = bd
            return
    if spec.bias is not None and spec.bias_mode == "float":
        original = index.constant(node.input[2])
        if original is None or not np.array_equal(original, spec.bias.astype(np.float32)):
            node.input[2] = b.init(f"{node.input[2]}_corrected", spec.bias.astype(np.float32))


def _fp16_stored(spec: WeightSpec | None) -> set[int]:
    """Input positions of an FP16 layer stored as FP16 initializers by its weight spec."""
    if spec is None:
        return set()
    return {1, 2} if spec.bias is not None else {1}


def _fp16_input(index: GraphIndex, shapes: ShapeTable, name: str) -> bool:
    """A float32 activation input of an FP16 layer (to be cast to FP16): not a constant (its
    weights and bias are stored as FP16 by the weight spec)."""
    if index.constant(name) is not None and name not in index.inputs:
        return False
    elem = shapes.elem_type(name)
    return elem in (None, TensorProto.FLOAT)


def _emit_fp16(b: _Builder, node, index, shapes: ShapeTable, spec: WeightSpec | None) -> None:
    """Cast every float activation input of an FP16 layer to FP16 (TensorRT's strongly typed
    network takes the layer's precision from its input types) and its output back to FP32."""
    stored = _fp16_stored(spec)
    for pos, x in enumerate(node.input):
        if not x or pos in stored or not _fp16_input(index, shapes, x):
            continue
        h = b.names(f"{x}_fp16")
        b.node("Cast", [x], [h], f"{x}_to_fp16", to=TensorProto.FLOAT16)
        node.input[pos] = h
    out = node.output[0]
    raw = b.names(f"{out}_fp16")
    node.output[0] = raw
    b.node("Cast", [raw], [out], f"{out}_to_fp32", to=TensorProto.FLOAT)


# --------------------------------------------------------------------------- simplification
def _param_values(inits: dict[str, onnx.TensorProto], node) -> tuple[np.ndarray, np.ndarray, str] | None:
    s = inits.get(node.input[1])
    z = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if s is None:
        return None
    scale = numpy_helper.to_array(s)
    if z is None:
        return scale, np.zeros_like(scale, dtype=np.int64), "uint8"
    dtype = {TensorProto.UINT8: "uint8", TensorProto.INT8: "int8", TensorProto.INT4: "int4",
             TensorProto.UINT4: "uint4"}.get(z.data_type)
    if dtype is None:
        return None
    return scale, numpy_helper.to_array(z).astype(np.int64), dtype


def simplify(graph: onnx.GraphProto) -> dict:
    """Rewrites that are exact on the quantized grid, repeated to a fixpoint:

    * ``Relu/Clip → Q`` (sole reader) whose Q range lies inside the clip interval: the Q's
      saturation already clips, the activation is removed;
    * ``DQ → Relu/Clip`` whose DQ range lies inside the interval: an identity, removed;
    * ``DQ(s, z) → Mul/Div(k > 0 scalar)`` (sole reader): becomes ``DQ(s·k or s/k, z)``;
    * ``DQ(p) → Q(p)`` (same scale, zero point and type): the Q's readers read the codes;
    * ``HardSigmoid(α, β) → Q(s, 0)`` with ``qmax·s ≤ 1``: becomes ``Add(x, β/α) → Q(s/α, 0)``
      (the grid's saturation is HardSigmoid's clip), so ORT runs it as QLinearAdd.
    """
    stats = defaultdict(int)
    while True:
        changed = False
        index = GraphIndex.build(graph)
        inits = {t.name: t for t in graph.initializer}
        names = NameGenerator(graph)
        for node in list(graph.node):
            out = node.output[0] if node.output else ""
            readers = index.consumers.get(out, [])
            sole = readers[0] if len(readers) == 1 and out not in index.outputs else None
            if node.op_type in ACTIVATIONS and sole is not None and sole.op_type == "QuantizeLinear":
                params = _param_values(inits, sole)
                if params and params[0].size == 1:
                    lo, hi = clip_interval(node, index)
                    a, b_ = _bounds(params)
                    if a >= lo and b_ <= hi:
                        sole.input[0] = node.input[0]
                        _drop(graph, node)
                        stats["activation_into_q"] += 1
                        changed = True
                        break
            if node.op_type in ACTIVATIONS:
                src = index.producer.get(node.input[0])
                if src is not None and src.op_type == "DequantizeLinear":
                    params = _param_values(inits, src)
                    if params and params[0].size == 1:
                        lo, hi = clip_interval(node, index)
                        a, b_ = _bounds(params)
                        if a >= lo and b_ <= hi and out not in index.outputs:
                            _rename_reads(graph, out, node.input[0])
                            _drop(graph, node)
                            stats["activation_identity"] += 1
                            changed = True
                            break
            if node.op_type == "DequantizeLinear" and sole is not None and sole.op_type in ("Mul", "Div") \
                    and sole.input[0] == out and len(sole.input) == 2 and sole.input[1] in inits:
                k = numpy_helper.to_array(inits[sole.input[1]])
                params = _param_values(inits, node)
                if k.size == 1 and float(k) > 0 and params and params[0].size == 1 and \
                        sole.output[0] not in index.outputs:
                    factor = float(k) if sole.op_type == "Mul" else 1.0 / float(k)
                    new_scale = names(f"{node.input[1]}_scaled")
                    graph.initializer.append(numpy_helper.from_array(
                        (params[0].astype(np.float32) * np.float32(factor)).astype(np.float32), new_scale))
                    node.input[1] = new_scale
                    node.output[0] = sole.output[0]
                    _drop(graph, sole)
                    stats["scalar_into_dq"] += 1
                    changed = True
                    break
            if node.op_type == "DequantizeLinear" and readers:
                p1 = _param_values(inits, node)
                for reader in readers:
                    if reader.op_type != "QuantizeLinear" or reader.input[0] != out:
                        continue
                    p2 = _param_values(inits, reader)
                    if p1 and p2 and _same(p1, p2) and reader.output[0] not in index.outputs:
                        _rename_reads(graph, reader.output[0], node.input[0])
                        _drop(graph, reader)
                        stats["requantize_identity"] += 1
                        changed = True
                        break
                if changed:
                    break
            if node.op_type == "HardSigmoid" and sole is not None and sole.op_type == "QuantizeLinear":
                params = _param_values(inits, sole)
                attrs = attributes(node)
                alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
                if params and params[0].size == 1 and alpha > 0 and int(params[1].reshape(-1)[0]) == 0:
                    qmin, qmax = Q.qrange(params[2])
                    s = float(params[0].reshape(-1)[0])
                    if qmin == 0 and qmax * s <= 1.0 + 1e-7:
                        c = names(f"{node.name}_offset")
                        graph.initializer.append(numpy_helper.from_array(np.array(beta / alpha, np.float32), c))
                        new_s = names(f"{sole.input[1]}_hsig")
                        graph.initializer.append(numpy_helper.from_array(np.array(s / alpha, np.float32), new_s))
                        add = helper.make_node("Add", [node.input[0], c], [out], name=names(f"{node.name}_as_add"))
                        _replace(graph, node, add)
                        sole.input[1] = new_s
                        stats["hardsigmoid_as_add"] += 1
                        changed = True
                        break
        if not changed:
            break
    _quantize_offsets(graph, stats)
    return dict(stats)


def _quantize_offsets(graph: onnx.GraphProto, stats) -> None:
    """The Add created for HardSigmoid reads a float constant; give it a DQ'd constant so ORT
    sees DQ→Add←DQ→Q (QLinearAdd). β/α is stored exactly: uint8 code 255 with scale (β/α)/255."""
    index = GraphIndex.build(graph)
    inits = {t.name: t for t in graph.initializer}
    names = NameGenerator(graph)
    new = []
    for node in graph.node:
        if node.op_type != "Add" or not node.name.endswith("_as_add") and "_as_add_" not in node.name:
            continue
        c = node.input[1]
        if c not in inits:
            continue
        value = float(numpy_helper.to_array(inits[c]))
        src = index.producer.get(node.input[0])
        if src is None or src.op_type != "DequantizeLinear":
            continue
        dtype = _param_values(inits, src)[2]
        if value >= 0:
            scale, code, zero = value / 255.0 if value > 0 else 1.0, 255 if value > 0 else 0, 0
        else:
            scale, code, zero = -value / 255.0, 0, 255
        if dtype == "int8":
            scale, code, zero = abs(value) / 127.0 if value else 1.0, 127 if value >= 0 else -127, 0
        cq, cs, cz, cd = names(f"{c}_q"), names(f"{c}_s"), names(f"{c}_z"), names(f"{c}_dq")
        storage = np.int8 if dtype == "int8" else np.uint8
        graph.initializer.extend([numpy_helper.from_array(np.array(code, storage), cq),
                                  numpy_helper.from_array(np.array(scale, np.float32), cs),
                                  numpy_helper.from_array(np.array(zero, storage), cz)])
        new.append(helper.make_node("DequantizeLinear", [cq, cs, cz], [cd], name=names(f"{c}_DQ")))
        node.input[1] = cd
    if new:
        graph.node.extend(new)
        toposort(graph)


def remove_dead_nodes(graph: onnx.GraphProto) -> int:
    """Drop nodes none of whose outputs is read (by a node or as a graph output)."""
    removed = 0
    while True:
        used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
        keep = [n for n in graph.node if any(o in used for o in n.output if o)]
        if len(keep) == len(graph.node):
            return removed
        removed += len(graph.node) - len(keep)
        replace_nodes(graph, keep)


def _bounds(params) -> tuple[float, float]:
    scale, zero, dtype = params
    qmin, qmax = Q.qrange(dtype)
    s = float(scale.reshape(-1)[0])
    z = int(zero.reshape(-1)[0])
    return (qmin - z) * s, (qmax - z) * s


def _same(p1, p2) -> bool:
    return (p1[2] == p2[2] and p1[0].shape == p2[0].shape and np.array_equal(p1[0].astype(np.float32), p2[0].astype(np.float32))
            and np.array_equal(p1[1], p2[1]))


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new


def _drop(graph: onnx.GraphProto, node: onnx.NodeProto) -> None:
    for i, n in enumerate(graph.node):
        if n is node:
            del graph.node[i]
            return


def _replace(graph: onnx.GraphProto, old: onnx.NodeProto, new: onnx.NodeProto) -> None:
    for i, n in enumerate(graph.node):
        if n is old:
            graph.node[i].CopyFrom(new)
            return


# --------------------------------------------------------------------------- reference
def reference_model(before, placement: Placement):
    """The fake-quantized float model: ``before`` with the placement's quantization written as
    float arithmetic (no Q/DQ nodes). See the module docstring."""
    ref = before.copy()
    if placement.needs_opset21:
        upgrade_opset(ref)
    graph = ref.proto.graph
    index = GraphIndex.build(graph)
    by_name = {n.name: n for n in graph.node}
    names = NameGenerator(graph)
    new_nodes: list[onnx.NodeProto] = []

    def const(base, value):
        name = names(base)
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    codes_of: dict[str, str] = {}

    def fake(x: str, act: ActQ, out: str, base: str) -> None:
        s = const(f"{base}_s", np.float32(act.scale))
        z = names(f"{base}_z")
        graph.initializer.append(numpy_helper.from_array(np.array(act.zero_point, Q.NUMPY_STORAGE[act.dtype]), z))
        q = names(f"{base}_q")
        codes_of[base] = q
        new_nodes.extend([
            helper.make_node("QuantizeLinear", [x, s, z], [q], name=names(f"{base}_ref_Q")),
            helper.make_node("DequantizeLinear", [q, s, z], [out], name=names(f"{base}_ref_DQ")),
        ])

    for t, act in placement.acts.items():
        if placement.mode[t] == "producer":
            producer = index.producer[t]
            raw = names(f"{t}_float")
            for i, o in enumerate(producer.output):
                if o == t:
                    producer.output[i] = raw
            fake(raw, act, t, t)
        else:
            out = names(f"{t}_fq")
            fake(t, act, out, t)
            for node_name, pos in placement.readers[t]:
                by_name[node_name].input[pos] = out
    # float layers reading a quantized tensor read it through a per-axis DQ (identical values):
    # ONNX Runtime would otherwise quantize them by itself, at every optimization level, and the
    # reference would not be the float layer it claims to be
    shapes = ShapeTable(before.proto)
    readers = defaultdict(list)
    for node in graph.node:
        if placement.domain.get(node.name) in ("F", "H", None) and node.op_type in FENCE_OPS:
            readers[node.input[0]].append(node)
    fence_nodes = []
    for t, act in placement.acts.items():
        targets = readers.get(t, []) if placement.mode[t] == "producer" else []
        shape = shapes.shape(t)
        channels = shape[1] if shape and len(shape) > 1 and isinstance(shape[1], int) else None
        if not targets or channels is None:
            continue
        q_name = codes_of[t]
        s = const(f"{t}_fence_s", np.full(channels, act.scale, np.float32))
        z = names(f"{t}_fence_z")
        graph.initializer.append(numpy_helper.from_array(np.full(channels, act.zero_point, Q.NUMPY_STORAGE[act.dtype]), z))
        d = names(f"{t}_fenced")
        fence_nodes.append(helper.make_node("DequantizeLinear", [q_name, s, z], [d], name=names(f"{t}_fence"), axis=1))
        for node in targets:
            node.input[0] = d
    new_nodes.extend(fence_nodes)
    for (node_name, pos), (codes, act) in placement.consts.items():
        node = by_name[node_name]
        node.input[pos] = const(f"{node.input[pos]}_fq", Q.dequantize(codes, act.scale, act.zero_point))
    for node_name, spec in placement.weights.items():
        node = by_name[node_name]
        w = index.constant(node.input[1])
        base = node.input[1]
        if spec.precision == "fp16":
            # an FP16-typed initializer, as the target's layer reads it (see the FP16 loop below)
            node.input[1] = names(f"{base}_fq")
            graph.initializer.append(numpy_helper.from_array(Q.fp16_round(w).astype(np.float16), node.input[1]))
        else:
            # weights through a DequantizeLinear built here from the codes (not the emitted
            # graph): ORT then runs the same float kernels on both sides, so the comparison is
            # not blurred by constant-folding differences
            wq = spec.wq
            elem = ONNX_TYPE[wq.dtype]
            codes = names(f"{base}_codes")
            if wq.dtype in ("int4", "uint4"):
                graph.initializer.append(helper.make_tensor(codes, elem, list(wq.q.shape), wq.q.astype(np.int64).ravel().tolist()))
                zname = names(f"{base}_zp")
                graph.initializer.append(helper.make_tensor(zname, elem, list(wq.scale.shape),
                                                            wq.zero_points.astype(np.int64).ravel().tolist()))
            else:
                graph.initializer.append(numpy_helper.from_array(wq.q.astype(Q.NUMPY_STORAGE[wq.dtype]), codes))
                zname = names(f"{base}_zp")
                graph.initializer.append(numpy_helper.from_array(wq.zero_points.astype(Q.NUMPY_STORAGE[wq.dtype]), zname))
            sname = const(f"{base}_scale", wq.scale.astype(np.float32))
            attrs = {"axis": wq.axis}
            if wq.block_size:
                attrs["block_size"] = wq.block_size
            deq = names(f"{base}_fq")
            new_nodes.append(helper.make_node("DequantizeLinear", [codes, sname, zname], [deq], name=names(f"{base}_ref_DQ"), **attrs))
            if spec.transpose_b:
                tdeq = names(f"{base}_fqT")
                new_nodes.append(helper.make_node("Transpose", [deq], [tdeq], name=names(f"{base}_ref_T"), perm=[1, 0]))
                deq = tdeq
            node.input[1] = deq
        if spec.bias is not None:
            if spec.bias_codes is not None:
                bc = names(f"{node.input[2]}_codes")
                graph.initializer.append(numpy_helper.from_array(spec.bias_codes.astype(np.int32), bc))
                bs = const(f"{node.input[2]}_scale", spec.bias_scale.astype(np.float32))
                bd = names(f"{node.input[2]}_fq")
                new_nodes.append(helper.make_node("DequantizeLinear", [bc, bs], [bd], name=names(f"{node.input[2]}_ref_DQ"), axis=0))
                node.input[2] = bd
            elif spec.precision == "fp16":
                node.input[2] = names(f"{node.input[2]}_fq")
                graph.initializer.append(numpy_helper.from_array(Q.fp16_round(spec.bias).astype(np.float16), node.input[2]))
            else:
                node.input[2] = const(f"{node.input[2]}_fq", spec.bias.astype(np.float32))
    # FP16 layers are FP16-typed layers here too: Cast(float16) on every float activation input,
    # FP16 weights and bias, Cast(float) on the output. Not "Cast→Cast around a float layer":
    # ONNX Runtime's CPU provider has no FP16 Conv/Gemm kernel, so its mandatory
    # InsertCastTransformer wraps an FP16 layer in FP16→FP32 casts and then removes each
    # Cast(FP32→FP16)→Cast(FP16→FP32) pair it created as "precision free", at every optimization
    # level: it runs the layer in FP32 on unrounded activations. A float layer between explicit
    # Cast pairs keeps the rounding, so the two differed by FP16 rounding that the INT8 layers
    # behind it amplified (resnet20 on orin with an FP16 first conv: max abs 0.33 on the logits).
    # With the same FP16 layer on both sides ORT runs the same kernels, as for Q/DQ.
    shapes_now = ShapeTable(ref.proto)
    for node in list(graph.node):
        if placement.domain.get(node.name) == "H":
            stored = _fp16_stored(placement.weights.get(node.name))
            for pos, x in enumerate(node.input):
                if not x or pos in stored or not _fp16_input(index, shapes_now, x):
                    continue
                a = names(f"{x}_h")
                new_nodes.append(helper.make_node("Cast", [x], [a], name=names(f"{x}_to16"), to=TensorProto.FLOAT16))
                node.input[pos] = a
            out = node.output[0]
            raw = names(f"{out}_h")
            node.output[0] = raw
            new_nodes.append(helper.make_node("Cast", [raw], [out], name=names(f"{out}_to32"), to=TensorProto.FLOAT))
    graph.node.extend(new_nodes)
    toposort(graph)
    remove_unused_initializers(graph)
    return ref
