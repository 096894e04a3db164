"""The compile driver shared by the CLI and the Python API.

``compile_model(options)`` loads the model, builds the pass list for the opt level / target /
explicit pipeline, runs the pass manager with its instruments (verification and the numeric
guard always on), and returns a :class:`CompileResult`. Writing files is the caller's job
(:func:`write_outputs`), so the API can compile in memory.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hqpc.batch import relax_fixed_batch, restore_fixed_batch
from hqpc.errors import HqpcError, ModelLoadError, OutputError, PipelineError
from hqpc.ir import Model, atomic_write_text
from hqpc.passmanager import (NumericGuard, Pass, PassContext, PassManager, PassRecord, PrintIRAfter,
                              TimingInstrument, VerifyInstrument)
from hqpc.registry import get_pass, level_pipeline, missing_passes, parse_pipeline, passes
from hqpc.report import build_report, file_digest, write_report
from hqpc.runtime import ort as ort_rt
from hqpc.runtime.tensorrt import preflight_target_artifacts, write_target_artifacts
from hqpc.target import load_target


@dataclass
class CompileOptions:
    model: Any  # path or ModelProto
    opt_level: int = 1
    target: str = "cpu"
    output: Path | None = None
    data: Path | None = None
    max_drop: float = 1.0
    pipeline: str | None = None
    disabled: tuple[str, ...] = ()
    report: Path | None = None
    report_html: Path | None = None
    print_ir_after: str | None = None
    emit: str = "onnx"
    seed: int = 0
    strict: bool = False
    verbosity: int = 1  # 0 quiet, 1 normal, 2 verbose
    guard_batch: int = 4
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompileResult:
    model: Model
    records: list[PassRecord]
    pipeline: str
    report: dict[str, Any]
    output_path: Path | None = None
    model_target: Any = None  # the hqpc.target.Target compiled for

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [r for r in self.records if r.rolled_back]


def build_passes(options: CompileOptions) -> tuple[list[Pass], list[str]]:
    """Pass instances for an explicit pipeline or the -O level; also the level's missing passes."""
    if options.pipeline is not None:
        specs = parse_pipeline(options.pipeline)
        return [spec.instantiate() for spec in specs], []
    names = level_pipeline(options.opt_level)
    return [get_pass(name)() for name in names], missing_passes(options.opt_level)


def _add_requirements(pass_list: list[Pass]) -> list[Pass]:
    """Insert passes named in ``requires`` before the first pass that needs them (once)."""
    out: list[Pass] = []
    seen: set[str] = set()

    def add(p: Pass, chain: tuple[str, ...]) -> None:
        for required in p.info.requires:
            if required in chain:
                raise PipelineError(f"pass '{p.info.name}' requires itself through {' -> '.join(chain)}")
            if required not in seen:
                add(get_pass(required)(), chain + (required,))
        out.append(p)
        seen.add(p.info.name)

    for p in pass_list:
        add(p, (p.info.name,))
    return out


def _validate_disabled(disabled: tuple[str, ...]) -> frozenset[str]:
    known = passes()
    for name in disabled:
        if name not in known:
            get_pass(name)  # raises with a suggestion
    return frozenset(disabled)


def guard_feeds_factory(data_spec, seed: int, batch: int) -> tuple[Callable[[Model], dict[str, np.ndarray]], str]:
    """Inputs the numeric guard uses: the first ``batch`` calibration samples when a data spec
    with a non-empty calibration split is given (for single-input models; no more than a fixed
    batch dimension allows), else seeded random inputs. Never an empty batch: every guard would
    pass on zero samples."""
    cache: dict[str, dict[str, np.ndarray]] = {}
    use_data = data_spec is not None and len(data_spec.split("calib")) > 0

    def feeds(model: Model) -> dict[str, np.ndarray]:
        inputs = ort_rt.graph_inputs(model.proto)
        key = str([(i.name, ort_rt.input_shape(i)) for i in inputs])
        if key not in cache:
            if use_data and len(inputs) == 1:
                dims = ort_rt.input_shape(inputs[0])
                fixed = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
                x, _ = data_spec.split("calib").arrays(limit=min(batch, fixed or batch))
                cache[key] = {inputs[0].name: x}
            else:
                cache[key] = ort_rt.random_feeds(model.proto, seed=seed, batch=batch)
        return cache[key]

    if data_spec is not None and not use_data:
        return feeds, "random (the data spec's calibration split is empty)"
    return feeds, ("calibration" if use_data else "random")


def check_runnable(model: Model, guard: NumericGuard, source) -> None:
    """Run the input model once in ONNX Runtime on the guard's inputs (the outputs are cached for
    the first pass's guard). A model ORT cannot run would otherwise compile with every changing
    pass rolled back; it is bad input (exit 2), named with ORT's reason."""
    try:
        guard.outputs(model, quiet=True)
    except HqpcError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        reason = " ".join(str(exc).split())
        reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", reason)[:400]
        raise ModelLoadError(f"{source}: ONNX Runtime cannot run the model: {reason}") from None


def load_data_spec(path: Path | None, model: Model):
    if path is None:
        return None
    from hqpc.runtime.data import DataSpec

    spec = DataSpec.load(path)
    inputs = ort_rt.graph_inputs(model.proto)
    if len(inputs) == 1:
        spec.split("calib").check_input(ort_rt.input_shape(inputs[0]))
    return spec


def compile_model(options: CompileOptions, log: Callable[[str], None] = lambda m: None) -> CompileResult:
    start = time.perf_counter()
    if options.opt_level not in (0, 1, 2, 3):
        raise PipelineError(f"optimization level must be 0..3, got {options.opt_level}")
    target = load_target(options.target)
    preflight_target_artifacts(target, options)
    disabled = _validate_disabled(tuple(options.disabled))
    pass_list, missing = build_passes(options)
    pass_list = _add_requirements(pass_list)
    model = Model.load(options.model)
    # with --data, a batch-polymorphic model with a fixed batch compiles with a free one, so the
    # data-driven passes can run batches (hqpc/batch.py); without data, shapes stay static (foldable)
    fixed_batch = None
    if options.data:
        model, fixed_batch = relax_fixed_batch(model, log=log)
    data_spec = load_data_spec(Path(options.data) if options.data else None, model)
    feeds, guard_inputs = guard_feeds_factory(data_spec, options.seed, options.guard_batch)
    guard = NumericGuard(feeds)
    check_runnable(model, guard, options.model if isinstance(options.model, (str, Path)) else "input model")
    instruments = [VerifyInstrument(), guard]
    if options.verbosity >= 2:
        instruments.append(TimingInstrument())
    if options.print_ir_after:
        names = "all" if options.print_ir_after == "all" else set(options.print_ir_after.split(","))
        instruments.append(PrintIRAfter(names))
    from hqpc.contract import SnapshotInstrument, contract_applies, contract_applies_after, enforce_contract

    snapshots = SnapshotInstrument() if (contract_applies(options) or contract_applies_after(options)) else None
    if snapshots is not None:
        instruments.append(snapshots)
    ctx = PassContext(opt_level=options.opt_level, target=target, data=data_spec, seed=options.seed,
                      disabled=disabled, instruments=instruments, log=log, guard_batch=options.guard_batch,
                      config={"max_drop": options.max_drop, "verbosity": options.verbosity, **options.extra})
    if missing:
        log(f"note: -O{options.opt_level} passes not available in this build: {', '.join(missing)}")
    nodes_before, params_before = model.node_count(), model.param_count()
    bytes_before = len(model.serialized())
    manager = PassManager(pass_list, ctx, reproducer_dir=Path(options.output).parent if options.output else None)
    manager.run(model)
    pipeline_text = manager.pipeline_text()
    summary = {
        "nodes_before": nodes_before, "nodes_after": model.node_count(),
        "params_before": params_before, "params_after": model.param_count(),
        "bytes_before": bytes_before, "bytes_after": len(model.serialized()),
        "wall_s": round(time.perf_counter() - start, 4),
        "rolled_back": [r.name for r in manager.records if r.rolled_back],
    }
    input_info = _input_info(options.model)
    report = build_report(input_info=input_info, output_info=None, target=target.name,
                          opt_level=options.opt_level, pipeline=pipeline_text, seed=options.seed,
                          guard_inputs=guard_inputs, missing=missing, records=manager.records,
                          summary=summary, annotations=model.annotations)
    result = CompileResult(model=model, records=manager.records, pipeline=pipeline_text, report=report,
                           model_target=target)
    if contract_applies(options) or contract_applies_after(options, manager.records, data_spec):
        # the accuracy contract: measure on held-out images, walk back when the budget is broken;
        # result.model becomes the model the contract chose (hqpc/contract.py)
        enforce_contract(result, options, log=log, snapshots=snapshots)
        summary["wall_s"] = round(time.perf_counter() - start, 4)
    restore_fixed_batch(result.model, fixed_batch)
    return result


def _input_info(model) -> dict:
    if isinstance(model, (str, Path)):
        path = Path(model)
        return {"path": str(path), "sha256": file_digest(path), "bytes": path.stat().st_size}
    return {"path": None}


def default_output_path(model_path: Path, emit: str) -> Path:
    suffix = ".hqp.txt" if emit == "text" else ".hqp.onnx"
    name = model_path.name[:-5] if model_path.name.endswith(".onnx") else model_path.name
    return model_path.with_name(name + suffix)


def check_output_path(output: Path, inputs: list[Path]) -> None:
    """Refuse to write over an input file (the input model is never overwritten)."""
    resolved = output.resolve()
    for path in inputs:
        if path is not None and Path(path).exists() and (resolved == Path(path).resolve()
                                                          or (output.exists() and output.samefile(path))):
            raise OutputError(f"output {output} is the input file {path}; refusing to overwrite it")
    if output.exists() and output.is_dir():
        raise OutputError(f"output {output} is a folder")


def write_outputs(result: CompileResult, options: CompileOptions, stdout,
                  log: Callable[[str], None] = lambda m: None) -> None:
    """Write the model (or its text), the target's artifacts (build_plan.sh, engine), the
    report and the HTML report, each atomically."""
    if options.emit == "text":
        text = result.model.text()
        if options.output is None:
            stdout.write(text)
        else:
            atomic_write_text(Path(options.output), text)
    elif options.output is not None:
        result.model.save(Path(options.output))
    if options.output is not None:
        path = Path(options.output)
        result.report["output"] = {"path": str(path), "bytes": path.stat().st_size}
        result.output_path = path
        if options.emit != "text":
            write_target_artifacts(result, path, result.model_target, options, log=log)
    if options.report is not None:
        write_report(Path(options.report), result.report)
    report_html = options.report_html or (options.extra or {}).get("report_html")
    if report_html is not None:
        from hqpc.report_html import original_proto, write_report_html

        write_report_html(Path(report_html), result.report, model=result.model.proto,
                          original=original_proto(options.model))
