"""VJPs of the normalisations: BatchNormalization (inference mode) and LRN.

BatchNormalization: ``Y = s * (X - m) * r + b`` per channel (axis 1), ``r = 1/sqrt(v + eps)``.
With ``G = dY`` and sums over all axes but the channel axis:

* ``dX = G * s * r``
* ``ds = sum(G * (X - m) * r)``,  ``db = sum(G)``
* ``dm = -db * s * r``,  ``dv = -0.5 * ds * s * r^2``

LRN (across channels): ``S_c = bias + alpha/size * sum_{i in W(c)} X_i^2`` with the window
``W(c) = [c - lo, c + hi]`` clipped to the channels, ``lo = floor((size-1)/2)``,
``hi = ceil((size-1)/2)``, and ``Y_c = X_c * S_c^-beta``.  Then

* ``dX_i = G_i * S_i^-beta - (2 alpha beta / size) * X_i * sum_{c: i in W(c)} G_c X_c S_c^(-beta-1)``

and ``i in W(c)`` iff ``c in [i - hi, i + lo]``: the same window sum, mirrored.
"""
from __future__ import annotations

from ..context import Emitter
from ..errors import unsupported
from . import register
from ._common import attr


def channel_window_sum(ctx: Emitter, x: str, rank: int, before: int, after: int) -> str:
    """``out_c = sum_{i = c - before}^{c + after} x_i`` over axis 1, zero outside the channels.

    Zero-pads axis 1 by (before, after) and adds the ``before + after + 1`` shifted slices; the
    slices end relative to the padded end, so the channel count may be dynamic.
    """
    pads = [0] * (2 * rank)
    pads[1], pads[rank + 1] = before, after
    padded = ctx.op("Pad", [x, ctx.iconst(pads)]) if before or after else x
    width = before + after + 1
    total = None
    for k in range(width):
        end = k - (width - 1)  # negative: counted from the padded end
        part = ctx.slice(padded, [k], [end if end < 0 else 2 ** 62], [1])
        total = part if total is None else ctx.add(total, part)
    return total


@register("LRN", inputs=(0,))
def lrn(ctx: Emitter, node, dys, needs):
    x, g = node.input[0], dys[0]
    rank = ctx.rank(x)
    if rank is None:
        raise unsupported(node, "unknown input rank")
    size = int(attr(node, "size"))
    alpha, beta = float(attr(node, "alpha", 1e-4)), float(attr(node, "beta", 0.75))
    bias = float(attr(node, "bias", 1.0))
    lo, hi = (size - 1) // 2, size // 2  # floor((size-1)/2), ceil((size-1)/2)
    squares = channel_window_sum(ctx, ctx.mul(x, x), rank, lo, hi)
    s = ctx.add(ctx.scale(squares, alpha / size), ctx.fconst(bias))
    s_pow = ctx.op("Pow", [s, ctx.fconst(-beta)])  # S^-beta
    direct = ctx.mul(g, s_pow)
    through_s = ctx.div(ctx.mul(direct, x), s)  # G_c X_c S_c^(-beta-1)
    mirrored = channel_window_sum(ctx, through_s, rank, hi, lo)
    return [ctx.sub(direct, ctx.scale(ctx.mul(x, mirrored), 2.0 * alpha * beta / size))]


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
