"""Python API mirroring the command line.

>>> import hqpc
>>> result = hqpc.compile("model.onnx", target="cpu", level=1, output="model.hqp.onnx")
>>> result.report["summary"]["nodes_after"]

The -O3 compile with an accuracy budget, as ``hqpc M -O3 --target cpu --data D.toml
--max-drop 1.5 -o OUT --report R.json --report-html R.html``:

>>> result = hqpc.compile("model.onnx", target="cpu", level=3, data="D.toml", max_drop=1.5,
...                       output="model.hqp.onnx", report="r.json", report_html="r.html")
>>> result.report["contract"]["met"], result.report["contract"]["emitted"]

The accuracy contract (:mod:`hqpc.contract`) runs exactly as in the CLI: ``result.model`` is the
model it chose, ``result.report["contract"]`` holds the measurements. Errors are raised as
:class:`hqpc.errors.HqpcError` subclasses (what the CLI reports as exit 2).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Callable

import onnx

from hqpc.compiler import CompileOptions, CompileResult, check_output_path, compile_model, write_outputs
from hqpc.errors import HqpcError, OutputError


def compile(model: str | Path | onnx.ModelProto, target: str = "cpu", level: int = 1, data: str | Path | None = None,
            max_drop: float = 1.0, output: str | Path | None = None, report: str | Path | None = None,
            report_html: str | Path | None = None, pipeline: str | None = None,
            disable: tuple[str, ...] | list[str] | str = (), seed: int = 0,
            size_budget: float | int | None = None, emit: str = "onnx",
            log: Callable[[str], None] | None = None, **options: Any) -> CompileResult:
    """Compile ``model`` like ``hqpc MODEL -O<level> --target <target> ...``.

    ``data`` (``--data``), ``max_drop`` (``--max-drop``, top-1 points), ``output`` (``-o``),
    ``report`` (``--report``), ``report_html`` (``--report-html``), ``pipeline``,
    ``disable`` (``--disable-pass``: names or one comma-separated string), ``seed``,
    ``size_budget``, ``emit`` ("onnx" or "text"). Nothing is written unless ``output``,
    ``report`` or ``report_html`` is given; unlike the CLI there is no default output path.
    ``log`` receives the lines the CLI prints to stderr (default: none). Extra keyword options
    go to the passes and the contract through ``ctx.config`` / ``options.extra`` (e.g.
    ``contract=False``, ``contract_latency_runs=20``).

    Returns the :class:`~hqpc.compiler.CompileResult`: ``.model`` the compiled
    :class:`~hqpc.ir.Model` (the one the accuracy contract chose), ``.model.to_proto()`` its
    ModelProto, ``.report`` the report dict (``--report``'s content, with ``report["contract"]``
    at -O3 / -O2 with data), ``.output_path``.
    """
    if isinstance(level, bool) or not isinstance(level, int) or level not in (0, 1, 2, 3):
        raise HqpcError(f"level must be 0, 1, 2 or 3, got {level!r}")
    try:
        max_drop = float(max_drop)
    except (TypeError, ValueError):
        raise HqpcError(f"max_drop must be a number >= 0, got {max_drop!r}") from None
    if not (0 <= max_drop < math.inf):
        raise HqpcError(f"max_drop must be a finite number >= 0, got {max_drop!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise HqpcError(f"seed must be an integer >= 0, got {seed!r}")
    if emit not in ("onnx", "text"):
        raise HqpcError(f"emit must be 'onnx' or 'text', got {emit!r}")
    if isinstance(disable, str):
        disable = [disable]
    disabled = tuple(name.strip() for group in disable for name in str(group).split(",") if name.strip())
    opts = CompileOptions(model=model, opt_level=level, target=target,
                          output=Path(output) if output is not None else None,
                          data=Path(data) if data is not None else None, max_drop=max_drop, pipeline=pipeline,
                          disabled=disabled, report=Path(report) if report is not None else None,
                          report_html=Path(report_html) if report_html is not None else None,
                          emit=emit, seed=seed, verbosity=1 if log is not None else 0,
                          extra={"size_budget": size_budget, **options})
    sources = [Path(model)] if isinstance(model, (str, Path)) else []
    if opts.data is not None:
        sources.append(opts.data)
    targets = [p for p in (opts.output, opts.report, opts.report_html) if p is not None]
    for path in targets:
        check_output_path(path, sources)
    if len({p.resolve() for p in targets}) != len(targets):
        raise OutputError("output, report and report_html must be different files")
    result = compile_model(opts, log=log or (lambda message: None))
    if targets:
        write_outputs(result, opts, io.StringIO(), log=log or (lambda message: None))
    return result
