"""``/v1/models``: what is served, and prediction on uploaded or base64 images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from visionflow.serve import _predict
from visionflow.serve.deps import (
    get_hooks,
    get_metrics,
    get_selector,
    get_settings,
    get_source,
    require_predict,
)
from visionflow.serve.metrics import ServeMetrics
from visionflow.serve.runtime import (
    DEFAULT_ALIAS,
    ModelEntry,
    ModelSource,
    PredictionHook,
    VersionSelector,
)
from visionflow.serve.settings import ServeSettings

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_predict)])

_IMAGES_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "topk": {"type": "integer", "minimum": 1},
                        "version": {"type": "string"},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
                        "topk": {"type": "integer", "minimum": 1},
                        "version": {"type": ["string", "integer"]},
                    },
                }
            },
        },
    }
}


def classes_of(source: ModelSource, entry: ModelEntry, version: int | None) -> list[str] | None:
    if version is None:
        return None
    lm = source.loaded(entry.name, version)
    if lm is not None:
        return lm.classes
    info = entry.versions.get(version)
    classes = info.meta.get("classes") if info else None
    return list(classes) if isinstance(classes, list) else None


def describe(source: ModelSource, entry: ModelEntry) -> dict[str, Any]:
    default = entry.aliases.get(DEFAULT_ALIAS)
    return {
        "name": entry.name,
        "default_version": default,
        "aliases": dict(sorted(entry.aliases.items())),
        "classes": classes_of(source, entry, default),
        "versions": [
            {
                "version": v,
                "aliases": sorted(a for a, n in entry.aliases.items() if n == v),
                "created_at": info.created_at,
                "loaded": source.loaded(entry.name, v) is not None,
            }
            for v, info in sorted(entry.versions.items())
        ],
    }


@router.get("", summary="The served models, their versions, aliases and classes")
def list_models(source: ModelSource = Depends(get_source)) -> dict[str, Any]:
    return {"models": [describe(source, e) for _, e in sorted(source.catalog().items())]}


@router.get("/{name}", summary="One served model")
def get_model(name: str, source: ModelSource = Depends(get_source)) -> dict[str, Any]:
    return describe(source, source.entry(name))


@router.post(
    "/{name}:predict",
    summary="Classify one or several images",
    description='Multipart upload (one or several `files`) or JSON `{"images": [base64...]}`. '
    "The `production` version answers unless `version` names another (number or alias).",
    openapi_extra=_IMAGES_BODY,
)
async def predict(
    name: str,
    request: Request,
    topk: Annotated[int | None, Query(ge=1, le=1000, description="Alternatives per image")] = None,
    version: Annotated[str | None, Query(description="Version number or alias")] = None,
    settings: ServeSettings = Depends(get_settings),
    source: ModelSource = Depends(get_source),
    metrics: ServeMetrics = Depends(get_metrics),
    selector: VersionSelector = Depends(get_selector),
    hooks: Sequence[PredictionHook] = Depends(get_hooks),
) -> JSONResponse:
    source.entry(name)  # unknown model: 404 before reading the body
    body = await _predict.read_v1(request, settings)
    result = await _predict.answer(
        request,
        name=name,
        requested=body.version if body.version is not None else version,
        blobs=body.blobs,
        endpoint="v1.predict",
        settings=settings,
        source=source,
        metrics=metrics,
        selector=selector,
        hooks=hooks,
    )
    k = body.topk or topk or settings.topk
    request_id = request.state.request_id
    return JSONResponse(
        {
            "model": result.name,
            "version": result.version,
            "request_id": request_id,
            "predictions": _predict.top_predictions(result, k),
        },
        headers={"x-model-version": str(result.version)},
        background=result.background,
    )
