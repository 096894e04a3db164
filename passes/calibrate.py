"""calibrate: activation ranges on the calibration split (analysis only; the graph is unchanged).

Contract (``model.annotations["calibration"]``)::

    {"source":  "calibration split: N samples of <spec>"  |  "random: N(0,1) inputs, seed S, N samples (no --data)",
     "samples": N,
     "activation_type": "uint8" | "int8",  "symmetric": bool,      # from the target's conventions
     "method": the range method used for every tensor ("minmax" | "percentile" | "entropy" | "mse"),
     "method_scores": {method: output error of activation-only fake quantization},   # when method=auto
     "weights": {"scheme": "per-channel symmetric, zero point 0, narrow grid", "clipping": "mse"},
     "tensors": {tensor: {"min", "max",            # observed
                          "lo", "hi",              # chosen range (contains 0)
                          "scale", "zero_point",   # for activation_type / symmetric
                          "ranges": {method: [lo, hi]}}}}

Ranges are computed for every float activation tensor (graph inputs and node outputs) from a
2048-bin histogram over the observed [min, max] (two passes over the data): min-max,
percentile (99.99 % of the mass), entropy (TensorRT's KL threshold search on |x|) and MSE
(the range minimising the expected squared quantization error, clipping included). With
``method=auto`` (default) every method's ranges are tried on an activation-only fake-quantized
copy of the model (Q/DQ on the inputs of Conv/ConvTranspose/Gemm/MatMul/Add/Mul) and the one
whose outputs stay closest to the float model on calibration samples is kept (the scores are in
``method_scores``): measured, not assumed.

Graph outputs are never clipped: a graph output, and every tensor it is a pure data-movement
copy of (walking back through Reshape/Flatten/Squeeze/Unsqueeze/Transpose/Identity), gets the
observed min-max range whatever the method. A classifier's decision is its largest logit,
exactly the value a clipping range saturates: on mobilenet_v3_small the percentile range cut
the logits at 11.0 (observed max 14.6), the top logits of confident images then tied at the
grid's top code and 13 of 500 held-out images had a tied argmax (1.0 pt top-1 lost with only
the last two layers int8). The method selection never sees this (it fake-quantizes the inputs
of quantized layers, not a graph output), and ORT's QLinearConv quantizes a Conv's output
whenever the Conv runs as an integer kernel. ``tensors[name]["unclipped"]`` marks these tensors.

Zero points: TensorRT targets (``zero_point = "zero"``) get symmetric int8, zero point 0;
``cpu`` gets asymmetric uint8 activations (ONNX Runtime's x86 QLinear kernels are u8s8; with
int8 activations our measurements show 1.6-3x slower models, see the engineering note).

Weight scales need the precision plan (int8 or int4, per-channel or block-wise), so they are
computed by ``insert-qdq`` with :func:`hqpc.runtime.quant.weight_quant` (per output channel,
symmetric, MSE-optimal clipping); empirical bias correction (:func:`bias_correction`) likewise
runs there, once the plan is known, and is kept only where it measurably helps.

Without ``--data`` the pass uses seeded N(0, 1) inputs (``ctx.seed``) and says so in
``source``; golden tests rely on this.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hqpc.graphutil import GraphIndex, NameGenerator, toposort
from hqpc.passmanager import Pass, PassInfo
from hqpc.passes._rewrite import ShapeTable, is_op
from hqpc.registry import register_pass
from hqpc.runtime import ort as ort_rt
from hqpc.runtime import quant as Q

RANDOM_SAMPLES = 8
SELECTION_SAMPLES = 32
QUANTIZED_CONSUMERS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul")
# ops whose output holds exactly their first input's values (a graph output behind them is those values)
COPY_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity")


# --------------------------------------------------------------------------- data
def single_input(model) -> onnx.ValueInfoProto | None:
    inputs = ort_rt.graph_inputs(model.proto)
    return inputs[0] if len(inputs) == 1 else None


def calibration_batches(model, ctx, limit: int | None = None, batch: int = 8,
                        split: str = "calib") -> Iterator[dict[str, np.ndarray]]:
    """Feeds for ``model``: calibration samples from ``ctx.data`` (single-input models), else
    seeded N(0, 1) inputs (``RANDOM_SAMPLES`` of them)."""
    if ctx.data is not None and single_input(model) is not None:
        name = single_input(model).name
        dataset = ctx.data.split(split)
        seen = 0
        for x, _ in dataset.batches(batch):
            if limit is not None and seen >= limit:
                return
            if limit is not None:
                x = x[:limit - seen]
            seen += len(x)
            yield {name: x}
        return
    count = RANDOM_SAMPLES if limit is None else min(limit, RANDOM_SAMPLES)
    yield ort_rt.random_feeds(model.proto, seed=ctx.seed, batch=count)


def data_source(model, ctx) -> tuple[str, int]:
    if ctx.data is not None and single_input(model) is not None:
        n = len(ctx.data.split("calib"))
        return f"calibration split: {n} samples of {ctx.data.path.name}", n
    return f"random: N(0,1) inputs, seed {ctx.seed}, {RANDOM_SAMPLES} samples (no --data)", RANDOM_SAMPLES


def activation_conventions(target) -> tuple[str, bool]:
    """(grid, symmetric) for activations on ``target``."""
    conventions = getattr(target, "quantization", {}) or {}
    if conventions.get("zero_point") == "zero":
        return "int8", True
    preferred = conventions.get("activations", ["uint8-asymmetric"])
    first = preferred[0] if preferred else "uint8-asymmetric"
    return ("uint8", False) if first.startswith("uint8") else ("int8", "symmetric" in first)


def float_tensors(model) -> list[str]:
    """Float activation tensors: graph inputs and node outputs of element type float."""
    shapes = ShapeTable(model.proto)
    graph = model.proto.graph
    inits = {t.name for t in graph.initializer}
    names: list[str] = []
    seen: set[str] = set()
    candidates = [i.name for i in ort_rt.graph_inputs(model.proto)]
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        candidates.extend(o for o in node.output if o)
    for name in candidates:
        if name in seen or name in inits:
            continue
        seen.add(name)
        if shapes.elem_type(name) == TensorProto.FLOAT:
            names.append(name)
    return names


def output_tensors(model) -> set[str]:
    """Graph outputs and the tensors they are pure copies of (through :data:`COPY_OPS`)."""
    index = GraphIndex.build(model.proto.graph)
    out: set[str] = set()
    stack = [o.name for o in model.proto.graph.output]
    while stack:
        name = stack.pop()
        if not name or name in out:
            continue
        out.add(name)
        producer = index.producer.get(name)
        if producer is not None and producer.op_type in COPY_OPS and producer.input:
            stack.append(producer.input[0])
    return out


def run_collect(proto: onnx.ModelProto, names: list[str], feeds_iter, visit) -> None:
    """Run ``proto`` with ``names`` exposed as outputs over every feed; ``visit(name, array)``."""
    session = ort_rt.session(ort_rt.with_outputs(proto, names), optimization="basic")
    outputs = [o.name for o in session.get_outputs()]
    wanted = set(names)
    for feeds in feeds_iter:
        for name, value in zip(outputs, session.run(outputs, feeds)):
            if name in wanted:
                visit(name, value)


# --------------------------------------------------------------------------- the pass
@register_pass
class Calibrate(Pass):
    """Collect activation ranges (see the module docstring for the annotation contract)."""

    info = PassInfo("calibrate", opt_level=2, analysis=True,
                    description="activation ranges on calibration data (min-max/percentile/entropy/MSE)")
    options = {"method": "auto", "samples": 0, "bins": 2048}

    def run(self, model, ctx) -> bool:
        method = self.config["method"]
        if method != "auto" and method not in Q.RANGE_METHODS:
            raise ValueError(f"calibrate: method must be auto or one of {', '.join(Q.RANGE_METHODS)}")
        limit = self.config["samples"] or None
        dtype, symmetric = activation_conventions(ctx.target)
        names = float_tensors(model)
        hists = {name: Q.Histogram(self.config["bins"]) for name in names}
        run_collect(model.proto, names, calibration_batches(model, ctx, limit), lambda n, v: hists[n].add(v))
        ranges = {name: {m: Q.activation_range(h, m, dtype, symmetric) for m in Q.RANGE_METHODS}
                  for name, h in hists.items()}
        source, samples = data_source(model, ctx)
        if limit:
            samples = min(samples, limit)
        scores = {}
        if method == "auto":
            scores = score_methods(model, ctx, ranges, dtype, symmetric)
            method = min(scores, key=lambda m: (scores[m], Q.RANGE_METHODS.index(m)))
        unclipped = output_tensors(model)
        tensors = {}
        for name, h in hists.items():
            lo, hi = ranges[name]["minmax" if name in unclipped else method]
            scale, zero = Q.qparams_from_range(lo, hi, dtype, symmetric)
            tensors[name] = {"min": _f(h.min), "max": _f(h.max), "lo": _f(lo), "hi": _f(hi),
                             "scale": _f(scale), "zero_point": int(zero),
                             "ranges": {m: [_f(a), _f(b)] for m, (a, b) in ranges[name].items()}}
            if name in unclipped:
                tensors[name]["unclipped"] = "graph output: min-max range"
        model.annotations["calibration"] = {
            "source": source, "samples": samples, "activation_type": dtype, "symmetric": symmetric,
            "method": method, "method_scores": {m: _f(v) for m, v in scores.items()},
            "weights": {"scheme": "per-channel symmetric, zero point 0, narrow grid", "clipping": "mse"},
            "tensors": tensors,
        }
        ctx.log(f"calibrate: {len(tensors)} tensors, method {method} ({source})")
        return False  # analysis: annotations only, the graph is unchanged


def _f(value) -> float:
    value = float(value)
    return value if np.isfinite(value) else 0.0


# --------------------------------------------------------------------------- method selection
def score_methods(model, ctx, ranges, dtype: str, symmetric: bool) -> dict[str, float]:
    """Output error of activation-only fake quantization, per range method, on up to
    ``SELECTION_SAMPLES`` calibration samples (mean KL divergence of the softmax of the first
    output for classifier-shaped outputs, else mean squared error relative to the output's
    variance)."""
    graph = model.proto.graph
    index = GraphIndex.build(graph)
    targets = sorted({name for node in graph.node if is_op(node, *QUANTIZED_CONSUMERS)
                      for name in node.input[:2] if name in ranges and index.constant(name) is None})
    feeds = list(calibration_batches(model, ctx, SELECTION_SAMPLES, batch=16))
    out_name = graph.output[0].name
    reference = [ort_rt.run(model.proto, f)[out_name] for f in feeds]
    scores = {}
    for method in Q.RANGE_METHODS:
        params = {}
        for name in targets:
            lo, hi = ranges[name][method]
            params[name] = (*Q.qparams_from_range(lo, hi, dtype, symmetric), dtype)
        fq = with_activation_qdq(model.proto, params)
        session = ort_rt.session(fq)
        got = [session.run([out_name], f)[0] for f in feeds]
        scores[method] = output_error(reference, got)
    return scores


def output_error(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    ref = np.concatenate([r.reshape(r.shape[0], -1) for r in reference]).astype(np.float64)
    out = np.concatenate([g.reshape(g.shape[0], -1) for g in got]).astype(np.float64)
    if ref.shape[1] > 1 and len(reference[0].shape) == 2:
        return float(np.mean(kl_softmax(ref, out)))
    return float(np.mean((ref - out) ** 2) / max(np.var(ref), 1e-12))


def kl_softmax(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(out)) per row."""
    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    lp, lq = log_softmax(ref), log_softmax(out)
    return np.sum(np.exp(lp) * (lp - lq), axis=1)


def with_activation_qdq(proto: onnx.ModelProto, params: dict[str, tuple]) -> onnx.ModelProto:
    """A copy of ``proto`` with a QuantizeLinear→DequantizeLinear pair after every tensor in
    ``params`` (name → (scale, zero_point, grid)); graph outputs keep their names."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    names = NameGenerator(graph)
    new_nodes = []
    rename: dict[str, str] = {}
    for name, (scale, zero, grid) in params.items():
        s, z, q, d = names(f"{name}_s"), names(f"{name}_z"), names(f"{name}_q"), names(f"{name}_dq")
        graph.initializer.append(numpy_helper.from_array(np.asarray(scale, np.float32), s))
        graph.initializer.append(numpy_helper.from_array(np.asarray(zero, dtype=Q.NUMPY_STORAGE[grid]), z))
        new_nodes.append(helper.make_node("QuantizeLinear", [name, s, z], [q], name=names(f"{name}_Q")))
        new_nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [d], name=names(f"{name}_DQ")))
        rename[name] = d
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    graph.node.extend(new_nodes)
    toposort(graph)
    return out


# --------------------------------------------------------------------------- bias correction
def channel_means(proto: onnx.ModelProto, names: list[str], feeds_iter) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) mean of each tensor over all samples and positions."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def visit(name, value):
        if value.ndim < 2:
            return
        axes = tuple(i for i in range(value.ndim) if i != 1)
        sums[name] = sums.get(name, 0) + value.astype(np.float64).sum(axis=axes)
        counts[name] = counts.get(name, 0) + value.size // value.shape[1]

    run_collect(proto, names, feeds_iter, visit)
    return {n: sums[n] / counts[n] for n in sums}


def bias_correction(float_proto: onnx.ModelProto, deltas: dict[str, np.ndarray], feeds) -> dict[str, np.ndarray]:
    """Empirical bias correction: for each layer (node name → ``W_q − W``, the weight rounding
    error of a Conv/Gemm), the per-output-channel mean of ``layer(x; W_q − W)`` over the float
    model's own inputs ``x`` on calibration samples — the mean shift that weight quantization adds
    to the layer's output. Measured on float inputs, so corrections do not compound through the
    network. Returns node name → shift (subtract it from the bias)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(float_proto)
    graph = proto.graph
    names = NameGenerator(graph)
    by_name = {n.name: n for n in graph.node}
    probes = {}
    for node_name, delta in deltas.items():
        node = by_name[node_name]
        w = names(f"{node_name}_delta_w")
        graph.initializer.append(numpy_helper.from_array(delta.astype(np.float32), w))
        out = names(f"{node_name}_delta_out")
        probe = helper.make_node(node.op_type, [node.input[0], w], [out], name=names(f"{node_name}_delta"))
        probe.attribute.extend([a for a in node.attribute if a.name not in ("beta",)])
        graph.node.append(probe)
        probes[node_name] = out
    means = channel_means(proto, list(probes.values()), iter(feeds))
    return {n: means[out] for n, out in probes.items() if out in means}
