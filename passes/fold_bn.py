"""fold-bn: fold inference BatchNormalization into the preceding Conv / ConvTranspose / Gemm."""
from __future__ import annotations

import numpy as np

from hqpc.graphutil import GraphIndex, NameGenerator, attributes
from hqpc.passmanager import Pass, PassInfo
from hqpc.passes._rewrite import (AffineHost, constant, extra_outputs_unused, fold_channel_affine, is_op,
                                  outer_reads, remove_node, sole_consumer)
from hqpc.registry import register_pass


@register_pass
class FoldBatchNorm(Pass):
    """Fold ``BatchNormalization(host(x))`` into ``host`` when host is a Conv, ConvTranspose or
    Gemm with constant weights (and bias) whose output only the BN reads.

    BN in inference mode computes, per channel c of axis 1,
    ``y = (h − mean)·s + beta`` with ``s = gamma / sqrt(var + eps)``, which is the affine map
    ``h·s + (beta − mean·s)``. Since ``h = W∗x + b`` is linear in W and b per output channel:
    ``W' = W·s`` (Conv: axis 0 of W; ConvTranspose: axis 1 of W [C_in, C_out/group, k...] per
    group; Gemm: the N axis of B, respecting transB) and ``b' = (b − mean)·s + beta``
    (Gemm: ``C' = beta_gemm·C·s + beta − mean·s``, beta_gemm set to 1). The host takes over the
    BN's output name, so downstream names (and graph outputs) are unchanged.

    Not folded: BN in training mode, BN whose mean/var outputs are used, non-constant BN
    parameters, a host output with any other reader (or a graph output), non-constant weights.
    A standalone BN is left as is. The result equals the input up to fp rounding (float64
    arithmetic, then stored in the weight dtype).
    """

    info = PassInfo("fold-bn", opt_level=1,
                    description="fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm")
    options = {}

    def run(self, model, ctx) -> bool:
        graph = model.proto.graph
        changed = False
        while True:
            index = GraphIndex.build(graph)
            outer = outer_reads(graph)
            names = NameGenerator(graph)
            folded = 0
            touched: set[int] = set()
            for bn in list(graph.node):
                host = self._match(index, bn, outer)
                if host is None or id(host.node) in touched:
                    continue
                scale, shift = self._affine(index, bn)
                fold_channel_affine(graph, index, names, host, scale, shift, outer)
                host.node.output[0] = bn.output[0]
                remove_node(graph, bn)
                touched.add(id(host.node))
                folded += 1
            if not folded:
                return changed
            changed = True

    @staticmethod
    def _match(index: GraphIndex, bn, outer) -> AffineHost | None:
        if not is_op(bn, "BatchNormalization") or len(bn.input) != 5 or not bn.output or not bn.output[0]:
            return None
        attrs = attributes(bn)
        if attrs.get("training_mode", 0) or attrs.get("spatial", 1) != 1:
            return None
        if not extra_outputs_unused(bn, index, outer):
            return None
        producer = index.producer.get(bn.input[0])
        if producer is None or sole_consumer(index, bn.input[0], outer) is not bn:
            return None
        host = AffineHost.match(index, producer)
        if host is None:
            return None
        params = [constant(index, name) for name in bn.input[1:]]
        if any(p is None or p.dtype != host.weight.dtype or p.shape != (host.channels,) for p in params):
            return None
        return host

    @staticmethod
    def _affine(index: GraphIndex, bn) -> tuple[np.ndarray, np.ndarray]:
        gamma, beta, mean, var = (constant(index, name).astype(np.float64) for name in bn.input[1:])
        eps = float(attributes(bn).get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        return scale, beta - mean * scale
