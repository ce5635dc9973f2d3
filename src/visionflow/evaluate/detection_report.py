"""The HTML report of a detection run: COCO metrics, per-class AP, PR curves, learning curves
and a gallery of predictions against the ground truth.

It reuses the classification report's page (:mod:`visionflow.evaluate.report`, which shows
COCO's columns when the metrics carry ``map``); only the plots and the gallery are specific.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visionflow.data.detection import DetectionIndex
from visionflow.data.images import load_image
from visionflow.data.index import Split
from visionflow.evaluate.overfit import Finding
from visionflow.evaluate.report import ReportContext, write_report
from visionflow.train.budget import format_seconds

__all__ = ["detection_findings", "gallery_order", "write_detection_report"]

#: Images shown in the gallery: the worst half and the best half by errors at the threshold.
GALLERY_IMAGES = 8
#: Gallery images are enlarged to at least this longer side.
_GALLERY_SIDE = 384


def image_errors(pred: dict[str, Any], truth: dict[str, Any], threshold: float) -> int:
    """Misses plus false detections of one image at ``threshold`` (IoU .5, same class, greedy
    by score, COCO's matching): what ranks the gallery."""
    from visionflow.evaluate.detection import _match

    scores = np.asarray(pred["scores"], dtype=np.float64)
    keep = scores >= threshold
    boxes = np.asarray(pred["boxes"], dtype=np.float64).reshape(-1, 4)[keep]
    labels = np.asarray(pred["labels"])[keep]
    scores = scores[keep]
    gt_boxes = np.asarray(truth["boxes"], dtype=np.float64).reshape(-1, 4)
    gt_labels = np.asarray(truth["labels"])
    crowd = np.asarray(truth.get("iscrowd", np.zeros(len(gt_labels))), dtype=bool)
    errors = 0
    for label in set(labels.tolist()) | set(gt_labels.tolist()):
        mine = labels == label
        order = np.argsort(-scores[mine], kind="stable")
        theirs = gt_labels == label
        status = _match(boxes[mine][order], gt_boxes[theirs], crowd[theirs], 0.5)
        found = int((status == 1).sum())
        errors += int((status == 0).sum()) + int((~crowd[theirs]).sum()) - found
    return errors


def gallery_order(
    predictions: list[dict[str, Any]], truth: list[dict[str, Any]], threshold: float, n: int
) -> list[int]:
    """Up to ``n`` image positions: the ``n // 2`` with the most errors, then the best others."""
    errors = [image_errors(p, t, threshold) for p, t in zip(predictions, truth, strict=True)]
    ranked = sorted(range(len(errors)), key=lambda i: (-errors[i], i))
    worst = [i for i in ranked[: n // 2] if errors[i] > 0]
    best = [i for i in reversed(ranked) if i not in worst][: n - len(worst)]
    return worst + sorted(best)


def _gallery(
    run: Path,
    index: DetectionIndex,
    positions: list[int],
    predictions: list[dict[str, Any]],
    truth: list[dict[str, Any]],
    threshold: float,
) -> dict[str, Path]:
    from visionflow.evaluate.draw import draw_detections

    out_dir = run / "gallery"
    out_dir.mkdir(exist_ok=True)
    classes = list(index.classes)
    images: dict[str, Path] = {}
    for rank, k in enumerate(gallery_order(predictions, truth, threshold, GALLERY_IMAGES)):
        sample = index.samples[positions[k]]
        pred, gt = predictions[k], truth[k]
        keep = np.asarray(pred["scores"]) >= threshold
        image = load_image(sample.path)
        # small images are enlarged so that the labels stay readable
        scale = max(1.0, _GALLERY_SIDE / max(image.size))
        if scale > 1.0:
            image = image.resize(
                (round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR
            )
        drawn = draw_detections(
            image,
            np.asarray(pred["boxes"]).reshape(-1, 4)[keep] * scale,
            [classes[int(c)] for c in np.asarray(pred["labels"])[keep]],
            np.asarray(pred["scores"])[keep],
            truth_boxes=np.asarray(gt["boxes"]).reshape(-1, 4) * scale,
            truth_labels=[classes[int(c)] for c in np.asarray(gt["labels"])],
            classes=classes,
        )
        path = out_dir / f"{rank:02d}_{sample.path.stem}.png"
        drawn.save(path)
        errors = image_errors(pred, gt, threshold)
        images[f"{sample.path.name}: {int(keep.sum())} detections, {len(gt['labels'])} boxes, "
               f"{errors} errors"] = path  # fmt: skip
    return images


def detection_findings(
    history: list[dict[str, Any]], metrics: dict[str, dict[str, Any]], stopped: str | None
) -> list[Finding]:
    """Plain-words diagnoses of a detection run: still improving when the budget ended, past
    its best (the best epoch was kept), a class far behind the others, val and test apart."""
    out: list[Finding] = []
    values = [float(r["val_map"]) for r in history if r.get("val_map") is not None]
    if len(values) >= 3:
        best_at = max(range(len(values)), key=lambda i: values[i])
        if best_at >= len(values) - 2 and stopped == "budget":
            out.append(
                Finding(
                    "info",
                    "Still improving when the budget ended",
                    f"validation mAP was highest in the last epochs ({values[best_at]:.3f}); "
                    "a larger --budget would probably give a better model.",
                )
            )
        elif values[best_at] - values[-1] > 0.02:
            out.append(
                Finding(
                    "warning",
                    "Past its best: the later epochs overfitted",
                    f"validation mAP peaked at {values[best_at]:.3f} (epoch {best_at + 1} of "
                    f"{len(values)}) and ended at {values[-1]:.3f}; the best epoch was kept. "
                    "More labelled images or --augment heavy would help more than more epochs.",
                )
            )
    split = "test" if "test" in metrics else "val"
    per_class = metrics.get(split, {}).get("per_class", {})
    aps = {n: v.get("ap_50") for n, v in per_class.items() if v.get("ap_50") is not None}
    if len(aps) >= 2:
        weakest = min(aps, key=lambda n: aps[n])
        others = [v for n, v in aps.items() if n != weakest]
        mean_others = sum(others) / len(others)
        if aps[weakest] < 0.75 * mean_others:
            boxes = per_class[weakest].get("gt")
            out.append(
                Finding(
                    "warning",
                    f"Class {weakest!r} lags behind",
                    f"its {split} AP@.5 is {aps[weakest]:.3f} against {mean_others:.3f} for the "
                    f"other classes ({boxes} boxes in {split}); label more examples of it, "
                    "especially the ones in the gallery it misses.",
                )
            )
    val, test = metrics.get("val", {}).get("map_50"), metrics.get("test", {}).get("map_50")
    if val is not None and test is not None and abs(val - test) > 0.1:
        out.append(
            Finding(
                "info",
                "Validation and test disagree",
                f"mAP@.5 {val:.3f} on validation and {test:.3f} on test: the splits are small "
                "or differ; trust neither figure to better than about +-0.1.",
            )
        )
    return out


def write_detection_report(
    run: Path,
    *,
    config: dict[str, Any],
    index: DetectionIndex,
    split: Split,
    metrics: dict[str, dict[str, Any]],
    results: dict[str, Any],
    predictions: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]],
    history: list[dict[str, Any]],
    detector: dict[str, Any],
    weights: dict[str, Any] | None,
    threshold: float,
    seconds: float,
    device: str,
    stopped: str | None = None,
) -> Path:
    """Write ``run/report.html`` (plots next to it) and return its path.

    ``results`` maps a split to its :class:`~visionflow.evaluate.detection.DetectionMetrics`;
    ``predictions`` to its per-image predictions and targets (0-based labels).
    """
    from visionflow.evaluate.detection_plots import plot_ap_by_class, plot_pr_curves
    from visionflow.evaluate.plots import plot_learning_curves

    split_name = "test" if "test" in results else "val"
    main = metrics.get(split_name, {})
    images: dict[str, Path] = {}
    if history:
        images["Learning curves (validation mAP@[.5:.95])"] = plot_learning_curves(
            history, run / "learning_curves.png", metric="map", title="mAP@[.5:.95]"
        )
    if split_name in results:
        images[f"Precision-recall at IoU .5 ({split_name})"] = plot_pr_curves(
            results[split_name], run / "pr_curves.png"
        )
        images[f"AP per class ({split_name})"] = plot_ap_by_class(
            results[split_name], run / "ap_per_class.png"
        )
    if split_name in predictions:
        preds, truth = predictions[split_name]
        gallery = _gallery(run, index, split[split_name], preds, truth, threshold)
        images.update({f"{split_name} {k}": v for k, v in gallery.items()})
    sizes = split.sizes()
    ctx = ReportContext(
        title=f"visionflow run {run.name}",
        run_name=run.name,
        created_at=_now(),
        summary={
            "task": "object detection",
            "detector": detector.get("name"),
            "backbone": detector.get("backbone"),
            "input size": detector.get("img_size"),
            f"{split_name} mAP@.5": main.get("map_50"),
            f"{split_name} mAP@[.5:.95]": main.get("map"),
            "display threshold (best F1 on val)": round(threshold, 3),
            "classes": ", ".join(index.classes),
            "images (train/val/test)": "/".join(str(v) for v in sizes.values()),
            "boxes": index.num_boxes,
            "duration": format_seconds(seconds),
            "budget": config.get("budget") or "none",
            "device": device,
        },
        metrics={k: v for k, v in metrics.items() if k in {"val", "test"}},
        history=history,
        findings=detection_findings(history, metrics, stopped),
        data_report=None,
        config=config,
        weights=weights or {"source": "none (random initialisation)"},
        phases=[],
        images=images,
    )
    return write_report(ctx, run / "report.html")


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")
