"""Classification metrics as plain, JSON-safe Python values.

Everything here takes integer labels ``y_true`` of shape ``(n,)`` and class probabilities
``probs`` of shape ``(n, C)`` (rows sum to one) and returns floats, ints, lists and dicts only,
so the result can go straight into ``metrics.json``, a model bundle or the HTML report.

Conventions (chosen to match scikit-learn where it has one, and never to warn):

* Classes are ``range(C)``: a class absent from ``y_true`` still has a row and a column in the
  confusion matrix and an entry in ``per_class`` (support 0).
* Balanced accuracy is the mean recall over the classes *present in* ``y_true``.
* Macro-F1 averages over the classes that occur in ``y_true`` or in the predictions (the
  scikit-learn default when no ``labels`` are given); a class nobody predicted and nobody has
  would otherwise drag the mean down for nothing.
* Log loss uses the probability of the true class clipped to ``[1e-15, 1]``.
* Calibration (ECE, reliability bins) uses the top-1 confidence and ``n_bins`` equal-width bins;
  bin ``i`` holds confidences in ``(i/n_bins, (i+1)/n_bins]`` and the first bin also holds 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["classification_metrics", "expected_calibration_error", "reliability_bins"]

_EPS = 1e-15


def _validate(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y_true must be one-dimensional, got shape {y.shape}")
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (n, num_classes), got shape {p.shape}")
    if y.shape[0] != p.shape[0]:
        raise ValueError(
            f"y_true has {y.shape[0]} labels but probs has {p.shape[0]} rows; they must match"
        )
    if y.size and not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
        raise ValueError("y_true must hold integer class ids")
    y = y.astype(np.int64)
    num_classes = p.shape[1]
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"y_true holds class ids outside 0..{num_classes - 1} "
            f"(min {int(y.min())}, max {int(y.max())})"
        )
    if p.size and not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    return y, p


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    idx = np.ceil(confidence * n_bins).astype(np.int64) - 1
    return np.clip(idx, 0, n_bins - 1)


def reliability_bins(y_true: Any, probs: Any, n_bins: int = 15) -> list[dict[str, Any]]:
    """Per-bin mean top-1 confidence and accuracy, the data of a reliability diagram.

    Returns one dict per bin: ``lower``, ``upper``, ``count``, ``confidence`` and ``accuracy``
    (the last two are ``None`` for an empty bin).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    y, p = _validate(y_true, probs)
    out: list[dict[str, Any]] = []
    if y.size:
        confidence = p.max(axis=1)
        correct = (p.argmax(axis=1) == y).astype(np.float64)
        idx = _bin_index(confidence, n_bins)
    for i in range(n_bins):
        entry: dict[str, Any] = {
            "lower": i / n_bins,
            "upper": (i + 1) / n_bins,
            "count": 0,
            "confidence": None,
            "accuracy": None,
        }
        if y.size:
            mask = idx == i
            count = int(mask.sum())
            if count:
                entry["count"] = count
                entry["confidence"] = float(confidence[mask].mean())
                entry["accuracy"] = float(correct[mask].mean())
        out.append(entry)
    return out


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 15) -> float:
    """Expected calibration error: the count-weighted mean of ``|accuracy - confidence|``.

    0 means the top-1 confidence is, on average per bin, exactly the chance of being right.
    An empty input gives ``nan``.
    """
    bins = reliability_bins(y_true, probs, n_bins=n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return math.nan
    return float(
        sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / total
    )


def _per_class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows = true).

    Same values as scikit-learn's ``precision_recall_fscore_support(zero_division=0)``, computed
    here so that no input (one class, absent classes) can raise a warning.
    """
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def _top_k_accuracy(y: np.ndarray, p: np.ndarray, k: int) -> float:
    # Stable sort on -p: ties go to the lower class id, the same rule argmax uses.
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == y[:, None], axis=1)))


def classification_metrics(
    y_true: Any,
    probs: Any,
    class_names: Sequence[str],
    *,
    topk: Sequence[int] = (3,),
    n_bins: int = 15,
) -> dict[str, Any]:
    """All the numbers a classification report shows, as JSON-safe values.

    Args:
        y_true: Integer class ids, shape ``(n,)``.
        probs: Class probabilities, shape ``(n, C)`` with ``C == len(class_names)``.
        class_names: Names of the classes, position = class id.
        topk: The ``k`` of the top-k accuracies; only ``k < C`` are reported (``top{k}``).
        n_bins: Number of equal-width confidence bins of the ECE.

    Returns:
        A dict with ``n``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``weighted_f1``,
        ``top_k``, ``ece``, ``log_loss``, ``per_class`` (precision, recall, f1, support per
        name), ``confusion_matrix`` (rows = true class) and ``class_names``. With ``n == 0``
        every score is ``None`` and the counts are zero.
    """
    y, p = _validate(y_true, probs)
    names = [str(c) for c in class_names]
    num_classes = p.shape[1]
    if len(names) != num_classes:
        raise ValueError(
            f"{len(names)} class names given but probs has {num_classes} columns; they must match"
        )
    ks = sorted({int(k) for k in topk if 0 < int(k) < num_classes})
    n = int(y.shape[0])

    if n == 0:
        return {
            "n": 0,
            "accuracy": None,
            "balanced_accuracy": None,
            "macro_f1": None,
            "weighted_f1": None,
            "top_k": {f"top{k}": None for k in ks},
            "ece": None,
            "log_loss": None,
            "per_class": {
                name: {"precision": None, "recall": None, "f1": None, "support": 0}
                for name in names
            },
            "confusion_matrix": [[0] * num_classes for _ in range(num_classes)],
            "class_names": names,
        }

    pred = p.argmax(axis=1)
    cm = np.bincount(y * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )
    precision, recall, f1, support = _per_class_scores(cm)
    present = support > 0
    seen = present | (cm.sum(axis=0) > 0)

    true_prob = np.clip(p[np.arange(n), y], _EPS, 1.0)
    return {
        "n": n,
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(np.mean(recall[present])),
        "macro_f1": float(np.mean(f1[seen])),
        "weighted_f1": float(np.sum(f1 * support) / n),
        "top_k": {f"top{k}": _top_k_accuracy(y, p, k) for k in ks},
        "ece": expected_calibration_error(y, p, n_bins=n_bins),
        "log_loss": float(-np.mean(np.log(true_prob))),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion_matrix": [[int(v) for v in row] for row in cm],
        "class_names": names,
    }
