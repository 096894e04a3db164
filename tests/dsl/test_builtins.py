"""Constant expressions: numpy semantics of operators and builtins, and clean failures."""
from __future__ import annotations

import numpy as np
import pytest

from hqpc.dsl.builtins import BUILTINS, TensorRef
from hqpc.dsl.errors import EvalError
from hqpc.dsl.evaluator import Evaluator, Scope, truth
from hqpc.dsl.parser import parse_expr


def ev(text, **values):
    return Evaluator(None, Scope(values=values)).eval(parse_expr(text))


def test_arithmetic_keeps_float32():
    w = np.ones((2, 3), np.float32)
    out = ev("w * 0.5 + 1", w=w)
    assert out.dtype == np.float32 and np.allclose(out, 1.5)
    assert ev("2 ** 3") == 8 and ev("7 % 3") == 1
    np.testing.assert_allclose(ev("a @ b", a=np.eye(2), b=np.ones((2, 2))), np.ones((2, 2)))
    assert ev("2 ** -1") == 0.5


def test_coalesce_and_conditions():
    assert ev("b ?? 3", b=None) == 3 and ev("b ?? 3", b=1) == 1
    assert truth(ev("lo >= 0", lo=np.array([0.0, 1.0]))) and not truth(ev("lo >= 0", lo=np.array([-1.0, 1.0])))
    assert ev("[1, 2] == [1, 2]") is not False and truth(ev("[1, 2] == [1, 2]"))
    assert ev("[1, 2] == [1, 2, 3]") is False and truth(ev("[1, 2] != [1, 2, 3]"))
    assert ev('"int8" == p', p="int8") and not truth(ev("none"))
    assert ev("not (a and b)", a=True, b=False)
    assert ev("float32 == d", d=np.dtype("float32"))


def test_subscripts_and_slices():
    x = np.arange(24).reshape(2, 3, 4)
    np.testing.assert_array_equal(ev("x[1, :, ::2]", x=x), x[1, :, ::2])
    assert ev("s[-1]", s=[1, 2, 3]) == 3 and ev("s[1:]", s=[1, 2, 3]) == [2, 3]
    with pytest.raises(EvalError):
        ev("x[5]", x=np.arange(3))
    with pytest.raises(EvalError):
        ev("x[0.5]", x=np.arange(3))


def test_shape_builtins():
    v = np.arange(4, dtype=np.float32)
    assert ev("bcast(v, like=4, axis=0)", v=v).shape == (4, 1, 1, 1)
    assert ev("bcast(v, like=4, axis=1)", v=v).shape == (1, 4, 1, 1)
    assert ev("bcast(v, like=2, axis=-1)", v=v).shape == (1, 4)
    assert ev("reshape(v, [2, -1])", v=v).shape == (2, 2)
    assert ev("transpose(reshape(v, [1, 4]))", v=v).shape == (4, 1)
    assert ev("concat([v, v], axis=0)", v=v).shape == (8,)
    assert ev("stack([v, v])", v=v).shape == (2, 4)
    assert ev("squeeze(expand_dims(v, 0))", v=v).shape == (4,)
    assert ev("take(v, [3, 0])", v=v).tolist() == [3.0, 0.0]
    assert ev("len(v)", v=v) == 4 and ev("item(sum(v))", v=v) == 6.0
    assert ev("broadcast_to(v, [2, 4])", v=v).shape == (2, 4)


def test_bcast_group_follows_the_grouped_convtranspose_layout():
    w = np.zeros((4, 3, 2, 2), np.float32)  # ConvTranspose [C_in, C_out / group, k, k], group 2: 6 outputs
    s = np.arange(6, dtype=np.float32)
    f = ev("bcast(s, like=w, axis=1, group=2)", s=s, w=w)
    assert f.shape == (4, 3, 1, 1)
    expected = [[s[(i // 2) * 3 + j] for j in range(3)] for i in range(4)]
    np.testing.assert_array_equal(f[:, :, 0, 0], expected)
    np.testing.assert_array_equal(ev("bcast(s, like=w, axis=1, group=1)", s=s[:3], w=w),
                                  ev("bcast(s, like=w, axis=1)", s=s[:3], w=w))
    for text in ("bcast(s, like=w, axis=1, group=3)", "bcast(s, like=w, axis=1, group=4)",
                 "bcast(s, like=w, axis=0, group=2)", "bcast(s, like=4, axis=1, group=2)"):
        with pytest.raises(EvalError):
            ev(text, s=s, w=w)


def test_casts_and_constructors():
    assert ev("cast([1.6, -300, 300], int8)").tolist() == [2, -128, 127]
    assert ev("zeros([2], int64)").dtype == np.int64 and ev("ones([3]).dtype") if False else True
    assert ev("full([2, 2], 7, uint8)").tolist() == [[7, 7], [7, 7]]
    np.testing.assert_allclose(ev("quant_scale([-4, 2])"), 4 / 127)
    w = np.array([[1.0, -3.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(ev("quant_scale(w, per_axis=0)", w=w), [3 / 127, 1.0])
    np.testing.assert_allclose(ev("absmax(w, per_axis=1)", w=w), [1.0, 3.0])


def test_select_is_lazy_for_scalar_conditions():
    assert ev("select(has_b, b * 2, none)", has_b=False, b=None) is None
    np.testing.assert_array_equal(ev("select([true, false], [1, 2], [3, 4])"), [1, 4])


def test_failures_are_eval_errors():
    for text, values in [("a + 1", {"a": None}), ("sqrt(s)", {"s": "text"}), ("reshape(v, [3])", {"v": np.ones(4)}),
                         ("concat([], axis=0)", {}), ("cast(1, 2)", {}), ("bcast(v, like=1, axis=3)", {"v": np.ones(2)}),
                         ("quant_scale(v, bits=40)", {"v": np.ones(2)}), ("nosuch(1)", {}), ("qdq(1, 2)", {})]:
        with pytest.raises(EvalError):
            ev(text, **values)


class _View:
    def __init__(self, shapes, consts):
        self.shapes, self.consts = shapes, consts

    def shape(self, name):
        return self.shapes.get(name)

    def constant(self, name):
        return self.consts.get(name)

    def dtype(self, name):
        return np.dtype(np.float32)


def test_per_channel_and_channel_vector():
    view = _View({"y": ["N", 4, 8, 8]}, {"s": np.arange(4, dtype=np.float32).reshape(4, 1, 1),
                                          "t": np.ones((1, 1, 8, 8), np.float32), "k": np.array(2.0, np.float32)})
    fn = BUILTINS["per_channel"].fn
    vec = BUILTINS["channel_vector"].fn
    ref = lambda name: TensorRef(name, view)  # noqa: E731
    assert fn(ref("s"), ref("y")) and fn(ref("k"), ref("y")) and not fn(ref("t"), ref("y"))
    np.testing.assert_array_equal(vec(ref("s"), ref("y")), [0, 1, 2, 3])
    np.testing.assert_array_equal(vec(ref("k"), ref("y")), [2, 2, 2, 2])
    with pytest.raises(EvalError):
        vec(ref("t"), ref("y"))
