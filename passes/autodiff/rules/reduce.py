"""VJPs of ReduceSum / ReduceMean.  ``G = dY``.

``Y = sum_{axes} X`` gives ``dX = broadcast(G)`` to X's shape (after
re-inserting the reduced axes when ``keepdims=0``); ReduceMean divides by the
number of reduced elements ``prod(X.shape[axes])``.  Empty axes reduce
everything unless ``noop_with_empty_axes`` is set (then Y = X).
"""
from __future__ import annotations

from ..context import Emitter
from ..errors import unsupported
from . import register
from ._common import attr, const_input


def _axes(ctx: Emitter, node) -> list[int] | None:
    """Reduced axes (normalised); ``None`` = no-op."""
    x = node.input[0]
    r = ctx.rank(x)
    if r is None:
        raise unsupported(node, "unknown input rank")
    axes_in_input = node.op_type == "ReduceSum" or ctx.opset >= 18
    axes = const_input(ctx, node, 1, "axes") if axes_in_input else attr(node, "axes")
    if axes is None or len(axes) == 0:
        if int(attr(node, "noop_with_empty_axes", 0)):
            return None
        return list(range(r))
    return sorted(int(a) + r if a < 0 else int(a) for a in axes)


def _reduce_vjp(ctx: Emitter, node, dys, mean: bool):
    g, x = dys[0], node.input[0]
    axes = _axes(ctx, node)
    if axes is None:
        return [g]
    if not int(attr(node, "keepdims", 1)):
        g = ctx.unsqueeze(g, axes)
    if mean:
        g = ctx.div(g, ctx.numel_of_axes(x, axes))
    return [ctx.expand_like(g, x, axes)]


@register("ReduceSum", inputs=(0,))
def reduce_sum(ctx, node, dys, needs):
    return _reduce_vjp(ctx, node, dys, mean=False)


@register("ReduceMean", inputs=(0,))
def reduce_mean(ctx, node, dys, needs):
    return _reduce_vjp(ctx, node, dys, mean=True)
