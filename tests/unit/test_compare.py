"""Tolerance semantics of the numeric guard (Polygraphy's: fail only when both bounds are exceeded)."""
from __future__ import annotations

import numpy as np

from hqpc.runtime.compare import Tolerance, compare_arrays, compare_outputs

TOL = Tolerance(atol=1e-3, rtol=1e-2)


def test_passes_when_either_bound_holds():
    ref = np.array([0.0, 100.0], np.float32)
    got = np.array([5e-4, 100.5], np.float32)  # first within atol, second within rtol
    assert compare_arrays("y", ref, got, TOL).ok


def test_fails_when_both_bounds_are_exceeded_and_reports_minimum_tolerances():
    ref = np.array([1.0, 10.0])
    got = np.array([1.5, 10.0])
    result = compare_arrays("y", ref, got, TOL)
    assert not result.ok
    assert np.isclose(result.max_abs, 0.5) and np.isclose(result.max_rel, 0.5)
    assert np.isclose(result.min_atol, 0.5) and np.isclose(result.min_rtol, 0.5)
    # with exactly those tolerances it passes
    assert compare_arrays("y", ref, got, Tolerance(atol=result.min_atol, rtol=TOL.rtol)).ok
    assert compare_arrays("y", ref, got, Tolerance(atol=TOL.atol, rtol=result.min_rtol)).ok


def test_nan_shape_and_missing_outputs():
    assert compare_arrays("y", np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), TOL).ok
    assert not compare_arrays("y", np.array([0.0, 1.0]), np.array([np.nan, 1.0]), TOL).ok
    shape = compare_arrays("y", np.zeros((2, 3)), np.zeros((3, 2)), TOL)
    assert not shape.ok and "shape" in shape.reason
    both = compare_outputs({"a": np.zeros(2), "b": np.zeros(2)}, {"a": np.zeros(2)}, TOL)
    assert not both.ok and "missing" in both.summary()


def test_integer_outputs_must_match_exactly():
    assert compare_arrays("i", np.array([1, 2]), np.array([1, 2]), TOL).ok
    assert not compare_arrays("i", np.array([1, 2]), np.array([1, 3]), TOL).ok


def test_atol_per_scale_bounds_each_output_by_its_magnitude():
    """A cancellation (0.36 among values of ~35) moved by 1.0e-5: within 1e-5 of the output's scale,
    not within 1e-5 absolute or relative to itself."""
    ref = np.array([35.0, -31.9, 0.3619004], np.float32)
    got = ref + np.array([0.0, 0.0, 1.0162592e-5], np.float32)
    plain, scaled = Tolerance(atol=1e-5, rtol=1e-5), Tolerance(atol=1e-5, rtol=1e-5, atol_per_scale=True)
    assert not compare_arrays("y", ref, got, plain).ok
    assert compare_arrays("y", ref, got, scaled).ok
    assert not compare_arrays("y", ref, ref + np.float32(4e-4), scaled).ok  # 4e-4 > 1e-5 x 35
    small = np.array([0.5, -0.2], np.float32)  # scale below 1: the bound stays 1e-5 absolute
    assert not compare_arrays("y", small, small + np.float32(2e-5), scaled).ok
    assert "atol_per_scale" not in plain.as_dict() and scaled.as_dict()["atol_per_scale"] is True
