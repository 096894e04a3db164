"""VJP of Conv (any group count incl. depthwise, strides, pads, auto_pad, dilations).

Forward (per spatial dim, with ``xp`` the zero-padded input, ``g`` groups)::

    y[n, co, o] = b[co] + sum_{ci in group(co), k} w[co, ci', k] * xp[n, ci, o*s + k*d]

Gradients:

* ``db[co]   = sum_{n, o} dy[n, co, o]``
* ``dx``     = the adjoint of the convolution = a transposed convolution of
  ``dy`` with the same weight.  Emitted as ``ConvTranspose`` with explicit
  pads/output_padding chosen so its output has exactly ``x``'s spatial size
  (see :func:`conv_transpose_pads`).  For stride 1 the same map is a plain
  ``Conv`` of ``dy`` with the spatially flipped, group-transposed weight and
  pads ``d*(k-1) - p``; ONNX Runtime runs that through its fast (NCHWc) Conv
  kernels, so it is used by default (option ``conv_input_grad="auto"``;
  ``"conv_transpose"`` forces ConvTranspose everywhere).
* ``dw[co, ci', k] = sum_{n, o} dy[n, co, o] * xp[n, ci, o*s + k*d]``: a
  correlation of ``x`` with ``dy``.  Ungrouped convs: one Gemm per kernel tap
  ``dy^T[Co, N*P] @ x_k[N*P, Ci]`` (``x_k`` = the strided window of the padded
  input seen by tap ``k``; a single Gemm for 1x1).  Grouped/depthwise convs:
  one Conv whose batch axis is the per-group input channel, whose channels are
  (group, batch) and whose kernel is ``dy`` (stride = forward dilation,
  dilation = forward stride), cropped to the kernel size.
"""
from __future__ import annotations

import itertools

import numpy as np

from ..context import INT64_MAX, Emitter
from ..errors import unsupported
from . import register
from ._common import Window, attr, input_or_none, static_dim, window

MAX_GEMM_TAPS = 49  # ungrouped kernels up to 7x7 use the per-tap GEMM weight gradient


def conv_transpose_pads(win: Window) -> tuple[list[int], list[int], list[int]]:
    """Pads and output_padding making ``ConvTranspose(dy)`` the exact adjoint.

    A stride-``s`` ConvTranspose without padding produces
    ``full = s*(Ho-1) + d*(k-1) + 1`` positions, which are the padded-input
    coordinates ``[0, full)`` touched by the forward windows.  Cropping ``pb``
    at the start gives x's coordinates; the end crop is ``full - pb - H``.  When
    that is negative (trailing input rows never read by any window, e.g. odd
    sizes with stride 2) we crop nothing and append ``output_padding`` zeros
    instead, which is always ``< s``.
    """
    pb, pe, op = [], [], []
    for i in range(win.nsp):
        full = win.strides[i] * (win.out_size[i] - 1) + win.dilations[i] * (win.kernel[i] - 1) + 1
        end = full - win.pads_begin[i] - win.in_size[i]
        pb.append(win.pads_begin[i])
        pe.append(max(end, 0))
        op.append(max(-end, 0))
    return pb, pe, op


def regroup_weight_for_adjoint(ctx: Emitter, w: str, co: int, ci_g: int, group: int,
                               kernel: list[int]) -> str:
    """``w[Co, Ci/g, K] -> w'[Ci, Co/g, K]`` (swap in/out channels inside each group)."""
    nsp = len(kernel)
    co_g = co // group
    if group == 1:
        return ctx.transpose(w, [1, 0] + list(range(2, 2 + nsp)))
    if ci_g == 1 or co_g == 1:
        # the swap is a pure reshape when one side has a single channel per group
        return ctx.reshape(w, [ci_g * group, co_g] + kernel)
    w5 = ctx.reshape(w, [group, co_g, ci_g] + kernel)
    w5 = ctx.transpose(w5, [0, 2, 1] + list(range(3, 3 + nsp)))
    return ctx.reshape(w5, [ci_g * group, co_g] + kernel)


def conv_input_grad(ctx: Emitter, dy: str, w: str, win: Window, group: int,
                    co: int, ci_g: int) -> str:
    """``dx`` for ``y = conv(x, w)`` (weights ``w`` [Co, Ci/g, *K])."""
    nsp = win.nsp
    flip_pads_b = [d * (k - 1) - p for d, k, p in zip(win.dilations, win.kernel, win.pads_begin)]
    flip_pads_e = [d * (k - 1) - p for d, k, p in zip(win.dilations, win.kernel, win.pads_end)]
    use_conv = (
        ctx.options.get("conv_input_grad", "auto") == "auto"
        and all(s == 1 for s in win.strides)
        and min(flip_pads_b + flip_pads_e) >= 0
    )
    if use_conv:
        wt = regroup_weight_for_adjoint(ctx, w, co, ci_g, group, win.kernel)
        if any(k > 1 for k in win.kernel):
            axes = list(range(2, 2 + nsp))
            wt = ctx.slice(wt, [-1] * nsp, [-INT64_MAX] * nsp, axes, [-1] * nsp)
        return ctx.op("Conv", [dy, wt], kernel_shape=win.kernel, pads=flip_pads_b + flip_pads_e,
                      dilations=win.dilations, group=group, hint="dx_conv")
    pb, pe, op = conv_transpose_pads(win)
    return ctx.op("ConvTranspose", [dy, w], kernel_shape=win.kernel, strides=win.strides,
                  dilations=win.dilations, pads=pb + pe, output_padding=op, group=group,
                  hint="dx_convT")


def _pad_spatial(ctx: Emitter, x: str, win: Window) -> str:
    if not any(win.pads):
        return x
    return ctx.op("Pad", [x, ctx.iconst([0, 0] + win.pads_begin + [0, 0] + win.pads_end)])


def conv_weight_grad(ctx: Emitter, x: str, dy: str, win: Window, group: int,
                     ci: int, co: int) -> str:
    """``dw`` [Co, Ci/g, *K] for ``y = conv(x, w)``.

    Ungrouped convs: one Gemm per kernel tap ``t`` over (batch, positions),
    ``dw[:, :, t] = dy^T[Co, N*P] @ x_t[Ci, N*P]^T`` with ``x_t`` the strided
    window of the padded input read by tap ``t`` (for 1x1 kernels that is the
    whole weight gradient).  ONNX Runtime runs these GEMMs 1.5-3x faster than
    the Conv formulation below.  Grouped convs (incl. depthwise) use one Conv
    that correlates x with dy (see the module docstring).
    """
    nsp = win.nsp
    sp = list(range(2, 2 + nsp))
    ci_g, co_g = ci // group, co // group
    ntaps = int(np.prod(win.kernel))
    if group == 1 and ntaps <= MAX_GEMM_TAPS:
        xt = ctx.transpose(_pad_spatial(ctx, x, win), [1, 0] + sp)     # [Ci, N, *S_padded]
        dyt = ctx.reshape(ctx.transpose(dy, [1, 0] + sp), [co, -1])    # [Co, N*P]
        parts = []
        for tap in itertools.product(*[range(k) for k in win.kernel]):
            starts = [t * d for t, d in zip(tap, win.dilations)]
            ends = [b + s * (o - 1) + 1 for b, s, o in zip(starts, win.strides, win.out_size)]
            xs = ctx.slice(xt, starts, ends, sp, win.strides)           # [Ci, N, *So]
            parts.append(ctx.op("Gemm", [dyt, ctx.reshape(xs, [ci, -1])], transB=1, hint="dw_tap"))
        if ntaps == 1:
            return ctx.reshape(parts[0], [co, ci] + [1] * nsp)
        cat = ctx.reshape(ctx.op("Concat", parts, axis=0), [ntaps, co, ci])
        return ctx.reshape(ctx.transpose(cat, [1, 2, 0]), [co, ci] + win.kernel)
    # Grouped: correlate x with dy via a Conv whose kernel is dy.
    if group == 1:
        xr = ctx.transpose(x, [1, 0] + sp)                          # [Ci, N, *S]
        dyr = ctx.transpose(dy, [1, 0] + sp)                        # [Co, N, *So]
    else:
        x5 = ctx.reshape(x, [-1, group, ci_g] + win.in_size)        # [N, g, Ci/g, *S]
        x5 = ctx.transpose(x5, [2, 1, 0] + [a + 1 for a in sp])     # [Ci/g, g, N, *S]
        xr = ctx.reshape(x5, [ci_g, -1] + win.in_size)              # [Ci/g, g*N, *S]
        d5 = ctx.reshape(dy, [-1, group, co_g] + win.out_size)      # [N, g, Co/g, *So]
        d5 = ctx.transpose(d5, [1, 2, 0] + [a + 1 for a in sp])     # [g, Co/g, N, *So]
        dyr = ctx.reshape(d5, [co, -1] + win.out_size)              # [Co, N, *So]
    o = ctx.op("Conv", [xr, dyr], strides=win.dilations, dilations=win.strides,
               pads=win.pads, group=group, kernel_shape=win.out_size, hint="dw_conv")
    # o: [Ci/g, Co, *K'] with K' >= K (extra taps only ever see padding/unused rows)
    k_full = [(i + b + e - s * (out - 1) - 1) // d + 1 for i, b, e, s, out, d in zip(
        win.in_size, win.pads_begin, win.pads_end, win.strides, win.out_size, win.dilations)]
    if k_full != win.kernel:
        o = ctx.slice(o, [0] * nsp, win.kernel, sp)
    if ci_g == 1:
        return ctx.reshape(o, [co, 1] + win.kernel)
    return ctx.transpose(o, [1, 0] + sp)


@register("Conv", inputs=(0, 1, 2))
def conv(ctx: Emitter, node, dys, needs):
    """Conv: see the module docstring for the math of dx, dw, db."""
    dy = dys[0]
    x, w = node.input[0], node.input[1]
    b = input_or_none(node, 2)
    wshape = ctx.info(w).static_shape()
    if wshape is None:
        raise unsupported(node, "the weight shape must be static")
    co, ci_g, kernel = wshape[0], wshape[1], list(wshape[2:])
    group = int(attr(node, "group", 1))
    ks = attr(node, "kernel_shape")
    if ks is not None and list(ks) != kernel:
        raise unsupported(node, "kernel_shape disagrees with the weight shape")
    win = window(ctx, node, x, kernel)
    grads = [None, None, None]
    if needs[0]:
        grads[0] = conv_input_grad(ctx, dy, w, win, group, co, ci_g)
    if needs[1]:
        ci = static_dim(ctx, node, x, 1, "weight gradient")
        grads[1] = conv_weight_grad(ctx, x, dy, win, group, ci, co)
    if b is not None and len(needs) > 2 and needs[2]:
        grads[2] = ctx.reduce_sum(dy, [0] + list(range(2, 2 + win.nsp)), keepdims=False)
    return grads
