"""Hypothesis fuzzing of the compiler's input handling: mutated small valid models (and DSL text
when the DSL is present) through ``hqpc.cli.main``.

The contract: exit 0, 1 or 2, never 3 (internal error) and never a traceback; a user error
(exit 2) is exactly one ``hqpc: error:`` line and writes no output file.

Bounded for CI: derandomized, a fixed number of examples, the whole file well under 60 s.
``HQPC_FUZZ_SCALE=N`` multiplies the example counts and switches to random exploration
(bench/fuzz_long.py runs it that way).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from hqpc.cli import main
from tests.conftest import REPO

SCALE = int(os.environ.get("HQPC_FUZZ_SCALE", "1"))
LOG = os.environ.get("HQPC_FUZZ_LOG")  # append "exit<TAB>first stderr line" per example
FUZZ = settings(max_examples=40 * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


# --------------------------------------------------------------------------- seed models
def _model(nodes, inputs, outputs, inits, opset=17):
    model = helper.make_model(helper.make_graph(nodes, "fuzz", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def seed_models() -> list[onnx.ModelProto]:
    rng = np.random.default_rng(0)

    def w(name, *shape, scale=0.5):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    conv_bn = _model([
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["ri"], name="id"),
        helper.make_node("Mul", ["ri", "s"], ["rs"], name="scale"),
        helper.make_node("GlobalAveragePool", ["rs"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ], [_f("x", ["N", 3, 8, 8])], [_f("y", ["N", 5])],
        [w("w", 4, 3, 3, 3), w("b", 4), w("g", 4), w("be", 4), w("m", 4),
         numpy_helper.from_array(np.abs(rng.standard_normal(4)).astype(np.float32) + 0.5, "v"),
         w("s", 1, 4, 1, 1), w("fw", 5, 4), w("fb", 5)])
    residual = _model([
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="r1"),
        helper.make_node("Conv", ["ar", "w2"], ["b"], name="c2", pads=[1, 1, 1, 1], group=4),
        helper.make_node("Add", ["b", "x4"], ["s"], name="add"),
        helper.make_node("Conv", ["x", "wx"], ["x4"], name="proj"),
        helper.make_node("Shape", ["s"], ["sh"], name="shape"),
        helper.make_node("Reshape", ["s", "sh"], ["s2"], name="reshape"),
        helper.make_node("Transpose", ["s2"], ["t"], name="tr", perm=[0, 1, 3, 2]),
        helper.make_node("Concat", ["t", "s2"], ["y"], name="cat", axis=1),
    ], [_f("x", [1, 2, 6, 6])], [_f("y", [1, 8, 6, 6])],
        [w("w1", 4, 2, 3, 3), w("w2", 4, 1, 3, 3), w("wx", 4, 2, 1, 1)])
    residual.graph.node.insert(3, residual.graph.node.pop(4))  # keep the graph sorted
    mlp = _model([
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Dropout", ["hb"], ["hd"], name="drop"),
        helper.make_node("Sigmoid", ["hd"], ["hs"], name="act"),
        helper.make_node("MatMul", ["hs", "w2"], ["o"], name="mm2"),
        helper.make_node("Softmax", ["o"], ["y"], name="softmax", axis=-1),
    ], [_f("x", ["N", 6])], [_f("y", ["N", 3])], [w("w1", 6, 8), w("b1", 8), w("w2", 8, 3)], opset=13)
    return [conv_bn, residual, mlp]


SEEDS = [m.SerializeToString() for m in seed_models()]

# --------------------------------------------------------------------------- mutations
DTYPES = [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT32,
          TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL, TensorProto.STRING, TensorProto.UNDEFINED]
OPS = ["Relu", "Sigmoid", "Identity", "Conv", "Add", "Mul", "Gemm", "MatMul", "Reshape", "Concat", "Transpose",
       "BatchNormalization", "Dropout", "Flatten", "GlobalAveragePool", "Softmax", "Shape", "Frob", ""]
DIMS = st.one_of(st.integers(-2, 12), st.sampled_from(["N", "H", ""]))


def _names(graph) -> list[str]:
    names = [i.name for i in graph.input] + [t.name for t in graph.initializer]
    for node in graph.node:
        names += list(node.output)
    return names + ["ghost", ""]


@st.composite
def structural_mutation(draw, model: onnx.ModelProto) -> str:
    """Apply one random edit to ``model`` in place; return a description."""
    g = model.graph
    kind = draw(st.sampled_from(["drop_node", "dup_node", "rewire", "attr", "dtype", "dims", "op", "opset",
                                 "ir", "init_dims", "init_values", "output", "swap_nodes", "domain"]))
    if not g.node:
        return "empty"
    i = draw(st.integers(0, len(g.node) - 1))
    node = g.node[i]
    if kind == "drop_node":
        del g.node[i]
    elif kind == "dup_node":
        g.node.insert(draw(st.integers(0, len(g.node))), node)
    elif kind == "rewire":
        if node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(_names(g)))
        elif node.output:
            node.output[0] = draw(st.sampled_from(_names(g)))
    elif kind == "attr":
        if node.attribute:
            attr = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            if attr.type == onnx.AttributeProto.INT:
                attr.i = draw(st.integers(-3, 9))
            elif attr.type == onnx.AttributeProto.INTS:
                del attr.ints[:]
                attr.ints.extend(draw(st.lists(st.integers(-2, 6), max_size=6)))
            elif attr.type == onnx.AttributeProto.FLOAT:
                attr.f = draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
            else:
                attr.type = draw(st.sampled_from([onnx.AttributeProto.INT, onnx.AttributeProto.STRING]))
        else:
            name = draw(st.sampled_from(["axis", "pads", "group", "perm", "epsilon", "kernel_shape", "bogus"]))
            value = draw(st.one_of(st.integers(-2, 6), st.lists(st.integers(-1, 5), min_size=1, max_size=5),
                                   st.floats(-2, 2, width=32)))
            node.attribute.append(helper.make_attribute(name, value))
    elif kind == "dtype":
        values = list(g.input) + list(g.output)
        target = draw(st.sampled_from(values + list(g.initializer)))
        dtype = draw(st.sampled_from(DTYPES))
        if isinstance(target, onnx.TensorProto):
            target.data_type = dtype  # raw bytes stay: sizes may no longer match
        else:
            target.type.tensor_type.elem_type = dtype
    elif kind == "dims":
        value = draw(st.sampled_from(list(g.input) + list(g.output)))
        shape = value.type.tensor_type.shape
        new = draw(st.lists(DIMS, max_size=5))
        shape.ClearField("dim")
        for d in new:
            dim = shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif d:
                dim.dim_param = d
    elif kind == "op":
        node.op_type = draw(st.sampled_from(OPS))
    elif kind == "opset":
        model.opset_import[0].version = draw(st.integers(0, 25))
    elif kind == "ir":
        model.ir_version = draw(st.integers(0, 14))
    elif kind == "init_dims" and g.initializer:
        t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        dims = draw(st.lists(st.integers(0, 6), max_size=4))
        del t.dims[:]
        t.dims.extend(dims)
    elif kind == "init_values" and g.initializer:
        t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        if t.data_type == TensorProto.FLOAT and t.raw_data:
            a = np.frombuffer(t.raw_data, np.float32).copy()
            a[draw(st.integers(0, max(a.size - 1, 0)))] = draw(st.floats(width=32, allow_nan=True))
            t.raw_data = a.tobytes()
    elif kind == "output":
        g.output[0].name = draw(st.sampled_from(_names(g)))
    elif kind == "swap_nodes" and len(g.node) > 1:
        j = draw(st.integers(0, len(g.node) - 1))
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(g.node[i])
        b.CopyFrom(g.node[j])
        g.node[i].CopyFrom(b)
        g.node[j].CopyFrom(a)
    elif kind == "domain":
        node.domain = draw(st.sampled_from(["com.microsoft", "ai.onnx.ml", "com.example", "ai.onnx"]))
    return f"{kind} @ node {i}"


@st.composite
def mutated_model(draw) -> bytes:
    model = onnx.ModelProto()
    model.ParseFromString(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        draw(structural_mutation(model))
    return model.SerializeToString()


@st.composite
def flipped_bytes(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


# --------------------------------------------------------------------------- the contract
def check_contract(code: int, out: str, err: str, output: Path, argv) -> None:
    assert code in (0, 1, 2), f"exit {code} for {argv}: {err.strip()}"
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("hqpc: error: "), err
        assert not output.exists(), "output written despite the error"
    else:
        assert output.exists()


def run_model(data: bytes, folder: Path, capsys, extra=()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    path.write_bytes(data)
    output = folder / "out.onnx"
    for stale in (output, folder / "r.json"):
        stale.unlink(missing_ok=True)
    argv = [str(path), "-O1", "-o", str(output), "-q", *extra]
    code = main(argv)
    out, err = capsys.readouterr()
    if LOG:  # exit-code statistics for bench/fuzz_long.py
        with open(LOG, "a", encoding="utf-8") as handle:
            handle.write(f"{code}\t{err.strip().splitlines()[0][:160] if err.strip() else ''}\n")
    check_contract(code, out, err, output, argv)
    assert path.read_bytes() == data, "the input changed"


def test_seed_models_compile(tmp_path, capsys):
    for i, data in enumerate(SEEDS):
        run_model(data, tmp_path / str(i), capsys)
        assert (tmp_path / str(i) / "out.onnx").exists()


@FUZZ
@given(data=flipped_bytes())
def test_fuzz_serialized_bytes(data, tmp_path, capsys):
    run_model(data, tmp_path, capsys)


@settings(FUZZ, max_examples=120 * SCALE)
@given(data=mutated_model(), target=st.sampled_from(["cpu", "orin"]), level=st.sampled_from(["-O1", "-O1", "-O3"]))
def test_fuzz_graph_mutations(data, target, level, tmp_path, capsys):
    run_model(data, tmp_path, capsys, extra=("--target", target, level))


# --------------------------------------------------------------------------- DSL text
def _dsl_available() -> bool:
    try:
        import hqpc.dsl.cli  # noqa: F401
    except Exception:
        return False
    return True


RULE_FILES = sorted((REPO / "spec" / "rules").glob("*.hqp"))


@st.composite
def mutated_rule_text(draw) -> str:
    text = draw(st.sampled_from(RULE_FILES)).read_text(encoding="utf-8")
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "truncate", "dup_line"]))
        pos = draw(st.integers(0, max(len(text) - 1, 0)))
        if kind == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 12)):]
        elif kind == "insert":
            text = text[:pos] + draw(st.sampled_from(["(", ")", "{", "}", "=>", ",", ":", "$x", "\"", "#", "\n",
                                                      "Conv", "where", "0", "-1e309", "\x00", "é"])) + text[pos:]
        elif kind == "replace":
            text = text[:pos] + draw(st.text(max_size=6)) + text[pos + 1:]
        elif kind == "truncate":
            text = text[:pos]
        else:
            lines = text.splitlines(True)
            if lines:
                k = draw(st.integers(0, len(lines) - 1))
                text = "".join(lines[:k + 1] + lines[k:])
    return text


@pytest.mark.skipif(not _dsl_available() or not RULE_FILES, reason="hqpc.dsl (hqpc rules check) not present")
@settings(FUZZ, max_examples=80 * SCALE)
@given(text=mutated_rule_text())
def test_fuzz_rule_text(text, tmp_path, capsys):
    path = tmp_path / "r.hqp"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    code = main(["rules", "check", str(path)])
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), f"exit {code}: {err.strip()}"
    assert "Traceback" not in err + out and "internal error" not in err + out, err


# --------------------------------------------------------------------------- regressions found by fuzzing
def all_nan_model() -> onnx.ModelProto:
    """y = Identity(Sqrt(-|x| - 1)): every output is NaN for every input; eliminate-identity
    changes the graph, so the numeric guard compares all-NaN outputs."""
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    return _model([
        helper.make_node("Abs", ["x"], ["a"], name="abs"),
        helper.make_node("Neg", ["a"], ["n"], name="neg"),
        helper.make_node("Sub", ["n", "one"], ["s"], name="sub"),
        helper.make_node("Sqrt", ["s"], ["r"], name="sqrt"),
        helper.make_node("Identity", ["r"], ["y"], name="id"),
    ], [_f("x", ["N", 4])], [_f("y", ["N", 4])], [one])


def test_all_nan_outputs_do_not_crash_the_guard(tmp_path, capsys):
    """Found by fuzzing: every output NaN in both models left nothing to compare, and the guard raised."""
    run_model(all_nan_model().SerializeToString(), tmp_path, capsys)
    out = onnx.load(tmp_path / "out.onnx")  # compiled (exit 0), the guard passed: the Identity is gone
    assert "Identity" not in [n.op_type for n in out.graph.node]
