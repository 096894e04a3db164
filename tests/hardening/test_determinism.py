"""Determinism: the same model, data and seed give a byte-identical output model and the same
report (timing fields aside) -- across two independent processes (different hash seeds) and
across -q / default / -v.

Runs whatever passes the registry has (passes missing from this build are skipped by the
compiler): the shipped digits example with its data spec at -O2 and -O3, and the corpus's
small model at -O3 for orin.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from hqpc.cli import main
from tests.conftest import REPO

DIGITS = REPO / "examples" / "digits"
OK_MODEL = REPO / "tests" / "bad_inputs" / "ok.onnx"
TIMING_KEY = re.compile(r"(^|_)(wall|time|times|timing|latency|elapsed|seconds)($|_)|_(s|ms|us|sec)$")


def strip_timings(value):
    """The report without timing fields (wall_s, *_ms, latency, ...), recursively."""
    if isinstance(value, dict):
        return {k: strip_timings(v) for k, v in value.items() if not TIMING_KEY.search(k)}
    if isinstance(value, list):
        return [strip_timings(v) for v in value]
    return value


def differences(a, b, path="report", limit=6) -> list[str]:
    """Up to ``limit`` paths where two JSON values differ, with both values."""
    found: list[str] = []

    def walk(x, y, where):
        if len(found) >= limit:
            return
        if type(x) is not type(y):
            found.append(f"{where}: {x!r:.120} != {y!r:.120}")
        elif isinstance(x, dict):
            for key in sorted(set(x) | set(y)):
                if key not in x or key not in y:
                    found.append(f"{where}.{key}: only in one report")
                else:
                    walk(x[key], y[key], f"{where}.{key}")
        elif isinstance(x, list) and len(x) != len(y):
            found.append(f"{where}: lengths {len(x)} != {len(y)}")
        elif isinstance(x, list):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        elif x != y:
            found.append(f"{where}: {x!r:.120} != {y!r:.120}")

    walk(a, b, path)
    return found


def without_timing_annotations(data: bytes) -> bytes:
    """The model with timing fields removed from its hqpc.* annotations (metadata_props)."""
    model = onnx.load_model_from_string(data)
    for entry in model.metadata_props:
        if entry.key.startswith("hqpc."):
            try:
                entry.value = json.dumps(strip_timings(json.loads(entry.value)), sort_keys=True)
            except ValueError:
                pass
    return model.SerializeToString(deterministic=True)


def assert_same_model(a: bytes, b: bytes, what: str) -> None:
    """Byte-identical; otherwise fail naming where they differ (timing fields stored in the model's
    annotations count: they would make the bytes differ)."""
    if a == b:
        return
    differing = model_differences(a, b)
    same_but_timings = without_timing_annotations(a) == without_timing_annotations(b)
    pytest.fail(f"{what}: output bytes differ{' only in timing fields of the annotations' if same_but_timings else ''}: "
                f"{differing}")


def model_differences(a: bytes, b: bytes) -> list[str]:
    """Where two serialized models differ: initializers, nodes, metadata keys (annotations)."""
    ma, mb = onnx.load_model_from_string(a), onnx.load_model_from_string(b)
    out = [f"initializer {x.name}" for x, y in zip(ma.graph.initializer, mb.graph.initializer) if x != y]
    out += [f"node {x.name}" for x, y in zip(ma.graph.node, mb.graph.node) if x != y]
    meta_a = {p.key: p.value for p in ma.metadata_props}
    meta_b = {p.key: p.value for p in mb.metadata_props}
    for key in sorted(set(meta_a) | set(meta_b)):
        if meta_a.get(key) != meta_b.get(key):
            try:
                out += differences(json.loads(meta_a.get(key, "null")), json.loads(meta_b.get(key, "null")), key, 3)
            except ValueError:
                out.append(f"metadata {key}")
    return out or ["(graph-level fields)"]


DIGITS_O2 = [str(DIGITS / "digits_cnn.onnx"), "-O2", "--data", str(DIGITS / "digits.toml"), "--seed", "7"]
CASES = {
    # -O2 without the latency-measuring precision planner: must be byte-identical
    "digits-O2-data-no-assign-precision": DIGITS_O2 + ["--disable-pass", "assign-precision"],
    # the precision planner's latency measurements are taken once per machine and reused
    "digits-O2-data": DIGITS_O2,
    # orin: the pruning search and the precision planner use the target's cost model, nothing measured
    "ok-O3-orin": [str(OK_MODEL), "-O3", "--target", "orin", "--seed", "3"],
    # -O3 on cpu with data: the pruning search's layer profiles, timings and step budget are taken
    # once per machine and reused (hqpc/runtime/measure_cache.py); about 15 s per run
    "digits-O3-data": [str(DIGITS / "digits_cnn.onnx"), "-O3", "--data", str(DIGITS / "digits.toml"), "--seed", "7"],
}


def _cases():
    for name, value in CASES.items():
        if isinstance(value, list):
            yield pytest.param(value, id=name)
        else:
            yield pytest.param(*value.values, marks=value.marks, id=name)


def compile_once(argv: list[str], folder: Path, extra=(), process: int | None = None) -> tuple[bytes, dict]:
    """Compile into ``folder/out.onnx`` (same output path for every run, so the report's paths
    agree); in a fresh process with PYTHONHASHSEED=``process`` when given."""
    folder.mkdir(parents=True, exist_ok=True)
    out, report = folder / "out.onnx", folder / "report.json"
    for stale in (out, report):
        stale.unlink(missing_ok=True)
    args = [*argv, "-o", str(out), "--report", str(report), *extra]
    if process is None:
        code = main(args)
    else:
        env = {**os.environ, "PYTHONHASHSEED": str(process)}
        proc = subprocess.run([sys.executable, "-m", "hqpc", *args], env=env, capture_output=True, text=True,
                              timeout=600)
        code = proc.returncode
        assert code == 0, proc.stderr
    assert code == 0
    return out.read_bytes(), strip_timings(json.loads(report.read_text()))


@pytest.mark.parametrize("argv", list(_cases()))
def test_two_processes_give_identical_results(argv, tmp_path):
    bytes_a, report_a = compile_once(argv, tmp_path / "run", process=1)
    bytes_b, report_b = compile_once(argv, tmp_path / "run", process=2)
    assert report_a == report_b, differences(report_a, report_b)
    assert_same_model(bytes_a, bytes_b, "two runs")


@pytest.mark.parametrize("argv", list(_cases()))
def test_verbosity_does_not_change_the_result(argv, tmp_path, capsys):
    results = {}
    for flag in ("-q", None, "-v"):
        results[flag] = compile_once(argv, tmp_path / "run", extra=(flag,) if flag else ())
        capsys.readouterr()
    (bytes_q, report_q), (bytes_n, report_n), (bytes_v, report_v) = results.values()
    assert report_q == report_n == report_v, differences(report_q, report_n) + differences(report_q, report_v)
    assert_same_model(bytes_q, bytes_n, "-q vs default")
    assert_same_model(bytes_q, bytes_v, "-q vs -v")


def test_a_different_seed_is_reported(tmp_path, capsys):
    """The seed is part of the result: it is recorded, so a run is reproducible from its report."""
    _, report = compile_once([str(OK_MODEL), "-O1", "--seed", "11"], tmp_path / "run", extra=("-q",))
    assert report["seed"] == 11
