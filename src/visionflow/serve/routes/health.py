"""Liveness and readiness, in our words (``/healthz``, ``/readyz``) and KServe's (``/v2/...``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from visionflow import __version__
from visionflow.serve.deps import get_source
from visionflow.serve.runtime import ModelSource

router = APIRouter(tags=["health"])


def _ready(source: ModelSource) -> JSONResponse:
    body: dict[str, Any] = {"ready": source.ready}
    if source.error:
        body["error"] = source.error
    return JSONResponse(body, status_code=200 if source.ready else 503)


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: every aliased model version is loaded and warm")
def readyz(source: ModelSource = Depends(get_source)) -> JSONResponse:
    return _ready(source)


@router.get("/v2/health/live", summary="KServe v2 liveness")
def v2_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="KServe v2 readiness")
def v2_ready(source: ModelSource = Depends(get_source)) -> JSONResponse:
    return _ready(source)


@router.get("/v2", summary="KServe v2 server metadata")
def v2_server() -> dict[str, Any]:
    return {"name": "visionflow", "version": __version__, "extensions": []}
