"""Passes, their context, and the pass manager with its instruments.

A pass runs iff it is not disabled, it is required (named in an explicit pipeline or needed by
another pass) or ``ctx.opt_level >= info.opt_level``, and the target allows it (TVM's rule).

After every pass that modified the model, the *checking instruments* run: verification
(onnx.checker + strict shape inference, with ``verify_each``) and the numeric guard (ONNX
Runtime runs the pass's reference and its result on the same seeded or calibration inputs and
compares every output within the pass's declared tolerance). If any check fails, or the pass
raises an unexpected exception, the model is rolled back to its state before the pass and the
failure is recorded; it is never emitted.
"""
from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, TextIO

import numpy as np
import onnx

from hqpc.errors import HqpcError, PipelineError
from hqpc.ir import Model, atomic_write_text, infer_shapes
from hqpc.runtime import ort as ort_rt
from hqpc.runtime.compare import EXACT, Comparison, Tolerance, compare_outputs


# --------------------------------------------------------------------------- pass definition
@dataclass(frozen=True)
class PassInfo:
    """Static description of a pass.

    ``tolerance=None`` means the pass must preserve semantics (compared with :data:`EXACT`);
    a lossy pass declares its tolerance and overrides :meth:`Pass.reference`.
    ``targets=None`` means every target. ``requires`` names passes that must run first.
    """

    name: str
    opt_level: int = 1
    requires: tuple[str, ...] = ()
    tolerance: Tolerance | None = None
    targets: tuple[str, ...] | None = None
    description: str = ""
    analysis: bool = False  # only annotates; the graph itself must not change

    @property
    def guard_tolerance(self) -> Tolerance:
        return self.tolerance or EXACT


class Pass:
    """Base class. Subclasses set ``info`` and ``options`` and implement :meth:`run`.

    ``options`` maps option names to defaults; values from pipeline text (``name{k=v}``) are
    converted to the default's type. ``run`` edits ``model`` in place and returns whether it
    changed anything.
    """

    info: ClassVar[PassInfo]
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise PipelineError(f"pass '{self.info.name}' has no option '{unknown[0]}' (options: {known})")
        self.config = {**self.options, **{k: _coerce(self.info.name, k, v, self.options[k]) for k, v in options.items()}}

    def run(self, model: Model, ctx: "PassContext") -> bool:
        raise NotImplementedError

    def reference(self, before: Model, after: Model, ctx: "PassContext") -> Model:
        """The model the result must match numerically. Exact passes: the input model."""
        return before

    def spec(self) -> str:
        """Pipeline text for this pass instance, options in sorted order (non-defaults only)."""
        changed = {k: v for k, v in sorted(self.config.items()) if v != self.options.get(k)}
        if not changed:
            return self.info.name
        return self.info.name + "{" + ",".join(f"{k}={_format_value(v)}" for k, v in changed.items()) + "}"


def _coerce(pass_name: str, key: str, value: Any, default: Any) -> Any:
    """Convert a pipeline-text value to the type of the option's default (None: keep as is)."""
    if default is None:
        return value
    try:
        if isinstance(default, bool):
            text = str(value).lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            number = float(value)
            if not number.is_integer() or isinstance(value, bool):
                raise ValueError
            return int(number)
        if isinstance(default, float):
            return float(value)
        return type(default)(value)
    except (TypeError, ValueError):
        raise PipelineError(
            f"pass '{pass_name}': option '{key}' expects {type(default).__name__}, got {value!r}") from None


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --------------------------------------------------------------------------- context and records
@dataclass
class PassContext:
    """Everything a pass may read besides the model; passed explicitly, never global."""

    opt_level: int = 1
    target: Any = None  # hqpc.target.Target
    config: dict[str, Any] = field(default_factory=dict)
    data: Any = None  # hqpc.runtime.data.DataSpec or None
    seed: int = 0
    disabled: frozenset[str] = frozenset()
    instruments: list["Instrument"] = field(default_factory=list)
    analyses: dict[tuple[str, str], Any] = field(default_factory=dict)
    log: Callable[[str], None] = lambda message: None
    guard_batch: int = 4

    def analysis(self, name: str, model: Model, compute: Callable[[], Any]) -> Any:
        """Cached analysis result for ``model``'s current content (keyed by its digest)."""
        key = (name, model.digest())
        if key not in self.analyses:
            self.analyses[key] = compute()
        return self.analyses[key]

    @property
    def target_name(self) -> str | None:
        return getattr(self.target, "name", None)

    def allows(self, info: PassInfo) -> bool:
        return info.targets is None or self.target_name is None or self.target_name in info.targets


@dataclass
class PassRecord:
    """What happened to one pass; one entry of the report's ``passes`` list."""

    name: str
    spec: str
    ran: bool = False
    skipped: str = ""
    modified: bool = False
    wall_s: float = 0.0
    rolled_back: bool = False
    error: str = ""
    checks: dict[str, Any] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0

    @property
    def failed(self) -> bool:
        return self.rolled_back

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in (
            "name", "spec", "ran", "skipped", "modified", "wall_s", "rolled_back", "error", "checks",
            "nodes_before", "nodes_after", "params_before", "params_after")}


# --------------------------------------------------------------------------- instruments
class Instrument:
    """Hooks around every pass. ``check`` returns a problem description or None; any problem
    makes the pass manager roll the pass back."""

    name = "instrument"

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None:
        pass

    def check(self, p: Pass, before: Model, after: Model, ctx: PassContext, record: PassRecord) -> str | None:
        return None

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, record: PassRecord) -> None:
        pass

    def after_pass_failed(self, p: Pass, model: Model, ctx: PassContext, record: PassRecord) -> None:
        pass


class TimingInstrument(Instrument):
    """Logs each pass's wall time (the record always holds it)."""

    name = "timing"

    def after_pass(self, p, model, ctx, record):
        ctx.log(f"{record.name}: {record.wall_s * 1000:.1f} ms{' (modified)' if record.modified else ''}")


class PrintIRAfter(Instrument):
    """Prints the model's text form after the named passes (``all`` for every pass)."""

    name = "print-ir-after"

    def __init__(self, names: set[str] | str, stream: TextIO | None = None):
        self.names = names
        self.stream = stream

    def after_pass(self, p, model, ctx, record):
        if self.names == "all" or record.name in self.names:
            stream = self.stream or sys.stderr
            stream.write(f"// ----- IR after {record.spec} -----\n{model.text()}\n")


class VerifyInstrument(Instrument):
    """onnx.checker (full) plus strict shape inference on every modified model."""

    name = "verify"

    def check(self, p, before, after, ctx, record):
        try:
            onnx.checker.check_model(after.proto, full_check=False)
            infer_shapes(after.proto, where=f"after pass '{record.name}'", strict=True)
        except HqpcError as exc:
            record.checks["verify"] = {"ok": False, "error": str(exc)}
            return str(exc)
        except Exception as exc:
            message = " ".join(str(exc).split())[:300]
            record.checks["verify"] = {"ok": False, "error": message}
            return f"onnx.checker: {message}"
        record.checks["verify"] = {"ok": True}
        return None


class NumericGuard(Instrument):
    """Runs the pass's reference and its result with ONNX Runtime on the same inputs and
    compares every output within the pass's tolerance. Reference outputs are cached by model
    digest, so an exact pass costs one new ORT run."""

    name = "guard"

    def __init__(self, feeds: Callable[[Model], dict[str, np.ndarray]]):
        self._feeds = feeds
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    def outputs(self, model: Model, quiet: bool = False) -> dict[str, np.ndarray]:
        """``model``'s outputs on the guard inputs (``quiet``: ORT logs nothing; its error is raised)."""
        key = model.digest()
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = ort_rt.run(model.proto, self._feeds(model), quiet=quiet)
        return self._cache[key]

    def check(self, p, before, after, ctx, record):
        tol = p.info.guard_tolerance
        try:
            reference = p.reference(before, after, ctx)
            expected = self.outputs(reference)
            got = self.outputs(after)
        except HqpcError:
            raise
        except Exception as exc:
            message = " ".join(str(exc).split())[:300]
            record.checks["guard"] = {"status": "failed", "ok": False, "error": f"onnxruntime: {message}",
                                      "tolerance": tol.as_dict()}
            return f"numeric guard could not run the models: {message}"
        result: Comparison = compare_outputs(expected, got, tol)
        record.checks["guard"] = {"status": "passed" if result.ok else "failed", **result.as_dict()}
        return None if result.ok else f"numeric guard: {result.summary()}"


# --------------------------------------------------------------------------- manager
class PassManager:
    """Runs a list of pass instances in order with instruments, verification and rollback."""

    def __init__(self, passes: list[Pass], ctx: PassContext, reproducer_dir: Path | None = None):
        self.passes = passes
        self.ctx = ctx
        self.reproducer_dir = reproducer_dir
        self.records: list[PassRecord] = []

    def pipeline_text(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def run(self, model: Model) -> Model:
        for p in self.passes:
            self.records.append(self._run_one(p, model))
        return model

    def _run_one(self, p: Pass, model: Model) -> PassRecord:
        ctx = self.ctx
        record = PassRecord(name=p.info.name, spec=p.spec())
        if p.info.name in ctx.disabled:
            record.skipped = "disabled"
            return record
        if not ctx.allows(p.info):
            record.skipped = f"not for target '{ctx.target_name}' (targets: {', '.join(p.info.targets)})"
            return record
        record.nodes_before, record.params_before = model.node_count(), model.param_count()
        before = model.copy()
        for inst in ctx.instruments:
            inst.before_pass(p, model, ctx)
        start = time.perf_counter()
        try:
            record.modified = bool(p.run(model, ctx))
        except HqpcError:
            raise
        except Exception as exc:
            record.wall_s = time.perf_counter() - start
            record.ran = True
            record.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            if not getattr(exc, "is_finding", False):  # a check's finding is a result, not a crash
                self._dump_reproducer(p, before, traceback.format_exc())
            return self._rollback(p, model, before, record)
        record.wall_s = time.perf_counter() - start
        record.ran = True
        if p.info.analysis and model.proto.graph.SerializeToString() != before.proto.graph.SerializeToString():
            record.error = "analysis pass changed the graph"
            return self._rollback(p, model, before, record)
        if not record.modified or p.info.analysis:
            record.checks["guard"] = {"status": "skipped",
                                      "reason": "analysis pass" if p.info.analysis else "model unchanged"}
        else:
            for inst in ctx.instruments:
                problem = inst.check(p, before, model, ctx, record)
                if problem:
                    record.error = problem
                    return self._rollback(p, model, before, record)
        record.nodes_after, record.params_after = model.node_count(), model.param_count()
        for inst in ctx.instruments:
            inst.after_pass(p, model, ctx, record)
        return record

    def _rollback(self, p: Pass, model: Model, before: Model, record: PassRecord) -> PassRecord:
        model.proto = before.proto
        model.annotations = before.annotations
        record.rolled_back = True
        record.modified = False
        record.nodes_after, record.params_after = model.node_count(), model.param_count()
        self.ctx.log(f"pass '{record.name}' rolled back: {record.error}")
        for inst in self.ctx.instruments:
            inst.after_pass_failed(p, model, self.ctx, record)
        return record

    def _dump_reproducer(self, p: Pass, before: Model, trace: str) -> None:
        """Save the pass's input model and pipeline so the crash can be replayed with --pipeline."""
        if self.reproducer_dir is None:
            return
        folder = Path(self.reproducer_dir) / f"hqpc-crash-{p.info.name}"
        before.save(folder / "input.onnx")
        atomic_write_text(folder / "pipeline.txt", p.spec() + "\n")
        atomic_write_text(folder / "traceback.txt", trace)
        self.ctx.log(f"reproducer written to {folder}")
