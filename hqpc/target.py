"""Target profiles, loaded from ``spec/targets/<name>.toml`` (installed as hqpc.spec).

A profile states what later passes need: the backend, precisions supported per op class,
nominal throughput per precision, memory bandwidth and the preferred channel multiple.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from hqpc.errors import TargetError

REQUIRED_KEYS = ("name", "description", "backend", "channel_multiple", "bandwidth_gbps", "precisions",
                 "throughput_gops", "quantization")
BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: str
    channel_multiple: int
    bandwidth_gbps: float
    precisions: dict[str, tuple[str, ...]]
    throughput_gops: dict[str, float]
    quantization: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def supports(self, op_class: str, precision: str) -> bool:
        return precision in self.precisions.get(op_class, ())

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)


def _targets_dir():
    return resources.files("hqpc.spec").joinpath("targets")


def known_targets() -> list[str]:
    return sorted(entry.name[:-5] for entry in _targets_dir().iterdir() if entry.name.endswith(".toml"))


def load_target(name: str) -> Target:
    """Load a target by name; unknown names raise TargetError listing the known ones."""
    known = known_targets()
    if name not in known:
        raise TargetError(f"unknown target '{name}' (known targets: {', '.join(known)})")
    entry = _targets_dir().joinpath(f"{name}.toml")
    try:
        raw = tomllib.loads(entry.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"target profile {name}.toml: {exc}") from None
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise TargetError(f"target profile {name}.toml: missing keys {', '.join(missing)}")
    if raw["backend"] not in BACKENDS:
        raise TargetError(f"target profile {name}.toml: backend '{raw['backend']}' is not one of {', '.join(BACKENDS)}")
    return Target(
        name=raw["name"], description=raw["description"], backend=raw["backend"],
        channel_multiple=int(raw["channel_multiple"]), bandwidth_gbps=float(raw["bandwidth_gbps"]),
        precisions={k: tuple(v) for k, v in raw["precisions"].items()},
        throughput_gops={k: float(v) for k, v in raw["throughput_gops"].items()},
        quantization=dict(raw["quantization"]), raw=raw)
