"""``/v1/models``: what is served, and prediction on uploaded or base64 images.

One predict route serves both kinds of model. Why not a ``:detect`` route beside it: clients
address a model by name and the task is the model's (``task`` in ``GET /v1/models/{name}``), so
one URL keeps working across versions, rollouts (splits, canaries and shadows run between
versions of one model) and the feedback capture; the answer says which kind it is (a detector's
carries ``"task": "detect"``), and the OpenAPI schema documents both shapes. A classifier's
answer is unchanged: ``predictions`` with ``label``, ``probability`` and ``topk`` per image. A
detector's ``predictions`` hold per image its ``width``, ``height`` and ``detections``
(``label``, ``score``, ``box`` ``[x1, y1, x2, y2]`` in that image's pixels), the objects scoring
at least ``threshold`` (the request's, else the model's suggested one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from visionflow.serve import _predict
from visionflow.serve._detect import image_json
from visionflow.serve._errors import ServeError
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
    LoadedModel,
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
                        "threshold": {"type": "number", "minimum": 0, "maximum": 1},
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
                        "threshold": {"type": "number", "minimum": 0, "maximum": 1},
                        "version": {"type": ["string", "integer"]},
                    },
                }
            },
        },
    }
}


class Alternative(BaseModel):
    label: str
    probability: float


class ClassPrediction(BaseModel):
    """One image's classification: the top label and the ``topk`` alternatives."""

    label: str
    probability: float
    topk: list[Alternative]


class ClassifyResponse(BaseModel):
    """A classifier's answer."""

    model: str
    version: int
    request_id: str
    predictions: list[ClassPrediction] = Field(description="One per image, in request order")


class Detection(BaseModel):
    label: str
    score: float
    box: list[float] = Field(
        min_length=4, max_length=4, description="x1, y1, x2, y2 in the image's pixels"
    )


class ImageDetections(BaseModel):
    """One image's objects, strongest first."""

    width: int
    height: int
    detections: list[Detection]


class DetectResponse(BaseModel):
    """A detector's answer."""

    model: str
    version: int
    request_id: str
    task: Literal["detect"] = "detect"
    threshold: float = Field(description="The score threshold applied")
    predictions: list[ImageDetections] = Field(description="One per image, in request order")


def task_of(source: ModelSource, entry: ModelEntry, version: int | None) -> str:
    """``"detect"`` or ``"classify"``: from the loaded model, else the version's manifest."""
    if version is None:
        return "classify"
    lm = source.loaded(entry.name, version)
    if lm is not None:
        return lm.task
    info = entry.versions.get(version)
    return str(info.meta.get("task", "classify")) if info else "classify"


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
        "task": task_of(source, entry, default),
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


def _no_topk(topk: int | None) -> Callable[[LoadedModel], None]:
    def check(lm: LoadedModel) -> None:
        if topk is not None and lm.task == "detect":
            raise ServeError(
                422,
                "invalid_field",
                f"topk: {lm.name} version {lm.version} is a detector; it takes a score "
                "'threshold' (0 to 1), not topk",
            )

    return check


@router.post(
    "/{name}:predict",
    summary="Classify one or several images, or detect the objects in them",
    description='Multipart upload (one or several `files`) or JSON `{"images": [base64...]}`. '
    "The `production` version answers unless `version` names another (number or alias). "
    "A classifier answers the top label and `topk` alternatives per image; a detector the "
    "objects scoring at least `threshold` (default: the model's), boxes in image pixels.",
    openapi_extra=_IMAGES_BODY,
    response_model=ClassifyResponse | DetectResponse,
)
async def predict(
    name: str,
    request: Request,
    topk: Annotated[
        int | None, Query(ge=1, le=1000, description="Alternatives per image (classifiers)")
    ] = None,
    threshold: Annotated[
        float | None,
        Query(ge=0, le=1, description="Lowest score of a detected object (detectors)"),
    ] = None,
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
        threshold=body.threshold if body.threshold is not None else threshold,
        check=_no_topk(body.topk or topk),
    )
    request_id = request.state.request_id
    out: dict[str, Any] = {
        "model": result.name,
        "version": result.version,
        "request_id": request_id,
    }
    if isinstance(result, _predict.DetectAnswer):
        out["task"] = "detect"
        out["threshold"] = result.threshold
        out["predictions"] = [image_json(d) for d in result.detections]
    else:
        out["predictions"] = _predict.top_predictions(result, body.topk or topk or settings.topk)
    return JSONResponse(
        out, headers={"x-model-version": str(result.version)}, background=result.background
    )
