"""VJPs of elementwise arithmetic and unary math ops.

Binary ops broadcast (numpy rules); every operand gradient is reduced back to
the operand's shape with :meth:`Emitter.unbroadcast`.  ``G = dY`` below.

* Add: ``dA = G``, ``dB = G``;  Sub: ``dA = G``, ``dB = -G``
* Mul: ``dA = G * B``, ``dB = G * A``
* Div: ``dA = G / B``, ``dB = -G * Y / B``   (``Y = A / B``)
* Sum(x_1..x_k): ``dx_i = G``;  Mean(x_1..x_k): ``dx_i = G / k``
* Max / Min(x_1..x_k): ``dx_i = G * [x_i == Y and no earlier x_j == Y]``
  (ties go to the first maximal operand, so the gradient is not duplicated)
* Pow: ``dX = G * p * X^(p-1)``; ``dp = G * Y * log(X)`` (exponent gradient,
  only when the exponent itself needs one)
* Neg: ``-G``;  Sqrt: ``G / (2 Y)``;  Exp: ``G * Y``;  Log: ``G / X``;
  Reciprocal: ``-G * Y^2``;  Abs: ``G * sign(X)``;
  Erf: ``G * 2/sqrt(pi) * exp(-X^2)``
* Where(c, a, b): ``da = G where c``, ``db = G where not c``
* Cast between float types: ``dX = Cast(G)`` back to X's type.
"""
from __future__ import annotations

import math

from ..context import Emitter
from ..errors import unsupported
from . import register


def _reduce(ctx: Emitter, g: str, node, i: int) -> str:
    return ctx.unbroadcast(g, node.input[i], ctx.shape(node.output[0]))


def _binary(ctx: Emitter, node, needs, ga=None, gb=None):
    """Reduce per-operand full-size gradients ``ga``/``gb`` (callables)."""
    out = [None, None]
    if needs[0]:
        out[0] = _reduce(ctx, ga(), node, 0)
    if needs[1]:
        out[1] = _reduce(ctx, gb(), node, 1)
    return out


@register("Add")
def add(ctx, node, dys, needs):
    g = dys[0]
    return _binary(ctx, node, needs, lambda: g, lambda: g)


@register("Sub")
def sub(ctx, node, dys, needs):
    g = dys[0]
    return _binary(ctx, node, needs, lambda: g, lambda: ctx.neg(g))


@register("Mul")
def mul(ctx, node, dys, needs):
    g = dys[0]
    a, b = node.input[0], node.input[1]
    return _binary(ctx, node, needs, lambda: ctx.mul(g, b), lambda: ctx.mul(g, a))


@register("Div")
def div(ctx, node, dys, needs):
    g = dys[0]
    b, y = node.input[1], node.output[0]
    return _binary(ctx, node, needs, lambda: ctx.div(g, b),
                   lambda: ctx.neg(ctx.div(ctx.mul(g, y), b)))


@register("Sum")
def sum_(ctx, node, dys, needs):
    g = dys[0]
    return [_reduce(ctx, g, node, i) if need else None for i, need in enumerate(needs)]


@register("Mean")
def mean(ctx, node, dys, needs):
    g = ctx.scale(dys[0], 1.0 / len(node.input))
    return [_reduce(ctx, g, node, i) if need else None for i, need in enumerate(needs)]


@register("Max", "Min")
def max_min(ctx, node, dys, needs):
    g, y = dys[0], node.output[0]
    out, taken = [], None
    for i, (x, need) in enumerate(zip(node.input, needs)):
        hit = ctx.op("Equal", [x, y])
        first = hit if taken is None else ctx.op("And", [hit, ctx.op("Not", [taken])])
        out.append(_reduce(ctx, ctx.mask(first, g), node, i) if need else None)
        if i + 1 < len(node.input):
            taken = hit if taken is None else ctx.op("Or", [taken, hit])
    return out


@register("Neg")
def neg(ctx, node, dys, needs):
    return [ctx.neg(dys[0])]


@register("Identity")
def identity(ctx, node, dys, needs):
    return [dys[0]]


@register("Pow")
def pow_(ctx, node, dys, needs):
    g = dys[0]
    x, p, y = node.input[0], node.input[1], node.output[0]
    out = [None, None]
    if needs[0]:
        pv = ctx.value(p)
        if pv is not None and pv.size == 1:
            pf = float(pv.reshape(-1)[0])
            if pf == 1.0:
                d = g
            elif pf == 2.0:
                d = ctx.mul(g, ctx.scale(x, 2.0))
            else:
                d = ctx.mul(g, ctx.scale(ctx.op("Pow", [x, ctx.fconst(pf - 1.0)]), pf))
        else:
            pc = p if ctx.info(p).elem_type == ctx.info(x).elem_type else \
                ctx.op("Cast", [p], to=ctx.info(x).elem_type)
            d = ctx.mul(g, ctx.mul(pc, ctx.op("Pow", [x, ctx.sub(pc, ctx.fconst(1.0))])))
        out[0] = _reduce(ctx, d, node, 0)
    if needs[1]:
        if ctx.info(p).elem_type != ctx.info(x).elem_type:
            raise unsupported(node, "exponent gradient needs the exponent in the base's type")
        out[1] = _reduce(ctx, ctx.mul(ctx.mul(g, y), ctx.op("Log", [x])), node, 1)
    return out


@register("Sqrt")
def sqrt(ctx, node, dys, needs):
    return [ctx.div(ctx.scale(dys[0], 0.5), node.output[0])]


@register("Exp")
def exp(ctx, node, dys, needs):
    return [ctx.mul(dys[0], node.output[0])]


@register("Log")
def log(ctx, node, dys, needs):
    return [ctx.div(dys[0], node.input[0])]


@register("Reciprocal")
def reciprocal(ctx, node, dys, needs):
    y = node.output[0]
    return [ctx.neg(ctx.mul(dys[0], ctx.mul(y, y)))]


@register("Abs")
def abs_(ctx, node, dys, needs):
    return [ctx.mul(dys[0], ctx.op("Sign", [node.input[0]]))]


@register("Erf")
def erf(ctx, node, dys, needs):
    x = node.input[0]
    e = ctx.op("Exp", [ctx.neg(ctx.mul(x, x))])
    return [ctx.mul(dys[0], ctx.scale(e, 2.0 / math.sqrt(math.pi)))]


@register("Where", inputs=(1, 2))
def where(ctx, node, dys, needs):
    g = dys[0]
    c = node.input[0]
    zero = ctx.fconst(0.0)
    out = [None, None, None]
    if needs[1]:
        out[1] = _reduce(ctx, ctx.where(c, g, zero), node, 1)
    if needs[2]:
        out[2] = _reduce(ctx, ctx.where(c, zero, g), node, 2)
    return out


@register("Cast")
def cast(ctx, node, dys, needs):
    to = ctx.info(node.input[0]).elem_type
    if not ctx.info(node.output[0]).is_float:
        raise unsupported(node, "cast to a non-float type is not differentiable")
    return [ctx.op("Cast", [dys[0]], to=to)]
