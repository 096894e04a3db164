"""VJPs of pooling ops.  ``G = dY``.

* GlobalAveragePool: ``dX = broadcast(G) / prod(spatial)``.
* AveragePool: each output is ``sum(window) / c[o]`` with ``c[o]`` the window
  size (or, for ``count_include_pad=0``, the number of non-pad elements, which
  varies near borders).  Hence ``dX = adjoint_depthwise_conv(G / c, ones)``,
  i.e. the Conv input-gradient (ConvTranspose / flipped Conv) of a depthwise
  all-ones kernel applied to ``G / c``.  A window covering the whole input
  (output 1x1, no pads) reduces to the GlobalAveragePool formula.
* MaxPool: ``dX[j] = sum_{o : argmax(o) = j} G[o]``.  The forward node is made
  to emit its ``Indices`` output (flat indices into X, as ONNX defines them)
  and the gradient is ``ScatterElements(zeros, indices, G, reduction='add')``,
  which is right for overlapping windows that share a maximum.
* GlobalMaxPool: same with the flat ``ArgMax`` over the spatial axes.
"""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from ..context import Emitter
from ..errors import unsupported
from . import register
from ._common import attr, static_dim, static_spatial, window
from .conv import conv_input_grad


def _spatial(ctx: Emitter, x: str) -> list[int]:
    r = ctx.rank(x)
    return list(range(2, r))


@register("GlobalAveragePool")
def global_average_pool(ctx: Emitter, node, dys, needs):
    x = node.input[0]
    sp = _spatial(ctx, x)
    g = ctx.div(dys[0], ctx.numel_of_axes(x, sp))
    return [ctx.expand_like(g, x, sp)]


def _window_counts(win, include_pad: bool) -> np.ndarray:
    """Per-output divisor of AveragePool (outer product over spatial dims)."""
    counts = np.ones([1, 1] + win.out_size, dtype=np.float64)
    for i in range(win.nsp):
        lo = -win.pads_begin[i] if include_pad else 0
        hi = win.in_size[i] + (win.pads_end[i] if include_pad else 0)
        o = np.arange(win.out_size[i])[:, None]
        k = np.arange(win.kernel[i])[None, :]
        pos = o * win.strides[i] + k * win.dilations[i] - win.pads_begin[i]
        c = ((pos >= lo) & (pos < hi)).sum(axis=1).astype(np.float64)
        shape = [1] * (2 + win.nsp)
        shape[2 + i] = win.out_size[i]
        counts = counts * c.reshape(shape)
    return counts


@register("AveragePool")
def average_pool(ctx: Emitter, node, dys, needs):
    g, x = dys[0], node.input[0]
    kernel = list(attr(node, "kernel_shape"))
    win = window(ctx, node, x, kernel, ceil_mode=bool(attr(node, "ceil_mode", 0)))
    include_pad = bool(attr(node, "count_include_pad", 0))
    if (all(o == 1 for o in win.out_size) and not any(win.pads)
            and all(d == 1 for d in win.dilations) and win.kernel == win.in_size):
        return [ctx.expand_like(ctx.scale(g, 1.0 / float(np.prod(kernel))), x, _spatial(ctx, x))]
    counts = _window_counts(win, include_pad)
    if np.all(counts == counts.flat[0]):
        gs = ctx.scale(g, 1.0 / float(counts.flat[0]))
    else:
        gs = ctx.mul(g, ctx.fconst(1.0 / counts))
    c = static_dim(ctx, node, x, 1, "AveragePool gradient")
    ones = ctx.fconst(np.ones([c, 1] + kernel))
    return [conv_input_grad(ctx, gs, ones, win, group=c, co=c, ci_g=1)]


@register("MaxPool", inputs=(0,))
def max_pool(ctx: Emitter, node, dys, needs):
    g, x = dys[0], node.input[0]
    static_spatial(ctx, node, x, "MaxPool gradient")
    if int(attr(node, "storage_order", 0)) == 0:
        idx = ctx.ensure_output(node, 1, "maxpool_indices")
    else:  # need row-major indices: run a twin MaxPool
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs["storage_order"] = 0
        _, idx = ctx.op("MaxPool", [x], 2, hint="maxpool_twin", **attrs)
    return [_scatter_add_flat(ctx, x, ctx.reshape(idx, [-1]), ctx.reshape(g, [-1]))]


def _zeros_flat(ctx: Emitter, x: str) -> str:
    shp = ctx.info(x).static_shape()
    n = ctx.iconst([int(np.prod(shp))]) if shp is not None else \
        ctx.reshape(ctx.op("Size", [x]), [1])
    return ctx.op("ConstantOfShape", [n],
                  value=numpy_helper.from_array(np.zeros(1, dtype=ctx.np_float)), hint="zeros")


def _scatter_add_flat(ctx: Emitter, x: str, flat_idx: str, flat_g: str) -> str:
    """``zeros_like(x)`` with ``flat_g`` added at flat positions ``flat_idx``."""
    dx = ctx.op("ScatterElements", [_zeros_flat(ctx, x), flat_idx, flat_g], axis=0,
                reduction="add", hint="dx_scatter")
    return ctx.reshape_like(dx, x)


@register("GlobalMaxPool")
def global_max_pool(ctx: Emitter, node, dys, needs):
    g, x = dys[0], node.input[0]
    if ctx.rank(x) is None:
        raise unsupported(node, "unknown input rank")
    xr = ctx.reshape(x, [0, 0, -1])                               # [N, C, P]
    am = ctx.op("ArgMax", [xr], axis=2, keepdims=1)               # [N, C, 1]
    zeros = ctx.op("ConstantOfShape", [ctx.dyn_shape(xr)],
                   value=numpy_helper.from_array(np.zeros(1, dtype=ctx.np_float)))
    dx = ctx.op("ScatterElements", [zeros, am, ctx.reshape(g, [0, 0, 1])], axis=2)
    return [ctx.reshape_like(dx, x)]
