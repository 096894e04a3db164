"""Python API mirroring the command line.

>>> import hqpc
>>> result = hqpc.compile("model.onnx", target="cpu", level=1, output="model.hqp.onnx")
>>> result.report["summary"]["nodes_after"]

Errors are raised as :class:`hqpc.errors.HqpcError` subclasses (what the CLI reports as exit 2).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import onnx

from hqpc.compiler import CompileOptions, CompileResult, check_output_path, compile_model, write_outputs


def compile(model: str | Path | onnx.ModelProto, target: str = "cpu", level: int = 1, data: str | Path | None = None,
            max_drop: float = 1.0, output: str | Path | None = None, report: str | Path | None = None,
            pipeline: str | None = None, disable: tuple[str, ...] | list[str] = (), seed: int = 0,
            size_budget: float | int | None = None, emit: str = "onnx", log=None, **options: Any) -> CompileResult:
    """Compile ``model`` like ``hqpc MODEL -O<level> --target <target> ...``.

    Nothing is written unless ``output`` or ``report`` is given. Extra keyword options are
    passed to passes through ``ctx.config``. Returns the :class:`~hqpc.compiler.CompileResult`
    (``.model`` the compiled :class:`~hqpc.ir.Model`, ``.model.to_proto()`` its ModelProto,
    ``.report`` the report dict, ``.output_path``).
    """
    opts = CompileOptions(model=model, opt_level=level, target=target,
                          output=Path(output) if output is not None else None,
                          data=Path(data) if data is not None else None, max_drop=max_drop, pipeline=pipeline,
                          disabled=tuple(disable), report=Path(report) if report is not None else None,
                          emit=emit, seed=seed, extra={"size_budget": size_budget, **options})
    sources = [Path(model)] if isinstance(model, (str, Path)) else []
    for path in (opts.output, opts.report):
        if path is not None:
            check_output_path(path, sources)
    result = compile_model(opts, log=log or (lambda message: None))
    if opts.output is not None or opts.report is not None:
        write_outputs(result, opts, io.StringIO())
    return result
