"""Reading images out of requests and answering them: shared by the v1 and v2 routes.

:func:`answer` serves either kind of model: a classifier's images are preprocessed into one
``uint8`` batch for its :class:`~visionflow.serve.runtime.Batcher` (an :class:`Answer`), a
detector's are decoded only (they keep their sizes) and queued on its
:class:`~visionflow.serve.runtime.DetectionRunner` (a :class:`DetectAnswer`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from PIL import Image
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from visionflow.data.images import load_image_bytes
from visionflow.errors import ImageDecodeError
from visionflow.prediction import Detections
from visionflow.serve._detect import check_threshold, strongest_labels
from visionflow.serve._errors import ServeError, decode_error, queue_full
from visionflow.serve.metrics import ServeMetrics
from visionflow.serve.runtime import (
    BatchResult,
    DetectionRunner,
    LoadedModel,
    ModelSource,
    PredictContext,
    PredictionEvent,
    PredictionHook,
    QueueFull,
    VersionSelector,
)
from visionflow.serve.settings import ServeSettings

log = logging.getLogger("visionflow.serve")

Blob = tuple[str, bytes]  # (what to call it in messages, encoded image)


@dataclass
class Answer:
    """A finished prediction: which version answered and its per-image results."""

    name: str
    version: int
    classes: list[str]
    result: BatchResult
    background: BackgroundTask | None


@dataclass
class DetectAnswer:
    """A detector's finished answer: which version, the threshold it applied, per image."""

    name: str
    version: int
    classes: list[str]
    threshold: float
    detections: list[Detections]
    background: BackgroundTask | None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def b64decode(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise ServeError(
            422, "invalid_field", f"{where}: expected a base64 string, got {type(text).__name__}"
        )
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(422, "bad_base64", f"{where}: not valid base64") from None


def check_count(blobs: Sequence[Blob], settings: ServeSettings) -> None:
    if not blobs:
        raise ServeError(422, "empty_upload", "the request holds no images")
    if len(blobs) > settings.max_images:
        raise ServeError(
            413,
            "too_many_images",
            f"{len(blobs)} images in one request; at most {settings.max_images}",
        )


async def read_json_body(request: Request) -> dict[str, Any]:
    if media_type(request) != "application/json":
        raise ServeError(
            415,
            "unsupported_media_type",
            f"expected Content-Type application/json, got {media_type(request) or 'none'!r}",
        )
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise ServeError(422, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ServeError(422, "invalid_json", "the request body must be a JSON object")
    return body


def _int_field(value: Any, where: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ServeError(422, "invalid_field", f"{where} must be an integer")
    try:
        number = int(value)
    except ValueError:
        raise ServeError(422, "invalid_field", f"{where} must be an integer") from None
    if number < low:
        raise ServeError(422, "invalid_field", f"{where} must be at least {low}")
    return number


@dataclass
class V1Request:
    blobs: list[Blob]
    topk: int | None
    version: str | None
    threshold: float | None = None


async def read_v1(request: Request, settings: ServeSettings) -> V1Request:
    """Images from a multipart upload (field ``files``) or JSON (``{"images": [base64]}``)."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_images, max_fields=16)
        except HTTPException as exc:
            status = 413 if "Too many files" in str(exc.detail) else 422
            code = "too_many_images" if status == 413 else "invalid_multipart"
            raise ServeError(status, code, f"multipart body: {exc.detail}") from None
        try:
            uploads = form.getlist("files")
            if not uploads:
                got = ", ".join(sorted(set(form.keys()))) or "no fields"
                raise ServeError(
                    422,
                    "missing_field",
                    f"multipart field 'files' is missing (got: {got}); send each "
                    "image as a file in a field named 'files'",
                )
            blobs = []
            for i, item in enumerate(uploads):
                if not isinstance(item, UploadFile):
                    raise ServeError(
                        422, "invalid_field", f"files[{i}] is a text field, not an uploaded file"
                    )
                blobs.append((f"files[{i}]", await item.read()))
            topk = form.get("topk")
            version = form.get("version")
            threshold = form.get("threshold")
            check_count(blobs, settings)
            return V1Request(
                blobs,
                _int_field(topk, "topk") if topk is not None else None,
                str(version) if version is not None else None,
                check_threshold(threshold) if threshold is not None else None,
            )
        finally:
            await form.close()
    if kind == "application/json":
        body = await read_json_body(request)
        unknown = sorted(set(body) - {"images", "topk", "version", "threshold"})
        if unknown:
            raise ServeError(
                422,
                "invalid_field",
                f"unknown field(s) {unknown}; expected 'images' (a list of base64 "
                "strings), optional 'topk' (classifiers), 'threshold' (detectors) and 'version'",
            )
        if "images" not in body:
            raise ServeError(
                422, "missing_field", "field 'images' (a list of base64 strings) is missing"
            )
        images = body["images"]
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list):
            raise ServeError(422, "invalid_field", "'images' must be a list of base64 strings")
        blobs = [(f"images[{i}]", b64decode(x, f"images[{i}]")) for i, x in enumerate(images)]
        check_count(blobs, settings)
        topk = body.get("topk")
        version = body.get("version")
        threshold = body.get("threshold")
        return V1Request(
            blobs,
            _int_field(topk, "topk") if topk is not None else None,
            str(version) if version is not None else None,
            check_threshold(threshold) if threshold is not None else None,
        )
    raise ServeError(
        415,
        "unsupported_media_type",
        f"expected multipart/form-data (field 'files') or application/json "
        f"({{'images': [base64...]}}), got {kind or 'no Content-Type'!r}",
    )


def decode_images(blobs: Sequence[Blob], max_pixels: int) -> list[Image.Image]:
    """Decode (in a request thread) through the one safe decoder; a bad image answers 4xx."""
    images = []
    for where, data in blobs:
        try:
            images.append(load_image_bytes(data, max_pixels=max_pixels, name=where))
        except ImageDecodeError as exc:
            raise decode_error(exc) from None
    return images


def decode(model: Any, blobs: Sequence[Blob], max_pixels: int) -> np.ndarray:
    """Decode and preprocess (in a request thread): one safe decoder, the bundle's resizing."""
    pixels: np.ndarray = model.pixels(decode_images(blobs, max_pixels))
    return pixels


def _run_hooks(hooks: Sequence[PredictionHook], event: PredictionEvent) -> None:
    for hook in hooks:
        try:
            hook.after_predict(event)
        except Exception:
            log.exception("prediction hook %s failed", type(hook).__name__)


async def answer(
    request: Request,
    *,
    name: str,
    requested: str | None,
    blobs: Sequence[Blob],
    endpoint: str,
    settings: ServeSettings,
    source: ModelSource,
    metrics: ServeMetrics,
    selector: VersionSelector,
    hooks: Sequence[PredictionHook],
    threshold: float | None = None,
    check: Callable[[LoadedModel], None] | None = None,
) -> Answer | DetectAnswer:
    """Pick the version, decode, queue (a classifier's batch or a detector's queue), wait
    (within the deadline).

    Args:
        threshold: A detector's score threshold (None: the model's own); 422 for a classifier.
        check: Called with the version picked, before any decoding: raises the 422 for options
            the model's kind cannot take (a route's own, such as v1 ``topk``).
    """
    started = time.perf_counter()
    request_id: str = request.state.request_id
    entry = source.entry(name)
    ctx = PredictContext(name, requested, request_id, endpoint, dict(request.headers))
    version = entry.resolve(selector.select(ctx, entry))
    request.state.model, request.state.version = name, str(version)
    try:
        async with asyncio.timeout(settings.timeout_s):
            if source.loaded(name, version) is None:
                await asyncio.shield(run_in_threadpool(source.ensure_loaded, name, version))
            lm = source.acquire(name, version)
            try:
                if check is not None:
                    check(lm)
                classes = lm.classes
                if isinstance(lm.batcher, DetectionRunner):
                    applied = (
                        threshold if threshold is not None else float(lm.model.score_threshold)
                    )
                    images = await run_in_threadpool(decode_images, blobs, settings.max_pixels)
                    try:
                        found = lm.batcher.submit(images, threshold=applied)
                    except QueueFull:
                        raise queue_full(name, version) from None
                    detections = await asyncio.wrap_future(found)
                else:
                    if threshold is not None:
                        raise ServeError(
                            422,
                            "invalid_field",
                            f"threshold: {name} version {version} is a classifier; a score "
                            "threshold applies to detection models (use topk)",
                        )
                    pixels = await run_in_threadpool(decode, lm.model, blobs, settings.max_pixels)
                    try:
                        future = lm.batcher.submit(pixels)
                    except QueueFull:
                        raise queue_full(name, version) from None
                    result = await asyncio.wrap_future(future)
            finally:
                lm.release()
    except TimeoutError:
        raise ServeError(
            504,
            "timeout",
            f"no answer within {settings.timeout_s:g} s; retry, or send fewer images per request",
        ) from None
    if isinstance(lm.batcher, DetectionRunner):
        metrics.observe_detections(name, str(version), detections)
        background = None
        if hooks:
            n = len(detections)
            event = PredictionEvent(
                model=name, version=version, request_id=request_id, endpoint=endpoint,
                classes=classes, labels=strongest_labels(detections),
                probabilities=np.zeros((n, 0), np.float32), features=np.zeros((n, 0), np.float32),
                pixels=np.zeros((n, 0, 0, 3), np.uint8),
                latency_s=time.perf_counter() - started, timestamp=time.time(),
                task="detect", detections=detections, images=images, threshold=applied,
            )  # fmt: skip
            background = BackgroundTask(_run_hooks, list(hooks), event)
        return DetectAnswer(name, version, classes, applied, detections, background)
    top = result.probabilities.argmax(axis=1) if len(result.probabilities) else np.zeros(0, int)
    labels = [classes[int(i)] for i in top]
    confidences = [float(result.probabilities[j, int(i)]) for j, i in enumerate(top)]
    metrics.observe_predictions(name, str(version), labels, confidences)
    background = None
    if hooks:
        event = PredictionEvent(
            model=name, version=version, request_id=request_id, endpoint=endpoint,
            classes=classes, labels=labels, probabilities=result.probabilities,
            features=result.features, pixels=pixels,
            latency_s=time.perf_counter() - started, timestamp=time.time(),
        )  # fmt: skip
        background = BackgroundTask(_run_hooks, list(hooks), event)
    return Answer(name, version, classes, result, background)


def top_predictions(answer: Answer, topk: int) -> list[dict[str, Any]]:
    k = max(1, min(topk, len(answer.classes)))
    out = []
    for row in answer.result.probabilities:
        order = np.argsort(-row, kind="stable")[:k]
        alts = [{"label": answer.classes[int(i)], "probability": float(row[i])} for i in order]
        out.append({"label": alts[0]["label"], "probability": alts[0]["probability"], "topk": alts})
    return out
