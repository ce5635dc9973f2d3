"""Backbones: timm models that turn images into pooled feature vectors.

Every backbone is a timm model created with ``num_classes=0``, so ``model(images)`` returns
``(batch, feature_dim(model))`` features and the task head (ours) sits on top. Weights come
from :func:`~visionflow.models.weights.resolve_weights` and are loaded here with the same
all-or-nothing check: a backbone tensor that is not in the weights is an error, not a warning.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from visionflow.errors import ConfigError, WeightsError
from visionflow.models.weights import (
    ResolvedWeights,
    _arch,
    _classifier_prefixes,
    _is_classifier,
    _listed,
    _require_known,
)

__all__ = ["backbone_parameter_groups", "create_backbone", "feature_dim", "list_backbones"]

_NBT = "num_batches_tracked"


def list_backbones(pattern: str | None = None) -> list[str]:
    """timm model names, optionally filtered by a shell-style ``pattern`` (``"*efficientnet*"``).

    A pattern without wildcards matches as a substring, so ``"lite"`` finds the Lite models.
    """
    import timm

    names: list[str] = timm.list_models()
    if not pattern:
        return names
    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def create_backbone(
    name: str,
    *,
    weights: ResolvedWeights | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """Create timm's ``name`` without a classifier and load ``weights`` into it.

    Args:
        name: timm model name (optionally ``name.tag``).
        weights: Resolved weights for this architecture; ``None`` (or source ``"none"``) gives
            random initialisation. Resolving is a separate step so that creating a model never
            touches disk or network by surprise.
        drop_rate: Dropout before the (removed) classifier, passed to timm.
        drop_path_rate: Stochastic depth rate, passed to timm (only for models that have it).

    Returns:
        The model in training mode; ``model(images)`` gives pooled features.

    Raises:
        ConfigError: Unknown model name (with a "did you mean"), or a drop rate the model
            does not support.
        WeightsError: The weights are for another architecture, carry no tensors, or do not
            cover every backbone tensor.
    """
    import timm

    _require_known(name)
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0}
    if drop_rate:
        kwargs["drop_rate"] = float(drop_rate)
    if drop_path_rate:
        kwargs["drop_path_rate"] = float(drop_path_rate)
    try:
        model: nn.Module = timm.create_model(name, **kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"backbone {name!r} does not accept drop_rate/drop_path_rate ({exc}); set them to 0"
        ) from exc
    if weights is not None and weights.source != "none":
        _load_backbone(model, name, weights)
    return model


def feature_dim(model: nn.Module) -> int:
    """Width of the feature vector ``model(images)`` returns.

    timm's ``head_hidden_size`` wins over ``num_features``: models such as MobileNetV3 or VGG
    have a pre-logits layer after pooling, so their features are wider than the last stage.
    """
    for attr in ("head_hidden_size", "num_features"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    # not a timm model: measure it
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(torch.zeros(1, 3, size, size))
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ConfigError(
            f"{type(model).__name__} does not return (batch, features) for images; "
            "use a timm model created with num_classes=0"
        )
    return int(out.shape[1])


def backbone_parameter_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters split by depth, stem first, last stage last.

    Used for freeze-then-unfreeze and layer-wise learning-rate decay. timm models describe
    their stages with ``group_matcher``; the coarse grouping (stem, each stage, final layers)
    is used. Other modules fall back to their top-level children in registration order. Every
    parameter appears exactly once; empty groups are left out.
    """
    params = dict(model.named_parameters())
    groups: list[list[str]] = []
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        from timm.models import group_parameters

        try:
            grouped = group_parameters(model, matcher(coarse=True))
            groups = [list(names) for names in grouped.values()]
        except Exception:  # an unusual custom model: fall back on its children
            groups = []
    if not groups:
        groups = _children_groups(model)
    return _dedupe(groups, params)


def _children_groups(model: nn.Module) -> list[list[str]]:
    own = [n for n, _ in model.named_parameters(recurse=False)]
    groups = [own] if own else []
    for child_name, child in model.named_children():
        groups.append([f"{child_name}.{n}" for n, _ in child.named_parameters()])
    return groups


def _dedupe(
    groups: Iterable[list[str]], params: dict[str, nn.Parameter]
) -> list[list[nn.Parameter]]:
    """Resolve names to parameters, each once (shared ones stay in their first group)."""
    seen: set[int] = set()
    out: list[list[nn.Parameter]] = []
    for names in groups:
        group = []
        for n in names:
            p = params.get(n)
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                group.append(p)
        if group:
            out.append(group)
    rest = [p for p in params.values() if id(p) not in seen]
    if rest:  # anything a matcher missed belongs to the deepest layers
        if out:
            out[-1].extend(rest)
        else:
            out.append(rest)
    return out


def _load_backbone(model: nn.Module, name: str, weights: ResolvedWeights) -> None:
    """Load resolved weights minus the classifier; refuse anything partial."""
    if _arch(weights.backbone) != _arch(name):
        raise WeightsError(
            f"weights were resolved for {weights.backbone!r} but the backbone is {name!r}; "
            f"resolve weights for {name!r}"
        )
    if weights.state_dict is None:
        raise WeightsError(
            f"weights for {name!r} from {weights.source} {weights.location} carry no tensors "
            "(rebuilt from provenance?); call resolve_weights again"
        )
    cfg = getattr(model, "pretrained_cfg", None) or {}
    clf = _classifier_prefixes(cfg)
    state = {k: v for k, v in weights.state_dict.items() if not _is_classifier(k, clf)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_NBT)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"weights from {weights.location} do not cover backbone {name!r}: missing "
            f"{len(missing)} {_listed(missing)}, unexpected {len(unexpected)} {_listed(unexpected)}"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"weights from {weights.location} do not fit {name!r}: {exc}") from exc
