"""VJPs of activation functions.  ``G = dY``.

Masks are taken from the *output* where that is equivalent, so ONNX Runtime
can still fuse the activation into the producing Conv (the pre-activation
tensor then never needs to be materialised).  At kinks the derivative is taken
as 0 on the flat side (as PyTorch does).

* Relu: ``dX = G * [Y > 0]``
* LeakyRelu(a): ``dX = G * (1 if X > 0 else a)``
* Clip(lo, hi): ``dX = G * [lo < Y < hi]`` (only the given bounds);
  ``dlo = sum(G * [X < lo])``, ``dhi = sum(G * [X > hi])``
* Sigmoid: ``dX = G * Y * (1 - Y)``;  Tanh: ``dX = G * (1 - Y^2)``
* HardSigmoid(a, b): ``Y = clip(a X + b, 0, 1)``, ``dX = G * a * [0 < Y < 1]``
* HardSwish: ``Y = X * clip(X/6 + 1/2, 0, 1)``,
  ``dX = G * (0 if X <= -3, 1 if X >= 3, else X/3 + 1/2)``
* Softmax(axis): ``dX = Y * (G - sum_axis(G * Y))``
* LogSoftmax(axis): ``dX = G - exp(Y) * sum_axis(G)``
* Elu(a): ``dX = G * (1 if X > 0 else Y + a)``
* Softplus: ``dX = G * sigmoid(X)``
"""
from __future__ import annotations

from ..context import Emitter
from . import register
from ._common import attr, input_or_none


@register("Relu")
def relu(ctx: Emitter, node, dys, needs):
    y = node.output[0]
    return [ctx.mask(ctx.op("Greater", [y, ctx.fconst(0.0)]), dys[0])]


@register("LeakyRelu")
def leaky_relu(ctx: Emitter, node, dys, needs):
    g = dys[0]
    alpha = float(attr(node, "alpha", 0.01))
    # for alpha >= 0, Y > 0 <=> X > 0, and testing Y keeps Conv+LeakyRelu fusable
    t = node.output[0] if alpha >= 0 else node.input[0]
    pos = ctx.op("Greater", [t, ctx.fconst(0.0)])
    return [ctx.where(pos, g, ctx.scale(g, alpha))]


@register("Clip", inputs=(0, 1, 2))
def clip(ctx: Emitter, node, dys, needs):
    g = dys[0]
    x, y = node.input[0], node.output[0]
    lo, hi = input_or_none(node, 1), input_or_none(node, 2)
    out = [None, None, None]
    if needs[0]:
        conds = []
        if lo is not None:
            conds.append(ctx.op("Greater", [y, lo]))
        if hi is not None:
            conds.append(ctx.op("Less", [y, hi]))
        if not conds:
            out[0] = g
        else:
            c = conds[0] if len(conds) == 1 else ctx.op("And", conds)
            out[0] = ctx.mask(c, g)
    for slot, bound, cmp in ((1, lo, "Less"), (2, hi, "Greater")):
        if bound is not None and len(needs) > slot and needs[slot]:
            m = ctx.mask(ctx.op(cmp, [x, bound]), g)
            out[slot] = ctx.unbroadcast(m, bound, ctx.shape(y))
    return out


@register("Sigmoid")
def sigmoid(ctx: Emitter, node, dys, needs):
    y = node.output[0]
    one_minus = ctx.sub(ctx.fconst(1.0), y)
    return [ctx.mul(dys[0], ctx.mul(y, one_minus))]


@register("Tanh")
def tanh(ctx: Emitter, node, dys, needs):
    y = node.output[0]
    return [ctx.mul(dys[0], ctx.sub(ctx.fconst(1.0), ctx.mul(y, y)))]


@register("HardSigmoid")
def hard_sigmoid(ctx: Emitter, node, dys, needs):
    alpha = float(attr(node, "alpha", 0.2))
    y = node.output[0]
    inside = ctx.op("And", [ctx.op("Greater", [y, ctx.fconst(0.0)]),
                            ctx.op("Less", [y, ctx.fconst(1.0)])])
    return [ctx.mask(inside, ctx.scale(dys[0], alpha))]


@register("HardSwish")
def hard_swish(ctx: Emitter, node, dys, needs):
    g, x = dys[0], node.input[0]
    slope = ctx.add(ctx.scale(x, 1.0 / 3.0), ctx.fconst(0.5))
    d = ctx.where(ctx.op("Less", [x, ctx.fconst(3.0)]), slope, ctx.fconst(1.0))
    d = ctx.where(ctx.op("Greater", [x, ctx.fconst(-3.0)]), d, ctx.fconst(0.0))
    return [ctx.mul(g, d)]


def _axis(ctx: Emitter, node) -> int:
    axis = int(attr(node, "axis", -1))
    r = ctx.rank(node.input[0])
    return axis + r if axis < 0 and r is not None else axis


@register("Softmax")
def softmax(ctx: Emitter, node, dys, needs):
    g, y = dys[0], node.output[0]
    s = ctx.reduce_sum(ctx.mul(g, y), [_axis(ctx, node)], keepdims=True)
    return [ctx.mul(y, ctx.sub(g, s))]


@register("LogSoftmax")
def log_softmax(ctx: Emitter, node, dys, needs):
    g, y = dys[0], node.output[0]
    s = ctx.reduce_sum(g, [_axis(ctx, node)], keepdims=True)
    return [ctx.sub(g, ctx.mul(ctx.op("Exp", [y]), s))]


@register("Elu")
def elu(ctx: Emitter, node, dys, needs):
    alpha = float(attr(node, "alpha", 1.0))
    g, x, y = dys[0], node.input[0], node.output[0]
    neg_branch = ctx.mul(g, ctx.add(y, ctx.fconst(alpha)))
    return [ctx.where(ctx.op("Greater", [x, ctx.fconst(0.0)]), g, neg_branch)]


@register("Softplus")
def softplus(ctx: Emitter, node, dys, needs):
    return [ctx.mul(dys[0], ctx.op("Sigmoid", [node.input[0]]))]
