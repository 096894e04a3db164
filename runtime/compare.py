"""Output comparison with declared tolerances (Polygraphy semantics).

An element fails only when it exceeds *both* bounds:
``|got - ref| > atol`` and ``|got - ref| > rtol * |ref|``.
For a failing comparison we also report the smallest tolerance that would have passed:
``min_atol`` — the smallest atol that passes with the declared rtol — and ``min_rtol`` — the
smallest rtol that passes with the declared atol. NaNs match only NaNs in the same place.
With ``atol_per_scale`` the atol is relative to the output's scale: ``atol * max(1, max|ref|)``
over the output's finite reference values (for rewrites that only reorder float32 sums: an
element that is a cancellation of large terms moves by ulps of the terms, not of itself).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    atol_per_scale: bool = False  # atol x max(1, max |ref|) of each output (module docstring)

    def as_dict(self) -> dict:
        out = asdict(self)
        if not self.atol_per_scale:
            out.pop("atol_per_scale")
        return out

    def atol_for(self, ref: np.ndarray) -> float:
        """The absolute bound for one output with finite reference values ``ref``."""
        if not self.atol_per_scale:
            return self.atol
        return self.atol * max(1.0, float(np.abs(ref).max(initial=0.0)))


# Exact (semantics-preserving) passes: fp32 re-association (e.g. folding a BatchNormalization
# scale into a convolution's weights) changes results by a few ulps per layer; through ~50
# layers that stays far below these bounds, while any real change of meaning exceeds them.
EXACT = Tolerance(atol=1e-5, rtol=1e-4)


@dataclass(frozen=True)
class OutputComparison:
    name: str
    ok: bool
    max_abs: float
    max_rel: float
    min_atol: float
    min_rtol: float
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    ok: bool
    tolerance: Tolerance
    outputs: tuple[OutputComparison, ...]

    def as_dict(self) -> dict:
        return {"ok": self.ok, "tolerance": self.tolerance.as_dict(),
                "outputs": [o.as_dict() for o in self.outputs]}

    def summary(self) -> str:
        """One line: the worst output and what would have passed."""
        worst = max(self.outputs, key=lambda o: (not o.ok, o.max_abs), default=None)
        if worst is None:
            return "no outputs compared"
        if worst.reason:
            return f"output '{worst.name}': {worst.reason}"
        return (f"output '{worst.name}': max abs err {worst.max_abs:.3g}, max rel err {worst.max_rel:.3g} "
                f"(tolerance atol={self.tolerance.atol:g} rtol={self.tolerance.rtol:g}; would pass with "
                f"atol>={worst.min_atol:.3g} or rtol>={worst.min_rtol:.3g})")


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> OutputComparison:
    ref = np.asarray(ref)
    got = np.asarray(got)
    if ref.shape != got.shape:
        return OutputComparison(name, False, np.inf, np.inf, np.inf, np.inf,
                                reason=f"shape {list(got.shape)} differs from reference {list(ref.shape)}")
    if ref.size == 0:
        return OutputComparison(name, True, 0.0, 0.0, 0.0, 0.0)
    if not (np.issubdtype(ref.dtype, np.floating) or np.issubdtype(ref.dtype, np.complexfloating)):
        mismatches = int(np.count_nonzero(ref != got))
        ok = mismatches == 0
        return OutputComparison(name, ok, float(mismatches > 0), float(mismatches > 0), 0.0, 0.0,
                                reason="" if ok else f"{mismatches} of {ref.size} values differ")
    ref64 = ref.astype(np.float64)
    got64 = got.astype(np.float64)
    nan_ref, nan_got = np.isnan(ref64), np.isnan(got64)
    if np.any(nan_ref != nan_got):
        return OutputComparison(name, False, np.inf, np.inf, np.inf, np.inf,
                                reason=f"NaN in {int(np.count_nonzero(nan_got & ~nan_ref))} places where the reference has none"
                                if np.any(nan_got & ~nan_ref) else "reference has NaN where the result has none")
    finite = ~nan_ref
    ref64, got64 = ref64[finite], got64[finite]
    atol = tol.atol_for(ref64[np.isfinite(ref64)])
    with np.errstate(invalid="ignore"):
        diff = np.abs(got64 - ref64)
    diff = np.where(ref64 == got64, 0.0, diff)  # equal infinities
    scale = np.abs(ref64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / scale)
    fails = (diff > atol) & (diff > tol.rtol * scale)
    ok = not bool(np.any(fails))
    beyond_rtol = diff > tol.rtol * scale
    beyond_atol = diff > atol
    min_atol = float(diff[beyond_rtol].max()) if np.any(beyond_rtol) else 0.0
    min_rtol = float(rel[beyond_atol].max()) if np.any(beyond_atol) else 0.0
    # all values NaN in both (NaN in the same places counts as equal): nothing left to compare
    return OutputComparison(name, ok, float(diff.max(initial=0.0)), float(rel.max(initial=0.0)), min_atol, min_rtol)


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tol: Tolerance) -> Comparison:
    """Compare every reference output with the same-named result output."""
    results = []
    for name, expected in ref.items():
        if name not in got:
            results.append(OutputComparison(name, False, np.inf, np.inf, np.inf, np.inf,
                                            reason="missing from the result"))
            continue
        results.append(compare_arrays(name, expected, got[name], tol))
    return Comparison(all(r.ok for r in results), tol, tuple(results))
