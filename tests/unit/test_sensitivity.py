"""annotate-sensitivity: the Fisher channel scores and the per-tensor quantization sensitivities
against an independent numpy computation (per-sample gradients from ``gradients()`` with
batches of one sample), precision ordering, streaming invariance, the annotation / metadata /
report contract, the CLI's summary lines and the progress helper."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import hqpc
from hqpc.cli import main
from hqpc.errors import PipelineError
from hqpc.ir import Model
from hqpc.passmanager import PassContext
from hqpc.passes.gradients import gradients
from hqpc.passes.sensitivity import AnnotateSensitivity, find_layers, parse_precisions
from hqpc.runtime import ort as ort_rt
from hqpc.runtime import quant as Q
from hqpc.runtime.data import DataSpec
from hqpc.runtime.progress import enabled, progress
from hqpc.target import load_target

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits"
N = 12  # samples of the generated data sets


# --------------------------------------------------------------------------- fixtures
def _model(nodes, inits, x_shape, classes=5, name="g"):
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def cnn_gemm(seed=0):
    """Conv(3x3) -> Relu -> Conv(3x3, stride 2) -> Relu -> Conv(1x1) -> Relu -> depthwise Conv(3x3)
    -> GAP -> Flatten -> Gemm(transB): every weight path of the pass (stacked deltas, per-sample
    1x1 weight gradient, one node per precision)."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((4, 3, 3, 3)) * 0.4, "b1": rng.standard_normal(4) * 0.1,
             "w2": rng.standard_normal((6, 4, 3, 3)) * 0.3, "b2": rng.standard_normal(6) * 0.1,
             "w3": rng.standard_normal((6, 6, 1, 1)) * 0.5, "b3": rng.standard_normal(6) * 0.1,
             "wd": rng.standard_normal((6, 1, 3, 3)) * 0.5,
             "wf": rng.standard_normal((5, 6)) * 0.8, "bf": rng.standard_normal(5) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], "conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], "conv3"),
             helper.make_node("Relu", ["c3"], ["r3"], "relu3"),
             helper.make_node("Conv", ["r3", "wd"], ["cd"], "dw", group=6, pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["cd"], ["gap"], "gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], "flatten"),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], "fc", transB=1)]
    return _model(nodes, inits, (3, 8, 8))


def mlp_matmul(seed=1):
    """MatMul(8x40) -> Add -> Relu -> MatMul(40x5): MatMul weights, INT4 block-wise (K=40)."""
    rng = np.random.default_rng(seed)
    inits = {"m1": rng.standard_normal((8, 40)) * 0.4, "a1": rng.standard_normal(40) * 0.1,
             "m2": rng.standard_normal((40, 5)) * 0.3}
    nodes = [helper.make_node("MatMul", ["x", "m1"], ["h"], "mm1"),
             helper.make_node("Add", ["h", "a1"], ["ha"], "add1"),
             helper.make_node("Relu", ["ha"], ["hr"], "relu"),
             helper.make_node("MatMul", ["hr", "m2"], ["logits"], "mm2")]
    return _model(nodes, inits, (8,))


def npz_spec(tmp_path: Path, x_shape, n=N, seed=0, name="data") -> Path:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *x_shape)).astype(np.float32)
    y = rng.integers(0, 5, n).astype(np.int64)
    np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    toml = tmp_path / f"{name}.toml"
    toml.write_text(f'[data]\nnpz = "{name}.npz"\n[split]\nseed = 0\ncalib = {n}\neval = 0\n')
    return toml


def run_pass(proto, spec: Path | None, seed=0, **options) -> dict:
    model = Model.load(proto)
    ctx = PassContext(data=DataSpec.load(spec) if spec else None, seed=seed, target=load_target("cpu"))
    before = model.proto.SerializeToString()
    assert AnnotateSensitivity(**options).run(model, ctx) is False
    assert model.proto.SerializeToString() == before  # analysis only
    return model.annotations["sensitivity"]


def calib_arrays(spec: Path):
    data = DataSpec.load(spec)
    return data.split("calib").arrays()


def activations(proto, x, names):
    return ort_rt.run(ort_rt.with_outputs(proto, list(names)), {"x": x})


def per_sample_grads(proto, x, y, wrt):
    """{name: [g_n]}: gradient of each sample's own loss (batches of ONE sample)."""
    inits = {t.name for t in proto.graph.initializer}
    out = {w: [] for w in wrt}
    for n in range(len(x)):
        g = gradients(proto, {"x": x[n:n + 1]}, list(wrt), labels=y[n:n + 1])
        for w in wrt:
            out[w].append(g[w] if w in inits else g[w][0])
    return {w: np.stack(v).astype(np.float64) for w, v in out.items()}


def reference(proto, spec, weight_deltas):
    """Independent numpy computation of every channel score and tensor sensitivity."""
    x, y = calib_arrays(spec)
    proto = Model.load(proto).proto
    layers = find_layers(proto.graph)
    acts = sorted({a for layer in layers for a in layer.acts})
    outs = [layer.output for layer in layers]
    weights = {layer.weight: layer for layer in layers}
    grads = per_sample_grads(proto, x, y, set(outs) | set(acts) | set(weights))
    values = activations(proto, x, set(outs) | set(acts) - {"x"})
    values["x"] = x
    channels = {}
    for layer in layers:
        if layer.node.op_type in ("Conv", "Gemm"):
            a = values[layer.output].astype(np.float64)
            g = grads[layer.output]
            r = (a * g).reshape(a.shape[0], a.shape[1], -1).sum(axis=2)
            channels[layer.name] = 0.5 * np.mean(r ** 2, axis=0)
    tensors = {}
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for wname, layer in weights.items():
        tensors[wname] = {}
        for p, delta in weight_deltas(wname, inits[wname]).items():
            r = (grads[wname] * delta.astype(np.float64)).reshape(len(x), -1).sum(axis=1)
            tensors[wname][p] = 0.5 * np.mean(r ** 2)
    for name in acts:
        a = values[name].astype(np.float32)
        lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
        tensors[name] = {}
        for p in ("int4", "int8", "fp16"):
            if p == "fp16":
                delta = Q.fp16_round(a) - a
            else:
                grid = "uint8" if p == "int8" else "uint4"  # cpu target: asymmetric activations
                scale, zero = Q.qparams_from_range(lo, hi, grid, symmetric=False)
                delta = Q.fake_quant(a, scale, zero, grid) - a
            r = (grads[name] * delta.astype(np.float64)).reshape(len(x), -1).sum(axis=1)
            tensors[name][p] = 0.5 * np.mean(r ** 2)
    return channels, tensors


def assert_close(got, want, rtol=2e-3):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max()), 1e-30)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale * 1e-2)


# --------------------------------------------------------------------------- the formulas
def test_fisher_scores_and_tensor_sensitivity_match_numpy_cnn(tmp_path):
    proto = cnn_gemm()
    spec = npz_spec(tmp_path, (3, 8, 8))

    def deltas(name, w):  # per output channel (Conv axis 0, Gemm transB=1 axis 0), MSE clipping
        return {p: Q.weight_quant(w, 0, p).dequantized() - w for p in ("int4", "int8")} | \
            {"fp16": Q.fp16_round(w) - w}

    got = run_pass(proto, spec)
    channels, tensors = reference(proto, spec, deltas)
    assert got["samples"] == N and got["loss"] == "cross_entropy"
    assert set(got["channels"]) == {"conv1", "conv2", "conv3", "dw", "fc"}
    for node, want in channels.items():
        assert len(got["channels"][node]) == len(want)
        assert_close(got["channels"][node], want)
    assert set(got["tensors"]) == {"w1", "w2", "w3", "wd", "wf", "x", "r1", "r2", "r3", "flat"}
    for name, want in tensors.items():
        for p in ("int4", "int8", "fp16"):
            assert_close(got["tensors"][name][p], want[p])


def saturating_cnn(seed=3):
    """Conv -> Clip(0, 6) -> Conv(1x1) -> x·HardSigmoid(x) -> depthwise Conv -> Clip(1, 6) ->
    Conv(1x1) -> (Add with its own Clip input: two readers) -> GAP -> Flatten -> Gemm. Scaled so
    the ReLU6 saturates for part of the samples."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((4, 3, 3, 3)) * 2.0, "b1": rng.standard_normal(4) + 2.0,
             "w2": rng.standard_normal((6, 4, 1, 1)) * 0.6, "b2": rng.standard_normal(6) * 0.3,
             "wd": rng.standard_normal((6, 1, 3, 3)) * 0.5, "bd": rng.standard_normal(6) * 0.1,
             "w3": rng.standard_normal((6, 6, 1, 1)) * 0.5, "b3": rng.standard_normal(6) * 0.1,
             "lo": np.array(0.0), "hi": np.array(6.0), "one": np.array(1.0),
             "wf": rng.standard_normal((5, 6)) * 0.8, "bf": rng.standard_normal(5) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], "relu6"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], "conv2"),
             helper.make_node("HardSigmoid", ["c2"], ["hs"], "hsig", alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["c2", "hs"], ["h2"], "hswish"),
             helper.make_node("Conv", ["h2", "wd", "bd"], ["cd"], "dw", group=6, pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["cd", "one", "hi"], ["rd"], "clip16"),
             helper.make_node("Conv", ["rd", "w3", "b3"], ["c3"], "conv3"),
             helper.make_node("Add", ["c3", "rd"], ["s3"], "add"),
             helper.make_node("GlobalAveragePool", ["s3"], ["gap"], "gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], "flatten"),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], "fc", transB=1)]
    return _model(nodes, inits, (3, 8, 8))


def test_channel_score_is_measured_after_zero_preserving_activations(tmp_path):
    """a = the tensor that zeroing the channel's weights and bias sets to zero, as far down as
    that is exact: after Clip(0, 6) and x·HardSigmoid(x); not after Clip(1, 6) (f(0) = 1) and
    not past a tensor with two readers. The scores equal numpy's ½E[(Σ_spatial a·g)²] there."""
    from hqpc.graphutil import GraphIndex
    from hqpc.passes.sensitivity import channel_tensor

    proto = saturating_cnn()
    index = GraphIndex.build(proto.graph)
    where = {layer.name: channel_tensor(index, layer) for layer in find_layers(proto.graph)}
    assert where == {"conv1": "r1", "conv2": "h2", "dw": "cd", "conv3": "c3", "fc": "logits"}
    spec = npz_spec(tmp_path, (3, 8, 8))
    x, y = calib_arrays(spec)
    got = run_pass(proto, spec, precisions="fp16")
    assert {k: v["scored"] for k, v in got["method"]["layers"].items()} == where
    grads = per_sample_grads(proto, x, y, set(where.values()))
    values = activations(proto, x, set(where.values()) | {"c1"})
    pre = per_sample_grads(proto, x, y, {"c1"})["c1"]
    c1 = values["c1"].astype(np.float64)
    assert (c1 > 6).any()  # the ReLU6 saturates for part of the samples
    for node, name in where.items():
        a = values[name].astype(np.float64)
        r = (a * grads[name]).reshape(len(x), a.shape[1], -1).sum(axis=2)
        assert_close(got["channels"][node], 0.5 * np.mean(r ** 2, axis=0))
    # measured before the ReLU6 the saturated samples would be missing: the scores differ
    r_pre = (c1 * pre).reshape(len(x), 4, -1).sum(axis=2)
    assert not np.allclose(got["channels"]["conv1"], 0.5 * np.mean(r_pre ** 2, axis=0), rtol=1e-2)
    # zeroing conv1's channel 0 and conv2's channel 1 (weights and bias) zeroes exactly those channels of r1 / h2
    m = Model.load(proto).proto
    for t in m.graph.initializer:
        if t.name in ("w1", "b1", "w2", "b2"):
            v = numpy_helper.to_array(t).copy()
            v[0 if t.name.endswith("1") else 1] = 0
            t.CopyFrom(numpy_helper.from_array(v, t.name))
    zeroed = activations(m, x, ["r1", "h2"])
    assert not np.any(zeroed["r1"][:, 0]) and not np.any(zeroed["h2"][:, 1])
    assert np.any(zeroed["r1"][:, 1:]) and np.any(zeroed["h2"][:, 0])


def test_matmul_weights_blockwise_int4_match_numpy(tmp_path):
    proto = mlp_matmul()
    spec = npz_spec(tmp_path, (8,))

    def deltas(name, w):  # INT4 block-wise along K (block 32, 16 for K < 32), INT8 per output column
        block = 32 if w.shape[0] >= 32 else 16
        return {"int4": Q.weight_quant(w, 0, "int4", block_size=block, grid=False).dequantized() - w,
                "int8": Q.weight_quant(w, 1, "int8").dequantized() - w,
                "fp16": Q.fp16_round(w) - w}

    got = run_pass(proto, spec)
    _, tensors = reference(proto, spec, deltas)
    assert got["channels"] == {}  # MatMul: no channel scores
    assert set(got["tensors"]) == {"m1", "m2", "x", "hr"}
    for name, want in tensors.items():
        for p in ("int4", "int8", "fp16"):
            assert_close(got["tensors"][name][p], want[p])


def test_streaming_equals_one_batch(tmp_path):
    proto = cnn_gemm(seed=3)
    spec = npz_spec(tmp_path, (3, 8, 8), n=20)
    one = run_pass(proto, spec, batch=20)
    streamed = run_pass(proto, spec, batch=3)
    for node in one["channels"]:
        assert_close(streamed["channels"][node], one["channels"][node], rtol=1e-4)
    for name in one["tensors"]:
        for p in ("int4", "int8", "fp16"):
            assert_close(streamed["tensors"][name][p], one["tensors"][name][p], rtol=1e-4)
    assert streamed["method"]["activation_ranges"] == one["method"]["activation_ranges"]


def test_true_fisher_is_seeded_and_empirical_fisher_needs_no_labels(tmp_path):
    proto = cnn_gemm()
    spec = npz_spec(tmp_path, (3, 8, 8))
    a = run_pass(proto, spec, loss="true_fisher", seed=1)
    b = run_pass(proto, spec, loss="true_fisher", seed=1)
    c = run_pass(proto, spec, loss="true_fisher", seed=2)
    assert a["loss"] == "true_fisher" and a["channels"] == b["channels"] and a["tensors"] == b["tensors"]
    assert a["channels"] != c["channels"]
    assert run_pass(proto, spec, loss="empirical_fisher")["loss"] == "empirical_fisher"


def test_random_inputs_without_data(tmp_path):
    got = run_pass(cnn_gemm(), None, samples=5)
    assert got["loss"] == "empirical_fisher" and got["samples"] == 5
    assert got["method"]["source"].startswith("random")
    with pytest.raises(PipelineError, match="needs labeled"):
        run_pass(cnn_gemm(), None, loss="cross_entropy")


def test_options(tmp_path):
    spec = npz_spec(tmp_path, (3, 8, 8))
    got = run_pass(cnn_gemm(), spec, precisions="int8+fp16", samples=4)
    assert got["samples"] == 4 and got["method"]["precisions"] == ["int8", "fp16"]
    assert all(set(v) == {"int8", "fp16"} for v in got["tensors"].values())
    assert parse_precisions("fp16,int4") == ("int4", "fp16")
    with pytest.raises(PipelineError):
        parse_precisions("int2")
    with pytest.raises(PipelineError):
        run_pass(cnn_gemm(), spec, loss="hinge")
    full = run_pass(cnn_gemm(), spec)
    channels_only = run_pass(cnn_gemm(), spec, tensors=False)
    assert channels_only["tensors"] == {} and channels_only["channels"].keys() == full["channels"].keys()
    for node in full["channels"]:
        assert_close(channels_only["channels"][node], full["channels"][node], rtol=1e-4)


def test_same_input_same_annotation(tmp_path):
    spec = npz_spec(tmp_path, (3, 8, 8), n=20)
    a, b = run_pass(cnn_gemm(), spec, batch=8), run_pass(cnn_gemm(), spec, batch=8)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # no timings in the annotation


def test_model_without_classifier_output_is_skipped_with_a_note():
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], "c"), helper.make_node("ReduceSum", ["y"], ["s"], "r", keepdims=0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.ones((3, 2, 1, 1), np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model, messages = Model.load(proto), []
    assert AnnotateSensitivity().run(model, PassContext(log=messages.append)) is False
    assert "sensitivity" not in model.annotations
    assert any("skipped" in m and "rank >= 2" in m for m in messages)


# --------------------------------------------------------------------------- digits model
@pytest.fixture(scope="module")
def digits_result():
    result = hqpc.compile(str(DIGITS / "digits_cnn.onnx"), pipeline="annotate-sensitivity{samples=48}",
                          data=str(DIGITS / "digits.toml"))
    return result


def test_digits_precision_ordering(digits_result):
    tensors = digits_result.model.annotations["sensitivity"]["tensors"]
    assert tensors
    for name, v in tensors.items():
        assert v["int4"] > v["int8"] > v["fp16"] >= 0, (name, v)


def test_digits_annotation_metadata_and_report(digits_result, tmp_path):
    model = digits_result.model
    ann = model.annotations["sensitivity"]
    assert {"channels", "tensors", "loss", "samples", "method"} <= set(ann)
    assert ann["samples"] == 48 and ann["loss"] == "cross_entropy"
    proto = model.proto
    inits = {t.name: t for t in proto.graph.initializer}
    want_tensors = set()
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            w = inits[node.input[1]]
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            out_channels = w.dims[0] if node.op_type == "Conv" or trans_b else w.dims[1]
            assert len(ann["channels"][node.name]) == out_channels
            assert all(s >= 0 for s in ann["channels"][node.name])
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            want_tensors.update(n for n in node.input[:2] if n)
    assert set(ann["tensors"]) == want_tensors
    # metadata hqpc.sensitivity round-trips; the report carries the same table
    props = {p.key: p.value for p in model.to_proto().metadata_props}
    assert json.loads(props["hqpc.sensitivity"])["channels"] == json.loads(json.dumps(ann["channels"]))
    report = digits_result.report
    assert report["annotations"]["sensitivity"]["tensors"].keys() == ann["tensors"].keys()
    record = next(p for p in report["passes"] if p["name"] == "annotate-sensitivity")
    assert record["ran"] and not record["modified"] and not record["rolled_back"]
    assert ann["summary"]["int8_most"] and ann["summary"]["channel_least"]


def test_cli_prints_most_and_least_sensitive_layers(tmp_path, capsys):
    report = tmp_path / "r.json"
    code = main([str(DIGITS / "digits_cnn.onnx"), "--pipeline=annotate-sensitivity", "--data",
                 str(DIGITS / "digits.toml"), "--report", str(report), "-o", str(tmp_path / "out.onnx")])
    assert code == 0
    err = capsys.readouterr().err
    assert "annotate-sensitivity:" in err and "150 samples" in err
    assert "most sensitive by INT8 weight sensitivity" in err and "least sensitive by INT8" in err
    assert "most sensitive by mean Fisher channel score" in err
    data = json.loads(report.read_text())
    assert data["annotations"]["sensitivity"]["samples"] == 150
    saved = Model.load(tmp_path / "out.onnx")
    assert saved.annotations["sensitivity"]["channels"] == data["annotations"]["sensitivity"]["channels"]


# --------------------------------------------------------------------------- progress helper
class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_silent_unless_tty_and_verbose(monkeypatch):
    monkeypatch.delenv("HQPC_NO_PROGRESS", raising=False)
    quiet = PassContext(config={"verbosity": 0})
    normal = PassContext(config={"verbosity": 1})
    for tty, ctx, drawn in ((False, normal, False), (True, quiet, False), (True, normal, True), (True, None, True)):
        stream = _Stream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        assert enabled(ctx) is drawn
        assert list(progress(iter(range(5)), 5, "work", ctx)) == list(range(5))
        assert bool(stream.getvalue()) is drawn
    monkeypatch.setenv("HQPC_NO_PROGRESS", "1")
    assert enabled(normal, _Stream(True)) is False


def test_progress_early_exit_closes_the_bar(monkeypatch):
    monkeypatch.delenv("HQPC_NO_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", _Stream(True))
    gen = progress(range(100), 100, "work", None)
    assert next(gen) == 0
    gen.close()  # no exception, the bar is stopped
    assert list(progress([], 0, "empty", None)) == []
