"""Helpers shared by the clean-up passes (not a pass; the leading underscore keeps it private).

Everything here works on ``onnx.GraphProto`` in place, on top of :mod:`hqpc.graphutil`:

* :class:`ShapeTable` — element types and shapes from a (non-strict) shape inference run on a
  *copy* of the model, so querying shapes never edits the model;
* use queries that also count reads from inside If/Loop/Scan bodies (``outer_reads``), which
  :class:`~hqpc.graphutil.GraphIndex` does not see;
* :func:`bypass` — remove a node whose output equals one of its inputs, keeping graph output
  names;
* :class:`AffineHost` and :func:`fold_channel_affine` — fold a per-output-channel affine map
  ``y ↦ y·s + t`` into a Conv / ConvTranspose / Gemm with constant weights (used by ``fold-bn``
  and ``fold-conv-affine``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from hqpc.graphutil import (GraphIndex, NameGenerator, subgraph_reads, attributes, rename_input_uses, set_attribute, set_initializer)
from hqpc.ir import infer_shapes

DEFAULT_DOMAINS = ("", "ai.onnx")
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def is_op(node: onnx.NodeProto, *op_types: str) -> bool:
    """True iff ``node`` is one of ``op_types`` of the default ONNX domain."""
    return node.domain in DEFAULT_DOMAINS and node.op_type in op_types


def has_subgraph(node: onnx.NodeProto) -> bool:
    """True iff ``node`` has a graph-valued attribute (If/Loop/Scan bodies)."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names of this graph read from inside subgraph bodies (If/Loop/Scan)."""
    return subgraph_reads(graph)


# --------------------------------------------------------------------------- shapes and types
class ShapeTable:
    """Element types and shapes of every named value, from shape inference on a copy."""

    def __init__(self, proto: onnx.ModelProto):
        inferred = infer_shapes(proto)  # works on a copy; never raises when not strict
        graph = inferred.graph
        self._types: dict[str, int] = {}
        self._shapes: dict[str, list[int | str | None] | None] = {}
        for value in list(graph.value_info) + list(graph.input) + list(graph.output):
            tensor = value.type.tensor_type if value.type.HasField("tensor_type") else None
            if tensor is None or value.name in self._types:
                continue
            self._types[value.name] = tensor.elem_type
            self._shapes[value.name] = None
            if tensor.HasField("shape"):
                self._shapes[value.name] = [
                    int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        for t in graph.initializer:
            self._types[t.name] = t.data_type
            self._shapes[t.name] = [int(d) for d in t.dims]

    def elem_type(self, name: str) -> int | None:
        """ONNX element type of ``name`` (TensorProto.FLOAT, ...), None if unknown."""
        return self._types.get(name) or None

    def shape(self, name: str) -> list[int | str | None] | None:
        """Dims: ints when static, names when symbolic, None when unknown; None if rank unknown."""
        shape = self._shapes.get(name)
        return None if shape is None else list(shape)

    def static_shape(self, name: str) -> list[int] | None:
        shape = self.shape(name)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return shape

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)


# --------------------------------------------------------------------------- uses
def constant(index: GraphIndex, name: str) -> np.ndarray | None:
    """Value of ``name`` if it is a constant that callers cannot override (not a graph input)."""
    if not name or name in index.inputs:
        return None
    return index.constant(name)


def is_unused(index: GraphIndex, name: str, outer: set[str]) -> bool:
    """No node reads ``name``, it is no graph output and no subgraph reads it."""
    return not index.consumers.get(name) and name not in index.outputs and name not in outer


def sole_consumer(index: GraphIndex, name: str, outer: set[str]) -> onnx.NodeProto | None:
    """The only reader of ``name`` when exactly one node input reads it, it is no graph output
    and no subgraph reads it; otherwise None."""
    readers = index.consumers.get(name, [])
    if len(readers) != 1 or name in index.outputs or name in outer:
        return None
    return readers[0]


def extra_outputs_unused(node: onnx.NodeProto, index: GraphIndex, outer: set[str]) -> bool:
    """All outputs but the first are absent or unused."""
    return all(not name or is_unused(index, name, outer) for name in node.output[1:])


def bypass(graph: onnx.GraphProto, index: GraphIndex, node: onnx.NodeProto, outer: set[str]) -> bool:
    """Remove ``node`` whose first output carries the same value as its first input.

    Readers of the output read the input instead. When the output is a graph output, the
    input's producer is renamed to produce it instead, so graph output names never change;
    that is only done when the input is produced by a node of this graph and is neither a
    graph output nor read by a subgraph. Returns False (and changes nothing) when unsafe.
    The caller must check the node's other outputs are unused. ``index`` is stale afterwards.
    """
    src, dst = node.input[0], node.output[0]
    if not src or not dst or dst in outer:
        return False
    if dst in index.outputs:
        if (src not in index.producer or src in index.outputs or src in outer or src in index.inputs
                or src in index.initializers):
            return False
    remove_node(graph, node)
    rename_input_uses(graph, dst, src)
    return True


def remove_node(graph: onnx.GraphProto, node: onnx.NodeProto) -> None:
    """Remove ``node`` (identity comparison) from ``graph``."""
    for i, n in enumerate(graph.node):
        if n is node:
            del graph.node[i]
            return
    raise ValueError(f"node '{node.name}' is not in the graph")


def write_constant_input(graph: onnx.GraphProto, index: GraphIndex, names: NameGenerator,
                         node: onnx.NodeProto, position: int, value: np.ndarray, outer: set[str],
                         base: str) -> None:
    """Make input ``position`` of ``node`` the constant ``value``.

    An initializer that only this input reads is overwritten in place (its name is kept);
    otherwise (shared, a Constant node's output, absent) a fresh initializer is created, so
    other readers keep seeing the old value.
    """
    current = node.input[position] if position < len(node.input) else ""
    in_place = (current and current in index.initializers and current not in index.inputs
                and sole_consumer(index, current, outer) is node
                and list(node.input).count(current) == 1)
    if in_place:
        set_initializer(graph, current, value)
        return
    name = names(f"{current or base}_folded")
    set_initializer(graph, name, value)
    while len(node.input) <= position:
        node.input.append("")
    node.input[position] = name


# --------------------------------------------------------------------------- per-channel affine folding
AFFINE_HOST_OPS = ("Conv", "ConvTranspose", "Gemm")


@dataclass
class AffineHost:
    """A Conv/ConvTranspose/Gemm with constant float weights (and bias, when present).

    ``channels`` is the number of output channels, the size of axis 1 of the output, whose rank
    is ``out_rank``.
    """

    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    channels: int
    out_rank: int

    @classmethod
    def match(cls, index: GraphIndex, node: onnx.NodeProto) -> "AffineHost | None":
        if not is_op(node, *AFFINE_HOST_OPS) or len(node.output) != 1 or len(node.input) < 2:
            return None
        weight = constant(index, node.input[1])
        if weight is None or weight.dtype not in FLOAT_DTYPES:
            return None
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = constant(index, node.input[2])
            if bias is None or bias.dtype != weight.dtype:
                return None
        attrs = attributes(node)
        if node.op_type == "Gemm":
            if weight.ndim != 2:
                return None
            channels = weight.shape[0] if attrs.get("transB", 0) else weight.shape[1]
            if bias is not None:
                if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, channels)):
                    return None
            return cls(node, weight, bias, int(channels), 2)
        if weight.ndim < 3:
            return None
        group = int(attrs.get("group", 1))
        if node.op_type == "Conv":
            channels = weight.shape[0]
        else:
            channels = weight.shape[1] * group
            if weight.shape[0] % group:
                return None
        if bias is not None and bias.shape != (channels,):
            return None
        return cls(node, weight, bias, int(channels), weight.ndim)

    def scaled_weight(self, scale: np.ndarray) -> np.ndarray:
        """The weight with output channel ``c`` multiplied by ``scale[c]`` (float64)."""
        w = self.weight.astype(np.float64)
        s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (self.channels,))
        node = self.node
        if node.op_type == "Conv":  # W: [C_out, C_in/group, k...]
            return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        if node.op_type == "ConvTranspose":  # W: [C_in, C_out/group, k...]
            group = int(attributes(node).get("group", 1))
            per_group = w.shape[1]
            grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
            factors = s.reshape((group, 1, per_group) + (1,) * (w.ndim - 2))
            return (grouped * factors).reshape(w.shape)
        # Gemm: B is [K, N] (transB=0) or [N, K] (transB=1)
        if attributes(node).get("transB", 0):
            return w * s[:, None]
        return w * s[None, :]


def fold_channel_affine(graph: onnx.GraphProto, index: GraphIndex, names: NameGenerator, host: AffineHost,
                        scale: np.ndarray | float, shift: np.ndarray | float, outer: set[str]) -> None:
    """Rewrite ``host`` so that it computes ``host(x)·scale + shift`` per output channel.

    ``scale`` and ``shift`` are scalars or vectors of length ``host.channels`` (values along
    output axis 1). Conv/ConvTranspose: ``W' = W·s`` over the output-channel axis,
    ``b' = b·s + t``. Gemm (``alpha·A'B' + beta·C``): ``B' = B·s`` over its N axis,
    ``C' = beta·C·s + t`` and ``beta = 1``. Arithmetic in float64, stored in the weight dtype.
    The host's output name is unchanged; the caller renames it.
    """
    dtype = host.weight.dtype
    s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (host.channels,))
    t = np.broadcast_to(np.asarray(shift, np.float64).reshape(-1), (host.channels,))
    node = host.node
    base = node.name or node.output[0]
    new_w = host.scaled_weight(s).astype(dtype)
    if node.op_type == "Gemm":
        beta = float(attributes(node).get("beta", 1.0))
        if host.bias is None:
            new_b = t.copy()
        else:
            new_b = beta * host.bias.astype(np.float64) * s + t
        write_constant_input(graph, index, names, node, 1, new_w, outer, base + "_B")
        write_constant_input(graph, index, names, node, 2, new_b.astype(dtype), outer, base + "_C")
        if beta != 1.0:
            set_attribute(node, "beta", 1.0)
        return
    bias = np.zeros(host.channels) if host.bias is None else host.bias.astype(np.float64)
    new_b = bias * s + t
    write_constant_input(graph, index, names, node, 1, new_w, outer, base + "_W")
    write_constant_input(graph, index, names, node, 2, new_b.astype(dtype), outer, base + "_B")


def per_channel(value: np.ndarray, out_rank: int, channels: int, axis: int = 1) -> np.ndarray | None:
    """``value`` as a length-``channels`` vector (or a 0-d scalar) if broadcasting it against an
    output of rank ``out_rank`` varies only along ``axis`` and does not change the output's shape;
    otherwise None."""
    if value.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - value.ndim) + tuple(value.shape)
    for i, d in enumerate(shape):
        if i == axis:
            if d not in (1, channels):
                return None
        elif d != 1:
            return None
    if shape[axis] == channels and channels != 1:
        return value.reshape(channels)
    return value.reshape(())


def elem_dtype(elem_type: int | None) -> np.dtype | None:
    if not elem_type or elem_type == TensorProto.UNDEFINED:
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return None
