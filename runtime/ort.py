"""ONNX Runtime sessions and seeded inputs.

Sessions are built from in-memory protos. ``intra_op_num_threads`` defaults to 1 so that
numeric results and timings do not depend on the machine's core count.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import onnxruntime as ort

from hqpc.errors import HqpcError

DEFAULT_DYNAMIC_BATCH = 2
DEFAULT_DYNAMIC_DIM = 32
_GRAPH_OPT = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session(model: onnx.ModelProto | str | os.PathLike, threads: int = 1, optimization: str = "basic",
            quiet: bool = False, profile_dir: str | None = None,
            optimized_path: str | None = None, spin: bool = True) -> ort.InferenceSession:
    """Create a CPU InferenceSession for ``model`` (a proto or a path; annotations in metadata are
    harmless); ``quiet``: ONNX Runtime logs nothing, not even the errors a probe expects;
    ``profile_dir``: ORT's profiler writes its JSON there; ``optimized_path``: ORT saves the
    graph it optimized there; ``spin=False``: the intra-op pool's threads sleep instead of
    spinning when idle (for several multi-threaded sessions timed in turn, where one session's
    spinning threads take the cores from the next)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = _GRAPH_OPT[optimization]
    options.log_severity_level = 4 if quiet else 3
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "hqpc_profile")
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int = 1,
        optimization: str = "basic", quiet: bool = False) -> dict[str, np.ndarray]:
    """Run ``model`` once on ``feeds``; returns every graph output by name."""
    sess = session(model, threads=threads, optimization=optimization, quiet=quiet)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_shape(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """Static dims as ints, symbolic dims as their names, unknown dims as None."""
    dims = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def concrete_shape(value: onnx.ValueInfoProto, batch: int = DEFAULT_DYNAMIC_BATCH,
                   dynamic_dim: int = DEFAULT_DYNAMIC_DIM) -> list[int]:
    """Replace dynamic dims: the leading one by ``batch``, the others by ``dynamic_dim``."""
    shape = input_shape(value)
    return [d if isinstance(d, int) else (batch if i == 0 else dynamic_dim) for i, d in enumerate(shape)]


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = DEFAULT_DYNAMIC_BATCH) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input: N(0, 1) floats, small non-negative integers, bools."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph_inputs(model):
        elem = value.type.tensor_type.elem_type
        if elem == 0:
            raise HqpcError(f"graph input '{value.name}' is not a tensor; cannot generate inputs for it")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        shape = concrete_shape(value, batch=batch)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            feeds[value.name] = rng.integers(0, 8, shape).astype(dtype)
    return feeds


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include the intermediate tensors ``names``."""
    out = copy.deepcopy(model)
    existing = {o.name for o in out.graph.output}
    known = {v.name: v for v in list(out.graph.value_info) + list(out.graph.input)}
    for name in names:
        if name in existing:
            continue
        if name in known:
            out.graph.output.append(copy.deepcopy(known[name]))
        else:
            out.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return out
