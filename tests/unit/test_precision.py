"""assign-precision: the two solvers, budgets, score sources and the annotation contract."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from hqpc.golden import build_model_from_text
from hqpc.ir import Model
from hqpc.passes import precision_solvers as S
from hqpc.passes.calibrate import Calibrate
from hqpc.passes.precision import AssignPrecision, allowed_precisions, size_budget_bytes
from hqpc.passmanager import PassContext
from hqpc.target import load_target

MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 8, 16, 16] x) => (float[1, 10] out)
<float[32, 8, 3, 3] w1, float[32] b1, float[64, 32, 3, 3] w2, float[64] b2, float[64, 10] wf, float[10] bf>
{
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (r1, w2, b2)
    r2 = Relu (c2)
    g1 = GlobalAveragePool (r2)
    f = Flatten (g1)
    out = Gemm (f, wf, bf)
}"""


def random_problem(n: int, seed: int, edges: bool = True) -> S.Problem:
    rng = np.random.default_rng(seed)
    opts, loss, lat, size = [], [], [], []
    for _ in range(n):
        params = float(rng.integers(1_000, 100_000))
        l8 = float(rng.exponential(1.0))
        opts.append(["int4", "int8", "fp32"])
        loss.append({"int4": l8 * rng.uniform(5, 30), "int8": l8, "fp32": 0.0})
        t8 = float(rng.uniform(0.05, 0.5))
        lat.append({"int4": t8, "int8": t8, "fp32": t8 * rng.uniform(0.7, 3.0)})
        size.append({"int4": params / 2, "int8": params, "fp32": params * 4})
    e = [(i, i + 1, float(rng.uniform(0.0, 0.05))) for i in range(n - 1)] + [(-1, 0, 0.02)] if edges else []
    int8_size = sum(s["int8"] for s in size)
    int8_lat = sum(t["int8"] for t in lat)
    return S.Problem(units=[f"u{i}" for i in range(n)], options=opts, loss=loss, latency=lat, size=size, edges=e,
                     latency_budget=int8_lat * 1.2, size_budget=0.7 * int8_size,
                     features=np.stack([rng.normal(size=n), rng.exponential(size=n)], axis=1))


def brute_force(problem: S.Problem) -> float:
    best = np.inf
    for combo in itertools.product(*problem.options):
        plan = dict(zip(problem.units, combo))
        if problem.feasible(plan):
            best = min(best, problem.evaluate(plan)["loss"])
    return best


@pytest.mark.parametrize("seed", range(4))
def test_milp_is_optimal_on_small_problems(seed):
    problem = random_problem(7, seed)
    sol = S.solve_milp(problem)
    assert sol.feasible
    assert sol.objective["loss"] == pytest.approx(brute_force(problem), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_sigmaquant_is_feasible_and_close_to_optimal(seed):
    problem = random_problem(40, seed)
    exact, fast = S.solve_milp(problem), S.solve_sigmaquant(problem, seed=seed)
    assert exact.feasible and fast.feasible
    assert exact.objective["loss"] <= fast.objective["loss"] + 1e-9
    assert fast.objective["loss"] <= 3.0 * exact.objective["loss"] + 1e-6


def test_infeasible_budget_returns_cheapest_plan_flagged():
    problem = random_problem(5, 0)
    problem.size_budget = 1.0
    for sol in (S.solve_milp(problem), S.solve_sigmaquant(problem)):
        assert not sol.feasible
        assert all(p == "int4" for p in sol.plan.values()) or sol.solver == "sigmaquant"


def test_boundary_costs_make_regions_contiguous():
    # three units; the middle one is a bit faster in fp32, but leaving int8 costs two boundaries
    problem = S.Problem(units=["a", "b", "c"], options=[["int8", "fp32"]] * 3,
                        loss=[{"int8": 0.0, "fp32": 0.0}] * 3,
                        latency=[{"int8": 1.0, "fp32": 2.0}, {"int8": 1.0, "fp32": 0.9}, {"int8": 1.0, "fp32": 2.0}],
                        size=[{"int8": 1.0, "fp32": 4.0}] * 3, edges=[(0, 1, 0.5), (1, 2, 0.5)])
    assert S.solve_milp(problem, objective="latency").plan == {"a": "int8", "b": "int8", "c": "int8"}


def test_size_budget_contract():
    assert size_budget_bytes(None, 1000) is None
    assert size_budget_bytes(0.6, 1000) == pytest.approx(600)
    assert size_budget_bytes(1500, 1000) == 1500
    assert size_budget_bytes("60%int8", 1000) == pytest.approx(600)
    with pytest.raises(ValueError):
        size_budget_bytes(-1, 1000)


def test_allowed_precisions_follow_the_target():
    cpu, orin = load_target("cpu"), load_target("orin")
    assert allowed_precisions(cpu, "Conv") == ["int4", "int8", "fp32"]
    assert allowed_precisions(orin, "Conv") == ["int8", "fp16", "fp32"]
    assert allowed_precisions(orin, "MatMul") == ["int4", "int8", "fp16", "fp32"]


@pytest.fixture(autouse=True)
def _private_measurement_cache(tmp_path, monkeypatch):
    """Every test gets its own measurement cache (never the user's ~/.cache)."""
    from hqpc.runtime.measure_cache import MEASURE_CACHE_ENV

    monkeypatch.setenv(MEASURE_CACHE_ENV, str(tmp_path / "measurements"))


def _run(target: str, size_budget=None, **options):
    model = Model.load(build_model_from_text(MODEL, seed_base="prec"))
    ctx = PassContext(opt_level=2, target=load_target(target), config={"max_drop": 1.0, "size_budget": size_budget})
    Calibrate(method="minmax").run(model, ctx)
    AssignPrecision(scores="measured", **options).run(model, ctx)
    return model.annotations["precision"]


def test_plan_contract_and_size_budget_forces_int4_where_least_sensitive():
    ann = _run("orin")
    assert set(ann["plan"].values()) <= {"int8", "fp16", "fp32"} and len(ann["plan"]) == 3
    assert ann["score_source"].startswith("measured proxy")
    assert ann["latency_source"].startswith("cost model")
    for key in ("tensors", "reasons", "solver", "budgets", "predicted", "solvers", "scores", "latency"):
        assert key in ann
    assert set(ann["solvers"]) == {"milp", "sigmaquant"}
    assert all(p != "int8" for p in (ann["plan"][n] for n in ann["reasons"]))
    cpu = _run("cpu", size_budget=0.6, verify_latency=False, check_accuracy=False)
    assert cpu["latency_source"].startswith("measured: ORT profiler")
    assert "int4" in cpu["plan"].values()
    assert cpu["predicted"]["size_bytes"] <= cpu["budgets"]["size_bytes"] + 1e-6
    assert all("int4 weights for the size budget" in r for n, r in cpu["reasons"].items() if cpu["plan"][n] == "int4")


def test_fisher_annotation_is_used_when_present(monkeypatch):
    from hqpc import registry

    model = Model.load(build_model_from_text(MODEL, seed_base="prec"))
    ctx = PassContext(opt_level=2, target=load_target("orin"), config={"max_drop": 1.0})
    Calibrate(method="minmax").run(model, ctx)
    graph = model.proto.graph
    convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    # make the first conv hugely sensitive at int8: the plan must keep it in fp16/fp32
    sens = {n.input[1]: {"int8": (100.0 if i == 0 else 1e-6), "int4": 1.0, "fp16": 1e-7} for i, n in enumerate(convs)}
    model.annotations["sensitivity"] = {"tensors": sens}
    monkeypatch.setattr(registry, "passes", lambda: {"annotate-sensitivity": object})
    AssignPrecision(latency_slack=1.0).run(model, ctx)  # room to trade latency for accuracy
    ann = model.annotations["precision"]
    assert ann["score_source"].startswith("annotate-sensitivity")
    assert ann["plan"][convs[0].name] in ("fp16", "fp32")


def test_cached_measurement_is_taken_once_per_key(tmp_path):
    from hqpc.runtime.measure_cache import cached_measurement

    proto = build_model_from_text(MODEL, seed_base="prec")
    feeds = {"x": np.zeros((1, 4), np.float32)}
    calls = []

    def timing():
        calls.append(1)
        return {"model": {"min_ms": 0.1 * len(calls)}}

    record_a, record_b, record_c = {}, {}, {}
    a = cached_measurement(tmp_path, "end_to_end", [proto], feeds, {"runs": 3}, timing, record_a)
    b = cached_measurement(tmp_path, "end_to_end", [proto], feeds, {"runs": 3}, timing, record_b)
    assert a == b == {"model": {"min_ms": 0.1}} and len(calls) == 1
    assert record_a["end_to_end"]["key"] == record_b["end_to_end"]["key"]
    assert record_a["end_to_end"]["measured_at"] == record_b["end_to_end"]["measured_at"]
    assert (record_a["end_to_end"]["reused"], record_b["end_to_end"]["reused"]) == (False, True)
    # other inputs or settings: a new measurement; no folder: always measured
    cached_measurement(tmp_path, "end_to_end", [proto], {"x": np.ones((1, 4), np.float32)}, {"runs": 3}, timing, record_c)
    cached_measurement(tmp_path, "end_to_end", [proto], feeds, {"runs": 4}, timing, record_c)
    cached_measurement(None, "end_to_end", [proto], feeds, {"runs": 3}, timing, record_c)
    assert len(calls) == 4


def test_cpu_plan_annotation_is_reproducible_with_the_measurement_cache():
    """cpu: the measured latency decides the plan; with the cache two compiles of the same input
    store identical annotations (the bytes of the output model), and the annotation names the
    measurement used. Without it (measure_cache=off) each run measures afresh."""
    import json

    first = _run("cpu", verify_latency=False, check_accuracy=False)
    second = _run("cpu", verify_latency=False, check_accuracy=False)
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert set(first["measurements"]) == {"latency_profile"}
    assert all("wall_s" not in v for v in first["solvers"].values())
    fresh = _run("cpu", verify_latency=False, check_accuracy=False, measure_cache="off")
    assert fresh["measurements"]["latency_profile"]["key"] == first["measurements"]["latency_profile"]["key"]
    assert fresh["plan"].keys() == first["plan"].keys()


def test_predicted_describes_the_emitted_plan_after_the_end_to_end_fallback(monkeypatch):
    """cpu: when the end-to-end timing rejects the solver's mixed plan, the emitted plan is
    all-INT8 and ``predicted`` (loss, latency, size) must describe that plan, not the rejected one."""
    from hqpc import registry
    from hqpc.runtime import latency as latency_rt

    model = Model.load(build_model_from_text(MODEL, seed_base="prec"))
    ctx = PassContext(opt_level=2, target=load_target("cpu"), config={"max_drop": 1.0})
    Calibrate(method="minmax").run(model, ctx)
    convs = [n for n in model.proto.graph.node if n.op_type in ("Conv", "Gemm")]
    # the first conv hugely sensitive at int8: the solver keeps it float
    sens = {n.input[1]: {"int8": (100.0 if i == 0 else 1e-6)} for i, n in enumerate(convs)}
    model.annotations["sensitivity"] = {"tensors": sens}
    monkeypatch.setattr(registry, "passes", lambda: {"annotate-sensitivity": object})
    # ... and the end-to-end timing finds the mixed plan far slower than all-INT8
    monkeypatch.setattr(latency_rt, "compare", lambda models, **kw: {"plan": {"min_ms": 10.0}, "all_int8": {"min_ms": 1.0}})
    AssignPrecision(latency_slack=1.0, measure_cache="off").run(model, ctx)
    ann = model.annotations["precision"]
    assert ann["end_to_end"]["decision"].startswith("all-INT8")
    assert set(ann["plan"].values()) == {"int8"}
    int8_loss = sum(ann["scores"][n]["int8"] for n in ann["plan"])
    assert ann["predicted"]["loss"] == pytest.approx(int8_loss, rel=1e-4, abs=1e-6)
    assert ann["predicted"]["size_bytes"] == pytest.approx(ann["int8_size_bytes"])
    assert ann["predicted"]["latency_ms"] == pytest.approx(ann["int8_latency_ms"], rel=1e-4)


def test_precision_with_non_finite_predicted_loss_is_not_offered(monkeypatch):
    """An fp16 loss of inf (values beyond the fp16 range) removes fp16 from that layer's options
    instead of handing the solver a non-finite objective."""
    from hqpc import registry

    model = Model.load(build_model_from_text(MODEL, seed_base="prec"))
    logged: list[str] = []
    ctx = PassContext(opt_level=2, target=load_target("orin"), config={"max_drop": 1.0}, log=logged.append)
    Calibrate(method="minmax").run(model, ctx)
    convs = [n for n in model.proto.graph.node if n.op_type in ("Conv", "Gemm")]
    sens = {n.input[1]: {"int8": (100.0 if i == 0 else 1e-6), "int4": 1.0, "fp16": (float("inf") if i == 0 else 1e-7)}
            for i, n in enumerate(convs)}
    model.annotations["sensitivity"] = {"tensors": sens}
    monkeypatch.setattr(registry, "passes", lambda: {"annotate-sensitivity": object})
    AssignPrecision(latency_slack=1.0).run(model, ctx)
    plan = model.annotations["precision"]["plan"]
    assert plan[convs[0].name] == "fp32"  # int8 far too lossy, fp16 not representable
    assert any(f"{convs[0].name}: fp16 not offered" in m for m in logged)
