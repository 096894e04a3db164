"""Why didn't my rule fire: the closest partial match per rule and the check that failed.

The matcher reports every rejected candidate with a progress score (pattern nodes matched,
attribute checks and guards passed); the tracer keeps the best one. ``-v`` prints
:meth:`Tracer.lines` for each rule that did not fire.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Rejection:
    progress: int
    anchor: str
    matched: list[tuple[str, str]]  # (op, node name) in pattern order
    reason: str
    line: int = 0
    column: int = 0


@dataclass
class Tracer:
    rule_name: str
    path: str = "<rules>"
    anchor_op: str = ""
    pattern_count: int = 0
    candidates: int = 0
    rewrites: int = 0
    best: Rejection | None = None
    rejections: int = 0
    fired_at: list[str] = field(default_factory=list)

    def reject(self, rule, anchor, state, reason: str, pos, patterns) -> None:
        self.rejections += 1
        matched = [(patterns[i].op, node.name) for i, node in sorted(state.nodes.items())]
        progress = state.progress
        if self.best is None or progress > self.best.progress:
            self.best = Rejection(progress, anchor.name, matched, reason,
                                  getattr(pos, "line", 0) or 0, getattr(pos, "column", 0) or 0)

    def fired(self, anchor_name: str) -> None:
        self.rewrites += 1
        self.fired_at.append(anchor_name)

    def lines(self) -> list[str]:
        if self.rewrites:
            return [f"rule {self.rule_name}: fired {self.rewrites} time(s)"]
        if self.candidates == 0:
            return [f"rule {self.rule_name}: did not fire: no {self.anchor_op} node in the graph"]
        out = [f"rule {self.rule_name}: did not fire ({self.candidates} {self.anchor_op} candidate(s))"]
        best = self.best
        if best is None:
            return out
        nodes = ", ".join(f"{op} '{name}'" for op, name in best.matched) or "none"
        out.append(f"  closest match: anchored at '{best.anchor}', matched {len(best.matched)}/"
                   f"{self.pattern_count} pattern node(s): {nodes}")
        where = f" ({self.path}:{best.line}:{best.column})" if best.line else ""
        out.append(f"  failed: {best.reason}{where}")
        return out

    def text(self) -> str:
        return "\n".join(self.lines())
