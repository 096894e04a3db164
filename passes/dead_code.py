"""eliminate-dead-code: remove what cannot influence a graph output."""
from __future__ import annotations

import onnx

from hqpc.graphutil import subgraph_reads, remove_nodes, remove_unused_initializers
from hqpc.passes._rewrite import has_subgraph
from hqpc.passmanager import Pass, PassInfo
from hqpc.registry import register_pass


@register_pass
class EliminateDeadCode(Pass):
    """Remove nodes none of whose outputs reaches a graph output, then initializers nothing
    reads, then value_info entries naming values that no longer exist (stale after rewrites).

    Liveness is transitive from the graph outputs through node inputs, including names read
    from inside a live node's subgraphs (If/Loop/Scan bodies). ONNX nodes have no side
    effects, so removing unreachable ones preserves every output. Graph inputs are never
    removed (they are the model's interface), and no name is changed.
    """

    info = PassInfo("eliminate-dead-code", opt_level=1,
                    description="remove nodes not reaching an output, unused initializers and stale value_info")
    options = {}

    def run(self, model, ctx) -> bool:
        graph = model.proto.graph
        producer = {}
        for node in graph.node:
            for name in node.output:
                if name:
                    producer[name] = node
        live_ids: set[int] = set()
        needed = [o.name for o in graph.output]
        seen: set[str] = set()
        while needed:
            name = needed.pop()
            if name in seen:
                continue
            seen.add(name)
            node = producer.get(name)
            if node is None or id(node) in live_ids:
                continue
            live_ids.add(id(node))
            needed.extend(n for n in node.input if n)
            needed.extend(_node_subgraph_reads(node))
        dead = [node for node in graph.node if id(node) not in live_ids]
        if dead:
            remove_nodes(graph, dead)
        dropped = remove_unused_initializers(graph)
        existing = {name for node in graph.node for name in node.output if name}
        existing |= {t.name for t in graph.initializer} | {i.name for i in graph.input}
        stale = [v for v in graph.value_info if v.name not in existing]
        if stale:
            keep = [v for v in graph.value_info if v.name in existing]
            del graph.value_info[:]
            graph.value_info.extend(keep)
        return bool(dead or dropped or stale)


def _node_subgraph_reads(node) -> set[str]:
    """Outer-scope names read by the subgraphs of ``node``."""
    if not has_subgraph(node):
        return set()
    wrapper = onnx.GraphProto()
    wrapper.node.add().CopyFrom(node)
    return subgraph_reads(wrapper)
