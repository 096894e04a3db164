"""The terminal summary printed at the end of every ``hqpc`` run (stderr; nothing with ``-q``).

Two blocks, drawn with ``rich`` (plain text without colour when stderr is not a terminal):

* a **pass table**: one row per pass — status (changed / no change / skipped / ROLLED BACK),
  wall time, nodes before → after, and the numeric guard's verdict (worst absolute error).
  At normal verbosity the passes that ran without changing anything are folded into one
  "… ran without change" row; ``-v`` lists every pass.
* a **result block**: nodes, parameters and bytes before → after (size ratio), compile time,
  then what the report knows about accuracy and speed — the -O3 accuracy contract
  (``report["contract"]``: baseline and final top-1 on the held-out images, drop against the
  budget, latency and size ratios, how the drop was split between pruning and quantization,
  and plainly whether the budget was met or what was walked back), else the pruning search's
  held-out numbers and the precision plan's counts when those passes ran.

Everything is read from the report dict (schema in the README), so a saved report can be
summarised again: ``python -m hqpc.summary report.json``.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any, TextIO

__all__ = ["print_summary", "summary_renderables", "pass_rows", "result_lines"]

_STATUS_STYLE = {"changed": "green", "no change": "dim", "skipped": "yellow", "ROLLED BACK": "bold red"}


def _status(rec: dict) -> str:
    if rec.get("skipped"):
        return "skipped"
    if rec.get("rolled_back"):
        return "ROLLED BACK"
    return "changed" if rec.get("modified") else "no change"


def _guard_text(rec: dict) -> str:
    guard = (rec.get("checks") or {}).get("guard")
    if guard and guard.get("status") == "skipped":
        return "-"
    if guard and "outputs" in guard:
        worst = max((float(o.get("max_abs", 0.0)) for o in guard["outputs"]), default=0.0)
        return f"{'ok' if guard.get('ok') else 'FAIL'} (max abs err {worst:.2g})"
    if rec.get("skipped"):
        return rec["skipped"]
    return "-" if not rec.get("modified") else ""


def pass_rows(report: dict, verbose: bool = False) -> list[tuple[str, str, str, str, str]]:
    """(pass, status, ms, nodes, guard) rows; without ``verbose`` the passes that ran without a
    change are folded into one final row."""
    rows, folded, folded_ms = [], 0, 0.0
    for rec in report.get("passes", []):
        status = _status(rec)
        ms = float(rec.get("wall_s", 0.0)) * 1000.0
        if status == "no change" and not verbose and ms < 1000.0:
            folded += 1
            folded_ms += ms
            continue
        nodes = f"{rec.get('nodes_before')}→{rec.get('nodes_after')}" if rec.get("ran") else ""
        rows.append((rec.get("name", "?"), status, f"{ms:.1f}", nodes, _guard_text(rec)))
    if folded:
        rows.append((f"({folded} more)", "no change", f"{folded_ms:.1f}", "", "-v lists them"))
    return rows


def _pt(value: Any) -> str:
    return "?" if value is None else f"{float(value):.2f}"


def _ms(value: Any) -> str:
    return "?" if value is None else f"{float(value):.3g}"


def _bytes(n: Any) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n:.2f} GB"


def result_lines(report: dict) -> list[tuple[str, str, str]]:
    """(label, value, style) lines of the result block."""
    s = report.get("summary", {})
    out: list[tuple[str, str, str]] = []
    out.append(("nodes", f"{s.get('nodes_before')} → {s.get('nodes_after')}", ""))
    out.append(("parameters", f"{s.get('params_before')} → {s.get('params_after')}", ""))
    size = f"{_bytes(s.get('bytes_before'))} → {_bytes(s.get('bytes_after'))}"
    if s.get("bytes_before") and s.get("bytes_after") is not None:
        size += f" (× {s['bytes_after'] / s['bytes_before']:.3f})"
    if report.get("output", {}).get("bytes") is not None:
        size += f"; file {_bytes(report['output']['bytes'])}"
    out.append(("size", size, ""))
    out.append(("compile time", f"{float(s.get('wall_s', 0.0)):.2f} s", ""))
    contract = report.get("contract")
    annotations = report.get("annotations") or {}
    if contract:
        out.extend(_contract_lines(contract))
    else:
        out.extend(_annotation_lines(annotations))
    out.extend(_trt_lines(annotations))
    if s.get("rolled_back"):
        out.append(("rolled back", ", ".join(s["rolled_back"]), "bold red"))
    missing = report.get("missing_passes") or []
    if missing:
        out.append(("not in this build", ", ".join(missing), "yellow"))
    return out


def _contract_lines(c: dict) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    metric = "top-1" if c.get("metric", "top1") == "top1" else "top-1 agreement"
    if c.get("met") is None:
        out.append(("accuracy contract", f"not checked: {c.get('reason', 'unknown')}", "yellow"))
        return out
    images = f"{c.get('eval_images')} held-out images"
    if c.get("calib_images") is not None:
        images += f", {c.get('calib_images')} calibration"
    out.append((f"baseline {metric}", f"{_pt(c.get('baseline_top1'))} % ({images})", ""))
    out.append((f"final {metric}", f"{_pt(c.get('final_top1'))} %", ""))
    verdict = "met" if c.get("met") else "NOT MET"
    style = "green" if c.get("met") and c.get("pipeline_met", True) else ("yellow" if c.get("met") else "bold red")
    out.append(("drop", f"{_pt(c.get('drop'))} pt (budget {_pt(c.get('max_drop'))} pt: {verdict})", style))
    if c.get("walked_back") or c.get("pipeline_met") is False:
        pipeline_drop = None
        if c.get("baseline_top1") is not None and c.get("pipeline_top1") is not None:
            pipeline_drop = float(c["baseline_top1"]) - float(c["pipeline_top1"])
        out.append(("budget", f"NOT MET by the pipeline's model (drop {_pt(pipeline_drop)} pt > "
                    f"{_pt(c.get('max_drop'))} pt)", "bold yellow"))
        what = next((a.get("what") for a in c.get("actions") or [] if a.get("candidate") == c.get("emitted")), None)
        emitted = f"'{c.get('emitted')}' instead" + (f": {what}" if what else "")
        emitted += f" (drop {_pt(c.get('drop'))} pt, {'within' if c.get('met') else 'OVER'} the budget)"
        out.append(("emitted", emitted, "yellow" if c.get("met") else "bold red"))
        tried = [f"{a.get('candidate')} "
                 + (f"{_pt(a.get('drop'))} pt" if a.get("drop") is not None else "failed")
                 for a in c.get("actions") or []]
        if tried:
            out.append(("tried", ", ".join(tried), ""))
    split = c.get("budget_split") or {}
    if split:
        out.append(("budget spent", f"pruning {_pt(split.get('pruning'))} pt, quantization "
                    f"{_pt(split.get('quantization'))} pt", ""))
    if c.get("latency_speedup") is not None:
        lat = c.get("latency_ms") or {}
        speedup = float(c["latency_speedup"])
        faster = f"{speedup:.2f}× faster" if round(speedup, 2) >= 1 else f"{1 / speedup:.2f}× slower"
        out.append(("latency", f"{_ms(lat.get('baseline'))} → {_ms(lat.get('final'))} ms "
                    f"(× {float(c['latency_ratio']):.3f}, {faster}; ONNX Runtime CPU, 1 thread, batch 1)"
                    + (f"; {c['latency_note']}" if c.get("latency_note") else ""), ""))
    if c.get("size_ratio") is not None:
        b = c.get("bytes") or {}
        out.append(("model size", f"{_bytes(b.get('baseline'))} → {_bytes(b.get('final'))} "
                    f"(× {float(c['size_ratio']):.3f}, {(1 - float(c['size_ratio'])) * 100:.1f} % smaller; "
                    "without hqpc metadata)", ""))
    return out


def _annotation_lines(annotations: dict) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    prune = annotations.get("prune") or {}
    final = prune.get("final") or {}
    if final:
        metric = prune.get("metric", "top1")
        before, after = final.get(f"heldout_{metric}_original"), final.get(f"heldout_{metric}_reconstructed",
                                                                             final.get(f"heldout_{metric}_pruned"))
        text = f"speed-up {float(final.get('speedup', 1.0)):.2f}×"
        if before is not None and after is not None:
            text += f", held-out {metric} {_pt(before)} → {_pt(after)} % ({final.get('heldout_images')} images)"
        out.append(("pruning", text, ""))
    elif "history" in prune:
        out.append(("pruning", "no step stayed within the budget", "yellow"))
    plan = (annotations.get("precision") or {}).get("plan") or {}
    if plan:
        counts = Counter(plan.values())
        out.append(("precision", ", ".join(f"{counts[p]} {p}" for p in ("int4", "int8", "fp16", "fp32") if counts[p]), ""))
    return out


def _trt_lines(annotations: dict) -> list[tuple[str, str, str]]:
    """The verify-trt outcome in one line (the per-layer table is in report.html/json)."""
    trt = annotations.get("trt") or {}
    if "builder" not in trt:
        return []
    text = f"{trt['builder']} SM {trt.get('compute_capability')}: " + (
        "parsed and built" if trt.get("parsed") and trt.get("built") else
        "parse FAILED" if not trt.get("parsed") else "build FAILED")
    if trt.get("quantized"):
        text += f", {trt.get('as_assigned')}/{trt.get('quantized')} quantized layers as assigned"
    return [("tensorrt", text, "" if trt.get("status") == "ok" else "red")]


def summary_renderables(report: dict, verbose: bool = False):
    """The rich Table of passes and the result Table."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title="passes", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, justify in (("pass", "left"), ("status", "left"), ("ms", "right"), ("nodes", "right"), ("guard", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "guard")
    for rec_row in pass_rows(report, verbose):
        name, status, ms, nodes, guard = rec_row
        table.add_row(name, Text(status, style=_STATUS_STYLE.get(status, "")), ms, nodes, guard)
    rolled = [r for r in report.get("passes", []) if r.get("rolled_back")]
    result = Table(title=f"result (-O{report.get('opt_level')}, target {report.get('target')})", title_justify="left",
                   box=box.SIMPLE, show_header=False, show_edge=False, pad_edge=False)
    result.add_column("what", style="bold", no_wrap=True)
    result.add_column("value")
    for label, value, style in result_lines(report):
        result.add_row(label, Text(value, style=style))
    for r in rolled:
        result.add_row(f"  {r.get('name')}", Text(f"reason: {r.get('error')}", style="red"))
    return table, result


def print_summary(result_or_report: Any, stream: TextIO | None = None, verbosity: int = 1) -> None:
    """Print the summary of a :class:`~hqpc.compiler.CompileResult` (or a report dict) to
    ``stream`` (default stderr); nothing when ``verbosity`` is 0 (``-q``)."""
    if verbosity <= 0:
        return
    from rich.console import Console

    report = result_or_report if isinstance(result_or_report, dict) else result_or_report.report
    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):
        tty = False
    console = Console(file=stream, width=None if tty else 120, force_terminal=tty, no_color=not tty,
                      highlight=False, soft_wrap=False)
    table, result = summary_renderables(report, verbose=verbosity >= 2)
    console.print(table)
    console.print(result)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m hqpc.summary REPORT.json", file=sys.stderr)
        return 0 if args in (["-h"], ["--help"]) else 2
    try:
        with open(args[0], encoding="utf-8") as handle:
            report = json.load(handle)
    except (OSError, ValueError) as exc:
        print(f"hqpc.summary: cannot read {args[0]}: {exc}", file=sys.stderr)
        return 2
    print_summary(report, sys.stdout, verbosity=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
