"""Drift of live traffic from a model's reference statistics (``predict`` scope).

``GET /v1/models/{name}/drift`` answers the JSON report of :mod:`visionflow.serve.monitor`;
``GET /v1/models/{name}/drift.html`` the same as a small self-contained page with plots. The
version is the ``production`` one unless ``version`` names another. Reports are computed in a
request thread, at most once per ``--drift-interval-s``, never on the prediction path.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse

from visionflow.serve._errors import ServeError
from visionflow.serve.deps import get_source, require_predict
from visionflow.serve.monitor import DriftMonitor, render_html
from visionflow.serve.runtime import ModelSource

router = APIRouter(
    prefix="/v1/models", tags=["monitoring"], dependencies=[Depends(require_predict)]
)


def get_monitor(request: Request) -> DriftMonitor:
    """The app's drift monitor (a dependency: tests may override it)."""
    monitor: DriftMonitor | None = getattr(request.app.state, "monitor", None)
    if monitor is None:
        raise ServeError(
            404, "drift_disabled", "drift monitoring is off on this server (--drift to enable)"
        )
    return monitor


Version = Annotated[str | None, Query(description="Version number or alias (default: production)")]


def _report(name: str, version: str | None, source: ModelSource, monitor: DriftMonitor):  # type: ignore[no-untyped-def]
    entry = source.entry(name)
    return monitor.report(name, entry.resolve(version))


@router.get("/{name}/drift", summary="Drift of live traffic from the model's reference data")
def drift(
    name: str,
    version: Version = None,
    source: ModelSource = Depends(get_source),
    monitor: DriftMonitor = Depends(get_monitor),
) -> dict[str, Any]:
    report: dict[str, Any] = _report(name, version, source, monitor)
    return report


@router.get(
    "/{name}/drift.html", summary="The drift report as an HTML page", response_class=HTMLResponse
)
def drift_html(
    name: str,
    version: Version = None,
    source: ModelSource = Depends(get_source),
    monitor: DriftMonitor = Depends(get_monitor),
) -> HTMLResponse:
    report = _report(name, version, source, monitor)
    return HTMLResponse(render_html(report, monitor))
