"""Whole-model gradient checks, losses and the public API.

* Generated CNNs (residual, depthwise, squeeze-excite, hard-swish, max-pool,
  Slice+Pad shortcut, batch-norm, Gemm, ...) at several opsets: gradients of
  the mean cross-entropy w.r.t. all weights, the input and intermediate
  activations, in float64 (ONNX reference evaluator), against central
  directional differences: rel err <= 1e-4; the float32 ONNX Runtime run of
  the same gradient graph agrees with the float64 one to 1e-3 (norm).
* The real models in ``../shared/data/models`` (skipped when absent): the
  same directional-derivative check in float64 on a few weights + the input.
* Loss heads (cross-entropy, true / empirical Fisher) and ``gradients()``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from hqpc.passes.autodiff import testing as T
from hqpc.passes.autodiff.precision import convert_float_type
from hqpc.passes.gradients import activation_gradients, build_gradient_model, gradients

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "models"
TOL = 1e-4


def node(op, ins, outs, **kw):
    return helper.make_node(op, ins, outs, **kw)


def softmax_xent(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits.reshape(logits.shape[0], -1).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(labels)), labels]))


# ------------------------------------------------------------ generated nets
def kitchen_sink(opset: int = 17, seed: int = 0, n: int = 2):
    """A small CNN using most ruled ops; returns (float64 model, input, labels)."""
    rng = np.random.default_rng(seed)
    p = {}

    def w(name, *shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        p[name] = rng.standard_normal(shape) * (scale if scale is not None else 1.0 / np.sqrt(fan_in))
        return name

    def const(name, value):
        p[name] = np.asarray(value)
        return name

    nodes = [
        node("Conv", ["x", w("c1w", 8, 3, 3, 3), w("c1b", 8, scale=0.1)], ["c1"], pads=[1, 1, 1, 1]),
        node("BatchNormalization", ["c1", w("bns", 8, scale=1.0), w("bnb", 8, scale=0.1),
                                    w("bnm", 8, scale=0.1), const("bnv", 0.5 + rng.random(8))], ["bn"]),
        node("Relu", ["bn"], ["r1"]),
        # depthwise stride-2 with TF-style asymmetric pads, hard-swish
        node("Conv", ["r1", w("dww", 8, 1, 3, 3), w("dwb", 8, scale=0.1)], ["dw"], group=8,
             strides=[2, 2], pads=[0, 0, 1, 1]),
        node("HardSwish", ["dw"], ["hs"]),
        # squeeze-excite
        node("GlobalAveragePool", ["hs"], ["se0"]),
        node("Conv", ["se0", w("se1w", 4, 8, 1, 1), w("se1b", 4, scale=0.1)], ["se1"]),
        node("Relu", ["se1"], ["se2"]),
        node("Conv", ["se2", w("se3w", 8, 4, 1, 1), w("se3b", 8, scale=0.1)], ["se3"]),
        node("HardSigmoid", ["se3"], ["se4"], alpha=1.0 / 6, beta=0.5),
        node("Mul", ["hs", "se4"], ["se"]),
        # 1x1 projection + residual
        node("Conv", ["se", w("pw", 8, 8, 1, 1)], ["pj"]),
        node("Add", ["pj", "hs"], ["res"]),
        node("MaxPool", ["res"], ["mp"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
        node("Clip", ["mp", const("lo", 0.0), const("hi", 6.0)], ["r6"]),
        # option-A shortcut: stride-2 slice + channel zero-pad, next to a strided grouped conv
        node("Slice", ["r6", const("st", [0, 0]), const("en", [2**63 - 1, 2**63 - 1]),
                       const("ax", [2, 3]), const("sp", [2, 2])], ["sl"]),
        node("Pad", ["sl", const("pads", [0, 4, 0, 0, 0, 4, 0, 0])], ["sc"]),
        node("Conv", ["r6", w("c2w", 16, 4, 3, 3)], ["c2"], group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
        node("Add", ["c2", "sc"], ["b2"]),
        node("LeakyRelu", ["b2"], ["lr"], alpha=0.1),
        # concat / split branch
        node("Split", ["lr", const("splits", [6, 10])], ["sa", "sb"], axis=1),
        node("Sigmoid", ["sa"], ["sg"]),
        node("Tanh", ["sb"], ["th"]),
        node("Concat", ["th", "sg"], ["cat"], axis=1),
        node("AveragePool", ["cat"], ["ap"], kernel_shape=[3, 3], strides=[3, 3]),
        node("Flatten", ["ap"], ["fl"]),
        node("Gemm", ["fl", w("fcw", 10, 16), w("fcb", 10, scale=0.1)], ["fc"], transB=1),
        node("Reshape", ["fc", const("shp", [0, 10])], ["logits"]),
    ]
    x = rng.standard_normal((n, 3, 12, 12))
    model = T.make_model(nodes, {"x": x}, p, ["logits"], opset=opset)
    labels = rng.integers(0, 10, size=n)
    return model, x, labels


def attention_like(opset: int, seed: int = 1, n: int = 3):
    """MatMul / Transpose / Softmax / ReduceMean / Div / Sub / Pow / Sqrt / Erf / Unsqueeze."""
    rng = np.random.default_rng(seed)
    p = {"wq": rng.standard_normal((6, 6)) / 3, "wk": rng.standard_normal((6, 6)) / 3,
         "wo": rng.standard_normal((6, 5)) / 3, "two": np.array(2.0), "eps": np.array(1e-3),
         "half": np.array(0.5), "one": np.array(1.0), "rs2": np.array(1 / np.sqrt(2))}
    if opset >= 18:
        p["rax"] = np.array([-1])
        red = lambda i, o: node("ReduceMean", [i, "rax"], [o])  # noqa: E731
    else:
        red = lambda i, o: node("ReduceMean", [i], [o], axes=[-1])  # noqa: E731
    nodes = [
        node("MatMul", ["x", "wq"], ["q"]), node("MatMul", ["x", "wk"], ["k"]),
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["s"]), node("Softmax", ["s"], ["a"], axis=-1),
        node("MatMul", ["a", "x"], ["ctx"]),
        # layer norm by hand
        red("ctx", "mu"), node("Sub", ["ctx", "mu"], ["xc"]), node("Pow", ["xc", "two"], ["sq"]),
        red("sq", "var"), node("Add", ["var", "eps"], ["ve"]), node("Sqrt", ["ve"], ["sd"]),
        node("Div", ["xc", "sd"], ["ln"]),
        # exact GELU
        node("Mul", ["ln", "rs2"], ["g0"]), node("Erf", ["g0"], ["g1"]), node("Add", ["g1", "one"], ["g2"]),
        node("Mul", ["ln", "g2"], ["g3"]), node("Mul", ["g3", "half"], ["gelu"]),
        node("MatMul", ["gelu", "wo"], ["o"]),                                  # [N, T, 5]
        node("ReduceSum", ["o", "ax1"], ["logits"], keepdims=0),                # [N, 5]
    ]
    p["ax1"] = np.array([1])
    x = rng.standard_normal((n, 4, 6))
    model = T.make_model(nodes, {"x": x}, p, ["logits"], opset=opset)
    return model, x, rng.integers(0, 5, size=n)


def _float_params(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer
            if t.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE) and np.prod(t.dims) > 1]


def directional_check(model64: onnx.ModelProto, x: np.ndarray, labels: np.ndarray, wrt: list[str],
                      rng: np.random.Generator, eps: float = 1e-7, per_tensor: bool = True,
                      input_name: str = "x"):
    """float64 gradients vs central directional differences of the mean cross-entropy."""
    gm = build_gradient_model(model64, wrt, loss="cross_entropy", dtype=np.float64)
    res = gm.run(T.reference_evaluator(gm.model), {input_name: x}, labels=labels)
    assert abs(res.loss - softmax_xent(res.logits, labels)) <= 1e-10 * max(1.0, abs(res.loss))
    params = [w for w in wrt if w != input_name]
    fwd = T.reference_evaluator(T.lift_initializers(model64, params))
    out_name = model64.graph.output[0].name
    point = {input_name: x, **T.initializer_values(model64, params)}

    def loss_fn(pt):
        return softmax_xent(fwd.run([out_name], pt)[0], labels)

    # scale directions like the tensors so eps is a relative step; a small eps keeps the
    # number of ReLU kinks crossed by the perturbation (each biases the difference) negligible
    dirs = {}
    for w in wrt:
        v = point[w]
        dirs[w] = rng.standard_normal(v.shape) * (np.sqrt(np.mean(v ** 2)) + 1e-3)
    groups = [wrt] + ([[w] for w in wrt] if per_tensor else [])
    worst = 0.0
    for grp in groups:
        d = {w: dirs[w] for w in grp}
        fd = T.directional_fd(loss_fn, point, d, eps)
        an = sum(float(np.sum(res.grads[w] * d[w])) for w in grp)
        scale = 1e-3 * np.sqrt(sum(np.sum(res.grads[w] ** 2) for w in grp)) * \
            np.sqrt(sum(np.sum(d[w] ** 2) for w in grp))
        err = T.rel_err(fd, an, scale)
        worst = max(worst, err)
        assert err <= TOL, f"directional derivative along {grp}: fd={fd:.10g} analytic={an:.10g} rel err {err:.2e}"
    return gm, res, worst


@pytest.mark.parametrize("opset", [14, 17, 21])
def test_kitchen_sink_cnn(opset):
    model, x, labels = kitchen_sink(opset)
    rng = np.random.default_rng(opset)
    wrt = ["x"] + _float_params(model)
    gm, res, _ = directional_check(model, x, labels, wrt, rng)
    # float32 on ONNX Runtime: same graph, same numbers
    gm32 = build_gradient_model(model, wrt, loss="cross_entropy", dtype=np.float32)
    onnx.checker.check_model(gm32.model, full_check=True)
    r32 = gm32.run(gm32.session(), {"x": x}, labels=labels)
    for w in wrt:
        assert T.norm_rel_diff(r32.grads[w], res.grads[w]) <= 1e-3, w
    assert abs(r32.loss - res.loss) <= 1e-5 * max(1, abs(res.loss))


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_attention_like_graph(opset):
    model, x, labels = attention_like(opset)
    wrt = ["x", "wq", "wk", "wo"]
    _, res, _ = directional_check(model, x, labels, wrt, np.random.default_rng(3))
    gm32 = build_gradient_model(model, wrt, dtype=np.float32)
    r32 = gm32.run(gm32.session(), {"x": x}, labels=labels)
    for w in wrt:
        assert T.norm_rel_diff(r32.grads[w], res.grads[w]) <= 1e-3, w


@pytest.mark.parametrize("cut", ["res", "r6", "fl"])
def test_intermediate_activation_gradient(cut):
    """Gradient w.r.t. an activation = gradient of the model's tail w.r.t. its input."""
    model, x, labels = kitchen_sink(17, seed=4)
    gm = build_gradient_model(model, [cut, "c1w"], dtype=np.float64, extra_outputs=[cut])
    res = gm.run(T.reference_evaluator(gm.model), {"x": x}, labels=labels)
    act = res.extras[cut]
    assert res.grads[cut].shape == act.shape
    tail = onnx.utils.Extractor(model).extract_model([cut], ["logits"])
    tail_gm = build_gradient_model(tail, [cut], dtype=np.float64)
    tail_res = tail_gm.run(T.reference_evaluator(tail_gm.model), {cut: act}, labels=labels)
    assert T.norm_rel_diff(res.grads[cut], tail_res.grads[cut]) <= 1e-12
    # and a finite-difference check on the tail
    ev = T.reference_evaluator(tail)
    d = np.random.default_rng(0).standard_normal(act.shape)
    fd = T.directional_fd(lambda p: softmax_xent(ev.run(["logits"], p)[0], labels), {cut: act}, {cut: d}, 1e-6)
    assert T.rel_err(fd, float(np.sum(res.grads[cut] * d)), 0.0) <= TOL


# ------------------------------------------------------------- real models
def _shared(name: str) -> Path:
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not available (needs ../shared/data)")
    return path


def _pick_weights(model: onnx.ModelProto) -> list[str]:
    """First conv weight, a depthwise/middle conv weight, the last weight and bias."""
    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits]
    dw = [n for n in convs if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    picks = [convs[0].input[1], (dw[len(dw) // 2] if dw else convs[len(convs) // 2]).input[1],
             convs[-1].input[1]]
    if len(convs[-1].input) > 2 and convs[-1].input[2] in inits:
        picks.append(convs[-1].input[2])
    return list(dict.fromkeys(picks))


REAL = [
    pytest.param("cifar10_resnet20", 32, marks=pytest.mark.shared_data),
    pytest.param("cifar10_resnet56", 32, marks=pytest.mark.shared_data),
    pytest.param("mobilenet_v2", 224, marks=pytest.mark.shared_data),
    pytest.param("mobilenet_v3_small", 224, marks=pytest.mark.shared_data),
]


@pytest.mark.parametrize("name,hw", REAL)
def test_real_model_directional_derivative(name, hw):
    model = onnx.load(str(_shared(name)))
    model = onnx.version_converter.convert_version(model, 17)  # what the compiler does first
    model.ir_version = 8
    model64 = convert_float_type(model, np.float64)
    rng = np.random.default_rng(0)
    n = 2
    x = rng.uniform(-1, 1, size=(n, 3, hw, hw))
    ev = T.reference_evaluator(model64)
    logits = ev.run(None, {"input": x})[0]
    labels = rng.integers(0, logits.shape[1], size=n)
    wrt = ["input"] + _pick_weights(model)
    _, res, _ = directional_check(model64, x, labels, wrt, rng, input_name="input")
    # float32 ONNX Runtime gradients of the same graph agree with float64
    gm32 = build_gradient_model(model, wrt, dtype=np.float32)
    r32 = gm32.run(gm32.session(), {"input": x}, labels=labels)
    for w in wrt:
        assert T.norm_rel_diff(r32.grads[w], res.grads[w]) <= 1e-3, w


@pytest.mark.shared_data
def test_gradients_api_on_real_model_path():
    path = _shared("cifar10_resnet20")
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(4, 3, 32, 32)).astype(np.float32)
    g = gradients(str(path), {"input": x}, ["linear.weight", "input"], labels=np.array([1, 2, 3, 4]))
    assert g["linear.weight"].shape == (10, 64) and g["linear.weight"].dtype == np.float32
    assert g["input"].shape == x.shape
    g2 = gradients(str(path), {"input": x}, ["linear.weight", "input"], labels=np.array([1, 2, 3, 4]),
                   batch_size=3)
    for k in g:
        assert T.norm_rel_diff(g2[k], g[k]) <= 1e-5


# -------------------------------------------------------------------- losses
def _mlp(n=6, c=5, seed=0):
    rng = np.random.default_rng(seed)
    p = {"w": rng.standard_normal((4, c)).astype(np.float32), "b": rng.standard_normal(c).astype(np.float32)}
    x = rng.standard_normal((n, 4)).astype(np.float32)
    model = T.make_model([node("MatMul", ["x", "w"], ["h"]), node("Add", ["h", "b"], ["logits"])],
                         {"x": x}, p, ["logits"])
    return model, x, p


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_cross_entropy_matches_closed_form():
    model, x, p = _mlp()
    labels = np.array([0, 1, 2, 3, 4, 0])
    g = gradients(model, {"x": x}, ["b", "w", "logits"], labels=labels)
    z = x.astype(np.float64) @ p["w"] + p["b"]
    dz = (_softmax(z) - np.eye(5)[labels]) / len(labels)
    np.testing.assert_allclose(g["logits"], dz, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g["b"], dz.sum(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g["w"], x.T.astype(np.float64) @ dz, rtol=1e-5, atol=1e-7)


def test_empirical_fisher_uses_argmax_labels():
    model, x, p = _mlp()
    z = x @ p["w"] + p["b"]
    ge = gradients(model, {"x": x}, ["w", "b"], loss="empirical_fisher")
    gc = gradients(model, {"x": x}, ["w", "b"], labels=z.argmax(1))
    for k in ge:
        np.testing.assert_allclose(ge[k], gc[k], rtol=1e-6, atol=1e-8)


def test_true_fisher_samples_from_softmax_deterministically():
    model, x, p = _mlp(n=400, c=4, seed=3)
    gm = build_gradient_model(model, ["b"], loss="true_fisher")
    sess = gm.session()
    u = np.random.default_rng(7).random(400)
    feeds = gm.feeds({"x": x}, rng=np.random.default_rng(7))
    np.testing.assert_allclose(feeds[gm.uniform_input], u.astype(np.float32))
    r = gm.run(sess, {"x": x}, rng=np.random.default_rng(7))
    probs = _softmax((x @ p["w"] + p["b"]).astype(np.float64))
    expect = np.minimum((np.cumsum(probs, axis=1) < u.astype(np.float32)[:, None]).sum(1), 3)
    assert (r.labels == expect).mean() >= 0.99  # float32 cdf vs float64 cdf at the boundaries
    # sampled labels roughly follow the predictive distribution
    assert abs(np.mean(r.labels == probs.argmax(1)) - np.mean(probs.max(1))) < 0.1
    # same seed -> same gradients; another seed -> different ones
    a = gradients(model, {"x": x}, ["b"], loss="true_fisher", seed=11)["b"]
    b = gradients(model, {"x": x}, ["b"], loss="true_fisher", seed=11)["b"]
    c = gradients(model, {"x": x}, ["b"], loss="true_fisher", seed=12)["b"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # the gradient is the cross-entropy gradient at the sampled labels
    gc = gradients(model, {"x": x}, ["b"], labels=r.labels)["b"]
    gt = gm.run(sess, {"x": x}, rng=np.random.default_rng(7)).grads["b"]
    np.testing.assert_allclose(gt, gc, rtol=1e-5, atol=1e-7)


def test_api_validation():
    model, x, _ = _mlp()
    with pytest.raises(ValueError, match="needs labels"):
        gradients(model, {"x": x}, ["w"])
    with pytest.raises(ValueError, match="only used with"):
        gradients(model, {"x": x}, ["w"], labels=np.zeros(6, int), loss="true_fisher")
    with pytest.raises(ValueError, match="unknown loss"):
        gradients(model, {"x": x}, ["w"], loss="mse")


def test_unreached_wrt_gets_zeros_and_activation_gradients():
    model, x, _ = _mlp()
    # add a dangling branch: an initializer used only off the loss path
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "unused"))
    g = gradients(model, {"x": x}, ["unused", "w"], labels=np.zeros(6, int))
    assert np.all(g["unused"] == 0) and g["unused"].shape == (3,)
    ag = activation_gradients(model, {"x": x}, labels=np.zeros(6, int))
    assert set(ag) == {"h"} and ag["h"].shape == (6, 5)


def test_weights_fed_as_inputs_match_initializers():
    """A conv weight fed as a graph input (declared with its static shape, as for training) gets
    the same gradient as the same weight held as an initializer; the conv rule needs its shape
    static, so the declared shape is kept rather than made batch-symbolic."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    x = rng.standard_normal((5, 3, 6, 6)).astype(np.float32)
    nodes = [node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), node("GlobalAveragePool", ["c"], ["p"]),
             node("Flatten", ["p"], ["logits"])]
    as_init = T.make_model(nodes, {"x": x}, {"w": w}, ["logits"])
    as_input = T.make_model(nodes, {"x": x, "w": w}, {}, ["logits"])
    assert [d.dim_value for d in as_input.graph.input[1].type.tensor_type.shape.dim] == [4, 3, 3, 3]
    labels = np.array([0, 1, 2, 3, 0])
    expected = gradients(as_init, {"x": x}, ["w", "x"], labels=labels)
    got = gradients(as_input, {"x": x, "w": w}, ["w", "x"], labels=labels)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-7)
    w2 = w * 0.5  # a second step with new weight values reuses the cached graph
    np.testing.assert_allclose(gradients(as_input, {"x": x, "w": w2}, ["w"], labels=labels)["w"],
                               gradients(T.make_model(nodes, {"x": x}, {"w": w2}, ["logits"]), {"x": x}, ["w"],
                                         labels=labels)["w"], rtol=1e-5, atol=1e-7)


def test_batch_chunks_combine_params_and_activations():
    model, x, _ = _mlp(n=7)
    labels = np.array([0, 1, 2, 3, 4, 0, 1])
    full = gradients(model, {"x": x}, ["w", "h", "x"], labels=labels)
    chunked = gradients(model, {"x": x}, ["w", "h", "x"], labels=labels, batch_size=3)
    for k in full:
        assert chunked[k].shape == full[k].shape
        np.testing.assert_allclose(chunked[k], full[k], rtol=1e-5, atol=1e-7)


def test_loss_matches_numpy_and_is_batch_mean():
    model, x, p = _mlp()
    labels = np.array([4, 3, 2, 1, 0, 0])
    gm = build_gradient_model(model, ["w"])
    r = gm.run(gm.session(), {"x": x}, labels=labels)
    assert abs(r.loss - softmax_xent(x @ p["w"] + p["b"], labels)) < 1e-5
