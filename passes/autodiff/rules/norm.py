"""VJP of BatchNormalization in inference mode.

``Y = s * (X - m) * r + b`` per channel (axis 1), ``r = 1/sqrt(v + eps)``.
With ``G = dY`` and sums over all axes but the channel axis:

* ``dX = G * s * r``
* ``ds = sum(G * (X - m) * r)``,  ``db = sum(G)``
* ``dm = -db * s * r``,  ``dv = -0.5 * ds * s * r^2``
"""
from __future__ import annotations

from ..context import Emitter
from ..errors import unsupported
from . import register
from ._common import attr


@register("BatchNormalization", inputs=(0, 1, 2, 3, 4))
def batch_norm(ctx: Emitter, node, dys, needs):
    if int(attr(node, "training_mode", 0)) or sum(1 for o in node.output if o) > 1:
        raise unsupported(node, "only inference-mode BatchNormalization is supported")
    g = dys[0]
    x, s, b, m, v = node.input[:5]
    rank = ctx.rank(x)
    if rank is None:
        raise unsupported(node, "unknown input rank")
    eps = float(attr(node, "epsilon", 1e-5))
    bc = list(range(1, rank - 1))  # [C] -> [C, 1, ..., 1]

    def per_channel(t):
        return ctx.unsqueeze(t, bc) if bc else t

    red = [0] + list(range(2, rank))
    r = ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.add(v, ctx.fconst(eps))])])
    out = [None] * 5
    if needs[0]:
        out[0] = ctx.mul(g, per_channel(ctx.mul(s, r)))
    need_ds = needs[1] or needs[4]
    need_db = needs[2] or needs[3]
    ds = db = None
    if need_ds:
        xhat = ctx.mul(ctx.sub(x, per_channel(m)), per_channel(r))
        ds = ctx.reduce_sum(ctx.mul(g, xhat), red, keepdims=False)
    if need_db:
        db = ctx.reduce_sum(g, red, keepdims=False)
    if needs[1]:
        out[1] = ds
    if needs[2]:
        out[2] = db
    if needs[3]:
        out[3] = ctx.neg(ctx.mul(db, ctx.mul(s, r)))
    if needs[4]:
        out[4] = ctx.scale(ctx.mul(ds, ctx.mul(s, ctx.mul(r, r))), -0.5)
    return out
