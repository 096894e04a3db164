"""Built-in rewrite rules written in the rule language (``spec/rules/*.hqp``).

Importing this module parses, checks and compiles every built-in rule file and registers each
rule as a pass (named after the rule), so the registry's auto-discovery picks them up like any
Python pass. A broken built-in rule file is a build error and raises here.
"""
from __future__ import annotations

from importlib import resources

from hqpc.dsl.compiler import compile_text
from hqpc.registry import register_pass

MODULE = "hqpc.passes.dsl_rules"


def rule_files() -> list:
    folder = resources.files("hqpc.spec").joinpath("rules")
    return sorted((entry for entry in folder.iterdir() if entry.name.endswith(".hqp")), key=lambda e: e.name)


def _load() -> list:
    loaded = []
    for entry in rule_files():
        text = entry.read_text(encoding="utf-8")
        for cls in compile_text(text, f"spec/rules/{entry.name}", module=MODULE):
            register_pass(cls)
            loaded.append(cls)
    return loaded


BUILTIN_RULES = _load()
RULE_NAMES = tuple(cls.info.name for cls in BUILTIN_RULES)
