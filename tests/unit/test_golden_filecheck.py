"""FileCheck semantics and seeded initializers of the golden-test harness."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from hqpc.golden import CheckFailure, build_model_from_text, filecheck

OUTPUT = "alpha\nbeta gamma\ndelta\nepsilon\n"


def checks(*pairs):
    return [(kind, pattern, i + 1) for i, (kind, pattern) in enumerate(pairs)]


def test_check_in_order_and_next():
    filecheck(OUTPUT, checks(("CHECK", "beta"), ("CHECK-NEXT", "delta"), ("CHECK", "epsilon")))
    filecheck(OUTPUT, checks(("CHECK", "beta"), ("CHECK", "gamma")))  # same line, after the match


def test_check_failures():
    with pytest.raises(CheckFailure, match="'zeta' not found"):
        filecheck(OUTPUT, checks(("CHECK", "zeta")))
    with pytest.raises(CheckFailure, match="not found"):
        filecheck(OUTPUT, checks(("CHECK", "delta"), ("CHECK", "beta")))  # order matters
    with pytest.raises(CheckFailure, match="CHECK-NEXT"):
        filecheck(OUTPUT, checks(("CHECK", "alpha"), ("CHECK-NEXT", "delta")))


def test_check_not_is_scoped_between_matches():
    filecheck(OUTPUT, checks(("CHECK", "alpha"), ("CHECK-NOT", "epsilon"), ("CHECK", "delta")))
    with pytest.raises(CheckFailure, match="CHECK-NOT: 'gamma'"):
        filecheck(OUTPUT, checks(("CHECK", "alpha"), ("CHECK-NOT", "gamma"), ("CHECK", "delta")))
    with pytest.raises(CheckFailure, match="CHECK-NOT: 'epsilon'"):
        filecheck(OUTPUT, checks(("CHECK", "beta"), ("CHECK-NOT", "epsilon")))


def test_declared_initializers_are_seeded_deterministically():
    text = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y)
<float[2] s, float[2] b, float[2] m, float[2] v, float[2] given = {1, 2}>
{ y = BatchNormalization (x, s, b, m, v) }"""
    first = {t.name: numpy_helper.to_array(t) for t in build_model_from_text(text, "case").graph.initializer}
    second = {t.name: numpy_helper.to_array(t) for t in build_model_from_text(text, "case").graph.initializer}
    assert set(first) == {"s", "b", "m", "v", "given"}
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    assert np.all(first["v"] >= 0.5) and first["given"].tolist() == [1.0, 2.0]
    other = {t.name: numpy_helper.to_array(t) for t in build_model_from_text(text, "other").graph.initializer}
    assert not np.array_equal(first["s"], other["s"])
