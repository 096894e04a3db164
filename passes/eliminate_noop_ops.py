"""eliminate-noop-ops: remove shape and type ops that provably return their input unchanged.

Identity and inference Dropout are removed by the rules ``eliminate-identity-op`` and
``eliminate-dropout`` (spec/rules/eliminate.hqp); this pass covers the no-ops whose proof needs
shape inference or reads several constant inputs.
"""
from __future__ import annotations

import numpy as np

from hqpc.graphutil import GraphIndex, attributes
from hqpc.passmanager import Pass, PassInfo
from hqpc.passes._rewrite import ShapeTable, bypass, constant, is_op, outer_reads
from hqpc.registry import register_pass

# An end index at least this large selects "to the end" of an axis of unknown length (exporters
# write INT32_MAX or INT64_MAX; no edge-inference tensor has an axis this long).
_TO_END = 2 ** 31 - 1


@register_pass
class EliminateNoopOps(Pass):
    """Remove nodes whose output equals their first input (value, type and shape):

    * a single-input ``Concat``;
    * ``Reshape`` to the input's own shape: per axis the target is the same static size, ``0``
      (copy, without allowzero) or the only ``-1`` where every other axis matched and is non-zero;
    * ``Cast``/``CastLike`` to the input's own element type;
    * ``Transpose`` with the identity permutation (or no perm on a rank ≤ 1 tensor);
    * ``Pad`` whose pads are all zero;
    * ``Slice`` taking every element: on each sliced axis start clamps to 0, end reaches the end
      (static size, or ≥ INT32_MAX), step 1.

    Readers of the output read the input instead. A graph output keeps its name: the input's
    producer is renamed to produce it (skipped when the input is a graph input, an
    initializer, another graph output or read by a subgraph). Needs constants for shapes,
    pads and Slice parameters; anything not provably a no-op is kept.
    """

    info = PassInfo("eliminate-noop-ops", opt_level=1,
                    description="remove no-op Reshape/Cast/CastLike/Transpose/Pad/Slice and single-input Concat")
    options = {}

    def run(self, model, ctx) -> bool:
        graph = model.proto.graph
        shapes = None
        changed = False
        progress = True
        while progress:
            progress = False
            index = GraphIndex.build(graph)
            outer = outer_reads(graph)
            for node in list(graph.node):
                if not is_op(node, *_CHECKS) or not node.input or not node.output:
                    continue
                if shapes is None and node.op_type in _NEEDS_SHAPES:
                    shapes = ShapeTable(model.proto)  # exact passes keep every value's shape
                if not _CHECKS[node.op_type](node, index, shapes, outer):
                    continue
                if bypass(graph, index, node, outer):
                    changed = progress = True
                    break  # the index is stale; rebuild it
        return changed


def _concat(node, index, shapes, outer) -> bool:
    return len(node.input) == 1


def _reshape(node, index, shapes, outer) -> bool:
    target = constant(index, node.input[1]) if len(node.input) == 2 else None
    source = shapes.shape(node.input[0])
    if target is None or source is None or target.ndim != 1 or len(target) != len(source):
        return False
    allowzero = int(attributes(node).get("allowzero", 0))
    unmatched = []
    for axis, (want, have) in enumerate(zip(target.tolist(), source)):
        if want == 0 and not allowzero:
            continue  # copies the input dim
        if isinstance(have, int) and want == have:
            continue
        unmatched.append((axis, want, have))
    if not unmatched:
        return True
    if len(unmatched) != 1 or unmatched[0][1] != -1:
        return False
    # a single -1 is inferred as total / (product of the other axes): the same size iff those
    # are non-zero (they all matched, so they equal the input's dims)
    others = [have for axis, have in enumerate(source) if axis != unmatched[0][0]]
    return all(isinstance(d, int) and d > 0 for d in others)


def _cast(node, index, shapes, outer) -> bool:
    source = shapes.elem_type(node.input[0])
    if source is None:
        return False
    if node.op_type == "CastLike":
        return len(node.input) == 2 and shapes.elem_type(node.input[1]) == source
    return int(attributes(node).get("to", -1)) == source


def _transpose(node, index, shapes, outer) -> bool:
    perm = attributes(node).get("perm")
    if perm is None:
        rank = shapes.rank(node.input[0])
        return rank is not None and rank <= 1
    return list(perm) == list(range(len(perm)))


def _pad(node, index, shapes, outer) -> bool:
    if len(node.input) >= 2 and node.input[1]:
        pads = constant(index, node.input[1])
    else:
        pads = attributes(node).get("pads")
        pads = None if pads is None else np.asarray(pads)
    return pads is not None and pads.size > 0 and not np.any(pads)


def _slice(node, index, shapes, outer) -> bool:
    if len(node.input) < 3:
        return False
    starts, ends = constant(index, node.input[1]), constant(index, node.input[2])
    source = shapes.shape(node.input[0])
    if starts is None or ends is None or source is None or starts.shape != ends.shape or starts.ndim != 1:
        return False
    rank = len(source)
    axes = np.arange(len(starts))
    if len(node.input) > 3 and node.input[3]:
        axes = constant(index, node.input[3])
        if axes is None or axes.shape != starts.shape:
            return False
    steps = np.ones(len(starts), dtype=np.int64)
    if len(node.input) > 4 and node.input[4]:
        steps = constant(index, node.input[4])
        if steps is None or steps.shape != starts.shape:
            return False
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist()):
        if not -rank <= axis < rank or step != 1:
            return False
        dim = source[axis % rank]
        if isinstance(dim, int):
            if not (start == 0 or start <= -dim) or end < dim:
                return False
        elif start != 0 or end < _TO_END:
            return False
    return True


_CHECKS = {
    "Concat": _concat,
    "Reshape": _reshape,
    "Cast": _cast,
    "CastLike": _cast,
    "Transpose": _transpose,
    "Pad": _pad,
    "Slice": _slice,
}
_NEEDS_SHAPES = {"Reshape", "Cast", "CastLike", "Transpose", "Slice"}
