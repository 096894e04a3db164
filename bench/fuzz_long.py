#!/usr/bin/env python3
"""Long fuzzing run: tests/hardening/test_fuzz.py with its example counts multiplied and
random (not derandomized) exploration, plus exit-code statistics.

    python bench/fuzz_long.py                # scale 25 (about 10-20 min on one core)
    python bench/fuzz_long.py --scale 100 -k graph_mutations

Every example must end with exit 0, 1 or 2 (never 3 = internal error, never a traceback); a
failure prints hypothesis's shrunk reproducer. The statistics (exit code, first stderr line
with paths and numbers blurred) go to stdout.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=25, help="multiplier of the CI example counts")
    parser.add_argument("-k", dest="select", help="pytest -k expression (e.g. graph_mutations)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hqpc-fuzz-") as tmp:
        log = Path(tmp) / "exits.tsv"
        env = {**os.environ, "HQPC_FUZZ_SCALE": str(args.scale), "HQPC_FUZZ_LOG": str(log)}
        cmd = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider",
               str(REPO / "tests" / "hardening" / "test_fuzz.py")]
        if args.select:
            cmd += ["-k", args.select]
        code = subprocess.call(cmd, cwd=REPO, env=env)
        rows = [line.split("\t", 1) for line in log.read_text().splitlines()] if log.exists() else []
    exits = collections.Counter(row[0] for row in rows)
    messages = collections.Counter(re.sub(r"\d+", "N", re.sub(r"/\S+\.onnx", "M", row[1]))[:100]
                                   for row in rows if len(row) > 1 and row[1])
    print(f"\n{len(rows)} model examples; exit codes: {dict(sorted(exits.items()))}")
    for message, count in messages.most_common(25):
        print(f"{count:6d}  {message}")
    return code


if __name__ == "__main__":
    sys.exit(main())
