"""Helpers shared by the clean-up passes (not a pass; the leading underscore keeps it private).

Everything here works on ``onnx.GraphProto`` in place, on top of :mod:`hqpc.graphutil`:

* :class:`ShapeTable` — element types and shapes from a (non-strict) shape inference run on a
  *copy* of the model, so querying shapes never edits the model;
* use queries that also count reads from inside If/Loop/Scan bodies (``outer_reads``), which
  :class:`~hqpc.graphutil.GraphIndex` does not see;
* :func:`bypass` — remove a node whose output equals one of its inputs, keeping graph output
  names;
* :func:`write_constant_input` — give a node input a new constant value without changing what
  other readers of the old constant see.

The per-channel folds into Conv / ConvTranspose / Gemm are rules (spec/rules/*.hqp).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from hqpc.graphutil import GraphIndex, NameGenerator, subgraph_reads, rename_input_uses, set_initializer
from hqpc.ir import infer_shapes

DEFAULT_DOMAINS = ("", "ai.onnx")


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


def sole_consumer(index: GraphIndex, name: str, outer: set[str]) -> onnx.NodeProto | None:
    """The only reader of ``name`` when exactly one node input reads it, it is no graph output
    and no subgraph reads it; otherwise None."""
    readers = index.consumers.get(name, [])
    if len(readers) != 1 or name in index.outputs or name in outer:
        return None
    return readers[0]


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


def elem_dtype(elem_type: int | None) -> np.dtype | None:
    if not elem_type or elem_type == TensorProto.UNDEFINED:
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return None
