"""Float64 reference execution and finite-difference checks for gradient graphs.

ONNX Runtime has no float64 CPU kernels for Conv, ConvTranspose, AveragePool,
GlobalAveragePool, HardSigmoid, HardSwish or Erf, so float64 checks run on
``onnx.reference.ReferenceEvaluator``.  Its Conv is slow on big kernels, its
grouped ConvTranspose is wrong (it slices the weight by output channels) and
its Erf rounds through float32, its MaxPool Indices are wrong for several
configurations and its Pad rejects negative pads, so these are replaced here by small,
independent numpy implementations written straight from the ONNX operator
definitions (Conv/ConvTranspose: a loop over kernel taps — or over output
positions when there are fewer — with one ``einsum`` each).

Also provided: building a "weighted-sum" scalar loss around any graph, and
central finite differences / directional derivatives in float64.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

_LETTERS = "xyzuvw"


def _explicit_pads(in_size, kernel, strides, dil, auto_pad, pads):
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pb, pe = [], []
        for i in range(n):
            out = -(-in_size[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - in_size[i])
            small, big = total // 2, total - total // 2
            pb.append(small if auto_pad == "SAME_UPPER" else big)
            pe.append(big if auto_pad == "SAME_UPPER" else small)
        return pb, pe
    if auto_pad == "VALID" or pads is None:
        return [0] * n, [0] * n
    return list(pads[:n]), list(pads[n:])


def conv_reference(x, w, b=None, strides=None, dilations=None, pads_begin=None, pads_end=None, group=1):
    """Direct N-d grouped convolution (cross-correlation), any float dtype."""
    nsp = x.ndim - 2
    strides = strides or [1] * nsp
    dil = dilations or [1] * nsp
    pb = pads_begin or [0] * nsp
    pe = pads_end or [0] * nsp
    n, c = x.shape[:2]
    m, cg = w.shape[:2]
    k = w.shape[2:]
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(pb, pe)))
    out = [(xp.shape[2 + i] - ((k[i] - 1) * dil[i] + 1)) // strides[i] + 1 for i in range(nsp)]
    xg = xp.reshape(n, group, cg, *xp.shape[2:])
    wg = w.reshape(group, m // group, cg, *k)
    y = np.zeros((n, group, m // group, *out), dtype=np.result_type(x, w))
    sp = _LETTERS[:nsp]
    if np.prod(k) <= np.prod(out):
        for tap in itertools.product(*[range(kk) for kk in k]):
            sl = tuple(slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(tap, dil, strides, out))
            y += np.einsum(f"ngc{sp},gmc->ngm{sp}", xg[(Ellipsis,) + sl], wg[(Ellipsis,) + tap])
    else:
        for pos in itertools.product(*[range(o) for o in out]):
            sl = tuple(slice(p * s, p * s + d * (kk - 1) + 1, d) for p, s, d, kk in zip(pos, strides, dil, k))
            y[(Ellipsis,) + pos] = np.einsum(f"ngc{sp},gmc{sp}->ngm", xg[(Ellipsis,) + sl], wg)
    y = y.reshape(n, m, *out)
    if b is not None:
        y = y + b.reshape([1, m] + [1] * nsp)
    return y


def conv_transpose_reference(x, w, b=None, strides=None, dilations=None, pads=None,
                             output_padding=None, group=1):
    """Direct N-d grouped transposed convolution, straight from the ONNX definition."""
    nsp = x.ndim - 2
    strides = strides or [1] * nsp
    dil = dilations or [1] * nsp
    pads = pads or [0] * (2 * nsp)
    op = output_padding or [0] * nsp
    n, c = x.shape[:2]
    cg, mg = w.shape[0] // group, w.shape[1]
    k = w.shape[2:]
    h = x.shape[2:]
    full = [strides[i] * (h[i] - 1) + dil[i] * (k[i] - 1) + 1 + op[i] for i in range(nsp)]
    y = np.zeros((n, group, mg, *full), dtype=np.result_type(x, w))
    xg = x.reshape(n, group, cg, *h)
    wg = w.reshape(group, cg, mg, *k)
    sp = _LETTERS[:nsp]
    for tap in itertools.product(*[range(kk) for kk in k]):
        sl = tuple(slice(t * d, t * d + s * (hh - 1) + 1, s) for t, d, s, hh in zip(tap, dil, strides, h))
        y[(Ellipsis,) + sl] += np.einsum(f"ngc{sp},gcm->ngm{sp}", xg, wg[(Ellipsis,) + tap])
    crop = tuple(slice(pads[i], full[i] - pads[nsp + i]) for i in range(nsp))
    y = y.reshape(n, group * mg, *full)[(slice(None), slice(None)) + crop]
    if b is not None:
        y = y + b.reshape([1, group * mg] + [1] * nsp)
    return y


class Conv(OpRun):
    op_domain = ""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
             pads=None, strides=None):
        nsp = X.ndim - 2
        strides = list(strides or [1] * nsp)
        dil = list(dilations or [1] * nsp)
        k = list(W.shape[2:])
        ap = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
        pb, pe = _explicit_pads(list(X.shape[2:]), k, strides, dil, ap, pads)
        return (conv_reference(X, W, B, strides, dil, pb, pe, int(group or 1)).astype(X.dtype),)


class ConvTranspose(OpRun):
    op_domain = ""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
             output_padding=None, output_shape=None, pads=None, strides=None):
        ap = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
        if ap != "NOTSET" or output_shape is not None:
            raise NotImplementedError("test ConvTranspose supports explicit pads only")
        return (conv_transpose_reference(X, W, B, list(strides or []) or None, list(dilations or []) or None,
                                         list(pads or []) or None, list(output_padding or []) or None,
                                         int(group or 1)).astype(X.dtype),)


def max_pool_reference(x, kernel, strides=None, dilations=None, pads_begin=None, pads_end=None,
                       ceil_mode=False, storage_order=0):
    """N-d max pooling returning (Y, flat Indices into X) as ONNX defines them."""
    nsp = x.ndim - 2
    strides = strides or [1] * nsp
    dil = dilations or [1] * nsp
    pb = pads_begin or [0] * nsp
    pe = pads_end or [0] * nsp
    size = x.shape[2:]
    out = []
    for i in range(nsp):
        span = size[i] + pb[i] + pe[i] - ((kernel[i] - 1) * dil[i] + 1)
        o = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
        if ceil_mode and (o - 1) * strides[i] >= size[i] + pb[i]:
            o -= 1
        out.append(o)
    need = [(out[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(nsp)]
    extra = [max(0, need[i] - (size[i] + pb[i] + pe[i])) for i in range(nsp)]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pb[i], pe[i] + extra[i]) for i in range(nsp)],
                constant_values=-np.inf)
    n, c = x.shape[:2]
    nc_off = (np.arange(n * c).reshape(n, c) * int(np.prod(size))).reshape([n, c] + [1] * nsp)
    best = np.full((n, c, *out), -np.inf, dtype=x.dtype)
    arg = np.zeros((n, c, *out), dtype=np.int64)
    grids = np.meshgrid(*[np.arange(o) for o in out], indexing="ij")
    for tap in itertools.product(*[range(k) for k in kernel]):
        sl = tuple(slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(tap, dil, strides, out))
        v = xp[(Ellipsis,) + sl]
        coords = [grids[i] * strides[i] + tap[i] * dil[i] - pb[i] for i in range(nsp)]
        if storage_order:
            flat = np.zeros_like(coords[0])
            for i in reversed(range(nsp)):
                flat = flat * size[i] + coords[i]
        else:
            flat = np.zeros_like(coords[0])
            for i in range(nsp):
                flat = flat * size[i] + coords[i]
        better = v > best
        best = np.where(better, v, best)
        arg = np.where(better, nc_off + flat, arg)
    return best, arg


class MaxPool(OpRun):
    """The stock reference MaxPool returns wrong Indices for several configurations."""

    op_domain = ""

    def _run(self, X, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
             storage_order=None, strides=None):
        nsp = X.ndim - 2
        ap = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
        strides = list(strides or [1] * nsp)
        dil = list(dilations or [1] * nsp)
        pb, pe = _explicit_pads(list(X.shape[2:]), list(kernel_shape), strides, dil, ap, pads)
        y, i = max_pool_reference(X, list(kernel_shape), strides, dil, pb, pe, bool(ceil_mode),
                                  int(storage_order or 0))
        return (y.astype(X.dtype), i)


class Pad(OpRun):
    """Constant-mode Pad with negative pads (crops), which the stock reference rejects."""

    op_domain = ""

    def _run(self, data, pads, constant_value=None, axes=None, mode=None):
        m = mode.decode() if isinstance(mode, bytes) else (mode or "constant")
        if m != "constant":
            raise NotImplementedError("test Pad supports constant mode only")
        r = data.ndim
        axes = list(range(r)) if axes is None else [int(a) % r for a in axes]
        k = len(axes)
        pb, pe = [0] * r, [0] * r
        for j, a in enumerate(axes):
            pb[a], pe[a] = int(pads[j]), int(pads[k + j])
        cv = 0 if constant_value is None else np.asarray(constant_value).reshape(-1)[0]
        crop = tuple(slice(max(-b, 0), data.shape[i] - max(-e, 0)) for i, (b, e) in enumerate(zip(pb, pe)))
        out = np.pad(data[crop], [(max(b, 0), max(e, 0)) for b, e in zip(pb, pe)], constant_values=cv)
        return (out.astype(data.dtype),)


class Erf(OpRun):
    """The stock reference Erf rounds through float32; this one keeps the input precision."""

    op_domain = ""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype),)


class LRN(OpRun):
    """The stock reference LRN loops over the batch axis instead of the channels (wrong for N != C).

    ``Y_c = X_c / (bias + alpha/size * sum_{i=c-floor((size-1)/2)}^{c+ceil((size-1)/2)} X_i^2)^beta``,
    the window clipped to the channels; any rank >= 3.
    """

    op_domain = ""

    def _run(self, x, alpha=None, beta=None, bias=None, size=None):
        alpha = 1e-4 if alpha is None else alpha
        beta = 0.75 if beta is None else beta
        bias = 1.0 if bias is None else bias
        lo, hi = (size - 1) // 2, size // 2
        squares = x * x
        square_sum = np.zeros_like(x)
        for c in range(x.shape[1]):
            square_sum[:, c] = squares[:, max(0, c - lo): c + hi + 1].sum(axis=1)
        return ((x / (bias + alpha / size * square_sum) ** beta).astype(x.dtype),)


def reference_evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    """A float64-capable evaluator with exact Conv / ConvTranspose / Erf / LRN / MaxPool / Pad."""
    return ReferenceEvaluator(model, new_ops=[Conv, ConvTranspose, Erf, LRN, MaxPool, Pad])


def ort_session(model: onnx.ModelProto, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------ model helpers
def make_model(nodes, inputs: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
               outputs: Sequence[str], opset: int = 17, loss_weights: Mapping[str, np.ndarray] | None = None,
               ir_version: int = 8) -> onnx.ModelProto:
    """A model from ``nodes``; with ``loss_weights`` its only output is the
    scalar ``sum_o sum(o * R_o)`` (named ``loss``), else ``outputs`` are exposed.

    ``inputs`` become graph inputs (shapes from the arrays), ``params``
    initializers.  Float type follows the arrays.
    """
    nodes = list(nodes)
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in params.items()]
    gin = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), np.shape(v))
           for k, v in inputs.items()]
    if loss_weights:
        terms = []
        for j, (o, r) in enumerate(loss_weights.items()):
            inits.append(numpy_helper.from_array(np.asarray(r), f"__R{j}"))
            nodes.append(helper.make_node("Mul", [o, f"__R{j}"], [f"__m{j}"]))
            nodes.append(helper.make_node("ReduceSum", [f"__m{j}"], [f"__s{j}"], keepdims=0))
            terms.append(f"__s{j}")
        nodes.append(helper.make_node("Sum", terms, ["loss"]) if len(terms) > 1
                     else helper.make_node("Identity", terms, ["loss"]))
        ft = helper.np_dtype_to_tensor_dtype(np.asarray(next(iter(loss_weights.values()))).dtype)
        gout = [helper.make_tensor_value_info("loss", ft, [])]
    else:
        gout = [helper.make_empty_tensor_value_info(o) for o in outputs]
    g = helper.make_graph(nodes, "g", gin, gout, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    if not loss_weights:
        m = onnx.shape_inference.infer_shapes(m)
        vi = {v.name: v for v in m.graph.value_info}
        for o in m.graph.output:
            if o.name in vi:
                o.CopyFrom(vi[o.name])
    return m


def lift_initializers(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Copy of ``model`` where initializers ``names`` become graph inputs (to perturb them)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = []
    for t in m.graph.initializer:
        if t.name in names:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def initializer_values(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, np.ndarray]:
    by = {t.name: t for t in model.graph.initializer}
    return {n: numpy_helper.to_array(by[n]) for n in names if n in by}


# ------------------------------------------------------ finite differences
def directional_fd(loss_fn: Callable[[dict], float], point: dict[str, np.ndarray],
                   direction: dict[str, np.ndarray], eps: float) -> float:
    """``(L(p + eps d) - L(p - eps d)) / (2 eps)``."""
    plus = {k: v + eps * direction[k] if k in direction else v for k, v in point.items()}
    minus = {k: v - eps * direction[k] if k in direction else v for k, v in point.items()}
    return (loss_fn(plus) - loss_fn(minus)) / (2.0 * eps)


def rel_err(fd: float, an: float, scale: float) -> float:
    """``|fd - an| / max(|fd|, |an|, scale)``."""
    return abs(fd - an) / max(abs(fd), abs(an), scale, 1e-300)


def check_gradients(loss_fn: Callable[[dict], float], point: dict[str, np.ndarray],
                    grads: dict[str, np.ndarray], rng: np.random.Generator, n_coords: int = 6,
                    eps: float = 1e-6, directions: int = 1) -> float:
    """Worst relative error of ``grads`` vs central differences of ``loss_fn``.

    Per tensor: ``directions`` random directional derivatives, plus up to
    ``n_coords`` single coordinates.  The scale floor (``1e-3 * ||g|| ||d||``
    resp. ``1e-3 * max|g|``) keeps near-zero derivatives from dominating.
    """
    worst = 0.0
    for name, g in grads.items():
        v = point[name]
        gnorm = float(np.linalg.norm(g))
        for _ in range(directions):
            d = rng.standard_normal(v.shape)
            fd = directional_fd(loss_fn, point, {name: d}, eps)
            an = float(np.sum(g * d))
            worst = max(worst, rel_err(fd, an, 1e-3 * gnorm * float(np.linalg.norm(d))))
        flat = np.arange(v.size)
        picks = flat if v.size <= n_coords else rng.choice(flat, n_coords, replace=False)
        gmax = float(np.abs(g).max()) if g.size else 0.0
        for i in picks:
            d = np.zeros(v.size)
            d[i] = 1.0
            fd = directional_fd(loss_fn, point, {name: d.reshape(v.shape)}, eps)
            worst = max(worst, rel_err(fd, float(g.reshape(-1)[i]), 1e-3 * gmax))
    return worst


def norm_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / max(||b||, tiny)``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_abs_away(x: np.ndarray, points: Sequence[float], margin: float) -> np.ndarray:
    """Move entries of ``x`` at least ``margin`` away from each of ``points`` (kinks)."""
    x = np.array(x, dtype=np.float64)
    for p in points:
        close = np.abs(x - p) < margin
        x[close] = p + np.where(x[close] >= p, margin, -margin) * (1 + np.abs(x[close] - p) / margin)
    return x


__all__ = [
    "Conv", "ConvTranspose", "Erf", "LRN", "MaxPool", "Pad", "check_gradients", "max_pool_reference", "conv_reference", "conv_transpose_reference",
    "directional_fd", "initializer_values", "lift_initializers", "make_model", "max_abs_away",
    "norm_rel_diff", "ort_session", "reference_evaluator", "rel_err",
]
