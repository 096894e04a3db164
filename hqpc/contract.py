"""The accuracy contract of ``-O3`` (and ``-O2`` with ``--data``): measured, enforced, reported.

``hqpc M -O3 --target=cpu --data D.toml --max-drop 1.5`` must end with a *measured* top-1 drop
≤ max-drop on evaluation images that nothing else used, or say plainly that the pipeline could
not meet it and emit the best model that does — never a model that breaks the budget silently.

How (:func:`enforce_contract`, called by :func:`hqpc.compiler.compile_model` after the pass
pipeline whenever :func:`contract_applies` says so, or, for an explicit ``--pipeline``, when
:func:`contract_applies_after` finds that a lossy or quantization pass changed the model and the
data spec has a labelled eval split; the emitted model is the one the contract chose):

1. **Images.** The held-out part of the data spec's ``eval`` split: the whole split, minus the
   first ``annotations["prune"]["images"]["search"]`` items when the pruning search used them to
   choose its steps (the one fact read from a pass's annotation; when the search ran but
   recorded no images, the pass's default: half the split, at most 2000). Calibration images are never
   used. Without labels the metric is top-1 *agreement* with the input model (baseline 100 %);
   so it is when the input model's top-1 on the labels is not above chance
   (:func:`hqpc.runtime.metrics.labels_carry_signal`: random labels, another class numbering),
   recorded as ``labels_ignored``.
2. **Measure.** The input model (baseline) and the compiled model are run with ONNX Runtime
   (CPU, ORT_ENABLE_ALL) on those images; drop = baseline − final, in points. When the
   pipeline pruned, the model as it was before the quantization passes is measured too, which
   splits the drop between pruning and quantization (``budget_split``).
3. **Walk back** while the drop exceeds the budget, first candidate that fits wins:

   a. ``requantize``: the quantization passes again on the pruned model, with half of the budget
      pruning left (``max_drop`` passed to them), so the precision plan keeps more layers float;
   b. ``pruned-fp32`` (the pruned model without quantization), ``quantized-unpruned`` (the
      quantization passes on the cleaned-up model, with the full budget) and, with
      ``contract_retry=True``, ``recompile-tighter`` (the whole pipeline again with max_drop
      scaled by 0.8 · max_drop / measured drop; off by default: it doubles the compile time and
      did not help on the shared models): of those within the budget, the one with the highest
      top-1 unless another is more than 5 % faster (interleaved timing), then the fastest;
      then ``quantized-unpruned-tighter`` (the same with half the budget);
   c. ``cleaned-fp32``: the exact clean-up (-O1) result;
   d. ``input``: the input model itself (drop 0 by definition).

   The candidates are judged on the same held-out images that are reported (a choice among at
   most seven models, so the emitted model's number is slightly optimistic; ``actions`` lists
   every candidate tried). Intermediate models come from :class:`SnapshotInstrument` (the driver adds it to the pass
   manager's instruments); without it only c and d are available (c by a -O1 recompile).
4. **Report** ``report["contract"]`` (also annotation ``contract`` in the emitted model)::

      {"metric": "top1" | "agreement", "baseline_top1", "final_top1", "drop", "max_drop",
       "met": drop of the emitted model <= max_drop, "pipeline_met": the pipeline's own result
       met it, "walked_back": bool, "emitted": candidate name, "message": one plain sentence,
       "eval_images", "eval_source", "calib_images",
       "latency_ms": {"baseline", "final"}, "latency_ratio": final / baseline, "latency_speedup",
       "latency_setting", "latency_load_avg", "bytes": {"baseline", "final"}, "size_ratio",
       "budget_split": {"pruning", "quantization"}   # measured drop of each stage, points
       "budget_plan": {"pruning", "quantization"}    # what the prune pass reserved, when known
       "actions": [{"candidate", "what", "top1", "drop", "within_budget", "latency_ms"?, "wall_s"}],
       "wall_s"}

   After a walk-back ``report["annotations"]`` are the emitted model's (as in its metadata) and
   ``report["pipeline_annotations"]`` the pipeline result's (pruning search, precision plan).
   With ``met`` ``None`` (and a ``reason``) when the contract could not be checked: no
   ``--data``, a model with several inputs, an empty evaluation split.

Knobs (``options.extra``, i.e. keyword options of :func:`hqpc.compile`): ``contract`` (False
turns the contract off), ``contract_retry`` (True: also try a full recompile), ``contract_latency_runs`` (default 50), ``contract_threads``
(ORT threads for evaluation, default 2).
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from hqpc.ir import Model
from hqpc.passmanager import Instrument
from hqpc.runtime.metrics import labels_carry_signal

__all__ = ["SnapshotInstrument", "contract_applies", "contract_applies_after", "enforce_contract", "heldout_dataset", "evaluate"]

QUANT_PASSES = ("calibrate", "assign-precision", "insert-qdq")


class SnapshotInstrument(Instrument):
    """Keeps two copies of the model during a run: ``cleaned`` (before the first lossy or
    quantization pass: the exact clean-up result, with analysis annotations) and
    ``before_quant`` (before the first quantization pass: pruned and reconstructed, float), and
    ``quant_specs``: the pass specs that ran from the first quantization pass on."""

    name = "snapshot"

    def __init__(self) -> None:
        self.cleaned: Model | None = None
        self.before_quant: Model | None = None
        self.quant_specs: list[str] = []

    def before_pass(self, p, model, ctx) -> None:
        info = p.info
        quant = info.name in QUANT_PASSES
        if self.cleaned is None and (quant or (info.tolerance is not None and not info.analysis)):
            self.cleaned = model.copy()
        if self.before_quant is None and quant:
            self.before_quant = model.copy()
        if self.before_quant is not None:
            self.quant_specs.append(p.spec())


def contract_applies(options) -> bool:
    """Whether the driver should enforce the contract: -O3, or -O2 with --data; not for an
    explicit ``--pipeline``; not when ``contract=False`` is in the extra options."""
    if _contract_off(options):
        return False
    if getattr(options, "pipeline", None) is not None:
        return False
    return options.opt_level >= 3 or (options.opt_level == 2 and options.data is not None)


def _contract_off(options) -> bool:
    extra = getattr(options, "extra", None) or {}
    return extra.get("contract", True) in (False, "false", "off", 0)


def _lossy(name: str) -> bool:
    from hqpc.registry import get_pass

    if name in QUANT_PASSES:
        return True
    try:
        info = get_pass(name).info
    except Exception:
        return False
    return info.tolerance is not None and not info.analysis


def contract_applies_after(options, records: list | None = None, data_spec=None) -> bool:
    """The contract for an explicit ``--pipeline`` (which :func:`contract_applies` leaves out):
    it applies when ``--data`` is given, a lossy or quantization pass changed the model (and was
    kept), and the data's eval split is non-empty and labelled. With ``records`` None (before the
    run) it says whether the run may need the contract, i.e. whether to add the
    :class:`SnapshotInstrument`."""
    if _contract_off(options) or getattr(options, "pipeline", None) is None or options.data is None:
        return False
    if records is None:
        return True
    if not any(r.modified and not r.rolled_back and _lossy(r.name) for r in records):
        return False
    if data_spec is None:
        return False
    return data_spec.eval > 0 and data_spec.labels is not None


# --------------------------------------------------------------------------- evaluation
def heldout_dataset(spec, annotations: dict | None = None):
    """(dataset, description): the eval split minus the pruning search's images."""
    from hqpc.runtime.data import Dataset

    ds = spec.split("eval")
    prune = (annotations or {}).get("prune") or {}
    try:
        search = int((prune.get("images") or {}).get("search", 0) or 0)
    except (TypeError, ValueError, AttributeError):
        search = 0
    if not search and prune.get("history"):
        # the search ran but did not record its images (no step accepted): the pass's default
        # (search_images=0: the first half of the eval split, at most 2000 items)
        search = min(max(len(ds) // 2, 1), 2000)
    search = max(0, min(search, len(ds)))
    if search:
        return (Dataset(spec, "eval", ds.indices[search:]),
                f"eval split items [{search}:{len(ds)}] (the first {search} were used by the pruning search)")
    return ds, f"eval split, all {len(ds)} items"


def _batch_size(proto: onnx.ModelProto, wanted: int = 50) -> int:
    from hqpc.runtime import ort as ort_rt

    dims = ort_rt.input_shape(ort_rt.graph_inputs(proto)[0])
    return dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else wanted


def predictions(proto: onnx.ModelProto, x: np.ndarray, threads: int = 2, description: str = "",
                verbosity: int = 0) -> np.ndarray:
    """argmax of the first output over the class axis, for every row of ``x`` (a progress bar
    on a terminal when ``verbosity`` >= 1)."""
    from types import SimpleNamespace

    from hqpc.runtime import ort as ort_rt
    from hqpc.runtime.progress import progress

    sess = ort_rt.session(proto, threads=threads, optimization="all")
    name, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    batch = _batch_size(proto)
    preds = []
    starts = range(0, len(x), batch)
    for start in progress(starts, total=len(starts), description=description or "evaluating",
                          ctx=SimpleNamespace(config={"verbosity": verbosity})):
        chunk = x[start:start + batch]
        pad = batch - len(chunk) if _batch_size(proto, 0) else 0  # fixed batch dim: pad the last chunk
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        logits = np.asarray(sess.run([out], {name: chunk})[0])
        logits = logits.reshape(logits.shape[0], -1)[: len(chunk) - pad]
        preds.append(logits.argmax(axis=1))
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def evaluate(proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray | None, reference: np.ndarray | None,
             threads: int = 2, description: str = "", verbosity: int = 0) -> tuple[float, np.ndarray]:
    """(top-1 in percent, predictions): against labels ``y``, or agreement with ``reference``."""
    pred = predictions(proto, x, threads, description, verbosity)
    target = y if y is not None else (reference if reference is not None else pred)
    return float(np.mean(pred == np.asarray(target).reshape(-1)) * 100.0), pred


def _same_graph(a: Model | None, b: Model | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.proto.graph.SerializeToString(deterministic=True) == b.proto.graph.SerializeToString(deterministic=True)


def _bytes(model: Model) -> int:
    return len(model.serialized())


# --------------------------------------------------------------------------- the contract
def enforce_contract(result, options, log: Callable[[str], None] = lambda m: None,
                     snapshots: SnapshotInstrument | None = None) -> dict:
    """Measure the accuracy contract on ``result`` (a :class:`~hqpc.compiler.CompileResult`),
    walk back when the budget is broken, update ``result.model`` / ``result.report`` in place
    and return ``report["contract"]`` (module docstring)."""
    start = time.perf_counter()
    max_drop = float(options.max_drop)
    contract: dict[str, Any] = {"max_drop": max_drop}
    report = result.report

    def finish(model: Model | None = None) -> dict:
        contract["wall_s"] = round(time.perf_counter() - start, 2)
        if model is not None and model is not result.model:
            # the report's annotations describe the emitted model; the pipeline's (pruning search,
            # precision plan of the model that was not emitted) stay in the report for reference
            report["pipeline_annotations"] = result.model.annotations
            result.model = model
            summary = report.setdefault("summary", {})
            summary["nodes_after"], summary["params_after"] = model.node_count(), model.param_count()
        result.model.annotations["contract"] = _plain(_deterministic(contract))
        report["annotations"] = result.model.annotations
        report["summary"]["bytes_after"] = len(result.model.serialized())
        report["contract"] = contract
        return contract

    if options.data is None:
        contract.update(met=None, reason="no --data: the accuracy contract needs evaluation images")
        log("contract: not checked (no --data)")
        return finish()
    from hqpc.runtime import latency as lat
    from hqpc.runtime import ort as ort_rt
    from hqpc.runtime.data import DataSpec

    original = Model.load(options.model)
    if len(ort_rt.graph_inputs(original.proto)) != 1:
        contract.update(met=None, reason="the model has several inputs; the contract needs a single-input classifier")
        log("contract: not checked (several model inputs)")
        return finish()
    spec = DataSpec.load(options.data)
    dataset, source = heldout_dataset(spec, result.model.annotations)
    if len(dataset) == 0:
        contract.update(met=None, reason="the evaluation split is empty ([split] eval = 0)")
        log("contract: not checked (empty eval split)")
        return finish()
    extra = options.extra or {}
    threads = int(extra.get("contract_threads", 2) or 2)
    x, y = dataset.arrays()
    metric = "top1" if y is not None else "agreement"
    verbosity = int(getattr(options, "verbosity", 1))
    base_top1, base_pred = evaluate(original.proto, x, y, None, threads, "contract: evaluating the input model",
                                    verbosity)
    if y is not None and not labels_carry_signal(base_pred, y):
        contract["labels_ignored"] = (f"the input model's top-1 on the {len(y)} eval images is {base_top1:.2f} %, "
                                      "not above chance: the labels carry no signal")
        log(f"contract: {contract['labels_ignored']}; measuring top-1 agreement with the input model")
        y, metric = None, "agreement"
    if y is None:
        base_top1 = 100.0
    contract.update(metric=metric, baseline_top1=round(base_top1, 3), eval_images=int(len(x)), eval_source=source,
                    calib_images=int(spec.calib))
    top1_cache: dict[str, float] = {}

    def measure(name: str, model: Model) -> float:
        if name not in top1_cache:
            top1_cache[name] = evaluate(model.proto, x, y, base_pred, threads, f"contract: evaluating {name}",
                                        verbosity)[0]
        return top1_cache[name]

    final = result.model
    final_top1 = measure("compiled", final)
    drop = base_top1 - final_top1
    pipeline_met = drop <= max_drop + 1e-9
    contract["pipeline_met"] = bool(pipeline_met)
    contract["pipeline_top1"] = round(final_top1, 3)
    actions: list[dict] = []
    contract["actions"] = actions
    snap = snapshots
    cleaned = snap.cleaned if snap is not None else None
    before_quant = snap.before_quant if snap is not None else None
    pruned = before_quant is not None and cleaned is not None and not _same_graph(cleaned, before_quant)
    if before_quant is None and cleaned is not None:  # no quantization stage ran: the pipeline's end is "before quant"
        pruned = not _same_graph(cleaned, final)
        before_quant = final if pruned else None
    quantized = before_quant is not None and not _same_graph(before_quant, final)
    pruning_drop = 0.0
    if pruned:
        pruned_top1 = final_top1 if before_quant is final else measure("pruned-fp32", before_quant)
        pruning_drop = base_top1 - pruned_top1
    budget_split = {"pruning": round(pruning_drop, 3), "quantization": round(drop - pruning_drop, 3)}
    prune_ann = (final.annotations.get("prune") or {})
    if "budget" in prune_ann:
        contract["budget_plan"] = {"pruning": prune_ann.get("budget"), "quantization": prune_ann.get("reserve")}
    chosen, chosen_name, chosen_top1 = final, "compiled", final_top1
    log(f"contract: {metric} {base_top1:.2f} -> {final_top1:.2f} % on {len(x)} held-out images "
        f"(drop {drop:.2f} pt, budget {max_drop:.2f} pt{'' if pipeline_met else ': NOT MET'})")

    if not pipeline_met:
        def attempt(name: str, what: str, build: Callable[[], Model | None]) -> tuple[Model, float] | None:
            t0 = time.perf_counter()
            try:
                model = build()
            except Exception as exc:  # a candidate that cannot be built is recorded, not fatal
                actions.append({"candidate": name, "what": what, "error": f"{type(exc).__name__}: {exc}"[:300],
                                "wall_s": round(time.perf_counter() - t0, 2)})
                log(f"contract: candidate {name} failed: {type(exc).__name__}: {exc}")
                return None
            if model is None:
                return None
            if "quantiz" in name and not any(n.op_type == "DequantizeLinear" for n in model.proto.graph.node):
                what += " (the precision plan kept every layer float)"
            top1 = measure(name, model)
            d = base_top1 - top1
            ok = d <= max_drop + 1e-9
            actions.append({"candidate": name, "what": what, "top1": round(top1, 3), "drop": round(d, 3),
                            "within_budget": bool(ok), "wall_s": round(time.perf_counter() - t0, 2)})
            log(f"contract: {name}: {metric} {top1:.2f} % (drop {d:.2f} pt) "
                f"{'within' if ok else 'over'} budget")
            return (model, top1) if ok else None

        found: tuple[str, Model, float] | None = None
        # a. requantize the pruned model with a tighter budget
        if quantized and before_quant is not None and snap.quant_specs and pruning_drop < max_drop:
            tighter = max(0.0, max_drop - pruning_drop) / 2.0
            got = attempt("requantize", f"quantization passes again on the pruned model with max_drop {tighter:.3f}",
                          lambda: _recompile(before_quant, options, snap.quant_specs, tighter, log))
            if got:
                found = ("requantize", *got)
        # b. pruned float vs quantized unpruned: the faster one within budget
        if found is None:
            fits: list[tuple[str, Model, float]] = []
            if pruned and quantized:
                got = attempt("pruned-fp32", "the pruned (and reconstructed) model without quantization",
                              lambda: before_quant)
                if got:
                    fits.append(("pruned-fp32", *got))
            if pruned and snap.quant_specs:
                got = attempt("quantized-unpruned", "the quantization passes on the cleaned-up model, "
                              f"max_drop {max_drop:.3f}",
                              lambda: _recompile(cleaned, options, snap.quant_specs, max_drop, log))
                if got:
                    fits.append(("quantized-unpruned", *got))
            retry = extra.get("contract_retry", False) not in (False, "false", "off", 0, None)
            if pruned and retry and options.pipeline is None:
                tighter = max(0.0, max_drop * min(1.0, max_drop / max(drop, 1e-9)) * 0.8)
                got = attempt("recompile-tighter", f"the whole -O{options.opt_level} pipeline again with "
                              f"max_drop {tighter:.3f}",
                              lambda: _recompile(original, options, None, tighter, log))
                if got:
                    fits.append(("recompile-tighter", *got))
            if len(fits) > 1:
                timing = _fits_latency(fits, int(extra.get("contract_latency_runs", 50)))
                for action in actions:
                    if action["candidate"] in timing:
                        action["latency_ms"] = round(timing[action["candidate"]], 4)
                found = _fastest(fits, timing)
            elif fits:
                found = fits[0]
        # b2. the quantization passes on the cleaned-up model with half the budget
        if found is None and snap is not None and snap.quant_specs and cleaned is not None and (pruned or quantized):
            half = max_drop / 2.0
            got = attempt("quantized-unpruned-tighter", f"the quantization passes on the cleaned-up model, "
                          f"max_drop {half:.3f}", lambda: _recompile(cleaned, options, snap.quant_specs, half, log))
            if got:
                found = ("quantized-unpruned-tighter", *got)
        # c. the exact clean-up result
        if found is None:
            def build_cleaned() -> Model:
                if cleaned is not None:
                    return cleaned
                return _recompile(original, options, None, max_drop, log, level=1)
            got = attempt("cleaned-fp32", "the exact clean-up (-O1) result", build_cleaned)
            if got:
                found = ("cleaned-fp32", *got)
        # d. the input model
        if found is None:
            actions.append({"candidate": "input", "what": "the input model unchanged", "top1": round(base_top1, 3),
                            "drop": 0.0, "within_budget": True, "wall_s": 0.0})
            found = ("input", original, base_top1)
        chosen_name, chosen, chosen_top1 = found
        chosen = chosen.copy()
        # the budget split of what is emitted
        if chosen_name == "pruned-fp32":
            budget_split = {"pruning": round(base_top1 - chosen_top1, 3), "quantization": 0.0}
        elif chosen_name in ("quantized-unpruned", "quantized-unpruned-tighter"):
            budget_split = {"pruning": 0.0, "quantization": round(base_top1 - chosen_top1, 3)}
        elif chosen_name in ("cleaned-fp32", "input"):
            budget_split = {"pruning": 0.0, "quantization": 0.0}
        elif chosen_name == "recompile-tighter":
            budget_split = _split_from_prune_annotation(chosen, base_top1 - chosen_top1)
        else:
            budget_split = {"pruning": round(pruning_drop, 3), "quantization": round(base_top1 - chosen_top1 - pruning_drop, 3)}

    final_drop = base_top1 - chosen_top1
    contract.update(final_top1=round(chosen_top1, 3), drop=round(final_drop, 3), met=bool(final_drop <= max_drop + 1e-9),
                    walked_back=chosen_name != "compiled", emitted=chosen_name, budget_split=budget_split)
    if chosen_name == "compiled":
        contract["message"] = (f"budget met: {metric} drop {final_drop:.2f} pt <= {max_drop:.2f} pt "
                               f"on {len(x)} held-out images")
    else:
        contract["message"] = (f"the pipeline's model dropped {drop:.2f} pt > {max_drop:.2f} pt on {len(x)} held-out "
                               f"images; could not meet the budget with it, so the emitted model is '{chosen_name}' "
                               f"(drop {final_drop:.2f} pt)")
    log(f"contract: {contract['message']}")
    runs = int(extra.get("contract_latency_runs", 50))
    if runs > 0:
        timing = lat.compare({"baseline": original.proto, "final": chosen.proto}, runs=runs)
        b, f = timing["baseline"]["median_ms"], timing["final"]["median_ms"]
        contract.update(latency_ms={"baseline": round(b, 4), "final": round(f, 4)},
                        latency_ratio=round(f / b, 4) if b > 0 else None, latency_speedup=round(b / f, 4) if f > 0 else None,
                        latency_setting=f"ONNX Runtime CPU, ORT_ENABLE_ALL, 1 thread, batch 1, median of {runs} "
                                        "interleaved runs")
        backend = getattr(getattr(result, "model_target", None), "backend", "onnxruntime")
        if backend != "onnxruntime":
            contract["latency_note"] = (f"not the target's latency: the model is laid out for {backend} "
                                        "(Q/DQ placement, precisions), which ONNX Runtime CPU does not fuse the same way")
    try:
        contract["latency_load_avg"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    # sizes without hqpc annotations (metadata): the bytes a deployment carries
    base_bytes = _weight_bytes(original)
    final_bytes = _weight_bytes(chosen)
    contract["bytes"] = {"baseline": base_bytes, "final": final_bytes,
                         "note": "serialized model without hqpc.* metadata annotations"}
    contract["size_ratio"] = round(final_bytes / base_bytes, 4) if base_bytes else None
    return finish(chosen)


def _fits_latency(fits: list, runs: int) -> dict[str, float]:
    """Median latency in ms of each fitting candidate, measured once per machine and reused: the
    choice between them must not change between two compiles of the same input."""
    from hqpc.runtime.measure_cache import cached_compare, measurement_cache_dir

    return cached_compare(measurement_cache_dir(), "contract", {n: m.proto for n, m, _ in fits}, runs)


def _fastest(fits: list, latency_ms: dict[str, float], margin: float = 0.05):
    """Of the candidates within budget, the preferred one (highest top-1, then the order tried)
    unless another is faster by more than ``margin``; then the fastest. The margin keeps timing
    noise from flipping the choice (and so the emitted bytes) between runs."""
    preferred = sorted(fits, key=lambda f: -f[2])[0]
    fastest = min(fits, key=lambda f: latency_ms[f[0]])
    if latency_ms[fastest[0]] < (1.0 - margin) * latency_ms[preferred[0]]:
        return fastest
    return preferred


def _deterministic(value: Any) -> Any:
    """``value`` without measured timings (keys with latency / wall / load): what goes into the
    emitted model's metadata, so that the same input and seed give the same bytes whenever the
    same model is emitted. The report keeps everything."""
    if isinstance(value, dict):
        return {k: _deterministic(v) for k, v in value.items()
                if not any(word in k for word in ("latency", "wall", "load"))}
    if isinstance(value, list):
        return [_deterministic(v) for v in value]
    return value


def _split_from_prune_annotation(model: Model, total: float) -> dict:
    """Budget split of a recompiled model: the prune pass's own held-out measurement (same
    images: eval split after the search items) for pruning, the rest for quantization."""
    prune = model.annotations.get("prune") or {}
    final, metric = prune.get("final") or {}, prune.get("metric", "top1")
    before = final.get(f"heldout_{metric}_original")
    after = final.get(f"heldout_{metric}_reconstructed", final.get(f"heldout_{metric}_pruned"))
    if before is None or after is None:
        return {"pruning": None, "quantization": None, "total": round(total, 3)}
    pruning = float(before) - float(after)
    return {"pruning": round(pruning, 3), "quantization": round(total - pruning, 3),
            "source": "pruning: the prune pass's held-out measurement of the recompiled model"}


def _weight_bytes(model: Model) -> int:
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    keep = [p for p in proto.metadata_props if not p.key.startswith("hqpc.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    return len(proto.SerializeToString(deterministic=True))


def _recompile(model: Model, options, specs: list[str] | None, max_drop: float, log, level: int | None = None) -> Model:
    """Run ``specs`` (or an -O level) on ``model`` (annotations kept) with the same target, data,
    seed and extra options; the contract is off for the nested run."""
    from hqpc.compiler import compile_model

    nested = replace(options, model=model.to_proto(), pipeline=",".join(specs) if specs else None,
                     opt_level=options.opt_level if level is None else level, max_drop=max_drop, output=None,
                     report=None, print_ir_after=None, extra={**(options.extra or {}), "contract": False})
    res = compile_model(nested, log=lambda message: log(f"  [contract] {message}"))
    if res.rolled_back:
        log(f"contract: note: in the recompile, rolled back: {', '.join(r.name for r in res.rolled_back)}")
    return res.model


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
