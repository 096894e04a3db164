#!/usr/bin/env python3
"""Generate the bad-input corpus under tests/bad_inputs/ (deterministically).

    python tools/make_bad_inputs.py            # (re)write tests/bad_inputs/
    python tools/make_bad_inputs.py --check    # exit 1 if the files on disk differ from what this writes

Every case is listed in ``tests/bad_inputs/EXPECTED.toml``: the CLI arguments, the expected exit
code (2 for bad input, 0 where the input is legal and must compile correctly) and substrings
that the one-line error message must contain. ``tests/hardening/test_bad_inputs.py`` runs them.

Placeholders in ``args``: ``{corpus}`` is the corpus folder (the test runs on a copy of it),
``{out}`` an empty folder for outputs. Unless a case sets ``own_output = true`` the test adds
``-o {out}/out.onnx --report {out}/report.json``.

All files are small (a few KB); models are built with ir_version 8 (ONNX Runtime 1.31 refuses
the IR version 14 that onnx>=1.23 writes by default) unless the case is about the IR version.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "bad_inputs"
ESCAPE = "../" * 24 + "etc/passwd"  # enough ../ to reach / from any checkout depth


@dataclass
class Case:
    id: str
    args: list[str]
    exit: int
    message: list[str] = field(default_factory=list)  # substrings of the single stderr line (exit 2)
    note: str = ""
    own_output: bool = False
    xfail: str = ""  # known gap: the reason (the test marks the case xfail, strict)


# --------------------------------------------------------------------------- model builders
def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _model(nodes, inputs, outputs, inits, opset: int = 17, ir: int = 8, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="make_bad_inputs")
    model.ir_version = ir
    return model


def _x(shape=("N", 3, 8, 8)):
    return helper.make_tensor_value_info("x", TP.FLOAT, list(shape))


def _y(shape=("N", 5)):
    return helper.make_tensor_value_info("y", TP.FLOAT, list(shape))


def ok_model(batch="N", opset: int = 17) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y[N,5].

    -O1 changes it (BatchNormalization folding), so the numeric guard runs and reads calibration data."""
    rng = _rng(0)
    inits = [
        _init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3),
        _init("b", rng.standard_normal(4).astype(np.float32) * 0.1),
        _init("gamma", (1 + 0.1 * rng.standard_normal(4)).astype(np.float32)),
        _init("beta", (0.1 * rng.standard_normal(4)).astype(np.float32)),
        _init("mean", (0.1 * rng.standard_normal(4)).astype(np.float32)),
        _init("var", (1 + 0.1 * rng.random(4)).astype(np.float32)),
        _init("fc_w", rng.standard_normal((5, 4)).astype(np.float32) * 0.5),
        _init("fc_b", rng.standard_normal(5).astype(np.float32) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, [_x((batch, 3, 8, 8))], [_y((batch, 5))], inits, opset=opset)


def _edit(model: onnx.ModelProto, fn) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    fn(out)
    return out


def _set_init(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(_init(name, array))
            return
    raise KeyError(name)


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _ser(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def _external(model: onnx.ModelProto, location: str, data_file: str | None) -> dict[str, bytes]:
    """Model bytes plus one external data file holding every initializer with >= 4 elements."""
    model = _edit(model, lambda m: None)
    blob = bytearray()
    for t in model.graph.initializer:
        if int(np.prod(t.dims)) < 4:
            continue
        raw = numpy_helper.to_array(t).tobytes()
        offset = len(blob)
        blob += raw
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = TP.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    files = {"model.onnx": _ser(model)}
    if data_file is not None:
        files[data_file] = bytes(blob)
    return files


def _bmp(seed: int, size=(8, 8)) -> bytes:
    from PIL import Image

    pixels = _rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="BMP")
    return buffer.getvalue()


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An npz archive with fixed timestamps (numpy.savez stamps the current time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buffer.getvalue()


# --------------------------------------------------------------------------- the corpus
def build() -> tuple[dict[str, bytes], list[Case]]:
    files: dict[str, bytes] = {}
    cases: list[Case] = []
    ok = ok_model()
    files["ok.onnx"] = _ser(ok)

    def model_case(name: str, content: bytes | onnx.ModelProto, exit: int, message=(), note="", args=(), xfail=""):
        files[f"models/{name}"] = content if isinstance(content, bytes) else _ser(content)
        needles = [name, *message] if exit == 2 else list(message)
        cases.append(Case(name.rsplit(".", 1)[0], [f"{{corpus}}/models/{name}", *args], exit, needles, note,
                          xfail=xfail))

    # ---- files that are not ONNX
    model_case("not_onnx.onnx", b"GIF89a this is not a protobuf \x00\xff\xfe\x80\x81" * 3, 2,
               ["not an ONNX model"], "arbitrary bytes")
    model_case("empty.onnx", b"", 2, ["empty file"])
    full = _ser(ok)
    model_case("truncated.onnx", full[: len(full) // 2], 2, ["not an ONNX model"], "first half of ok.onnx")
    model_case("truncated_tail.onnx", full[:-7], 2, ["not an ONNX model"], "ok.onnx minus its last 7 bytes")
    model_case("no_nodes.onnx", _edit(ok, lambda m: m.graph.ClearField("node")), 2, ["no graph nodes"])
    files["models/a_folder.onnx/README"] = b"a folder named like a model\n"
    cases.append(Case("a_folder", ["{corpus}/models/a_folder.onnx"], 2, ["a_folder.onnx", "is a folder"]))
    cases.append(Case("no_such_model", ["{corpus}/models/no_such_model.onnx"], 2,
                      ["no_such_model.onnx", "no such file"]))

    # ---- broken graphs
    def cycle(m):
        _node(m, "conv").input[0] = "r"  # conv reads relu's output, relu (via bn) reads conv's
    model_case("cycle.onnx", _edit(ok, cycle), 2, ["graph has a cycle", "node 'conv' (Conv)", "node 'relu' (Relu)"])

    def unsorted(m):
        nodes = list(m.graph.node)
        del m.graph.node[:]
        m.graph.node.extend(reversed(nodes))
    model_case("unsorted_nodes.onnx", _edit(ok, unsorted), 0, [],
               "legal apart from node order: sorted topologically, compiles")
    model_case("dangling_input.onnx", _edit(ok, lambda m: _node(m, "relu").input.__setitem__(0, "ghost")), 2,
               ["node 'relu' (Relu) reads tensor 'ghost'", "no node, graph input or initializer"])

    def drop_w(m):
        keep = [t for t in m.graph.initializer if t.name != "w"]
        m.graph.ClearField("initializer")
        m.graph.initializer.extend(keep)
    model_case("missing_initializer.onnx", _edit(ok, drop_w), 2, ["node 'conv' (Conv) reads tensor 'w'"])
    model_case("undefined_graph_output.onnx", _edit(ok, lambda m: setattr(m.graph.output[0], "name", "nope")), 2,
               ["Graph output 'nope'"])

    def dup_output(m):
        _node(m, "relu").output[0] = "c"
        _node(m, "pool").input[0] = "c"
    model_case("duplicate_output.onnx", _edit(ok, dup_output), 2,
               ["duplicate tensor name 'c'", "node 'conv' (Conv)", "node 'relu' (Relu)"])
    model_case("duplicate_initializer.onnx", _edit(ok, lambda m: m.graph.initializer.append(m.graph.initializer[1])),
               2, ["duplicate tensor name 'b'", "defined twice"])

    def shadow_input(m):
        _node(m, "relu").output[0] = "x"
        _node(m, "pool").input[0] = "x"
    model_case("output_shadows_input.onnx", _edit(ok, shadow_input), 2,
               ["duplicate tensor name 'x'", "graph input 'x'", "node 'relu'"])

    # ---- ops and opsets
    def frob(m, domain="com.example.frob", import_it=True):
        m.graph.node.append(helper.make_node("Frob", ["y"], ["z"], name="frob", domain=domain))
        m.graph.output[0].name = "z"
        if import_it and domain:
            m.opset_import.append(helper.make_opsetid(domain, 1))
    model_case("unknown_domain.onnx", _edit(ok, frob), 2, ["node 'frob' (Frob)", "unknown op domain 'com.example.frob'"])
    model_case("unknown_domain_not_imported.onnx", _edit(ok, lambda m: frob(m, import_it=False)), 2,
               ["No opset import for domain 'com.example.frob'", "frob"])
    model_case("unknown_op.onnx", _edit(ok, lambda m: frob(m, domain="")), 2, ["No Op registered for Frob"])
    model_case("opset7.onnx", ok_model(batch=1, opset=7), 0, [], "legal: upgraded to opset 17")

    def ir3(m):  # IR 3: every initializer is also a graph input
        m.ir_version = 3
        m.opset_import[0].version = 9
        for t in m.graph.initializer:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    model_case("ir3_opset9.onnx", _edit(ok_model(batch=1, opset=9), ir3), 0, [],
               "legal: IR 3 (initializers listed as inputs), opset 9, like the onnx light zoo")
    model_case("ir14.onnx", _edit(ok, lambda m: setattr(m, "ir_version", 14)), 0, [],
               "legal: the IR version onnx>=1.23 writes; ONNX Runtime needs <= 10, hqpc lowers it")

    # ---- dims
    model_case("dynamic_batch.onnx", ok, 0, [], "legal: batch dim N")

    def spatial(m):
        m.graph.input[0].CopyFrom(_x(("N", 3, "H", "W")))
    model_case("dynamic_spatial.onnx", _edit(ok, spatial), 0, [], "legal: N, H and W symbolic")
    model_case("unknown_dims.onnx", _edit(ok, lambda m: m.graph.input[0].CopyFrom(
        helper.make_tensor_value_info("x", TP.FLOAT, [None, 3, None, None]))), 0, [], "legal: dims without names")

    # ---- zero-size tensors (legal: ONNX Runtime runs them; the output must match)
    def zero_concat(m):
        m.graph.initializer.append(_init("empty", np.zeros((1, 0, 8, 8), np.float32)))
        m.graph.node.insert(1, helper.make_node("Concat", ["c", "empty"], ["cc"], name="cat", axis=1))
        _node(m, "bn").input[0] = "cc"
    model_case("zero_size_concat.onnx", _edit(ok_model(batch=1), zero_concat), 0, [],
               "legal: concatenating a zero-size initializer")

    def zero_channels(m):
        _set_init(m, "w", np.zeros((0, 3, 3, 3), np.float32))
        for name in ("b", "gamma", "beta", "mean", "var"):
            _set_init(m, name, np.zeros(0, np.float32))
        _set_init(m, "fc_w", np.zeros((5, 0), np.float32))
    model_case("zero_batch.onnx", ok_model(batch=0), 0, [], "legal: a static batch of 0 (ONNX Runtime runs it)")
    model_case("zero_channels_unrunnable.onnx", _edit(ok, zero_channels), 2, ["ONNX Runtime cannot run"],
               "zero-channel conv: valid ONNX, but ONNX Runtime refuses GlobalAveragePool on 0 channels")
    model_case("conv_kernel_mismatch.onnx", _edit(ok, lambda m: _node(m, "conv").attribute.append(
        helper.make_attribute("kernel_shape", [5, 5]))), 2, ["ONNX Runtime cannot run"],
        "kernel_shape 5x5 on 3x3 weights: passes onnx.checker and shape inference")

    # ---- non-finite weights
    def nan_w(m):
        w = numpy_helper.to_array(m.graph.initializer[0]).copy()
        w[1, 2, 0, 0] = np.nan
        _set_init(m, "w", w)
    model_case("nan_weights.onnx", _edit(ok, nan_w), 2, ["initializer 'w'", "NaN"])

    model_case("negative_variance.onnx", _edit(ok, lambda m: _set_init(m, "var", np.array([1, -0.5, 1, 1], np.float32))),
               2, ["initializer 'var'", "variance of a BatchNormalization", "NaN"], "BatchNormalization var < 0")

    def inf_w(m):
        w = numpy_helper.to_array(_init_of(m, "fc_w")).copy()
        w[0, 0] = np.inf
        _set_init(m, "fc_w", w)
    model_case("inf_weights.onnx", _edit(ok, inf_w), 2, ["initializer 'fc_w'", "Inf"])

    def nan_constant(m):
        m.graph.node.insert(0, helper.make_node("Constant", [], ["k"], name="k",
                                                value=_init("kv", np.array([1.0, np.nan, 2.0, 3.0], np.float32))))
        m.graph.node.insert(5, helper.make_node("Mul", ["p", "kr"], ["pk"], name="scale"))
        m.graph.node.insert(1, helper.make_node("Reshape", ["k", "kshape"], ["kr"], name="kreshape"))
        m.graph.initializer.append(_init("kshape", np.array([1, 4, 1, 1], np.int64)))
        _node(m, "flatten").input[0] = "pk"
    model_case("nan_constant_node.onnx", _edit(ok, nan_constant), 2, ["attribute 'value' of node 'k'", "NaN"])

    def inf_clip(m):  # +inf as a Clip bound is legal
        m.graph.initializer.extend([_init("lo", np.array(-1.0, np.float32)), _init("hi", np.array(np.inf, np.float32))])
        m.graph.node.insert(3, helper.make_node("Clip", ["r", "lo", "hi"], ["rc"], name="clip"))
        _node(m, "pool").input[0] = "rc"
    model_case("inf_clip_bound.onnx", _edit(ok, inf_clip), 0, [], "legal: +inf as a Clip bound")

    # ---- unsupported interface
    def seq_input(m):
        m.graph.input.append(helper.make_tensor_sequence_value_info("s", TP.FLOAT, None))
        m.graph.node.append(helper.make_node("SequenceLength", ["s"], ["n"], name="seqlen"))
        m.graph.output.append(helper.make_tensor_value_info("n", TP.INT64, []))
    model_case("sequence_input.onnx", _edit(ok, seq_input), 2, ["graph input 's' is not a tensor"])

    # ---- external data
    def external_case(folder: str, location: str, exit: int, message, note: str, data_file: str | None = "weights.bin",
                      tweak=None):
        for name, content in _external(ok, location, data_file).items():
            if tweak is not None and name == "model.onnx":
                model = onnx.load_model_from_string(content)
                tweak(model)
                content = _ser(model)
            files[f"models/{folder}/{name}"] = content
        needles = [f"{folder}/model.onnx", *message] if exit == 2 else list(message)
        cases.append(Case(folder, [f"{{corpus}}/models/{folder}/model.onnx"], exit, needles, note))

    external_case("external_ok", "weights.bin", 0, [], "legal: weights in weights.bin beside the model")
    external_case("external_escape", ESCAPE, 2, ["initializer 'w'", "external data location", "not a file inside"],
                  "location ../../…/etc/passwd: refused before anything reads it", data_file=None)
    external_case("external_absolute", "/etc/passwd", 2, ["external data location '/etc/passwd'", "not a file inside"],
                  "absolute location: refused", data_file=None)
    external_case("external_missing", "no_such_weights.bin", 2, ["cannot load external data"],
                  "location names a file that does not exist", data_file=None)

    def bad_offset(m):
        for t in m.graph.initializer:
            for entry in t.external_data:
                if entry.key == "offset" and t.name == "w":
                    entry.value = "1000000"
    external_case("external_bad_offset", "weights.bin", 2, ["cannot load external data", "offset"],
                  "offset beyond the end of the data file", tweak=bad_offset)

    # ---- data specs (model: ok.onnx, input [N, 3, 8, 8])
    data_cases(files, cases)
    cli_cases(cases)
    dsl_cases(files, cases)
    return files, cases


def dsl_cases(files: dict[str, bytes], cases: list[Case]) -> None:
    """Rule files given with --pass-file that the CLI must refuse in one line (the DSL's own corpus of
    syntax and type errors, tests/dsl/bad/, runs through the CLI in test_bad_inputs.py too)."""
    ok = "{corpus}/ok.onnx"
    files["dsl/non_utf8.hqp"] = b"# rule file\nrule fold-x (opt=1) \"caf\xe9\" {\n"
    files["dsl/binary.hqp"] = bytes(range(256))
    files["dsl/clash_builtin.hqp"] = (b'rule eliminate-dead-code (opt=1) "a rule named like a built-in pass" {\n'
                                      b"  match {\n    out = Relu(x)\n  }\n  replace out with Relu(x)\n}\n")
    files["dsl/a_folder.hqp/README"] = b"a folder named like a rule file\n"
    files["dsl/empty.hqp"] = b"# no rules at all: legal\n"
    for case_id, name, exit, needles, note in [
        ("dsl_non_utf8", "non_utf8.hqp", 2, ["non_utf8.hqp", "cannot read rule file"], "Latin-1 byte in a string"),
        ("dsl_binary", "binary.hqp", 2, ["binary.hqp", "cannot read rule file"], "not text"),
        ("dsl_clash_builtin", "clash_builtin.hqp", 2, ["clash_builtin.hqp:1:", "rule 'eliminate-dead-code' clashes"],
         "a rule named like a built-in pass"),
        ("dsl_folder", "a_folder.hqp", 2, ["a_folder.hqp", "cannot read rule file"], "a folder"),
        ("dsl_missing", "no_such_rules.hqp", 2, ["no_such_rules.hqp", "no such rule file"], "no such file"),
        ("dsl_empty", "empty.hqp", 0, [], "legal: no rules"),
    ]:
        cases.append(Case(case_id, [ok, "--pass-file", f"{{corpus}}/dsl/{name}"], exit, needles, note))
    cases.append(Case("dsl_pipeline_unknown_rule", [ok, "--pass-file", "{corpus}/dsl/empty.hqp", "--pipeline",
                                                    "my-rule"], 2, ["unknown pass 'my-rule'"],
                      "a pipeline naming a rule the pass file does not define"))
    cases.append(Case("rules_unknown_command", ["rules", "frob"], 2, ["frob"], own_output=True))
    cases.append(Case("rules_no_command", ["rules"], 2, ["rules"], own_output=True))


def _init_of(m: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


def data_cases(files: dict[str, bytes], cases: list[Case]) -> None:
    names = [f"img{i}.bmp" for i in range(6)]
    for i, name in enumerate(names):
        files[f"data/images/{name}"] = _bmp(i)
    labels = "".join(f"{name} {i % 3}\n" for i, name in enumerate(names))
    files["data/labels.txt"] = labels.encode()
    files["data/labels_short.txt"] = "".join(labels.splitlines(True)[:4]).encode()
    files["data/labels_ghost.txt"] = (labels + "ghost.bmp 1\n").encode()
    files["data/labels_bad_line.txt"] = (labels.replace("img2.bmp 2", "img2.bmp cat")).encode()
    for i in range(4):
        files[f"data/images_12px/img{i}.bmp"] = _bmp(10 + i, size=(12, 12))
        files[f"data/images_mixed/img{i}.bmp"] = _bmp(20 + i, size=(8, 8) if i != 2 else (8, 9))
        files[f"data/images_broken/img{i}.bmp"] = _bmp(30 + i)
    files["data/images_broken/img2.bmp"] = b"BM this is not a bitmap" + bytes(range(40))
    for i, name in enumerate(names):  # img1.bmp broken; with seed 0 it falls in the eval split (order 3 2 5 4 | 0 1)
        files[f"data/images_broken_late/{name}"] = _bmp(40 + i) if i != 1 else b"\x89PNG not really"
    files["data/x_only_z.npz"] = _npz({"z": np.zeros((4, 3, 8, 8), np.float32)})
    files["data/x_bad_y.npz"] = _npz({"x": np.zeros((4, 3, 8, 8), np.float32), "y": np.zeros(3, np.int64)})
    split = "[split]\ncalib = 4\neval = 2\n"
    specs = {
        # id: (toml text, exit, message needles, note)
        "data_ok": (f'[data]\nimages = "images"\nlabels = "labels.txt"\n{split}', 0, [], "legal"),
        "data_missing_images": ('[data]\nimages = "no_such_folder"\n', 2,
                                ["[data] images", "no_such_folder", "not found"], "images folder missing"),
        "data_missing_labels": ('[data]\nimages = "images"\nlabels = "no_such_labels.txt"\n', 2,
                                ["data_missing_labels.toml", "[data] labels", "no_such_labels.txt", "not found"],
                                "labels file missing"),
        "data_missing_npz": ('[data]\nnpz = "no_such.npz"\n', 2, ["[data] npz", "not found"], "npz missing"),
        "data_listed_image_missing": ('[data]\nimages = "images"\nlabels = "labels_ghost.txt"\n', 2,
                                      ["labels_ghost.txt:7", "ghost.bmp", "not found"],
                                      "the labels file lists an image that does not exist"),
        "data_label_count": (f'[data]\nimages = "images"\nlabels = "labels_short.txt"\n', 2,
                             ["labels_short.txt", "label count mismatch", "4 labels but 6 images"],
                             "fewer labels than images"),
        "data_bad_label_line": ('[data]\nimages = "images"\nlabels = "labels_bad_line.txt"\n', 2,
                                ["labels_bad_line.txt:3", "expected 'FILE LABEL'"], "label is not an integer"),
        "data_wrong_image_size": ('[data]\nimages = "images_12px"\n[split]\ncalib = 4\n', 2,
                                  ["data_wrong_image_size.toml", "[3, 12, 12]", "does not match model input"],
                                  "12x12 images, model takes 8x8, no resize"),
        "data_mixed_sizes": ('[data]\nimages = "images_mixed"\n[split]\ncalib = 4\n', 2,
                             ["img2.bmp", "preprocesses to shape"], "one 8x9 image among 8x8 ones, no resize"),
        "data_unreadable_image": ('[data]\nimages = "images_broken"\n[split]\ncalib = 4\n', 2,
                                  ["images_broken/img2.bmp", "cannot read image"], "img2.bmp is not an image"),
        "data_unreadable_image_late": ('[data]\nimages = "images_broken_late"\n[split]\ncalib = 4\neval = 2\n', 2,
                                       ["images_broken_late/img1.bmp", "cannot"],
                                       "img1.bmp is not an image and lies in the eval split, which -O1 never decodes"),
        "data_unknown_key": ('[data]\nimages = "images"\nlabels = "labels.txt"\nshuffle = true\n', 2,
                             ["unknown key 'shuffle'"], "typo'd key"),
        "data_invalid_toml": ('[data\nimages = "images"\n', 2, ["invalid TOML"], "not TOML"),
        "data_split_too_large": ('[data]\nimages = "images"\nlabels = "labels.txt"\n[split]\ncalib = 100\n', 2,
                                 ["[split]", "exceeds the 6 items"], "more calibration items than images"),
        "data_bad_preprocess": ('[data]\nimages = "images"\nlabels = "labels.txt"\n[preprocess]\nstd = [1.0, 0.0, 1.0]\n',
                                2, ["[preprocess]", "std"], "zero std"),
        "data_images_is_file": ('[data]\nimages = "labels.txt"\n', 2, ["[data] images", "not found"],
                                "images names a file, not a folder"),
        "data_npz_no_x": ('[data]\nnpz = "x_only_z.npz"\n', 2, ["x_only_z.npz", "unknown key 'z'"], "npz without x"),
        "data_npz_bad_y": ('[data]\nnpz = "x_bad_y.npz"\n', 2, ["x_bad_y.npz", "y must be"], "3 labels for 4 rows"),
    }
    for case_id, (text, exit, needles, note) in specs.items():
        files[f"data/{case_id}.toml"] = text.encode()
        if exit == 2 and not any(n.endswith((".txt", ".bmp", ".npz", ".toml")) or ".txt:" in n for n in needles):
            needles = [f"{case_id}.toml", *needles]
        cases.append(Case(case_id, ["{corpus}/ok.onnx", "--data", f"{{corpus}}/data/{case_id}.toml"], exit, needles,
                          note))
    cases.append(Case("data_spec_missing", ["{corpus}/ok.onnx", "--data", "{corpus}/data/no_such.toml"], 2,
                      ["no_such.toml", "data spec not found"]))
    cases.append(Case("data_spec_is_folder", ["{corpus}/ok.onnx", "--data", "{corpus}/data/images"], 2,
                      ["data/images", "data spec not found"]))


def cli_cases(cases: list[Case]) -> None:
    ok = "{corpus}/ok.onnx"
    bad = [
        ("cli_opt_level", [ok, "-O", "9"], ["argument -O", "invalid choice"]),
        ("cli_opt_level_word", [ok, "-Ofast"], ["argument -O", "invalid int value"]),
        ("cli_unknown_target", [ok, "--target", "tpu9"], ["unknown target 'tpu9'", "cpu", "orin"]),
        ("cli_target_path", [ok, "--target", "../../../etc/passwd"], ["unknown target '../../../etc/passwd'"]),
        ("cli_max_drop_word", [ok, "--max-drop", "abc"], ["--max-drop", "abc"]),
        ("cli_max_drop_negative", [ok, "--max-drop", "-1"], ["--max-drop", "-1"]),
        ("cli_max_drop_nan", [ok, "--max-drop", "nan"], ["--max-drop", "nan"]),
        ("cli_seed_word", [ok, "--seed", "x"], ["--seed", "'x'"]),
        ("cli_seed_negative", [ok, "--seed", "-3"], ["--seed", "-3"]),
        ("cli_guard_batch_zero", [ok, "--guard-batch", "0"], ["--guard-batch", "0"]),
        ("cli_size_budget_zero", [ok, "--size-budget", "0"], ["--size-budget", "'0'"]),
        ("cli_size_budget_word", [ok, "--size-budget", "half"], ["--size-budget", "'half'"]),
        ("cli_pipeline_syntax", [ok, "--pipeline", "fold-constants{"], ["pipeline column"]),
        ("cli_pipeline_unknown_pass", [ok, "--pipeline", "fold-constant"],
         ["unknown pass 'fold-constant'", "did you mean 'fold-constants'"]),
        ("cli_pipeline_unknown_option", [ok, "--pipeline", "fold-constants{bogus=1}"],
         ["pass 'fold-constants' has no option 'bogus'"]),
        ("cli_disable_unknown_pass", [ok, "--disable-pass", "no-such-pass"], ["unknown pass 'no-such-pass'"]),
        ("cli_print_ir_unknown_pass", [ok, "--print-ir-after", "no-such-pass"],
         ["--print-ir-after", "unknown pass 'no-such-pass'"]),
        ("cli_emit_format", [ok, "--emit", "pdf"], ["argument --emit", "invalid choice"]),
        ("cli_quiet_and_verbose", [ok, "-q", "-v"], ["not allowed with"]),
        ("cli_unknown_option", [ok, "--frobnicate"], ["unrecognized arguments: --frobnicate"]),
        ("cli_no_model", ["-O1"], ["no input model"]),
        ("cli_missing_option_value", [ok, "--target"], ["argument --target", "expected one argument"]),
    ]
    for case_id, args, needles in bad:
        cases.append(Case(case_id, args, 2, needles))
    own = [
        ("cli_output_is_input", [ok, "-o", ok], ["refusing to overwrite"]),
        ("cli_output_is_input_other_spelling", [ok, "-o", "{corpus}/./data/../ok.onnx"], ["refusing to overwrite"]),
        ("cli_output_is_folder", [ok, "-o", "{corpus}/data"], ["is a folder"]),
        ("cli_output_below_a_file", [ok, "-o", "{corpus}/ok.onnx/out.onnx"], ["is a file, not a folder"]),
        ("cli_report_is_output", [ok, "-o", "{out}/same.json", "--report", "{out}/same.json"], ["same file"]),
        ("cli_report_is_input", [ok, "-o", "{out}/out.onnx", "--report", ok], ["refusing to overwrite"]),
        ("cli_report_is_data", [ok, "-o", "{out}/out.onnx", "--data", "{corpus}/data/data_ok.toml",
                                "--report", "{corpus}/data/data_ok.toml"], ["refusing to overwrite"]),
    ]
    for case_id, args, needles in own:
        cases.append(Case(case_id, args, 2, needles, own_output=True))
    # no -o: the default output (<stem>.hqp.onnx beside the input) must not appear on failure, also when
    # the error surfaces mid-pipeline (the broken image is decoded by the numeric guard after BN folding)
    cases.append(Case("default_output_load_error", ["{corpus}/models/cycle.onnx"], 2, ["cycle.onnx", "cycle"],
                      own_output=True))
    cases.append(Case("default_output_mid_pipeline_error", [ok, "--data", "{corpus}/data/data_unreadable_image.toml"],
                      2, ["images_broken/img2.bmp", "cannot read image"], own_output=True))


# --------------------------------------------------------------------------- writing
def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def expected_toml(cases: list[Case]) -> bytes:
    lines = ["# Generated by tools/make_bad_inputs.py -- do not edit; rerun the script.",
             "# One [[case]] per corpus entry: CLI args, expected exit code, substrings of the one-line message.",
             "# {corpus} = the corpus folder (tests run on a copy), {out} = an empty output folder.", ""]
    for case in cases:
        lines.append("[[case]]")
        lines.append(f"id = {_toml_string(case.id)}")
        lines.append(f"args = [{', '.join(_toml_string(a) for a in case.args)}]")
        lines.append(f"exit = {case.exit}")
        lines.append(f"message = [{', '.join(_toml_string(m) for m in case.message)}]")
        if case.own_output:
            lines.append("own_output = true")
        if case.note:
            lines.append(f"note = {_toml_string(case.note)}")
        if case.xfail:
            lines.append(f"xfail = {_toml_string(case.xfail)}")
        lines.append("")
    return "\n".join(lines).encode()


def corpus() -> dict[str, bytes]:
    """Every file of the corpus, by path relative to tests/bad_inputs/."""
    files, cases = build()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    files["EXPECTED.toml"] = expected_toml(cases)
    return dict(sorted(files.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="corpus folder (default tests/bad_inputs)")
    parser.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = parser.parse_args(argv)
    files = corpus()
    if args.check:
        stale = [rel for rel, data in files.items()
                 if not (args.out / rel).is_file() or (args.out / rel).read_bytes() != data]
        extra = sorted(str(p.relative_to(args.out)) for p in args.out.rglob("*")
                       if p.is_file() and str(p.relative_to(args.out)) not in files)
        for rel in stale:
            print(f"differs or missing: {rel}", file=sys.stderr)
        for rel in extra:
            print(f"not generated: {rel}", file=sys.stderr)
        return 1 if stale or extra else 0
    for rel, data in files.items():
        path = args.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
    total = sum(len(d) for d in files.values())
    print(f"wrote {len(files)} files ({total} bytes) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
