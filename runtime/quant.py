"""Quantization math, in one place: integer grids, scales and zero points, (fake) quantization in
numpy, per-channel / block-wise weight scales with MSE-optimal clipping, and activation-range
search on histograms (min-max, percentile, entropy/KL, MSE).

Conventions (the same as ONNX QuantizeLinear / DequantizeLinear):

* ``q = saturate(round_half_to_even(x / scale) + zero_point)``, ``x' = (q - zero_point) * scale``;
* a grid is named by its ONNX element type: ``uint8``, ``int8``, ``int4``, ``uint4``; symmetric
  weight grids are *narrow* (int8 [-127, 127], int4 [-7, 7]) so that the scale maps max|w| to the
  top code exactly and negation is exact;
* scales are float32, strictly positive and finite (TensorRT rejects zero/negative scales);
  a constant-zero tensor gets scale 1;
* ``axis`` selects per-channel parameters (one scale per index of that axis); ``block_size``
  additionally splits that axis' *other* partner axis into blocks (ONNX opset-21 blocked
  quantization: scale shape equals the tensor shape except ``shape[axis] / block_size`` blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ------------------------------------------------------------------------------------------ grids
GRIDS: dict[str, tuple[int, int]] = {
    "uint8": (0, 255),
    "int8": (-128, 127),
    "uint4": (0, 15),
    "int4": (-8, 7),
}
NARROW: dict[str, tuple[int, int]] = {"int8": (-127, 127), "int4": (-7, 7)}
NUMPY_STORAGE = {"uint8": np.uint8, "int8": np.int8, "uint4": np.uint8, "int4": np.int8}
BITS = {"uint8": 8, "int8": 8, "uint4": 4, "int4": 4}
MIN_SCALE = 1e-12


def qrange(dtype: str, narrow: bool = False) -> tuple[int, int]:
    """Smallest and largest code of a grid (narrow: the symmetric range of a signed grid)."""
    if dtype not in GRIDS:
        raise ValueError(f"unknown quantized type {dtype!r} (known: {', '.join(GRIDS)})")
    return NARROW[dtype] if narrow and dtype in NARROW else GRIDS[dtype]


def round_half_even(x: np.ndarray) -> np.ndarray:
    """Round half to even, as ONNX QuantizeLinear does (numpy's rint)."""
    return np.rint(x)


# ------------------------------------------------------------------------------------------ params
def qparams_from_range(rmin, rmax, dtype: str, symmetric: bool, narrow: bool | None = None):
    """(scale float32, zero_point int) mapping [rmin, rmax] onto the grid.

    The range is first widened to include 0 (so zero is exact). Symmetric: zero point 0 for
    signed grids (the middle code 128 for uint8), scale = max(|rmin|, |rmax|) / top code.
    Asymmetric: scale = (rmax - rmin) / (qmax - qmin), zero point = round(qmin - rmin / scale),
    clamped to the grid. Works element-wise on arrays (per-channel ranges).
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    signed = dtype.startswith("int")
    if narrow is None:
        narrow = symmetric and signed
    qmin, qmax = qrange(dtype, narrow)
    if symmetric:
        bound = np.maximum(np.abs(rmin), np.abs(rmax))
        if signed:
            scale = bound / qmax
            zero = np.zeros_like(bound, dtype=np.int64)
        else:  # symmetric around the middle code of an unsigned grid
            mid = (qmin + qmax + 1) // 2
            scale = bound / (qmax - mid)
            zero = np.full_like(bound, mid, dtype=np.int64)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.rint(qmin - rmin / safe), qmin, qmax).astype(np.int64)
    scale = np.where(scale > MIN_SCALE, scale, 1.0).astype(np.float32)
    if scale.ndim == 0:
        return np.float32(scale), int(zero)
    return scale, zero


def quantize(x: np.ndarray, scale, zero_point, dtype: str, axis: int | None = None,
             block_size: int | None = None) -> np.ndarray:
    """Integer codes of ``x`` (int64 array; store with :data:`NUMPY_STORAGE`)."""
    s, z = _expand(np.asarray(x).shape, scale, zero_point, axis, block_size)
    qmin, qmax = qrange(dtype)
    q = round_half_even(np.asarray(x, dtype=np.float32) / s) + z
    return np.clip(q, qmin, qmax).astype(np.int64)


def dequantize(q: np.ndarray, scale, zero_point, axis: int | None = None,
               block_size: int | None = None) -> np.ndarray:
    s, z = _expand(np.asarray(q).shape, scale, zero_point, axis, block_size)
    return ((np.asarray(q, dtype=np.float32) - z) * s).astype(np.float32)


def fake_quant(x: np.ndarray, scale, zero_point, dtype: str, axis: int | None = None,
               block_size: int | None = None) -> np.ndarray:
    """dequantize(quantize(x)): the float value a Q/DQ pair produces."""
    return dequantize(quantize(x, scale, zero_point, dtype, axis, block_size), scale, zero_point, axis, block_size)


def fp16_round(x: np.ndarray) -> np.ndarray:
    """The float32 value of an FP16 cast (round to nearest even, saturating to ±65504)."""
    return np.clip(np.asarray(x, np.float32), -65504, 65504).astype(np.float16).astype(np.float32)


def _expand(shape, scale, zero_point, axis, block_size):
    """Broadcastable scale and zero point (float32) for per-tensor / per-axis / blocked params."""
    s = np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero_point, dtype=np.float32)
    if s.ndim == 0:
        return s, z
    rank = len(shape)
    if block_size:
        # blocked: scale has the tensor's rank; repeat along `axis` by block_size then crop
        ax = axis % rank
        s = np.repeat(s, block_size, axis=ax).take(np.arange(shape[ax]), axis=ax)
        z = np.repeat(z if z.ndim else np.zeros_like(s), block_size, axis=ax) if z.ndim else z
        if z.ndim:
            z = z.take(np.arange(shape[ax]), axis=ax)
        return s, z
    ax = (axis if axis is not None else 1) % rank
    view = [1] * rank
    view[ax] = -1
    return s.reshape(view), (z.reshape(view) if z.ndim else z)


# ------------------------------------------------------------------------------------------ weights
@dataclass
class WeightQuant:
    """Quantized weight: codes, scales (float32), zero points (None: all 0), grid and layout.

    Per-channel weight zero points would keep QAT grids exact where the symmetric range is
    too small, but ONNX Runtime's QLinearConv takes a slow path with them (depthwise ~100x,
    some 1x1 convolutions 5x, measured on MobileNetV2), so they are not produced."""

    q: np.ndarray
    scale: np.ndarray
    dtype: str
    axis: int
    block_size: int | None = None
    method: str = "mse"
    zero_point: np.ndarray | None = None

    @property
    def zero_points(self) -> np.ndarray:
        return np.zeros(self.scale.shape, np.int64) if self.zero_point is None else self.zero_point

    def dequantized(self) -> np.ndarray:
        return dequantize(self.q, self.scale, self.zero_points, self.axis, self.block_size)

    def storage(self) -> np.ndarray:
        return self.q.astype(NUMPY_STORAGE[self.dtype])


def grid_step(values: np.ndarray, max_levels: int = 256) -> float | None:
    """The step g of a uniform grid the values already lie on (quantization-aware-trained models
    store dequantized weights), or None. Every difference between distinct values must be an
    integer multiple of g within 1e-3 relative."""
    flat = np.unique(np.asarray(values, dtype=np.float64).ravel())
    if len(flat) < 3 or len(flat) > max_levels:
        return None
    diffs = np.diff(flat)
    step = diffs.min()
    if step <= 0:
        return None
    ratio = diffs / step
    if np.all(np.abs(ratio - np.rint(ratio)) < 1e-3):
        # refine against the whole span
        span_steps = np.rint((flat[-1] - flat[0]) / step)
        return float((flat[-1] - flat[0]) / span_steps) if span_steps > 0 else float(step)
    return None


def weight_quant(w: np.ndarray, axis: int = 0, dtype: str = "int8", method: str = "mse",
                 block_size: int | None = None, grid: bool = True, ratios: int = 40) -> WeightQuant:
    """Symmetric quantization of a weight tensor, zero point 0, narrow grid.

    ``axis``: per-channel axis (one scale per index); with ``block_size``, the scales are
    blocked along ``axis`` instead (ONNX blocked quantization: one scale per block of
    ``block_size`` consecutive entries along ``axis``, per index of every other axis).
    ``method``: ``minmax`` (scale = max|w| / top code) or ``mse`` (per scale group, the clip
    ratio in [0.3, 1] minimising the squared error, 40 candidates; with ``grid`` the step of an
    existing uniform grid of the tensor — QAT-trained weights — and its multiples are candidates
    too, so such weights are represented exactly when the grid fits).
    """
    w = np.asarray(w, dtype=np.float32)
    qmin, qmax = qrange(dtype, narrow=True)
    groups, restore, to_scale = _scale_groups(w, axis, block_size)
    amax = np.abs(groups).max(axis=1)
    candidates = [np.ones(1)] if method == "minmax" else [np.linspace(0.3, 1.0, ratios)]
    scales_c = amax[:, None] * np.concatenate(candidates)[None, :] / qmax
    if method != "minmax" and grid:
        step = grid_step(w)
        if step is not None:
            mult = np.arange(1, 5, dtype=np.float64)[None, :] * step
            scales_c = np.concatenate([scales_c, np.broadcast_to(mult, (len(amax), mult.shape[1]))], axis=1)
    scales_c = np.where(scales_c > MIN_SCALE, scales_c, 1.0)
    best = _best_scale(groups, scales_c, qmin, qmax)
    q = np.clip(np.rint(groups / best[:, None]), qmin, qmax)
    zero = None
    q = restore(q).astype(np.int64)
    return WeightQuant(q=q, scale=to_scale(best.astype(np.float32)), dtype=dtype, axis=axis,
                       block_size=block_size, method=method, zero_point=zero)


def _best_scale(groups: np.ndarray, scales: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Per row of ``groups`` the candidate scale (row of ``scales``) with the least squared error."""
    rows, cols = groups.shape
    best_err = np.full(rows, np.inf)
    best = scales[:, 0].copy()
    chunk = max(1, int(4e6 // max(cols, 1)))
    for j in range(scales.shape[1]):
        s = scales[:, j:j + 1]
        err = np.empty(rows)
        for start in range(0, rows, chunk):
            g, sc = groups[start:start + chunk], s[start:start + chunk]
            err[start:start + chunk] = np.square(np.clip(np.rint(g / sc), qmin, qmax) * sc - g).sum(axis=1)
        better = err < best_err - 1e-30
        best_err = np.where(better, err, best_err)
        best = np.where(better, s[:, 0], best)
    return best


def _scale_groups(w: np.ndarray, axis: int, block_size: int | None):
    """Rows = the elements sharing one scale.

    Returns ``(rows, restore, to_scale)``: ``restore(rows)`` gives back a w-shaped array and
    ``to_scale(per_row)`` the scale array in ONNX layout (per-axis: shape ``[w.shape[axis]]``;
    blocked: w's shape with ``shape[axis]`` replaced by the number of blocks)."""
    ax = axis % w.ndim
    if not block_size:
        moved = np.moveaxis(w, ax, 0)
        rows = moved.reshape(moved.shape[0], -1)
        return (rows, lambda r: np.moveaxis(r.reshape(moved.shape), 0, ax),
                lambda v: v.reshape(w.shape[ax]))
    n = w.shape[ax]
    blocks = -(-n // block_size)
    pad = blocks * block_size - n
    moved = np.moveaxis(w, ax, -1)
    if pad:
        moved = np.concatenate([moved, np.zeros(moved.shape[:-1] + (pad,), moved.dtype)], axis=-1)
    lead = moved.shape[:-1]
    rows = moved.reshape(-1, block_size)

    def restore(r):
        return np.moveaxis(r.reshape(*lead, blocks * block_size)[..., :n], -1, ax)

    def to_scale(v):
        return np.ascontiguousarray(np.moveaxis(v.reshape(*lead, blocks), -1, ax))

    return rows, restore, to_scale


# ------------------------------------------------------------------------------------------ activations
class Histogram:
    """Histogram of one tensor's values, built in one pass over the data.

    ``bins`` equal bins over [lo, hi], which always contains 0 and the values seen so far; when
    a batch falls outside, the range doubles (to the side that is needed, as often as needed)
    and pairs of adjacent bins merge, so counts stay exact at the coarser resolution. The exact
    min and max seen are kept separately.
    """

    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.min = np.inf
        self.max = -np.inf
        self.counts = np.zeros(bins, dtype=np.float64)
        self.lo = self.hi = 0.0

    def add(self, x: np.ndarray, max_values: int = 1 << 16) -> None:
        """Add a batch: exact min/max over all of ``x``; the histogram counts a strided subset
        of at most ~``max_values`` values (calibration tensors hold millions of values per
        batch; a fixed stride keeps the cost bounded without bias)."""
        x = np.asarray(x, dtype=np.float32).ravel()
        if not x.size:
            return
        xmin, xmax = float(x.min()), float(x.max())
        if not (np.isfinite(xmin) and np.isfinite(xmax)):
            x = x[np.isfinite(x)]
            if not x.size:
                return
            xmin, xmax = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, xmin), max(self.max, xmax)
        stride = max(1, x.size // max_values)
        if stride > 1:
            self._offset = (getattr(self, "_offset", 0) + 1) % stride
            x = x[self._offset::stride]
        if self.hi - self.lo <= 0:
            lo, hi = min(xmin, 0.0), max(xmax, 0.0)
            if hi - lo <= 0:
                hi = lo + 1e-6
            self.lo, self.hi = lo, hi
        while xmin < self.lo or xmax > self.hi:
            self._grow(up=xmax > self.hi)
        width = (self.hi - self.lo) / self.bins
        idx = np.clip(((x - self.lo) * (1.0 / width)).astype(np.int32), 0, self.bins - 1)
        self.counts += np.bincount(idx, minlength=self.bins)

    def _grow(self, up: bool) -> None:
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        width = self.hi - self.lo
        counts = np.zeros(self.bins, dtype=np.float64)
        if up:
            counts[:self.bins // 2] = merged
            self.hi = self.lo + 2 * width
        else:
            counts[self.bins // 2:] = merged
            self.lo = self.hi - 2 * width
        self.counts = counts

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2


def range_minmax(h: Histogram) -> tuple[float, float]:
    return float(min(h.min, 0.0)), float(max(h.max, 0.0))


def range_percentile(h: Histogram, percentile: float = 99.99) -> tuple[float, float]:
    """Clip both tails at ``percentile`` of the mass (one-sided when the tensor is ≥ 0)."""
    total = h.counts.sum()
    if total <= 0:
        return range_minmax(h)
    cdf = np.cumsum(h.counts) / total
    edges = h.edges
    tail = (100.0 - percentile) / 100.0
    hi = float(edges[1:][np.searchsorted(cdf, 1.0 - tail)]) if h.max > 0 else 0.0
    lo = float(edges[:-1][np.searchsorted(cdf, tail)]) if h.min < 0 else 0.0
    return min(lo, 0.0), max(min(hi, h.max), 0.0)


def range_entropy(h: Histogram, levels: int = 256, stride: int = 8) -> tuple[float, float]:
    """TensorRT's entropy calibration on |x|: the threshold T minimising KL(P || Q), P the
    clipped reference distribution, Q its quantization to ``levels/2`` (signed tensors) or
    ``levels`` (non-negative) bins. Thresholds are searched every ``stride`` bins."""
    centers = h.centers
    nonneg = h.min >= 0
    amax = max(abs(h.lo), abs(h.hi))
    if amax <= 0 or h.counts.sum() <= 0:
        return range_minmax(h)
    nb = 2048
    absh, edges = np.histogram(np.abs(centers), bins=nb, range=(0.0, amax), weights=h.counts)
    target = levels if nonneg else levels // 2
    best_t, best_kl = nb, np.inf
    for i in range(target, nb + 1, stride):
        p = absh[:i].copy()
        p[i - 1] += absh[i:].sum()
        if p.sum() <= 0:
            continue
        # quantize p into `target` bins, expand back over the non-zero support
        idx = (np.arange(i) * target) // i
        merged = np.bincount(idx, weights=absh[:i], minlength=target)
        nonzero = (absh[:i] > 0).astype(np.float64)
        norm = np.bincount(idx, weights=nonzero, minlength=target)
        q = np.where(nonzero > 0, merged[idx] / np.maximum(norm[idx], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_kl, best_t = kl, i
    threshold = float(edges[min(best_t, nb)])
    lo = 0.0 if nonneg else max(h.min, -threshold)
    return min(lo, 0.0), max(min(h.max, threshold), 0.0)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    qs = q.sum()
    if qs <= 0:
        return np.inf
    q = q / qs
    mask = p > 0
    qm = np.where(q[mask] > 0, q[mask], 1e-12)
    return float(np.sum(p[mask] * np.log(p[mask] / qm)))


def expected_sq_error(h: Histogram, lo: float, hi: float, dtype: str, symmetric: bool) -> float:
    """Expected squared quantization error of the histogram's values for the range [lo, hi]:
    clipping error for values outside, rounding error (s²/12) inside."""
    scale, zero = qparams_from_range(lo, hi, dtype, symmetric)
    qmin, qmax = qrange(dtype, narrow=symmetric and dtype.startswith("int"))
    c = h.centers
    q = np.clip(np.rint(c / scale) + zero, qmin, qmax)
    deq = (q - zero) * scale
    inside = (c >= (qmin - zero) * scale) & (c <= (qmax - zero) * scale)
    err = np.where(inside, float(scale) ** 2 / 12.0, (c - deq) ** 2)
    return float(np.sum(h.counts * err))


def range_mse(h: Histogram, dtype: str = "uint8", symmetric: bool = False, steps: int = 48) -> tuple[float, float]:
    """The range minimising :func:`expected_sq_error`: the upper and lower ends are shrunk
    independently over ``steps`` candidates each (coordinate descent, two rounds)."""
    lo0, hi0 = range_minmax(h)
    if hi0 - lo0 <= 0:
        return lo0, hi0
    fractions = np.linspace(0.05, 1.0, steps)
    lo, hi = lo0, hi0
    if symmetric:
        bound = max(-lo0, hi0)
        errs = [expected_sq_error(h, -f * bound, f * bound, dtype, True) for f in fractions]
        f = fractions[int(np.argmin(errs))]
        return (-f * bound if lo0 < 0 else 0.0), f * bound
    for _ in range(2):
        if hi0 > 0:
            errs = [expected_sq_error(h, lo, f * hi0, dtype, False) for f in fractions]
            hi = f_hi = fractions[int(np.argmin(errs))] * hi0
        if lo0 < 0:
            errs = [expected_sq_error(h, f * lo0, hi, dtype, False) for f in fractions]
            lo = fractions[int(np.argmin(errs))] * lo0
    return float(lo), float(hi)


RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")


def activation_range(h: Histogram, method: str, dtype: str, symmetric: bool) -> tuple[float, float]:
    if method == "minmax":
        return range_minmax(h)
    if method == "percentile":
        return range_percentile(h)
    if method == "entropy":
        return range_entropy(h, levels=256)
    if method == "mse":
        return range_mse(h, dtype, symmetric)
    raise ValueError(f"unknown calibration method {method!r} (known: {', '.join(RANGE_METHODS)})")


# ------------------------------------------------------------------------------------------ sizes
def weight_bytes(count: int, precision: str) -> float:
    """Storage bytes of ``count`` weights at a plan precision (scales not included)."""
    return count * {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}[precision]


# ------------------------------------------------------------------------------------------ GPTQ
def gptq(w: np.ndarray, hessian: np.ndarray, dtype: str = "int4", block_size: int | None = None,
         damp: float = 0.01) -> WeightQuant:
    """Error-compensating rounding (GPTQ, Frantar et al. 2023) of a 2-D weight ``w`` [rows, K]
    (one output channel per row, K the reduction axis) given ``hessian`` = E[x xᵀ] [K, K] of the
    layer's inputs: columns are quantized in order and each rounding error is spread over the
    columns not yet quantized, weighted by the inverse Hessian, so the layer's *output* error is
    minimised rather than the weight error. Symmetric, zero point 0, narrow grid; scales per row
    (``block_size`` None) or per row and block of ``block_size`` columns (computed, MSE-optimal,
    when the block starts, from the already-compensated weights). Returns the codes and scales in
    the layout of :func:`weight_quant` with axis 1 (blocked) or axis 0 (per row)."""
    w = np.array(w, dtype=np.float64)
    rows, k = w.shape
    qmin, qmax = qrange(dtype, narrow=True)
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper triangular
    except np.linalg.LinAlgError:
        return weight_quant(w.astype(np.float32), 1 if block_size else 0, dtype, block_size=block_size, grid=False)
    q = np.zeros_like(w)
    if block_size:
        nblocks = -(-k // block_size)
        scales = np.zeros((rows, nblocks))
    else:
        row_scale = weight_quant(w.astype(np.float32), 0, dtype, grid=False).scale.astype(np.float64)
    for j in range(k):
        if block_size and j % block_size == 0:
            blk = w[:, j:j + block_size]
            wq = weight_quant(blk.astype(np.float32), 0, dtype, grid=False)
            scales[:, j // block_size] = wq.scale
        s = scales[:, j // block_size] if block_size else row_scale
        col = np.clip(np.rint(w[:, j] / s), qmin, qmax)
        q[:, j] = col
        err = (w[:, j] - col * s) / hinv[j, j]
        if j + 1 < k:
            w[:, j + 1:] -= np.outer(err, hinv[j, j + 1:])
    if block_size:
        return WeightQuant(q=q.astype(np.int64), scale=scales.astype(np.float32), dtype=dtype, axis=1,
                           block_size=block_size, method="gptq")
    return WeightQuant(q=q.astype(np.int64), scale=row_scale.astype(np.float32), dtype=dtype, axis=0, method="gptq")
