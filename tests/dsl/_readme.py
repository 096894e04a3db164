"""Extract the tested examples of spec/README.md (see its "About the examples" section)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "spec" / "README.md"
_FENCE = re.compile(r"^```([\w-]*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*([\w-]+)\s*:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    lang: str
    text: str
    line: int  # line of the opening fence (1-based)
    directives: dict = field(default_factory=dict)


def blocks(path: Path = README) -> list[Block]:
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    pending: dict = {}
    i = 0
    while i < len(lines):
        directive = _DIRECTIVE.match(lines[i])
        if directive:
            key, value = directive.groups()
            pending[key] = json.loads(value) if key == "annotations" else value
            i += 1
            continue
        fence = _FENCE.match(lines[i])
        if fence:
            start = i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append(Block(fence.group(1), "\n".join(body) + "\n", start + 1, pending))
            pending = {}
        i += 1
    return out


@dataclass
class Example:
    rules: Block
    model: Block | None = None
    expected: Block | None = None  # 'text' after hqp-error, 'trace' after a no-fire model


def examples(path: Path = README) -> list[Example]:
    found = blocks(path)
    out = []
    for index, block in enumerate(found):
        if block.lang not in ("hqp", "hqp-error"):
            continue
        example = Example(block)
        rest = found[index + 1:]
        if block.lang == "hqp" and rest and rest[0].lang == "onnx":
            example.model = rest[0]
            if len(rest) > 1 and rest[1].lang == "trace":
                example.expected = rest[1]
        elif block.lang == "hqp-error" and rest and rest[0].lang == "text":
            example.expected = rest[0]
        out.append(example)
    return out
