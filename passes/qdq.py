"""insert-qdq: QuantizeLinear/DequantizeLinear insertion with mixed bitwidths.

Inputs: ``annotations["calibration"]`` (from ``calibrate``, required) and
``annotations["precision"]["plan"]`` (from ``assign-precision``: node name → int8 | int4 |
fp16 | fp32; a compute node missing from the plan, or no plan at all, means int8).
Placement follows the target's runtime (ONNX Runtime for ``cpu``, TensorRT for ``orin`` & co.):
see :mod:`hqpc.passes.qdq_placement` for the rules. INT4 weights raise the model to opset 21 /
IR version 10 (onnx.version_converter), only when the plan places INT4.

Empirical bias correction (``bias_correction=auto``, with ``--data``): the per-channel mean
shift of every quantized layer's output (fake-quantized model minus float model) is measured on
the first half of the calibration samples (at most 64) and subtracted from the layer's bias;
the correction is kept only if the model's output error (KL of the softmax of the logits) on the
other half goes down. ``annotations["qdq"]["bias_correction"]`` records both errors.

Guard reference (``reference``): the *fake-quantized float model with the same scales*, built
from the pass's input graph by :func:`qdq_placement.reference_model` — plain Q→DQ pairs on the
quantized activations, DQ'd weights and biases, FP16 layers as FP16-typed layers (Cast in, FP16
weights, Cast out), and none of the emission's rewrites (absorbed
activations, scalars folded into scales, HardSigmoid as Add + requantization, fences, the int4
Cast, transB normalisation). Why not "the same Q/DQ graph run with ORT_DISABLE_ALL"? The guard
runs both models at ORT's basic level, where Q/DQ are not fused into integer kernels either, so
that reference would be the result itself and could catch nothing. Why Q/DQ nodes rather than
explicit Div/Round/Clip arithmetic? ORT's basic level rewrites float layers behind a DQ (it
quantizes their biases to int32), and an explicit-arithmetic reference then differs by float
noise that flips round-half-even ties and grows chaotically through a deep network; with Q/DQ
on both sides the same kernels run and a correct placement matches bit for bit (measured: max
abs error 0 on all four shared models, random and real inputs). The guard thus catches placement
and rewrite bugs, not quantization error (measured end to end, separately). The same holds for
FP16 layers: ONNX Runtime's CPU provider (1.31, x86-64) has no FP16 Conv kernel and runs an FP16
layer in FP32 on unrounded activations (its InsertCastTransformer removes the Cast(FP32→FP16)→Cast(FP16→
FP32) pairs it creates, at every optimization level), so a reference that wrote FP16 as
Cast→Cast around a float layer rounded where the result does not, and the INT8 layers behind it
amplified the difference past the tolerance. Both sides carry the same FP16-typed layer;
FP16 activation rounding is therefore not seen by ORT on either side (nor by ORT-based accuracy
measurements); TensorRT does apply it. The tolerance
(0.05 abs / 0.05 rel) leaves room for the rare tie that a rewrite (HardSigmoid as Add) rounds
the other way.

In addition, for ``cpu`` the pass audits ONNX Runtime's optimized graph (ORT_ENABLE_ALL, what
deployment runs): the number of integer kernels must match the quantized layers and every FP32
layer must still be a float Conv/Gemm (``annotations["qdq"]["ort_audit"]``); a mismatch is an
error (the pass is rolled back and named in the report).
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter

import numpy as np
import onnx

from hqpc.graphutil import replace_nodes
from hqpc.ir import infer_shapes
from hqpc.passmanager import Pass, PassInfo
from hqpc.passes import qdq_placement as P
from hqpc.passes.calibrate import bias_correction, calibration_batches, output_error
from hqpc.registry import register_pass
from hqpc.runtime import ort as ort_rt
from hqpc.runtime import quant as Q
from hqpc.runtime.compare import Tolerance

QDQ_TOLERANCE = Tolerance(atol=5e-2, rtol=5e-2)
BIAS_SAMPLES = 128
BIAS_BATCH = 4   # samples per ORT run of the bias-correction probes (one extra output per layer)
GPTQ_SAMPLES = 64


def backend_of(target) -> str:
    backend = getattr(target, "backend", "onnxruntime") or "onnxruntime"
    return "onnxruntime" if backend == "onnxruntime" else "tensorrt"


upgrade_opset = P.upgrade_opset


@register_pass
class InsertQDQ(Pass):
    """Insert Q/DQ per the precision plan and the target's runtime (see module docstring)."""

    info = PassInfo("insert-qdq", opt_level=2, requires=("calibrate",), tolerance=QDQ_TOLERANCE,
                    description="Q/DQ insertion with mixed bitwidths, placement per target runtime")
    options = {"bias_correction": "auto", "audit": True, "gptq": "auto"}

    def run(self, model, ctx) -> bool:
        calib = model.annotations.get("calibration")
        if not calib:
            raise ValueError("insert-qdq needs annotations['calibration'] (run calibrate first)")
        plan = dict((model.annotations.get("precision") or {}).get("plan", {}))
        backend = backend_of(ctx.target)
        if backend == "onnxruntime":
            decomposed = decompose_hardswish(model)
            if decomposed:
                calib = dict(calib)
                tensors = dict(calib.get("tensors", {}))
                for name in decomposed:  # HardSigmoid's range is [0, 1] by definition
                    scale, zero = Q.qparams_from_range(0.0, 1.0, calib.get("activation_type", "uint8"),
                                                       bool(calib.get("symmetric", False)))
                    tensors[name] = {"min": 0.0, "max": 1.0, "lo": 0.0, "hi": 1.0, "scale": float(scale),
                                     "zero_point": int(zero), "ranges": {}, "method": "fixed: HardSigmoid range"}
                calib["tensors"] = tensors
                model.annotations["calibration"] = calib
        conventions = dict(getattr(ctx.target, "quantization", {}) or {})
        placement = P.place(model, plan, calib, backend, conventions)
        if not placement.acts and not placement.weights and "H" not in placement.domain.values():
            return False
        if placement.needs_opset21:
            upgrade_opset(model)
            placement = P.place(model, plan, calib, backend, conventions)
        self._placement = placement
        gptq_info = self._gptq(model, placement, ctx)
        correction = self._bias_correction(model, placement, ctx)
        stats = P.emit(model, placement)
        model.proto = infer_shapes(model.proto)
        info = {**placement.summary(), "simplifications": stats, "bias_correction": correction,
                "int4_rounding": gptq_info, "opset": model.opset}
        if backend == "onnxruntime" and self.config["audit"]:
            audit = ort_audit(model, placement)
            info["ort_audit"] = audit
            if audit["problems"]:
                raise RuntimeError("ONNX Runtime placement audit failed: " + "; ".join(audit["problems"][:3]))
        model.annotations["qdq"] = info
        ctx.log(f"insert-qdq: {info['quantized_tensors']} quantized tensors, weights {info['weights']}, "
                f"bias correction {correction.get('applied')}")
        return True

    def reference(self, before, after, ctx):
        base = before.copy()
        if getattr(self, "_placement", None) is None:
            return base
        if backend_of(ctx.target) == "onnxruntime":
            decompose_hardswish(base)
        if self._placement.needs_opset21:
            upgrade_opset(base)
        return P.reference_model(base, self._placement)

    # ----------------------------------------------------------------- INT4 rounding
    def _gptq(self, model, placement: P.Placement, ctx) -> dict:
        """INT4 weights of 2-D-reducible layers (1x1 Conv, Gemm, MatMul) are rounded with GPTQ
        (:func:`hqpc.runtime.quant.gptq`) against E[x xᵀ] of the layer's float inputs on up to
        ``GPTQ_SAMPLES`` calibration samples, instead of round-to-nearest: 4-bit rounding error
        is large enough that compensating it column by column matters (measured: about half the
        output error of round-to-nearest). Needs --data; off with gptq=off."""
        if self.config["gptq"] == "off":
            return {"method": "round-to-nearest (gptq=off)"}
        graph = model.proto.graph
        index = P.GraphIndex.build(graph)
        by_name = {n.name: n for n in graph.node}
        targets = {}
        for name, spec in placement.weights.items():
            node = by_name[name]
            w = index.constant(node.input[1])
            if spec.precision != "int4" or w is None:
                continue
            if node.op_type == "Conv" and (w.ndim != 4 or w.shape[2:] != (1, 1)
                                           or int(P.attributes(node).get("group", 1)) != 1):
                continue
            if node.op_type not in ("Conv", "Gemm", "MatMul") or (node.op_type == "MatMul" and w.ndim != 2):
                continue
            targets[name] = (node, w)
        if not targets:
            return {"method": "round-to-nearest (no 1x1 Conv/Gemm/MatMul at int4)"}
        if ctx.data is None:
            return {"method": "round-to-nearest (no calibration data)"}
        inputs = sorted({node.input[0] for node, _ in targets.values()})
        hessians: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}

        def visit(name, value):
            x = np.moveaxis(value, 1, -1).reshape(-1, value.shape[1]) if value.ndim > 2 else value.reshape(value.shape[0], -1)
            x = x.astype(np.float64)
            hessians[name] = hessians.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        from hqpc.passes.calibrate import run_collect

        run_collect(model.proto, inputs, calibration_batches(model, ctx, GPTQ_SAMPLES, batch=8), visit)
        done = 0
        for name, (node, w) in targets.items():
            h = hessians.get(node.input[0])
            if h is None:
                continue
            h = h / counts[node.input[0]]
            spec = placement.weights[name]
            wq = spec.wq
            if node.op_type == "Conv":
                rows = w.reshape(w.shape[0], w.shape[1])
                g = Q.gptq(rows, h, "int4", block_size=wq.block_size)
                q = g.q.reshape(w.shape)
                scale = g.scale.reshape(wq.scale.shape)
            else:
                stored = w.T if spec.transpose_b else w  # the layout insert-qdq stores
                transposed_storage = stored.shape[0] == h.shape[0] and not (node.op_type == "Gemm" and (
                    P.attributes(node).get("transB", 0) or spec.transpose_b))
                rows = stored.T if transposed_storage else stored  # [out, K]
                g = Q.gptq(rows, h, "int4", block_size=wq.block_size)
                q = g.q.T if transposed_storage else g.q
                scale = g.scale.T if transposed_storage else g.scale
                if scale.shape != wq.scale.shape:
                    continue
            spec.wq = Q.WeightQuant(q=q.astype(np.int64), scale=np.ascontiguousarray(scale, dtype=np.float32),
                                    dtype=wq.dtype, axis=wq.axis, block_size=wq.block_size, method="gptq")
            done += 1
        return {"method": "gptq", "layers": done, "samples": min(GPTQ_SAMPLES, len(ctx.data.split("calib")))}

    # ----------------------------------------------------------------- bias correction
    def _bias_correction(self, model, placement: P.Placement, ctx) -> dict:
        mode = self.config["bias_correction"]
        targets = {n: w for n, w in placement.weights.items() if w.bias is not None and w.precision in ("int8", "int4")}
        if mode == "off" or not targets:
            return {"applied": False, "reason": "off" if mode == "off" else "no quantized layer with a bias"}
        if ctx.data is None and mode == "auto":
            return {"applied": False, "reason": "no calibration data (--data)"}
        feeds = list(calibration_batches(model, ctx, 2 * BIAS_SAMPLES, batch=BIAS_BATCH))
        xs = np.concatenate([next(iter(f.values())) for f in feeds])
        name = next(iter(feeds[0]))
        half = max(1, len(xs) // 2)
        fit = [{name: xs[i:min(i + BIAS_BATCH, half)]} for i in range(0, half, BIAS_BATCH)]
        check = [{name: xs[i:i + BIAS_BATCH]} for i in range(half, len(xs), BIAS_BATCH)] or fit
        index = P.GraphIndex.build(model.proto.graph)
        by_name = {n.name: n for n in model.proto.graph.node}
        deltas = {}
        for n, spec in targets.items():
            w = index.constant(by_name[n].input[1])
            deltas[n] = spec.dequantized(w) - w if not spec.transpose_b else spec.wq.dequantized().T - w
        shifts = bias_correction(model.proto, deltas, fit)
        before_ref = P.reference_model(model, placement)
        out = model.proto.graph.output[0].name
        float_out = outputs_over(model.proto, check, out)
        err_before = output_error(float_out, outputs_over(before_ref.proto, check, out))
        saved = {n: targets[n].bias.copy() for n in targets}
        applied = 0
        for n, spec in targets.items():
            shift = shifts.get(n)
            if shift is not None and shift.shape == spec.bias.shape:
                spec.bias = (spec.bias.astype(np.float64) - shift).astype(np.float32)
                applied += 1
        after_ref = P.reference_model(model, placement)
        err_after = output_error(float_out, outputs_over(after_ref.proto, check, out))
        keep = mode == "on" or err_after < err_before
        if not keep:
            for n, b in saved.items():
                targets[n].bias = b
        return {"applied": bool(keep), "layers": applied, "error_before": float(err_before),
                "error_after": float(err_after), "fit_samples": half, "check_samples": len(xs) - half}


def outputs_over(proto: onnx.ModelProto, feeds: list[dict], output: str) -> list[np.ndarray]:
    """``output`` of ``proto`` on every feed, from one ONNX Runtime session."""
    session = ort_rt.session(proto)
    return [session.run([output], f)[0] for f in feeds]


def decompose_hardswish(model) -> list[str]:
    """Rewrite every HardSwish(x) as Mul(x, HardSigmoid(x; 1/6, 1/2)) — ONNX's own definition
    of HardSwish, so exact — letting the ORT placement run hard-swish as QLinearAdd +
    QLinearMul. Returns the new HardSigmoid output names (deterministic for a given graph)."""
    from hqpc.graphutil import NameGenerator

    graph = model.proto.graph
    names = NameGenerator(graph)
    created = []
    nodes = []
    for node in graph.node:
        if node.op_type != "HardSwish" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        hs = names(f"{node.output[0]}_hardsigmoid")
        nodes.append(onnx.helper.make_node("HardSigmoid", [node.input[0]], [hs], name=names(f"{node.name}_hardsigmoid"),
                                           alpha=1.0 / 6.0, beta=0.5))
        nodes.append(onnx.helper.make_node("Mul", [node.input[0], hs], list(node.output), name=names(f"{node.name}_mul")))
        created.append(hs)
    if created:
        replace_nodes(graph, nodes)
    return created


def ort_audit(model, placement: P.Placement) -> dict:
    """Count integer kernels and float convolutions in ONNX Runtime's optimized graph."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        ort_rt.session(model.proto, optimization="all", optimized_path=path)
        optimized = onnx.load(path)
    ops = Counter(n.op_type for n in optimized.graph.node)
    graph = model.proto.graph
    q_conv = sum(1 for n in graph.node if n.op_type == "Conv" and placement.domain.get(n.name) == "Q"
                 and n.name not in placement.blocked)
    f_conv = sum(1 for n in graph.node if n.op_type in ("Conv", "ConvTranspose")
                 and (placement.domain.get(n.name) in ("F", "H") or n.name in placement.blocked))
    q_gemm = sum(1 for n in graph.node if n.op_type == "Gemm" and placement.domain.get(n.name) == "Q"
                 and n.name not in placement.blocked)
    float_convs = sum(c for op, c in ops.items() if op in ("Conv", "FusedConv", "NchwcConv", "ConvTranspose"))
    problems = []
    if ops.get("QLinearConv", 0) != q_conv:
        problems.append(f"{q_conv} int8 Conv planned, ORT runs {ops.get('QLinearConv', 0)} QLinearConv")
    if float_convs != f_conv:
        problems.append(f"{f_conv} FP32 Conv planned, ORT runs {float_convs} float Conv")
    if ops.get("QGemm", 0) != q_gemm:
        problems.append(f"{q_gemm} int8 Gemm planned, ORT runs {ops.get('QGemm', 0)} QGemm")
    return {"planned": {"int8_conv": q_conv, "fp32_conv": f_conv, "int8_gemm": q_gemm},
            "ort_ops": dict(sorted(ops.items())), "problems": problems}
