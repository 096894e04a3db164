"""VJPs of data-movement ops.  ``G = dY``.

* Reshape / Flatten / Squeeze / Unsqueeze: ``dX = reshape(G, shape(X))``.
* Transpose(perm): ``dX = transpose(G, inverse(perm))``.
* Expand: ``dX = unbroadcast(G)`` to X's shape.
* Concat(axis): ``dX_i = G[..., off_i : off_i + n_i, ...]`` (one Split when
  the sizes are static, else Slices with run-time offsets).
* Split(axis): ``dX = concat(G_1..G_k)``, zeros for outputs without gradient.
* Slice: the adjoint scatters ``G`` back into a zero tensor of X's shape.
  Unit-step axes use one ``Pad``; other steps (incl. negative) use
  ``Gather(Pad(G, 1 zero row), map)`` where ``map`` sends every selected index
  of X to its row of G and every other index to the zero row.
* Pad (constant mode, pads may be negative = crop): ``dX`` slices away what
  was padded and zero-pads what was cropped;
  ``d(constant_value) = sum(G) - sum(G restricted to X's region)``.
* Dropout (inference) / Identity: ``dX = G``.
"""
from __future__ import annotations

import numpy as np

from ..context import INT64_MAX, Emitter
from ..errors import unsupported
from . import register
from ._common import attr, const_input, input_or_none


@register("Reshape", "Flatten", "Squeeze", "Unsqueeze", inputs=(0,))
def reshape_like(ctx: Emitter, node, dys, needs):
    return [ctx.reshape_like(dys[0], node.input[0])]


@register("Transpose")
def transpose(ctx: Emitter, node, dys, needs):
    perm = attr(node, "perm")
    if perm is None:
        r = ctx.rank(node.input[0])
        if r is None:
            raise unsupported(node, "unknown rank")
        perm = list(range(r))[::-1]
    inv = list(np.argsort(perm))
    return [ctx.transpose(dys[0], inv)]


@register("Expand", inputs=(0,))
def expand(ctx: Emitter, node, dys, needs):
    return [ctx.unbroadcast(dys[0], node.input[0], ctx.shape(node.output[0]))]


@register("Dropout", inputs=(0,))
def dropout(ctx: Emitter, node, dys, needs):
    tm = input_or_none(node, 2)
    if tm is not None:
        v = ctx.value(tm)
        if v is None or bool(np.asarray(v).reshape(-1)[0]):
            raise unsupported(node, "only inference-mode Dropout (training_mode false) is supported")
    return [dys[0]]


def _norm_axis(ctx: Emitter, node, axis: int, tensor: str) -> int:
    if axis < 0:
        r = ctx.rank(tensor)
        if r is None:
            raise unsupported(node, "unknown rank")
        axis += r
    return axis


@register("Concat")
def concat(ctx: Emitter, node, dys, needs):
    g, y = dys[0], node.output[0]
    axis = _norm_axis(ctx, node, int(attr(node, "axis")), y)
    ins = list(node.input)
    sizes = [ctx.shape(i)[axis] if ctx.shape(i) is not None else None for i in ins]
    if all(isinstance(s, int) for s in sizes):
        parts = ctx.op("Split", [g, ctx.iconst(sizes)], len(ins), axis=axis, hint="dconcat")
        return [p if need else None for p, need in zip(parts, needs)]
    out, start = [], ctx.iconst([0])
    for i, need in zip(ins, needs):
        end = ctx.add(start, ctx.dim_tensor(i, axis))
        out.append(ctx.op("Slice", [g, start, end, ctx.iconst([axis])]) if need else None)
        start = end
    return out


@register("Split", inputs=(0,))
def split(ctx: Emitter, node, dys, needs):
    axis = _norm_axis(ctx, node, int(attr(node, "axis", 0)), node.input[0])
    parts = [d if d is not None else ctx.zeros_like(o) for d, o in zip(dys, node.output)]
    return [ctx.op("Concat", parts, axis=axis, hint="dsplit")]


@register("Slice", inputs=(0,))
def slice_(ctx: Emitter, node, dys, needs):
    g, x = dys[0], node.input[0]
    xs = ctx.shape(x)
    if xs is None:
        raise unsupported(node, "unknown input rank")
    r = len(xs)
    starts = const_input(ctx, node, 1, "starts")
    ends = const_input(ctx, node, 2, "ends")
    axes = const_input(ctx, node, 3, "axes")
    steps = const_input(ctx, node, 4, "steps")
    axes = list(range(len(starts))) if axes is None else [int(a) + r if a < 0 else int(a) for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    pad_b, pad_e = [0] * r, [0] * r
    cur = g
    for a, st, en, sp in zip(axes, starts, ends, steps):
        dim = xs[a]
        if not isinstance(dim, int):
            raise unsupported(node, f"sliced axis {a} must have a static size")
        idx = np.arange(dim)[slice(int(st), int(en), sp)]
        if len(idx) == 0:
            return [ctx.zeros_like(x)]
        if sp == 1:
            pad_b[a], pad_e[a] = int(idx[0]), int(dim - idx[-1] - 1)
            continue
        # scatter rows back: rows not selected read an appended zero row
        gather_map = np.full(dim, len(idx), dtype=np.int64)
        gather_map[idx] = np.arange(len(idx))
        one_zero_row = [0] * (2 * r)
        one_zero_row[r + a] = 1
        cur = ctx.op("Pad", [cur, ctx.iconst(one_zero_row)])
        cur = ctx.op("Gather", [cur, ctx.iconst(gather_map)], axis=a)
    if any(pad_b) or any(pad_e):
        cur = ctx.op("Pad", [cur, ctx.iconst(pad_b + pad_e)])
    return [cur]


@register("Pad", inputs=(0, 2))
def pad(ctx: Emitter, node, dys, needs):
    g, x, y = dys[0], node.input[0], node.output[0]
    mode = attr(node, "mode", "constant")
    if mode != "constant":
        raise unsupported(node, f"Pad mode {mode!r} (only 'constant' is supported)")
    r = ctx.rank(x)
    if r is None:
        raise unsupported(node, "unknown input rank")
    pads = const_input(ctx, node, 1, "pads")
    if pads is None:
        pads = attr(node, "pads")
    pads = [int(p) for p in pads]
    axes = const_input(ctx, node, 3, "axes")
    axes = list(range(r)) if axes is None else [int(a) + r if a < 0 else int(a) for a in axes]
    k = len(axes)
    pb, pe = [0] * r, [0] * r
    for j, a in enumerate(axes):
        pb[a], pe[a] = pads[j], pads[k + j]
    # adjoint: slice away positive pads, zero-pad negative ones (crops)
    sl_axes = [a for a in range(r) if pb[a] > 0 or pe[a] > 0]
    inner = g
    if sl_axes:
        inner = ctx.slice(g, [max(pb[a], 0) for a in sl_axes],
                          [-pe[a] if pe[a] > 0 else INT64_MAX for a in sl_axes], sl_axes)
    dx = inner
    if any(p < 0 for p in pb + pe):
        dx = ctx.op("Pad", [inner, ctx.iconst([max(-p, 0) for p in pb] + [max(-p, 0) for p in pe])])
    out = [dx if needs[0] else None, None, None]
    cv = input_or_none(node, 2)
    if cv is not None and len(needs) > 2 and needs[2]:
        total = ctx.op("ReduceSum", [g], keepdims=0)
        d = ctx.sub(total, ctx.op("ReduceSum", [inner], keepdims=0))
        out[2] = ctx.reshape_like(d, cv)
    return out
