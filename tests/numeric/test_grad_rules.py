"""Every VJP rule against central finite differences in float64.

Harness (``check``): the op under test is wrapped into a model whose only
output is the scalar ``L = sum_o sum(o * R_o)`` with fixed random ``R_o``; the
gradient model is built with ``loss="scalar"`` and run in float64 on the ONNX
reference evaluator (ONNX Runtime lacks float64 kernels for Conv,
ConvTranspose, AveragePool, GlobalAveragePool, HardSigmoid, HardSwish and
Erf; the evaluator's Conv/ConvTranspose/LRN/... are replaced by the independent
numpy versions in ``hqpc.passes.autodiff.testing``).  Its gradients must match
central differences (one random direction + up to 6 coordinates per tensor)
with relative error <= 1e-4.  The same gradient graph is then built in
float32 and run on ONNX Runtime (all optimisations on); it must agree with the
float64 result to 1e-3 in relative norm — this checks that stock ORT executes
the emitted graph and that ORT's semantics match the reference's.

Shapes come from seeded random generators (reproducible: the seed is the test
id); inputs of non-smooth ops are kept away from their kinks.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from hqpc.passes.autodiff import testing as T
from hqpc.passes.gradients import GradientError, build_gradient_model, gradients

TOL = 1e-4
ORT_TOL = 1e-3


def check(nodes, inputs, params, outputs, wrt, seed=0, opset=17, options=None, tol=TOL,
          ort_tol=ORT_TOL, ort=True):
    rng = np.random.default_rng(seed + 12345)
    inputs = {k: np.asarray(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
              for k, v in inputs.items()}
    params = {k: np.asarray(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
              for k, v in params.items()}
    fwd = T.make_model(nodes, inputs, params, outputs, opset)
    outs = T.reference_evaluator(fwd).run(None, inputs)
    weights = {o: rng.standard_normal(np.shape(v)) for o, v in zip(outputs, outs)}
    model = T.make_model(nodes, inputs, params, outputs, opset, loss_weights=weights)
    gm = build_gradient_model(model, wrt, loss="scalar", dtype=None, options=options)
    onnx.checker.check_model(gm.model)
    g64 = gm.run(T.reference_evaluator(gm.model), inputs).grads
    for w in wrt:
        src = inputs.get(w, params.get(w))
        assert g64[w].shape == np.shape(src), (w, g64[w].shape, np.shape(src))
    lifted_names = [w for w in wrt if w in params]
    fev = T.reference_evaluator(T.lift_initializers(model, lifted_names))
    point = {**inputs, **{w: params[w] for w in lifted_names}}

    def loss_fn(p):
        return float(fev.run(["loss"], p)[0])

    err = T.check_gradients(loss_fn, point, g64, rng)
    assert err <= tol, f"finite-difference mismatch: rel err {err:.2e}"
    if ort:
        gm32 = build_gradient_model(model, wrt, loss="scalar", dtype=np.float32, options=options)
        r32 = gm32.run(gm32.session(), inputs)
        for w in wrt:
            d = T.norm_rel_diff(r32.grads[w], g64[w])
            assert d <= ort_tol, f"ORT float32 gradient of {w} differs from float64 by {d:.2e}"
    return g64


def node(op, ins, outs, **kw):
    return helper.make_node(op, ins, outs, **kw)


# ------------------------------------------------------------------- Conv
def _conv_case(seed):
    rng = np.random.default_rng(seed)
    nsp = 1 if seed % 7 == 3 else 2
    kind = ["dense", "grouped", "depthwise", "depthwise_mult"][seed % 4]
    cg = {"dense": rng.integers(1, 4), "grouped": rng.integers(1, 3)}.get(kind, 1)
    g = {"dense": 1, "grouped": rng.integers(2, 4)}.get(kind, rng.integers(2, 5))
    mg = {"depthwise": 1, "depthwise_mult": 2}.get(kind, rng.integers(1, 3))
    while True:
        size = list(rng.integers(3, 9, size=nsp))
        k = list(rng.integers(1, 4, size=nsp))
        s = list(rng.integers(1, 4, size=nsp))
        d = list(rng.integers(1, 3, size=nsp))
        auto_pad = ["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"][rng.integers(0, 5)]
        pads = list(rng.integers(0, 3, size=2 * nsp))
        if auto_pad.startswith("SAME"):
            d = [1] * nsp  # ORT's forward Conv rejects dilations with SAME_* padding
        if auto_pad == "NOTSET":
            eff = [i + pb + pe - (kk - 1) * dd - 1 for i, pb, pe, kk, dd in zip(size, pads[:nsp], pads[nsp:], k, d)]
        else:
            eff = [i - (kk - 1) * dd - 1 for i, kk, dd in zip(size, k, d)]
        if min(eff) >= 0:
            break
    attrs = dict(strides=[int(v) for v in s], dilations=[int(v) for v in d], group=int(g),
                 kernel_shape=[int(v) for v in k])
    if auto_pad == "NOTSET":
        attrs["pads"] = [int(p) for p in pads]
    else:
        attrs["auto_pad"] = auto_pad
    n = int(rng.integers(1, 4))
    x = rng.standard_normal((n, int(g * cg), *size))
    w = rng.standard_normal((int(g * mg), int(cg), *k))
    b = rng.standard_normal(int(g * mg))
    return x, w, b, attrs


@pytest.mark.parametrize("mode", ["auto", "conv_transpose"])
@pytest.mark.parametrize("seed", range(40))
def test_conv(seed, mode):
    x, w, b, attrs = _conv_case(seed)
    use_bias = seed % 3 != 0
    ins = ["x", "w", "b"] if use_bias else ["x", "w"]
    params = {"w": w, "b": b} if use_bias else {"w": w}
    check([node("Conv", ins, ["y"], **attrs)], {"x": x}, params, ["y"], ins, seed=seed,
          options={"conv_input_grad": mode})


def test_conv_3d_and_odd_stride():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 2, 5, 6, 7))
    w = rng.standard_normal((3, 2, 2, 3, 2))
    check([node("Conv", ["x", "w"], ["y"], strides=[2, 3, 2], pads=[1, 0, 1, 0, 2, 1])],
          {"x": x}, {"w": w}, ["y"], ["x", "w"])


# ------------------------------------------------------------- Gemm/MatMul
@pytest.mark.parametrize("ta", [0, 1])
@pytest.mark.parametrize("tb", [0, 1])
@pytest.mark.parametrize("cshape", ["none", "scalar", "row", "col", "full"])
def test_gemm(ta, tb, cshape):
    rng = np.random.default_rng(ta * 2 + tb)
    m, k, n = 3, 4, 5
    a = rng.standard_normal((k, m) if ta else (m, k))
    b = rng.standard_normal((n, k) if tb else (k, n))
    c = {"scalar": (), "row": (n,), "col": (m, 1), "full": (m, n)}.get(cshape)
    params = {"b": b}
    ins = ["a", "b"]
    if c is not None:
        params["c"] = rng.standard_normal(c)
        ins.append("c")
    check([node("Gemm", ins, ["y"], transA=ta, transB=tb, alpha=0.7, beta=-1.3)],
          {"a": a}, params, ["y"], ins)


@pytest.mark.parametrize("sa,sb", [
    ((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)),
    ((2, 1, 3, 4), (5, 4, 2)), ((1, 3, 4), (2, 4, 2)), ((2, 3, 4), (4,)),
])
def test_matmul(sa, sb):
    rng = np.random.default_rng(len(sa) * 10 + len(sb))
    check([node("MatMul", ["a", "b"], ["y"])], {"a": rng.standard_normal(sa)},
          {"b": rng.standard_normal(sb)}, ["y"], ["a", "b"])


# -------------------------------------------------------------- elementwise
BROADCAST_PAIRS = [
    ((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((2, 3, 4), (3, 1)), ((1, 3, 1), (2, 1, 4)),
    ((2, 3, 4), ()), ((5,), (2, 3, 5)), ((2, 1, 4, 1), (3, 1, 5)),
]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("pair", range(len(BROADCAST_PAIRS)))
def test_binary_broadcast(op, pair):
    sa, sb = BROADCAST_PAIRS[pair]
    rng = np.random.default_rng(pair)
    a = rng.standard_normal(sa)
    b = rng.standard_normal(sb)
    if op == "Div":
        b = np.sign(b) * (0.5 + np.abs(b))
    check([node(op, ["a", "b"], ["y"])], {"a": a}, {"b": b}, ["y"], ["a", "b"], seed=pair)


@st.composite
def _broadcast_shapes(draw):
    rank = draw(st.integers(1, 4))
    out = draw(st.lists(st.integers(2, 4), min_size=rank, max_size=rank))
    shapes = []
    for _ in range(2):
        r = draw(st.integers(0, rank))
        dims = out[rank - r:]
        shapes.append(tuple(d if draw(st.booleans()) else 1 for d in dims))
    return shapes


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(shapes=_broadcast_shapes(), op=st.sampled_from(["Add", "Sub", "Mul", "Div"]))
def test_binary_broadcast_random_shapes(shapes, op):
    rng = np.random.default_rng(abs(hash((shapes[0], shapes[1], op))) % 2**32)
    a = rng.standard_normal(shapes[0])
    b = rng.standard_normal(shapes[1])
    if op == "Div":
        b = np.sign(b) * (0.5 + np.abs(b))
    check([node(op, ["a", "b"], ["y"])], {"a": a, "b": b}, {}, ["y"], ["a", "b"], ort=False)


def _symbolic(model, dims: dict):
    """Replace graph-input dims by symbols, e.g. {"a": ["A", 3]}."""
    for vi in model.graph.input:
        if vi.name in dims:
            for d, new in zip(vi.type.tensor_type.shape.dim, dims[vi.name]):
                if isinstance(new, str):
                    d.ClearField("dim_value")
                    d.dim_param = new
    return model


def test_dynamic_broadcast_and_concat_sizes():
    """Shapes unknown at build time: run-time unbroadcast axes and Concat offsets."""
    rng = np.random.default_rng(21)
    a, b, c = rng.standard_normal((1, 3)), rng.standard_normal((4, 3)), rng.standard_normal((2, 3))
    nodes = [node("Mul", ["a", "b"], ["m"]), node("Concat", ["m", "c"], ["y"], axis=0)]
    r = rng.standard_normal((6, 3))
    model = T.make_model(nodes, {"a": a, "b": b, "c": c}, {}, ["y"], loss_weights={"y": r})
    model = _symbolic(model, {"a": ["A", 3], "b": ["B", 3], "c": ["C", 3]})
    gm = build_gradient_model(model, ["a", "b", "c"], loss="scalar", dtype=None)
    ops = {n.op_type for n in gm.model.graph.node}
    assert "NonZero" in ops  # the run-time reduction path was taken
    g = gm.run(gm.session(), {"a": a, "b": b, "c": c}).grads
    np.testing.assert_allclose(g["a"], (r[:4] * b).sum(0, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(g["b"], r[:4] * a, rtol=1e-12)
    np.testing.assert_allclose(g["c"], r[4:], rtol=1e-12)


def test_dynamic_spatial_dims_need_pinning():
    x = np.zeros((1, 2, 6, 6), np.float32)
    m = T.make_model([node("Conv", ["x", "w"], ["y"], strides=[2, 2]), node("Flatten", ["y"], ["logits"])],
                     {"x": x}, {"w": np.ones((3, 2, 3, 3), np.float32)}, ["logits"])
    m = _symbolic(m, {"x": ["N", 2, "H", "W"]})
    with pytest.raises(GradientError, match="static spatial"):
        build_gradient_model(m, ["x", "w"])
    gm = build_gradient_model(m, ["x", "w"], input_shapes={"x": ["N", 2, 6, 6]})
    r = gm.run(gm.session(), {"x": np.ones((2, 2, 6, 6))}, labels=np.array([0, 1]))
    assert r.grads["x"].shape == (2, 2, 6, 6)
    g = gradients(m, {"x": np.ones((2, 2, 6, 6))}, ["x", "w"], labels=np.array([0, 1]))
    np.testing.assert_allclose(g["x"], r.grads["x"], rtol=1e-6)


def test_same_tensor_twice_and_fanout():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4))
    nodes = [node("Mul", ["x", "x"], ["sq"]), node("Add", ["sq", "x"], ["y"]), node("Sum", ["x", "y", "sq"], ["z"])]
    check(nodes, {"x": x}, {}, ["z", "y"], ["x"])


@pytest.mark.parametrize("op", ["Max", "Min", "Mean"])
def test_variadic_max_min_mean(op):
    rng = np.random.default_rng(19)
    ins = {"a": rng.standard_normal((2, 3, 4)), "b": rng.standard_normal((3, 1)), "c": rng.standard_normal((4,))}
    check([node(op, list(ins), ["y"])], ins, {}, ["y"], list(ins))


UNARY = {
    "Relu": ({}, [0.0]), "Sigmoid": ({}, []), "Tanh": ({}, []), "Erf": ({}, []),
    "Exp": ({}, []), "Neg": ({}, []), "Abs": ({}, [0.0]), "Softplus": ({}, []),
    "LeakyRelu": ({"alpha": 0.1}, [0.0]), "Elu": ({"alpha": 0.7}, [0.0]),
    "HardSigmoid": ({"alpha": 0.2, "beta": 0.5}, [-2.5, 2.5]),
    "HardSwish": ({}, [-3.0, 3.0]), "Identity": ({}, []),
}


@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary(op):
    attrs, kinks = UNARY[op]
    rng = np.random.default_rng(len(op))
    x = 2.5 * rng.standard_normal((2, 3, 4, 5))
    x = T.max_abs_away(x, kinks, 0.05)
    check([node(op, ["x"], ["y"], **attrs)], {"x": x}, {}, ["y"], ["x"])


def test_leaky_relu_negative_alpha():
    x = T.max_abs_away(np.random.default_rng(1).standard_normal((3, 7)), [0.0], 0.05)
    check([node("LeakyRelu", ["x"], ["y"], alpha=-0.3)], {"x": x}, {}, ["y"], ["x"])


@pytest.mark.parametrize("op", ["Sqrt", "Log", "Reciprocal"])
def test_positive_domain_unary(op):
    x = 0.2 + np.abs(np.random.default_rng(2).standard_normal((3, 5)))
    check([node(op, ["x"], ["y"])], {"x": x}, {}, ["y"], ["x"])


@pytest.mark.parametrize("p", [2.0, 3.0, 0.5, -1.5, 1.0])
def test_pow_constant_exponent(p):
    x = 0.2 + np.abs(np.random.default_rng(3).standard_normal((2, 3, 4)))
    check([node("Pow", ["x", "p"], ["y"])], {"x": x}, {"p": np.array(p)}, ["y"], ["x"])


def test_pow_tensor_exponent():
    rng = np.random.default_rng(4)
    x = 0.2 + np.abs(rng.standard_normal((2, 3)))
    check([node("Pow", ["x", "p"], ["y"])], {"x": x}, {"p": rng.standard_normal((3,))}, ["y"], ["x", "p"])


@pytest.mark.parametrize("bounds", ["both", "min", "max", "none"])
def test_clip(bounds):
    rng = np.random.default_rng(6)
    x = T.max_abs_away(4 * rng.standard_normal((2, 3, 4, 4)), [0.0, 6.0], 0.05)
    ins = {"both": ["x", "lo", "hi"], "min": ["x", "lo"], "max": ["x", "", "hi"], "none": ["x"]}[bounds]
    params = {k: v for k, v in {"lo": np.array(0.0), "hi": np.array(6.0)}.items() if k in ins}
    check([node("Clip", ins, ["y"])], {"x": x}, params, ["y"], ["x"] + list(params))


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax(op, axis):
    x = np.random.default_rng(7).standard_normal((3, 4, 5))
    check([node(op, ["x"], ["y"], axis=axis)], {"x": x}, {}, ["y"], ["x"])


def test_where():
    rng = np.random.default_rng(8)
    c = rng.random((3, 4)) > 0.5
    check([node("Where", ["c", "a", "b"], ["y"])], {"a": rng.standard_normal((3, 4))},
          {"c": c, "b": rng.standard_normal((4,))}, ["y"], ["a", "b"])


# ------------------------------------------------------------------ pooling
def test_global_average_pool():
    x = np.random.default_rng(9).standard_normal((2, 3, 5, 4))
    check([node("GlobalAveragePool", ["x"], ["y"])], {"x": x}, {}, ["y"], ["x"])


def test_global_max_pool():
    x = np.random.default_rng(9).standard_normal((2, 3, 5, 4))
    check([node("GlobalMaxPool", ["x"], ["y"])], {"x": x}, {}, ["y"], ["x"])


AVG_CASES = [
    dict(kernel_shape=[2, 2], strides=[2, 2]),
    dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
    dict(kernel_shape=[3, 2], strides=[2, 1], pads=[0, 1, 1, 0], count_include_pad=0),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[5, 6]),  # whole input: global-average fast path
    dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
]


@pytest.mark.parametrize("case", range(len(AVG_CASES)))
def test_average_pool(case):
    x = np.random.default_rng(case).standard_normal((2, 3, 5, 6))
    check([node("AveragePool", ["x"], ["y"], **AVG_CASES[case])], {"x": x}, {}, ["y"], ["x"])


MAX_CASES = [
    dict(kernel_shape=[2, 2], strides=[2, 2]),
    dict(kernel_shape=[3, 3], strides=[1, 1]),                          # overlapping windows
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[2, 3], strides=[1, 2], dilations=[2, 1]),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 3], strides=[1, 1], storage_order=1),
]


@pytest.mark.parametrize("case", range(len(MAX_CASES)))
def test_max_pool(case):
    x = np.random.default_rng(case).standard_normal((2, 3, 6, 7))
    check([node("MaxPool", ["x"], ["y"], **MAX_CASES[case])], {"x": x}, {}, ["y"], ["x"])


def test_max_pool_with_indices_output_used():
    x = np.random.default_rng(1).standard_normal((2, 2, 5, 5))
    nodes = [node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[3, 3], strides=[1, 1]),
             node("Cast", ["idx"], ["idxf"], to=onnx.TensorProto.DOUBLE),
             node("Mul", ["y", "idxf"], ["z"])]
    check(nodes, {"x": x}, {}, ["z"], ["x"], ort=False)


# ------------------------------------------------------------- norm / reduce
def test_batch_norm_inference():
    rng = np.random.default_rng(10)
    c = 3
    params = {"s": rng.standard_normal(c), "bias": rng.standard_normal(c), "m": rng.standard_normal(c),
              "v": 0.5 + rng.random(c)}
    check([node("BatchNormalization", ["x", "s", "bias", "m", "v"], ["y"], epsilon=1e-3)],
          {"x": rng.standard_normal((2, c, 4, 3))}, params, ["y"], ["x", "s", "bias", "m", "v"])


@pytest.mark.parametrize("size,shape", [(1, (2, 3, 4, 3)), (3, (2, 5, 3, 4)), (4, (2, 7, 3, 2)),
                                        (5, (1, 6, 2, 3)), (8, (2, 4, 2, 2))])
def test_lrn(size, shape):
    """Even sizes make the window asymmetric (ONNX Runtime's LRN kernel refuses them: float64 check
    only); size > channels clips the window at both ends."""
    rng = np.random.default_rng(size * 10 + len(shape))
    check([node("LRN", ["x"], ["y"], size=size, alpha=0.3, beta=0.75, bias=1.5)],
          {"x": rng.standard_normal(shape)}, {}, ["y"], ["x"], ort=size % 2 == 1)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum"])
@pytest.mark.parametrize("axes,keepdims", [([1], 1), ([0, 2], 0), ([-1], 0), (None, 1), (None, 0)])
@pytest.mark.parametrize("opset", [17, 18])
def test_reduce(op, axes, keepdims, opset):
    x = np.random.default_rng(11).standard_normal((2, 3, 4))
    ins, params, attrs = ["x"], {}, {"keepdims": keepdims}
    if axes is not None:
        if op == "ReduceSum" or opset >= 18:
            ins.append("axes")
            params["axes"] = np.array(axes, dtype=np.int64)
        else:
            attrs["axes"] = axes
    check([node(op, ins, ["y"], **attrs)], {"x": x}, params, ["y"], ["x"], opset=opset)


# ----------------------------------------------------------------- shape ops
def test_flatten_reshape_squeeze_unsqueeze_transpose():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 1, 4))
    nodes = [
        node("Squeeze", ["x", "ax2"], ["a"]),                      # [2,3,4]
        node("Transpose", ["a"], ["b"], perm=[2, 0, 1]),            # [4,2,3]
        node("Unsqueeze", ["b", "ax0"], ["c"]),                     # [1,4,2,3]
        node("Flatten", ["c"], ["d"], axis=2),                      # [4,6]
        node("Reshape", ["d", "shp"], ["e"]),                       # [3,8]
        node("Transpose", ["e"], ["f"]),                            # [8,3]
    ]
    params = {"ax2": np.array([2]), "ax0": np.array([0]), "shp": np.array([3, -1])}
    check(nodes, {"x": x}, params, ["f"], ["x"])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat(axis):
    rng = np.random.default_rng(13)
    shapes = {0: [(1, 3, 2), (2, 3, 2), (3, 3, 2)], 1: [(2, 1, 2), (2, 3, 2), (2, 2, 2)],
              -1: [(2, 3, 1), (2, 3, 4), (2, 3, 2)]}[axis]
    ins = {f"x{i}": rng.standard_normal(s) for i, s in enumerate(shapes)}
    check([node("Concat", list(ins), ["y"], axis=axis)], ins, {}, ["y"], ["x0", "x2"])


def test_split_partial_use():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 7, 3))
    nodes = [node("Split", ["x", "sizes"], ["a", "b", "c"], axis=1)]
    # only a and c reach the loss: b's gradient must be zeros
    check(nodes, {"x": x}, {"sizes": np.array([2, 4, 1])}, ["a", "c"], ["x"])


@pytest.mark.parametrize("case", range(6))
def test_slice(case):
    starts, ends, axes, steps = [
        ([1], [4], [1], None),
        ([0, 0], [2**63 - 1, 2**63 - 1], [2, 3], [2, 2]),                  # ResNet option-A shortcut
        ([-1], [-2**63], [2], [-1]),                                        # reversed
        ([5, 1], [0, 100], [2, 1], [-2, 3]),
        ([1, 0, 1], [3, 2, -1], [0, 1, 3], [1, 1, 2]),
        ([-3], [-1], [-1], None),
    ][case]
    x = np.random.default_rng(case).standard_normal((3, 4, 6, 5))
    ins = ["x", "st", "en", "ax"] + (["sp"] if steps else [])
    params = {"st": np.array(starts), "en": np.array(ends), "ax": np.array(axes)}
    if steps:
        params["sp"] = np.array(steps)
    check([node("Slice", ins, ["y"])], {"x": x}, params, ["y"], ["x"])


@pytest.mark.parametrize("pads", [[0, 0, 1, 2, 0, 0, 2, 1], [0, 1, 0, 0, 0, 2, 0, 0],
                                  [0, 0, -1, 1, 0, 0, 2, -2]])
def test_pad(pads):
    x = np.random.default_rng(15).standard_normal((2, 3, 4, 5))
    check([node("Pad", ["x", "pads", "cv"], ["y"], mode="constant")], {"x": x},
          {"pads": np.array(pads), "cv": np.array(0.3)}, ["y"], ["x", "cv"])


def test_pad_axes_opset18():
    x = np.random.default_rng(16).standard_normal((2, 3, 4, 5))
    check([node("Pad", ["x", "pads", "", "axes"], ["y"])], {"x": x},
          {"pads": np.array([1, 0, 2, 1]), "axes": np.array([1, 3])}, ["y"], ["x"], opset=18)


def test_dropout_inference_and_expand():
    rng = np.random.default_rng(17)
    nodes = [node("Dropout", ["x", "ratio"], ["d"]), node("Expand", ["d", "shp"], ["y"])]
    check(nodes, {"x": rng.standard_normal((3, 1))}, {"ratio": np.array(0.5), "shp": np.array([2, 3, 4])},
          ["y"], ["x"])


def test_cast_float_roundtrip():
    # a float32 hop makes finite differences meaningless; the exact VJP is the weights R
    rng = np.random.default_rng(18)
    x = rng.standard_normal((3, 4))
    r = rng.standard_normal((3, 4))
    nodes = [node("Cast", ["x"], ["f"], to=onnx.TensorProto.FLOAT),
             node("Cast", ["f"], ["y"], to=onnx.TensorProto.DOUBLE)]
    m = T.make_model(nodes, {"x": x}, {}, ["y"], loss_weights={"y": r})
    gm = build_gradient_model(m, ["x"], loss="scalar", dtype=None)
    g = gm.run(gm.session(), {"x": x}).grads["x"]
    assert g.dtype == np.float64
    np.testing.assert_allclose(g, r.astype(np.float32), rtol=0, atol=0)


# ------------------------------------------------------------------- errors
def _tiny(op="Cos"):
    x = np.zeros((2, 3), np.float32)
    nodes = [node("Relu", ["x"], ["r"], name="relu0"), node(op, ["r"], ["c"], name="the_node"),
             node("MatMul", ["c", "w"], ["y"], name="mm")]
    return T.make_model(nodes, {"x": x}, {"w": np.ones((3, 2), np.float32)}, ["y"])


def test_unsupported_op_names_node_and_op():
    with pytest.raises(GradientError, match=r"no gradient rule for node 'the_node' \(op Cos\)"):
        build_gradient_model(_tiny(), ["x"], loss="cross_entropy")
    assert issubclass(GradientError, ValueError)


def test_unsupported_op_off_path_is_fine():
    # gradient w.r.t. w only: the Cos node lies upstream and is never differentiated
    gm = build_gradient_model(_tiny(), ["w"], loss="cross_entropy")
    r = gm.run(gm.session(), {"x": np.ones((2, 3), np.float32)}, labels=np.array([0, 1]))
    assert r.grads["w"].shape == (3, 2)


def test_unsupported_op_raises_before_running():
    with pytest.raises(GradientError, match="Cos"):
        gradients(_tiny(), {"x": np.ones((2, 3), np.float32)}, ["x"], labels=np.array([0, 1]))


def test_bad_wrt_and_non_differentiable_slot():
    with pytest.raises(GradientError, match="not an initializer"):
        build_gradient_model(_tiny("Relu"), ["nope"])
    x = np.zeros((2, 3), np.float32)
    m = T.make_model([node("Dropout", ["x", "r"], ["y"])], {"x": x, "r": np.array(0.1, np.float32)}, {}, ["y"])
    with pytest.raises(GradientError, match="input 1"):
        build_gradient_model(m, ["r"])
