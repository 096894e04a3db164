"""The run report (report.json). Schema version 1, documented in the README.

Top level: ``hqpc_version``, ``schema`` (1), ``input`` {path, sha256, bytes}, ``output``
{path, bytes} (absent for --emit text to stdout), ``target``, ``opt_level``, ``pipeline`` (the
exact pipeline text; rerun with --pipeline to reproduce), ``seed``, ``guard_inputs``
("random" or "calibration"), ``missing_passes`` (passes of the level this build lacks),
``passes`` (one :class:`~hqpc.passmanager.PassRecord` dict each), ``summary`` {nodes_before,
nodes_after, params_before, params_after, bytes_before, bytes_after, wall_s, rolled_back},
``annotations`` (the model's hqpc.* annotation namespaces).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hqpc import __version__
from hqpc.ir import atomic_write_text

SCHEMA_VERSION = 1


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_report(*, input_info: dict, output_info: dict | None, target: str, opt_level: int, pipeline: str,
                 seed: int, guard_inputs: str, missing: list[str], records: list, summary: dict,
                 annotations: dict) -> dict[str, Any]:
    report = {
        "hqpc_version": __version__,
        "schema": SCHEMA_VERSION,
        "input": input_info,
        "target": target,
        "opt_level": opt_level,
        "pipeline": pipeline,
        "seed": seed,
        "guard_inputs": guard_inputs,
        "missing_passes": missing,
        "passes": [r.as_dict() for r in records],
        "summary": summary,
        "annotations": annotations,
    }
    if output_info is not None:
        report["output"] = output_info
    return report


def write_report(path: Path, report: dict) -> None:
    atomic_write_text(Path(path), json.dumps(_jsonable(report), indent=2, sort_keys=False) + "\n")


def _jsonable(value: Any) -> Any:
    """Replace non-finite floats by strings so the file is strict JSON."""
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item())
    return value
