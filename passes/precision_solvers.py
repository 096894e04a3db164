"""Solvers for the precision plan (a multiple-choice knapsack with boundary costs).

Problem: every unit (a Conv/Gemm/MatMul with its weight and input activation) takes one
precision ``p`` from its allowed set; choosing it costs ``loss[u][p]`` (predicted loss
increase), ``latency[u][p]`` (ms) and ``size[u][p]`` (bytes). An edge ``(u, v, c)`` adds ``c``
ms when exactly one of ``u``, ``v`` runs quantized (int8/int4): the Q or DQ (and layout change)
at the boundary between an integer and a float region. ``v = -1`` or ``u = -1`` stands for a
graph input/output, which is float.

    minimise  Σ loss[u][p_u]
    s.t.      Σ latency[u][p_u] + Σ_edges c·[q_u ≠ q_v] ≤ latency_budget
              Σ size[u][p_u] + fixed_size ≤ size_budget

Two solvers:

* :func:`solve_milp` — exact: scipy.optimize.milp (HiGHS) on binary choice variables plus one
  continuous variable per edge (linearised |q_u − q_v|).
* :func:`solve_sigmaquant` — fast, SigmaQuant-style: cluster the units by their weights' σ and
  the KL divergence between the weight distribution and its quantized version (k-means on the
  standardised features), give the least sensitive clusters the cheapest precision the budgets
  need, then repair and refine greedily by the ratio of loss change to cost change.

Both return a :class:`Solution`; when the budgets cannot be met they return the cheapest plan
they found with ``feasible=False``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

QUANTIZED = ("int8", "int4")
ORDER = ("int4", "int8", "fp16", "fp32")  # cheapest (size) first


@dataclass
class Problem:
    units: list[str]
    options: list[list[str]]
    loss: list[dict[str, float]]
    latency: list[dict[str, float]]
    size: list[dict[str, float]]
    edges: list[tuple[int, int, float]] = field(default_factory=list)
    latency_budget: float | None = None
    size_budget: float | None = None
    fixed_size: float = 0.0
    fixed_latency: float = 0.0
    features: np.ndarray | None = None  # (units, 2): weight σ, KL of the quantized distribution

    def evaluate(self, plan: dict[str, str]) -> dict[str, float]:
        idx = {u: i for i, u in enumerate(self.units)}
        q = {i: plan[u] in QUANTIZED for u, i in idx.items()}
        loss = sum(self.loss[i][plan[u]] for u, i in idx.items())
        lat = self.fixed_latency + sum(self.latency[i][plan[u]] for u, i in idx.items())
        lat += sum(c for a, b, c in self.edges if q.get(a, False) != q.get(b, False))
        size = self.fixed_size + sum(self.size[i][plan[u]] for u, i in idx.items())
        return {"loss": float(loss), "latency_ms": float(lat), "size_bytes": float(size)}

    def feasible(self, plan: dict[str, str], slack: float = 1e-9) -> bool:
        ev = self.evaluate(plan)
        if self.latency_budget is not None and ev["latency_ms"] > self.latency_budget * (1 + slack) + 1e-12:
            return False
        if self.size_budget is not None and ev["size_bytes"] > self.size_budget * (1 + slack) + 1e-9:
            return False
        return True


@dataclass
class Solution:
    solver: str
    plan: dict[str, str]
    feasible: bool
    wall_s: float
    objective: dict[str, float]
    note: str = ""

    def as_dict(self) -> dict:
        return {"solver": self.solver, "feasible": self.feasible, "wall_s": round(self.wall_s, 4),
                **{k: round(v, 6) for k, v in self.objective.items()}, "note": self.note}


# --------------------------------------------------------------------------- exact
def solve_milp(problem: Problem, time_limit: float = 30.0, objective: str = "loss") -> Solution:
    """``objective="latency"`` minimises the latency (boundaries included) instead of the loss."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    start = time.perf_counter()
    var: list[tuple[int, str]] = [(i, p) for i, opts in enumerate(problem.options) for p in opts]
    nx, ne = len(var), len(problem.edges)
    n = nx + ne
    loss_scale = max(1e-12, max((abs(problem.loss[i][p]) for i, p in var), default=1.0))
    lat_scale = max(1e-12, max((problem.latency[i][p] for i, p in var), default=1.0))
    c = np.zeros(n)
    w_lat = 1.0 if objective == "latency" else 1e-6
    w_loss = 1e-6 if objective == "latency" else 1.0
    for k, (i, p) in enumerate(var):
        # the secondary terms only break ties (orders of magnitude below any primary gap)
        c[k] = w_loss * problem.loss[i][p] / loss_scale + w_lat * problem.latency[i][p] / lat_scale \
            + 1e-9 * problem.size[i][p] / max(1.0, max(problem.size[i].values()))
    for e, (_, _, cost) in enumerate(problem.edges):
        c[nx + e] = w_lat * cost / lat_scale
    rows, lo, hi = [], [], []
    for i in range(len(problem.units)):  # one precision per unit
        row = np.zeros(n)
        row[[k for k, (j, _) in enumerate(var) if j == i]] = 1
        rows.append(row), lo.append(1), hi.append(1)
    qcols = {i: [k for k, (j, p) in enumerate(var) if j == i and p in QUANTIZED] for i in range(len(problem.units))}
    for e, (a, b, _) in enumerate(problem.edges):  # d_e >= |q_a - q_b|
        for sign in (1, -1):
            row = np.zeros(n)
            row[nx + e] = 1
            for k in qcols.get(a, []):
                row[k] -= sign
            for k in qcols.get(b, []):
                row[k] += sign
            rows.append(row), lo.append(0), hi.append(np.inf)
    if problem.latency_budget is not None:
        row = np.zeros(n)
        for k, (i, p) in enumerate(var):
            row[k] = problem.latency[i][p]
        for e, (_, _, cost) in enumerate(problem.edges):
            row[nx + e] = cost
        rows.append(row), lo.append(-np.inf), hi.append(problem.latency_budget - problem.fixed_latency)
    if problem.size_budget is not None:
        row = np.zeros(n)
        for k, (i, p) in enumerate(var):
            row[k] = problem.size[i][p]
        rows.append(row), lo.append(-np.inf), hi.append(problem.size_budget - problem.fixed_size)
    integrality = np.concatenate([np.ones(nx), np.zeros(ne)])
    result = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=integrality,
                  bounds=Bounds(np.zeros(n), np.ones(n)), options={"time_limit": time_limit})
    wall = time.perf_counter() - start
    if result.x is None:
        plan = cheapest_plan(problem)
        return Solution("milp", plan, False, time.perf_counter() - start, problem.evaluate(plan),
                        note=f"infeasible budgets ({result.message}); cheapest plan returned")
    plan = {}
    for i, u in enumerate(problem.units):
        best = max(((result.x[k], p) for k, (j, p) in enumerate(var) if j == i))
        plan[u] = best[1]
    return Solution("milp", plan, problem.feasible(plan, 1e-6), wall, problem.evaluate(plan),
                    note="optimal" if result.status == 0 else str(result.message))


def cheapest_plan(problem: Problem) -> dict[str, str]:
    """Smallest plan (size first, then latency): what is returned when nothing fits."""
    return {u: min(opts, key=lambda p: (problem.size[i][p], problem.latency[i][p]))
            for i, (u, opts) in enumerate(zip(problem.units, problem.options))}


# --------------------------------------------------------------------------- SigmaQuant-style
def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Labels of a small k-means (k-means++ init, seeded)."""
    rng = np.random.default_rng(seed)
    k = max(1, min(k, len(x)))
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min([np.sum((x - c) ** 2, axis=1) for c in centers], axis=0)
        probs = d / d.sum() if d.sum() > 0 else np.full(len(x), 1 / len(x))
        centers.append(x[rng.choice(len(x), p=probs)])
    centers = np.array(centers)
    labels = np.zeros(len(x), dtype=int)
    for _ in range(iters):
        labels = np.argmin(((x[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
        new = np.array([x[labels == j].mean(0) if np.any(labels == j) else centers[j] for j in range(k)])
        if np.allclose(new, centers):
            break
        centers = new
    return labels


def solve_sigmaquant(problem: Problem, seed: int = 0, clusters: int = 4) -> Solution:
    start = time.perf_counter()
    units = problem.units
    n = len(units)
    default = {u: ("int8" if "int8" in problem.options[i] else problem.options[i][-1]) for i, u in enumerate(units)}
    plan = dict(default)
    feats = problem.features if problem.features is not None else np.zeros((n, 2))
    z = (feats - feats.mean(0)) / np.where(feats.std(0) > 0, feats.std(0), 1.0)
    labels = kmeans(z, clusters, seed=seed) if n > 1 else np.zeros(n, dtype=int)
    # cluster sensitivity: mean standardised (σ, KL) — high spread and high KL quantize worse
    order = sorted(set(labels.tolist()), key=lambda j: float(z[labels == j].sum(1).mean()))
    # 1. coarse: move whole clusters (least sensitive first) to the cheapest precision while the
    #    size budget is violated
    if problem.size_budget is not None:
        for j in order:
            ev = problem.evaluate(plan)
            if ev["size_bytes"] <= problem.size_budget:
                break
            for i in np.flatnonzero(labels == j):
                u = units[i]
                cheap = min(problem.options[i], key=lambda p: problem.size[i][p])
                plan[u] = cheap
    # 2. repair: greedy demotions by Δloss / Δcost until both budgets hold
    plan = _repair(problem, plan)
    # 3. refine: greedy promotions/swaps that lower the loss and keep the budgets
    plan = _refine(problem, plan)
    wall = time.perf_counter() - start
    return Solution("sigmaquant", plan, problem.feasible(plan, 1e-6), wall, problem.evaluate(plan),
                    note=f"{len(set(labels.tolist()))} clusters")


def _violation(problem: Problem, ev: dict) -> float:
    v = 0.0
    if problem.latency_budget is not None:
        v += max(0.0, ev["latency_ms"] - problem.latency_budget) / max(problem.latency_budget, 1e-12)
    if problem.size_budget is not None:
        v += max(0.0, ev["size_bytes"] - problem.size_budget) / max(problem.size_budget, 1e-12)
    return v


def _single_moves(problem: Problem, plan: dict[str, str]):
    """Every plan one precision change away from ``plan``: ``(unit, precision, plan', evaluation)``."""
    for i, u in enumerate(problem.units):
        for p in problem.options[i]:
            if p != plan[u]:
                trial = {**plan, u: p}
                yield u, p, trial, problem.evaluate(trial)


def _repair(problem: Problem, plan: dict[str, str]) -> dict[str, str]:
    plan = dict(plan)
    for _ in range(4 * len(problem.units) * 4):
        ev = problem.evaluate(plan)
        viol = _violation(problem, ev)
        if viol <= 0:
            return plan
        best = None
        for u, p, trial, tev in _single_moves(problem, plan):
            gain = viol - _violation(problem, tev)
            if gain <= 1e-15:
                continue
            score = (tev["loss"] - ev["loss"]) / gain
            if best is None or score < best[0]:
                best = (score, u, p)
        if best is None:
            return plan
        plan[best[1]] = best[2]
    return plan


def _refine(problem: Problem, plan: dict[str, str]) -> dict[str, str]:
    plan = dict(plan)
    for _ in range(4 * len(problem.units)):
        ev = problem.evaluate(plan)
        best = None
        for u, p, trial, tev in _single_moves(problem, plan):
            dloss = ev["loss"] - tev["loss"]
            if dloss <= 1e-15 or not problem.feasible(trial):
                continue
            cost = max(tev["latency_ms"] - ev["latency_ms"], 0) / max(problem.latency_budget or 1, 1e-12) + \
                max(tev["size_bytes"] - ev["size_bytes"], 0) / max(problem.size_budget or 1, 1e-12)
            score = dloss / (cost + 1e-9)
            if best is None or score > best[0]:
                best = (score, u, p)
        if best is None:
            return plan
        plan[best[1]] = best[2]
    return plan


# --------------------------------------------------------------------------- features
def weight_features(w: np.ndarray, quantize) -> tuple[float, float]:
    """(σ, KL(P_w || P_q)) for SigmaQuant clustering; ``quantize(w)`` gives the quantized
    weights. Histograms over 128 bins of the float range."""
    w = np.asarray(w, np.float64).ravel()
    sigma = float(w.std())
    if w.size < 2 or w.max() == w.min():
        return sigma, 0.0
    wq = np.asarray(quantize(), np.float64).ravel()
    bins = np.linspace(w.min(), w.max(), 129)
    p, _ = np.histogram(w, bins=bins)
    q, _ = np.histogram(np.clip(wq, w.min(), w.max()), bins=bins)
    p = p / p.sum() + 1e-10
    q = q / q.sum() + 1e-10
    return sigma, float(np.sum(p * np.log(p / q)))
