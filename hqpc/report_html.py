"""report.html: a static, self-contained page for one compile (``--report-html PATH``).

Open it in a browser, no server: CSS is inline and the charts are matplotlib PNGs embedded
as base64 ``data:`` URIs. Sections:

* **summary**: input/output, target, level, nodes/params/bytes before → after, compile time,
  the accuracy contract when it ran (baseline and final top-1, drop vs budget, latency and
  size ratios, how the drop was split between pruning and quantization, walk-back actions);
* **passes**: status, time, nodes, numeric guard per pass;
* **per-layer table**: every Conv/ConvTranspose/Gemm/MatMul — channels kept / original,
  precision (and why it is not int8), INT8 weight sensitivity and mean Fisher channel score
  (``annotate-sensitivity``), latency and its share (``assign-precision``'s per-layer
  measurements at the chosen precision);
* **charts**: the pruning search's accuracy vs speed-up curve (accepted and rejected steps),
  a bitwidth bar chart (bits per layer, counts per precision), and a latency-vs-top-1 Pareto
  plot — from benchmark results when given (``bench=``), else from the contract's baseline,
  final and walk-back candidates.

matplotlib is optional (``pip install 'hqpc[report]'``): without it the page has the tables
and a note saying the charts were left out. Every value shown comes from the report (schema in
the README) and, when given, the compiled and input ModelProtos (for channel counts).
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import onnx

from hqpc.ir import atomic_write_text

__all__ = ["render_report_html", "write_report_html", "layer_rows", "pareto_front", "pareto_figure_png",
           "matplotlib_available"]

_UNIT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
_COLORS = {"fp32": "#7f7f7f", "fp16": "#1f77b4", "int8": "#2ca02c", "int4": "#d62728"}


def _matplotlib():
    """(Figure, FigureCanvasAgg) or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except Exception:  # ImportError, or a broken install
        return None
    return Figure, FigureCanvasAgg


def matplotlib_available() -> bool:
    return _matplotlib() is not None


def _fig_png(fig, canvas_cls) -> str:
    canvas_cls(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- per-layer data
def _producers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in proto.graph.node for out in n.output}


def _weight_dims(proto: onnx.ModelProto, node: onnx.NodeProto) -> tuple[str | None, list[int] | None]:
    """(initializer name, dims) of the node's weight, through a DequantizeLinear if any."""
    if len(node.input) < 2:
        return None, None
    inits = {t.name: t for t in proto.graph.initializer}
    producers = _producers(proto)
    name = node.input[1]
    for _ in range(3):  # DequantizeLinear(W_q), possibly behind a Cast/Transpose-free chain
        if name in inits:
            return name, list(inits[name].dims)
        prod = producers.get(name)
        if prod is None or not prod.input:
            return None, None
        if prod.op_type == "Constant":
            for attr in prod.attribute:
                if attr.name == "value":
                    return name, list(attr.t.dims)
            return None, None
        name = prod.input[0]
    return None, None


def _out_channels(node: onnx.NodeProto, dims: list[int] | None) -> int | None:
    if not dims:
        return None
    if node.op_type == "Conv":
        return dims[0]
    if node.op_type == "ConvTranspose":
        group = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
        return dims[1] * group if len(dims) > 1 else None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return dims[0] if trans_b else (dims[1] if len(dims) > 1 else None)
    if node.op_type == "MatMul":
        return dims[-1]
    return None


def _units(proto: onnx.ModelProto | None) -> dict[str, tuple[onnx.NodeProto, int | None, str | None]]:
    if proto is None:
        return {}
    out = {}
    for n in proto.graph.node:
        if n.op_type in _UNIT_OPS:
            wname, dims = _weight_dims(proto, n)
            if dims is not None:
                out[n.name] = (n, _out_channels(n, dims), wname)
    return out


def layer_rows(report: dict, model: onnx.ModelProto | None = None,
               original: onnx.ModelProto | None = None) -> list[dict[str, Any]]:
    """One dict per layer: name, op, channels, channels_original, precision, reason,
    sens_int8, channel_score, latency_ms, latency_share."""
    ann = report.get("annotations") or {}
    sens = ann.get("sensitivity") or {}
    channel_scores = sens.get("channels") or {}
    tensor_sens = sens.get("tensors") or {}
    sens_layers = (sens.get("method") or {}).get("layers") or {}
    precision = ann.get("precision") or {}
    plan = precision.get("plan") or {}
    reasons = precision.get("reasons") or {}
    latency = precision.get("latency") or {}
    final_units, original_units = _units(model), _units(original)
    names: list[str] = list(final_units) or list(dict.fromkeys([*plan, *channel_scores, *sens_layers]))
    rows = []
    for name in names:
        node = final_units.get(name, (None, None, None))[0] or original_units.get(name, (None, None, None))[0]
        kept = final_units.get(name, (None, None, None))[1]
        orig = original_units.get(name, (None, None, None))[1]
        if orig is None and name in channel_scores:
            orig = len(channel_scores[name])
        prec = plan.get(name) or ("fp32" if precision else None)
        weight = (sens_layers.get(name) or {}).get("weight") or original_units.get(name, (None, None, None))[2]
        s8 = (tensor_sens.get(weight) or {}).get("int8") if weight else None
        scores = channel_scores.get(name)
        lat = (latency.get(name) or {}).get(prec) if prec else None
        rows.append({"name": name, "op": node.op_type if node is not None else "", "channels": kept,
                     "channels_original": orig, "precision": prec, "reason": reasons.get(name, ""),
                     "sens_int8": s8, "channel_score": (sum(scores) / len(scores)) if scores else None,
                     "latency_ms": lat, "latency_share": None})
    total = sum(r["latency_ms"] for r in rows if isinstance(r["latency_ms"], (int, float)))
    if total > 0:
        for r in rows:
            if isinstance(r["latency_ms"], (int, float)):
                r["latency_share"] = r["latency_ms"] / total
    return rows


# --------------------------------------------------------------------------- Pareto
def pareto_front(points: Iterable[dict]) -> list[dict]:
    """Points not dominated (lower latency_ms and higher top1 are better), by latency."""
    pts = [p for p in points if p.get("latency_ms") is not None and p.get("top1") is not None]
    pts.sort(key=lambda p: (p["latency_ms"], -p["top1"]))
    front, best = [], float("-inf")
    for p in pts:
        if p["top1"] > best:
            front.append(p)
            best = p["top1"]
    return front


def _pareto_axes(ax, points: list[dict], title: str) -> None:
    pts = [p for p in points if p.get("latency_ms") is not None and p.get("top1") is not None]
    for i, p in enumerate(sorted(pts, key=lambda q: q["latency_ms"])):
        ax.scatter([p["latency_ms"]], [p["top1"]], s=36, zorder=3)
        ax.annotate(p.get("label", ""), (p["latency_ms"], p["top1"]), textcoords="offset points",
                    xytext=(4, 5 if i % 2 == 0 else -11), fontsize=7)
    front = pareto_front(pts)
    if len(front) > 1:
        ax.plot([p["latency_ms"] for p in front], [p["top1"] for p in front], "--", color="#444", lw=1, zorder=2)
    ax.set_xlabel("latency (ms, ONNX Runtime CPU, 1 thread, batch 1)", fontsize=8)
    ax.set_ylabel("top-1 (%)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=7)


def pareto_figure_png(groups: dict[str, list[dict]], path: str | Path | None = None) -> str | None:
    """A latency-vs-top-1 plot, one panel per group (model); returns base64 PNG (also written to
    ``path`` when given), or None without matplotlib."""
    mpl = _matplotlib()
    if mpl is None or not groups:
        return None
    Figure, Canvas = mpl
    n = len(groups)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(5.2 * cols, 3.8 * rows))
    for i, (title, points) in enumerate(groups.items()):
        _pareto_axes(fig.add_subplot(rows, cols, i + 1), points, title)
    fig.tight_layout()
    data = _fig_png(fig, Canvas)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(base64.b64decode(data))
    return data


# --------------------------------------------------------------------------- charts of one report
def _prune_curve_png(prune: dict) -> str | None:
    history = prune.get("history") or []
    metric = prune.get("metric", "top1")
    if len(history) < 2 or _matplotlib() is None:
        return None
    Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    acc = [(h.get("speedup"), h.get(metric), h.get("step")) for h in history if h.get("accepted")]
    rej = [(h.get("speedup"), h.get(metric), h.get("step")) for h in history if not h.get("accepted")]
    if acc:
        ax.plot([a[0] for a in acc], [a[1] for a in acc], "-o", color="#2ca02c", ms=4, label="accepted")
    if rej:
        ax.scatter([r[0] for r in rej], [r[1] for r in rej], marker="x", color="#d62728", label="rejected", zorder=3)
    for s, a, step in acc + rej:
        if s is not None and a is not None:
            ax.annotate(str(step), (s, a), textcoords="offset points", xytext=(3, 3), fontsize=6)
    base = history[0].get(metric)
    budget = prune.get("budget")
    if base is not None and budget is not None:
        ax.axhline(base - float(budget), color="#444", ls="--", lw=1, label=f"budget ({float(budget):.2f} pt)")
    ax.set_xlabel("measured speed-up vs. input (×)", fontsize=8)
    ax.set_ylabel(f"{metric} on search images (%)", fontsize=8)
    ax.set_title("pruning search", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _fig_png(fig, Canvas)


def _bitwidth_png(rows: list[dict]) -> str | None:
    rows = [r for r in rows if r.get("precision") in _BITS]
    if not rows or _matplotlib() is None:
        return None
    Figure, Canvas = _matplotlib()
    width = max(6.0, min(16.0, 0.16 * len(rows) + 3))
    fig = Figure(figsize=(width, 3.4))
    ax = fig.add_subplot(1, 4, (1, 3))
    ax.bar(range(len(rows)), [_BITS[r["precision"]] for r in rows],
           color=[_COLORS[r["precision"]] for r in rows], width=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([str(i) for i in range(len(rows))], fontsize=5, rotation=90)
    ax.set_yticks([4, 8, 16, 32])
    ax.set_ylabel("bits (weights)", fontsize=8)
    ax.set_xlabel("layer (index in the per-layer table)", fontsize=8)
    ax.set_title("precision per layer", fontsize=9)
    ax.tick_params(labelsize=7)
    counts = Counter(r["precision"] for r in rows)
    order = [p for p in ("int4", "int8", "fp16", "fp32") if counts[p]]
    ax2 = fig.add_subplot(1, 4, 4)
    ax2.bar(order, [counts[p] for p in order], color=[_COLORS[p] for p in order])
    ax2.set_title("layers per precision", fontsize=9)
    from matplotlib.ticker import MaxNLocator

    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.tick_params(labelsize=7)
    fig.tight_layout()
    return _fig_png(fig, Canvas)


def _contract_points(report: dict) -> list[dict]:
    c = report.get("contract") or {}
    lat = c.get("latency_ms") or {}
    points = []
    if lat.get("baseline") is not None and c.get("baseline_top1") is not None:
        points.append({"label": "input (fp32)", "latency_ms": lat["baseline"], "top1": c["baseline_top1"]})
    if lat.get("final") is not None and c.get("final_top1") is not None:
        points.append({"label": f"emitted ({c.get('emitted', 'compiled')})", "latency_ms": lat["final"],
                       "top1": c["final_top1"]})
    for a in c.get("actions") or []:
        if a.get("latency_ms") is not None and a.get("top1") is not None:
            points.append({"label": a["candidate"], "latency_ms": a["latency_ms"], "top1": a["top1"]})
    return points


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1300px}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37}.bad{color:#c62828;font-weight:bold}.warn{color:#9a6700}.dim{color:#888}
.note{background:#fff8e1;border:1px solid #f0d080;padding:6px 10px;font-size:13px}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
code{background:#f4f4f4;padding:1px 4px;font-size:12px;word-break:break-all}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, fmt: str = "{:.3g}") -> str:
    if value is None or value == "":
        return '<td class="num dim">–</td>'
    try:
        return f'<td class="num">{_e(fmt.format(value))}</td>'
    except (TypeError, ValueError):
        return f'<td class="num">{_e(value)}</td>'


def _kv_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _img(data: str | None, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">' if data else ""


def render_report_html(report: dict, model: onnx.ModelProto | None = None, original: onnx.ModelProto | None = None,
                       bench: list[dict] | dict[str, list[dict]] | None = None) -> str:
    """The report page as one HTML string. ``bench``: Pareto points ``{"label", "latency_ms",
    "top1"}`` (a list, or ``{panel title: list}``)."""
    from hqpc.summary import pass_rows, result_lines

    mpl = matplotlib_available()
    s = report.get("summary", {})
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>hqpc report: {_e((report.get('input') or {}).get('path') or 'model')}</title>",
             f"<style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>hqpc report — {_e((report.get('input') or {}).get('path') or 'in-memory model')}</h1>")
    if not mpl:
        parts.append('<p class="note">matplotlib is not installed, so the charts are left out '
                     "(<code>pip install 'hqpc[report]'</code>); the tables are complete.</p>")
    # summary
    info = [("hqpc", _e(report.get("hqpc_version"))), ("target / level", _e(f"{report.get('target')} / -O{report.get('opt_level')}")),
            ("input", _e(json.dumps(report.get("input", {})))), ("output", _e(json.dumps(report.get("output", {})) or "–")),
            ("seed", _e(report.get("seed"))), ("guard inputs", _e(report.get("guard_inputs")))]
    for label, value, style in result_lines(report):
        cls = {"green": "ok", "bold red": "bad", "yellow": "warn", "red": "bad"}.get(style, "")
        info.append((label, f'<span class="{cls}">{_e(value)}</span>' if cls else _e(value)))
    info.append(("pipeline", f"<code>{_e(report.get('pipeline'))}</code>"))
    parts.append("<h2>Summary</h2>" + _kv_table(info))
    contract = report.get("contract")
    if contract and contract.get("actions"):
        rows = "".join(
            f"<tr><td>{_e(a.get('candidate'))}</td><td>{_e(a.get('what'))}</td>{_num(a.get('top1'), '{:.2f}')}"
            f"{_num(a.get('drop'), '{:.2f}')}<td>{'yes' if a.get('within_budget') else _e(a.get('error') or 'no')}</td>"
            f"{_num(a.get('latency_ms'), '{:.3f}')}{_num(a.get('wall_s'), '{:.1f}')}</tr>" for a in contract["actions"])
        parts.append("<h2>Accuracy contract: walk-back</h2>"
                     f"<p>{_e(contract.get('message'))}</p><table><tr><th>candidate</th><th>what</th><th>top-1 %</th>"
                     f"<th>drop pt</th><th>within budget</th><th>latency ms</th><th>s</th></tr>{rows}</table>")
    # passes
    prow = "".join(f"<tr><td>{_e(n)}</td><td class=\"{'bad' if st == 'ROLLED BACK' else ''}\">{_e(st)}</td>"
                   f"<td class=\"num\">{_e(ms)}</td><td class=\"num\">{_e(nodes)}</td><td>{_e(g)}</td></tr>"
                   for n, st, ms, nodes, g in pass_rows(report, verbose=True))
    parts.append("<h2>Passes</h2><table><tr><th>pass</th><th>status</th><th>ms</th><th>nodes</th><th>guard</th></tr>"
                 f"{prow}</table>")
    for rec in report.get("passes", []):
        if rec.get("rolled_back"):
            parts.append(f'<p class="bad">{_e(rec.get("name"))} rolled back: {_e(rec.get("error"))}</p>')
    # per-layer
    rows = layer_rows(report, model, original)
    ann = report.get("annotations") or {}
    if rows:
        body = []
        for i, r in enumerate(rows):
            ch = "–" if r["channels"] is None and r["channels_original"] is None else \
                f"{'?' if r['channels'] is None else r['channels']} / {'?' if r['channels_original'] is None else r['channels_original']}"
            pruned = r["channels"] is not None and r["channels_original"] is not None and r["channels"] < r["channels_original"]
            share = None if r["latency_share"] is None else 100.0 * r["latency_share"]
            body.append(f"<tr><td class=\"num\">{i}</td><td>{_e(r['name'])}</td><td>{_e(r['op'])}</td>"
                        f"<td class=\"num{' warn' if pruned else ''}\">{_e(ch)}</td><td>{_e(r['precision'] or '–')}</td>"
                        f"{_num(r['sens_int8'])}{_num(r['channel_score'])}{_num(r['latency_ms'], '{:.4f}')}"
                        f"{_num(share, '{:.1f}')}<td>{_e(r['reason'])}</td></tr>")
        lat_src = (ann.get("precision") or {}).get("latency_source", "")
        parts.append("<h2>Layers</h2><p class=\"dim\">channels: kept / original output channels; sensitivity: "
                     "predicted loss increase (nats) of INT8 weights and mean Fisher channel score from "
                     f"annotate-sensitivity; latency: per-layer measurement at the chosen precision {_e(lat_src)}.</p>"
                     "<table><tr><th>#</th><th>layer</th><th>op</th><th>channels</th><th>precision</th>"
                     "<th>INT8 sensitivity</th><th>channel score</th><th>latency ms</th><th>share %</th>"
                     f"<th>why not int8</th></tr>{''.join(body)}</table>")
    trt = ann.get("trt") or {}
    if trt:
        parts.append(_trt_section(trt))
    # charts
    if mpl:
        charts = []
        prune = ann.get("prune") or (report.get("pipeline_annotations") or {}).get("prune") or {}
        curve = _prune_curve_png(prune)
        if curve:
            charts.append("<h3>Pruning search: accuracy vs speed-up</h3>" + _img(curve, "pruning search curve"))
        bits = _bitwidth_png(rows)
        if bits:
            charts.append("<h3>Bitwidths</h3>" + _img(bits, "bitwidth per layer"))
        groups = bench if isinstance(bench, dict) else ({"benchmark": bench} if bench else None)
        if not groups:
            points = _contract_points(report)
            groups = {"this compile (contract measurements)": points} if len(points) >= 2 else None
        pareto = pareto_figure_png(groups) if groups else None
        if pareto:
            charts.append("<h3>Latency vs top-1 (Pareto)</h3>" + _img(pareto, "Pareto plot"))
        if charts:
            parts.append("<h2>Charts</h2>" + "".join(charts))
        else:
            parts.append('<h2>Charts</h2><p class="dim">no data for charts (no pruning history, precision plan '
                         "or latency measurements in this report).</p>")
    if ann:
        parts.append("<h2>Annotations</h2><p class=\"dim\">namespaces in the report (full values in report.json): "
                     f"{_e(', '.join(sorted(ann)))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _trt_section(trt: dict) -> str:
    """The verify-trt result: builder, outcome, and per Conv/Gemm/MatMul the precision hqpc
    assigned against the one TensorRT chose in the engine's layer dump."""
    if "builder" not in trt:
        return f"<h2>TensorRT check</h2><p class=\"dim\">{_e(trt.get('status', ''))}</p>"
    head = (f"{_e(trt['builder'])}, compute capability {_e(trt.get('compute_capability'))}: "
            f"parsed {'yes' if trt.get('parsed') else 'NO'}, built {'yes' if trt.get('built') else 'NO'}")
    if trt.get("quantized"):
        head += (f"; {trt.get('as_assigned')}/{trt.get('quantized')} quantized layers run at the assigned "
                 f"precision ({_e(trt.get('int8_pct'))} %)")
    if trt.get("note"):
        head += f" ({_e(trt['note'])})"
    problems = "".join(f"<li class=\"warn\">{_e(p)}</li>" for p in trt.get("problems") or [])
    mismatch = ' class="warn"'
    rows = "".join(f"<tr><td>{_e(n.get('node'))}</td><td>{_e(n.get('op'))}</td><td>{_e(n.get('expected'))}</td>"
                   f"<td{'' if n.get('ok') else mismatch}>{_e(n.get('engine'))}</td>"
                   f"<td>{_e(n.get('layer'))}</td></tr>" for n in trt.get("nodes") or [])
    table = ("<table><tr><th>node</th><th>op</th><th>hqpc</th><th>engine</th><th>engine layer</th></tr>"
             f"{rows}</table>") if rows else ""
    return f"<h2>TensorRT check</h2><p>{head}</p>" + (f"<ul>{problems}</ul>" if problems else "") + table


def write_report_html(path: str | Path, report: dict, model: onnx.ModelProto | None = None,
                      original: onnx.ModelProto | None = None, bench: Any = None) -> Path:
    """Write :func:`render_report_html` to ``path`` atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, render_report_html(report, model=model, original=original, bench=bench))
    return path


def original_proto(model: Any) -> onnx.ModelProto | None:
    """The input model as a ModelProto (for channel counts), or None when it cannot be read."""
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(str(model), load_external_data=False)
    except Exception:
        return None
