"""Detection metrics with COCO's protocol: mAP, per-class AP, AP by object size, PR curves.

:func:`evaluate_detections` scores per-image detections against per-image ground truth with
pycocotools' ``COCOeval`` (the reference implementation, so our numbers are the numbers every
detection paper and tool reports) and returns a :class:`DetectionMetrics` of plain values.
:func:`best_score_threshold` picks the confidence above which detections are worth showing.

Conventions of the inputs (both functions):

* One mapping per image, predictions and targets in the same order. Boxes are ``N x 4``
  ``(x1, y1, x2, y2)`` corners in the image's pixels (float), labels are **0-based** class ids
  (an index into ``classes``; a torchvision detector's labels are class id + 1, subtract 1).
* numpy arrays, torch tensors (any device; they are detached and copied to the CPU), lists and
  tuples are all accepted. torch is never imported here.
* Nothing is dropped silently: a malformed field raises :class:`~visionflow.errors.DataError`
  naming the image index and the field.

Conventions of the results (COCO's, kept on purpose so numbers compare with published ones):

* AP is the mean precision over 101 recall points (0, 0.01, ..., 1) of the interpolated
  (monotone) precision-recall curve, at most 100 detections per image and class.
* ``map`` averages over IoU thresholds 0.5, 0.55, ..., 0.95 and over the classes that have
  ground truth; a class without ground truth has AP ``None`` and is left out of every mean (its
  detections cannot be right or wrong in a way COCO scores). Without any ground truth every
  metric is ``None``.
* Crowd boxes (``iscrowd``) are regions where detections are neither rewarded nor punished: a
  detection overlapping one is ignored, and a crowd box never counts as a missed object.
* Object sizes use the box area with COCO's buckets: small below 32², medium up to 96², large
  above (:data:`visionflow.data.detection.SIZE_BUCKETS`).

The primary metric is :data:`PRIMARY_METRIC` (``map``, mAP@[.5:.95]): model selection and early
stopping maximise it, since it rewards tight boxes as well as found objects. The headline shown
to users is :data:`HEADLINE_METRIC` (``map_50``, mAP@.5), the easier number to explain.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from visionflow.data.detection.records import box_iou_matrix
from visionflow.errors import ConfigError, DataError

__all__ = [
    "HEADLINE_METRIC",
    "PRIMARY_METRIC",
    "DetectionMetrics",
    "ScoreThreshold",
    "best_score_threshold",
    "evaluate_detections",
]

#: The metric training maximises (model selection, early stopping): COCO's mAP@[.5:.95].
PRIMARY_METRIC = "map"
#: The number shown to users first: mAP at IoU 0.5.
HEADLINE_METRIC = "map_50"

#: The scalar fields of :class:`DetectionMetrics`, in the order of :meth:`DetectionMetrics.to_json`.
_SCALARS = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
)
_MAX_DETS = 100
_DECIMALS = 10


@dataclass(frozen=True)
class DetectionMetrics:
    """COCO detection metrics of one evaluation, as JSON-safe values.

    Every AP/AR is in ``[0, 1]`` (rounded to 10 decimals) or ``None`` when no ground truth
    exists for it (a size bucket without objects, a class without boxes, a dataset without any).

    Attributes:
        map: mAP averaged over IoU 0.5:0.95 (the primary metric, see :data:`PRIMARY_METRIC`).
        map_50: mAP at IoU 0.5 (the headline for users, see :data:`HEADLINE_METRIC`).
        map_75: mAP at IoU 0.75.
        map_small: mAP@[.5:.95] over objects with area below 32² pixels.
        map_medium: The same for areas from 32² to 96².
        map_large: The same above 96².
        mar_1: Mean recall@[.5:.95] keeping the top detection per image and class.
        mar_10: The same with the top 10.
        mar_100: The same with the top 100.
        per_class: Class name -> ``{"ap", "ap_50", "ap_75", "gt", "predictions"}``, in class
            order; ``gt`` counts the non-crowd boxes (the objects to find), ``predictions`` all
            detections of the class.
        pr_curves: Class name -> ``{"recall", "precision", "score"}`` at IoU 0.5 (all sizes,
            100 detections): COCO's 101 recall points, the interpolated precision at each (0
            past the highest recall reached) and the score of the detection reaching it (0
            there too): a threshold for a wanted recall; ``None`` for a class without ground
            truth.
        images: Number of images evaluated.
        gt_boxes: Non-crowd ground-truth boxes over all images.
        predictions: Detections over all images.
    """

    map: float | None
    map_50: float | None
    map_75: float | None
    map_small: float | None
    map_medium: float | None
    map_large: float | None
    mar_1: float | None
    mar_10: float | None
    mar_100: float | None
    per_class: dict[str, dict[str, Any]]
    pr_curves: dict[str, dict[str, list[float]] | None]
    images: int
    gt_boxes: int
    predictions: int

    def to_json(self, *, curves: bool = False) -> dict[str, Any]:
        """The metrics as plain JSON types (for ``metrics.json``, a bundle, the report).

        Args:
            curves: Also include ``pr_curves`` (3 x 101 numbers per class, so off by default).
        """
        out: dict[str, Any] = {name: getattr(self, name) for name in _SCALARS}
        out["per_class"] = {name: dict(values) for name, values in self.per_class.items()}
        out["images"] = self.images
        out["gt_boxes"] = self.gt_boxes
        out["predictions"] = self.predictions
        if curves:
            out["pr_curves"] = {
                name: None if curve is None else {k: list(v) for k, v in curve.items()}
                for name, curve in self.pr_curves.items()
            }
        return out

    def summary_rows(self, *, total: bool = True) -> list[dict[str, Any]]:
        """The per-class table of a report, one dict per class (keys are the column titles).

        Args:
            total: End with an ``all classes`` row: box counts summed, the APs are the means
                over classes with ground truth (``map``, ``map_50``, ``map_75``).
        """
        rows = [
            {
                "class": name,
                "ground truth": values["gt"],
                "predictions": values["predictions"],
                "AP@[.5:.95]": values["ap"],
                "AP@.5": values["ap_50"],
                "AP@.75": values["ap_75"],
            }
            for name, values in self.per_class.items()
        ]
        if total:
            rows.append(
                {
                    "class": "all classes",
                    "ground truth": self.gt_boxes,
                    "predictions": self.predictions,
                    "AP@[.5:.95]": self.map,
                    "AP@.5": self.map_50,
                    "AP@.75": self.map_75,
                }
            )
        return rows


@dataclass(frozen=True)
class ScoreThreshold:
    """The confidence threshold with the best F1, and the counts at it.

    Detections scoring at least ``threshold`` are kept. ``threshold`` is ``None`` when no
    threshold finds any object (no ground truth, no detections, or none of them right); the
    counts then describe keeping nothing.

    Attributes:
        threshold: The lowest kept score, or ``None``.
        precision: Kept detections that found an object, over kept detections.
        recall: Objects found, over non-crowd ground-truth boxes.
        f1: Harmonic mean of precision and recall.
        tp: Kept detections matched to an object.
        fp: Kept detections matched to nothing (those on crowd regions are not counted).
        fn: Objects no kept detection found.
        iou: The IoU a detection needs with a box of its class to find it.
    """

    threshold: float | None
    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    iou: float

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "iou": self.iou,
        }


@dataclass(frozen=True)
class _Image:
    """One image's validated boxes (``N x 4`` XYXY float64), 0-based labels and flags."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray  # zeros for ground truth
    crowd: np.ndarray  # all False for predictions
    width: float | None = None
    height: float | None = None


def evaluate_detections(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
    *,
    iou_type: str = "bbox",
) -> DetectionMetrics:
    """Score detections against ground truth with COCO's protocol (pycocotools ``COCOeval``).

    The COCO ground truth and results are built in memory (image ``i`` gets id ``i + 1``,
    class ``k`` category id ``k + 1``) and pycocotools' progress prints are swallowed
    (``contextlib.redirect_stdout`` swaps ``sys.stdout`` for the process while it runs). Images
    without ground truth take part: their detections are false positives.

    Args:
        predictions: One mapping per image with ``boxes`` (``N x 4`` XYXY pixels), ``scores``
            (``N``, in ``[0, 1]``) and ``labels`` (``N`` 0-based class ids).
        targets: One mapping per image, same order, with ``boxes`` and ``labels`` and optionally
            ``iscrowd`` (``N`` flags) and ``width``/``height`` (only recorded in COCO's image
            entry; the largest box corner when absent).
        classes: Class names, position = class id.
        iou_type: Only ``"bbox"`` (box IoU) is supported.

    Returns:
        The metrics; see :class:`DetectionMetrics` for what is ``None`` when.

    Raises:
        DataError: The inputs disagree in length, or a field of an image is malformed (wrong
            shape, NaN, a label outside ``0..len(classes)-1``, a score outside ``[0, 1]``...).
        ConfigError: ``iou_type`` is not ``"bbox"``.
    """
    if iou_type != "bbox":
        raise ConfigError(
            f"iou_type={iou_type!r} is not supported: detection metrics compare boxes, "
            "use iou_type='bbox'"
        )
    names, preds, truths = _parse_inputs(predictions, targets, classes)
    num_classes = len(names)
    pred_counts = np.zeros(num_classes, dtype=np.int64)
    gt_counts = np.zeros(num_classes, dtype=np.int64)
    for pred, truth in zip(preds, truths, strict=True):
        pred_counts += np.bincount(pred.labels, minlength=num_classes)
        gt_counts += np.bincount(truth.labels[~truth.crowd], minlength=num_classes)

    if gt_counts.sum() == 0:
        # COCO scores nothing without objects (every entry would be -1): skip the work.
        precision = recall = scores = None
        params = None
    else:
        coco_eval = _run_cocoeval(preds, truths, num_classes)
        precision = coco_eval.eval["precision"]  # T x R x K x A x M
        recall = coco_eval.eval["recall"]  # T x K x A x M
        scores = coco_eval.eval["scores"]  # T x R x K x A x M
        params = coco_eval.params

    def ap(*, iou: float | None = None, area: str = "all", cls: int | None = None) -> float | None:
        if precision is None or params is None:
            return None
        s = precision[:, :, :, params.areaRngLbl.index(area), params.maxDets.index(_MAX_DETS)]
        if iou is not None:
            s = s[_iou_index(params.iouThrs, iou)]
        if cls is not None:
            s = s[..., cls]
        return _mean_valid(s)

    def ar(max_dets: int) -> float | None:
        if recall is None or params is None:
            return None
        return _mean_valid(
            recall[:, :, params.areaRngLbl.index("all"), params.maxDets.index(max_dets)]
        )

    per_class: dict[str, dict[str, Any]] = {}
    pr_curves: dict[str, dict[str, list[float]] | None] = {}
    for k, name in enumerate(names):
        per_class[name] = {
            "ap": ap(cls=k),
            "ap_50": ap(iou=0.5, cls=k),
            "ap_75": ap(iou=0.75, cls=k),
            "gt": int(gt_counts[k]),
            "predictions": int(pred_counts[k]),
        }
        pr_curves[name] = None
        if precision is not None and scores is not None and params is not None:
            t = _iou_index(params.iouThrs, 0.5)
            a = params.areaRngLbl.index("all")
            m = params.maxDets.index(_MAX_DETS)
            curve = precision[t, :, k, a, m]
            if np.all(curve > -1):
                pr_curves[name] = {
                    "recall": [_round(float(r)) for r in params.recThrs],
                    "precision": [_round(float(p)) for p in curve],
                    "score": [float(s) for s in scores[t, :, k, a, m]],
                }

    return DetectionMetrics(
        map=ap(),
        map_50=ap(iou=0.5),
        map_75=ap(iou=0.75),
        map_small=ap(area="small"),
        map_medium=ap(area="medium"),
        map_large=ap(area="large"),
        mar_1=ar(1),
        mar_10=ar(10),
        mar_100=ar(100),
        per_class=per_class,
        pr_curves=pr_curves,
        images=len(truths),
        gt_boxes=int(gt_counts.sum()),
        predictions=int(pred_counts.sum()),
    )


def best_score_threshold(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
    *,
    iou: float = 0.5,
) -> ScoreThreshold:
    """The score threshold that maximises F1 over all classes together, at IoU ``iou``.

    Matching follows COCO: per image and class, detections are taken highest score first and
    each finds the unmatched non-crowd box of its class with the highest IoU of at least
    ``iou``; one that finds none but covers a crowd region that much (intersection over the
    detection's area) is ignored, any other is a false positive. Since a detection's match
    depends only on the stronger ones, the counts at every threshold follow from one matching.
    Unlike COCO's AP, no cap of 100 detections per image applies. Between thresholds with the
    same F1 the highest wins (fewer boxes to show for the same quality).

    Args:
        predictions: As in :func:`evaluate_detections`.
        targets: As in :func:`evaluate_detections`.
        classes: Class names, position = class id.
        iou: The IoU a detection needs with a box to find it, in ``(0, 1]``.

    Returns:
        The threshold and precision, recall, F1 and counts at it.

    Raises:
        DataError: As :func:`evaluate_detections`.
        ConfigError: ``iou`` is outside ``(0, 1]``.
    """
    if isinstance(iou, bool) or not isinstance(iou, numbers.Real) or not 0.0 < iou <= 1.0:
        raise ConfigError(f"iou={iou!r} must be a number in (0, 1]; 0.5 is the usual choice")
    _, preds, truths = _parse_inputs(predictions, targets, classes)
    n_gt = sum(int((~t.crowd).sum()) for t in truths)
    all_scores: list[np.ndarray] = []
    all_status: list[np.ndarray] = []
    for pred, truth in zip(preds, truths, strict=True):
        for k in np.unique(pred.labels):
            d = pred.labels == k
            g = truth.labels == k
            order = np.argsort(-pred.scores[d], kind="mergesort")
            all_scores.append(pred.scores[d][order])
            all_status.append(
                _match(pred.boxes[d][order], truth.boxes[g], truth.crowd[g], float(iou))
            )

    nothing = ScoreThreshold(None, 0.0, 0.0, 0.0, tp=0, fp=0, fn=n_gt, iou=float(iou))
    if n_gt == 0 or not all_scores:
        return nothing
    score = np.concatenate(all_scores)
    status = np.concatenate(all_status)
    kept = status >= 0  # matched to a crowd region: neither right nor wrong
    score, status = score[kept], status[kept]
    order = np.argsort(-score, kind="mergesort")
    score, status = score[order], status[order]
    tp = np.cumsum(status == 1)
    fp = np.cumsum(status == 0)
    if score.size == 0:
        return nothing
    # A threshold keeps every detection of its score: evaluate at the last of each tied run.
    last = np.flatnonzero(np.append(score[1:] != score[:-1], True))
    f1 = 2.0 * tp[last] / (tp[last] + fp[last] + n_gt)
    best = int(np.argmax(f1))  # first maximum = highest threshold
    if f1[best] <= 0.0:
        return nothing
    i = int(last[best])
    n_tp, n_fp = int(tp[i]), int(fp[i])
    return ScoreThreshold(
        threshold=float(score[i]),
        precision=n_tp / (n_tp + n_fp),
        recall=n_tp / n_gt,
        f1=float(f1[best]),
        tp=n_tp,
        fp=n_fp,
        fn=n_gt - n_tp,
        iou=float(iou),
    )


# --------------------------------------------------------------------------------------------
# COCO evaluation


def _run_cocoeval(preds: list[_Image], truths: list[_Image], num_classes: int) -> COCOeval:
    images: list[dict[str, Any]] = []
    gt_anns: list[dict[str, Any]] = []
    dt_anns: list[dict[str, Any]] = []
    for i, (pred, truth) in enumerate(zip(preds, truths, strict=True)):
        width, height = truth.width, truth.height
        if width is None or height is None:
            corners = np.concatenate([truth.boxes, pred.boxes])
            width = width if width is not None else max(1.0, math.ceil(_max(corners[:, 2])))
            height = height if height is not None else max(1.0, math.ceil(_max(corners[:, 3])))
        images.append({"id": i + 1, "width": width, "height": height})
        # Annotation ids start at 1: COCOeval stores "matched to id 0" as "unmatched".
        gt_anns.extend(_annotations(truth, i + 1, len(gt_anns) + 1, crowd=truth.crowd))
        dt_anns.extend(_annotations(pred, i + 1, len(dt_anns) + 1, scores=pred.scores))
    categories = [{"id": k + 1, "name": str(k)} for k in range(num_classes)]

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = _coco(images, categories, gt_anns)
        coco_dt = _coco(images, categories, dt_anns)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval


def _coco(
    images: list[dict[str, Any]], categories: list[dict[str, Any]], anns: list[dict[str, Any]]
) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": anns}
    coco.createIndex()
    return coco


def _annotations(
    image: _Image,
    image_id: int,
    first_id: int,
    *,
    crowd: np.ndarray | None = None,
    scores: np.ndarray | None = None,
) -> Iterable[dict[str, Any]]:
    xywh = image.boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    areas = xywh[:, 2] * xywh[:, 3]
    for j, (box, area, label) in enumerate(
        zip(xywh.tolist(), areas.tolist(), image.labels.tolist(), strict=True)
    ):
        ann: dict[str, Any] = {
            "id": first_id + j,
            "image_id": image_id,
            "category_id": label + 1,
            "bbox": box,
            "area": area,
            "iscrowd": int(crowd[j]) if crowd is not None else 0,
        }
        if scores is not None:
            ann["score"] = float(scores[j])
        yield ann


def _iou_index(thresholds: np.ndarray, iou: float) -> int:
    return int(np.flatnonzero(np.isclose(thresholds, iou))[0])


def _mean_valid(values: np.ndarray) -> float | None:
    """COCO's mean over the entries that exist (``-1`` marks "no ground truth here")."""
    valid = values[values > -1]
    return _round(float(np.mean(valid))) if valid.size else None


def _round(value: float) -> float:
    """``value`` to 10 decimals: COCO's precision is ``tp / (tp + fp + 2.2e-16)``, and a perfect
    score should read 1.0, not 0.9999999999999998."""
    return round(value, _DECIMALS)


def _max(values: np.ndarray) -> float:
    return float(values.max()) if values.size else 0.0


# --------------------------------------------------------------------------------------------
# Matching for the score threshold


def _match(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray, iou: float) -> np.ndarray:
    """Per detection (strongest first): 1 found an object, 0 false positive, -1 on a crowd."""
    status = np.zeros(len(dt), dtype=np.int8)
    if len(dt) == 0 or len(gt) == 0:
        return status
    ious = box_iou_matrix(dt, gt, crowd)
    enough = ious >= min(iou, 1.0 - 1e-10)  # COCO's bound, so that iou=1 still matches
    free = ~crowd
    for d in range(len(dt)):
        candidates = enough[d] & free
        if candidates.any():
            j = int(np.argmax(np.where(candidates, ious[d], -1.0)))
            free[j] = False
            status[d] = 1
        elif (enough[d] & crowd).any():
            status[d] = -1
    return status


# --------------------------------------------------------------------------------------------
# Input validation


def _parse_inputs(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
) -> tuple[list[str], list[_Image], list[_Image]]:
    names = _parse_classes(classes)
    preds = _as_list(predictions, "predictions")
    truths = _as_list(targets, "targets")
    if len(preds) != len(truths):
        raise DataError(
            f"predictions has {len(preds)} images but targets has {len(truths)}; pass one entry "
            "per image to both, in the same order"
        )
    num_classes = len(names)
    parsed_preds = [
        _parse_image(p, f"predictions[{i}]", num_classes, True) for i, p in enumerate(preds)
    ]
    parsed_truths = [
        _parse_image(t, f"targets[{i}]", num_classes, False) for i, t in enumerate(truths)
    ]
    return names, parsed_preds, parsed_truths


def _parse_classes(classes: Sequence[str]) -> list[str]:
    if isinstance(classes, str | bytes) or not isinstance(classes, Iterable):
        raise DataError(
            f"classes must be a list of class names (position = class id), got {classes!r}"
        )
    names = [str(c) for c in classes]
    if not names:
        raise DataError("classes is empty: pass the detector's class names in id order")
    seen: set[str] = set()
    for k, name in enumerate(names):
        if name in seen:
            raise DataError(
                f"classes[{k}] repeats the class name {name!r}; each class needs its own name"
            )
        seen.add(name)
    return names


def _as_list(items: Any, what: str) -> list[Any]:
    if isinstance(items, Mapping | str | bytes) or not isinstance(items, Iterable):
        raise DataError(
            f"{what} must be a sequence with one mapping per image, got {type(items).__name__}"
        )
    return list(items)


def _parse_image(item: Any, where: str, num_classes: int, is_prediction: bool) -> _Image:
    required = ("boxes", "scores", "labels") if is_prediction else ("boxes", "labels")
    if not isinstance(item, Mapping):
        raise DataError(
            f"{where} is a {type(item).__name__}, not a mapping with "
            + ", ".join(repr(k) for k in required)
        )
    for key in required:
        if key not in item:
            raise DataError(f"{where} has no {key!r}; it needs " + ", ".join(map(repr, required)))
    boxes = _parse_boxes(item["boxes"], f"{where}['boxes']")
    n = len(boxes)
    labels = _parse_labels(item["labels"], n, num_classes, f"{where}['labels']")
    if is_prediction:
        scores = _vector(item["scores"], n, f"{where}['scores']")
        bad = np.flatnonzero((scores < 0.0) | (scores > 1.0))
        if bad.size:
            raise DataError(
                f"{where}['scores'][{int(bad[0])}] = {scores[bad[0]]:g} is outside [0, 1]; "
                "scores must be confidences (after the sigmoid or softmax)"
            )
        return _Image(boxes, labels, scores, np.zeros(n, dtype=bool))
    crowd = np.zeros(n, dtype=bool)
    if item.get("iscrowd") is not None:
        flags = _vector(item["iscrowd"], n, f"{where}['iscrowd']")
        bad = np.flatnonzero((flags != 0) & (flags != 1))
        if bad.size:
            raise DataError(
                f"{where}['iscrowd'][{int(bad[0])}] = {flags[bad[0]]:g}; crowd flags are 0/1 "
                "or False/True"
            )
        crowd = flags == 1
    return _Image(
        boxes,
        labels,
        np.zeros(n),
        crowd,
        width=_parse_size(item.get("width"), f"{where}['width']"),
        height=_parse_size(item.get("height"), f"{where}['height']"),
    )


def _numeric(value: Any, where: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without torch
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where} is not numeric ({exc})") from None
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise DataError(
            f"{where}{''.join(f'[{int(i)}]' for i in bad)} is NaN or infinite; "
            "every value must be a finite number"
        )
    return arr


def _parse_boxes(value: Any, where: str) -> np.ndarray:
    arr = _numeric(value, where)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise DataError(
            f"{where} has shape {arr.shape}; expected N x 4 boxes (x1, y1, x2, y2) in pixels"
        )
    bad = np.flatnonzero((arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1]))
    if bad.size:
        box = ", ".join(f"{v:g}" for v in arr[bad[0]])
        raise DataError(
            f"{where}[{int(bad[0])}] = ({box}) has x2 < x1 or y2 < y1; boxes are corners "
            "(x1, y1, x2, y2), not (x, y, width, height)"
        )
    return arr


def _vector(value: Any, n: int, where: str) -> np.ndarray:
    arr = _numeric(value, where)
    if arr.size == 0 and n == 0:
        return np.zeros(0, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DataError(f"{where} has shape {arr.shape}; expected ({n},), one value per box")
    return arr


def _parse_labels(value: Any, n: int, num_classes: int, where: str) -> np.ndarray:
    arr = _vector(value, n, where)
    not_int = np.flatnonzero(arr != np.round(arr))
    if not_int.size:
        raise DataError(
            f"{where}[{int(not_int[0])}] = {arr[not_int[0]]:g} is not an integer class id"
        )
    bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
    if bad.size:
        raise DataError(
            f"{where}[{int(bad[0])}] = {arr[bad[0]]:g} is outside 0..{num_classes - 1}; labels "
            "are 0-based ids into classes (a torchvision detector's labels are class id + 1)"
        )
    return arr.astype(np.int64)


def _parse_size(value: Any, where: str) -> float | None:
    if value is None:
        return None
    arr = _numeric(value, where)
    if arr.shape != () or float(arr) <= 0:
        raise DataError(f"{where} = {value!r}; the image size must be one positive number")
    return float(arr)
