"""Object detection as a :class:`~visionflow.models.tasks.base.Task`.

A torchvision detector computes its own losses (it matches anchors or points to boxes inside
``forward``), so the "outputs" this task receives in training are the detector's dict of losses
and :meth:`DetectionTask.loss` sums them. Validation outputs are per-image detections, scored with
COCO's protocol (:func:`visionflow.evaluate.detection.evaluate_detections`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from visionflow.models.tasks.base import Task, register_task

__all__ = ["SCALAR_METRICS", "DetectionTask"]

#: The metrics kept in each epoch's history (the per-class table is computed at the end).
SCALAR_METRICS = ("map", "map_50", "map_75", "mar_100")


@register_task("detect")
class DetectionTask(Task):
    """Boxes and class names per image.

    Model selection and early stopping maximise COCO's mAP@[.5:.95] (``map``): it rewards tight
    boxes as well as found objects, and it moves more smoothly from epoch to epoch on a small
    validation set than mAP@.5, which is the headline number shown to users.

    Args:
        class_names: Object classes in id order (label ``k + 1`` in the detector is class ``k``).
    """

    monitor = "map"
    #: Added to a class id to get the detector's label (0 is the background).
    label_offset = 1

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)

    def build_head(self, in_features: int) -> nn.Module:
        raise TypeError(
            "a detector's heads are built with the detector itself: use "
            "visionflow.models.detection.build_detector"
        )

    def loss(self, outputs: Mapping[str, torch.Tensor], targets: Any) -> torch.Tensor:  # type: ignore[override]
        """The sum of the detector's losses (classification, box regression, centerness...)."""
        total: torch.Tensor = sum(outputs.values(), torch.zeros(()))
        return total

    def metrics(self, outputs: Any, targets: Any) -> dict[str, Any]:
        """COCO metrics of per-image detections against per-image targets.

        ``outputs``/``targets`` are lists of ``{"boxes", "scores"/"iscrowd", "labels"}`` with
        labels as the detector gives them (``1..num_classes``).
        """
        from visionflow.evaluate.detection import evaluate_detections

        preds, truth = self.to_evaluation(outputs, targets)
        result = evaluate_detections(preds, truth, self.class_names)
        out = result.to_json()
        return {k: out[k] for k in SCALAR_METRICS}

    def to_evaluation(
        self, outputs: Any, targets: Any
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Detector outputs and dataset targets as :func:`evaluate_detections` takes them:
        numpy arrays, 0-based class ids, crowd flags (none when a target has no ``iscrowd``)."""
        preds = [
            {
                "boxes": _numpy(o["boxes"]),
                "scores": _numpy(o["scores"]),
                "labels": _numpy(o["labels"]) - self.label_offset,
            }
            for o in outputs
        ]
        truth = [
            {
                "boxes": _numpy(t["boxes"]),
                "labels": _numpy(t["labels"]) - self.label_offset,
                "iscrowd": _numpy(t.get("iscrowd", torch.zeros(len(t["labels"])))),
            }
            for t in targets
        ]
        return preds, truth

    def batch_size(self, targets: Any) -> int:
        return len(targets)


def _numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value
