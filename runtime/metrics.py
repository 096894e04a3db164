"""Classification metrics on logits (N, classes): top-1 accuracy and top-1 agreement."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["top1", "top1_agreement", "labels_carry_signal"]


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


def labels_carry_signal(predictions: np.ndarray, labels: np.ndarray, classes: int | None = None) -> bool:
    """Whether top-1 against ``labels`` can measure anything: False when the model's top-1 is
    within 3 binomial standard deviations of chance, ``p + 3·sqrt(p(1-p)/N)`` with
    ``p = 1/classes`` (random labels, labels in another class numbering, or too few images to
    tell). ``classes`` defaults to the largest class index seen + 1. Callers then measure top-1
    *agreement* with the input model, which needs no labels."""
    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if len(labels) == 0:
        return False
    classes = int(classes or max(int(predictions.max()), int(labels.max())) + 1)
    chance = 1.0 / max(classes, 1)
    threshold = chance + 3.0 * math.sqrt(chance * (1.0 - chance) / len(labels))
    return _fraction_equal(predictions, labels, "labels_carry_signal") > threshold
