#!/usr/bin/env python3
"""Zoo sweep: every onnx "light" zoo model plus the shared real models through -O1/-O2/-O3 on
the cpu and orin targets, with random calibration data, recording what each pass did.

For each (model, level, target) run, ``hqpc MODEL -O<L> --target T --data RANDOM.toml -o OUT
--report R`` runs as a subprocess (under ``/usr/bin/time -v`` when present, for peak memory),
and every pass of the registry's pipeline is classified from the report:

  applied      changed the model and its numeric guard passed (``applied*``: analysis pass,
               guard skipped by design)
  no change    ran and left the model as it was (the reason, when the pass logged one)
  declined     skipped, with the stated reason (target, disabled, ...)
  ROLLED BACK  failed verification or the guard, or raised; the model before it was kept
  missing      in the level's pipeline but not in this build

The random calibration data is an npz of seeded N(0, 1) samples shaped like the model input
(static dims as declared, a dynamic batch 12), 8 calibration + 4 evaluation samples, random
labels; the data spec points at it.

Also measures the peak memory of ``-O3`` on MobileNetV2 with the real 300 calibration images
(examples/data/imagenet_mobilenet.toml), the acceptance figure (<= 4 GiB).

Usage:
  python bench/zoo_sweep.py                       # everything -> bench/results/zoo_sweep.md
  python bench/zoo_sweep.py --models squeezenet,shufflenet --levels 1 --targets cpu,orin
  python bench/zoo_sweep.py --no-memory --json bench/results/zoo_sweep.json
  python bench/zoo_sweep.py --render o3.json o12.json --out bench/results/zoo_sweep.md   # merge sweeps

The fast CI subset of the same classification runs in tests/hardening/test_zoo_sweep.py.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "data" / "models"
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
SHARED_NAMES = ("mobilenet_v3_small", "mobilenet_v2", "cifar10_resnet20", "cifar10_resnet56")
TIME = Path("/usr/bin/time")
CALIB, EVAL, DYNAMIC_BATCH, DYNAMIC_DIM = 8, 4, 12, 32
MEMORY_LIMIT_GIB = 4.0


def zoo_models() -> dict[str, Path]:
    """name -> path: the light models (light_ prefix dropped), then the shared ones that exist."""
    models = {p.stem[len("light_"):]: p for p in sorted(LIGHT.glob("light_*.onnx"))}
    for name in SHARED_NAMES:
        if (SHARED_MODELS / f"{name}.onnx").is_file():
            models[name] = SHARED_MODELS / f"{name}.onnx"
    return models


# --------------------------------------------------------------------------- random data
def random_data_spec(model_path: Path, folder: Path, seed: int = 0) -> Path:
    """Write ``folder/calib.npz`` (x shaped like the model input, y random labels) and a data spec."""
    from hqpc.ir import Model
    from hqpc.runtime import ort as ort_rt

    proto = Model.load(model_path).proto
    inputs = ort_rt.graph_inputs(proto)
    if len(inputs) != 1:
        raise ValueError(f"{model_path.name}: {len(inputs)} inputs; the data spec feeds single-input models")
    dims = ort_rt.input_shape(inputs[0])
    count = CALIB + EVAL
    shape = [count] + [d if isinstance(d, int) and d > 0 else DYNAMIC_DIM for d in dims[1:]]
    classes = 10
    out_dims = ort_rt.input_shape(proto.graph.output[0]) if proto.graph.output else []
    if len(out_dims) >= 2 and isinstance(out_dims[1], int) and out_dims[1] > 1:
        classes = out_dims[1]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "calib.npz", x=rng.standard_normal(shape).astype(np.float32),
             y=rng.integers(0, classes, count).astype(np.int64))
    spec = folder / "data.toml"
    spec.write_text(f'[data]\nnpz = "calib.npz"\n[split]\nseed = 0\ncalib = {CALIB}\neval = {EVAL}\n')
    return spec


# --------------------------------------------------------------------------- one run
@dataclass
class PassOutcome:
    name: str
    status: str  # applied | no change | declined | ROLLED BACK | missing
    reason: str = ""


@dataclass
class RunResult:
    model: str
    level: int
    target: str
    data: str  # "random" (random calibration data via --data) or "none" (guard on seeded random inputs)
    exit: int
    wall_s: float
    peak_mib: float | None
    passes: list[PassOutcome] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        """Exit 0 and every pass applied with its guard passing, unchanged, declined or missing."""
        return self.exit == 0 and all(p.status != "ROLLED BACK" for p in self.passes)


def _logged_reasons(stderr: str) -> dict[str, str]:
    """The last ``name: message`` line each pass logged (e.g. "reconstruct: no pruning plan ...")."""
    reasons: dict[str, str] = {}
    for line in stderr.splitlines():
        match = re.match(r"^([a-z][a-z0-9-]*): (.+)$", line.strip())
        if (match and match.group(1) not in ("hqpc", "note", "wrote", "nodes")
                and not re.match(r"[\d.]+ ms", match.group(2))):  # -v timing lines
            reasons[match.group(1)] = match.group(2).strip()  # the last line: usually the conclusion
    return reasons


def classify(report: dict, stderr: str = "") -> list[PassOutcome]:
    """One outcome per pass record of the report, then one per missing pass."""
    logged = _logged_reasons(stderr)
    out: list[PassOutcome] = []
    for record in report.get("passes", []):
        name = record["name"]
        guard = record.get("checks", {}).get("guard", {})
        if record.get("skipped"):
            out.append(PassOutcome(name, "declined", record["skipped"]))
        elif record.get("rolled_back"):
            out.append(PassOutcome(name, "ROLLED BACK", record.get("error", "") or "no reason recorded"))
        elif record.get("modified"):
            if guard.get("status") == "passed":
                out.append(PassOutcome(name, "applied"))
            elif guard.get("status") == "skipped":
                out.append(PassOutcome(name, "applied*", guard.get("reason", "")))
            else:
                out.append(PassOutcome(name, "ROLLED BACK", f"modified without a passing guard: {guard}"))
        else:
            out.append(PassOutcome(name, "no change", logged.get(name, "")))
    out += [PassOutcome(name, "missing", "not in this build") for name in report.get("missing_passes", [])]
    return out


def run_one(name: str, model: Path, level: int, target: str, work: Path, data: Path | None,
            timeout: float = 3600, extra: tuple[str, ...] = ()) -> RunResult:
    """Compile once as a subprocess; parse its report and (when measured) peak memory."""
    work.mkdir(parents=True, exist_ok=True)
    out, report_path = work / f"{name}-O{level}-{target}.onnx", work / f"{name}-O{level}-{target}.json"
    cmd = [sys.executable, "-m", "hqpc", str(model), f"-O{level}", "--target", target, "-o", str(out),
           "--report", str(report_path), *extra]
    if data is not None:
        cmd += ["--data", str(data)]
    timed = TIME.exists()
    full = [str(TIME), "-v", *cmd] if timed else cmd
    start = time.perf_counter()
    try:
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, cwd=work)
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        code, stderr = -1, f"timeout after {timeout:.0f} s"
    wall = time.perf_counter() - start
    peak = None
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if match:
        peak = int(match.group(1)) / 1024
        stderr = stderr[: stderr.rfind("\tCommand being timed:")]
    result = RunResult(name, level, target, "random" if data is not None else "none", code, wall, peak)
    if report_path.exists():
        report = json.loads(report_path.read_text())
        result.passes = classify(report, stderr)
        result.summary = report.get("summary", {})
    if code != 0:
        lines = [l for l in stderr.splitlines() if l.startswith("hqpc:")] or stderr.strip().splitlines()[-1:]
        result.error = " ".join(lines)[:400]
    for path in (out, report_path):
        path.unlink(missing_ok=True)
    return result


# --------------------------------------------------------------------------- the table
MARK = {"applied": "A", "applied*": "A*", "no change": "=", "declined": "-", "ROLLED BACK": "**R**", "missing": "m"}


def markdown(results: list[RunResult], memory: dict | None, header: str) -> str:
    lines = [header, "",
             "Per pass: `A` applied, guard passed · `A*` analysis pass applied (guard skipped by design) · "
             "`=` ran, no change · `-` declined (reason below) · **R** rolled back (reason below) · "
             "`m` in the level's pipeline but missing from this build. Passes that ran without changing the model are "
             "counted (`N passes =`), not listed.", ""]
    lines += ["| model | level | target | data | exit | wall s | peak MiB | nodes | params | passes |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.summary
        nodes = f"{s.get('nodes_before', '?')}→{s.get('nodes_after', '?')}" if s else ""
        params = f"{s.get('params_before', '?')}→{s.get('params_after', '?')}" if s else ""
        shown = [f"{p.name} {MARK[p.status]}" for p in r.passes if p.status != "no change"]
        unchanged = sum(p.status == "no change" for p in r.passes)
        passes = " · ".join(shown + ([f"{unchanged} passes =" if unchanged > 1 else "1 pass ="] if unchanged else []))
        passes = passes or r.error
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "n/a"
        lines.append(f"| {r.model} | -O{r.level} | {r.target} | {r.data} | {r.exit} | {r.wall_s:.1f} | {peak} | "
                     f"{nodes} | {params} | {passes} |")
    reasons: dict[tuple[str, str, str], list[str]] = {}
    for r in results:
        for p in r.passes:
            if p.status in ("declined", "ROLLED BACK", "no change") and p.reason:
                # timings ("1.2 s)", "14.9 s (...") would split identical reasons
                reason = re.sub(r"\d+(?:\.\d+)? ?s( \(|\))", r"… s\1", p.reason)
                reason = re.sub(r"Got: \d+ Expected", "Got: N Expected", reason)
                reasons.setdefault((p.name, p.status, reason), []).append(
                    f"{r.model} -O{r.level} {r.target}{'' if r.data == 'random' else ' (no data)'}")
    if reasons:
        lines += ["", "### Reasons", "", "| pass | outcome | reason | runs |", "|---|---|---|---|"]
        for (name, status, reason), runs in sorted(reasons.items()):
            shown = ", ".join(runs[:6]) + (f" (+{len(runs) - 6} more)" if len(runs) > 6 else "")
            lines.append(f"| {name} | {status} | {reason.replace('|', '/')[:300]} | {shown} |")
    failures = [r for r in results if r.exit != 0]
    if failures:
        lines += ["", "### Failed runs", ""]
        lines += [f"- {r.model} -O{r.level} {r.target} data={r.data}: exit {r.exit}: {r.error}" for r in failures]
    if memory:
        lines += ["", "### Peak memory", "", f"`{memory['command']}`", "",
                  f"- peak RSS: **{memory['peak_mib']:.0f} MiB** ({memory['peak_mib'] / 1024:.2f} GiB; "
                  f"limit {MEMORY_LIMIT_GIB:.0f} GiB: {'OK' if memory['peak_mib'] <= MEMORY_LIMIT_GIB * 1024 else 'OVER'})",
                  f"- exit {memory['exit']}, wall {memory['wall_s']:.0f} s"]
        if memory.get("passes"):
            lines.append("- passes: " + " · ".join(f"{p['name']} {MARK[p['status']]}" for p in memory["passes"]
                                                 if p["status"] != "no change"))
    return "\n".join(lines) + "\n"


def measure_memory(work: Path) -> dict | None:
    """Peak RSS of -O3 on MobileNetV2 with the real 300-image calibration split."""
    model = SHARED_MODELS / "mobilenet_v2.onnx"
    spec = REPO / "examples" / "data" / "imagenet_mobilenet.toml"
    if not model.is_file() or not TIME.exists():
        return None
    result = run_one("mobilenet_v2-memory", model, 3, "cpu", work, spec)
    command = (f"/usr/bin/time -v hqpc ../{model.relative_to(REPO.parent)} -O3 --target cpu "
               f"--data {spec.relative_to(REPO)}")
    return {"command": command, "peak_mib": result.peak_mib or 0.0, "exit": result.exit, "wall_s": result.wall_s,
            "passes": [p.__dict__ for p in result.passes], "error": result.error}


def write_outputs(args, results: list, memory, header: str) -> None:
    """The markdown table (and the JSON with --json), each written atomically."""
    from hqpc.ir import atomic_write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, markdown(results, memory, header))
    if args.json:
        atomic_write_text(args.json, json.dumps({"runs": [dict(r.__dict__, passes=[p.__dict__ for p in r.passes])
                                                          for r in results], "memory": memory}, indent=1))


def load_results(path: Path) -> tuple[list[RunResult], dict | None]:
    """The runs and the memory measurement of one ``--json`` file."""
    raw = json.loads(path.read_text())
    runs = [RunResult(**dict(r, passes=[PassOutcome(**p) for p in r["passes"]])) for r in raw["runs"]]
    return runs, raw.get("memory")


def render(args) -> int:
    """One table from several sweeps' JSON files, ordered by model (zoo order), level, target, data."""
    import hqpc

    order = {name: i for i, name in enumerate(zoo_models())}
    results: list[RunResult] = []
    memory = None
    for path in args.render:
        runs, measured = load_results(path)
        results += runs
        memory = measured or memory
    results.sort(key=lambda r: (order.get(r.model, len(order)), r.model, r.level, r.target, r.data))
    sources = ", ".join(str(p) for p in args.render)
    header = (f"## hqpc zoo sweep\n\nhqpc {hqpc.__version__}, onnx {onnx.__version__}; merged from {sources}; "
              f"data: random = an npz of {CALIB} calib + {EVAL} eval N(0,1) samples via --data; "
              f"one subprocess per run." + (f" {args.note}" if args.note else ""))
    if args.json:
        args.json = None if args.json in args.render else args.json
    write_outputs(args, results, memory, header)
    print(f"wrote {args.out} ({len(results)} runs)", file=sys.stderr)
    return 1 if any(r.exit != 0 for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated subset (names as in the table)")
    parser.add_argument("--levels", default="1,2,3")
    parser.add_argument("--targets", default="cpu,orin")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "zoo_sweep.md")
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON")
    parser.add_argument("--no-memory", action="store_true", help="skip the MobileNetV2 -O3 peak-memory run")
    parser.add_argument("--timeout", type=float, default=3600, help="per run, seconds")
    parser.add_argument("--data", default="random", help="comma-separated: random (random calibration data via "
                        "--data), none (no --data: the guard uses seeded random inputs); default random")
    parser.add_argument("--render", type=Path, nargs="+", metavar="RESULTS.json",
                        help="run nothing: merge the --json files of earlier sweeps (e.g. -O3 and -O1,-O2 run "
                             "separately) into one table at --out")
    parser.add_argument("--note", default="", help="with --render: a sentence for the table's header (how the "
                        "merged sweeps were run)")
    args = parser.parse_args(argv)
    if args.render:
        return render(args)
    models = zoo_models()
    if args.models:
        wanted = args.models.split(",")
        unknown = [m for m in wanted if m not in models]
        if unknown:
            parser.error(f"unknown models {unknown}; known: {', '.join(models)}")
        models = {m: models[m] for m in wanted}
    levels = [int(x) for x in args.levels.split(",")]
    targets = args.targets.split(",")
    modes = args.data.split(",")
    if not set(modes) <= {"random", "none"}:
        parser.error(f"--data takes random and/or none, got {args.data}")
    if not TIME.exists():
        print("note: /usr/bin/time not found (apt-get install -y time); peak memory not measured", file=sys.stderr)
    results: list[RunResult] = []
    work = Path(tempfile.mkdtemp(prefix="hqpc-zoo-"))
    import hqpc

    header = (f"## hqpc zoo sweep\n\nhqpc {hqpc.__version__}, onnx {onnx.__version__}, "
              f"{time.strftime('%Y-%m-%d')}; "
              f"data: {', '.join(modes)} (random = an npz of {CALIB} calib + {EVAL} eval N(0,1) samples via --data; "
              f"none = no --data, the guard on seeded random inputs); "
              f"one subprocess per run.")
    planned = len(models) * len(levels) * len(targets) * len(modes)
    try:
        for name, path in models.items():
            spec = random_data_spec(path, work / f"data-{name}")
            for level, target, mode in ((lv, t, m) for lv in levels for t in targets for m in modes):
                data = spec if mode == "random" else None
                result = run_one(name, path, level, target, work / "runs", data, timeout=args.timeout)
                results.append(result)
                bad = [p for p in result.passes if p.status == "ROLLED BACK"]
                print(f"{name:20s} -O{level} {target:5s} data={mode:6s} exit {result.exit} {result.wall_s:7.1f} s "
                      f"{(result.peak_mib or 0):7.0f} MiB  rolled back: {[p.name for p in bad] or '-'}"
                      f"{'  ' + result.error if result.error else ''}", file=sys.stderr, flush=True)
                if len(results) < planned:  # a partial table after every run: a long sweep can be read while it runs
                    write_outputs(args, results, None, header + f" **Partial: {len(results)} of {planned} runs.**")
            shutil.rmtree(work / f"data-{name}", ignore_errors=True)
        memory = None if args.no_memory else measure_memory(work / "memory")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_outputs(args, results, memory, header)
    print(f"wrote {args.out}", file=sys.stderr)
    bad = [r for r in results if r.exit not in (0,)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
