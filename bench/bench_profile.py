"""Is the `cpu` per-layer latency profile reproducible? (issue #6)

The profile that `prune` and `assign-precision` read (``hqpc.runtime.latency.profile_layers``:
ONNX Runtime's profiler, 1 thread, batch 1, per kernel the mean of its fastest 20 % of up to 200 runs)
is taken ``--processes`` times per model, each in a fresh Python process (a new session, new
allocations: what two compiles see), and every pair of processes is compared layer by layer
over the Conv/Gemm/MatMul nodes (the layers the passes price).

Reported per model: the share of layers whose two readings agree within ±10 %, the same over
layers holding ≥ ``--min-share`` of the model's time (below that a kernel runs a few µs and the
profiler's 1 µs resolution alone is > 10 %), the largest deviation, and the ratio of the totals.
Run it on a quiet machine: another process on one of the cores shifts whole runs.

Usage:
  python bench/bench_profile.py                           # the four shared models, 2 processes
  python bench/bench_profile.py --models cifar10_resnet20 --processes 3
Writes bench/results/profile.md and bench/results/profile.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "models"
MODELS = ["cifar10_resnet20", "cifar10_resnet56", "mobilenet_v3_small", "mobilenet_v2"]
PRICED_OPS = ("Conv", "Gemm", "MatMul")

_CHILD = """
import json, sys, onnx
from hqpc.runtime import latency
model = onnx.load(sys.argv[1])
json.dump(latency.profile_layers(model), sys.stdout)
"""


def profile_in_fresh_process(path: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def compare(first: dict[str, float], second: dict[str, float], priced: set[str], min_share: float) -> dict:
    """Layer-by-layer agreement of two profiles over the priced layers both contain."""
    common = [n for n in first if n in second and n in priced and first[n] > 0]
    total = sum(first[n] for n in common)
    ratios = np.array([second[n] / first[n] for n in common])
    large = np.array([first[n] / total >= min_share for n in common])
    within = np.abs(ratios - 1.0) <= 0.10
    return {"layers": len(common), "within_10pct": float(within.mean()),
            "large_layers": int(large.sum()), "large_within_10pct": float(within[large].mean()) if large.any() else 1.0,
            "max_dev": float(np.abs(ratios - 1.0).max()),
            "max_dev_large": float(np.abs(ratios[large] - 1.0).max()) if large.any() else 0.0,
            "total_ratio": sum(second[n] for n in common) / total}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--min-share", type=float, default=0.005)
    parser.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"shared models not found at {SHARED}", file=sys.stderr)
        return 2
    import onnx

    results = {"load_before": os.getloadavg()[0], "models": {}}
    for name in args.models.split(","):
        path = SHARED / f"{name}.onnx"
        priced = {n.name for n in onnx.load(path).graph.node if n.op_type in PRICED_OPS}
        profiles = [profile_in_fresh_process(path) for _ in range(args.processes)]
        pairs = [compare(profiles[a], profiles[b], priced, args.min_share)
                 for a, b in itertools.combinations(range(len(profiles)), 2)]
        results["models"][name] = pairs
        for p in pairs:
            print(f"{name:20s} {p['layers']:3d} layers {100 * p['within_10pct']:5.1f}% within ±10 %; "
                  f"{p['large_layers']:3d} with ≥ {100 * args.min_share:.1f}% share: "
                  f"{100 * p['large_within_10pct']:5.1f}% (max |Δ| {100 * p['max_dev_large']:.1f}%); "
                  f"totals {p['total_ratio']:.3f}", flush=True)
    results["load_after"] = os.getloadavg()[0]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    lines = ["# Reproducibility of the `cpu` per-layer latency profile", "",
             f"`python bench/bench_profile.py --processes {args.processes}`; 1-minute load "
             f"{results['load_before']:.2f} before, {results['load_after']:.2f} after. One row per pair of "
             "processes; Conv/Gemm/MatMul layers.", "",
             f"| model | layers | within ±10 % | layers ≥ {100 * args.min_share:.1f} % of time | within ±10 % | "
             "max dev. (those) | max dev. (all) | total ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, pairs in results["models"].items():
        for p in pairs:
            lines.append(f"| {name} | {p['layers']} | {100 * p['within_10pct']:.1f} % | {p['large_layers']} | "
                         f"{100 * p['large_within_10pct']:.1f} % | {100 * p['max_dev_large']:.1f} % | "
                         f"{100 * p['max_dev']:.1f} % | {p['total_ratio']:.3f} |")
    (out / "profile.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
