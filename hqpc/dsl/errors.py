"""Errors of the rule language: ``file:line:col: message`` plus the offending line and a caret.

``str(error)`` is a single line (what the CLI prints before exiting with code 2);
:meth:`RuleError.render` adds the source line and a caret under the column, and, for a
:class:`RuleCheckError` holding several diagnostics, every one of them.
"""
from __future__ import annotations

from dataclasses import dataclass

from hqpc.errors import HqpcError


@dataclass(frozen=True)
class Diagnostic:
    path: str
    line: int
    column: int
    message: str
    source_line: str = ""
    severity: str = "error"

    def one_line(self) -> str:
        where = f"{self.path}:{self.line}:{self.column}" if self.line else self.path
        prefix = "" if self.severity == "error" else f"{self.severity}: "
        return f"{where}: {prefix}{self.message}"

    def render(self) -> str:
        text = self.one_line()
        if self.source_line and self.line:
            line = self.source_line.rstrip("\n").expandtabs(1)
            caret = " " * (max(self.column, 1) - 1) + "^"
            text += f"\n    {line}\n    {caret}"
        return text


def source_line(text: str, line: int) -> str:
    lines = text.splitlines()
    return lines[line - 1] if 1 <= line <= len(lines) else ""


def make_diagnostic(path: str, text: str, pos, message: str, severity: str = "error") -> Diagnostic:
    line = getattr(pos, "line", 0) or 0
    column = getattr(pos, "column", 0) or 0
    return Diagnostic(path, line, column, message, source_line(text, line) if line else "", severity)


class RuleError(HqpcError):
    """A rule file is wrong (syntax, types, names, registration)."""

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic | str):
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic("<rules>", 0, 0, diagnostics)]
        elif isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = list(diagnostics)
        first = self.diagnostics[0].one_line()
        more = len([d for d in self.diagnostics if d.severity == "error"]) - 1
        super().__init__(first + (f" (and {more} more error{'s' if more > 1 else ''})" if more > 0 else ""))

    @property
    def first(self) -> Diagnostic:
        return self.diagnostics[0]

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)


class RuleSyntaxError(RuleError):
    """The text does not parse."""


class RuleCheckError(RuleError):
    """The text parses but the rule is wrong: unknown op/attribute/builtin, unbound name, arity."""


class EvalError(Exception):
    """A constant expression failed at rewrite time (the match is rejected, never a crash)."""
