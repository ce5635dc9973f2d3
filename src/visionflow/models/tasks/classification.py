"""Single-label image classification."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visionflow.models.heads import LinearHead
from visionflow.models.tasks.base import Task, register_task

__all__ = ["ClassificationTask"]


@register_task("classify")
class ClassificationTask(Task):
    """Softmax classification with label smoothing and optional class weights.

    Args:
        class_names: Output classes, in id order.
        label_smoothing: Cross-entropy label smoothing (0 disables).
        class_weights: Per-class loss weights (for imbalanced data), or ``None``.
        dropout: Dropout before the linear head.
    """

    monitor = "accuracy"

    def __init__(
        self,
        class_names: Sequence[str],
        *,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        dropout: float = 0.0,
    ) -> None:
        self.class_names = list(class_names)
        self.label_smoothing = float(label_smoothing)
        self.class_weights = (
            torch.tensor(list(class_weights), dtype=torch.float32) if class_weights else None
        )
        self.dropout = float(dropout)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def build_head(self, in_features: int) -> nn.Module:
        return LinearHead(in_features, self.num_classes, dropout=self.dropout)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weight = self.class_weights
        if weight is not None:
            weight = weight.to(device=outputs.device, dtype=outputs.dtype)
        if targets.dtype.is_floating_point:  # soft labels from MixUp / CutMix
            n = self.num_classes
            soft = targets * (1.0 - self.label_smoothing) + self.label_smoothing / n
            logp = F.log_softmax(outputs.float(), dim=1)
            per_sample = -(soft * logp * (weight if weight is not None else 1.0)).sum(dim=1)
            return per_sample.mean()
        return F.cross_entropy(
            outputs.float(), targets, weight=weight, label_smoothing=self.label_smoothing
        )

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        """Loss (plain cross-entropy, no smoothing) and accuracy of a whole split."""
        logits = outputs.float()
        loss = F.cross_entropy(logits, targets).item() if len(targets) else float("nan")
        accuracy = (logits.argmax(1) == targets).float().mean().item() if len(targets) else 0.0
        return {"loss": loss, "accuracy": accuracy}
