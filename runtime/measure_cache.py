"""Measurements taken once per machine and reused: the same input and seed give the same bytes.

A decision taken from a CPU timing (the precision plan, the pruning search's layer costs and
step budget, the contract's choice of the fastest fitting model) would make two compiles of the
same input differ. :func:`cached_measurement` stores the first measurement of a given
(models, inputs, settings, processor, ONNX Runtime version) as JSON and returns it afterwards.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

MEASURE_CACHE_ENV = "HQPC_MEASURE_CACHE"


def measurement_cache_dir(option: str = "auto") -> Path | None:
    """Folder of the measurement cache: the pass option ``measure_cache`` (``auto``, ``off`` or a
    folder), else ``$HQPC_MEASURE_CACHE`` (a folder, or ``off``), else
    ``$XDG_CACHE_HOME/hqpc/measurements`` (``~/.cache/hqpc/measurements``)."""
    option = str(option or "auto")
    env = os.environ.get(MEASURE_CACHE_ENV, "")
    if option.lower() == "off" or (option.lower() == "auto" and env.lower() == "off"):
        return None
    if option.lower() not in ("auto", "on"):
        return Path(option)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hqpc" / "measurements"


def machine_signature() -> dict:
    """What a CPU latency measurement depends on besides the models: processor, ORT version."""
    import onnxruntime as ort

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "machine": platform.machine(), "onnxruntime": ort.__version__, "threads": 1}


def cached_measurement(folder: Path | None, kind: str, protos: list, feeds: dict, settings: dict, compute,
                       record: dict | None = None):
    """``compute()`` (a timing), or the result of the same timing taken earlier on this machine.

    Timings on a CPU vary from run to run, and a plan chosen from them would make the compiled
    model differ between two compiles of the same input. The first measurement of a given
    (models, inputs, settings, processor, ONNX Runtime version) is stored as JSON in ``folder``
    and reused afterwards, so the same input and seed give the same bytes on the same machine;
    the annotation names the measurement (key and UTC time it was taken). Delete the folder, set
    ``HQPC_MEASURE_CACHE=off`` or ``assign-precision{measure_cache=off}`` to measure afresh."""
    h = hashlib.sha256()
    h.update(kind.encode())
    for proto in protos:
        h.update(hashlib.sha256(proto.SerializeToString(deterministic=True)).digest())
    for name in sorted(feeds):
        value = np.ascontiguousarray(feeds[name])
        h.update(name.encode() + str(value.dtype).encode() + str(value.shape).encode() + value.tobytes())
    h.update(json.dumps({"settings": settings, "machine": machine_signature()}, sort_keys=True).encode())
    key = h.hexdigest()[:24]
    path = folder / f"{kind}-{key}.json" if folder is not None else None
    if path is not None and path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if record is not None:
                record[kind] = {"key": key, "measured_at": stored["measured_at"], "reused": True}
            return stored["value"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable entry: measure again and overwrite it
    value = compute()
    measured_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if record is not None:
        record[kind] = {"key": key, "measured_at": measured_at, "reused": False}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"kind": kind, "measured_at": measured_at, "machine": machine_signature(),
                                       "settings": settings, "value": value}), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache folder only costs reproducibility, not correctness
        # the stored form (JSON: tuples become lists) is what a reused run sees; return the same
        return json.loads(json.dumps(value))
    return value


def cached_compare(folder: Path | None, kind: str, models: dict, runs: int) -> dict[str, float]:
    """Median end-to-end latency in ms of each model (ONNX Runtime CPU, 1 thread, batch 1,
    interleaved runs), measured side by side once per machine and reused (:func:`cached_measurement`)."""
    from hqpc.runtime import latency as lat

    names = sorted(models)
    return cached_measurement(folder, f"{kind}-{'-'.join(names)}", [models[n] for n in names], {}, {"runs": runs},
                              lambda: {n: t["median_ms"] for n, t in lat.compare(models, runs=runs).items()})
