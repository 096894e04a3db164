"""Golden-graph cases: ONNX textual syntax with lit-style comment directives.

A case file holds comment lines and the model text::

    # RUN: hqpc %s --pipeline=fold-bn-into-conv --emit=text
    # CHECK: out = Conv
    # CHECK-NOT: BatchNormalization
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] out) <float[4, 3, 3, 3] w> { out = Conv (x, w) }

Directives: ``RUN`` (the command; ``%s`` is the model built from the text), ``CHECK``,
``CHECK-NEXT``, ``CHECK-NOT`` (FileCheck semantics over the command's standard output),
``EXPECT-EXIT: N`` (default 0) and ``EXPECT-ROLLBACK: NAME`` (a pass the guard must roll back).
Names declared in the ``<...>`` list without values become initializers with deterministic
seeded values (:func:`seeded_value`). A case with a sibling ``<name>.expected`` file also
compares the whole output with it (``--update-goldens`` rewrites that file).
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
from onnx import helper, numpy_helper

DIRECTIVE = re.compile(r"^\s*#\s*(RUN|CHECK|CHECK-NEXT|CHECK-NOT|EXPECT-EXIT|EXPECT-ROLLBACK):\s?(.*)$")


class CheckFailure(AssertionError):
    """A CHECK directive did not hold; the message names the directive and shows context."""


@dataclass
class GoldenCase:
    path: Path
    run: str
    checks: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, pattern, line number)
    expect_exit: int = 0
    expect_rollback: list[str] = field(default_factory=list)
    model_text: str = ""

    @classmethod
    def parse(cls, path: Path) -> "GoldenCase":
        run = None
        case = cls(path=path, run="")
        body = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            match = DIRECTIVE.match(line)
            if not match:
                body.append(line)
                continue
            kind, value = match.group(1), match.group(2).rstrip()
            if kind == "RUN":
                run = value
            elif kind == "EXPECT-EXIT":
                case.expect_exit = int(value)
            elif kind == "EXPECT-ROLLBACK":
                case.expect_rollback.append(value.strip())
            else:
                case.checks.append((kind, value, number))
            body.append("")  # keep line numbers of the model text aligned with the file
        if run is None:
            raise ValueError(f"{path}: no '# RUN:' line")
        case.run = run
        case.model_text = "\n".join(body)
        return case

    def build_model(self) -> onnx.ModelProto:
        return build_model_from_text(self.model_text, seed_base=self.path.name)


def build_model_from_text(text: str, seed_base: str = "") -> onnx.ModelProto:
    """Parse ONNX text; declared-but-valueless, unproduced names become seeded initializers."""
    model = onnx.parser.parse_model(text)
    graph = model.graph
    produced = {name for node in graph.node for name in node.output}
    inputs = {i.name for i in graph.input}
    have = {t.name for t in graph.initializer}
    roles = _input_roles(graph)
    keep_vi = []
    for value in graph.value_info:
        if value.name in produced or value.name in inputs or value.name in have:
            keep_vi.append(value)
            continue
        elem = value.type.tensor_type.elem_type
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        array = seeded_value(f"{seed_base}:{value.name}", shape, elem, roles.get(value.name, ""))
        graph.initializer.append(numpy_helper.from_array(array, value.name))
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
    if model.ir_version == 0 or model.ir_version > 10:
        model.ir_version = 8
    return model


def _input_roles(graph: onnx.GraphProto) -> dict[str, str]:
    """Role of a tensor by how it is used: 'variance' for BatchNormalization's 5th input."""
    roles = {}
    for node in graph.node:
        if node.op_type == "BatchNormalization" and len(node.input) >= 5:
            roles[node.input[4]] = "variance"
    return roles


def seeded_value(key: str, shape: list[int], elem_type: int, role: str = "") -> np.ndarray:
    """Deterministic values for a declared initializer: N(0, 0.5²) floats, uniform(0.5, 1.5)
    for variances (must be positive), integers in [0, 4) otherwise. Seeded by CRC32 of ``key``."""
    rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")))
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    if np.issubdtype(dtype, np.floating):
        values = rng.uniform(0.5, 1.5, shape) if role == "variance" else rng.normal(0.0, 0.5, shape)
    elif dtype == np.bool_:
        values = rng.integers(0, 2, shape)
    else:
        values = rng.integers(0, 4, shape)
    return np.asarray(values).astype(dtype)


def filecheck(output: str, checks: list[tuple[str, str, int]], source: str = "") -> None:
    """FileCheck semantics: CHECK finds the pattern at or after the end of the previous match;
    CHECK-NEXT must match on the line right after it; CHECK-NOT must not occur between the
    previous match and the next positive match (or the end of the output)."""
    lines = output.splitlines()
    line, col = 0, 0          # search position
    last_line = -1            # line of the previous positive match
    pending_not: list[tuple[str, int]] = []

    def fail(message: str, number: int) -> None:
        window = "\n".join(f"  {i + 1:4d} | {text}" for i, text in
                           list(enumerate(lines))[max(0, line - 2): line + 6])
        raise CheckFailure(f"{source}:{number}: {message}\noutput near the search position:\n{window}")

    def check_nots(end_line: int, end_col: int) -> None:
        for pattern, number in pending_not:
            for index in range(line, min(end_line + 1, len(lines))):
                start = col if index == line else 0
                stop = end_col if index == end_line else len(lines[index])
                if pattern in lines[index][start:stop]:
                    fail(f"CHECK-NOT: '{pattern}' found on output line {index + 1}", number)
        pending_not.clear()

    for kind, pattern, number in checks:
        if kind == "CHECK-NOT":
            pending_not.append((pattern, number))
            continue
        if kind == "CHECK-NEXT":
            if last_line < 0:
                fail("CHECK-NEXT without a previous CHECK", number)
            target = last_line + 1
            found = target < len(lines) and pattern in lines[target]
            if not found:
                fail(f"CHECK-NEXT: '{pattern}' not on the line after the previous match", number)
            position = lines[target].index(pattern)
            check_nots(target, position)
            line, col, last_line = target, position + len(pattern), target
            continue
        for index in range(line, len(lines)):
            start = col if index == line else 0
            position = lines[index].find(pattern, start)
            if position >= 0:
                check_nots(index, position)
                line, col, last_line = index, position + len(pattern), index
                break
        else:
            fail(f"CHECK: '{pattern}' not found", number)
    check_nots(len(lines) - 1, len(lines[-1]) if lines else 0)
