"""Task heads and the model that joins a backbone to one."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LinearHead", "TaskModel"]


class LinearHead(nn.Module):
    """Dropout then a linear layer: the classification head (initialisable from a linear probe)."""

    def __init__(self, in_features: int, num_classes: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))


class TaskModel(nn.Module):
    """``backbone`` (images -> pooled features) followed by a task ``head``.

    Keeping the two apart lets the engine freeze the backbone, train the head on cached
    features, and give each part its own learning rate.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, images: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.backbone(images)
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone(images))
        return out
