"""Classification metrics on logits (N, classes): top-1 accuracy and top-1 agreement."""

from __future__ import annotations

import numpy as np

__all__ = ["top1", "top1_agreement"]


def _predictions(logits: np.ndarray, name: str) -> np.ndarray:
    """argmax over classes of a non-empty (N, classes) array (ties: the lowest class index)."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{name}: expected non-empty logits (N, classes), got shape {logits.shape}")
    return logits.argmax(axis=1)


def _fraction_equal(a: np.ndarray, b: np.ndarray, what: str) -> float:
    """mean(a == b) for two 1-D arrays of the same length."""
    if a.shape != b.shape:
        raise ValueError(f"{what}: lengths differ, {a.shape} vs {b.shape}")
    return float(np.mean(a == b))


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy: mean over i of [argmax(logits[i]) == labels[i]], in 0..1.

    logits (N, classes), labels (N,) integer class indices in the logits' numbering.
    """
    return _fraction_equal(_predictions(logits, "logits"), np.asarray(labels).reshape(-1), "top1")


def top1_agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Top-1 agreement of two models on the same inputs: mean over i of
    [argmax(logits_a[i]) == argmax(logits_b[i])], in 0..1."""
    predictions_a, predictions_b = _predictions(logits_a, "logits_a"), _predictions(logits_b, "logits_b")
    return _fraction_equal(predictions_a, predictions_b, "top1_agreement")
