"""Helpers shared by the rule-language tests."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def guarded_run(model, pass_classes, annotations=None, feeds_seed=0):
    """Run passes with verification + numeric guard; return the pass records."""
    from hqpc.passmanager import NumericGuard, PassContext, PassManager, VerifyInstrument
    from hqpc.runtime import ort as ort_rt

    if annotations:
        model.annotations.update(annotations)
    logs: list[str] = []
    ctx = PassContext(instruments=[VerifyInstrument(), NumericGuard(lambda m: ort_rt.random_feeds(m.proto, seed=feeds_seed))],
                      log=logs.append, config={"trace_rules": True})
    manager = PassManager([cls() for cls in pass_classes], ctx)
    manager.run(model)
    return manager.records, logs


def model_from_text(text: str, key: str = "dsl-test"):
    from hqpc.golden import build_model_from_text
    from hqpc.ir import Model

    return Model.load(build_model_from_text(text, seed_base=key))

