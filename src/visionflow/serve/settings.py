"""Server settings: one pydantic model, filled by ``visionflow serve`` flags or by a test."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from visionflow._cpu import cpu_count

__all__ = ["API_KEYS_ENV", "ServeSettings", "default_ort_threads"]

#: Environment variable naming the API-key file when ``--api-keys`` is not given.
API_KEYS_ENV = "VISIONFLOW_API_KEYS"


def default_ort_threads() -> int:
    """Intra-op threads of each ONNX Runtime session: half the CPUs (at least one).

    Why half: the other half decodes and resizes uploads in the request threads while a batch
    runs, and a batch is itself the parallelism (one batch per model version at a time). Giving
    ONNX Runtime every core makes its spinning workers fight the decoders; on two cores this is
    one thread, which also means no spinning pool at all.
    """
    return max(1, cpu_count() // 2)


class ServeSettings(BaseModel):
    """Everything the server needs besides its models (which come from a model source).

    Attributes:
        host: Interface to bind (``127.0.0.1``: this machine only).
        port: TCP port.
        threads: Request threads (decode + preprocess run there); default 2 per CPU, at least 4.
        ort_threads: ONNX Runtime intra-op threads per model version (see
            :func:`default_ort_threads`).
        max_batch: Most images in one ONNX Runtime call.
        max_wait_ms: Longest a queued image waits for a batch to fill.
        queue: Images that may wait per model version; beyond that requests get 503.
        max_images: Most images in one request (413 beyond).
        max_body_mb: Largest request body (413 beyond).
        max_pixels: Largest ``width * height`` decoded per image (413 beyond).
        timeout_s: Per-request deadline, decode to answer (504 beyond).
        topk: Alternatives per prediction when the request does not say.
        api_keys: File of ``scope:sha256`` lines; none means the API is open.
        cors: Allowed CORS origins (none: CORS headers are never sent).
        poll_s: How often a registry source checks for new versions and alias moves.
        warmup: Run one dummy batch per model version before it serves.
        drift: Watch live traffic for drift from each bundle's reference statistics
            (:mod:`visionflow.serve.monitor`): ``drift_window`` recent images per version,
            an alert from ``drift_min_samples`` images when a Bonferroni-adjusted p-value falls
            below ``drift_alpha``; reports recomputed at most every ``drift_interval_s``.
        feedback: Feedback store folder (:mod:`visionflow.serve.feedback`); none: ``POST
            /v1/feedback`` is off. Recent predict requests are kept for feedback by request id
            (at most ``feedback_cache_requests``, ``feedback_cache_mb``, ``feedback_cache_s``);
            ``feedback_new_labels`` accepts labels that are not classes of the model.
        bundle: Serve this one bundle (as ``name``, default: the bundle's own name)...
        registry: ...or every model of this registry (``db``: its database URL, if not the
            default one under the registry root).
        state_dir: Folder for state that outlives the process (rollout policies:
            ``rollout.json``); default: the registry folder when serving a registry, else
            none (policies are kept in memory only).
    """

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    threads: int = Field(default_factory=lambda: max(4, 2 * cpu_count()), ge=1, le=1024)
    ort_threads: int = Field(default_factory=default_ort_threads, ge=1, le=256)
    max_batch: int = Field(default=16, ge=1, le=4096)
    max_wait_ms: float = Field(default=5.0, ge=0, le=10_000)
    queue: int = Field(default=256, ge=1, le=1_000_000)
    max_images: int = Field(default=64, ge=1, le=10_000)
    max_body_mb: float = Field(default=32.0, gt=0, le=4096)
    max_pixels: int = Field(default=40_000_000, ge=1)
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    topk: int = Field(default=3, ge=1, le=1000)
    api_keys: Path | None = None
    cors: list[str] = Field(default_factory=list)
    poll_s: float = Field(default=3.0, gt=0, le=3600)
    warmup: bool = True
    drift: bool = True
    drift_window: int = Field(default=500, ge=10, le=100_000)
    drift_min_samples: int = Field(default=100, ge=2, le=100_000)
    drift_alpha: float = Field(default=0.01, gt=0, lt=1)
    drift_interval_s: float = Field(default=5.0, ge=0, le=3600)
    feedback: Path | None = None
    feedback_cache_requests: int = Field(default=1000, ge=0, le=1_000_000)
    feedback_cache_mb: float = Field(default=256.0, ge=0, le=65536)
    feedback_cache_s: float = Field(default=3600.0, gt=0)
    feedback_new_labels: bool = False
    bundle: Path | None = None
    name: str | None = None
    registry: Path | None = None
    db: str | None = None
    state_dir: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if self.bundle is not None and self.registry is not None:
            raise ValueError("serve a bundle or a registry, not both")
        if self.api_keys is None and os.environ.get(API_KEYS_ENV):
            self.api_keys = Path(os.environ[API_KEYS_ENV])
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def rollout_file(self) -> Path | None:
        """Where rollout policies are kept (see ``state_dir``)."""
        folder = self.state_dir if self.state_dir is not None else self.registry
        return folder / "rollout.json" if folder is not None else None

    @property
    def loopback(self) -> bool:
        return self.host in {"127.0.0.1", "::1", "localhost"} or self.host.startswith("127.")
