"""fold-conv-affine: fold constant per-channel Mul/Add/Sub/Div after Conv/ConvTranspose/Gemm."""
from __future__ import annotations

import numpy as np

from hqpc.graphutil import GraphIndex, NameGenerator
from hqpc.passmanager import Pass, PassInfo
from hqpc.passes._rewrite import (AffineHost, constant, fold_channel_affine, is_op, outer_reads, per_channel,
                                  remove_node, sole_consumer)
from hqpc.registry import register_pass


@register_pass
class FoldConvAffine(Pass):
    """Fold ``op(h, c)`` into ``h = host(x)`` (Conv, ConvTranspose or Gemm with constant weights,
    output read only by ``op``) when ``c`` is a constant that is a scalar or varies only along
    the output-channel axis (axis 1) without changing the output's shape ([C,1,1], [1,C,1,1],
    [C] for Gemm, ...):

    * ``h·c`` (Mul):   ``W' = W·c``, ``b' = b·c``
    * ``h + c`` (Add): ``b' = b + c``
    * ``h − c`` (Sub): ``b' = b − c``;  ``c − h``: ``W' = −W``, ``b' = c − b``
    * ``h / c`` (Div): as Mul by ``1/c`` (reciprocal in float64; not bit-exact but well within
      the exact tolerance); ``c / h`` is not affine and is left alone.

    Constants with a zero (Div) or non-finite values are not folded. The host takes over the
    op's output name; chains (Conv → Mul → Add) fold completely (iterated to a fixed point).
    """

    info = PassInfo("fold-conv-affine", opt_level=1,
                    description="fold constant per-channel Mul/Add/Sub/Div into the preceding Conv/ConvTranspose/Gemm")
    options = {}

    def run(self, model, ctx) -> bool:
        graph = model.proto.graph
        changed = False
        while True:
            index = GraphIndex.build(graph)
            outer = outer_reads(graph)
            names = NameGenerator(graph)
            touched: set[int] = set()
            folded = 0
            for node in list(graph.node):
                match = self._match(index, node, outer)
                if match is None or id(match[0].node) in touched:
                    continue
                host, scale, shift = match
                fold_channel_affine(graph, index, names, host, scale, shift, outer)
                host.node.output[0] = node.output[0]
                remove_node(graph, node)
                touched.add(id(host.node))
                folded += 1
            if not folded:
                return changed
            changed = True

    @staticmethod
    def _match(index: GraphIndex, node, outer):
        """(host, scale, shift) such that ``node(h) = h·scale + shift`` per channel, or None."""
        if not is_op(node, "Mul", "Add", "Sub", "Div") or len(node.input) != 2 or len(node.output) != 1:
            return None
        for position in (0, 1):
            h, c_name = node.input[position], node.input[1 - position]
            producer = index.producer.get(h)
            if producer is None or sole_consumer(index, h, outer) is not node:
                continue
            host = AffineHost.match(index, producer)
            if host is None:
                continue
            c = constant(index, c_name)
            if c is None or c.dtype != host.weight.dtype:
                continue
            vector = per_channel(c, host.out_rank, host.channels)
            if vector is None:
                continue
            v = vector.astype(np.float64)
            if not np.all(np.isfinite(v)):
                continue
            op = node.op_type
            if op == "Mul":
                return host, v, 0.0
            if op == "Add":
                return host, 1.0, v
            if op == "Sub":
                return (host, 1.0, -v) if position == 0 else (host, -1.0, v)
            if op == "Div" and position == 0 and np.all(v != 0):
                return host, 1.0 / v, 0.0
        return None
