"""Loss heads appended to the forward graph, with their seed gradients.

All classification losses are the batch mean of the cross-entropy of the
first model output ``z`` (logits, ``[N, C]``; higher ranks are flattened from
axis 1) against integer labels ``t``::

    L = -(1/N) * sum_n log_softmax(z_n)[t_n]
    dL/dz_n = (softmax(z_n) - onehot(t_n)) / N

They differ only in where ``t`` comes from:

``"cross_entropy"``
    given labels (graph input, int64 ``[N]``).
``"true_fisher"``
    labels *sampled* from the model's own predictive distribution
    ``softmax(z_n)`` — squared gradients then estimate the true Fisher
    information.  Sampling is in-graph by inverse CDF from a uniform input
    ``u`` (float ``[N]``, supplied by the caller, e.g. from a seeded numpy
    RNG), so results are deterministic and need a single pass:
    ``t_n = min(#{c : cdf_n[c] < u_n}, C - 1)``.
``"empirical_fisher"``
    labels = ``argmax(z_n)``, the model's own most likely class (the issue's
    naming; in the literature "empirical Fisher" usually means the dataset's
    true labels, which is ``"cross_entropy"`` here).

Labels are constants for differentiation (no gradient flows through the
sampling or the argmax).  ``"scalar"`` treats the first output itself as the
loss (it must hold one element); its seed gradient is 1 — handy for tests and
custom losses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from .context import Emitter
from .errors import GradientError

LOSSES = ("cross_entropy", "true_fisher", "empirical_fisher", "scalar")


@dataclass
class LossHead:
    loss: str                       # scalar loss tensor
    seed: str                       # dL/d(first output)
    labels: str | None = None       # int64 [N] labels used (None for "scalar")
    new_inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    labels_input: str | None = None
    uniform_input: str | None = None


def build_loss(ctx: Emitter, logits: str, kind: str, labels_input: str,
               uniform_input: str) -> LossHead:
    if kind not in LOSSES:
        raise GradientError(f"unknown loss {kind!r}; expected one of {LOSSES}")
    shp = ctx.shape(logits)
    if kind == "scalar":
        static = ctx.info(logits).static_shape()
        if static is not None and int(np.prod(static)) != 1:
            raise GradientError(f"loss='scalar' needs a one-element first output, got shape {static}")
        seed = ctx.op("ConstantOfShape", [ctx.dyn_shape(logits)],
                      value=onnx.numpy_helper.from_array(np.ones(1, dtype=ctx.np_float)), hint="seed")
        return LossHead(loss=logits, seed=seed)

    if shp is None or len(shp) < 2:
        raise GradientError(f"classification losses need logits of rank >= 2, got shape {shp}")
    z = logits if len(shp) == 2 else ctx.op("Flatten", [logits], axis=1, hint="logits2d")
    batch = shp[0] if shp[0] is not None else "N"
    ncls = int(np.prod(shp[1:])) if all(isinstance(d, int) for d in shp[1:]) else None
    lsm = ctx.op("LogSoftmax", [z], axis=1, hint="log_softmax")
    probs = ctx.op("Exp", [lsm], hint="softmax")
    head = LossHead(loss="", seed="")
    if kind == "cross_entropy":
        labels = labels_input
        head.labels_input = labels_input
        head.new_inputs.append(helper.make_tensor_value_info(labels_input, TensorProto.INT64, [batch]))
    elif kind == "empirical_fisher":
        labels = ctx.op("ArgMax", [z], axis=1, keepdims=0, hint="labels_argmax")
    else:  # true_fisher: inverse-CDF sampling from softmax(z)
        head.uniform_input = uniform_input
        head.new_inputs.append(helper.make_tensor_value_info(uniform_input, ctx.float_type, [batch]))
        cdf = ctx.op("CumSum", [probs, ctx.iconst(1)], hint="cdf")
        below = ctx.op("Cast", [ctx.op("Less", [cdf, ctx.unsqueeze(uniform_input, [1])])],
                       to=TensorProto.INT64)
        count = ctx.reduce_sum(below, [1], keepdims=False)
        last = ctx.iconst(ncls - 1) if ncls is not None else \
            ctx.op("Sub", [ctx.squeeze(ctx.dim_tensor(z, 1), [0]), ctx.iconst(1)])
        labels = ctx.op("Min", [count, last], hint="labels_sampled")
    head.labels = labels
    # forward loss value
    picked = ctx.op("GatherElements", [lsm, ctx.unsqueeze(labels, [1])], axis=1)
    head.loss = ctx.neg(ctx.op("ReduceMean", [picked], keepdims=0, hint="mean_logp"))
    # seed gradient (softmax - onehot) / N
    classes = ctx.iconst(np.arange(ncls)) if ncls is not None else \
        ctx.op("Range", [ctx.iconst(0), ctx.squeeze(ctx.dim_tensor(z, 1), [0]), ctx.iconst(1)])
    onehot = ctx.op("Cast", [ctx.op("Equal", [ctx.unsqueeze(labels, [1]), classes])], to=ctx.float_type)
    n = ctx.op("Cast", [ctx.dim_tensor(z, 0)], to=ctx.float_type)
    dz = ctx.div(ctx.sub(probs, onehot), n)
    head.seed = dz if z == logits else ctx.reshape_like(dz, logits)
    return head
