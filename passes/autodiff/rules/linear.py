"""VJPs of Gemm and MatMul.

Gemm: ``Y = alpha * A' @ B' + beta * C`` with ``A' = A^T if transA else A``
(same for B).  With ``G = dY``:

* ``dA' = alpha * G @ B'^T`` and ``dA = dA'^T`` when ``transA``;
* ``dB' = alpha * A'^T @ G`` and ``dB = dB'^T`` when ``transB``;
* ``dC  = beta * unbroadcast(G)`` (C is unidirectionally broadcast to Y).

Each product is emitted as one Gemm whose trans flags absorb all transposes.

MatMul (numpy semantics, batch dims broadcast, 1-D operands promoted):
``dA = unbroadcast(G @ B^T)``, ``dB = unbroadcast(A^T @ G)``, where ``^T``
swaps the last two axes and the reductions undo batch broadcasting.
"""
from __future__ import annotations

from ..context import Emitter
from . import register
from ._common import attr, input_or_none


@register("Gemm", inputs=(0, 1, 2))
def gemm(ctx: Emitter, node, dys, needs):
    g = dys[0]
    a, b = node.input[0], node.input[1]
    c = input_or_none(node, 2)
    alpha = float(attr(node, "alpha", 1.0))
    beta = float(attr(node, "beta", 1.0))
    ta, tb = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    grads = [None, None, None]
    if needs[0]:
        if not ta:   # dA = G @ B'^T
            grads[0] = ctx.op("Gemm", [g, b], alpha=alpha, transB=1 - tb, hint="dA")
        else:        # dA = (G @ B'^T)^T = B' @ G^T
            grads[0] = ctx.op("Gemm", [b, g], alpha=alpha, transA=tb, transB=1, hint="dA")
    if needs[1]:
        if not tb:   # dB = A'^T @ G
            grads[1] = ctx.op("Gemm", [a, g], alpha=alpha, transA=1 - ta, hint="dB")
        else:        # dB = (A'^T @ G)^T = G^T @ A'
            grads[1] = ctx.op("Gemm", [g, a], alpha=alpha, transA=1, transB=ta, hint="dB")
    if c is not None and len(needs) > 2 and needs[2]:
        grads[2] = ctx.unbroadcast(ctx.scale(g, beta), c, ctx.shape(node.output[0]))
    return grads


def _swap_last2(ctx: Emitter, x: str, rank: int) -> str:
    return ctx.transpose(x, list(range(rank - 2)) + [rank - 1, rank - 2])


@register("MatMul", inputs=(0, 1))
def matmul(ctx: Emitter, node, dys, needs):
    g = dys[0]
    a, b, y = node.input[0], node.input[1], node.output[0]
    sa, sb, sy = ctx.shape(a), ctx.shape(b), ctx.shape(y)
    if sa is None or sb is None:
        raise ValueError(f"MatMul {node.name!r}: operand ranks must be known")
    a1, b1 = len(sa) == 1, len(sb) == 1
    # Promote 1-D operands as numpy does, and give G the matching axes.
    a_, sa_ = (ctx.unsqueeze(a, [0]), (1,) + tuple(sa)) if a1 else (a, tuple(sa))
    b_, sb_ = (ctx.unsqueeze(b, [1]), tuple(sb) + (1,)) if b1 else (b, tuple(sb))
    g_ = g
    if a1:
        g_ = ctx.unsqueeze(g_, [-2 if not b1 else -1])
    if b1:
        g_ = ctx.unsqueeze(g_, [-1])
    if sy is not None:
        sy_ = list(sy)
        if b1:
            sy_ = sy_ + [1]
        if a1:
            sy_ = sy_[:-1] + [1] + sy_[-1:]
        batch = sy_[:-2]
    else:
        batch = None
    rg = max(len(sa_), len(sb_))
    grads = [None, None]
    if needs[0]:
        da = ctx.op("MatMul", [g_, _swap_last2(ctx, b_, len(sb_))], hint="dA")
        ds = None if batch is None else tuple(batch) + sa_[-2:]
        da = _reduce_to(ctx, da, a_, sa_, ds, rg, ctx.info(a).elem_type)
        grads[0] = ctx.squeeze(da, [0]) if a1 else da
    if needs[1]:
        db = ctx.op("MatMul", [_swap_last2(ctx, a_, len(sa_)), g_], hint="dB")
        ds = None if batch is None else tuple(batch) + sb_[-2:]
        db = _reduce_to(ctx, db, b_, sb_, ds, rg, ctx.info(b).elem_type)
        grads[1] = ctx.squeeze(db, [-1]) if b1 else db
    return grads


def _reduce_to(ctx: Emitter, grad: str, operand: str, operand_shape: tuple,
               grad_shape: tuple | None, grad_rank: int, elem_type: int) -> str:
    """Undo batch broadcasting of a MatMul operand (whose shape may be synthetic)."""
    if operand not in ctx.infos or ctx.shape(operand) != operand_shape:
        ctx.set_info(operand, elem_type=elem_type, shape=operand_shape)
    if grad_shape is None:
        grad_shape = None if grad_rank is None else (None,) * grad_rank
    return ctx.unbroadcast(grad, operand, grad_shape)
