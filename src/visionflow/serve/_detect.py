"""What serving a detector adds to the classifier's paths: the score threshold a request may
set, the per-image answer, and how far two detectors' answers agree (shadow traffic).

A detector is any loaded model with ``task = "detect"`` (see
:class:`~visionflow.serve.runtime.DetectionRunner`); its answers are
:class:`visionflow.prediction.Detections`, boxes ``(x1, y1, x2, y2)`` in the pixels of the image
as it was sent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from visionflow.data.detection.records import box_iou_matrix
from visionflow.prediction import Detections
from visionflow.serve._errors import ServeError

__all__ = ["MATCH_IOU", "agreement", "check_threshold", "image_json", "strongest_labels"]

#: Two detections are the same object when their labels agree and their boxes overlap this much.
MATCH_IOU = 0.5


def check_threshold(value: Any, where: str = "threshold") -> float:
    """A score threshold from a request (a number, or its text in a form), in ``[0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ServeError(422, "invalid_field", f"{where} must be a number between 0 and 1")
    try:
        number = float(value)
    except ValueError:
        raise ServeError(
            422, "invalid_field", f"{where} must be a number between 0 and 1, got {value!r}"
        ) from None
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ServeError(
            422, "invalid_field", f"{where} must be between 0 and 1 (a score), got {value!r}"
        )
    return number


def image_json(found: Detections) -> dict[str, Any]:
    """One image's answer in the v1 response: its size and its objects, strongest first."""
    body = found.to_json()
    return {"width": body["width"], "height": body["height"], "detections": body["detections"]}


def strongest_labels(detections: Sequence[Detections]) -> list[str]:
    """Per image, the label of its highest-scoring object (``""`` when it has none)."""
    out = []
    for found in detections:
        if len(found):
            out.append(found.labels[int(np.argmax(found.scores))])
        else:
            out.append("")
    return out


def agreement(a: Detections, b: Detections, *, iou: float = MATCH_IOU) -> float:
    """How far two answers for one image agree, in ``[0, 1]``: objects matched one-to-one
    (same label, boxes overlapping at least ``iou``; greedily, strongest of ``a`` first) over
    the larger count. 1 when both found nothing.

    Why this measure: it is the shadow's analogue of the classifier's "same top-1 label" (1 for
    an image both models read alike), it penalises missed and extra objects alike, and it
    needs no ground truth.
    """
    if not len(a) and not len(b):
        return 1.0
    if not len(a) or not len(b):
        return 0.0
    overlap = box_iou_matrix(a.boxes, b.boxes)
    taken = np.zeros(len(b), bool)
    matched = 0
    for i in np.argsort(-np.asarray(a.scores, np.float64), kind="stable"):
        best, best_j = iou, -1
        for j in range(len(b)):
            if not taken[j] and b.labels[j] == a.labels[i] and overlap[i, j] >= best:
                best, best_j = overlap[i, j], j
        if best_j >= 0:
            taken[best_j] = True
            matched += 1
    return matched / max(len(a), len(b))
