"""Rollouts: A/B splits, canaries that roll themselves back, shadow traffic.

One :class:`RolloutPolicy` per served model says how requests that do not name a version are
shared between versions:

- ``none``: the ``production`` alias answers (the server's default).
- ``split``: ``{version_or_alias: percent}``, sticky per client: the client key header
  (``x-client-id`` by default) is hashed with the model name into a bucket 0-9999, so a client
  keeps its version while the split is unchanged (and when a share grows, only the clients in
  the moved buckets change side). Requests without the header get a random bucket.
- ``canary``: ``percent`` of the traffic (same sticky buckets) goes to ``candidate``; once the
  candidate has answered ``min_requests`` requests within the last ``window_s`` seconds, its
  server error rate (5xx) and p95 latency are judged after each of its requests, and passing a
  threshold sends all traffic back to production at once. The policy then says
  ``rolled_back`` with the reason (registry aliases are left as they are: a person decides).
- ``shadow``: production answers every request; after the response is sent, a copy of the
  pixels production saw goes into a bounded queue (full: dropped and counted, never slowing a
  client) that one worker thread feeds to ``candidate``. Its answers are discarded; the share
  of images whose top-1 label agrees with production's, and its latency, are measured. For a
  detector the copy is the decoded images and production's threshold, and an image's
  agreement is the share of objects both versions found (same label, IoU at least 0.5: see
  :func:`visionflow.serve._detect.agreement`), so ``agreement`` is its mean over images.

Every mode works for detectors as for classifiers (the canary judges status codes and latency
only); a policy mixing a classifier and a detector of one model is refused (422), since its
clients would get answers of two shapes.

Why selection is a pure function of an immutable policy: a policy change is one reference
swap, so a request in flight keeps the version it was given (and its lease on it), and the next
request already sees the new policy; nothing restarts and nothing in flight fails.

Policies are kept in ``rollout.json`` (written atomically: temporary file, fsync, rename) in
the server's state folder, so a restart keeps them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import random
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visionflow.errors import ConfigError
from visionflow.serve._detect import agreement as detection_agreement
from visionflow.serve._errors import ServeError
from visionflow.serve.metrics import ServeMetrics
from visionflow.serve.runtime import (
    DEFAULT_ALIAS,
    DetectionRunner,
    ModelEntry,
    ModelSource,
    PredictContext,
    PredictionEvent,
    PredictionHook,
    QueueFull,
    VersionSelector,
)

__all__ = [
    "BUCKETS",
    "ROLLOUT_FILE",
    "CanaryPolicy",
    "RolloutManager",
    "RolloutObserver",
    "RolloutPolicy",
    "RolloutSelector",
    "RolloutState",
    "ShadowPolicy",
    "bucket",
]

log = logging.getLogger("visionflow.serve")

#: Sticky buckets: a client's share is decided in units of 0.01 %.
BUCKETS = 10_000
#: The file, in the state folder, that keeps the policies.
ROLLOUT_FILE = "rollout.json"
#: Shadow copies that may wait for the candidate; more are dropped.
SHADOW_QUEUE = 64
#: Requests remembered per version for the status and the canary's judgement.
_KEEP = 20_000
#: Events (changes, rollbacks, promotions) kept per model.
_EVENTS = 50
_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_FORMAT = "visionflow-rollout/1"


# ------------------------------------------------------------------------------ policies
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class CanaryPolicy(_Strict):
    """A candidate on a small share of traffic, rolled back when it misbehaves."""

    candidate: str = Field(min_length=1, description="Version number or alias on trial")
    production: str = Field(default=DEFAULT_ALIAS, min_length=1)
    percent: float = Field(default=5.0, gt=0, le=100, description="Share of traffic, in %")
    max_error_rate: float = Field(default=0.05, ge=0, le=1, description="Server errors / requests")
    max_p95_ms: float | None = Field(default=None, gt=0, description="p95 latency limit, ms")
    min_requests: int = Field(default=20, ge=1, le=_KEEP, description="Requests before judging")
    window_s: float = Field(default=300.0, gt=0, le=86_400, description="Judged period, s")


class ShadowPolicy(_Strict):
    """A candidate that sees copies of production's traffic; its answers are discarded."""

    candidate: str = Field(min_length=1, description="Version number or alias shadowing")
    production: str = Field(default=DEFAULT_ALIAS, min_length=1)


class RolloutPolicy(_Strict):
    """How a model's traffic is shared between its versions (what ``PUT .../rollout`` takes)."""

    mode: Literal["none", "split", "canary", "shadow"] = "none"
    split: dict[str, float] | None = Field(
        default=None, description="{version_or_alias: percent}, summing to 100 (mode split)"
    )
    sticky_header: str = Field(
        default="x-client-id", description="Header whose value keeps a client on one version"
    )
    canary: CanaryPolicy | None = None
    shadow: ShadowPolicy | None = None

    @field_validator("sticky_header")
    @classmethod
    def _header(cls, value: str) -> str:
        value = value.strip().lower()
        if not _HEADER.match(value):
            raise ValueError(f"{value!r} is not an HTTP header name")
        return value

    @field_validator("split")
    @classmethod
    def _split(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one version with its percent")
        for ref, percent in value.items():
            if not ref.strip():
                raise ValueError("an empty version name")
            if not 0 <= percent <= 100:
                raise ValueError(f"{ref}: {percent:g} % is not between 0 and 100")
            if abs(percent * 100 - round(percent * 100)) > 1e-6:
                raise ValueError(f"{ref}: {percent:g} % is finer than 0.01 %")
        total = sum(round(p * 100) for p in value.values())
        if total != BUCKETS:
            raise ValueError(f"the percentages sum to {total / 100:g}, not 100")
        return value

    @model_validator(mode="after")
    def _sections(self) -> RolloutPolicy:
        needed = {"split": self.split, "canary": self.canary, "shadow": self.shadow}
        if self.mode in needed and needed[self.mode] is None:
            raise ValueError(f"{self.mode}: required when mode is {self.mode!r}")
        return self

    def targets(self) -> dict[str, str]:
        """The versions this policy sends traffic to, by the field that names them."""
        if self.mode == "split" and self.split:
            return {f"split.{ref}": ref for ref in self.split}
        if self.mode == "canary" and self.canary:
            return {
                "canary.candidate": self.canary.candidate,
                "canary.production": self.canary.production,
            }
        if self.mode == "shadow" and self.shadow:
            return {
                "shadow.candidate": self.shadow.candidate,
                "shadow.production": self.shadow.production,
            }
        return {}


class RolloutState(BaseModel):
    """A model's policy as the server holds it: the policy, whether it still applies
    (``active``; ``rolled_back`` by a canary's judgement; ``promoted`` when its candidate was
    promoted; ``off`` for mode none), why, and its recent events."""

    model_config = ConfigDict(extra="forbid")

    policy: RolloutPolicy = Field(default_factory=RolloutPolicy)
    status: Literal["active", "rolled_back", "promoted", "off"] = "off"
    reason: str | None = None
    changed_at: float = Field(default_factory=time.time)
    events: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def applies(self) -> bool:
        return self.status == "active" and self.policy.mode != "none"


def bucket(key: str, model: str) -> int:
    """The sticky bucket (0-9999) of a client key for one model."""
    digest = hashlib.sha256(f"{model}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


# ------------------------------------------------------------------------------ statistics
@dataclass
class _Window:
    """Recent requests of one version: (monotonic time, server error?, seconds)."""

    items: deque[tuple[float, bool, float]] = field(default_factory=lambda: deque(maxlen=_KEEP))
    requests: int = 0
    errors: int = 0

    def add(self, error: bool, seconds: float) -> None:
        self.items.append((time.monotonic(), error, seconds))
        self.requests += 1
        self.errors += int(error)

    def recent(self, window_s: float) -> tuple[int, int, list[float]]:
        since = time.monotonic() - window_s
        rows = []
        for row in reversed(self.items):  # newest first: stop at the window's start
            if row[0] < since:
                break
            rows.append(row)
        return len(rows), sum(r[1] for r in rows), [r[2] for r in rows]


def _percentiles(seconds: list[float]) -> tuple[float | None, float | None]:
    if not seconds:
        return None, None
    p50, p95 = np.percentile(np.asarray(seconds) * 1000.0, [50, 95])
    return round(float(p50), 3), round(float(p95), 3)


@dataclass
class _Shadow:
    sent: int = 0
    dropped: int = 0
    failed: int = 0
    images: int = 0
    agreed: float = 0.0  # images agreeing (a detector's: the sum of per-image agreement)
    latency: deque[float] = field(default_factory=lambda: deque(maxlen=_KEEP))

    def summary(self) -> dict[str, Any]:
        p50, p95 = _percentiles(list(self.latency))
        return {
            "sent": self.sent,
            "dropped": self.dropped,
            "failed": self.failed,
            "compared_images": self.images,
            "agreement": round(self.agreed / self.images, 6) if self.images else None,
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
        }


@dataclass
class _ModelStats:
    versions: dict[int, _Window] = field(default_factory=dict)
    shadow: _Shadow = field(default_factory=_Shadow)


# ------------------------------------------------------------------------------ manager
class RolloutManager(PredictionHook):
    """Holds every model's rollout, picks versions for :class:`RolloutSelector`, judges
    canaries from what :class:`RolloutObserver` sees, and feeds shadow candidates (as a
    prediction hook).

    Args:
        path: The JSON file keeping the policies (None: kept in memory only).
        shadow_queue: Shadow copies that may wait; more are dropped.
    """

    def __init__(self, path: str | Path | None = None, *, shadow_queue: int = SHADOW_QUEUE) -> None:
        self.path = Path(path) if path is not None else None
        self.source: ModelSource | None = None
        self._states: dict[str, RolloutState] = {}
        self._stats: dict[str, _ModelStats] = {}
        self._lock = threading.RLock()
        self._save_lock = threading.Lock()
        self._shadow_queue: queue.Queue[tuple[PredictionEvent, int] | None] = queue.Queue(
            maxsize=shadow_queue
        )
        self._worker: threading.Thread | None = None
        self._timeout_s = 30.0
        self._share: Gauge | None = None
        self._agreement: Gauge | None = None
        self._rollbacks: Counter | None = None

    # ---- lifecycle
    def load(self) -> RolloutManager:
        """Read the policies kept in :attr:`path` (none there yet: nothing to read)."""
        if self.path is None or not self.path.exists():
            return self
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
                raise ValueError(f"not a {_FORMAT} file")
            states = {str(k): RolloutState.model_validate(v) for k, v in raw["models"].items()}
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
            raise ConfigError(
                f"{self.path}: cannot read the rollout policies ({exc}); fix or remove the file "
                "(every model then serves its production version)"
            ) from None
        self._states = states
        return self

    def bind(self, source: ModelSource, metrics: ServeMetrics, *, timeout_s: float = 30.0) -> None:
        """Attach the app's model source and metrics registry (once, at app creation)."""
        self.source = source
        self._timeout_s = timeout_s
        r = metrics.registry
        self._share = Gauge(
            "visionflow_rollout_traffic_share",
            "Share of a model's requests answered by a version since its policy was set.",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self._agreement = Gauge(
            "visionflow_shadow_agreement",
            "Share of shadowed images whose top-1 label matches production's (detectors: "
            "mean share of objects both versions found).",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self._rollbacks = Counter(
            "visionflow_canary_rollbacks", "Canaries rolled back automatically.",
            ["model", "version"], registry=r,
        )  # fmt: skip

    def stop(self) -> None:
        """End the shadow worker (the copies still queued are dropped)."""
        worker = self._worker
        if worker is None:
            return
        with contextlib.suppress(queue.Full):
            while True:
                try:
                    self._shadow_queue.get_nowait()
                except queue.Empty:
                    break
            self._shadow_queue.put_nowait(None)
        worker.join(timeout=10)
        self._worker = None

    # ---- policies
    def state(self, name: str) -> RolloutState:
        return self._states.get(name) or RolloutState()

    def states(self) -> dict[str, RolloutState]:
        return dict(self._states)

    def set_policy(self, name: str, policy: RolloutPolicy, *, why: str = "set") -> RolloutState:
        """Replace a model's policy (statistics start afresh) and keep it on disk."""
        with self._lock:
            before = self.state(name)
            status: Literal["active", "off"] = "off" if policy.mode == "none" else "active"
            event = {"at": time.time(), "event": why, "mode": policy.mode}
            state = RolloutState(
                policy=policy,
                status=status,
                reason=None,
                events=[*before.events, event][-_EVENTS:],
            )
            self._states[name] = state
            self._stats[name] = _ModelStats()
            self._clear_gauges(name)
        self.save()
        log.info("rollout of %s: %s", name, policy.model_dump_json(exclude_none=True))
        return state

    def end(
        self, name: str, status: Literal["rolled_back", "promoted"], reason: str
    ) -> RolloutState:
        """Stop applying a model's policy (it is kept, marked ``status`` with ``reason``)."""
        with self._lock:
            before = self.state(name)
            event = {"at": time.time(), "event": status, "reason": reason}
            state = before.model_copy(
                update={
                    "status": status,
                    "reason": reason,
                    "changed_at": time.time(),
                    "events": [*before.events, event][-_EVENTS:],
                }
            )
            self._states[name] = state
        return state

    def save(self) -> None:
        """Write every policy atomically (temporary file, fsync, rename, fsync the folder)."""
        if self.path is None:
            return
        with self._save_lock:
            data = {
                "format": _FORMAT,
                "models": {k: v.model_dump(mode="json") for k, v in sorted(self._states.items())},
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".rollout-", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(data, fh, indent=2)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            with contextlib.suppress(OSError):  # not every platform can fsync a folder
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)

    def check(self, name: str, policy: RolloutPolicy, entry: ModelEntry) -> dict[str, int]:
        """The versions ``policy`` names, resolved in ``entry``; 422 naming the field of one
        that does not exist (or of a candidate that is production itself)."""
        resolved: dict[str, int] = {}
        for where, ref in policy.targets().items():
            try:
                resolved[where] = entry.resolve(ref)
            except ServeError as exc:
                raise ServeError(422, "invalid_policy", f"{where}: {exc.message}") from None
        for section in ("canary", "shadow"):
            cand, prod = resolved.get(f"{section}.candidate"), resolved.get(f"{section}.production")
            if cand is not None and cand == prod:
                raise ServeError(
                    422,
                    "invalid_policy",
                    f"{section}.candidate: version {cand} is the production version itself",
                )
        return resolved

    # ---- selection (event loop: no blocking)
    def select(self, ctx: PredictContext, entry: ModelEntry) -> str | int | None:
        """The version a request without an explicit one goes to (None: no rollout applies)."""
        state = self._states.get(ctx.name)
        if state is None or ctx.requested is not None or not state.applies:
            return None
        policy = state.policy
        if policy.mode == "shadow" and policy.shadow:
            return self._usable(entry, policy.shadow.production)
        key = ctx.headers.get(policy.sticky_header)
        slot = bucket(key, ctx.name) if key else random.randrange(BUCKETS)
        if policy.mode == "split" and policy.split:
            low = 0
            for ref, percent in policy.split.items():
                low += round(percent * 100)
                if slot < low:
                    return self._usable(entry, ref)
            return None
        if policy.mode == "canary" and policy.canary:
            canary = policy.canary
            if slot < round(canary.percent * 100):
                return self._usable(entry, canary.candidate, fallback=canary.production)
            return self._usable(entry, canary.production)
        return None

    @staticmethod
    def _usable(entry: ModelEntry, ref: str, *, fallback: str | None = None) -> int | None:
        """``ref`` resolved, or (gone since the policy was set) the fallback: a rollout that
        names a deleted version must not turn requests into 404s."""
        for candidate in (ref, fallback):
            if candidate is None:
                continue
            try:
                return entry.resolve(candidate)
            except ServeError:
                log.warning("rollout of %s names %r, which is gone", entry.name, candidate)
        return None

    def _resolve(self, name: str, ref: str) -> int | None:
        entry = self.source.catalog().get(name) if self.source is not None else None
        if entry is None:
            return None
        with contextlib.suppress(ServeError):
            return entry.resolve(ref)
        return None

    # ---- observation (canary judgement)
    def observe(self, name: str, version: int, status: int, seconds: float) -> bool:
        """Count one answered request; True when it made a canary roll back."""
        with self._lock:
            stats = self._stats.setdefault(name, _ModelStats())
            window = stats.versions.setdefault(version, _Window())
            window.add(status >= 500, seconds)
            self._update_share(name, stats)
            state = self._states.get(name)
            if state is None or not state.applies or state.policy.mode != "canary":
                return False
            canary = state.policy.canary
            assert canary is not None  # the validator requires it for mode canary
            if version != self._resolve(name, canary.candidate):
                return False
            reason = self._verdict(canary, window)
            if reason is None:
                return False
            self.end(name, "rolled_back", reason)
        log.warning("canary of %s version %s rolled back: %s", name, version, reason)
        if self._rollbacks is not None:
            self._rollbacks.labels(name, str(version)).inc()
        return True

    @staticmethod
    def _verdict(canary: CanaryPolicy, window: _Window) -> str | None:
        """Why the candidate fails (None: it passes, or too few requests to say)."""
        n, errors, seconds = window.recent(canary.window_s)
        if n < canary.min_requests:
            return None
        rate = errors / n
        span = f"over its last {n} requests ({canary.window_s:g} s window)"
        if rate > canary.max_error_rate:
            return f"error rate {rate:.3f} > {canary.max_error_rate:g} {span}"
        if canary.max_p95_ms is not None:
            _, p95 = _percentiles(seconds)
            if p95 is not None and p95 > canary.max_p95_ms:
                return f"p95 latency {p95:.1f} ms > {canary.max_p95_ms:g} ms {span}"
        return None

    def _update_share(self, name: str, stats: _ModelStats) -> None:
        if self._share is None:
            return
        total = sum(w.requests for w in stats.versions.values()) or 1
        for v, w in stats.versions.items():
            self._share.labels(name, str(v)).set(w.requests / total)

    def _clear_gauges(self, name: str) -> None:
        for gauge in (self._share, self._agreement):
            if gauge is None:
                continue
            for labels in list(getattr(gauge, "_metrics", {})):
                if labels and labels[0] == name:
                    with contextlib.suppress(KeyError):
                        gauge.remove(*labels)

    # ---- shadow (prediction hook)
    def after_predict(self, event: PredictionEvent) -> None:
        state = self._states.get(event.model)
        if state is None or not state.applies or state.policy.mode != "shadow":
            return
        shadow = state.policy.shadow
        assert shadow is not None
        candidate = self._resolve(event.model, shadow.candidate)
        production = self._resolve(event.model, shadow.production)
        if candidate is None or event.version != production or candidate == production:
            return
        self._ensure_worker()
        try:
            self._shadow_queue.put_nowait((event, candidate))
            sent = True
        except queue.Full:  # the candidate is behind: drop the copy, never wait
            sent = False
        with self._lock:
            stats = self._stats.setdefault(event.model, _ModelStats()).shadow
            stats.sent += int(sent)
            stats.dropped += int(not sent)

    def _ensure_worker(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            return
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._shadow_loop, name="visionflow-shadow", daemon=True
                )
                self._worker.start()

    def _shadow_loop(self) -> None:
        while True:
            item = self._shadow_queue.get()
            if item is None:
                return
            event, version = item
            try:
                self._shadow_one(event, version)
            except Exception:
                log.exception("shadow copy to %s version %s failed", event.model, version)
                with self._lock:
                    self._stats.setdefault(event.model, _ModelStats()).shadow.failed += 1

    def _shadow_one(self, event: PredictionEvent, version: int) -> None:
        source = self.source
        if source is None:
            return
        stats = self._stats.setdefault(event.model, _ModelStats()).shadow
        started = time.perf_counter()
        source.ensure_loaded(event.model, version)
        lm = source.acquire(event.model, version)
        try:
            if lm.task != event.task:
                raise ValueError(
                    f"version {version} is a {lm.task} model but production answered a "
                    f"{event.task} request; the shadow compares versions of one task"
                )
            batcher = lm.batcher
            try:
                if isinstance(batcher, DetectionRunner):
                    found = batcher.submit(event.images, threshold=event.threshold)
                else:
                    future = batcher.submit(event.pixels)
            except QueueFull:
                with self._lock:  # the candidate is saturated: never queue behind it
                    stats.dropped += 1
                return
            if isinstance(batcher, DetectionRunner):
                answers = found.result(timeout=self._timeout_s)
                scores = [
                    detection_agreement(ours, theirs)
                    for ours, theirs in zip(event.detections, answers, strict=True)
                ]
            else:
                result = future.result(timeout=self._timeout_s)
                classes = lm.classes
                labels = [classes[int(i)] for i in result.probabilities.argmax(axis=1)]
                scores = [float(a == b) for a, b in zip(labels, event.labels, strict=False)]
        finally:
            lm.release()
        with self._lock:
            stats.latency.append(time.perf_counter() - started)
            stats.images += len(scores)
            stats.agreed += sum(scores)
            agreement = stats.agreed / stats.images if stats.images else None
        if self._agreement is not None and agreement is not None:
            self._agreement.labels(event.model, str(version)).set(agreement)

    # ---- status
    def status(self, name: str, entry: ModelEntry) -> dict[str, Any]:
        """Per-version counts, error rates and latency, shadow agreement, canary verdict."""
        state = self.state(name)
        policy = state.policy
        window_s = policy.canary.window_s if policy.canary and policy.mode == "canary" else 300.0
        with self._lock:
            stats = self._stats.get(name) or _ModelStats()
            total = sum(w.requests for w in stats.versions.values())
            versions = []
            for v, w in sorted(stats.versions.items()):
                n, errors, seconds = w.recent(window_s)
                p50, p95 = _percentiles(seconds)
                versions.append(
                    {
                        "version": v,
                        "requests": w.requests,
                        "errors": w.errors,
                        "share": round(w.requests / total, 6) if total else 0.0,
                        "window": {
                            "seconds": window_s,
                            "requests": n,
                            "errors": errors,
                            "error_rate": round(errors / n, 6) if n else None,
                            "latency_p50_ms": p50,
                            "latency_p95_ms": p95,
                        },
                    }
                )
            shadow = stats.shadow.summary() if policy.mode == "shadow" else None
        out: dict[str, Any] = {
            "model": name,
            "mode": policy.mode,
            "status": state.status,
            "reason": state.reason,
            "aliases": dict(sorted(entry.aliases.items())),
            "requests": total,
            "versions": versions,
            "shadow": shadow,
            "canary": None,
        }
        if policy.mode == "canary" and policy.canary:
            out["canary"] = self._canary_status(name, policy.canary, stats, state)
        return out

    def _canary_status(
        self, name: str, canary: CanaryPolicy, stats: _ModelStats, state: RolloutState
    ) -> dict[str, Any]:
        version = self._resolve(name, canary.candidate)
        window = stats.versions.get(version) if version is not None else None
        n = window.recent(canary.window_s)[0] if window is not None else 0
        if state.status == "rolled_back":
            verdict = "rolled_back"
        elif state.status != "active":
            verdict = state.status
        elif n < canary.min_requests:
            verdict = "pending"
        else:
            verdict = "healthy"
        return {
            "candidate": canary.candidate,
            "candidate_version": version,
            "verdict": verdict,
            "judged_requests": n,
            "min_requests": canary.min_requests,
        }


class RolloutSelector(VersionSelector):
    """Asks the :class:`RolloutManager` first; where no rollout applies (or the client named a
    version), ``base`` decides."""

    def __init__(self, manager: RolloutManager, base: VersionSelector | None = None) -> None:
        self.manager = manager
        self.base = base or VersionSelector()

    def select(self, ctx: PredictContext, entry: ModelEntry) -> str | int:
        chosen = self.manager.select(ctx, entry)
        return chosen if chosen is not None else self.base.select(ctx, entry)


class RolloutObserver:
    """ASGI middleware (inside the gateway) telling the manager how each prediction went:
    status and time per answering version, including requests that end in an exception."""

    def __init__(self, app: ASGIApp, *, manager: RolloutManager) -> None:
        self.app = app
        self.manager = manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            state: Mapping[str, Any] = scope.get("state") or {}
            version = state.get("version")
            if state.get("model") and version not in (None, ""):
                rolled = self.manager.observe(
                    str(state["model"]), int(version), status[0], time.perf_counter() - started
                )
                if rolled:  # keep the verdict on disk, off the event loop
                    threading.Thread(target=self.manager.save, daemon=True).start()
