"""Command line: ``hqpc MODEL [-O0..-O3] [--target NAME] [-o OUT] ...`` and ``hqpc rules ...``.

Exit codes: 0 success; 1 a pass was rolled back and ``--strict`` was given; 2 bad input
(one line on stderr naming the problem, no output written); 3 internal error; 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from hqpc import __version__
from hqpc.compiler import (CompileOptions, check_output_path, compile_model, default_output_path,
                           write_outputs)
from hqpc.errors import HqpcError, OutputError

EXIT_OK, EXIT_GUARD, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
# characters str.splitlines() breaks on, shown escaped so that an error stays one line
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str):
        raise HqpcError(f"{message} (see hqpc --help)")


def _size_budget(text: str) -> float | int:
    """``0.6`` → fraction of the all-INT8 weight size; ``1500000`` → bytes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size-budget expects a fraction in (0, 1] or a byte count, got '{text}'")
    if 0 < value <= 1:
        return value
    if value > 1 and value.is_integer():
        return int(value)
    raise argparse.ArgumentTypeError(f"--size-budget expects a fraction in (0, 1] or a byte count, got '{text}'")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got '{text}'")
    return value


def _int_at_least(minimum: int):
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got '{text}'")
        return value
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hqpc", description="Compile an ONNX model for an edge target: clean-up, "
                     "Fisher-guided pruning and mixed-precision quantization, each pass numerically guarded.")
    parser.add_argument("model", nargs="?", help="input ONNX model (never overwritten)")
    parser.add_argument("-O", dest="opt_level", type=int, choices=range(4), default=1, metavar="LEVEL",
                        help="optimization level -O0..-O3 (default -O1: exact clean-up only)")
    parser.add_argument("--target", default="cpu", help="target profile (spec/targets): cpu, orin, ... (default cpu)")
    parser.add_argument("-o", "--output", type=Path, help="output path (default: <stem>.hqp.onnx beside the input; "
                        "with --emit text, standard output)")
    parser.add_argument("--data", type=Path, help="data spec TOML (calibration/evaluation images or npz)")
    parser.add_argument("--max-drop", type=_non_negative_float, default=1.0, metavar="PCT",
                        help="accuracy budget: largest allowed top-1 drop in points (default 1.0)")
    parser.add_argument("--size-budget", type=_size_budget, metavar="FRACTION|BYTES",
                        help="weight-size budget: a fraction (0, 1] of the all-INT8 weight size, or a byte count")
    parser.add_argument("--pipeline", help="explicit pass pipeline, e.g. 'fold-bn-into-conv,eliminate-dead-code' (overrides -O)")
    parser.add_argument("--disable-pass", action="append", default=[], metavar="NAMES",
                        help="comma-separated passes to skip (repeatable)")
    parser.add_argument("--pass-file", action="append", default=[], type=Path, metavar="FILE",
                        help="load rewrite rules from a .hqp file (repeatable)")
    parser.add_argument("--report", type=Path, help="write the JSON report here")
    parser.add_argument("--report-html", type=Path, metavar="PATH", help="write a static HTML report here (per-layer "
                        "table, pruning curve, bitwidth chart; charts need matplotlib: pip install 'hqpc[report]')")
    parser.add_argument("--print-ir-after", metavar="NAME|all", help="print the IR after these passes (comma-separated) to stderr")
    parser.add_argument("--emit", choices=("onnx", "text", "plan"), default="onnx",
                        help="output: onnx (default), text (ONNX textual syntax), plan (also build a TensorRT "
                        "engine: rtx builds here with TensorRT-RTX; orin/xavier/t4 need TensorRT on the device)")
    parser.add_argument("--dla-core", type=int, metavar="N", help="TensorRT targets with DLAs (orin): run on DLA core N "
                        "with GPU fallback (in build_plan.sh and plans)")
    parser.add_argument("--trt-check", choices=("fail", "warn", "require"), default="fail",
                        help="verify-trt: fail (roll back on a TensorRT-RTX finding; skipped when it is not installed), "
                        "warn (report only), require (fail when TensorRT-RTX is not installed)")
    parser.add_argument("--seed", type=_int_at_least(0), default=0, help="seed for guard inputs, sampling and search (default 0)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any pass was rolled back")
    parser.add_argument("--guard-batch", type=_int_at_least(1), default=4, metavar="N", help="inputs per numeric-guard run (default 4)")
    parser.add_argument("--list-passes", action="store_true", help="list registered passes and pipelines, then exit")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="print per-pass details and timings")
    parser.add_argument("--version", action="version", version=f"hqpc {__version__}")
    return parser


def _log_to_stderr(verbosity: int):
    def log(message: str) -> None:
        if verbosity >= 1:
            print(message, file=sys.stderr)
    return log


def _print_passes() -> None:
    from hqpc.registry import PIPELINES, level_pipeline, passes, source_of

    for name, cls in sorted(passes().items()):
        info = cls.info
        tol = "exact" if info.tolerance is None else (f"atol={info.tolerance.atol:g}"
                                                       f"{' x scale' if info.tolerance.atol_per_scale else ''} "
                                                       f"rtol={info.tolerance.rtol:g}")
        print(f"{name:28s} -O{info.opt_level}  {tol:24s} {source_of(name)}  {info.description}")
    for level in sorted(PIPELINES):
        print(f"-O{level}: {','.join(level_pipeline(level)) or '(no passes)'}")


def _nearest_existing_folder(folder: Path) -> Path:
    """The folder itself, or its closest existing ancestor (where missing folders will be created)."""
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write below {folder}: it is a file, not a folder")
    return folder


def run(argv: list[str]) -> int:
    if argv and argv[0] == "rules":
        from hqpc.dsl.cli import main_rules

        return main_rules(argv[1:])
    args = build_parser().parse_args(argv)
    verbosity = 0 if args.quiet else (2 if args.verbose else 1)
    for pass_file in args.pass_file:
        from hqpc.dsl.cli import load_pass_file

        load_pass_file(pass_file)
    if args.list_passes:
        _print_passes()
        return EXIT_OK
    if not args.model:
        raise HqpcError("no input model given (usage: hqpc MODEL [-O0..-O3] [--target NAME] [-o OUT])")
    model_path = Path(args.model)
    output = args.output
    if output is None and args.emit == "onnx":
        output = default_output_path(model_path, args.emit)
    for path in (output, args.report, args.report_html):
        if path is not None:
            check_output_path(path, [model_path, args.data])
            folder = _nearest_existing_folder(path.parent.resolve())
            if not os.access(folder, os.W_OK):
                raise OutputError(f"cannot write {path}: {folder} is not writable")
    if output is not None and args.report is not None and output.resolve() == args.report.resolve():
        raise OutputError("the output model and the report are the same file")
    if args.report_html is not None and args.report_html.resolve() in {p.resolve() for p in (output, args.report) if p}:
        raise OutputError(f"--report-html {args.report_html} is the same file as the output model or the JSON report")
    disabled = tuple(name.strip() for group in args.disable_pass for name in group.split(",") if name.strip())
    if args.print_ir_after and args.print_ir_after != "all":
        from hqpc.registry import get_pass

        for name in args.print_ir_after.split(","):
            try:
                get_pass(name)
            except HqpcError as exc:
                raise HqpcError(f"--print-ir-after: {exc}") from None
    options = CompileOptions(model=model_path, opt_level=args.opt_level, target=args.target, output=output,
                             data=args.data, max_drop=args.max_drop, pipeline=args.pipeline, disabled=disabled,
                             report=args.report, report_html=args.report_html, print_ir_after=args.print_ir_after, emit=args.emit,
                             seed=args.seed, strict=args.strict, verbosity=verbosity, guard_batch=args.guard_batch,
                             extra={"size_budget": args.size_budget, "dla_core": args.dla_core,
                                    "trt_check": args.trt_check})
    log = _log_to_stderr(verbosity)
    result = compile_model(options, log=log)
    write_outputs(result, options, sys.stdout, log=log)
    if verbosity >= 1:
        from hqpc.summary import print_summary

        print_summary(result, sys.stderr, verbosity)
        if output is not None:
            print(f"wrote {output}", file=sys.stderr)
    if result.rolled_back:
        names = ", ".join(r.name for r in result.rolled_back)
        if args.strict:
            print(f"hqpc: error: rolled back by the guard: {names} (--strict)", file=sys.stderr)
            return EXIT_GUARD
        if verbosity >= 1:
            print(f"hqpc: warning: rolled back: {names}", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        return run(argv)
    except HqpcError as exc:  # one line, even when a name in the message holds a line break
        message = str(exc).strip().translate(_LINE_BREAKS)
        print(f"hqpc: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hqpc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a compiler bug: one line, the traceback only with -v
        if verbose:
            traceback.print_exc()
        message = " ".join(str(exc).split())[:300]
        print(f"hqpc: internal error: {type(exc).__name__}: {message} (rerun with -v for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
