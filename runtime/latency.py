"""Latency: end-to-end timing, per-layer latency from ONNX Runtime profiling, and a roofline
cost model for targets we cannot run here.

* :func:`measure` / :func:`compare` — end-to-end median latency of one model, or of several
  models timed *interleaved* in one process (run A, run B, run A, ...) so that machine load hits
  all of them alike. Defaults: CPU execution provider, 1 thread, batch 1, ORT_ENABLE_ALL (the
  default deployment setting, including the NCHWc layout transform).
* :func:`profile_layers` — per-node latency (µs per run) from ONNX Runtime's
  own profiler (``SessionOptions.enable_profiling``; the JSON trace is parsed and deleted).
  ORT fuses nodes (Conv+activation, Conv+Add) and renames them (``<tensor>_nchwc``); each
  kernel event is mapped back to the node of *our* graph that it computes: by node name, else by
  the produced tensor's name walking back over fused element-wise ops to the Conv/Gemm/MatMul
  that heads the fusion; unmapped events (layout reorders) are summed under ``"<other>"``.
  Results are cached per model digest (sha256 of the serialized model) in memory.
  A kernel's time is the mean of its fastest :data:`PROFILE_FASTEST_SHARE` of durations over
  the profiled runs (:func:`kernel_times`): the low tail measures the kernel's own cost and
  leaves out preemptions and cache evictions by other processes, which only ever add time;
  averaging it (rather than taking one quantile) resolves kernels below the profiler's 1 µs
  resolution (4.3 µs, not 4 or 5).
  Measured on a quiet 2-core machine (``bench/bench_profile.py``, three fresh processes per
  shared model): every Conv/Gemm layer holding ≥ 0.5 % of the model's time reproduced within
  ±10 % (largest deviation 9.2 %), where the median of 20 runs left up to 15 % of
  MobileNetV2's layers outside (whole runs shifted by 8 %).
* :func:`roofline_layers` — per-node latency estimate for a target profile:
  ``max(2·MACs / throughput, bytes moved / bandwidth)`` with throughput in GOP/s at the given
  precision and bandwidth in GB/s from ``spec/targets/<name>.toml``; bytes = input activations +
  weights + output at the precision's element size. Nodes without MACs cost their bytes.
* :func:`channel_block` — the channel granularity at which a backend's kernels get cheaper:
  ONNX Runtime's NCHWc kernels work on blocks of 16 channels with AVX-512 and 8 with AVX2
  (counts are padded up to the block), TensorRT targets use the profile's ``channel_multiple``.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import defaultdict
from typing import Iterable

import numpy as np
import onnx

from hqpc.runtime import ort as ort_rt

_PROFILE_CACHE: dict[tuple, dict[str, float]] = {}
PROFILE_FASTEST_SHARE = 0.2  # a kernel's time: the mean of this share of its fastest runs
PROFILE_RUNS = 200  # profiled runs of a small model ...
PROFILE_MIN_RUNS = 20  # ... and of a large one, whose runs are fitted into PROFILE_SECONDS
PROFILE_SECONDS = 4.0
_FUSABLE = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Add", "Sum", "Mul",
            "BatchNormalization", "Identity"}
_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_PRECISION_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}


# --------------------------------------------------------------------------- end-to-end timing
def _feeds(model: onnx.ModelProto, batch: int, seed: int) -> dict[str, np.ndarray]:
    return ort_rt.random_feeds(model, seed=seed, batch=batch)


def measure(model: onnx.ModelProto, runs: int = 50, warmup: int = 5, batch: int = 1, threads: int = 1,
            optimization: str = "all", seed: int = 0) -> dict[str, float]:
    """Median / min / mean latency in ms of ``model`` on seeded random inputs."""
    return compare({"model": model}, runs=runs, warmup=warmup, batch=batch, threads=threads,
                   optimization=optimization, seed=seed)["model"]


def compare(models: dict[str, onnx.ModelProto], runs: int = 50, warmup: int = 5, batch: int = 1,
            threads: int = 1, optimization: str = "all", seed: int = 0,
            feeds: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Time several models side by side: every round runs each model once, in rotating order.

    Returns ``{name: {"median_ms", "min_ms", "mean_ms", "runs"}}``. All models get the same feeds
    (those of the first model unless ``feeds`` is given), so their inputs must agree.
    """
    names = list(models)
    sessions = {n: ort_rt.session(models[n], threads, optimization) for n in names}
    if feeds is None:
        feeds = _feeds(models[names[0]], batch, seed)
    for _ in range(warmup):
        for n in names:
            sessions[n].run(None, feeds)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            start = time.perf_counter()
            sessions[n].run(None, feeds)
            times[n].append((time.perf_counter() - start) * 1000.0)
    return {n: {"median_ms": float(np.median(t)), "min_ms": float(np.min(t)), "mean_ms": float(np.mean(t)),
                "runs": len(t)} for n, t in times.items()}


# --------------------------------------------------------------------------- profiling
def model_digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def profile_run_count(seconds_per_run: float, models: int = 1) -> int:
    """Profiled runs per model: :data:`PROFILE_RUNS`, fewer for slow models so that the runs
    of ``models`` models take about :data:`PROFILE_SECONDS`, never below
    :data:`PROFILE_MIN_RUNS`."""
    fit = int(PROFILE_SECONDS / max(seconds_per_run * models, 1e-6))
    return max(PROFILE_MIN_RUNS, min(PROFILE_RUNS, fit))


def profile_layers(model: onnx.ModelProto, runs: int | None = None, warmup: int = 5, batch: int = 1,
                   threads: int = 1, optimization: str = "all", seed: int = 0) -> dict[str, float]:
    """Per-node latency in µs per run (:func:`kernel_times` over ``runs`` profiled runs after
    ``warmup``; by default :func:`profile_run_count` of the last warm-up run's time).

    Keys are node names of ``model``; ``"<other>"`` holds kernels that map to no node
    (layout reorders inserted by ORT). Cached per (model digest, settings).
    """
    key = (model_digest(model), runs, warmup, batch, threads, optimization, seed)
    if key in _PROFILE_CACHE:
        return dict(_PROFILE_CACHE[key])
    feeds = _feeds(model, batch, seed)
    with tempfile.TemporaryDirectory(prefix="hqpc_prof_") as folder:
        sess = ort_rt.session(model, threads, optimization, profile_dir=folder)
        for _ in range(max(warmup, 1)):
            start = time.perf_counter()
            sess.run(None, feeds)
        if runs is None:
            runs = profile_run_count(time.perf_counter() - start)
        for _ in range(runs):
            sess.run(None, feeds)
        path = sess.end_profiling()
        with open(path, encoding="utf-8") as handle:
            events = json.load(handle)
    result = _events_to_layers(model, events, runs)
    _PROFILE_CACHE[key] = result
    if len(_PROFILE_CACHE) > 64:
        _PROFILE_CACHE.pop(next(iter(_PROFILE_CACHE)))
    return dict(result)


def kernel_durations(events: list[dict]) -> dict[str, list[float]]:
    """Kernel name (ORT's node name, ``_kernel_time`` stripped) → its durations in µs, in run
    order, from a parsed ORT profile trace."""
    durations: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            durations[event["name"][: -len("_kernel_time")]].append(float(event.get("dur", 0.0)))
    return durations


def fastest_mean(values: Iterable[float], share: float = PROFILE_FASTEST_SHARE) -> float:
    """Mean of the smallest ``share`` of ``values`` (at least one value)."""
    ordered = np.sort(np.asarray(list(values), dtype=np.float64))
    if ordered.size == 0:
        return 0.0
    return float(ordered[: max(1, int(round(share * ordered.size)))].mean())


def kernel_times(events: list[dict], runs: int) -> dict[str, float]:
    """Kernel name → its time in µs: :func:`fastest_mean` of its last ``runs`` durations (the
    runs after warm-up)."""
    return {name: fastest_mean(values[-runs:]) for name, values in kernel_durations(events).items()}


def _events_to_layers(model: onnx.ModelProto, events: list[dict], runs: int) -> dict[str, float]:
    graph = model.graph
    node_names = {n.name for n in graph.node}
    producer = {out: n for n in graph.node for out in n.output}
    out: dict[str, float] = defaultdict(float)
    for name, time_us in kernel_times(events, runs).items():
        out[_map_event(name, node_names, producer)] += time_us
    return dict(out)


def _map_event(name: str, node_names: set[str], producer: dict[str, onnx.NodeProto]) -> str:
    candidates = [name]
    if name.endswith("_nchwc"):
        candidates.append(name[: -len("_nchwc")])
    for cand in candidates:
        if cand in node_names:
            return cand
    for cand in candidates:
        node = producer.get(cand)
        if node is not None:
            return _fusion_head(producer, node).name
    return "<other>"


def _fusion_head(producer: dict[str, onnx.NodeProto], node: onnx.NodeProto) -> onnx.NodeProto:
    """Walk from ``node`` back over fusable element-wise ops to the Conv/Gemm/MatMul heading the
    fusion (at most 4 hops); ``node`` itself if there is none."""
    current = node
    for _ in range(4):
        if current.op_type in _MAC_OPS:
            return current
        if current.op_type not in _FUSABLE or not current.input:
            return node
        # element-wise ops fused into a conv read the conv's output as one of their inputs
        heads = [producer[i] for i in current.input if i in producer]
        macs = [h for h in heads if h.op_type in _MAC_OPS]
        if macs:
            return macs[-1] if current.op_type in ("Add", "Sum") else macs[0]
        if not heads:
            return node
        current = heads[0]
    return node


# --------------------------------------------------------------------------- static costs
def node_costs(model: onnx.ModelProto) -> dict[str, dict[str, float]]:
    """Per node: ``macs`` (multiply-accumulates per sample) and ``elements`` (input + weight +
    output element counts per sample, batch dimension taken as 1). Needs inferred shapes."""
    from hqpc.passes._rewrite import ShapeTable

    table = ShapeTable(model)
    inits = {t.name: [int(d) for d in t.dims] for t in model.graph.initializer}

    def numel(name: str) -> int:
        shape = inits.get(name) or table.shape(name)
        if shape is None:
            return 0
        dims = [d if isinstance(d, int) else 1 for d in shape]
        if name not in inits and dims:
            dims[0] = 1
        return int(np.prod(dims)) if dims else 1

    costs = {}
    for node in model.graph.node:
        macs = 0
        out = table.shape(node.output[0]) if node.output else None
        out_static = [d if isinstance(d, int) else 1 for d in out] if out else None
        if node.op_type == "Conv" and len(node.input) > 1 and out_static:
            w = inits.get(node.input[1]) or table.shape(node.input[1])
            if w and all(isinstance(d, int) for d in w):
                macs = int(np.prod(out_static[1:])) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and out_static and len(node.input) > 1:
            a = table.shape(node.input[0])
            if a and isinstance(a[-1], int):
                k = a[0] if (node.op_type == "Gemm" and _attr(node, "transA", 0)) else a[-1]
                if isinstance(k, int):
                    macs = int(np.prod(out_static[1:] if len(out_static) > 1 else out_static)) * k
        elements = sum(numel(n) for n in node.input if n) + sum(numel(n) for n in node.output if n)
        costs[node.name] = {"macs": float(macs), "elements": float(elements)}
    return costs


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def roofline_layers(model: onnx.ModelProto, target, precision: str | None = None) -> dict[str, float]:
    """Per-node latency estimate in µs: ``max(2·MACs / throughput, bytes / bandwidth)``."""
    precision = precision or default_precision(target)
    gops = float(target.throughput_gops.get(precision) or target.throughput_gops.get("fp32"))
    bandwidth = float(target.bandwidth_gbps)
    size = _PRECISION_BYTES.get(precision, 4)
    out = {}
    for name, cost in node_costs(model).items():
        compute_us = 2.0 * cost["macs"] / (gops * 1e3)
        memory_us = cost["elements"] * size / (bandwidth * 1e3)
        out[name] = max(compute_us, memory_us)
    return out


def default_precision(target) -> str:
    """The float precision a target runs pruning candidates at: fp16 where convolutions support
    it natively on a GPU backend, else fp32."""
    if getattr(target, "backend", "") != "onnxruntime" and target.supports("conv", "fp16"):
        return "fp16"
    return "fp32"


def layer_latency(model: onnx.ModelProto, target=None, **profile_options) -> tuple[dict[str, float], str]:
    """Per-node latency for ``target``: measured with ORT profiling for ONNX Runtime targets
    (``cpu``), the roofline model otherwise. Returns (latencies in µs, source name)."""
    if target is None or getattr(target, "backend", "onnxruntime") == "onnxruntime":
        return profile_layers(model, **profile_options), "ort-profile"
    return roofline_layers(model, target), "roofline"


def cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def channel_block(target=None) -> int:
    """Channel count granularity of the target's fast kernels (see the module docstring)."""
    if target is None or getattr(target, "backend", "onnxruntime") == "onnxruntime":
        return 16 if cpu_has_avx512() else 8
    return max(1, int(getattr(target, "channel_multiple", 8)))


def blocks(count: int, block: int) -> int:
    return -(-int(count) // max(1, int(block)))


def iter_mac_nodes(model: onnx.ModelProto) -> Iterable[onnx.NodeProto]:
    return (n for n in model.graph.node if n.op_type in _MAC_OPS)
