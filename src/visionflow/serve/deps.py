"""What route handlers depend on, read from the app's state; tests override any of them with
``app.dependency_overrides[get_settings] = ...``."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Request

from visionflow.serve.metrics import ServeMetrics
from visionflow.serve.runtime import ModelSource, PredictionHook, VersionSelector
from visionflow.serve.security import get_keys, require_scope
from visionflow.serve.settings import ServeSettings

__all__ = [
    "get_hooks",
    "get_keys",
    "get_metrics",
    "get_selector",
    "get_settings",
    "get_source",
    "require_admin",
    "require_predict",
]


def get_settings(request: Request) -> ServeSettings:
    settings: ServeSettings = request.app.state.settings
    return settings


def get_source(request: Request) -> ModelSource:
    source: ModelSource = request.app.state.source
    return source


def get_metrics(request: Request) -> ServeMetrics:
    metrics: ServeMetrics = request.app.state.metrics
    return metrics


def get_selector(request: Request) -> VersionSelector:
    selector: VersionSelector = request.app.state.selector
    return selector


def get_hooks(request: Request) -> Sequence[PredictionHook]:
    hooks: Sequence[PredictionHook] = request.app.state.hooks
    return hooks


require_predict = require_scope("predict")
require_admin = require_scope("admin")
