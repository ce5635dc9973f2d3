"""KServe Open Inference Protocol (v2): model metadata, readiness and inference.

The one input, ``images``, is ``BYTES`` holding encoded image files (base64 strings in JSON, as
KServe's JSON form does), for a classifier and a detector alike.

A classifier's outputs: ``label`` (BYTES), ``probability`` (FP32, the top label's) and
``probabilities`` (FP32, ``[n, classes]``, class order in the metadata's ``parameters``).

A detector takes one image per request (``shape [1]``): its outputs have one row per object,
so several images would need a ragged batch the protocol cannot express. Outputs: ``boxes``
(FP32 ``[n, 4]``, ``x1, y1, x2, y2`` in the image's pixels), ``scores`` (FP32 ``[n]``) and
``labels`` (BYTES ``[n]``), strongest first; the response's ``parameters`` give the image's
``width`` and ``height`` and the ``threshold`` applied, which the request may set in its own
``parameters`` (``{"threshold": 0.5}``; default: the model's). Why encoded bytes rather than an
``HxWx3 UINT8`` tensor: in JSON a raw tensor is a list of one number per channel value (a
640 x 480 photo is 921,600 of them, ten times its PNG in base64), it would need a second input
name the metadata cannot mark optional, and it would skip the one safe decoder every other
path uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from visionflow.serve import _predict
from visionflow.serve._detect import check_threshold
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
from visionflow.serve.routes.models import classes_of, task_of
from visionflow.serve.runtime import (
    LoadedModel,
    ModelEntry,
    ModelSource,
    PredictionHook,
    VersionSelector,
)
from visionflow.serve.settings import ServeSettings

router = APIRouter(prefix="/v2/models", tags=["kserve-v2"], dependencies=[Depends(require_predict)])

INPUT = "images"
OUTPUTS = ("label", "probability", "probabilities")
DETECT_OUTPUTS = ("boxes", "scores", "labels")

_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {"type": "array", "items": {"type": "object", "properties": {
                            "name": {"type": "string", "enum": [INPUT]},
                            "shape": {"type": "array", "items": {"type": "integer"}},
                            "datatype": {"type": "string", "enum": ["BYTES"]},
                            "data": {"type": "array", "items": {"type": "string"}},
                        }}},
                        "outputs": {"type": "array", "items": {"type": "object", "properties": {
                            "name": {"type": "string", "enum": [*OUTPUTS, *DETECT_OUTPUTS]}}}},
                        "parameters": {"type": "object", "properties": {
                            "threshold": {"type": "number", "minimum": 0, "maximum": 1,
                                          "description": "Detectors: lowest object score"}}},
                    },
                }
            }
        },
    }
}  # fmt: skip


def _version(entry: ModelEntry, version: str | None) -> int:
    return entry.resolve(version)


def _metadata(source: ModelSource, entry: ModelEntry, version: int, versions: list[int]) -> dict:
    classes = classes_of(source, entry, version) or []
    if task_of(source, entry, version) == "detect":
        lm = source.loaded(entry.name, version)
        info = entry.versions.get(version)
        threshold = (
            lm.model.score_threshold if lm else (info.meta if info else {}).get("score_threshold")
        )
        return {
            "name": entry.name,
            "versions": [str(v) for v in versions],
            "platform": "onnxruntime",
            "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [1]}],
            "outputs": [
                {"name": "boxes", "datatype": "FP32", "shape": [-1, 4]},
                {"name": "scores", "datatype": "FP32", "shape": [-1]},
                {"name": "labels", "datatype": "BYTES", "shape": [-1]},
            ],
            "parameters": {
                "classes": classes,
                "version": str(version),
                "task": "detect",
                "score_threshold": threshold,
            },
        }
    return {
        "name": entry.name,
        "versions": [str(v) for v in versions],
        "platform": "onnxruntime",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probability", "datatype": "FP32", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(classes)]},
        ],
        "parameters": {"classes": classes, "version": str(version)},
    }


@router.get("/{name}", summary="Model metadata (the production version)")
def model_metadata(name: str, source: ModelSource = Depends(get_source)) -> dict[str, Any]:
    entry = source.entry(name)
    return _metadata(source, entry, _version(entry, None), sorted(entry.versions))


@router.get("/{name}/versions/{version}", summary="Metadata of one version")
def version_metadata(
    name: str, version: str, source: ModelSource = Depends(get_source)
) -> dict[str, Any]:
    entry = source.entry(name)
    v = _version(entry, version)
    return _metadata(source, entry, v, [v])


def _ready(source: ModelSource, name: str, version: str | None) -> JSONResponse:
    entry = source.entry(name)
    v = _version(entry, version)
    ready = source.loaded(name, v) is not None
    body = {"name": name, "version": str(v), "ready": ready}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/{name}/ready", summary="Whether the production version is loaded and warm")
def model_ready(name: str, source: ModelSource = Depends(get_source)) -> JSONResponse:
    return _ready(source, name, None)


@router.get("/{name}/versions/{version}/ready", summary="Whether a version is loaded and warm")
def version_ready(
    name: str, version: str, source: ModelSource = Depends(get_source)
) -> JSONResponse:
    return _ready(source, name, version)


def _parse_infer(body: dict[str, Any]) -> tuple[list[_predict.Blob], list[str], float | None]:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ServeError(422, "missing_field", "'inputs' must be a non-empty list of tensors")
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ServeError(422, "invalid_field", f"expected one input tensor {INPUT!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise ServeError(
            422, "invalid_field", f"unknown input {tensor.get('name')!r}; the input is {INPUT!r}"
        )
    if tensor.get("datatype") != "BYTES":
        raise ServeError(
            422,
            "invalid_field",
            f"input {INPUT!r} has datatype BYTES (encoded images), got {tensor.get('datatype')!r}",
        )
    if "data" not in tensor:
        raise ServeError(422, "missing_field", f"input {INPUT!r} has no 'data'")
    data = tensor["data"]
    if not isinstance(data, list):
        raise ServeError(422, "invalid_field", f"input {INPUT!r}: 'data' must be a list")
    flat: list[Any] = []
    for item in data:
        flat.extend(item if isinstance(item, list) else [item])
    shape = tensor.get("shape")
    if shape is not None:
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise ServeError(422, "invalid_field", "'shape' must be a list of integers")
        count = 1
        for d in shape:
            count *= d
        if count != len(flat):
            raise ServeError(
                422,
                "invalid_field",
                f"shape {shape} holds {count} elements but 'data' has {len(flat)}",
            )
    blobs = [(f"{INPUT}[{i}]", _predict.b64decode(x, f"{INPUT}[{i}]")) for i, x in enumerate(flat)]
    wanted = [o.get("name") for o in body.get("outputs") or [] if isinstance(o, dict)]
    unknown = [w for w in wanted if w not in (*OUTPUTS, *DETECT_OUTPUTS)]
    if unknown:
        raise ServeError(
            422,
            "invalid_field",
            f"unknown output(s) {unknown}; a classifier's outputs are {list(OUTPUTS)}, a "
            f"detector's {list(DETECT_OUTPUTS)}",
        )
    parameters = body.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ServeError(422, "invalid_field", "'parameters' must be an object")
    threshold = (parameters or {}).get("threshold")
    if threshold is not None:
        threshold = check_threshold(threshold, "parameters.threshold")
    return blobs, [str(w) for w in wanted], threshold


def _fits(wanted: list[str], images: int) -> Callable[[LoadedModel], None]:
    """The check that the outputs asked for, and the image count, suit the version picked."""

    def check(lm: LoadedModel) -> None:
        names = DETECT_OUTPUTS if lm.task == "detect" else OUTPUTS
        wrong = [w for w in wanted if w not in names]
        if wrong:
            raise ServeError(
                422,
                "invalid_field",
                f"output(s) {wrong}: {lm.name} version {lm.version} is a "
                f"{'detector' if lm.task == 'detect' else 'classifier'}; its outputs are "
                f"{list(names)}",
            )
        if lm.task == "detect" and images != 1:
            raise ServeError(
                422,
                "invalid_field",
                f"input {INPUT!r}: {lm.name} is a detector, which takes one image per v2 "
                f"request (its outputs have one row per object), got {images}; send them one "
                f"by one, or several at once to POST /v1/models/{lm.name}:predict",
            )

    return check


async def _infer(
    request: Request, name: str, version: str | None, deps: dict[str, Any]
) -> JSONResponse:
    deps["source"].entry(name)
    body = await _predict.read_json_body(request)
    blobs, wanted, threshold = _parse_infer(body)
    _predict.check_count(blobs, deps["settings"])
    result = await _predict.answer(
        request, name=name, requested=version, blobs=blobs, endpoint="v2.infer",
        threshold=threshold, check=_fits(wanted, len(blobs)), **deps,
    )  # fmt: skip
    request_id = body.get("id") if isinstance(body.get("id"), str) else request.state.request_id
    head = {"model_name": result.name, "model_version": str(result.version), "id": request_id}
    if isinstance(result, _predict.DetectAnswer):
        (found,) = result.detections
        n = len(found)
        tensors = {
            "boxes": {"datatype": "FP32", "shape": [n, 4],
                      "data": [float(v) for v in np.asarray(found.boxes).reshape(-1)]},
            "scores": {"datatype": "FP32", "shape": [n],
                       "data": [float(v) for v in found.scores]},
            "labels": {"datatype": "BYTES", "shape": [n], "data": list(found.labels)},
        }  # fmt: skip
        return JSONResponse(
            {
                **head,
                "parameters": {
                    "width": found.width,
                    "height": found.height,
                    "threshold": result.threshold,
                },
                "outputs": [{"name": k, **tensors[k]} for k in wanted or DETECT_OUTPUTS],
            },
            headers={"x-model-version": str(result.version)},
            background=result.background,
        )
    probs = result.result.probabilities
    n = len(probs)
    top = probs.argmax(axis=1)
    tensors = {
        "label": {"datatype": "BYTES", "shape": [n],
                  "data": [result.classes[int(i)] for i in top]},
        "probability": {"datatype": "FP32", "shape": [n],
                        "data": [float(probs[j, int(i)]) for j, i in enumerate(top)]},
        "probabilities": {"datatype": "FP32", "shape": [n, len(result.classes)],
                          "data": [float(p) for p in probs.reshape(-1)]},
    }  # fmt: skip
    return JSONResponse(
        {**head, "outputs": [{"name": k, **tensors[k]} for k in wanted or OUTPUTS]},
        headers={"x-model-version": str(result.version)},
        background=result.background,
    )


def _deps(
    settings: ServeSettings = Depends(get_settings),
    source: ModelSource = Depends(get_source),
    metrics: ServeMetrics = Depends(get_metrics),
    selector: VersionSelector = Depends(get_selector),
    hooks: Sequence[PredictionHook] = Depends(get_hooks),
) -> dict[str, Any]:
    return {"settings": settings, "source": source, "metrics": metrics, "selector": selector,
            "hooks": hooks}  # fmt: skip


@router.post(
    "/{name}/infer", summary="Inference on the production version", openapi_extra=_INFER_BODY
)
async def infer(name: str, request: Request, deps: dict = Depends(_deps)) -> JSONResponse:
    return await _infer(request, name, None, deps)


@router.post(
    "/{name}/versions/{version}/infer",
    summary="Inference on one version",
    openapi_extra=_INFER_BODY,
)
async def infer_version(
    name: str, version: str, request: Request, deps: dict = Depends(_deps)
) -> JSONResponse:
    return await _infer(request, name, version, deps)
