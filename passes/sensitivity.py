"""annotate-sensitivity: Fisher channel scores and per-tensor quantization sensitivity (analysis).

Everything is measured on the calibration split of ``--data`` (``samples`` items, default 256,
capped by the split), streamed in batches of ``batch`` through ONE forward+backward ONNX
Runtime model built once by :func:`hqpc.passes.gradients.build_gradient_model`. Without data
(or for multi-input models) seeded N(0, 1) inputs are used (``RANDOM_SAMPLES`` of them) and the
annotation says so. The graph is never changed.

Options: ``samples`` (256, capped by the calibration split), ``batch`` (16), ``loss`` (``auto`` =
``cross_entropy`` when the data has labels, else ``empirical_fisher``; or ``true_fisher``),
``precisions`` (``int4+int8+fp16``; '+'-separated), ``tensors`` (true; false computes the channel
scores only, for re-scoring during pruning: MobileNetV2 20 instead of 50 CPU-s), ``top`` (3, layers
named in the log), ``threads`` (0 = ONNX Runtime's default).

Notation. ``ℓ_n`` is the loss of sample n (``loss``: ``cross_entropy`` with the dataset labels
when the data has labels, else ``empirical_fisher``, i.e. the model's own argmax; or
``true_fisher``, labels sampled from the model's softmax). The gradient model computes the
batch MEAN ``L = (1/B) Σ_n ℓ_n``, so the per-sample gradient of an activation is
``g_n = B · ∂L/∂a[n]`` (activations carry the batch axis; no batch-1 runs are needed).
Expectations E[·] are means over the S samples used.

Channel score (Conv / Gemm output channels; Theis et al. 2018, Molchanov et al. 2019)::

    s_c = ½ · E_n[(Σ_spatial a_{n,c} · g_{n,c})²]

``a`` is the tensor that zeroing the channel (its weights and bias) sets to zero, taken as far
downstream as that stays exact (:func:`channel_tensor`): the Conv/Gemm output y, followed through
the element-wise activations f with f(0) = 0 that only it reads (Relu, LeakyRelu, HardSwish, Clip
with min ≤ 0 ≤ max, Identity, and the decomposed forms x·HardSigmoid(x), x·Sigmoid(x)). Zeroing
the weights and bias gives y_c = 0, hence a_c = f(0) = 0: the same edit. ``Σ_spatial a·g`` is the
derivative of ℓ_n w.r.t. a mask m_c multiplying a_c (a_c → m_c·a_c, m_c from 1 to 0), and s_c is
the second-order (Fisher) estimate of the loss increase of zeroing that channel. Why not y: the
Taylor expansion of ℓ along m_c·y_c crosses the kinks of f, those along m_c·a_c do not. With
ReLU6, y·∂ℓ/∂y = y·1[0<y<6]·∂ℓ/∂a drops every sample where the channel is saturated (y ≥ 6)
although zeroing moves a from 6 to 0 there, while a·∂ℓ/∂a counts it; for ReLU both are equal
(y·relu'(y) = relu(y)). BN that is not folded (BN(0) ≠ 0), a depthwise Conv (bias) or a tensor
read by several nodes ends the walk: the score is then measured on the last exact tensor.
Summing over a channel group is left to the consumer (prune).

Tensor sensitivity (every Conv/Gemm/MatMul weight initializer and every activation input of
those ops, per precision in ``precisions``): the DIRECTIONAL Fisher form with the actual
rounding error δ_p of that tensor at that precision::

    Δℓ(tensor, p) = ½ · E_n[(g_nᵀ δ_p)²] = ½ · δ_pᵀ F δ_p,      F = E_n[g_n g_nᵀ]

i.e. the full (not only the diagonal) empirical Fisher along δ, the second-order term of the
expected loss increase (the first-order term E[g]ᵀδ vanishes at a converged model and is not
used). With ``loss=true_fisher`` F is the sampled-label true Fisher and Δℓ estimates
KL(p_float || p_quantized) to second order. g_n is the gradient of ℓ_n w.r.t. the tensor (for
an activation: of that sample's activation; for a weight: the per-sample weight gradient).

* Weights W of y = op(x, W) (+ bias) — op is linear in W, so g_nᵀδ = Σ_out ∂ℓ_n/∂y_n ⊙ op(x_n, δ).
  Computed inside the ONNX Runtime graph in one of three exact forms:
  - 1x1 Conv (stride 1, no padding; the bulk of MobileNet FLOPs): the per-sample weight
    gradient G_n = dy_n · x_nᵀ ([Cout, HW] x [HW, Cin], one forward's FLOPs for all
    precisions), then g_nᵀδ_p = <G_n, δ_p> for every p with one [N, Cout·Cin] x [Cout·Cin, P]
    product;
  - other group-1 Conv and Gemm: ONE extra node op(x, [δ_1; …; δ_P]) with the precisions'
    deltas stacked on the output axis (same attributes, no bias), times dy, summed per block;
  - grouped/depthwise Conv and MatMul: one op(x, δ_p) per precision, times dy, summed.
  A weight read by several nodes sums their contributions before squaring (contributions of
  other op types are ignored). δ = fake_quant(W) − W with
  :func:`hqpc.runtime.quant.weight_quant` (symmetric, zero point 0, narrow grid, per output
  channel, MSE-optimal clipping, an existing QAT grid honoured — what ``insert-qdq`` does);
  INT4 of MatMul weights (and of Gemm on TensorRT targets) is block-wise along the reduction
  axis (block 32, or 16 for short rows), as ``insert-qdq`` places it. FP16: δ = fp16(W) − W.
* Activations x: g_nᵀδ_n = Σ ∂ℓ_n/∂x_n ⊙ (fq_p(x_n) − x_n), the fake quantization in the graph
  (QuantizeLinear/DequantizeLinear, round half to even; 4-bit grids: x clipped to the 4-bit
  range, then 8-bit storage with the 4-bit scale and zero point — exactly the 4-bit codes;
  FP16: two Casts). Ranges: the min-max over the same samples (a forward-only first pass with
  in-graph ReduceMin/ReduceMax); grid from the target's convention: asymmetric uint8 / uint4
  on ONNX Runtime targets, symmetric int8 / int4 on TensorRT targets. Min-max is the
  conservative choice: ``calibrate`` may pick tighter ranges later, which lowers the noise.

When a is the output of a 1x1 Conv itself (no zero-preserving activation follows), the channel
score reuses G_n: Σ_spatial y_c·dy_c = <W_c, G_n[c]> + b_c·Σ dy_c.

Annotation (``model.annotations["sensitivity"]``, metadata ``hqpc.sensitivity``)::

    {"channels": {conv_or_gemm_node: [s_c per output channel]},
     "tensors":  {tensor: {"int4": Δℓ, "int8": Δℓ, "fp16": Δℓ}},
     "loss": "cross_entropy" | "empirical_fisher" | "true_fisher",
     "samples": S,
     "method": {"channels", "tensors", "weights", "activations": formulas and quantizers (text),
                "source", "batch", "precisions", "mean_loss",
                "activation_grid": {p: {"grid", "symmetric"}}, "activation_ranges": {tensor: [lo, hi]},
                "activation_qparams": {tensor: {p: {"scale", "zero_point"}}},
                "layers": {node: {"op", "output", "weight", "inputs", "scored"}}},  # scored: the tensor a
     "summary": {"int8_most"|"int8_least"|"int4_most"|"int4_least"|"channel_most"|"channel_least":
                 [[node, value], ...]}}

Values are in nats of mean loss per sample. The log (printed by the CLI) names the ``top``
most and least sensitive layers by INT8 weight sensitivity and by mean channel score.

Cost and memory. Only per-sample reductions ([B, C] per layer, [B, P] per tensor) leave ONNX
Runtime, summed in float64; images are decoded one batch at a time (twice: ranges, then
gradients). The reduction nodes are placed so that ONNX Runtime runs each one as soon as its
gradient exists (:func:`_schedule_early`): the batch's gradients are never all alive at once.
MobileNetV2, 256 samples, batch 16: ≈ 50 CPU-seconds, peak RSS ≈ 1.7 GB (batch 32 doubles
the memory for no speed gain, hence the default 16).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hqpc.errors import PipelineError
from hqpc.graphutil import GraphIndex, attributes
from hqpc.passmanager import Pass, PassInfo
from hqpc.registry import register_pass
from hqpc.runtime import ort as ort_rt
from hqpc.runtime import quant as Q
from hqpc.runtime.progress import progress

PRECISIONS = ("int4", "int8", "fp16")
LINEAR_OPS = ("Conv", "Gemm", "MatMul")
CHANNEL_OPS = ("Conv", "Gemm")
LOSSES = ("auto", "cross_entropy", "empirical_fisher", "true_fisher")
RANDOM_SAMPLES = 16
INT4_BLOCK = 32
PREFIX = "hqpc_sens::"


# --------------------------------------------------------------------------- layers
@dataclass
class Layer:
    """One Conv/Gemm/MatMul node: its output, constant weight (if any) and activation inputs."""

    node: onnx.NodeProto
    output: str
    weight: str | None = None
    weight_slot: int | None = None
    acts: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def channels(self) -> bool:
        return self.node.op_type in CHANNEL_OPS


def find_layers(graph: onnx.GraphProto) -> list[Layer]:
    """Conv/Gemm/MatMul nodes (default domain) in graph order. The weight is a float
    initializer in the weight slot (Conv: 1; Gemm/MatMul: 1, else 0); activation inputs are
    the other non-constant data inputs (never a bias)."""
    index = GraphIndex.build(graph)
    layers = []
    for node in graph.node:
        if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx") or not node.output[0]:
            continue
        layer = Layer(node=node, output=node.output[0])
        slots = (0, 1) if node.op_type == "Conv" else (1, 0)
        for slot in slots:
            name = node.input[slot] if slot < len(node.input) else ""
            if not name:
                continue
            init = index.initializers.get(name)
            if init is not None:
                if (layer.weight is None and init.data_type == TensorProto.FLOAT
                        and not (node.op_type == "Conv" and slot == 0)):
                    layer.weight, layer.weight_slot = name, slot
            elif not index.is_constant(name):
                layer.acts.append(name)
        layer.acts.sort(key=lambda n: list(node.input).index(n))
        layers.append(layer)
    return layers


ZERO_PRESERVING = ("Relu", "LeakyRelu", "HardSwish", "Identity")
GATES = ("HardSigmoid", "Sigmoid")


def channel_tensor(index: GraphIndex, layer: Layer) -> str:
    """The tensor whose channels the Fisher score of ``layer`` is measured on: the layer's output
    followed through element-wise ops f with f(0) = 0 while the current tensor has exactly one
    reader (or two: x -> HardSigmoid/Sigmoid -> Mul(x, ·), i.e. hard-swish / swish written out)
    and is not a graph output. Zeroing the layer's weights and bias zeroes the returned tensor's
    channel exactly; see the module docstring for why the score is measured there."""
    name = layer.output
    while name not in index.outputs:
        readers = index.consumers.get(name, [])
        nxt = None
        if len(readers) == 1:
            node = readers[0]
            if node.domain not in ("", "ai.onnx") or node.input[0] != name or len(node.output) != 1:
                break
            if node.op_type in ZERO_PRESERVING:
                nxt = node.output[0]
            elif node.op_type == "Clip":
                lo, hi = attributes(node).get("min"), attributes(node).get("max")
                if len(node.input) > 1 and node.input[1]:
                    lo = index.constant(node.input[1])
                if len(node.input) > 2 and node.input[2]:
                    hi = index.constant(node.input[2])
                known = all(v is None or (np.size(v) == 1) for v in (lo, hi)) and \
                    not any(len(node.input) > i and node.input[i] and not index.is_constant(node.input[i]) for i in (1, 2))
                if known and (lo is None or float(np.asarray(lo).reshape(-1)[0]) <= 0.0) and \
                        (hi is None or float(np.asarray(hi).reshape(-1)[0]) >= 0.0):
                    nxt = node.output[0]
        elif len(readers) == 2:
            gate = next((n for n in readers if n.op_type in GATES and n.input[0] == name), None)
            mul = next((n for n in readers if n.op_type == "Mul"), None)
            if gate is not None and mul is not None and gate is not mul and \
                    sorted(mul.input) == sorted([name, gate.output[0]]) and \
                    len(index.consumers.get(gate.output[0], [])) == 1 and gate.output[0] not in index.outputs:
                nxt = mul.output[0]
        if nxt is None:
            break
        name = nxt
    return name


# --------------------------------------------------------------------------- quantization noise
def weight_axis(node: onnx.NodeProto, slot: int, ndim: int) -> int:
    """Output-channel axis of a weight in ``slot`` of a Conv/Gemm/MatMul."""
    attrs = attributes(node)
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        if slot == 1:
            return 0 if attrs.get("transB", 0) else 1
        return 1 if attrs.get("transA", 0) else 0
    return ndim - 1 if slot == 1 else max(ndim - 2, 0)  # MatMul B [..., K, N] / A [..., M, K]


def _reduction_axis(node: onnx.NodeProto, slot: int, ndim: int) -> int:
    attrs = attributes(node)
    if node.op_type == "Gemm":
        if slot == 1:
            return 1 if attrs.get("transB", 0) else 0
        return 0 if attrs.get("transA", 0) else 1
    return max(ndim - 2, 0) if slot == 1 else ndim - 1


def quantized_weight(w: np.ndarray, node: onnx.NodeProto, slot: int, precision: str,
                     backend: str = "onnxruntime") -> np.ndarray:
    """The float value the weight takes at ``precision`` (as insert-qdq would store it)."""
    w = np.asarray(w, dtype=np.float32)
    if precision == "fp16":
        return Q.fp16_round(w)
    if precision not in ("int8", "int4"):
        raise ValueError(f"unknown precision {precision!r}")
    if w.ndim < 2:
        return Q.weight_quant(w.reshape(1, -1), 0, precision).dequantized().reshape(w.shape)
    blockwise = precision == "int4" and (node.op_type == "MatMul" or (node.op_type == "Gemm" and backend == "tensorrt"))
    if blockwise:
        red = _reduction_axis(node, slot, w.ndim)
        block = INT4_BLOCK if w.shape[red] >= INT4_BLOCK else 16
        return Q.weight_quant(w, red, "int4", block_size=block, grid=False).dequantized()
    return Q.weight_quant(w, weight_axis(node, slot, w.ndim), precision, grid=True).dequantized()


def activation_grid(target, precision: str) -> tuple[str, bool]:
    """(grid, symmetric) of activations at ``precision`` on ``target`` (int8/int4 only)."""
    conventions = getattr(target, "quantization", {}) or {}
    backend = getattr(target, "backend", "onnxruntime") or "onnxruntime"
    symmetric = conventions.get("zero_point") == "zero" or backend != "onnxruntime"
    bits = "8" if precision == "int8" else "4"
    return (f"int{bits}", True) if symmetric else (f"uint{bits}", False)


def parse_precisions(text) -> tuple[str, ...]:
    """``"int8+fp16"`` (also ',', ':', '/', ';' or spaces; quote commas in pipeline text) or a
    list -> the precisions in canonical order; PipelineError naming the option otherwise."""
    if isinstance(text, (list, tuple)):
        items = [str(t) for t in text]
    else:
        items = [t for t in re.split(r"[\s,+:/;]+", str(text).lower()) if t]
    bad = [t for t in items if t not in PRECISIONS]
    if bad or not items:
        raise PipelineError(f"annotate-sensitivity: precisions must be a '+'-separated subset of "
                            f"{'+'.join(PRECISIONS)}, got {text!r}")
    return tuple(p for p in PRECISIONS if p in items)


# --------------------------------------------------------------------------- data
@dataclass
class Source:
    """Where the samples come from and how many."""

    input_name: str
    samples: int
    labeled: bool
    description: str
    dataset: object = None  # hqpc.runtime.data.Dataset or None (random inputs)

    def batches(self, batch: int, model: onnx.ModelProto, seed: int) -> Iterator[tuple[dict, np.ndarray | None]]:
        if self.dataset is None:
            feeds = ort_rt.random_feeds(model, seed=seed, batch=self.samples)
            for start in range(0, self.samples, batch):
                yield {k: v[start:start + batch] for k, v in feeds.items()}, None
            return
        seen = 0
        for x, y in self.dataset.batches(batch):
            if seen >= self.samples:
                return
            keep = min(len(x), self.samples - seen)
            seen += keep
            yield {self.input_name: x[:keep]}, (None if y is None else y[:keep])


def data_source(model: onnx.ModelProto, ctx, samples: int) -> Source:
    """The calibration split of ``ctx.data`` (single-input models), else seeded random inputs."""
    inputs = ort_rt.graph_inputs(model)
    if ctx.data is not None and len(inputs) == 1:
        dataset = ctx.data.split("calib")
        n = min(int(samples), len(dataset))
        if n > 0:
            labeled = ctx.data.labels is not None
            return Source(inputs[0].name, n, labeled,
                          f"calibration split: {n} of {len(dataset)} samples of {ctx.data.path.name}", dataset)
    n = min(int(samples), RANDOM_SAMPLES)
    why = "no --data" if ctx.data is None else ("empty calibration split" if len(inputs) == 1 else
                                                 f"{len(inputs)} graph inputs")
    return Source("", n, False, f"random: N(0,1) inputs, seed {ctx.seed}, {n} samples ({why})")


# --------------------------------------------------------------------------- graph building
class _Builder:
    """Appends nodes/initializers with fresh names to a graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.used = {t.name for t in graph.initializer} | {i.name for i in graph.input} | \
            {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
        self.count = 0

    def fresh(self, hint: str) -> str:
        while True:
            self.count += 1
            name = f"{PREFIX}{hint}_{self.count}"
            if name not in self.used:
                self.used.add(name)
                return name

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        name = self.fresh(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str = "t", **attrs) -> str:
        out = self.fresh(hint)
        self.graph.node.append(helper.make_node(op_type, inputs, [out], name=self.fresh(f"{hint}_{op_type}"), **attrs))
        return out

    def output(self, name: str) -> None:
        self.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))

    def reshape(self, x: str, shape: list[int], hint: str = "rs") -> str:
        return self.op("Reshape", [x, self.const(np.array(shape, np.int64), "shape")], hint)

    def dot_per_sample(self, a: str, b: str) -> str:
        """Σ over everything but the batch axis of a ⊙ b (same shape) -> [N, 1]."""
        flat = self.op("Flatten", [self.op("Mul", [a, b], "prod")], "flat", axis=1)
        return self.op("ReduceSum", [flat, self.const(np.array([1], np.int64), "axes")], "dot", keepdims=1)

    def dot_per_channel(self, a: str, b: str) -> str:
        """Σ over the spatial axes of a ⊙ b ([N, C, ...]) -> [N, C]."""
        prod = self.reshape(self.op("Mul", [a, b], "prod"), [0, 0, -1])
        return self.op("ReduceSum", [prod, self.const(np.array([2], np.int64), "axes")], "cdot", keepdims=0)


def _fake_quant_delta(b: _Builder, x: str, scale: float, zero: int, dtype: str, symmetric: bool) -> str:
    """fake_quant(x) - x with QuantizeLinear/DequantizeLinear (round half to even). 4-bit grids
    use 8-bit storage with the 4-bit scale and zero point, x clipped to the 4-bit grid's range
    first (exactly the 4-bit codes)."""
    qmin, qmax = Q.qrange(dtype, narrow=symmetric and dtype.startswith("int"))
    storage = np.int8 if dtype.startswith("int") else np.uint8
    s = b.const(np.array(scale, np.float32), "scale")
    z = b.const(np.array(zero, storage), "zp")
    src = x
    if Q.BITS[dtype] < 8:
        lo = np.float32((qmin - zero) * np.float32(scale))
        hi = np.float32((qmax - zero) * np.float32(scale))
        src = b.op("Clip", [x, b.const(np.array(lo, np.float32), "lo"), b.const(np.array(hi, np.float32), "hi")],
                   "clip")
    deq = b.op("DequantizeLinear", [b.op("QuantizeLinear", [src, s, z], "q"), s, z], "deq")
    return b.op("Sub", [deq, x], "delta")


def _fp16_delta(b: _Builder, x: str) -> str:
    half = b.op("Cast", [b.op("Cast", [x], "f16", to=TensorProto.FLOAT16)], "f32", to=TensorProto.FLOAT)
    return b.op("Sub", [half, x], "delta")


def _stackable(layer: Layer, ndim: int) -> bool:
    """Whether the precisions' δ can be stacked along the output axis into ONE node (the output
    then holds P contiguous blocks per sample): group-1 Conv and Gemm with the weight in B."""
    node = layer.node
    if node.op_type == "Conv":
        return attributes(node).get("group", 1) == 1
    return node.op_type == "Gemm" and layer.weight_slot == 1 and ndim == 2


def _layer_with_weight(b: _Builder, layer: Layer, delta: str) -> str:
    """The layer's op with its weight replaced by ``delta`` and no bias: op(x, δ)."""
    node = layer.node
    inputs = list(node.input[:2])
    inputs[layer.weight_slot] = delta
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm":
        attrs.pop("beta", None)
    return b.op(node.op_type, inputs, "dlin", **attrs)


def _pointwise(layer: Layer, w: np.ndarray) -> bool:
    """A 1x1 group-1 Conv with stride 1, no padding, no dilation: a per-pixel matrix product."""
    node = layer.node
    if node.op_type != "Conv" or w.ndim < 3 or any(k != 1 for k in w.shape[2:]) or node.input[0] not in layer.acts:
        return False
    a = attributes(node)
    return (a.get("group", 1) == 1 and all(s == 1 for s in a.get("strides", [1])) and not any(a.get("pads", [0]))
            and all(d == 1 for d in a.get("dilations", [1])) and a.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))


def _pointwise_weight_grad(b: _Builder, layer: Layer, w: np.ndarray, grad_y: str) -> str:
    """[N, Cout, Cin]: the per-sample weight gradient of a 1x1 Conv, G_n = dy_n · x_nᵀ
    ([Cout, HW] x [HW, Cin]; one forward's FLOPs), times 1/B like every gradient here."""
    c_out, c_in = w.shape[0], w.shape[1]
    dy = b.reshape(grad_y, [0, c_out, -1])
    xt = b.op("Transpose", [b.reshape(layer.node.input[0], [0, c_in, -1])], "xt", perm=[0, 2, 1])
    return b.op("MatMul", [dy, xt], "gw")


def _weight_terms(b: _Builder, layer: Layer, deltas: list[np.ndarray], grad_y: str, gw: str | None) -> str:
    """[N, P]: g_nᵀδ_p for every sample n and precision p (g_n = per-sample dℓ/dW / B).

    * 1x1 Conv (the bulk of MobileNet FLOPs; ``gw`` = its per-sample weight gradient from
      :func:`_pointwise_weight_grad`): [N, Cout·Cin] x [Cout·Cin, P];
    * group-1 Conv / Gemm(B): one node with the P deltas stacked on the output axis, its
      output [N, P·C, ...] multiplied by dy and summed per precision block;
    * otherwise (grouped / depthwise Conv, MatMul): one op(x, δ_p) per precision."""
    p = len(deltas)
    if gw is not None:
        table = np.stack([d.reshape(-1) for d in deltas], axis=1).astype(np.float32)  # [Cout*Cin, P]
        return b.op("MatMul", [b.reshape(gw, [0, -1]), b.const(table, "dw")], "dot")
    if p > 1 and _stackable(layer, deltas[0].ndim):
        axis = 0 if layer.node.op_type == "Conv" else weight_axis(layer.node, 1, 2)
        stacked = b.const(np.concatenate(deltas, axis=axis).astype(np.float32), "dw")
        out = _layer_with_weight(b, layer, stacked)  # [N, P*C, ...]
        prod = b.op("Mul", [b.reshape(out, [0, p, -1]), b.reshape(grad_y, [0, 1, -1])], "prod")
        return b.op("ReduceSum", [prod, b.const(np.array([2], np.int64), "axes")], "dot", keepdims=0)
    terms = [b.dot_per_sample(_layer_with_weight(b, layer, b.const(d.astype(np.float32), "dw")), grad_y)
             for d in deltas]
    return terms[0] if p == 1 else b.op("Concat", terms, "stack", axis=1)


# --------------------------------------------------------------------------- the pass
@register_pass
class AnnotateSensitivity(Pass):
    """Fisher channel scores and per-tensor quantization sensitivity; see the module docstring."""

    info = PassInfo("annotate-sensitivity", opt_level=3, analysis=True,
                    description="Fisher channel scores and per-tensor INT4/INT8/FP16 sensitivity "
                                "(½E[(gᵀδ)²]) on calibration data")
    options = {"samples": 256, "batch": 16, "loss": "auto", "precisions": "int4+int8+fp16", "top": 3,
               "threads": 0, "tensors": True}

    def run(self, model, ctx) -> bool:
        start = time.perf_counter()
        cfg = self.config
        if cfg["samples"] < 1 or cfg["batch"] < 1:
            raise PipelineError("annotate-sensitivity: samples and batch must be >= 1")
        if cfg["loss"] not in LOSSES:
            raise PipelineError(f"annotate-sensitivity: loss must be one of {', '.join(LOSSES)}, got {cfg['loss']!r}")
        precisions = parse_precisions(cfg["precisions"])
        proto = model.proto
        source = data_source(proto, ctx, cfg["samples"])
        loss = cfg["loss"]
        if loss == "auto":
            loss = "cross_entropy" if source.labeled else "empirical_fisher"
        if loss == "cross_entropy" and not source.labeled:
            raise PipelineError("annotate-sensitivity: loss=cross_entropy needs labeled --data "
                                f"(samples: {source.description}); use loss=empirical_fisher or true_fisher")
        layers = find_layers(proto.graph)
        if not layers:
            model.annotations["sensitivity"] = {
                "channels": {}, "tensors": {}, "loss": loss, "samples": 0,
                "method": {"source": source.description, "note": "no Conv/Gemm/MatMul nodes"}, "summary": {}}
            ctx.log("annotate-sensitivity: no Conv/Gemm/MatMul nodes; nothing to score")
            return False
        from hqpc.passes.gradients import GradientError

        try:
            result = compute_sensitivity(proto, layers, source, loss, precisions, ctx, batch=cfg["batch"],
                                         threads=cfg["threads"] or None, with_tensors=cfg["tensors"])
        except GradientError as exc:  # e.g. an op without a gradient rule, or no classifier output
            ctx.log(f"annotate-sensitivity: skipped, the model cannot be differentiated: {exc}")
            return False
        result["summary"] = summarize(result, layers, cfg["top"])
        model.annotations["sensitivity"] = result
        _log_summary(ctx, result, len(layers), time.perf_counter() - start)
        return False


def compute_sensitivity(proto: onnx.ModelProto, layers: list[Layer], source: Source, loss: str,
                        precisions: tuple[str, ...], ctx, batch: int = 16, threads: int | None = None,
                        with_tensors: bool = True) -> dict:
    """The annotation dict (without ``summary``) for ``layers`` of ``proto``; ``with_tensors=False``
    computes the channel scores only (about 40 % of the cost; ``"tensors"`` is then empty)."""
    from hqpc.passes.gradients import build_gradient_model

    backend = getattr(ctx.target, "backend", "onnxruntime") or "onnxruntime"
    index = GraphIndex.build(proto.graph)
    int_precisions = [p for p in precisions if p != "fp16"]
    acts = list(dict.fromkeys(a for layer in layers for a in layer.acts)) if with_tensors else []
    weights: dict[str, list[Layer]] = {}
    for layer in layers:
        if layer.weight is not None and with_tensors:
            weights.setdefault(layer.weight, []).append(layer)

    # ---- pass 1: activation ranges (min-max over the same samples), forward only
    ranges: dict[str, tuple[float, float]] = {}
    if acts and int_precisions:
        ranges = activation_ranges(proto, acts, source, batch, ctx, threads)
    grids = {p: activation_grid(ctx.target, p) for p in int_precisions}

    # ---- the gradient model: d loss / d (layer outputs, activation inputs)
    channel_layers = [layer for layer in layers if layer.channels]
    scored = {layer.name: channel_tensor(index, layer) for layer in channel_layers}
    wrt = list(dict.fromkeys([scored[layer.name] for layer in channel_layers]
                             + [l.output for ls in weights.values() for l in ls] + acts))
    shapes = _input_shapes(proto, source)
    gm = build_gradient_model(proto, wrt, loss=loss, input_shapes=shapes)
    graph = gm.model.graph
    b = _Builder(graph)
    grad = _gradient_sources(graph, gm.grad_outputs)
    first_new = len(graph.node)
    outputs: dict[str, tuple[str, str]] = {}  # graph output -> ("channel" | "tensor", node or tensor)

    def stack(terms: list[str]) -> str:  # [N, 1] / [N, P] pieces -> [N, P]
        return terms[0] if len(terms) == 1 else b.op("Concat", terms, "stack", axis=1)

    terms: dict[str, list[str]] = {}  # weight -> [N, P] term per user
    for layer in layers:
        w = None if layer.weight is None or not with_tensors else \
            numpy_helper.to_array(index.initializers[layer.weight]).astype(np.float32)
        bias = index.constant(layer.node.input[2]) if len(layer.node.input) > 2 and layer.node.input[2] else None
        gw = None
        if w is not None and _pointwise(layer, w) and (bias is not None or len(layer.node.input) < 3
                                                       or not layer.node.input[2]):
            gw = _pointwise_weight_grad(b, layer, w, grad[layer.output])  # [N, Cout, Cin]
        if layer.channels:
            if scored[layer.name] != layer.output:  # after a zero-preserving activation
                r = b.dot_per_channel(scored[layer.name], grad[scored[layer.name]])
            elif gw is not None:  # Σ_hw y·dy = Σ_ci W·G + bias · Σ_hw dy
                r = b.op("ReduceSum", [b.op("Mul", [gw, b.const(w.reshape(w.shape[0], -1), "w2d")], "wg"),
                                       b.const(np.array([2], np.int64), "axes")], "cdot", keepdims=0)
                if bias is not None:
                    dy = b.reshape(grad[layer.output], [0, w.shape[0], -1])
                    gsum = b.op("ReduceSum", [dy, b.const(np.array([2], np.int64), "axes")], "gsum", keepdims=0)
                    r = b.op("Add", [r, b.op("Mul", [gsum, b.const(bias.astype(np.float32), "bias")], "bg")], "cdot")
            else:
                r = b.dot_per_channel(layer.output, grad[layer.output])
            outputs[r] = ("channel", layer.name)
        if w is not None:
            deltas = [quantized_weight(w, layer.node, layer.weight_slot, p, backend) - w for p in precisions]
            terms.setdefault(layer.weight, []).append(_weight_terms(b, layer, deltas, grad[layer.output], gw))
    for wname, per_user in terms.items():
        outputs[per_user[0] if len(per_user) == 1 else b.op("Sum", per_user, "wsum")] = ("tensor", wname)
    act_info: dict[str, dict] = {}
    for name in acts:
        dots = []
        for p in precisions:
            if p == "fp16":
                delta = _fp16_delta(b, name)
            else:
                dtype, symmetric = grids[p]
                lo, hi = ranges[name]
                scale, zero = Q.qparams_from_range(lo, hi, dtype, symmetric)
                act_info.setdefault(name, {})[p] = {"scale": float(scale), "zero_point": int(zero)}
                delta = _fake_quant_delta(b, name, float(scale), int(zero), dtype, symmetric)
            dots.append(b.dot_per_sample(delta, grad[name]))
        outputs[stack(dots)] = ("tensor", name)
    del graph.output[:]
    b.output(gm.loss_output)
    for name in outputs:
        b.output(name)
    _schedule_early(graph, first_new)
    session = _session(gm.model, threads)

    # ---- stream the samples: accumulate Σ_n (B · r_n)² in float64
    sums: dict[str, np.ndarray] = {}
    total, loss_sum = 0, 0.0
    names = [gm.loss_output] + list(outputs)
    rng = np.random.default_rng(ctx.seed)
    n_batches = -(-source.samples // batch)
    for feeds, labels in progress(source.batches(batch, proto, ctx.seed), n_batches, "sensitivity", ctx):
        values = session.run(names, gm.feeds(feeds, labels if loss == "cross_entropy" else None, rng))
        n = _batch_size(feeds)
        loss_sum += float(np.asarray(values[0]).reshape(-1)[0]) * n
        for name, value in zip(outputs, values[1:]):
            per_sample = np.asarray(value, dtype=np.float64).reshape(n, -1) * n
            sq = np.square(per_sample).sum(axis=0)
            sums[name] = sums[name] + sq if name in sums else sq
        total += n
    del session

    channels: dict[str, list[float]] = {}
    tensors: dict[str, dict[str, float]] = {}
    for name, (kind, key) in outputs.items():
        value = (0.5 * sums[name] / max(total, 1)).reshape(-1)
        if kind == "channel":
            channels[key] = [float(v) for v in value]
        else:
            tensors[key] = {p: float(v) for p, v in zip(precisions, value)}
    method = {
        "channels": "s_c = 1/2 E_n[(sum_spatial a_nc * g_nc)^2], a = the Conv/Gemm output followed through "
                    "zero-preserving activations (layers[node].scored), g_n = per-sample dl_n/da",
        "tensors": "not computed (tensors=false)" if not with_tensors else "1/2 E_n[(g_n . delta_p)^2] (directional empirical Fisher, actual rounding error delta_p); "
                   "weights: g_W.delta = sum(dl/dy * op(x, delta_W)); activations: sum(dl/dx * (fq(x) - x))",
        "weights": "symmetric, zero point 0, narrow grid, per output channel, MSE clipping, QAT grid kept "
                   "(runtime.quant.weight_quant); int4 block-wise (32) on MatMul"
                   + (" and Gemm" if backend == "tensorrt" else "") + "; fp16: round to nearest even",
        "activations": "min-max range over the samples; grid per target convention; fp16: Cast round trip",
        "activation_grid": {p: {"grid": g, "symmetric": s} for p, (g, s) in grids.items()},
        "activation_ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in ranges.items()},
        "activation_qparams": act_info,
        "source": source.description,
        "batch": int(batch),
        "precisions": list(precisions),
        "mean_loss": loss_sum / max(total, 1),
        "layers": {layer.name: {"op": layer.node.op_type, "output": layer.output, "weight": layer.weight,
                                "inputs": list(layer.acts), **({"scored": scored[layer.name]} if layer.name in scored else {})}
                   for layer in layers},
    }
    return {"channels": channels, "tensors": tensors, "loss": loss, "samples": int(total), "method": method}


def _gradient_sources(graph: onnx.GraphProto, grad_outputs: dict[str, str]) -> dict[str, str]:
    """wrt name -> the tensor holding its gradient inside the graph (the input of the builder's
    ``Identity -> grad::<name>`` output node, which is then removed: the gradients stay internal
    and our reductions can run as soon as each gradient exists)."""
    wanted = {out: w for w, out in grad_outputs.items()}
    sources = dict(grad_outputs)
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] in wanted:
            sources[wanted[node.output[0]]] = node.input[0]
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return sources


def _schedule_early(graph: onnx.GraphProto, start: int) -> None:
    """Move every node from index ``start`` on (our additions) to right after its inputs exist,
    keeping the others in order. ONNX Runtime executes in graph order where the dependencies
    allow, so each reduction runs, and frees its temporaries, as soon as its activation and
    gradient exist: the batch's gradients are never all alive at once."""
    base, extra = list(graph.node[:start]), list(graph.node[start:])
    available = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    missing = []
    waiting: dict[str, list[int]] = {}
    for k, node in enumerate(extra):
        need = {i for i in node.input if i not in available}
        missing.append(len(need))
        for name in need:
            waiting.setdefault(name, []).append(k)
    order: list[onnx.NodeProto] = []

    def emit(node: onnx.NodeProto) -> None:
        stack = [node]
        while stack:
            current = stack.pop()
            order.append(current)
            for name in current.output:
                available.add(name)
                for k in waiting.pop(name, []):
                    missing[k] -= 1
                    if missing[k] == 0:
                        stack.append(extra[k])

    for node in [extra[k] for k in range(len(extra)) if missing[k] == 0]:
        emit(node)
    for node in base:
        emit(node)
    if len(order) != len(base) + len(extra):  # pragma: no cover - a dangling input
        raise RuntimeError("annotate-sensitivity: internal error scheduling the reduction nodes")
    # ONNX Runtime's default execution order is a reverse depth-first search from the leaf
    # nodes, the LAST leaf first: list the leaves (the nodes producing our outputs) at the end,
    # in reverse of the order in which their inputs become ready, so the reduction that is ready
    # first (the last layer's, early in the backward pass) is executed first and each one runs
    # as soon as its gradient exists.
    outputs = {o.name for o in graph.output}
    leaves = [n for n in order if any(o in outputs for o in n.output)]
    rest = [n for n in order if not any(o in outputs for o in n.output)]
    del graph.node[:]
    graph.node.extend(rest + leaves[::-1])


def activation_ranges(proto: onnx.ModelProto, names: list[str], source: Source, batch: int, ctx,
                      threads: int | None) -> dict[str, tuple[float, float]]:
    """Min and max of each tensor over the samples (forward only; in-graph reductions)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    b = _Builder(m.graph)
    del m.graph.output[:]
    outs = {}
    for name in names:
        outs[name] = (b.op("ReduceMin", [name], "min", keepdims=0), b.op("ReduceMax", [name], "max", keepdims=0))
        b.output(outs[name][0])
        b.output(outs[name][1])
    session = _session(m, threads)
    flat = [o for pair in outs.values() for o in pair]
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    n_batches = -(-source.samples // batch)
    for feeds, _ in progress(source.batches(batch, proto, ctx.seed), n_batches, "sensitivity ranges", ctx):
        values = dict(zip(flat, session.run(flat, feeds)))
        for name, (a, c) in outs.items():
            lo[name] = min(lo[name], float(values[a]))
            hi[name] = max(hi[name], float(values[c]))
    return {n: (min(lo[n], 0.0) if np.isfinite(lo[n]) else 0.0, max(hi[n], 0.0) if np.isfinite(hi[n]) else 0.0)
            for n in names}


def _session(model: onnx.ModelProto, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = False
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting on shared cores
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _batch_size(feeds: dict) -> int:
    for v in feeds.values():
        if np.ndim(v) >= 1:
            return int(np.shape(v)[0])
    return 1


def _input_shapes(proto: onnx.ModelProto, source: Source) -> dict:
    """Pin every non-batch input dim to the data's (dynamic spatial dims break shape inference)."""
    shapes = {}
    for value in ort_rt.graph_inputs(proto):
        dims = ort_rt.input_shape(value)
        if not dims:
            continue
        if source.dataset is not None and value.name == source.input_name:
            concrete = [None, *source.dataset.sample_shape]
        else:
            concrete = [None] + ort_rt.concrete_shape(value)[1:]
        if len(concrete) != len(dims):
            continue
        first = dims[0] if isinstance(dims[0], str) else "N"
        shapes[value.name] = [first] + [d if isinstance(d, int) and d > 0 else c for d, c in zip(dims[1:], concrete[1:])]
    return shapes


# --------------------------------------------------------------------------- report
def layer_table(result: dict, layers: list[Layer]) -> list[dict]:
    """One row per Conv/Gemm/MatMul: weight sensitivity per precision, mean/sum channel score."""
    rows = []
    for layer in layers:
        row = {"node": layer.name, "op": layer.node.op_type, "weight": layer.weight}
        row.update({p: v for p, v in (result["tensors"].get(layer.weight) or {}).items()})
        scores = result["channels"].get(layer.name)
        if scores:
            row["channel_mean"] = float(np.mean(scores))
            row["channel_sum"] = float(np.sum(scores))
            row["channels"] = len(scores)
        rows.append(row)
    return rows


def summarize(result: dict, layers: list[Layer], top: int) -> dict:
    rows = layer_table(result, layers)
    out = {}
    for key, label in (("int8", "int8"), ("int4", "int4"), ("channel_mean", "channel")):
        have = [r for r in rows if key in r]
        if not have:
            continue
        ranked = sorted(have, key=lambda r: (-r[key], r["node"]))
        out[f"{label}_most"] = [[r["node"], r[key]] for r in ranked[:top]]
        out[f"{label}_least"] = [[r["node"], r[key]] for r in ranked[::-1][:top]]
    return out


def short_name(name: str, limit: int = 48) -> str:
    """A node name for one log line: TF exports join fused op names with ';' (keep the first)."""
    first = name.split(";")[0]
    first = first + ";…" if first != name else first
    return first if len(first) <= limit else "…" + first[-(limit - 1):]


def _log_summary(ctx, result: dict, n_layers: int, seconds: float) -> None:
    s = result["summary"]
    ctx.log(f"annotate-sensitivity: {n_layers} layers, {len(result['channels'])} with channel scores, "
            f"{len(result['tensors'])} tensors; {result['samples']} samples, loss {result['loss']}, "
            f"{seconds:.1f} s ({result['method']['source']})")

    def fmt(items):
        return ", ".join(f"{short_name(name)} {value:.3g}" for name, value in items)

    for label, title in (("int8", "INT8 weight sensitivity (predicted loss increase)"),
                         ("channel", "mean Fisher channel score")):
        if f"{label}_most" in s:
            ctx.log(f"  most sensitive by {title}: {fmt(s[f'{label}_most'])}")
            ctx.log(f"  least sensitive by {title}: {fmt(s[f'{label}_least'])}")
