"""``POST /v1/feedback``: the true label of a served image (``predict`` scope).

Name the image by the ``request_id`` of a recent predict request (and ``index``, which of its
images; default 0), or upload it with the ``model`` it was meant for: JSON
``{"label", "request_id", "index"}`` / ``{"label", "image": base64, "model", "version"}``, or a
multipart form with the same fields (the image in ``file``). The answer (201, or 200 for a
duplicate) comes only after the image and its row are safely on disk.

Feedback is one true class per image: a detector's images need boxes, which this store does not
hold, so feedback for a detection model is refused (422 ``unsupported_task``) rather than stored
as a label that would mean nothing to its training.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from visionflow.data.images import inspect_image_bytes
from visionflow.errors import ConfigError, ImageDecodeError
from visionflow.serve import _predict
from visionflow.serve._errors import ServeError, _suggest, decode_error
from visionflow.serve.deps import get_settings, get_source, require_predict
from visionflow.serve.feedback import FeedbackStore, RequestCache, check_label
from visionflow.serve.routes.models import classes_of, task_of
from visionflow.serve.runtime import ModelSource
from visionflow.serve.settings import ServeSettings

router = APIRouter(prefix="/v1", tags=["feedback"], dependencies=[Depends(require_predict)])

_FIELDS = {"label", "request_id", "index", "image", "model", "version"}

_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["label"],
                    "properties": {
                        "label": {"type": "string"},
                        "request_id": {"type": "string"},
                        "index": {"type": "integer", "minimum": 0},
                        "image": {"type": "string", "format": "byte"},
                        "model": {"type": "string"},
                        "version": {"type": ["string", "integer"]},
                    },
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["label"],
                    "properties": {
                        "label": {"type": "string"},
                        "request_id": {"type": "string"},
                        "index": {"type": "integer", "minimum": 0},
                        "file": {"type": "string", "format": "binary"},
                        "model": {"type": "string"},
                        "version": {"type": "string"},
                    },
                }
            },
        },
    }
}


def get_feedback_store(request: Request) -> FeedbackStore:
    """The app's feedback store (a dependency: tests may override it)."""
    store: FeedbackStore | None = getattr(request.app.state, "feedback", None)
    if store is None:
        raise ServeError(
            404,
            "feedback_disabled",
            "feedback is off on this server; start it with --feedback DIR",
        )
    return store


def get_request_cache(request: Request) -> RequestCache | None:
    cache: RequestCache | None = getattr(request.app.state, "request_cache", None)
    return cache


async def _read(request: Request, settings: ServeSettings) -> dict[str, Any]:
    """The fields, with ``image`` as bytes when one was sent."""
    kind = _predict.media_type(request)
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=len(_FIELDS) + 2)
        except HTTPException as exc:
            raise ServeError(422, "invalid_multipart", f"multipart body: {exc.detail}") from None
        try:
            fields: dict[str, Any] = {}
            for key, value in form.multi_items():
                if key == "file":
                    if not isinstance(value, UploadFile):
                        raise ServeError(422, "invalid_field", "file must be an uploaded file")
                    fields["image"] = await value.read()
                elif key in _FIELDS - {"image"}:
                    fields[key] = value if isinstance(value, str) else None
                else:
                    raise ServeError(
                        422, "invalid_field", f"unknown field {key!r}; expected {sorted(_FIELDS)}"
                    )
            return fields
        finally:
            await form.close()
    if kind == "application/json":
        body = await _predict.read_json_body(request)
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            raise ServeError(
                422, "invalid_field", f"unknown field(s) {unknown}; expected {sorted(_FIELDS)}"
            )
        if "image" in body:
            body["image"] = _predict.b64decode(body["image"], "image")
        return body
    raise ServeError(
        415,
        "unsupported_media_type",
        f"expected application/json or multipart/form-data, got {kind or 'no Content-Type'!r}",
    )


async def _images_of(body: bytes, content_type: str, settings: ServeSettings) -> list[bytes]:
    """The images of a cached predict request, read exactly as the predict route read them."""
    scope = {
        "type": "http", "method": "POST", "path": "/", "query_string": b"",
        "headers": [(b"content-type", content_type.encode("latin-1"))],
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    parsed = await _predict.read_v1(Request(scope, receive), settings)
    return [data for _, data in parsed.blobs]


def _version(value: Any) -> str | None:
    if value is None or (isinstance(value, str | int) and not isinstance(value, bool)):
        return None if value is None else str(value)
    raise ServeError(422, "invalid_field", "version must be a number or an alias")


@router.post(
    "/feedback",
    summary="Record the true label of a served image",
    status_code=201,
    openapi_extra=_BODY,
    responses={200: {"description": "Already stored (same model, image and label)"}},
)
async def feedback(
    request: Request,
    settings: ServeSettings = Depends(get_settings),
    source: ModelSource = Depends(get_source),
    store: FeedbackStore = Depends(get_feedback_store),
    cache: RequestCache | None = Depends(get_request_cache),
) -> JSONResponse:
    fields = await _read(request, settings)
    if "label" not in fields or fields["label"] is None:
        raise ServeError(422, "missing_field", "field 'label' (the true class) is missing")
    try:
        label = check_label(fields["label"])
    except ConfigError as exc:
        raise ServeError(422, "invalid_field", str(exc)) from None
    request_id = fields.get("request_id")
    predicted: str | None = None
    if request_id is not None:
        if "image" in fields:
            raise ServeError(422, "invalid_field", "give a request_id or an image, not both")
        index = _predict._int_field(fields.get("index", 0), "index", low=0)
        cached = cache.get(str(request_id)) if cache is not None else None
        if cached is None:
            kept = (
                f" (the server keeps the last {cache.max_requests} requests, "
                f"{cache.max_bytes / 2**20:g} MB, for {cache.max_age_s:g} s)"
                if cache is not None
                else ""
            )
            raise ServeError(
                404,
                "unknown_request",
                f"request_id: no recent predict request {str(request_id)[:64]!r}{kept}; "
                "upload the image with 'image' and 'model' instead",
            )
        if fields.get("model") not in (None, cached.model):
            raise ServeError(
                422,
                "invalid_field",
                f"model: request {request_id} was answered by {cached.model!r}, "
                f"not {fields['model']!r}",
            )
        images = await _images_of(cached.body, cached.content_type, settings)
        if index >= len(images):
            raise ServeError(
                422,
                "invalid_field",
                f"index: request {request_id} held {len(images)} image(s); index must be "
                f"below {len(images)}",
            )
        image, model, version = images[index], cached.model, cached.version
        if index < len(cached.predicted):
            predicted = cached.predicted[index]
    else:
        if "image" not in fields:
            raise ServeError(
                422,
                "missing_field",
                "give 'request_id' (of a recent predict request) or 'image' (with 'model')",
            )
        image = fields["image"]
        given = fields.get("model")
        if not isinstance(given, str) or not given:
            raise ServeError(
                422, "missing_field", "field 'model' (the model the image is for) is missing"
            )
        model = given
        entry = source.entry(model)
        version = entry.resolve(_version(fields.get("version")))
    if task_of(source, source.entry(model), version) == "detect":
        raise ServeError(
            422,
            "unsupported_task",
            f"model {model!r} version {version} is a detector: feedback stores one true class "
            "per image, not boxes; add corrected boxes to the detection dataset's annotations "
            "(COCO, VOC or YOLO files) instead",
        )
    classes = classes_of(source, source.entry(model), version) if version is not None else None
    if classes is not None and label not in classes and not settings.feedback_new_labels:
        raise ServeError(
            422,
            "unknown_label",
            f"label: {label!r} is not a class of {model!r}{_suggest(label, classes)} "
            f"(classes: {', '.join(classes)}); new classes are accepted only when the server "
            "runs with --feedback-new-labels",
        )
    try:
        _, info = await run_in_threadpool(
            inspect_image_bytes, image, max_pixels=settings.max_pixels, name="image"
        )
    except ImageDecodeError as exc:
        raise decode_error(exc) from None
    rid = str(request_id) if request_id is not None else None
    entry_ = await run_in_threadpool(
        lambda: store.add(
            image,
            label=label,
            model=model,
            image_format=info.format,
            version=version,
            request_id=rid,
            predicted=predicted,
        )
    )
    return JSONResponse(entry_.to_json(), status_code=201 if entry_.created else 200)
