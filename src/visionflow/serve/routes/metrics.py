"""Prometheus metrics of this app (``/metrics``, text exposition format)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from visionflow.serve.deps import get_metrics
from visionflow.serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(m: ServeMetrics = Depends(get_metrics)) -> Response:
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
