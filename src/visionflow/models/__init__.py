"""Models: where pretrained weights come from, the backbones that use them, and task heads.

``resolve_weights`` finds and verifies weights (package, Hugging Face cache or hub, a file);
``create_backbone`` builds the timm feature extractor and loads them.
"""

from __future__ import annotations

from visionflow.models.backbones import (
    backbone_parameter_groups,
    create_backbone,
    feature_dim,
    list_backbones,
)
from visionflow.models.weights import ResolvedWeights, resolve_weights

__all__ = [
    "ResolvedWeights",
    "backbone_parameter_groups",
    "create_backbone",
    "feature_dim",
    "list_backbones",
    "resolve_weights",
]
