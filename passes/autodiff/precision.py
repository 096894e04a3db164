"""Convert a model between float32 and float64 (used for finite-difference checks).

Everything typed float32 becomes float64 (or back): initializers, graph
inputs/outputs/value_info, Constant / ConstantOfShape values, Cast targets and
the ``dtype`` attribute of random/eye generators, recursively into subgraphs.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

_DTYPE_ATTR_OPS = {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "EyeLike"}


def _conv_tensor(t: TensorProto, src: int, dst: int) -> None:
    if t.data_type != src:
        return
    arr = numpy_helper.to_array(t).astype(helper.tensor_dtype_to_np_dtype(dst))
    t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _conv_value_info(vi: onnx.ValueInfoProto, src: int, dst: int) -> None:
    tt = vi.type.tensor_type
    if tt.elem_type == src:
        tt.elem_type = dst


def _conv_graph(g: onnx.GraphProto, src: int, dst: int) -> None:
    for t in g.initializer:
        _conv_tensor(t, src, dst)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        _conv_value_info(vi, src, dst)
    np_dst = helper.tensor_dtype_to_np_dtype(dst)
    for node in g.node:
        for a in list(node.attribute):
            if a.type == AttributeProto.TENSOR:
                _conv_tensor(a.t, src, dst)
            elif a.type == AttributeProto.GRAPH:
                _conv_graph(a.g, src, dst)
            elif a.type == AttributeProto.GRAPHS:
                for sg in a.graphs:
                    _conv_graph(sg, src, dst)
        if node.op_type == "Constant" and dst == TensorProto.DOUBLE:
            # value_float(s) would produce float32: turn them into a double tensor
            for a in list(node.attribute):
                if a.name in ("value_float", "value_floats"):
                    v = helper.get_attribute_value(a)
                    node.attribute.remove(a)
                    node.attribute.append(helper.make_attribute(
                        "value", numpy_helper.from_array(np.asarray(v, dtype=np_dst))))
        if node.op_type == "Cast" or node.op_type in _DTYPE_ATTR_OPS:
            for a in node.attribute:
                if a.name in ("to", "dtype") and a.i == src:
                    a.i = dst


def convert_float_type(model: onnx.ModelProto, dtype) -> onnx.ModelProto:
    """A copy of ``model`` with float32 <-> float64 swapped to ``dtype``."""
    dst = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if dst not in (TensorProto.FLOAT, TensorProto.DOUBLE):
        raise ValueError(f"unsupported float type {dtype}")
    src = TensorProto.DOUBLE if dst == TensorProto.FLOAT else TensorProto.FLOAT
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _conv_graph(out.graph, src, dst)
    return out


def model_float_type(model: onnx.ModelProto) -> int:
    """The elem type of the first float graph output (FLOAT if none found)."""
    for vi in list(model.graph.output) + list(model.graph.input):
        et = vi.type.tensor_type.elem_type
        if et in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16):
            return et
    return TensorProto.FLOAT
