"""Registry of passes and named pipelines, and the textual pipeline syntax.

Pipeline text: ``name[{key=value[,key=value]*}][,name...]``, e.g.
``fold-constants,prune-channels{max-drop=1.0},insert-qdq{bits=8}``. Values are numbers,
``true``/``false``, bare words or quoted strings; they are converted to the option's type.

Pass modules under ``hqpc.passes`` register themselves with :func:`register_pass`; they are
imported on first use of the registry.
"""
from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass
from typing import Any

from hqpc.errors import PipelineError
from hqpc.passmanager import Pass

_PASSES: dict[str, type[Pass]] = {}
_SOURCES: dict[str, str] = {}
_DISCOVERED = False

# Named pipelines per opt level. A name that no module registers (a pass of a feature this
# build lacks) is left out of the pipeline and reported by `missing_passes`.
# -O1 clean-up (all exact). Rewrites the rule language expresses are rules (spec/rules/*.hqp,
# registered by hqpc.passes.dsl_rules); constant folding, the shape-aware no-op removal and
# dead-code elimination are Python passes. No-ops go before the folds so that a Conv and the
# Mul/Add/BatchNormalization after it become neighbours.
CLEANUP = [
    "fold-constants",
    # eliminate.hqp, then the no-op Reshape/Cast/Transpose/Pad/Slice/Concat pass
    "eliminate-identity-op", "eliminate-dropout", "eliminate-neutral-mul", "eliminate-neutral-add",
    "eliminate-noop-ops",
    # batchnorm.hqp
    "fold-bn-into-conv", "fold-bn-into-convtranspose", "fold-bn-into-gemm",
    # conv_affine.hqp: per host, Mul, Div, Add, Sub (a chain in that order folds completely)
    "fold-mul-into-conv", "fold-div-into-conv", "fold-add-into-conv", "fold-sub-into-conv",
    "fold-mul-into-convtranspose", "fold-div-into-convtranspose", "fold-add-into-convtranspose",
    "fold-sub-into-convtranspose",
    "fold-mul-into-gemm", "fold-div-into-gemm", "fold-add-into-gemm", "fold-sub-into-gemm",
    # activations.hqp
    "fuse-relu-clip", "merge-clips", "eliminate-relu-after-clip", "eliminate-double-relu", "clip-to-relu",
    "eliminate-dead-code",
]
PIPELINES: dict[int, list[str]] = {
    0: [],
    1: CLEANUP,
    2: CLEANUP + ["calibrate", "assign-precision", "insert-qdq", "check-trt", "eliminate-dead-code", "verify-trt"],
    3: CLEANUP + ["annotate-sensitivity", "prune", "reconstruct", "calibrate", "assign-precision",
                  "insert-qdq", "check-trt", "eliminate-dead-code", "verify-trt"],
}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``info.name``."""
    name = cls.info.name
    if name in _PASSES and _PASSES[name] is not cls:
        raise ValueError(f"pass '{name}' registered twice ({_PASSES[name].__module__} and {cls.__module__})")
    _PASSES[name] = cls
    _SOURCES[name] = cls.__module__
    return cls


def unregister_pass(name: str) -> None:
    """Remove a pass (used by tests that register temporary passes)."""
    _PASSES.pop(name, None)
    _SOURCES.pop(name, None)


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import hqpc.passes as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def passes() -> dict[str, type[Pass]]:
    _discover()
    return dict(_PASSES)


def source_of(name: str) -> str:
    _discover()
    return _SOURCES[name]


def get_pass(name: str) -> type[Pass]:
    _discover()
    if name not in _PASSES:
        close = _closest(name, _PASSES)
        hint = f"; did you mean '{close}'?" if close else ""
        raise PipelineError(f"unknown pass '{name}'{hint} (see `hqpc --list-passes`)")
    return _PASSES[name]


def level_pipeline(level: int) -> list[str]:
    """Registered pass names of the -O``level`` pipeline, in order (a pass that would directly
    repeat itself because the passes between were left out runs once)."""
    _discover()
    names: list[str] = []
    for name in PIPELINES[level]:
        if name in _PASSES and (not names or names[-1] != name):
            names.append(name)
    return names


def missing_passes(level: int) -> list[str]:
    _discover()
    return sorted({name for name in PIPELINES[level] if name not in _PASSES})


# --------------------------------------------------------------------------- pipeline text
@dataclass(frozen=True)
class PassSpec:
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def instantiate(self) -> Pass:
        return get_pass(self.name)(**dict(self.options))


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_VALUE = re.compile(r"\"[^\"]*\"|'[^']*'|[^,{}=\s]+")


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse pipeline text into pass specs; errors name the column and show a caret."""
    specs: list[PassSpec] = []
    pos = 0
    text = text.strip()
    if not text:
        return specs

    def fail(message: str, at: int) -> None:
        raise PipelineError(f"pipeline column {at + 1}: {message}: {text} <- here: {text[at:at + 12]!r}")

    while True:
        pos = _skip_space(text, pos)
        match = _NAME.match(text, pos)
        if not match:
            fail("expected a pass name", pos)
        name = match.group()
        pos = _skip_space(text, match.end())
        options: list[tuple[str, Any]] = []
        if pos < len(text) and text[pos] == "{":
            pos, options = _parse_options(text, pos + 1, fail)
        specs.append(PassSpec(name, tuple(options)))
        pos = _skip_space(text, pos)
        if pos >= len(text):
            return specs
        if text[pos] != ",":
            fail("expected ',' between passes", pos)
        pos += 1


def _parse_options(text, pos, fail):
    options: list[tuple[str, Any]] = []
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "}":
            return pos + 1, options
        key = _NAME.match(text, pos)
        if not key:
            fail("expected an option name", pos)
        pos = _skip_space(text, key.end())
        if pos >= len(text) or text[pos] != "=":
            fail(f"expected '=' after option '{key.group()}'", pos)
        pos = _skip_space(text, pos + 1)
        value = _VALUE.match(text, pos)
        if not value:
            fail(f"expected a value for option '{key.group()}'", pos)
        options.append((key.group(), _literal(value.group())))
        pos = _skip_space(text, value.end())
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "}":
            fail("expected ',' or '}' in options", pos)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _literal(token: str) -> Any:
    if token[:1] in "\"'":
        return token[1:-1]
    for convert in (int, float):
        try:
            return convert(token)
        except ValueError:
            continue
    return token


def format_pipeline(specs: list[PassSpec]) -> str:
    parts = []
    for spec in specs:
        opts = ",".join(f"{k}={v}" for k, v in spec.options)
        parts.append(spec.name + (f"{{{opts}}}" if opts else ""))
    return ",".join(parts)


def _closest(name: str, names) -> str | None:
    import difflib

    found = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return found[0] if found else None
