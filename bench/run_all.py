#!/usr/bin/env python3
"""The benchmark, in one command: every shared model, FP32 vs the peers vs hqpc -O2 / -O3.

    python bench/run_all.py              # every model in ../shared/data/models
    python bench/run_all.py --quick      # CIFAR ResNet-20 only (the digits CNN without ../shared/data)
    python bench/run_all.py --models mobilenet_v2 --rounds 200 --variants fp32,ort-u8,hqpc-O3

Variants (each compiled in a fresh child process: compile time and peak memory are its own):

  fp32      the input model as given
  ort-s8    onnxruntime.quantization.quantize_static, QDQ, per-channel int8 weights, int8
            activations (ORT's defaults), MinMax, the same calibration images, after ORT's
            recommended quant_pre_process; on a temporary copy of the model
  ort-u8    the same with uint8 activations (ORT's U8S8, the fast path of its x86 kernels)
  nncf      nncf.quantize (post-training quantization, ONNX backend, default preset), the same
            calibration images (subset_size = all of them); when nncf cannot be imported or
            fails, the reason is recorded instead of a number
  hqpc-O2   hqpc.compile(model, target="cpu", level=2, data=spec, max_drop=...)
  hqpc-O3   hqpc.compile(model, target="cpu", level=3, data=spec, max_drop=...) with the
            accuracy contract (hqpc.contract) enforced

Measured for each variant, all in this process after the compiles:

* top-1 on the held-out images: the data spec's eval split minus the items the -O3 pruning
  search used (the first ``images.search`` of the eval split, from the -O3 report; the pass's
  default when -O3 did not run), i.e. images used neither for calibration nor for search;
  every variant on the same images (ONNX Runtime CPU, ORT_ENABLE_ALL);
* latency: ONNX Runtime CPU EP, ORT_ENABLE_ALL, intra-op threads 1 and 2, batch 1 and 8
  (real held-out images), every variant taking one run per round in rotating order
  (interleaved, so machine load hits them alike); median, quartiles and IQR in ms; the 1-minute
  load average before and after each setting; 2-thread sessions run with intra-op spinning
  off (``session.intra_op.allow_spinning=0``): with six sessions timed in turn, each one's
  idle pool thread kept spinning after its run and took a core from the next (2-thread batch-8
  medians came out 2-3x the 1-thread ones); numbers taken at load >= 2.5 are flagged
  ``preliminary`` (shared machine);
* file size (bytes; for hqpc also without the ``hqpc.*`` metadata annotations), compile time
  (wall, in the child, including reading the calibration images), peak memory (the child's own
  peak RSS, VmHWM, which includes Python and the imported libraries — not ru_maxrss, which
  Linux carries over from the parent across execve; ``rss_at_start_mb`` is the child's RSS
  before it imported anything but the standard library).

Output: ``bench/results/<date>[-quick].json`` (everything above, plus machine and versions),
``<date>[-quick].md`` (the table) and ``<date>[-quick]-pareto.png`` (latency at 1 thread,
batch 1 vs top-1, one panel per model; needs matplotlib). ``--html`` also writes the -O3
report.html of each model with the benchmark's Pareto plot.

On a shared machine: ``--wait-load SECONDS`` waits (at most that long, per model) for the
1-minute load to fall below 2.5 before timing; ``--keep DIR`` keeps the compiled models, and
``--remeasure bench/results/<date>.json --keep DIR`` re-times them later (top-1, sizes and
compile figures are kept) and rewrites that run's outputs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "models"
RESULTS = REPO / "bench" / "results"
SPECS = {
    "mobilenet_v2": REPO / "examples/data/imagenet_mobilenet.toml",
    "mobilenet_v3_small": REPO / "examples/data/imagenet_mobilenet.toml",
    "cifar10_resnet20": REPO / "examples/data/cifar10_resnet.toml",
    "cifar10_resnet56": REPO / "examples/data/cifar10_resnet.toml",
    "digits_cnn": REPO / "examples/digits/digits.toml",
}
DIGITS = REPO / "examples/digits/digits_cnn.onnx"
VARIANTS = ("fp32", "ort-s8", "ort-u8", "nncf", "hqpc-O2", "hqpc-O3")
SETTINGS = ((1, 1), (2, 1), (1, 8), (2, 8))  # (threads, batch)
LOADED = 2.5


# --------------------------------------------------------------------------- child: one compile
def _status_mb(key: str) -> float | None:
    """A /proc/self/status value (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _peak_mb() -> tuple[float, str]:
    """Peak RSS of this process. VmHWM belongs to the address space made by execve, so it is the
    child's own; ru_maxrss is not (Linux keeps it across execve: it starts at the parent's RSS at
    fork) and is only the fallback."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "ru_maxrss"


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed images (batches of ``batch``)."""

    def __init__(self, name: str, x: np.ndarray, batch: int):
        self._items = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._items, None)


def _calib(spec_path: str) -> np.ndarray:
    from hqpc.runtime.data import DataSpec

    return DataSpec.load(spec_path).split("calib").arrays()[0]


def _fixed_batch(model_path: str) -> int | None:
    import onnx

    from hqpc.runtime import ort as ort_rt

    dims = ort_rt.input_shape(ort_rt.graph_inputs(onnx.load(model_path, load_external_data=False))[0])
    return dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None


def compile_ort(job: dict, activation: str) -> dict:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib = _calib(job["spec"])
    work = Path(job["out"]).parent
    src = work / f"{Path(job['out']).stem}.src.onnx"
    shutil.copyfile(job["model"], src)  # ORT may write <model>.opt.onnx beside its input: a temp copy
    pre = work / f"{Path(job['out']).stem}.pre.onnx"
    info = {}
    try:
        quant_pre_process(str(src), str(pre))
        info["pre_process"] = "quant_pre_process"
    except Exception as exc:  # pre-processing is optional; record why it was skipped
        shutil.copyfile(src, pre)
        info["pre_process"] = f"skipped: {type(exc).__name__}: {exc}"[:200]
    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
    batch = _fixed_batch(str(pre)) or 10
    quantize_static(str(pre), job["out"], _Reader(name, calib, batch), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    info.update(calib_images=int(len(calib)), settings=f"QDQ, per-channel int8 weights, {activation} activations, MinMax")
    return info


def compile_nncf(job: dict) -> dict:
    import nncf
    import onnx

    calib = _calib(job["spec"])
    model = onnx.load(job["model"])
    name = model.graph.input[0].name
    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))], lambda item: {name: item})
    quantized = nncf.quantize(model, dataset, subset_size=len(calib))
    if quantized.ir_version > 10:  # onnxruntime 1.31 refuses IR 14
        quantized.ir_version = 8
    onnx.save(quantized, job["out"])
    return {"nncf": nncf.__version__, "calib_images": int(len(calib)),
            "settings": "nncf.quantize defaults (ONNX backend, performance preset), subset_size = all calibration images"}


def _driver_enforces_contract() -> bool:
    import inspect

    import hqpc.compiler

    return "enforce_contract" in inspect.getsource(hqpc.compiler.compile_model)


def compile_hqpc(job: dict, level: int) -> dict:
    import hqpc
    from hqpc.compiler import CompileOptions, write_outputs

    out, report = Path(job["out"]), Path(job["out"]).with_suffix(".report.json")
    info = {"command": f"hqpc {job['model']} -O{level} --target=cpu --data {job['spec']} --max-drop {job['max_drop']}"}
    if level < 3 or _driver_enforces_contract():
        result = hqpc.compile(job["model"], target="cpu", level=level, data=job["spec"], max_drop=job["max_drop"],
                              output=out, report=report)
        info["contract_source"] = "driver" if "contract" in result.report else "none"
    else:  # the driver does not call the contract yet: run it here, exactly as the driver will
        import io

        import hqpc.compiler as compiler
        from hqpc.contract import SnapshotInstrument, enforce_contract

        snap = SnapshotInstrument()

        class _Manager(compiler.PassManager):
            def __init__(self, passes, ctx, **kwargs):
                super().__init__(passes, ctx, **kwargs)
                ctx.instruments.append(snap)

        compiler.PassManager = _Manager
        options = CompileOptions(model=Path(job["model"]), opt_level=level, target="cpu", data=Path(job["spec"]),
                                 max_drop=job["max_drop"], output=out, report=report, extra={"size_budget": None})
        result = compiler.compile_model(options)
        enforce_contract(result, options, snapshots=snap)
        write_outputs(result, options, io.StringIO())
        info["contract_source"] = "bench (driver not wired yet): hqpc.contract.enforce_contract"
    info["report"] = str(report)
    info["rolled_back"] = result.report["summary"]["rolled_back"]
    if "contract" in result.report:
        info["contract"] = {k: v for k, v in result.report["contract"].items() if k != "actions"}
        info["contract_actions"] = [a.get("candidate") for a in result.report["contract"].get("actions", [])]
    plan = (result.report["annotations"].get("precision") or {}).get("plan") or {}
    counts: dict[str, int] = {}
    for p in plan.values():
        counts[p] = counts.get(p, 0) + 1
    info["precision_counts"] = counts
    prune = result.report["annotations"].get("prune") or {}
    if prune:
        info["prune"] = {k: prune.get(k) for k in ("score_source", "budget", "reserve", "images", "final", "kept",
                                                     "channels", "wall_s")}
    info["passes_s"] = {r["name"]: round(r["wall_s"], 2) for r in result.report["passes"] if r["wall_s"] > 0.5}
    return info


def worker(job: dict) -> dict:
    """Compile one variant; returns its info with compile_s, peak and baseline RSS."""
    rss_before = _status_mb("VmRSS")
    start = time.perf_counter()
    variant = job["variant"]
    if variant.startswith("ort-"):
        info = compile_ort(job, variant[4:])
    elif variant == "nncf":
        info = compile_nncf(job)
    elif variant.startswith("hqpc-O"):
        info = compile_hqpc(job, int(variant[-1]))
    else:
        raise ValueError(f"unknown variant {variant}")
    info["compile_s"] = round(time.perf_counter() - start, 2)
    peak, source = _peak_mb()
    info["peak_rss_mb"], info["peak_source"] = round(peak, 1), source
    info["rss_at_start_mb"] = None if rss_before is None else round(rss_before, 1)
    return info


def run_child(job: dict, timeout: float) -> dict:
    """Run :func:`worker` in a fresh interpreter (imports included in the child, not timed)."""
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"error": f"exit {done.returncode}: {tail}"[:600]}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- parent: measurements
def load1() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def wait_for_quiet(max_wait: float, threshold: float = LOADED, poll: float = 15.0) -> float:
    """Wait (at most ``max_wait`` s) until the 1-minute load average is below ``threshold``;
    returns the seconds waited."""
    start = time.perf_counter()
    while load1() >= threshold and time.perf_counter() - start < max_wait:
        time.sleep(poll)
    return round(time.perf_counter() - start, 1)


def top1(path: Path, x: np.ndarray, y: np.ndarray, batch: int = 50) -> float:
    from hqpc.runtime import ort as ort_rt

    sess = ort_rt.session(path, 2, "all")
    name = sess.get_inputs()[0].name
    fixed = sess.get_inputs()[0].shape[0]
    batch = fixed if isinstance(fixed, int) and fixed > 0 else batch
    correct = 0
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        n = len(chunk)
        if n < batch and isinstance(fixed, int):
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        logits = sess.run(None, {name: chunk})[0].reshape(len(chunk), -1)[:n]
        correct += int(np.sum(logits.argmax(1) == y[start:start + n]))
    return 100.0 * correct / len(x)


def interleaved(paths: dict[str, Path], sample: np.ndarray, threads: int, rounds: int, warmup: int) -> dict:
    from hqpc.runtime import ort as ort_rt

    # several multi-threaded sessions in turn: idle pool threads must sleep, not spin (see the
    # module docstring)
    sessions = {v: ort_rt.session(p, threads, "all", spin=threads == 1) for v, p in paths.items()}
    feeds = {v: {s.get_inputs()[0].name: sample} for v, s in sessions.items()}
    names = list(sessions)
    for _ in range(warmup):
        for v in names:
            sessions[v].run(None, feeds[v])
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(rounds):
        for v in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            sessions[v].run(None, feeds[v])
            times[v].append((time.perf_counter() - start) * 1e3)
    out = {}
    for v, t in times.items():
        p10, p25, med, p75 = np.percentile(t, [10, 25, 50, 75])
        out[v] = {"median_ms": round(float(med), 4), "p25_ms": round(float(p25), 4), "p75_ms": round(float(p75), 4),
                  "iqr_ms": round(float(p75 - p25), 4), "p10_ms": round(float(p10), 4),
                  "min_ms": round(float(np.min(t)), 4), "runs": len(t)}
    return out


def bytes_without_metadata(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    keep = [p for p in proto.metadata_props if not p.key.startswith("hqpc.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    return len(proto.SerializeToString())


def bench_model(name: str, source: Path, args, workdir: Path) -> dict:
    from hqpc.contract import heldout_dataset
    from hqpc.runtime.data import DataSpec

    spec_path = SPECS[name]
    res: dict = {"model": name, "source": str(source), "data": str(spec_path.relative_to(REPO)),
                 "max_drop": args.max_drop, "variants": {}}
    local = workdir / f"{name}.onnx"
    shutil.copyfile(source, local)
    paths: dict[str, Path] = {}
    for variant in args.variants:
        entry: dict = {}
        if variant == "fp32":
            paths["fp32"] = local
            entry = {"compile_s": 0.0}
        elif variant == "nncf" and args.nncf_error:
            entry = {"error": args.nncf_error}
        else:
            out = workdir / f"{name}.{variant}.onnx"
            print(f"  compiling {variant} ...", file=sys.stderr, flush=True)
            entry = run_child({"variant": variant, "model": str(local), "spec": str(spec_path), "out": str(out),
                               "max_drop": args.max_drop}, args.timeout)
            if "error" not in entry and out.is_file():
                paths[variant] = out
            print(f"  {variant}: " + (entry.get("error") or f"{entry.get('compile_s')} s, peak "
                                      f"{entry.get('peak_rss_mb')} MB"), file=sys.stderr, flush=True)
        res["variants"][variant] = entry
    # held-out images: eval split minus the pruning search's images
    spec = DataSpec.load(spec_path)
    o3 = res["variants"].get("hqpc-O3", {})
    images = (o3.get("prune") or {}).get("images") or {}
    # the -O3 search's images when recorded, else the prune pass's default (half the eval split, <= 2000)
    annotations = {"prune": {"images": images, "history": [0]}}
    dataset, source_text = heldout_dataset(spec, annotations)
    x, y = dataset.arrays()
    res.update(eval_images=int(len(x)), eval_source=source_text, calib_images=int(spec.calib))
    if y is None:
        raise SystemExit(f"{spec_path}: the benchmark needs labelled data")
    for v, p in paths.items():
        entry = res["variants"][v]
        entry["top1"] = round(top1(p, x, y), 3)
        entry["bytes"] = p.stat().st_size
        if v.startswith("hqpc"):
            entry["bytes_without_hqpc_metadata"] = bytes_without_metadata(p)
    # latency
    res["latency"] = measure_latency(paths, x, args, res)
    derive(res)
    return res


def measure_latency(paths: dict[str, Path], x: np.ndarray, args, res: dict) -> dict:
    """Every (threads, batch) setting, variants interleaved; waits for a quiet machine first
    when --wait-load is given."""
    if args.wait_load > 0:
        res["waited_for_load_s"] = wait_for_quiet(args.wait_load)
    lat: dict = {}
    for threads, batch in SETTINGS:
        usable = {v: p for v, p in paths.items() if batch == 1 or _fixed_batch(str(p)) in (None, batch)}
        if len(x) < batch or not usable:
            continue
        rounds = args.rounds if batch == 1 else max(10, args.rounds // 4)
        before = load1()
        timing = interleaved(usable, x[:batch], threads, rounds, warmup=max(5, rounds // 10))
        after = load1()
        key = f"t{threads}_b{batch}"
        lat[key] = {"threads": threads, "batch": batch, "rounds": rounds, "load_before": before, "load_after": after,
                    "preliminary": bool(max(before, after) >= LOADED), "results": timing}
        print(f"  latency {key}: " + ", ".join(f"{v} {t['median_ms']:.3f}" for v, t in timing.items())
              + f" ms (load {before}->{after})", file=sys.stderr, flush=True)
    return lat


def derive(res: dict) -> None:
    """Speed-ups (1 thread, batch 1, medians), drops and size ratios against fp32."""
    base = res.get("latency", {}).get("t1_b1", {}).get("results", {})
    fp = base.get("fp32", {}).get("median_ms")
    ort_best = min((base[v]["median_ms"] for v in ("ort-s8", "ort-u8") if v in base), default=None)
    fp_top1 = res["variants"].get("fp32", {}).get("top1")
    fp_bytes = res["variants"].get("fp32", {}).get("bytes")
    for v, entry in res["variants"].items():
        if v in base:
            entry["speedup_vs_fp32"] = round(fp / base[v]["median_ms"], 3) if fp else None
            entry["speedup_vs_ort_int8"] = round(ort_best / base[v]["median_ms"], 3) if ort_best else None
        if fp_top1 is not None and entry.get("top1") is not None:
            entry["drop_pt"] = round(fp_top1 - entry["top1"], 3)
        if fp_bytes and entry.get("bytes"):
            entry["size_ratio"] = round(entry["bytes"] / fp_bytes, 4)


def remeasure(args) -> int:
    """Re-time the models of an earlier run (kept with --keep) and rewrite its outputs: for a
    machine that was loaded during the first run. Top-1, sizes and compile figures are kept."""
    from hqpc.contract import heldout_dataset
    from hqpc.runtime.data import DataSpec

    data = json.loads(args.remeasure.read_text())
    if args.keep is None:
        raise SystemExit("--remeasure needs --keep DIR (the folder holding the compiled models)")
    for res in data["results"]:
        name = res["model"]
        if args.models and name not in args.models.split(","):
            continue
        paths = {}
        for v, entry in res["variants"].items():
            p = args.keep / (f"{name}.onnx" if v == "fp32" else f"{name}.{v}.onnx")
            if "error" not in entry and p.is_file():
                paths[v] = p
        spec = DataSpec.load(REPO / res["data"])
        images = {"search": int(res["eval_source"].split("first ")[1].split()[0])} if "first " in res["eval_source"] else {}
        dataset, _ = heldout_dataset(spec, {"prune": {"images": images}})
        x, _ = dataset.arrays(limit=max(b for _, b in SETTINGS))
        print(f"{name}:", file=sys.stderr, flush=True)
        res["latency"] = measure_latency(paths, x, args, res)
        derive(res)
        res["goals"] = goals(res)
    meta = data["meta"]
    meta.setdefault("remeasured", []).append({"date": dt.datetime.now().isoformat(timespec="minutes"),
                                              "command": "python bench/run_all.py " + " ".join(sys.argv[1:]),
                                              "rounds": args.rounds})
    meta["preliminary"] = any(s.get("preliminary") for r in data["results"] for s in r.get("latency", {}).values())
    write_outputs(data["results"], meta, args.out_dir, args.remeasure.stem)
    return 0


def write_outputs(results: list[dict], meta: dict, out_dir: Path, stem: str) -> None:
    from hqpc.report_html import pareto_figure_png

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(results, meta))
    png = pareto_figure_png({r["model"]: pareto_points(r) for r in results}, out_dir / f"{stem}-pareto.png")
    print(markdown(results, meta))
    print(f"wrote {out_dir / (stem + '.json')}, {stem}.md" + (f", {stem}-pareto.png" if png else
                                                               " (no Pareto PNG: matplotlib missing)"))


def goals(res: dict) -> dict:
    """The issue's goals for the best hqpc variant within 1.5 pt (1 thread, batch 1)."""
    name = res["model"]
    best = None
    for v in ("hqpc-O3", "hqpc-O2"):
        e = res["variants"].get(v, {})
        if e.get("speedup_vs_fp32") and e.get("drop_pt") is not None and e["drop_pt"] <= 1.5:
            if best is None or e["speedup_vs_fp32"] > best[1]["speedup_vs_fp32"]:
                best = (v, e)
    if best is None:
        return {"variant": None, "note": "no hqpc variant within 1.5 pt with a latency measurement"}
    v, e = best
    speed_goal = 1.5 if name == "mobilenet_v3_small" else (4.0 if name.startswith("cifar10_resnet") else 3.12)
    out = {"variant": v, "speedup_vs_fp32": e["speedup_vs_fp32"], "speedup_goal": speed_goal,
           "speedup_met": e["speedup_vs_fp32"] >= speed_goal, "size_ratio": e.get("size_ratio"),
           "size_met": e.get("size_ratio") is not None and e["size_ratio"] <= 0.25, "drop_pt": e["drop_pt"]}
    if name != "mobilenet_v3_small" and e.get("speedup_vs_ort_int8") is not None:
        out["speedup_vs_ort_int8"] = e["speedup_vs_ort_int8"]
        out["vs_ort_met"] = e["speedup_vs_ort_int8"] >= 1.5
    return out


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# Benchmark {meta['date']}", "",
             f"`{meta['command']}` — onnxruntime {meta['onnxruntime']}, {meta['cpus']} CPUs ({meta['cpu']}), "
             f"1-min load {meta['load_start']} at start, {meta['load_end']} at end."
             + (" **Preliminary: the machine was loaded (load ≥ 2.5) during latency runs.**" if meta["preliminary"] else "")
             + "".join(f" Latency re-timed {m['date']}: `{m['command']}`." for m in meta.get("remeasured", [])),
             "", "Latency: ONNX Runtime CPU, ORT_ENABLE_ALL, median [IQR] in ms of interleaved runs. Top-1 on held-out "
             "images (not used for calibration or search). Speed-ups at 1 thread, batch 1.", ""]
    head = ("| model | variant | top-1 % | drop pt | 1T b1 ms | ×fp32 | ×ORT int8 | 2T b1 ms | 1T b8 ms | 2T b8 ms | "
            "size MB | size ratio | compile s | peak MB |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for res in results:
        for v, e in res["variants"].items():
            if "error" in e:
                lines.append(f"| {res['model']} | {v} | – | – | {e['error'][:120]} |" + " |" * 9)
                continue

            def cell(key):
                t = res.get("latency", {}).get(key, {}).get("results", {}).get(v)
                return f"{t['median_ms']:.3f} [{t['iqr_ms']:.3f}]" if t else "–"

            def size_cell(e):
                text = f(e.get("size_ratio"), "{:.3f}")
                fp_bytes = res["variants"].get("fp32", {}).get("bytes")
                if e.get("bytes_without_hqpc_metadata") and fp_bytes:
                    text += f" ({e['bytes_without_hqpc_metadata'] / fp_bytes:.3f} w/o metadata)"
                return text

            def f(value, fmt):
                return fmt.format(value) if value is not None else "–"

            lines.append(f"| {res['model']} | {v} | {f(e.get('top1'), '{:.2f}')} | {f(e.get('drop_pt'), '{:.2f}')} | "
                         f"{cell('t1_b1')} | {f(e.get('speedup_vs_fp32'), '{:.2f}')} | "
                         f"{f(e.get('speedup_vs_ort_int8'), '{:.2f}')} | {cell('t2_b1')} | {cell('t1_b8')} | "
                         f"{cell('t2_b8')} | {f(e.get('bytes') and e['bytes'] / 1e6, '{:.2f}')} | "
                         f"{size_cell(e)} | {f(e.get('compile_s'), '{:.1f}')} | "
                         f"{f(e.get('peak_rss_mb'), '{:.0f}')} |")
    lines += ["", "Held-out images per model: " + ", ".join(f"{r['model']} {r['eval_images']} ({r['eval_source']})"
                                                           for r in results)]
    lines += ["", "Goals (issue #8; the best hqpc variant within 1.5 pt; 1 thread, batch 1; "
              "ORT int8 = the faster of ort-s8 and ort-u8; smaller = file size, ≥ 75 % means ratio ≤ 0.25):", "",
              "| model | variant | drop pt | ×fp32 (goal) | ×ORT int8 (goal 1.5) | size ratio (goal ≤ 0.25) |",
              "|---|---|---|---|---|---|"]

    def verdict(value, met, fmt):
        return "–" if value is None else fmt.format(value) + (" ✓" if met else " ✗")

    for r in results:
        g = r.get("goals") or {}
        if not g.get("variant"):
            lines.append(f"| {r['model']} | – | {g.get('note', '')} | | | |")
            continue
        lines.append(f"| {r['model']} | {g['variant']} | {g['drop_pt']:.2f} | "
                     f"{verdict(g['speedup_vs_fp32'], g['speedup_met'], '{:.2f}')} ({g['speedup_goal']}) | "
                     f"{verdict(g.get('speedup_vs_ort_int8'), g.get('vs_ort_met'), '{:.2f}')} | "
                     f"{verdict(g.get('size_ratio'), g.get('size_met'), '{:.3f}')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small model: CIFAR ResNet-20 (digits without shared data)")
    parser.add_argument("--models", help="comma-separated model names (default: every model in ../shared/data/models)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"default {','.join(VARIANTS)}")
    parser.add_argument("--max-drop", type=float, default=1.5, help="accuracy budget for hqpc (default 1.5)")
    parser.add_argument("--rounds", type=int, default=100, help="interleaved rounds at batch 1 (batch 8: a quarter)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per compile (default 3600)")
    parser.add_argument("--wait-load", type=float, default=0.0, metavar="SECONDS",
                        help="before each model's latency runs, wait up to SECONDS for the 1-min load to fall below 2.5")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--html", action="store_true", help="also write each model's -O3 report.html with the Pareto plot")
    parser.add_argument("--keep", type=Path, help="keep the compiled models in this folder")
    parser.add_argument("--remeasure", type=Path, metavar="RESULTS.json",
                        help="re-time the models of an earlier run (with --keep DIR of that run) and rewrite its outputs")
    parser.add_argument("--render", type=Path, metavar="RESULTS.json",
                        help="rewrite the markdown table and Pareto plot of an earlier run from its JSON (no timing)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        data = json.loads(args.render.read_text())
        for res in data["results"]:
            res["goals"] = goals(res)
        write_outputs(data["results"], data["meta"], args.render.parent, args.render.stem)
        return 0
    if args.remeasure:
        return remeasure(args)
    if args.worker:
        try:
            print(json.dumps(worker(json.loads(args.worker))), flush=True)
        except Exception as exc:
            traceback.print_exc()
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:600]}), flush=True)
        return 0
    args.variants = [v for v in args.variants.split(",") if v]
    available = {p.name[:-5]: p for p in sorted(SHARED.glob("*.onnx")) if p.name.count(".") == 1} if SHARED.is_dir() else {}
    if args.models:
        names = [m for m in args.models.split(",") if m]
    elif args.quick:
        names = ["cifar10_resnet20"] if "cifar10_resnet20" in available else ["digits_cnn"]
    else:
        names = list(available)
    skipped = {}
    models = {}
    for n in names:
        if n == "digits_cnn":
            models[n] = DIGITS
        elif n not in available:
            skipped[n] = f"not found in {SHARED}"
        elif n not in SPECS:
            skipped[n] = "no data spec for this model"
        else:
            models[n] = available[n]
    args.nncf_error = None
    if "nncf" in args.variants:
        try:
            import nncf  # noqa: F401
        except Exception as exc:
            args.nncf_error = f"nncf not usable: {type(exc).__name__}: {exc}"[:300]
    import onnxruntime as ort

    date = dt.date.today().isoformat()
    stem = date + ("-quick" if args.quick else "")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    meta = {"date": date, "command": "python bench/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "onnxruntime": ort.__version__, "python": platform.python_version(), "cpus": os.cpu_count(), "cpu": cpu,
            "load_start": load1(), "variants": args.variants, "max_drop": args.max_drop, "rounds": args.rounds,
            "skipped": skipped}
    try:
        import nncf

        meta["nncf"] = nncf.__version__
    except Exception:
        meta["nncf"] = None
    results = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hqpc_bench_") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name, path in models.items():
            print(f"{name}:", file=sys.stderr, flush=True)
            res = bench_model(name, path, args, workdir)
            res["goals"] = goals(res)
            results.append(res)
            if args.html and "hqpc-O3" in res["variants"] and res["variants"]["hqpc-O3"].get("report"):
                _write_html(res, workdir, args.out_dir / f"{stem}-{name}-O3.html")
    meta["load_end"] = load1()
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    meta["preliminary"] = any(s.get("preliminary") for r in results for s in r.get("latency", {}).values())
    write_outputs(results, meta, args.out_dir, stem)
    return 0


def pareto_points(res: dict) -> list[dict]:
    t = res.get("latency", {}).get("t1_b1", {}).get("results", {})
    return [{"label": v, "latency_ms": t[v]["median_ms"], "top1": e["top1"]}
            for v, e in res["variants"].items() if v in t and e.get("top1") is not None]


def _write_html(res: dict, workdir: Path, path: Path) -> None:
    import onnx

    from hqpc.report_html import write_report_html

    entry = res["variants"]["hqpc-O3"]
    report = json.loads(Path(entry["report"]).read_text())
    model_path = Path(entry["report"]).with_suffix("").with_suffix(".onnx")
    model = onnx.load(str(model_path)) if model_path.is_file() else None
    original = onnx.load(res["source"], load_external_data=False)
    write_report_html(path, report, model=model, original=original, bench={res["model"]: pareto_points(res)})


if __name__ == "__main__":
    sys.exit(main())
