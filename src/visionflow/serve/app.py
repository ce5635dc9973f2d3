"""The app factory: ``create_app(settings)`` gives a FastAPI app serving the models of a source.

Routers (one per resource) live in :mod:`visionflow.serve.routes`; what they need (settings,
model source, metrics, version selector, prediction hooks, API keys) are FastAPI dependencies
reading ``app.state``, so tests override any of them. The lifespan binds the source, loads and
warms its models in a background thread (``/readyz`` says 503 until they are warm, while
``/healthz`` already answers), and stops batchers and polling at shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visionflow import __version__
from visionflow.errors import ConfigError, VisionflowError
from visionflow.serve._errors import ServeError
from visionflow.serve.feedback import FeedbackStore, RequestCache, RequestCapture
from visionflow.serve.metrics import ServeMetrics
from visionflow.serve.monitor import DriftMonitor
from visionflow.serve.rollout import RolloutManager, RolloutObserver, RolloutSelector
from visionflow.serve.routes import admin, drift, feedback, health, models, v2
from visionflow.serve.routes import metrics as metrics_routes
from visionflow.serve.routes import rollout as rollout_routes
from visionflow.serve.runtime import (
    BundleSource,
    ModelSource,
    PredictionHook,
    RegistrySource,
    VersionSelector,
)
from visionflow.serve.security import KeyStore
from visionflow.serve.settings import ServeSettings

__all__ = ["create_app", "source_from_settings"]

log = logging.getLogger("visionflow.serve")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def source_from_settings(settings: ServeSettings) -> ModelSource:
    """The model source ``settings`` names (a bundle or a registry)."""
    if settings.bundle is not None:
        return BundleSource(settings.bundle, name=settings.name)
    if settings.registry is not None:
        return RegistrySource(settings.registry, url=settings.db)
    raise ConfigError("nothing to serve: give a bundle or a registry (or a source)")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


class _Gateway:
    """Outermost own middleware: request ids, the body size limit (413 before the app reads a
    byte more than allowed) and the request metrics (endpoint = the route's path template)."""

    def __init__(self, app: ASGIApp, *, max_body: int, metrics: ServeMetrics) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state["request_id"] = request_id
        status = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        try:
            replay = await self._read_body(scope, receive)
            if replay is None:
                state["error_code"] = "body_too_large"
                limit = self.max_body / (1024 * 1024)
                response = _error(
                    413, "body_too_large", f"the request body exceeds {limit:g} MB (--max-body-mb)"
                )
                await response(scope, receive, send_with_id)
                return
            await self.app(scope, replay, send_with_id)
        finally:
            self._record(scope, state, scope["method"], status[0], time.perf_counter() - started)

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive | None:
        """The whole body (at most ``max_body`` bytes) behind a replaying ``receive``; None
        when it is larger (told by Content-Length, or counted while streaming)."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_body:
                    return None
            except ValueError:
                return None
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return None
            if not message.get("more_body", False):
                break
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return replay

    def _record(
        self, scope: Scope, state: dict[str, Any], method: str, status: int, seconds: float
    ) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        model, version = str(state.get("model", "")), str(state.get("version", ""))
        m = self.metrics
        m.requests.labels(endpoint, method, str(status), model, version).inc()
        m.latency.labels(endpoint, model, version).observe(seconds)
        if status >= 400:
            code = str(state.get("error_code") or status)
            m.errors.labels(endpoint, code, model, version).inc()


def _install_error_handlers(app: FastAPI) -> None:
    def remember(request: Request, code: str) -> None:
        request.state.error_code = code

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        remember(request, exc.code)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        remember(request, "invalid_request")
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        remember(request, code)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint {request.url.path} (see /docs)"
        return _error(exc.status_code, code, message, dict(exc.headers or {}))

    @app.exception_handler(VisionflowError)
    async def model_error(request: Request, exc: VisionflowError) -> JSONResponse:
        remember(request, "model_unavailable")
        log.error("model error: %s", exc)
        return _error(503, "model_unavailable", str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "?")
        remember(request, "internal_error")
        log.error("request %s failed", request_id, exc_info=exc)
        return _error(
            500,
            "internal_error",
            f"unexpected server error (request id {request_id}; see the server log)",
        )


def create_app(
    settings: ServeSettings | None = None,
    *,
    source: ModelSource | None = None,
    selector: VersionSelector | None = None,
    hooks: Sequence[PredictionHook] = (),
    keys: KeyStore | None = None,
) -> FastAPI:
    """A FastAPI app serving ``source`` (default: the bundle or registry in ``settings``).

    Args:
        settings: Server settings (defaults if None).
        source: Where the models come from (a :class:`~visionflow.serve.runtime.ModelSource`).
        selector: Picks the version per request (rollouts plug in here).
        hooks: Called after each answered prediction (drift, feedback, shadow traffic).
        keys: API keys (default: read from ``settings.api_keys``; none = open).
    """
    settings = settings or ServeSettings()
    source = source or source_from_settings(settings)
    keys = keys if keys is not None else KeyStore.from_file(settings.api_keys)
    metrics = ServeMetrics()
    rollout = RolloutManager(settings.rollout_file).load()  # policies kept across restarts
    rollout.bind(source, metrics, timeout_s=settings.timeout_s)

    monitor = None
    if settings.drift:  # a hook after each answer; tests run lazily (reports, /metrics)
        monitor = DriftMonitor(
            source, window=settings.drift_window, min_samples=settings.drift_min_samples,
            alpha=settings.drift_alpha, interval_s=settings.drift_interval_s,
        )  # fmt: skip
        metrics.registry.register(monitor.collector())
    store = FeedbackStore(settings.feedback) if settings.feedback is not None else None
    cache = None
    if store is not None and settings.feedback_cache_requests and settings.feedback_cache_mb:
        cache = RequestCache(
            max_requests=settings.feedback_cache_requests,
            max_bytes=int(settings.feedback_cache_mb * 2**20),
            max_age_s=settings.feedback_cache_s,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threads
        if not keys.enabled and not settings.loopback:
            log.warning(
                "serving on %s without API keys: anyone who can reach it may use it "
                "(give --api-keys FILE)",
                settings.host,
            )
        source.bind(settings, metrics)

        def start() -> None:
            with contextlib.suppress(Exception):  # kept in source.error, told by /readyz
                source.start()

        loader = threading.Thread(target=start, name="visionflow-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            await run_in_threadpool(loader.join, 60)
            await run_in_threadpool(rollout.stop)
            await run_in_threadpool(source.stop)

    app = FastAPI(
        title="visionflow",
        version=__version__,
        description="Image classification and object detection with visionflow bundles: a v1 "
        "REST API and the KServe Open Inference Protocol (v2).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.source = source
    app.state.metrics = metrics
    app.state.selector = RolloutSelector(rollout, selector or VersionSelector())
    app.state.hooks = [*hooks, rollout]
    app.state.rollout = rollout
    app.state.keys = keys
    app.state.monitor, app.state.feedback, app.state.request_cache = monitor, store, cache
    if monitor is not None:
        app.state.hooks.append(monitor)
    _install_error_handlers(app)
    for module in (health, metrics_routes, models, v2, admin, rollout_routes):
        app.include_router(module.router)
    app.include_router(drift.router)
    app.include_router(feedback.router)
    if cache is not None:  # keeps recent predict requests for feedback by request id
        app.add_middleware(RequestCapture, cache=cache)
    if settings.cors:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors),
            allow_methods=["GET", "POST"],
            # x-client-id: the rollouts' default sticky header
            allow_headers=[
                "authorization",
                "x-api-key",
                "content-type",
                "x-request-id",
                "x-client-id",
            ],
            expose_headers=["x-request-id", "x-model-version"],
        )
    app.add_middleware(RolloutObserver, manager=rollout)  # inside the gateway
    app.add_middleware(_Gateway, max_body=settings.max_body_bytes, metrics=metrics)
    return app
