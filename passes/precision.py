"""assign-precision: the mixed-precision plan (analysis only; ``insert-qdq`` realises it).

A *unit* is a Conv/ConvTranspose/Gemm/MatMul with a constant float weight; its precision covers
its weight tensor and its input activation (int8 = W8A8; int4 = 4-bit weights with int8
activations on ``cpu``, weight-only 4-bit on TensorRT; fp16; fp32). The plan minimises the
predicted loss increase subject to the target's budgets (see :mod:`precision_solvers`):

* **latency**: ``cpu`` — per-layer latency *measured* with ONNX Runtime's profiler (1 thread,
  batch 1, ORT_ENABLE_ALL) on the float model and on the all-INT8 Q/DQ model, plus a boundary
  cost per element (Q/DQ and layout change, measured from the same profile) wherever a float
  region meets an integer one; other targets — the target's cost model: max(MACs / peak
  throughput of the precision, bytes moved / memory bandwidth). Budget: the all-INT8 latency
  (or the fastest plan's, if faster) times ``1 + latency_slack``.
* **size** (``ctx.config["size_budget"]``, set by ``--size-budget``): ``None`` (no budget), a
  float in (0, 1] — a fraction of the all-INT8 weight size (every unit at int8, other
  initializers as stored) — or an int number of bytes. Weight bytes count 4/2/1/0.5 per value
  for fp32/fp16/int8/int4 plus 4 bytes per scale.
* **accuracy**: what is left of ``--max-drop`` after pruning (``max_drop`` minus
  ``annotations["prune"]["drop_pt"]`` when a pruning pass recorded one). With labelled
  calibration data the chosen plan is checked: its Q/DQ model's top-1 on the calibration split
  against the float model's; while the drop exceeds the budget by more than one paired standard
  error (sqrt(lost + gained) / N, McNemar), the latency slack doubles
  (0.05, 0.1, ... up to the float model's latency) so that more sensitive layers may stay float.
  On ``cpu`` the final plan is also timed end to end against all-INT8 (interleaved, minimum of
  200 runs); a plan that keeps layers float for speed must be measurably faster.
  Without labels the check is skipped (recorded).

Reproducibility (``cpu``): the latency profile and the end-to-end timing are measurements, and
on a shared machine they differ from run to run by more than the margins the plan is decided
on, so two compiles of the same input could choose different plans (and always stored different
numbers in the model's ``hqpc.precision`` metadata). Each timing is therefore taken once per
(models, inputs, settings, processor, ONNX Runtime version) and kept in a measurement cache
(:func:`cached_measurement`; ``~/.cache/hqpc/measurements``, ``$HQPC_MEASURE_CACHE``, option
``measure_cache=auto|off|FOLDER``); later compiles reuse it, so the same input and seed give the
same bytes on the same machine. ``annotations["precision"]["measurements"]`` names each
timing used (cache key, UTC time taken); the log says whether it was measured or reused. The
solvers' wall times go to the log only. Other targets use the cost model and need no cache.

Scores (``score_source``): the Fisher-predicted loss increase from ``annotate-sensitivity`` —
``annotations["sensitivity"]["tensors"][tensor][precision]`` for the weight and the input
activation, summed — when that annotation is present. Otherwise a clearly labelled *measured
proxy*: quantize one unit at a time (its weight and input activation, exactly as insert-qdq
would) and measure KL(softmax(float logits) || softmax(quantized logits)) on calibration samples
(seeded random inputs without ``--data``). Both are "predicted loss increase" in nats.

Two solvers run on the same problem: the exact MILP (``solver=milp``, default, scipy/HiGHS) and
the SigmaQuant-style clustering + greedy solver (``solver=sigmaquant``); the chosen one gives
the plan, both results (objective, feasibility, wall time) go to
``annotations["precision"]["solvers"]``.

Annotation contract::

    annotations["precision"] = {
      "plan": {node: "int8" | "int4" | "fp16" | "fp32"},
      "tensors": {weight or activation tensor: precision},
      "reasons": {node: why it is not int8 (every float / fp16 / int4 unit)},
      "solver": "milp" | "sigmaquant", "score_source": "...",
      "budgets": {"latency_ms", "size_bytes", "accuracy_pt", "latency_slack"},
      "predicted": {"loss", "latency_ms", "size_bytes"}, "int8_size_bytes", "fp32_latency_ms",
      "scores": {node: {precision: loss}}, "latency": {node: {precision: ms}}, "latency_source",
      "solvers": {name: {...}}, "accuracy_check": {...}, "end_to_end": {...},
      "measurements": {"latency_profile" | "end_to_end": {"key", "measured_at"}}}
"""
from __future__ import annotations

import math

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

from hqpc.graphutil import GraphIndex, attributes
from hqpc.passmanager import Pass, PassInfo
from hqpc.passes import precision_solvers as S
from hqpc.passes import qdq_placement as P
from hqpc.passes._rewrite import ShapeTable, is_op
from hqpc.passes.calibrate import calibration_batches, output_error, single_input
from hqpc.passes.qdq import backend_of
from hqpc.registry import register_pass
from hqpc.runtime import latency as lat
from hqpc.runtime import ort as ort_rt
from hqpc.runtime import quant as Q
from hqpc.runtime.measure_cache import cached_measurement, measurement_cache_dir

OP_CLASS = {"Conv": "conv", "ConvTranspose": "conv", "Gemm": "gemm", "MatMul": "matmul"}
BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
SENSITIVITY_SAMPLES = 16
FISHER_SAMPLES = 128  # when assign-precision runs annotate-sensitivity itself (-O2)
BOUNDARY_FIXED_MS = 0.006  # two small kernels (Q or DQ, Transpose) at ~3 µs each


def allowed_precisions(target, op_type: str) -> list[str]:
    """Precisions a unit may take on ``target`` (always including fp32)."""
    cls = OP_CLASS.get(op_type, "conv")
    listed = tuple(getattr(target, "precisions", {}).get(cls, ("fp32", "int8")))
    out = [p for p in ("int8", "fp16") if p in listed]
    conventions = getattr(target, "quantization", {}) or {}
    int4 = "int4-weights" in listed or (conventions.get("int4_weights") and backend_of(target) == "onnxruntime"
                                         and "int8" in listed)
    if int4:
        out.insert(0, "int4")
    return out + ["fp32"]


def size_budget_bytes(value, int8_bytes: float) -> float | None:
    """``ctx.config["size_budget"]``: None, a fraction (0, 1] of the all-INT8 size, or bytes."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower().replace("int8", "")
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if isinstance(value, bool):
        raise ValueError("size_budget must be a number")
    if isinstance(value, float) and 0 < value <= 1:
        return value * int8_bytes
    if float(value) > 1:
        return float(value)
    raise ValueError(f"size_budget must be a fraction in (0, 1] or a byte count, got {value!r}")


@register_pass
class AssignPrecision(Pass):
    """Choose a precision per unit (see the module docstring for budgets, scores, contract)."""

    info = PassInfo("assign-precision", opt_level=2, requires=("calibrate",), analysis=True,
                    description="mixed-precision plan: min predicted loss under latency/size/accuracy budgets")
    options = {"solver": "milp", "latency_slack": 0.05, "check_accuracy": True, "scores": "auto",
               "verify_latency": True, "measure_cache": "auto"}

    def run(self, model, ctx) -> bool:
        calib = model.annotations.get("calibration")
        if not calib:
            raise ValueError("assign-precision needs annotations['calibration'] (run calibrate first)")
        self._measurements: dict[str, dict] = {}
        graph = model.proto.graph
        index = GraphIndex.build(graph)
        shapes = ShapeTable(model.proto)
        target = ctx.target
        backend = backend_of(target)
        units = [n for n in graph.node if is_op(n, *OP_CLASS) and P.const_weight(index, n) is not None]
        if not units:
            model.annotations["precision"] = {"plan": {}, "tensors": {}, "reasons": {}, "solver": self.config["solver"],
                                              "score_source": "none (no quantizable layer)"}
            return False
        budget_cfg = ctx.config.get("size_budget")
        options = {}
        for n in units:
            opts = allowed_precisions(target, n.op_type)
            if backend == "onnxruntime" and n.op_type == "ConvTranspose":
                opts = ["fp32"]
            if budget_cfg is None:
                opts = [p for p in opts if p != "int4"]  # int4 only buys size
            if backend == "tensorrt" and n.op_type not in ("Gemm", "MatMul"):
                opts = [p for p in opts if p != "int4"]
            options[n.name] = opts
        scores, source = self._scores(model, ctx, units, options, calib, backend)
        latency, lat_source, edges, fp32_ms = self._latency(model, ctx, units, options, calib, backend, shapes, index)
        sizes, fixed_size = self._sizes(model, units, options, index, backend)
        int8_bytes = fixed_size + sum(sizes[n.name].get("int8", sizes[n.name]["fp32"]) for n in units)
        size_budget = size_budget_bytes(budget_cfg, int8_bytes)
        for u in options:  # a precision whose predicted loss is not finite (fp16 overflow) is no option
            unusable = [p for p in options[u] if p != "fp32" and not math.isfinite(scores[u].get(p, 0.0))]
            if unusable:
                options[u] = [p for p in options[u] if p not in unusable]
                ctx.log(f"assign-precision: {u}: {', '.join(unusable)} not offered (predicted loss not finite: "
                        "values outside the format's range)")
        features = self._features(units, index)
        prune_drop = float((model.annotations.get("prune") or {}).get("drop_pt", 0.0) or 0.0)
        accuracy_budget = max(0.0, float(ctx.config.get("max_drop", 1.0)) - prune_drop)
        names = [n.name for n in units]
        problem = S.Problem(units=names, options=[options[u] for u in names],
                            loss=[scores[u] for u in names], latency=[latency[u] for u in names],
                            size=[sizes[u] for u in names], edges=edges, fixed_size=fixed_size,
                            size_budget=size_budget, features=features)
        base_plan = {u: ("int8" if "int8" in options[u] else "fp32") for u in names}
        base_ms = problem.evaluate(base_plan)["latency_ms"]
        fastest = S.solve_milp(problem, objective="latency")
        reference_ms = min(base_ms, fastest.objective["latency_ms"])
        slack = float(self.config["latency_slack"])
        check = {"skipped": "no labelled calibration data"}
        history = []
        previous = None
        while True:
            problem.latency_budget = reference_ms * (1 + slack)
            solutions = {"milp": S.solve_milp(problem), "sigmaquant": S.solve_sigmaquant(problem, seed=ctx.seed)}
            chosen = solutions[self.config["solver"]]
            plan = chosen.plan
            if plan == previous or len(history) >= 4:
                break  # more latency slack no longer changes the plan (e.g. the size budget binds)
            previous = plan
            if not self.config["check_accuracy"] or ctx.data is None or single_input(model) is None \
                    or ctx.data.labels is None:
                break
            check = self._accuracy(model, ctx, plan, calib, backend)
            check["latency_slack"] = slack
            history.append(check)
            # a few hundred calibration images measure a drop only to about ±1 point: the plan
            # fails the budget when the drop exceeds it by more than one paired standard error
            if check["significant_drop_pt"] <= accuracy_budget or reference_ms * (1 + slack) >= fp32_ms:
                break
            slack = 0.05 if slack <= 0 else slack * 2  # 0.05, 0.1, 0.2, ...
            if slack > 1.0:
                break
        e2e = {}
        base_fits = size_budget is None or problem.evaluate(base_plan)["size_bytes"] <= size_budget
        if backend == "onnxruntime" and self.config["verify_latency"] and plan != base_plan and base_fits:
            plan, e2e = self._verify_latency(model, ctx, plan, base_plan, calib, check, accuracy_budget)
        tensors = {}
        for n in units:
            p = plan[n.name]
            tensors[n.input[1]] = p
            act = "fp32" if p == "fp32" else ("fp16" if p == "fp16" or (p == "int4" and backend == "tensorrt") else "int8")
            tensors.setdefault(n.input[0], act)
            if act == "int8":
                tensors[n.input[0]] = "int8"
        reasons = self._reasons(units, plan, scores, latency, lat_source, chosen.solver, options)
        model.annotations["precision"] = {
            "plan": {n.name: plan[n.name] for n in units}, "tensors": tensors, "reasons": reasons,
            "solver": chosen.solver, "score_source": source,
            "budgets": {"latency_ms": _r(problem.latency_budget), "size_bytes": None if size_budget is None else _r(size_budget),
                        "accuracy_pt": _r(accuracy_budget), "latency_slack": slack,
                        "size_budget_option": budget_cfg},
            # of the emitted plan: the end-to-end check may have replaced the solver's plan by all-INT8
            "predicted": {k: _r(v) for k, v in problem.evaluate(plan).items()},
            "int8_size_bytes": _r(int8_bytes), "fp32_latency_ms": _r(fp32_ms), "int8_latency_ms": _r(base_ms),
            "scores": {u: {p: _r(v) for p, v in scores[u].items()} for u in names},
            "latency": {u: {p: _r(v) for p, v in latency[u].items()} for u in names}, "latency_source": lat_source,
            "solvers": {k: {f: v for f, v in sol.as_dict().items() if f != "wall_s"} for k, sol in solutions.items()},
            "accuracy_check": {"final": check, "history": history},
            "end_to_end": e2e,
            "measurements": dict(self._measurements),
        }
        ctx.log("assign-precision: solver wall time " + ", ".join(f"{k} {sol.wall_s * 1e3:.1f} ms"
                                                                  for k, sol in solutions.items()))
        for kind, m in self._measurements.items():
            ctx.log(f"assign-precision: {kind} {'reused from the measurement cache' if m.get('reused') else 'measured'}"
                    f" ({m['measured_at']}, key {m['key']})")
            m.pop("reused", None)
        counts = defaultdict(int)
        for p in plan.values():
            counts[p] += 1
        ctx.log(f"assign-precision: {dict(counts)} ({chosen.solver}; scores: {source.split(':')[0]})")
        return False  # analysis: the plan is an annotation, the graph is unchanged

    # ----------------------------------------------------------------- scores
    def _scores(self, model, ctx, units, options, calib, backend):
        from hqpc.registry import passes

        sens = (model.annotations.get("sensitivity") or {}).get("tensors")
        ran = ""
        if not sens and self.config["scores"] in ("auto", "fisher") and "annotate-sensitivity" in passes():
            # the Fisher pass exists but did not run in this pipeline (-O2): run it as an analysis
            # on a copy (its annotation is kept: it documents the scores used)
            try:
                probe = model.copy()
                cls = passes()["annotate-sensitivity"]
                known = getattr(cls, "options", {})
                needed = sorted({p for u in units for p in options[u.name] if p != "fp32"})
                opts = {}
                if "samples" in known:
                    opts["samples"] = FISHER_SAMPLES
                if "precisions" in known and needed:
                    opts["precisions"] = "+".join(needed)
                cls(**opts).run(probe, ctx)
                sens = (probe.annotations.get("sensitivity") or {}).get("tensors")
                if sens:
                    # keep the tensor scores that the plan used (channel scores are pruning's)
                    model.annotations["sensitivity"] = {k: v for k, v in probe.annotations["sensitivity"].items()
                                                        if k != "channels"}
                    ran = " (run by assign-precision)"
            except Exception as exc:  # fall back to the measured proxy, saying why
                ctx.log(f"assign-precision: annotate-sensitivity failed ({type(exc).__name__}: {exc}); "
                        "using the measured proxy")
                sens = None
        if sens and self.config["scores"] != "measured":
            scores = {}
            for n in units:
                w, x = n.input[1], n.input[0]
                entry = {"fp32": 0.0}
                for p in options[n.name]:
                    if p == "fp32":
                        continue
                    weight_only = p == "int4" and (backend == "tensorrt" or n.op_type == "MatMul")
                    act = "fp16" if p == "fp16" else (None if weight_only else "int8")
                    entry[p] = float(sens.get(w, {}).get(p, 0.0)) + (float(sens.get(x, {}).get(act, 0.0)) if act else 0.0)
                scores[n.name] = entry
            return scores, ("annotate-sensitivity: Fisher-predicted loss increase ½·δᵀFδ of the weight and "
                            "the input activation at each precision" + ran)
        return measured_sensitivity(model, ctx, units, options, calib, backend), (
            "measured proxy (annotate-sensitivity not available): per-layer KL(softmax(float logits) || "
            f"softmax(quantized logits)), one unit (weight + input activation) quantized at a time, "
            f"{SENSITIVITY_SAMPLES} {'calibration' if ctx.data is not None else 'seeded random'} samples")

    # ----------------------------------------------------------------- latency
    def _latency(self, model, ctx, units, options, calib, backend, shapes, index):
        if backend == "onnxruntime":
            return measured_latency(model, ctx, units, options, calib, shapes, index,
                                    cache=measurement_cache_dir(self.config["measure_cache"]),
                                    record=self._measurements)
        return cost_model_latency(model, ctx.target, units, options, shapes, index)

    # ----------------------------------------------------------------- sizes
    @staticmethod
    def _sizes(model, units, options, index, backend):
        sizes = {}
        unit_weights = set()
        for n in units:
            w = index.constant(n.input[1])
            channels = w.shape[P.weight_axis(n, w)] if w.ndim else 1
            entry = {}
            for p in set(options[n.name]) | {"int8", "fp32"}:
                if p in ("fp32", "fp16"):
                    scales = 0
                elif p == "int4" and n.op_type == "MatMul":
                    scales = 4 * w.size / P.INT4_BLOCK
                elif p == "int4" and P._blocked_on_cpu(n, w) and backend == "onnxruntime":
                    scales = 4 * w.size / P.CPU_INT4_BLOCK
                else:
                    scales = 4 * channels
                zero_points = 0 if p in ("fp32", "fp16") else scales / 4 * (0.5 if p == "int4" and scales != 4 * channels else 1)
                entry[p] = w.size * BYTES[p] + scales + zero_points
            sizes[n.name] = entry
            unit_weights.add(n.input[1])
        fixed = 0.0
        for t in model.proto.graph.initializer:
            if t.name in unit_weights:
                continue
            fixed += int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        return sizes, fixed

    @staticmethod
    def _features(units, index):
        feats = []
        for n in units:
            w = index.constant(n.input[1])
            axis = P.weight_axis(n, w)
            sigma, kl = S.weight_features(w, lambda w=w, axis=axis: Q.weight_quant(w, axis, "int4", grid=False).dequantized())
            feats.append((np.log(sigma + 1e-12), kl))
        return np.array(feats)

    # ----------------------------------------------------------------- end-to-end check
    def _verify_latency(self, model, ctx, plan, base_plan, calib, check, accuracy_budget):
        """Profiled per-layer costs are an approximation (kernel boundaries, the profiler's own
        cost); the plan's Q/DQ model and the all-INT8 one are timed end to end, interleaved
        (1 thread, batch 1, ORT_ENABLE_ALL; minimum of 200 interleaved runs). The plan is kept
        when it is measurably faster (> 3 %) or within the latency slack of all-INT8 (its float
        layers then buy accuracy); otherwise all-INT8 is used."""
        from hqpc.runtime.latency import compare

        models = {}
        for key, p in (("plan", plan), ("all_int8", base_plan)):
            models[key] = P.build_qdq(model, p, calib, "onnxruntime")[0].proto
        feeds = next(iter(calibration_batches(model, ctx, 1, batch=1)))
        timing = cached_measurement(
            measurement_cache_dir(self.config["measure_cache"]), "end_to_end",
            [models["plan"], models["all_int8"]], feeds, {"runs": 200, "warmup": 10},
            lambda: compare(models, runs=200, warmup=10, feeds=feeds), self._measurements)
        # decisions use the minimum over interleaved runs: on a loaded machine the median mostly
        # measures the load, the minimum the model
        plan_ms, base_ms = timing["plan"]["min_ms"], timing["all_int8"]["min_ms"]
        slack = float(check.get("latency_slack", self.config["latency_slack"]) or 0.0)
        info = {"plan_ms": round(plan_ms, 4), "all_int8_ms": round(base_ms, 4), "latency_slack": slack}
        if plan_ms < 0.97 * base_ms:
            info["decision"] = "mixed plan kept (measurably faster end to end)"
            return plan, info
        if plan_ms <= base_ms * (1 + slack):
            info["decision"] = "mixed plan kept (lower predicted loss, within the latency slack)"
            return plan, info
        info["decision"] = "all-INT8: the mixed plan missed the latency budget end to end"
        return dict(base_plan), info

    # ----------------------------------------------------------------- accuracy check
    def _accuracy(self, model, ctx, plan, calib, backend) -> dict:
        """Top-1 on the calibration split: float model vs the plan's Q/DQ model (ORT, all
        optimizations: the integer kernels that deployment runs)."""
        qmodel, placement = P.build_qdq(model, plan, calib, backend)
        name = single_input(model).name
        fs = ort_rt.session(model.proto, optimization="all")
        try:
            qs = ort_rt.session(qmodel.proto, optimization="all" if backend == "onnxruntime" else "basic")
        except Exception:
            qs = ort_rt.session(P.reference_model(model, placement).proto)
        correct_f = correct_q = total = lost = gained = 0
        for x, y in ctx.data.split("calib").batches(32):
            pf = fs.run(None, {name: x})[0].argmax(1) == y
            pq = qs.run(None, {name: x})[0].argmax(1) == y
            correct_f += int(pf.sum())
            correct_q += int(pq.sum())
            lost += int((pf & ~pq).sum())
            gained += int((~pf & pq).sum())
            total += len(y)
        drop = 100 * (correct_f - correct_q) / total
        # paired standard error of the drop (McNemar): only the samples whose outcome changed vary
        se = 100 * np.sqrt(lost + gained) / total
        return {"samples": total, "top1_float": round(100 * correct_f / total, 2),
                "top1_quantized": round(100 * correct_q / total, 2), "drop_pt": round(drop, 2),
                "lost": lost, "gained": gained, "stderr_pt": round(float(se), 2),
                "significant_drop_pt": round(float(max(0.0, drop - se)), 2)}

    @staticmethod
    def _reasons(units, plan, scores, latency, lat_source, solver, options):
        reasons = {}
        for n in units:
            p = plan[n.name]
            if p == "int8":
                continue
            unit_ms = latency[n.name]
            sc = scores[n.name]
            parts = []
            if options[n.name] == ["fp32"]:
                parts.append("no quantized kernel for this op on the target")
            elif p == "fp32":
                faster = "int8" in unit_ms and unit_ms["fp32"] < unit_ms["int8"]
                if faster:
                    parts.append(f"fp32 is faster here: {1e3 * unit_ms['fp32']:.0f} µs vs int8 {1e3 * unit_ms['int8']:.0f} µs ({lat_source})")
                else:
                    parts.append(f"accuracy: int8 predicted loss {sc.get('int8', 0):.3g} is among the largest; "
                                 f"fp32 costs {1e3 * (unit_ms['fp32'] - unit_ms.get('int8', unit_ms['fp32'])):.0f} µs, within the latency budget")
            elif p == "fp16":
                parts.append(f"fp16: int8 predicted loss {sc.get('int8', 0):.3g} vs fp16 {sc.get('fp16', 0):.3g}")
            elif p == "int4":
                parts.append(f"int4 weights for the size budget: predicted loss {sc.get('int4', 0):.3g} (int8 {sc.get('int8', 0):.3g})")
            reasons[n.name] = f"{p}: " + "; ".join(parts) + f" [{solver}]"
        return reasons


def _r(v):
    return None if v is None else round(float(v), 6)


# --------------------------------------------------------------------------- measured sensitivity
def measured_sensitivity(model, ctx, units, options, calib, backend) -> dict[str, dict[str, float]]:
    """Per unit and precision: KL of the logits with only that unit quantized (measured)."""
    feeds = list(calibration_batches(model, ctx, SENSITIVITY_SAMPLES, batch=SENSITIVITY_SAMPLES))
    out = model.proto.graph.output[0].name
    reference = [ort_rt.run(model.proto, f)[out] for f in feeds]
    index = GraphIndex.build(model.proto.graph)
    scores = {}
    for n in units:
        entry = {"fp32": 0.0}
        for p in options[n.name]:
            if p == "fp32":
                continue
            placement = single_unit_placement(model, index, n, p, calib, backend)
            ref = P.reference_model(model, placement)
            session = ort_rt.session(ref.proto)
            got = [session.run([out], f)[0] for f in feeds]
            entry[p] = max(0.0, output_error(reference, got))
        scores[n.name] = entry
    return scores


def single_unit_placement(model, index, node, precision: str, calib, backend) -> P.Placement:
    """Quantize only ``node``: its weight at ``precision`` and its input activation (int8
    unless weight-only/fp16), as insert-qdq would."""
    placement = P.Placement(backend=backend)
    x = node.input[0]
    if precision in ("int8",) or (precision == "int4" and backend == "onnxruntime" and node.op_type != "MatMul"):
        act = P.act_from_calibration(calib, x)
        if act is not None:
            if backend == "tensorrt" and (act.zero_point != 0 or act.dtype != "int8"):
                e = calib["tensors"][x]
                s, _ = Q.qparams_from_range(e["lo"], e["hi"], "int8", True)
                act = P.ActQ(float(s), 0, "int8")
            placement.acts[x] = act
            placement.mode[x] = "consumer"
            placement.readers[x] = [(node.name, 0)]
    elif precision == "fp16":
        placement.domain[node.name] = "H"
    placement.domain.setdefault(node.name, "Q")
    P._weights(model.proto.graph, index, {node.name: precision}, placement, backend=backend)
    for spec in placement.weights.values():
        if spec.bias_mode == "int32":
            spec.bias_mode = "float"  # reference keeps the float bias
        if spec.precision == "int4":
            placement.needs_opset21 = True
    return placement


# --------------------------------------------------------------------------- latency
def profile_times(protos: list[onnx.ModelProto], feeds: dict, runs: int | None = None):
    """Per-node kernel times (ms) of several models, profiled *interleaved* (run i of every
    model before run i+1 of any, so machine load hits them alike) with ORT's profiler
    (ORT_ENABLE_ALL, 1 thread); per kernel the mean of the fastest of ``runs`` durations
    (:func:`hqpc.runtime.latency.kernel_times`; by default as many runs as
    :func:`hqpc.runtime.latency.profile_run_count` allows). Returns, per model,
    ({node: ms}, {node: (op type, elements of input 0)})."""
    import onnxruntime as ort

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for k, proto in enumerate(protos):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tmp, f"prof{k}")
            options.log_severity_level = 3
            sessions.append(ort.InferenceSession(proto.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"]))
        for _ in range(5):
            start = time.perf_counter()
            for s in sessions:
                s.run(None, feeds)
        if runs is None:
            runs = lat.profile_run_count(time.perf_counter() - start)
        for _ in range(runs):
            for s in sessions:
                s.run(None, feeds)
        for s in sessions:
            path = s.end_profiling()
            with open(path) as handle:
                events = json.load(handle)
            info: dict[str, tuple[str, int]] = {}
            for e in events:
                if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                    args = e.get("args", {})
                    elems = 0
                    for entry in args.get("input_type_shape", [])[:1]:
                        for dims in entry.values():
                            elems = int(np.prod(dims)) if dims else 1
                    info[e["name"][: -len("_kernel_time")]] = (args.get("op_name", ""), elems)
            times = {n: t / 1000.0 for n, t in lat.kernel_times(events, runs).items()}
            results.append((times, info))
        # per-kernel profiles do not add up to the end-to-end time (framework overhead between
        # kernels, the profiler's own cost, minima taken per kernel); scale each model's kernel
        # times so that they sum to its measured end-to-end time
        plain = []
        for proto in protos:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            plain.append(ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]))
        e2e = end_to_end_ms(plain, feeds, max(runs, 100))
    corrected = []
    for (times, info), total in zip(results, e2e):
        factor = total / max(sum(times.values()), 1e-9)
        corrected.append(({n: t * factor for n, t in times.items()}, info))
    return corrected


def end_to_end_ms(sessions, feeds, runs: int) -> list[float]:
    """Minimum wall time per session over interleaved runs (the least load-sensitive estimate)."""
    import time

    samples = [[] for _ in sessions]
    for _ in range(runs):
        for k, s in enumerate(sessions):
            start = time.perf_counter()
            s.run(None, feeds)
            samples[k].append((time.perf_counter() - start) * 1e3)
    return [float(np.min(v)) for v in samples]


def _attribute(times: dict[str, float], node_names: list[str], group: dict[str, str]) -> tuple[dict[str, float], float]:
    """Map profiled node names (ORT appends _token_N, _nchwc, ... and keeps the target node's
    name for fused kernels) to original nodes by longest prefix, then to their unit's group.
    Time of kernels that map to no unit (layout reorders, standalone Q/DQ, ...) is spread over
    the units in proportion to their own time, so a plan's total equals the model's total."""
    by_len = sorted(node_names, key=len, reverse=True)
    out: dict[str, float] = defaultdict(float)
    rest = 0.0
    for name, t in times.items():
        for n in by_len:
            if name == n or name.startswith(n + "_"):
                if n in group:
                    out[group[n]] += t
                else:
                    rest += t
                break
        else:
            rest += t
    total = sum(out.values())
    if total > 0:
        for u in out:
            out[u] += rest * out[u] / total
    return out, rest


def unit_groups(model, units, index) -> dict[str, str]:
    """Node → the unit whose output it (transitively, through non-unit ops) post-processes."""
    unit_names = {n.name for n in units}
    group = {n: n for n in unit_names}
    for node in model.proto.graph.node:  # topological order
        if node.name in group:
            continue
        for name in node.input:
            producer = index.producer.get(name)
            if producer is not None and producer.name in group:
                group[node.name] = group[producer.name]
                break
    return group


def measured_latency(model, ctx, units, options, calib, shapes, index, cache: Path | None = None,
                     record: dict | None = None):
    feeds = next(iter(calibration_batches(model, ctx, 1, batch=1)))
    all_names = [n.name for n in model.proto.graph.node]
    group = unit_groups(model, units, index)
    qmodel, _ = P.build_qdq(model, {n.name: "int8" for n in units}, calib, "onnxruntime")
    protos = [model.proto, qmodel.proto]
    (fp_times, _), (q_times, q_info) = cached_measurement(
        cache, "latency_profile", protos, feeds, {"runs": f"{lat.PROFILE_MIN_RUNS}-{lat.PROFILE_RUNS}/{lat.PROFILE_SECONDS}s",
                "fastest_share": lat.PROFILE_FASTEST_SHARE},
        lambda: profile_times(protos, feeds), record)
    fp_unit, fp_rest = _attribute(fp_times, all_names, group)
    q_unit, q_rest = _attribute(q_times, all_names, group)
    # boundary cost per element: Q + DQ + a layout Transpose, each measured per element in the
    # integer model (an int8/float boundary costs one of Q or DQ and usually a Transpose)
    qd = [n for n in q_times if q_info[n][0] in ("QuantizeLinear", "DequantizeLinear")]
    tr = [n for n in q_times if q_info[n][0] == "Transpose"]
    q_rate = sum(q_times[n] for n in qd) / max(sum(q_info[n][1] for n in qd), 1) if qd else 3e-7
    t_rate = sum(q_times[n] for n in tr) / max(sum(q_info[n][1] for n in tr), 1) if tr else q_rate
    per_elem = max(q_rate + t_rate, 1e-7)
    latency = {}
    for n in units:
        f = fp_unit.get(n.name, 0.0)
        qv = q_unit.get(n.name, f)
        entry = {}
        for p in options[n.name]:
            entry[p] = f if p in ("fp32", "fp16") else qv
        latency[n.name] = entry
    edges = unit_edges(model, units, shapes, index, per_elem, fixed_ms=BOUNDARY_FIXED_MS)
    fp32_total = sum(fp_times.values())
    return latency, (f"measured: ORT profiler, 1 thread, batch 1, float and all-int8 models interleaved, "
                     f"per kernel the mean of the fastest {100 * lat.PROFILE_FASTEST_SHARE:.0f} % of up to "
                     f"{lat.PROFILE_RUNS} runs, scaled to the "
                     f"end-to-end minimum; "
                     f"boundary {per_elem * 1e6:.2f} ns/element"), edges, fp32_total


def unit_edges(model, units, shapes, index, per_elem_ms: float, fixed_ms: float = 0.0) -> list[tuple[int, int, float]]:
    """Edges between units (through non-unit ops) and to graph inputs/outputs (-1); the cost of
    a float/integer boundary on the edge is ``fixed_ms + per_elem_ms · elements``."""
    pos = {n.name: i for i, n in enumerate(units)}
    edges = {}

    def elements(name):
        shape = shapes.shape(name)
        if not shape:
            return 0
        return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in shape]))

    for n in units:
        v = pos[n.name]
        stack, seen = [n.input[0]], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            producer = index.producer.get(t)
            if producer is None:
                if t in index.inputs:
                    edges[(-1, v)] = fixed_ms + per_elem_ms * elements(n.input[0])
                continue
            if producer.name in pos:
                edges[(pos[producer.name], v)] = fixed_ms + per_elem_ms * elements(n.input[0])
                continue
            stack.extend(i for i in producer.input if i and index.constant(i) is None)
    for n in units:
        u = pos[n.name]
        stack, seen = [n.output[0]], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in index.outputs:
                edges[(u, -1)] = fixed_ms + per_elem_ms * elements(n.output[0])
            for c in index.consumers.get(t, []):
                if c.name not in pos:
                    stack.extend(c.output)
    return [(a, b, c) for (a, b), c in sorted(edges.items())]


def cost_model_latency(model, target, units, options, shapes, index):
    """Roofline per unit: max(MACs / throughput[p], bytes / bandwidth) in ms."""
    thr = getattr(target, "throughput_gops", {}) or {}
    bw = float(getattr(target, "bandwidth_gbps", 100.0) or 100.0)
    latency = {}
    fp32_total = 0.0
    for n in units:
        w = index.constant(n.input[1])
        macs = _macs(n, w, shapes)
        xin = _elements(shapes, n.input[0])
        yout = _elements(shapes, n.output[0])
        entry = {}
        for p in options[n.name]:
            compute_p = "fp16" if p == "int4" else p
            gops = thr.get(compute_p) or thr.get("fp32", 1.0)
            act_bytes = BYTES["fp16" if p == "int4" else p] * (xin + yout)
            bytes_ = w.size * BYTES[p] + act_bytes
            entry[p] = max(2 * macs / (gops * 1e9), bytes_ / (bw * 1e9)) * 1e3
        latency[n.name] = entry
        fp32_total += entry["fp32"]
    return latency, f"cost model: roofline (throughput_gops, {bw} GB/s) of target '{target.name}'", [], fp32_total


def _elements(shapes, name) -> int:
    shape = shapes.shape(name)
    if not shape:
        return 0
    return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in shape]))


def _macs(node, w, shapes) -> float:
    out = _elements(shapes, node.output[0])
    if node.op_type in ("Conv",):
        return out * (w.size / w.shape[0])
    if node.op_type == "ConvTranspose":
        return _elements(shapes, node.input[0]) * (w.size / w.shape[0])
    k = w.shape[0] if node.op_type == "MatMul" or not attributes(node).get("transB", 0) else w.shape[1]
    return out * k
