"""Pruning benchmark: speed-up and top-1 drop of `hqpc -O3` *pruning alone* on the shared models.

For every model it

1. compiles ``hqpc MODEL -O3 --target cpu --data SPEC --disable-pass insert-qdq`` (the exact
   command is printed and stored; ``--reuse`` keeps an existing output);
2. times the FP32 original and the pruned model side by side in one process: ONNX Runtime
   CPU execution provider, 1 thread, batch 1, ORT_ENABLE_ALL, ``--rounds`` × ``--runs``
   interleaved runs (original, pruned, original, ...), reporting the median (and min);
3. evaluates top-1 of both on the evaluation images the search did not use (the evaluation
   split after its first ``search`` images, read from the report; the calibration split is used
   by scores and reconstruction only), and on the whole evaluation split for reference;
4. rebuilds the same plan *without* reconstruction (the compile pipeline up to ``prune``, then
   ``prune-channels`` with the reported plan) and evaluates it on the same images, so the
   reconstruction gain is measured at the same plan.

Usage::

    python bench/bench_prune.py [MODEL ...] [--out DIR] [--reuse] [--runs 200] [--rounds 3]

MODEL is a name from ../shared/data/models (default: all four). Results: a table on stdout
and ``DIR/bench_prune.json``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
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
    model = compile_model(CompileOptions(model=str(source), pipeline=",".join(prefix), target="cpu")).model \
        if prefix else None
    proto = model.proto if model is not None else onnx.load(source)
    groups = analyze(proto)
    plan = normalize_plan(groups, parse_plan(json.dumps({"plan": report["annotations"]["prune"]["plan"]})))
    return apply_plan(proto, groups, plan)


def bench(name: str, out: Path, reuse: bool, runs: int, rounds: int, max_drop: float) -> dict:
    from hqpc.runtime import latency
    from hqpc.runtime.data import DataSpec

    command = compile_command(name, out, max_drop)
    pruned_path = out / f"{name}.pruned.onnx"
    report_path = out / f"{name}.report.json"
    wall = None
    if not (reuse and pruned_path.exists() and report_path.exists()):
        print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - start
    report = json.loads(report_path.read_text())
    info = report["annotations"].get("prune", {})
    original = onnx.load(SHARED / f"{name}.onnx")
    pruned = onnx.load(pruned_path)
    onnx.checker.check_model(pruned, full_check=True)

    medians = {"original": [], "pruned": []}
    mins = {"original": [], "pruned": []}
    for _ in range(rounds):
        timing = latency.compare({"original": original, "pruned": pruned}, runs=runs, warmup=20)
        for key in medians:
            medians[key].append(timing[key]["median_ms"])
            mins[key].append(timing[key]["min_ms"])
    lat_o, lat_p = float(np.median(medians["original"])), float(np.median(medians["pruned"]))

    spec = DataSpec.load(REPO / SPECS[name])
    x, y = spec.split("eval").arrays()
    n_search = int((info.get("images") or {}).get("search", 0))
    hx, hy = x[n_search:], y[n_search:]
    result = {
        "model": name, "command": " ".join(shlex.quote(c) for c in command), "compile_s": wall,
        "score_source": info.get("score_source"), "plan_groups": len(info.get("plan", {})),
        "latency_original_ms": round(lat_o, 4), "latency_pruned_ms": round(lat_p, 4),
        "speedup": round(lat_o / lat_p, 3),
        "latency_min_original_ms": round(float(np.min(mins["original"])), 4),
        "latency_min_pruned_ms": round(float(np.min(mins["pruned"])), 4),
        "timing": f"ORT CPU EP, 1 thread, batch 1, ORT_ENABLE_ALL, {rounds}x{runs} interleaved runs, median",
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
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(SPECS))
    parser.add_argument("--out", type=Path, default=Path("bench_prune_out"))
    parser.add_argument("--reuse", action="store_true", help="keep existing compiled models and reports")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-drop", type=float, default=1.0)
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [bench(name, args.out, args.reuse, args.runs, args.rounds, args.max_drop) for name in args.models]
    (args.out / "bench_prune.json").write_text(json.dumps(rows, indent=2) + "\n")
    header = ("model", "fp32 ms", "pruned ms", "speedup", "top1 fp32", "top1 pruned", "drop", "no-recon", "recon gain",
              "held-out")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(v) for v in (r["model"], r["latency_original_ms"], r["latency_pruned_ms"], r["speedup"],
                                           r["top1_original"], r["top1_pruned"], r["drop"],
                                           r.get("top1_pruned_without_reconstruction", "-"),
                                           r.get("reconstruction_gain", "-"), r["heldout_images"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
