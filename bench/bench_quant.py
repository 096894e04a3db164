"""Side-by-side quantization benchmark: FP32 vs ONNX Runtime quantize_static vs ``hqpc -O2``.

For every model: top-1 on the data spec's *eval* split (images not used for calibration) and
latency (median of interleaved single-image runs; ONNX Runtime CPU EP, ORT_ENABLE_ALL,
1 intra-op thread, batch 1), all variants measured in the same process, round-robin, so
machine load affects them alike.

Variants:
  fp32        the input model as given
  ort-s8      onnxruntime.quantization.quantize_static: QDQ, per-channel, int8 activations and
              weights (ORT 1.31's defaults), MinMax, on the same calibration images, after
              ORT's recommended quant_pre_process
  ort-u8      the same with uint8 activations (ORT's documented choice for x86 with VNNI)
  hqpc        ``hqpc MODEL -O2 --target=cpu --data SPEC`` (run as a subprocess, exactly that command;
              extra hqpc flags with --hqpc-args, e.g. "--size-budget 0.6")

Usage:
  python bench/bench_quant.py                      # the four shared models
  python bench/bench_quant.py --models mobilenet_v2 --rounds 300 --json out.json
  python bench/bench_quant.py --models mobilenet_v2 --hqpc-args="--size-budget 0.6" --variants fp32,hqpc

Compiling and timing separately (compile at low priority on a shared machine, time at normal
priority; the timing phase evaluates and times exactly the files the compile phase wrote):
  nice -n 5 python bench/bench_quant.py --keep DIR --compile-only
  python bench/bench_quant.py --keep DIR --reuse --json out.json

Recorded per model besides top-1 and latency: images lost/gained against FP32 and against
ort-s8 (paired, same eval images), the 1-minute load average sampled during the timing loop,
and for hqpc the exact command, the precision plan's layer counts, its INT8 weight-size
reference and the Q/DQ annotation.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from hqpc.runtime import ort as ort_rt

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "models"
SPECS = {
    "mobilenet_v2": REPO / "examples/data/imagenet_mobilenet.toml",
    "mobilenet_v3_small": REPO / "examples/data/imagenet_mobilenet.toml",
    "cifar10_resnet20": REPO / "examples/data/cifar10_resnet.toml",
    "cifar10_resnet56": REPO / "examples/data/cifar10_resnet.toml",
}
VARIANTS = ("fp32", "ort-s8", "ort-u8", "hqpc")


def predictions(session: ort.InferenceSession, x: np.ndarray, batch: int = 50) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[start:start + batch]})[0].argmax(1)
                           for start in range(0, len(x), batch)])


def top1(session: ort.InferenceSession, x: np.ndarray, y: np.ndarray, batch: int = 50) -> float:
    return float(np.mean(predictions(session, x, batch) == y))


def interleaved_latency(sessions: dict[str, ort.InferenceSession], sample: np.ndarray, rounds: int,
                        warmup: int = 20) -> dict[str, dict[str, float]]:
    """Median (and quartiles) of single runs in ms, the variants taking turns in every round
    (order rotated each round)."""
    names = list(sessions)
    feeds = {n: {sessions[n].get_inputs()[0].name: sample} for n in names}
    for n in names:
        for _ in range(warmup):
            sessions[n].run(None, feeds[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    loads = [os.getloadavg()[0]]
    for r in range(rounds):
        if r and r % max(1, rounds // 10) == 0:
            loads.append(os.getloadavg()[0])
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            start = time.perf_counter()
            sessions[n].run(None, feeds[n])
            times[n].append((time.perf_counter() - start) * 1e3)
    loads.append(os.getloadavg()[0])
    out = {n: {"median_ms": float(np.median(t)), "p25_ms": float(np.percentile(t, 25)),
               "p75_ms": float(np.percentile(t, 75)), "min_ms": float(np.min(t))} for n, t in times.items()}
    # paired per-round ratios (same round, adjacent runs): robust to load drifting between rounds
    for n in names:
        for ref in ("fp32", "ort-s8", "ort-u8"):
            if ref in times and ref != n:
                ratio = np.asarray(times[ref]) / np.asarray(times[n])
                out[n][f"speedup_vs_{ref}"] = {"median": float(np.median(ratio)),
                                                "p25": float(np.percentile(ratio, 25)),
                                                "p75": float(np.percentile(ratio, 75))}
    out["_load_avg_1min"] = {"samples": [round(v, 2) for v in loads], "median": float(np.median(loads)),
                             "min": float(min(loads)), "max": float(max(loads))}
    return out


class _Reader:
    """CalibrationDataReader over preprocessed calibration images (batches of 10)."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 10):
        self._items = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._items, None)


def ort_quantize(source: Path, out: Path, calib: np.ndarray, activation: str) -> float:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    start = time.perf_counter()
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(source), str(pre))
    name = onnx.load(str(pre)).graph.input[0].name
    quantize_static(str(pre), str(out), _Reader(name, calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return time.perf_counter() - start


def hqpc_compile(source: Path, spec: Path, out: Path, extra: list[str]) -> tuple[float, dict, str]:
    report = out.with_suffix(".report.json")
    command = ["hqpc", str(source), "-O2", "--target=cpu", "--data", str(spec), "-o", str(out),
               "--report", str(report), *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"hqpc failed ({done.returncode}): {done.stderr.strip()}")
    return wall, json.loads(report.read_text()), shlex.join(command)


def bench_model(name: str, args, workdir: Path) -> dict:
    from hqpc.runtime.data import DataSpec

    source = SHARED / f"{name}.onnx"
    spec_path = SPECS[name]
    spec = DataSpec.load(spec_path)
    calib, _ = spec.split("calib").arrays()
    x_eval, y_eval = spec.split("eval").arrays()
    paths: dict[str, Path] = {}
    info: dict[str, dict] = {}
    variants = args.variants
    info_file = workdir / f"{name}.info.json"
    if args.reuse:
        if not info_file.is_file():
            raise SystemExit(f"--reuse: {info_file} not found (run with --compile-only first)")
        info = json.loads(info_file.read_text())
    if "fp32" in variants:
        paths["fp32"] = source
    for act in ("s8", "u8"):
        if f"ort-{act}" in variants:
            out = workdir / f"{name}.ort-{act}.onnx"
            if not args.reuse:
                wall = ort_quantize(source, out, calib, act)
                info[f"ort-{act}"] = {"compile_s": round(wall, 1)}
            paths[f"ort-{act}"] = out
    if "hqpc" in variants:
        out = workdir / f"{name}.hqpc.onnx"
        if not args.reuse:
            wall, report, command = hqpc_compile(source, spec_path, out, shlex.split(args.hqpc_args))
            precision = report["annotations"].get("precision", {})
            plan = precision.get("plan", {})
            counts: dict[str, int] = {}
            for value in plan.values():
                counts[value] = counts.get(value, 0) + 1
            info["hqpc"] = {"compile_s": round(wall, 1), "command": command,
                            "rolled_back": report["summary"]["rolled_back"], "plan_counts": counts,
                            "float_reasons": precision.get("reasons", {}), "qdq": report["annotations"].get("qdq", {}),
                            "int8_size_bytes": precision.get("int8_size_bytes"),
                            "predicted": precision.get("predicted"), "budgets": precision.get("budgets"),
                            "measurements": precision.get("measurements"),
                            "accuracy_check": precision.get("accuracy_check", {}).get("final"),
                            "report": str(out.with_suffix(".report.json"))}
        paths["hqpc"] = out
    if args.compile_only:
        info_file.write_text(json.dumps(info, indent=1))
        return {"model": name, "compiled": {v: str(p) for v, p in paths.items()}}
    sessions = {v: ort_rt.session(p, 1, "all") for v, p in paths.items()}
    result = {"model": name, "data": str(spec_path.relative_to(REPO)), "calib_images": len(calib),
              "eval_images": len(x_eval), "variants": {}}
    preds = {v: predictions(sess, x_eval) for v, sess in sessions.items()}
    for v in sessions:
        ok = preds[v] == y_eval
        entry = {"top1": round(100 * float(np.mean(ok)), 2), "bytes": paths[v].stat().st_size, **info.get(v, {})}
        for ref in ("fp32", "ort-s8", "ort-u8"):
            if ref in preds and ref != v:
                ref_ok = preds[ref] == y_eval
                entry[f"vs_{ref}"] = {"lost": int(np.sum(ref_ok & ~ok)), "gained": int(np.sum(~ref_ok & ok))}
        result["variants"][v] = entry
    latency = interleaved_latency(sessions, x_eval[:1], args.rounds)
    result["load_avg_1min"] = latency.pop("_load_avg_1min")
    for v, lat in latency.items():
        result["variants"][v].update({k: (round(val, 3) if isinstance(val, float) else
                                          {a: round(b, 3) for a, b in val.items()}) for k, val in lat.items()})
    return result


def format_table(results: list[dict]) -> str:
    lines = ["| model | variant | top-1 % (eval) | latency median ms [p25, p75] | vs fp32 | vs ort-s8 | vs ort-u8 "
             "| size MB | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        if "variants" not in res:
            continue
        fp = res["variants"].get("fp32", {}).get("median_ms")
        for v, r in res["variants"].items():
            cols = []
            for ref in ("fp32", "ort-s8", "ort-u8"):
                ref_ms = res["variants"].get(ref, {}).get("median_ms")
                cols.append(f"{ref_ms / r['median_ms']:.2f}x" if ref_ms and ref != v else "")
            load = res.get("load_avg_1min", {})
            lines.append(f"| {res['model']} | {v} | {r['top1']:.2f} | {r['median_ms']:.3f} [{r['p25_ms']:.3f}, "
                         f"{r['p75_ms']:.3f}] | {' | '.join(cols)} | {r['bytes'] / 1e6:.3f} | "
                         f"{load.get('median', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SPECS), help="comma-separated shared model names")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=200, help="interleaved latency rounds (default 200)")
    parser.add_argument("--hqpc-args", default="", help="extra hqpc flags, e.g. '--size-budget 0.6'")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--keep", type=Path, help="keep the compiled models in this folder")
    parser.add_argument("--compile-only", action="store_true", help="compile into --keep, no evaluation or timing")
    parser.add_argument("--reuse", action="store_true", help="evaluate and time the models --compile-only wrote to --keep")
    args = parser.parse_args(argv)
    if (args.compile_only or args.reuse) and not args.keep:
        parser.error("--compile-only/--reuse need --keep DIR")
    args.variants = [v for v in args.variants.split(",") if v]
    if not SHARED.is_dir():
        print(f"shared models not found at {SHARED}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in [m for m in args.models.split(",") if m]:
            res = bench_model(name, args, workdir)
            results.append(res)
            if "variants" in res:
                print(format_table([res]).split("\n", 2)[2], flush=True)
            else:
                print(f"compiled {name}: {res['compiled']}", flush=True)
    print()
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "rounds": args.rounds,
                                         "hqpc_args": args.hqpc_args, "cpu_count": os.cpu_count(),
                                         "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
