"""verify-trt: parse and build the model with the real TensorRT-RTX and check its layer precisions.

An analysis pass (the graph never changes) for the TensorRT targets. When ``tensorrt_rtx`` is
importable (``pip install hqpc[trt-check]``) it parses the current model into a strongly typed
network, builds an engine ahead of time for the target's check capability (8.6 for ``orin``, the
target's own for ``rtx``; see :func:`hqpc.runtime.tensorrt.check_capability`), reads the builder's
DETAILED per-layer dump and compares, for every Conv/ConvTranspose/Gemm/MatMul, the precision hqpc
put into the graph with the one TensorRT chose.

It fails (raises, so the pass is reported as failed and ``--strict`` exits 1) when parsing fails,
the build fails, or a Conv/Gemm that hqpc quantized is not INT8 in the engine; every message names
the ONNX node and the rule. With ``warn=true`` (or ``ctx.config["trt_check"] == "warn"``) the
problems are logged and annotated instead. Without tensorrt_rtx the pass records
``skipped: tensorrt-rtx not installed (pip install hqpc[trt-check])``; with ``require=true`` (or
``ctx.config["trt_check"] == "require"``) it fails instead.

Annotation ``trt`` (also in the report): status, builder, compute capability, the count and share
of quantized layers running as assigned, problems, one row per compute node
(node, op, expected, engine, layer, fused nodes, input/weight/output types) and the engine's
per-layer table (layer, type, fused ONNX nodes, input/weight/output types, precision).
"""
from __future__ import annotations

from pathlib import Path

from hqpc.passmanager import Pass, PassInfo
from hqpc.registry import register_pass
from hqpc.runtime import tensorrt as trt_rt

TARGETS = ("orin", "xavier", "t4", "rtx")


@register_pass
class VerifyTensorRT(Pass):
    info = PassInfo("verify-trt", opt_level=2, analysis=True, targets=TARGETS,
                    description="build with TensorRT-RTX (CPU, ahead of time) and check every quantized "
                                "Conv/Gemm is INT8 in the engine's layer dump")
    options = {
        "require": False,            # fail when tensorrt-rtx is not installed
        "warn": False,               # log problems instead of failing
        "compute-capability": "",    # override the target's check capability, e.g. 8.9
        "max-batch": 1,              # optimization-profile max for dynamic batch dims
        "log": "",                   # write the full builder log (with the layer dump) here
    }

    def run(self, model, ctx) -> bool:
        mode = str(ctx.config.get("trt_check", "") or "").lower()
        require = self.config["require"] or mode == "require"
        warn = self.config["warn"] or mode == "warn"
        missing = trt_rt.rtx_missing_reason()
        if missing:
            if require:
                raise trt_rt.TensorRTCheckFailed(
                    f"tensorrt-rtx is required (require=true) but not installed ({trt_rt.RTX_INSTALL_HINT})")
            model.annotations["trt"] = {"status": trt_rt.SKIP_RTX}
            ctx.log(f"verify-trt: {trt_rt.SKIP_RTX}")
            return False
        target = ctx.target
        if target is not None:
            cc, note = trt_rt.check_capability(target)
        else:
            cc, note = trt_rt.STAND_IN_CAPABILITY, ""
        if self.config["compute-capability"]:
            cc, note = str(self.config["compute-capability"]), "compute capability set by the pass option"
        log_path = Path(self.config["log"]) if self.config["log"] else None
        result = trt_rt.check_with_tensorrt_rtx(model.proto, cc, max_batch=self.config["max-batch"],
                                                note=note, log_path=log_path)
        annotation = result.annotation()
        model.annotations["trt"] = annotation
        ctx.analyses[("verify-trt", model.digest())] = annotation
        s = result.summary()
        ctx.log(f"verify-trt: {result.builder}, SM {cc}: parsed={result.parsed} built={result.built} "
                f"({result.build_s:.2f} s); {s['as_assigned']}/{s['quantized']} quantized Conv/Gemm layers "
                f"as assigned" + (f" ({s['int8_pct']} %)" if s["int8_pct"] is not None else "")
                + (f"; {note}" if note else ""))
        if result.ok:
            return False
        for problem in result.problems:
            ctx.log(f"verify-trt: {problem}")
        table = result.format_table(only_problems=True)
        if table:
            ctx.log(table)
        if warn:
            annotation["status"] = "warned"
            return False
        first = result.problems[0] if result.problems else "unknown problem"
        more = f" (+{len(result.problems) - 1} more, see the log)" if len(result.problems) > 1 else ""
        raise trt_rt.TensorRTCheckFailed(f"{first}{more}")
