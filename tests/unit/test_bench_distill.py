"""bench/bench_distill.py's KD loss graph: its value is −T²·mean_n Σ_c p_c·log q_c (the KL of the
softened outputs up to the teacher's entropy), and hqpc.gradients of it w.r.t. weights fed as graph inputs matches central
finite differences (float64 numpy forward)."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from hqpc.passes.gradients import gradients
from hqpc.runtime import ort as ort_rt
from tests.conftest import REPO


def _module():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_distill", REPO / "bench" / "bench_distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _linear_model(w: np.ndarray, b: np.ndarray):
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", w.shape[0]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _kd_numpy(w, b, x, p, t):
    z = (x.astype(np.float64) @ w.T.astype(np.float64) + b) / t
    logq = z - z.max(1, keepdims=True)
    logq = logq - np.log(np.exp(logq).sum(1, keepdims=True))
    return -t * t * float(np.mean((p * logq).sum(1)))


def test_kd_loss_value_and_gradients():
    distill = _module()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    p = rng.dirichlet(np.ones(5), size=6).astype(np.float32)
    t = 4.0
    loss_model, names = distill.with_kd_loss(_linear_model(w, b), t)
    assert sorted(names) == ["b", "w"] and not set(names) & {i.name for i in loss_model.graph.initializer}
    feeds = {"x": x, "teacher_p": p, "w": w, "b": b}
    value = ort_rt.session(loss_model, 1, "all").run(None, feeds)[0]
    assert abs(float(value) - _kd_numpy(w, b, x, p, t)) <= 1e-5 * max(1.0, abs(float(value)))
    grads = gradients(loss_model, feeds, names, loss="scalar")
    eps = 1e-4
    for name, array in (("w", w), ("b", b)):
        numeric = np.zeros(array.shape)
        for idx in np.ndindex(array.shape):
            hi, lo = array.astype(np.float64), array.astype(np.float64)
            hi[idx] += eps
            lo[idx] -= eps
            args = {"w": w, "b": b, name: hi}
            up = _kd_numpy(args["w"], args["b"], x, p, t)
            args[name] = lo
            numeric[idx] = (up - _kd_numpy(args["w"], args["b"], x, p, t)) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-3, atol=1e-5)


def test_augment_keeps_shape_and_content():
    distill = _module()
    x = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    out = distill.augment(x, np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    for i in range(2):  # every output pixel comes from its own image's reflect-padded copy
        assert set(np.unique(out[i])) <= set(np.unique(x[i]))
