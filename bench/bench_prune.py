"""Pruning benchmark: speed-up and top-1 drop of `hqpc -O3` *pruning alone* on the shared models.

For every model it

1. compiles the equivalent of ``hqpc MODEL -O3 --target cpu --data SPEC --disable-pass
   insert-qdq --max-drop 1.0`` through ``hqpc.compile(..., contract=False)`` (the -O3 accuracy
   contract would replace an over-budget result; this benchmark measures the pruning search's
   own result; the command is printed and stored; ``--reuse`` keeps an existing output);
2. times the FP32 original, its exact -O1 clean-up and the pruned model side by side in one
   process: ONNX Runtime CPU execution provider, 1 thread, batch 1, ORT_ENABLE_ALL,
   ``--rounds`` × ``--runs`` interleaved runs, median of the round medians, as wall time and as
   CPU time of the calling thread (see :func:`timed`);
3. evaluates top-1 of both on the evaluation images the search did not use (the evaluation
   split after its first ``search`` images, read from the report; the calibration split is used
   by scores and reconstruction only), and on the whole evaluation split for reference;
4. rebuilds the same plan *without* reconstruction (the compile pipeline up to ``prune``, then
   ``prune-channels`` with the reported plan) and evaluates it on the same images, so the
   reconstruction gain is measured at the same plan; with ``--fixed-fraction F`` also on a
   magnitude plan removing F of every prunable group (independent of any evaluation image);
5. with ``--prune-options 'heldout_curve=true,...'`` (and a large ``--max-drop``) lists every
   accepted step's speed-up, search drop and held-out drop: the accuracy/latency frontier of
   the training-free search (``frontier`` in the JSON).

Usage::

    python bench/bench_prune.py [MODEL ...] [--out DIR] [--reuse] [--runs 200] [--rounds 3]
                                [--prune-options 'estimate=posterior'] [--fixed-fraction 0.25]

MODEL is a name from ../shared/data/models (default: all four). Results: a table on stdout
and ``DIR/bench_prune.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "models"
SPECS = {
    "cifar10_resnet20": "examples/data/cifar10_resnet.toml",
    "cifar10_resnet56": "examples/data/cifar10_resnet.toml",
    "mobilenet_v2": "examples/data/imagenet_mobilenet.toml",
    "mobilenet_v3_small": "examples/data/imagenet_mobilenet.toml",
}


def compile_command(name: str, out: Path, max_drop: float) -> list[str]:
    return ["hqpc", str(SHARED / f"{name}.onnx"), "-O3", "--target=cpu", "--data", str(REPO / SPECS[name]),
            "--disable-pass", "insert-qdq", "--max-drop", str(max_drop), "-o", str(out / f"{name}.pruned.onnx"),
            "--report", str(out / f"{name}.report.json")]


def top1(proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    from hqpc.passes.prune_search import predictions

    return 100.0 * float(np.mean(predictions(proto, x) == y))


def without_reconstruction(name: str, report: dict) -> onnx.ModelProto:
    """The reported plan applied to the model as the prune pass saw it, no refit."""
    from hqpc.compiler import CompileOptions, compile_model
    from hqpc.passes.channel_groups import analyze
    from hqpc.passes.prune_channels import apply_plan, normalize_plan, parse_plan

    names = [p["spec"] for p in report["passes"]]
    prefix = []
    for spec in names:
        if spec.split("{")[0] in ("annotate-sensitivity", "prune"):
            break
        if not spec.startswith("verify"):
            prefix.append(spec)
    source = SHARED / f"{name}.onnx"
    model = compile_model(CompileOptions(model=str(source), pipeline=",".join(prefix), target="cpu",
                                         extra={"contract": False})).model \
        if prefix else None
    proto = model.proto if model is not None else onnx.load(source)
    groups = analyze(proto)
    plan = normalize_plan(groups, parse_plan(json.dumps({"plan": report["annotations"]["prune"]["plan"]})))
    return apply_plan(proto, groups, plan)


def compile_pruned(name: str, out: Path, max_drop: float, prune_options: str | None) -> None:
    """The compile command above through the Python API with ``contract=False``: the accuracy
    contract of -O3 would replace an over-budget result by another model, and this benchmark
    measures what the pruning search itself produced (the contract's own check is the same
    held-out top-1 measured below)."""
    import hqpc

    extra = {"contract": False}
    pipeline = None
    if prune_options:
        from hqpc.registry import level_pipeline

        pipeline = ",".join(f"prune{{{prune_options}}}" if p == "prune" else p
                            for p in level_pipeline(3) if p != "insert-qdq")
    hqpc.compile(str(SHARED / f"{name}.onnx"), target="cpu", level=3, data=str(REPO / SPECS[name]),
                 max_drop=max_drop, disable="insert-qdq", pipeline=pipeline,
                 output=str(out / f"{name}.pruned.onnx"), report=str(out / f"{name}.report.json"),
                 log=lambda line: print(line, flush=True), **extra)


def timed(models: dict[str, onnx.ModelProto], runs: int, warmup: int = 20) -> dict[str, dict[str, float]]:
    """Side-by-side timing like :func:`hqpc.runtime.latency.compare` (same sessions: CPU EP,
    1 intra-op thread, ORT_ENABLE_ALL, same seeded feeds, models in rotating order every round),
    recording per run both the wall time and the CPU time of the calling thread. With one
    intra-op thread ONNX Runtime computes on the calling thread, so the CPU time is the model's
    compute without the time the process waited for a core (on a shared machine the wall-time
    median can be several times the minimum); the process CPU time is recorded to check that
    no other thread did work."""
    from hqpc.runtime import latency
    from hqpc.runtime import ort as ort_rt

    names = list(models)
    sessions = {n: ort_rt.session(models[n], 1, "all") for n in names}
    feeds = latency._feeds(models[names[0]], 1, 0)
    for _ in range(warmup):
        for n in names:
            sessions[n].run(None, feeds)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    proc = {n: [] for n in names}
    for r in range(runs):
        for n in names[r % len(names):] + names[:r % len(names)]:
            w0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
            sessions[n].run(None, feeds)
            w1, c1, p1 = time.perf_counter(), time.thread_time(), time.process_time()
            wall[n].append((w1 - w0) * 1e3)
            cpu[n].append((c1 - c0) * 1e3)
            proc[n].append((p1 - p0) * 1e3)
    return {n: {"median_ms": float(np.median(wall[n])), "min_ms": float(np.min(wall[n])),
                "cpu_median_ms": float(np.median(cpu[n])), "process_cpu_median_ms": float(np.median(proc[n]))}
            for n in names}


def cleaned(name: str) -> onnx.ModelProto:
    """The -O1 (exact clean-up) model: the speed-up over it is the pruning's alone."""
    from hqpc.compiler import CompileOptions, compile_model

    return compile_model(CompileOptions(model=str(SHARED / f"{name}.onnx"), target="cpu", opt_level=1,
                                        extra={"contract": False})).model.proto


def fixed_plan(name: str, fraction: float, plan_file: Path | None = None
               ) -> tuple[onnx.ModelProto, onnx.ModelProto, str]:
    """A plan that depends on no evaluation image: ``fraction`` of every prunable group's
    channels removed by weight magnitude (``prune-channels{fraction=F}`` after the -O1 clean-up),
    or the plan in ``plan_file`` (group ids of the -O1 model), without and with ``reconstruct``
    (fitted on the calibration split)."""
    from hqpc.compiler import CompileOptions, compile_model
    from hqpc.registry import level_pipeline

    option = f"plan={plan_file}" if plan_file else f"fraction={fraction}"
    base = ",".join(level_pipeline(1)) + f",prune-channels{{{option}}}"
    models = []
    for pipeline in (base, base + ",reconstruct"):
        result = compile_model(CompileOptions(model=str(SHARED / f"{name}.onnx"), pipeline=pipeline, target="cpu",
                                              data=REPO / SPECS[name], extra={"contract": False}))
        assert not any(r.rolled_back for r in result.records), [r.name for r in result.records if r.rolled_back]
        models.append(result.model.proto)
    return models[0], models[1], base + "[,reconstruct]"


def frontier(info: dict) -> list[dict]:
    """The accepted steps of a search run with ``prune{heldout_curve=true}``: speed-up (the
    search's own side-by-side timing of the step's model against the input), search drop and
    held-out drop (top-1 points on images the search never used). Empty without the option."""
    history = info.get("history") or []
    metric = info.get("metric", "top1")
    key = f"heldout_{metric}"
    steps = [e for e in history if e.get("accepted") and key in e]
    if not steps:
        return []
    base_search, base_heldout = steps[0][metric], steps[0][key]
    return [{"step": e["step"], "channels_removed": e["channels_removed"], "speedup": e["speedup"],
             "search_drop": round(base_search - e[metric], 3), "drop_est": e.get("drop_est", 0.0),
             "heldout_drop": round(base_heldout - e[key], 3)} for e in steps]


def bench(name: str, out: Path, reuse: bool, runs: int, rounds: int, max_drop: float,
          prune_options: str | None = None, fixed_fraction: float = 0.0) -> dict:
    from hqpc.runtime import latency
    from hqpc.runtime.data import DataSpec

    command = compile_command(name, out, max_drop)
    pruned_path = out / f"{name}.pruned.onnx"
    report_path = out / f"{name}.report.json"
    wall = None
    if not (reuse and pruned_path.exists() and report_path.exists()):
        print("$ " + " ".join(shlex.quote(c) for c in command) + "   # run as hqpc.compile(..., contract=False)"
              + (f", prune{{{prune_options}}}" if prune_options else ""), flush=True)
        start = time.perf_counter()
        compile_pruned(name, out, max_drop, prune_options)
        wall = time.perf_counter() - start
    report = json.loads(report_path.read_text())
    info = report["annotations"].get("prune", {})
    original = onnx.load(SHARED / f"{name}.onnx")
    clean = cleaned(name)
    pruned = onnx.load(pruned_path)
    onnx.checker.check_model(pruned, full_check=True)

    keys = ("original", "cleaned", "pruned")
    medians = {k: [] for k in keys}
    mins = {k: [] for k in keys}
    cpu = {k: [] for k in keys}
    proc = {k: [] for k in keys}
    for _ in range(rounds):
        timing = timed({"original": original, "cleaned": clean, "pruned": pruned}, runs=runs)
        for key in keys:
            medians[key].append(timing[key]["median_ms"])
            mins[key].append(timing[key]["min_ms"])
            cpu[key].append(timing[key]["cpu_median_ms"])
            proc[key].append(timing[key]["process_cpu_median_ms"])
    lat_o, lat_p = float(np.median(medians["original"])), float(np.median(medians["pruned"]))
    lat_c = float(np.median(medians["cleaned"]))
    cpu_o, cpu_c, cpu_p = (float(np.median(cpu[k])) for k in keys)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    spec = DataSpec.load(REPO / SPECS[name])
    x, y = spec.split("eval").arrays()
    n_search = int((info.get("images") or {}).get("search", 0))
    hx, hy = x[n_search:], y[n_search:]
    result = {
        "model": name, "command": " ".join(shlex.quote(c) for c in command), "compile_s": wall,
        "score_source": info.get("score_source"), "plan_groups": len(info.get("plan", {})),
        "latency_original_ms": round(lat_o, 4), "latency_pruned_ms": round(lat_p, 4),
        "speedup": round(lat_o / lat_p, 3), "latency_cleaned_ms": round(lat_c, 4),
        "speedup_over_cleaned": round(lat_c / lat_p, 3), "round_medians_ms": medians,
        "cpu_original_ms": round(cpu_o, 4), "cpu_cleaned_ms": round(cpu_c, 4), "cpu_pruned_ms": round(cpu_p, 4),
        "cpu_speedup": round(cpu_o / cpu_p, 3), "cpu_speedup_over_cleaned": round(cpu_c / cpu_p, 3),
        "round_cpu_medians_ms": cpu, "round_process_cpu_medians_ms": proc, "load_average_1min": load,
        "prune_options": prune_options, "search_wall_s": info.get("wall_s"),
        "estimate": info.get("estimate"),
        "channels_removed": int(sum(int(info["channels"][g]) - int(k) for g, k in info.get("kept", {}).items())),
        "channels_prunable_groups": int(sum(int(c) for c in info.get("channels", {}).values())),
        "latency_min_original_ms": round(float(np.min(mins["original"])), 4),
        "latency_min_pruned_ms": round(float(np.min(mins["pruned"])), 4),
        "timing": f"ORT CPU EP, 1 thread, batch 1, ORT_ENABLE_ALL, {rounds}x{runs} interleaved runs, median of the "
                  f"round medians; wall time and CPU time of the calling thread",
        "heldout_images": int(len(hx)), "search_images": n_search, "calib_images": spec.calib,
        "params_original": int(sum(np.prod(t.dims) for t in original.graph.initializer)),
        "params_pruned": int(sum(np.prod(t.dims) for t in pruned.graph.initializer)),
    }
    base, mine = top1(original, hx, hy), top1(pruned, hx, hy)
    result.update({"top1_original": round(base, 2), "top1_pruned": round(mine, 2), "drop": round(base - mine, 2)})
    result["top1_original_full_eval"] = round(top1(original, x, y), 2)
    result["top1_pruned_full_eval"] = round(top1(pruned, x, y), 2)
    if info.get("plan"):
        plain = without_reconstruction(name, report)
        no_recon = top1(plain, hx, hy)
        result.update({"top1_pruned_without_reconstruction": round(no_recon, 2),
                       "reconstruction_gain": round(mine - no_recon, 2)})
    curve = frontier(info)
    if curve:
        result["frontier"] = curve
    if fixed_fraction > 0:
        plain, refit, pipeline = fixed_plan(name, fixed_fraction)
        a, b = top1(plain, hx, hy), top1(refit, hx, hy)
        result["fixed_plan"] = {"pipeline": pipeline, "fraction": fixed_fraction, "top1_without_reconstruction":
                                round(a, 2), "top1_with_reconstruction": round(b, 2), "gain": round(b - a, 2)}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(SPECS))
    parser.add_argument("--out", type=Path, default=Path("bench_prune_out"))
    parser.add_argument("--reuse", action="store_true", help="keep existing compiled models and reports")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--fixed-fraction", type=float, default=0.25,
                        help="also measure reconstruction on a magnitude plan removing this fraction (0: off)")
    parser.add_argument("--prune-options", default=None,
                        help="options of the prune pass, e.g. 'estimate=flips' (default: the pass defaults)")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        rows.append(bench(name, args.out, args.reuse, args.runs, args.rounds, args.max_drop, args.prune_options,
                          args.fixed_fraction))
        (args.out / "bench_prune.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "bench_prune.json").write_text(json.dumps(rows, indent=2) + "\n")
    header = ("model", "fp32 ms", "pruned ms", "speedup", "fp32 cpu ms", "pruned cpu ms", "cpu speedup",
              "top1 fp32", "top1 pruned", "drop", "no-recon", "recon gain",
              "held-out")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(v) for v in (r["model"], r["latency_original_ms"], r["latency_pruned_ms"], r["speedup"],
                                           r["cpu_original_ms"], r["cpu_pruned_ms"], r["cpu_speedup"],
                                           r["top1_original"], r["top1_pruned"], r["drop"],
                                           r.get("top1_pruned_without_reconstruction", "-"),
                                           r.get("reconstruction_gain", "-"), r["heldout_images"])))
    for r in rows:
        if r.get("frontier"):
            print(f"\n{r['model']}: accepted steps (speed-up from the search's timing; drops in top-1 points)")
            print("step | channels removed | speed-up | search drop | estimate | held-out drop")
            for e in r["frontier"]:
                print(" | ".join(str(e[k]) for k in ("step", "channels_removed", "speedup", "search_drop",
                                                      "drop_est", "heldout_drop")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
