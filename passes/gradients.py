"""Gradients of ONNX models, computed by ONNX Runtime on a generated backward graph.

Public API
----------
``gradients(model, inputs, wrt, labels=None, loss="cross_entropy")``
    One-shot: gradients of the batch-mean loss w.r.t. ``wrt`` (initializers,
    graph inputs and/or intermediate tensors), as float32 arrays.

``build_gradient_model(model, wrt, loss=..., labels_input="hqpc_labels", dtype=np.float32)``
    Build the forward+backward ONNX model once (:class:`GradientModel`) and run
    many batches through one ONNX Runtime session (what the sensitivity pass
    does).

``activation_gradients(model, inputs, names=None, labels=None, loss=...)``
    Convenience: gradients w.r.t. intermediate activations (by default the
    outputs of every Conv / Gemm / MatMul).

Losses (all are the batch mean of ``-log softmax(logits)[label]`` over the
first model output; see :mod:`hqpc.passes.autodiff.losses`):

* ``"cross_entropy"`` — labels given by the caller (``labels`` required);
* ``"true_fisher"`` — labels sampled from the model's predictive distribution
  ``softmax(logits)`` (seeded: ``seed``), so squared gradients estimate the
  true Fisher information;
* ``"empirical_fisher"`` — labels = ``argmax(logits)`` (the issue's naming; in
  the literature "empirical Fisher" uses the dataset labels, i.e.
  ``"cross_entropy"`` here);
* ``"scalar"`` — the first output is itself the loss (one element).

The backward graph uses only standard ONNX operators, so stock ONNX Runtime
runs it with all graph optimisations.  Unsupported operators raise
:class:`GradientError` (a ``ValueError``) naming the node and op before
anything runs.
"""
from __future__ import annotations

import collections
import hashlib
import os
import threading
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from .autodiff import GradientError, build_backward
from .autodiff.losses import LOSSES

__all__ = [
    "GradientError",
    "GradientModel",
    "GradientResult",
    "activation_gradients",
    "build_gradient_model",
    "clear_cache",
    "gradients",
]


@dataclass
class GradientResult:
    loss: float
    grads: dict[str, np.ndarray]
    logits: np.ndarray
    labels: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class GradientModel:
    """A forward+backward model and how to feed / read it.

    ``model`` has the original inputs plus ``labels_input`` (int64 ``[N]``,
    cross-entropy only) or ``uniform_input`` (float ``[N]`` uniforms in [0, 1),
    true Fisher only), and the outputs ``logits_output``, ``loss_output``,
    ``grad_outputs[name]`` for every ``wrt`` name, ``labels_output`` (Fisher
    losses: the labels used) and any ``extra_outputs``.
    """

    model: onnx.ModelProto
    wrt: list[str]
    grad_outputs: dict[str, str]
    loss: str
    loss_output: str
    logits_output: str
    labels_input: str | None
    uniform_input: str | None
    labels_output: str | None
    dtype: np.dtype
    extra_outputs: list[str] = field(default_factory=list)

    def session(self, threads: int | None = None, optimization_level=None,
                providers: Sequence[str] = ("CPUExecutionProvider",), mem_arena: bool = True):
        """An ONNX Runtime session (all graph optimisations by default).

        ``mem_arena=False`` returns activation memory to the system after each
        run (the arena otherwise keeps its peak, ~2.4 GB for MobileNetV2 at
        batch 32) at a small speed cost.
        """
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = bool(mem_arena)
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                                       if optimization_level is None else optimization_level)
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        return ort.InferenceSession(self.model.SerializeToString(), so, providers=list(providers))

    def feeds(self, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None = None,
              rng: np.random.Generator | int | None = None) -> dict[str, np.ndarray]:
        """Session feeds: inputs cast to the model's float type, plus labels/uniforms."""
        feeds = {}
        for k, v in inputs.items():
            a = np.asarray(v)
            feeds[k] = a.astype(self.dtype) if a.dtype.kind == "f" else a
        n = _batch_size(feeds)
        if self.labels_input is not None:
            if labels is None:
                raise ValueError("loss='cross_entropy' needs labels (or use loss='true_fisher' / "
                                 "'empirical_fisher' to take them from the model)")
            lab = np.asarray(labels).astype(np.int64).reshape(-1)
            if n is not None and lab.shape[0] != n:
                raise ValueError(f"got {lab.shape[0]} labels for a batch of {n}")
            feeds[self.labels_input] = lab
        elif labels is not None:
            raise ValueError(f"labels are only used with loss='cross_entropy' (loss is {self.loss!r})")
        if self.uniform_input is not None:
            gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng or 0)
            feeds[self.uniform_input] = gen.random(n).astype(self.dtype)
        return feeds

    def run(self, session, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None = None,
            rng: np.random.Generator | int | None = None) -> GradientResult:
        names = [self.logits_output, self.loss_output] + [self.grad_outputs[w] for w in self.wrt]
        if self.labels_output:
            names.append(self.labels_output)
        names += self.extra_outputs
        outs = session.run(names, self.feeds(inputs, labels, rng))
        k = 2 + len(self.wrt)
        res = GradientResult(loss=float(np.asarray(outs[1]).reshape(-1)[0]),
                             grads=dict(zip(self.wrt, outs[2:k])), logits=outs[0])
        if self.labels_output:
            res.labels = outs[k]
            k += 1
        res.extras = dict(zip(self.extra_outputs, outs[k:]))
        return res


def _batch_size(feeds: Mapping[str, np.ndarray]) -> int | None:
    for v in feeds.values():
        if np.ndim(v) >= 1:
            return int(np.shape(v)[0])
    return None


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model))
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    raise TypeError(f"model must be a path or ModelProto, got {type(model).__name__}")


def build_gradient_model(
    model: onnx.ModelProto | str | os.PathLike,
    wrt: Sequence[str],
    loss: str = "cross_entropy",
    labels_input: str = "hqpc_labels",
    dtype=np.float32,
    *,
    uniform_input: str = "hqpc_uniform",
    input_shapes: Mapping[str, Sequence] | None = None,
    extra_outputs: Sequence[str] = (),
    options: Mapping | None = None,
) -> GradientModel:
    """Build the forward+backward model for ``wrt`` once.

    ``dtype`` is the float type of the produced graph (the model is converted
    if needed; ``None`` keeps the model's own).  ``input_shapes`` pins graph
    input shapes (use strings for symbolic dims) when the model leaves spatial
    dims dynamic.  ``options["conv_input_grad"]`` selects ``"auto"`` (default:
    flipped Conv for stride-1 convs, ConvTranspose otherwise) or
    ``"conv_transpose"``.
    """
    if loss not in LOSSES:
        raise GradientError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    res = build_backward(_load(model), list(wrt), loss=loss, labels_input=labels_input,
                         uniform_input=uniform_input, dtype=dtype,
                         input_shapes=dict(input_shapes or {}), extra_outputs=extra_outputs,
                         options=dict(options or {}))
    return GradientModel(
        model=res.model, wrt=list(dict.fromkeys(wrt)), grad_outputs=res.grad_outputs, loss=loss,
        loss_output=res.loss_output, logits_output=res.logits_output,
        labels_input=res.labels_input, uniform_input=res.uniform_input,
        labels_output=res.labels_output, dtype=np.dtype(helper.tensor_dtype_to_np_dtype(res.float_type)),
        extra_outputs=list(res.extra_outputs),
    )


# --------------------------------------------------------------- one-shot API
_CACHE: "collections.OrderedDict[tuple, tuple[GradientModel, object]]" = collections.OrderedDict()
_CACHE_SIZE = 2
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Drop the gradient models / sessions cached by :func:`gradients`."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _model_key(model) -> tuple:
    if isinstance(model, (str, os.PathLike)):
        p = os.path.abspath(os.fspath(model))
        st = os.stat(p)
        return ("path", p, st.st_mtime_ns, st.st_size)
    m = _load(model)
    return ("proto", hashlib.sha1(m.SerializeToString()).hexdigest())


def _declared_as_fed(vi: onnx.ValueInfoProto, array: np.ndarray) -> bool:
    """True when the graph input declares a fully static shape equal to the fed array's (a
    parameter fed as an input, e.g. a weight being trained): nothing of it is a batch axis."""
    dims = vi.type.tensor_type.shape.dim
    return (vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims)
            and tuple(d.dim_value for d in dims) == tuple(np.shape(array)))


def _pinned_shapes(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], whole: bool = False) -> dict:
    """Pin every non-batch input dim to the given array's size (batch stays symbolic). With
    ``whole`` (the batch runs in one piece), an input declared with exactly the fed array's static
    shape keeps it whole (:func:`_declared_as_fed`): parameters fed as inputs keep static shapes."""
    out = {}
    for vi in model.graph.input:
        if vi.name in inputs:
            shp = list(np.shape(inputs[vi.name]))
            if shp and not (whole and _declared_as_fed(vi, inputs[vi.name])):
                dims = vi.type.tensor_type.shape.dim
                d0 = dims[0].dim_param if len(dims) and dims[0].HasField("dim_param") else "N"
                shp[0] = d0 or "N"
            out[vi.name] = shp
    return out


def _get_session(model, m: onnx.ModelProto, wrt, loss, inputs, whole: bool = False):
    """The cached gradient model and session for ``m`` (loaded from ``model``, which keys it)."""
    pinned = _pinned_shapes(m, inputs, whole)  # the key holds what the graph is built for: batch axes as symbols
    shapes_key = tuple(sorted((k, tuple(pinned.get(k, np.shape(v)[1:]))) for k, v in inputs.items()))
    key = (_model_key(model), tuple(wrt), loss, shapes_key)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    gm = build_gradient_model(m, wrt, loss=loss, dtype=np.float32, input_shapes=pinned)
    sess = gm.session(mem_arena=False)  # cached sessions should not pin peak memory
    with _CACHE_LOCK:
        _CACHE[key] = (gm, sess)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return gm, sess


def gradients(
    model: onnx.ModelProto | str | os.PathLike,
    inputs: dict[str, np.ndarray],
    wrt: list[str],
    labels: np.ndarray | None = None,
    loss: str = "cross_entropy",
    *,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Gradients of the batch-mean loss w.r.t. ``wrt``, computed in float32.

    ``model``: path or ModelProto.  ``inputs``: feeds for the model's graph
    inputs (batched on axis 0; without ``batch_size`` chunking, an input declared
    with exactly the fed array's static shape, such as a weight fed as an input
    to be trained, keeps that shape).  ``wrt``: names of initializers, graph inputs
    and/or intermediate tensors.  ``labels``: int class indices ``[N]``
    (required for and only used by ``loss="cross_entropy"``).  ``loss``: one
    of ``"cross_entropy"``, ``"true_fisher"`` (labels sampled from
    ``softmax(logits)`` with ``numpy.random.default_rng(seed)``),
    ``"empirical_fisher"`` (argmax labels) or ``"scalar"``.  ``batch_size``
    splits the batch into chunks (results are identical up to rounding: the
    loss is a mean, so chunk gradients are combined weighted by chunk size).

    Returns ``{name: gradient}`` with each gradient shaped like its tensor.
    """
    if loss not in LOSSES:
        raise GradientError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    if loss == "cross_entropy" and labels is None:
        raise ValueError("loss='cross_entropy' needs labels; pass labels=... or choose "
                         "loss='true_fisher' / 'empirical_fisher' to use the model's own predictions")
    if loss != "cross_entropy" and labels is not None:
        raise ValueError(f"labels are only used with loss='cross_entropy', not {loss!r}")
    wrt = list(dict.fromkeys(wrt))
    n = _batch_size(inputs) or 1
    whole = not batch_size or batch_size >= n
    m = _load(model)
    gm, sess = _get_session(model, m, wrt, loss, inputs, whole)
    rng = np.random.default_rng(seed)
    if whole:
        return gm.run(sess, inputs, labels, rng).grads
    batched = _input_dependent(m, wrt)
    parts: dict[str, list[np.ndarray]] = {w: [] for w in wrt}
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        chunk = {k: (v[s:e] if np.ndim(v) >= 1 and np.shape(v)[0] == n else v) for k, v in inputs.items()}
        lab = None if labels is None else np.asarray(labels)[s:e]
        res = gm.run(sess, chunk, lab, rng)
        for w in wrt:
            parts[w].append(res.grads[w].astype(np.float64) * ((e - s) / n))
    # per-sample tensors (inputs, activations) concatenate; parameters sum
    return {w: (np.concatenate(p, axis=0) if w in batched else np.sum(p, axis=0)).astype(np.float32)
            for w, p in parts.items()}


def _input_dependent(model: onnx.ModelProto, names: Sequence[str]) -> set[str]:
    """Which of ``names`` depend on a graph input (i.e. carry the batch axis)."""
    inits = {t.name for t in model.graph.initializer}
    dep = {i.name for i in model.graph.input if i.name not in inits}
    for node in model.graph.node:
        if any(i in dep for i in node.input if i):
            dep.update(o for o in node.output if o)
    return dep & set(names)


def activation_gradients(
    model: onnx.ModelProto | str | os.PathLike,
    inputs: dict[str, np.ndarray],
    names: list[str] | None = None,
    labels: np.ndarray | None = None,
    loss: str = "cross_entropy",
    *,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Gradients w.r.t. intermediate activations (default: outputs of Conv/Gemm/MatMul)."""
    if names is None:
        m = _load(model)
        names = [n.output[0] for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    return gradients(model, inputs, names, labels=labels, loss=loss, seed=seed)
