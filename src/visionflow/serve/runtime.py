"""Models behind the server: sources of versions, one loaded model per version, dynamic batching.

How a request flows (see :mod:`visionflow.serve.routes`):

1. The event loop picks the version (a :class:`VersionSelector`; by default the one the client
   named, else the ``production`` alias) and takes a *lease* on its :class:`LoadedModel`.
2. A request thread (Starlette's threadpool, ``ServeSettings.threads``) decodes and resizes the
   uploads into a ``uint8`` batch with the model's own preprocessing.
3. The batch goes into the version's :class:`Batcher`: a bounded queue (``queue`` images; full
   means 503) and one worker thread that gathers up to ``max_batch`` images, waiting at most
   ``max_wait_ms`` for the first one's company, runs ONNX Runtime once (it releases the GIL, so
   decoding goes on meanwhile) and resolves every request's future. A detector's images keep
   their sizes, so its :class:`DetectionRunner` (same queue limits) runs them one by one.
4. The lease is returned. A version replaced by a registry change (new version, alias move) is
   *retired*: it leaves the table at once, but its batcher keeps serving until the last lease is
   returned, so no request in flight fails because of a deployment.

Extension points for rollout, A/B tests, canaries, shadowing, drift and feedback: a
:class:`VersionSelector` is asked per request which version answers, and every
:class:`PredictionHook` sees each answered request (probabilities, features and pixels) after
the response is sent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

import numpy as np
from PIL import Image

from visionflow.export.runtime import softmax
from visionflow.prediction import Detections
from visionflow.serve._errors import ServeError, unknown_model, unknown_version
from visionflow.serve.metrics import ServeMetrics
from visionflow.serve.settings import ServeSettings

__all__ = [
    "DEFAULT_ALIAS",
    "BatchResult",
    "Batcher",
    "BundleSource",
    "DetectionRunner",
    "LoadedModel",
    "ModelEntry",
    "ModelSource",
    "PredictContext",
    "PredictionEvent",
    "PredictionHook",
    "QueueFull",
    "RegistrySource",
    "StaticSource",
    "VersionInfo",
    "VersionSelector",
    "is_detector",
]

log = logging.getLogger("visionflow.serve")

#: The alias a request without a version is answered by.
DEFAULT_ALIAS = "production"


# ------------------------------------------------------------------------------ batching
class QueueFull(Exception):
    """The version's queue holds ``capacity`` images already."""


@dataclass
class BatchResult:
    """One request's share of a batch: probabilities ``(n, classes)`` and features ``(n, d)``."""

    probabilities: np.ndarray
    features: np.ndarray


@dataclass
class _Item:
    pixels: np.ndarray
    future: Future[BatchResult]
    enqueued: float

    @property
    def size(self) -> int:
        return len(self.pixels)


@dataclass
class _DetectItem:
    images: list[Image.Image]
    threshold: float | None
    future: Future[list[Detections]]
    enqueued: float

    @property
    def size(self) -> int:
        return len(self.images)


_ItemT = TypeVar("_ItemT", _Item, _DetectItem)


class _Worker(Generic[_ItemT]):
    """A bounded queue of requests (counted in images) in front of one model, and the one
    thread that works it: what :class:`Batcher` and :class:`DetectionRunner` share.

    ``capacity`` counts images; a request that would overflow it is refused with
    :class:`QueueFull` (a request larger than the whole queue is let in only when the queue is
    empty, so it cannot starve). Subclasses say how work is taken (:meth:`_take`) and done
    (:meth:`_run`).
    """

    _thread_prefix = "visionflow-worker"

    def __init__(
        self,
        model: Any,
        *,
        capacity: int,
        name: str = "model",
        on_batch: Callable[[int, float], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model
        self.capacity = capacity
        self.name = name
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._items: deque[_ItemT] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        return self._queued

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._loop, name=f"{self._thread_prefix}-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def close(self, *, wait: bool = False) -> None:
        """Stop taking requests; the queued ones are still answered, then the thread ends."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _admit(self, item: _ItemT) -> None:
        with self._cond:
            if self._closing:
                raise ServeError(503, "unavailable", f"{self.name} is shutting down")
            if self._queued and self._queued + item.size > self.capacity:
                raise QueueFull(f"{self.name}: {self._queued} images queued")
            self._items.append(item)
            self._queued += item.size
            self._cond.notify()
            depth = self._queued
        if self._on_depth:
            self._on_depth(depth)

    def _pop(self) -> _ItemT | None:
        """The next request still wanted (None: its request gave up); the lock is held."""
        item = self._items.popleft()
        self._queued -= item.size
        return item if item.future.set_running_or_notify_cancel() else None

    def _take(self) -> list[_ItemT] | None:  # pragma: no cover - interface
        raise NotImplementedError

    def _run(self, batch: list[_ItemT]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._run(batch)


class Batcher(_Worker[_Item]):
    """Dynamic batching in front of one classifier (anything with ``run(pixels) -> (logits,
    features)``).

    Requests are kept whole: a batch is as many queued requests as fit in ``max_batch`` images
    (a request larger than that runs alone, in chunks). Queue limits: see :class:`_Worker`.
    """

    _thread_prefix = "visionflow-batcher"

    def __init__(
        self,
        model: Any,
        *,
        max_batch: int,
        max_wait_s: float,
        capacity: int,
        name: str = "model",
        on_batch: Callable[[int, float], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(model, capacity=capacity, name=name, on_batch=on_batch, on_depth=on_depth)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s

    def submit(self, pixels: np.ndarray) -> Future[BatchResult]:
        """Queue a ``uint8`` batch; the future holds its probabilities and features."""
        future: Future[BatchResult] = Future()
        self._admit(_Item(pixels, future, time.monotonic()))
        return future

    def _take(self) -> list[_Item] | None:
        with self._cond:
            while not self._items:
                if self._closing:
                    return None
                self._cond.wait()
            deadline = self._items[0].enqueued + self.max_wait_s
            while self._queued < self.max_batch and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_Item] = []
            size = 0
            while self._items and (not batch or size + self._items[0].size <= self.max_batch):
                item = self._pop()
                if item is not None:
                    batch.append(item)
                    size += item.size
            depth = self._queued
        if self._on_depth:
            self._on_depth(depth)
        return batch

    def _run(self, batch: list[_Item]) -> None:
        try:
            pixels = np.concatenate([item.pixels for item in batch])
            start = time.perf_counter()
            probs, feats = [], []
            for lo in range(0, len(pixels), self.max_batch):
                logits, features = self.model.run(pixels[lo : lo + self.max_batch])
                probs.append(softmax(np.asarray(logits, np.float32)))
                feats.append(np.asarray(features, np.float32))
            if self._on_batch:
                self._on_batch(len(pixels), time.perf_counter() - start)
            all_probs, all_feats = np.concatenate(probs), np.concatenate(feats)
        except BaseException as exc:
            log.exception("inference failed in %s", self.name)
            for item in batch:
                item.future.set_exception(exc)
            return
        lo = 0
        for item in batch:
            hi = lo + item.size
            item.future.set_result(BatchResult(all_probs[lo:hi], all_feats[lo:hi]))
            lo = hi


class DetectionRunner(_Worker[_DetectItem]):
    """The queue in front of one detector (anything with ``task = "detect"`` and
    ``detect(images, score_threshold=...) -> list[Detections]``).

    Why not the :class:`Batcher`: detection images keep their own sizes (boxes are in each
    image's pixels and the graph takes one image of any size), so there is no fixed-size batch
    to gather. Requests are taken one at a time, in order, and each image runs alone; the queue
    limits, the 503 when full and the lease-driven retirement are the classifier's. One thread
    per version, as for the classifier: ONNX Runtime's intra-op threads are the parallelism,
    and the request threads keep decoding uploads meanwhile.
    """

    _thread_prefix = "visionflow-detector"

    def submit(
        self, images: Sequence[Image.Image], *, threshold: float | None = None
    ) -> Future[list[Detections]]:
        """Queue decoded RGB images; the future holds one :class:`Detections` per image, with
        the objects scoring at least ``threshold`` (None: the model's own threshold)."""
        future: Future[list[Detections]] = Future()
        self._admit(_DetectItem(list(images), threshold, future, time.monotonic()))
        return future

    def _take(self) -> list[_DetectItem] | None:
        with self._cond:
            while not self._items:
                if self._closing:
                    return None
                self._cond.wait()
            item = self._pop()
            depth = self._queued
        if self._on_depth:
            self._on_depth(depth)
        return [item] if item is not None else []

    def _run(self, batch: list[_DetectItem]) -> None:
        for item in batch:
            try:
                found: list[Detections] = []
                for image in item.images:
                    start = time.perf_counter()
                    found.extend(self.model.detect([image], score_threshold=item.threshold))
                    if self._on_batch:
                        self._on_batch(1, time.perf_counter() - start)
                if len(found) != len(item.images):
                    raise RuntimeError(
                        f"{self.name}: the detector answered {len(found)} results for "
                        f"{len(item.images)} images"
                    )
            except BaseException as exc:
                log.exception("detection failed in %s", self.name)
                item.future.set_exception(exc)
                continue
            item.future.set_result(found)


# ------------------------------------------------------------------------------ versions
@dataclass(frozen=True)
class VersionInfo:
    """What a source knows of one version before (and without) loading it."""

    name: str
    version: int
    aliases: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    created_at: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """A served model: its versions and where its aliases point."""

    name: str
    versions: Mapping[int, VersionInfo]
    aliases: Mapping[str, int]

    def resolve(self, ref: str | int | None) -> int:
        """The version number ``ref`` names (a number, an alias, or None: ``production``)."""
        ref = DEFAULT_ALIAS if ref is None or ref == "" else ref
        text = str(ref).strip()
        if text.lstrip("vV").isdigit():
            number = int(text.lstrip("vV"))
            if number in self.versions:
                return number
        elif text in self.aliases:
            return self.aliases[text]
        if text == DEFAULT_ALIAS and self.versions:
            raise ServeError(
                404,
                "unknown_version",
                f"model {self.name!r} has no {DEFAULT_ALIAS!r} version yet; ask for one of "
                f"versions {sorted(self.versions)} explicitly",
            )
        raise unknown_version(self.name, text, self.versions, self.aliases)


def is_detector(model: Any) -> bool:
    """Whether a loaded model detects objects (``task = "detect"``) rather than classifies."""
    return getattr(model, "task", None) == "detect"


class LoadedModel:
    """One version on ONNX Runtime with its queue (a :class:`Batcher` for a classifier, a
    :class:`DetectionRunner` for a detector), lent to requests by leases."""

    def __init__(self, info: VersionInfo, model: Any, batcher: Batcher | DetectionRunner) -> None:
        self.info = info
        self.model = model
        self.batcher = batcher
        self.leases = 0
        self.retired = False
        self.pinned = False  # loaded because an alias points here (else: asked for by number)
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> int:
        return self.info.version

    @property
    def classes(self) -> list[str]:
        return list(self.model.classes)

    @property
    def task(self) -> str:
        """``"detect"`` or ``"classify"``."""
        return "detect" if isinstance(self.batcher, DetectionRunner) else "classify"

    def acquire(self) -> LoadedModel:
        with self._lock:
            self.leases += 1
        return self

    def release(self) -> None:
        with self._lock:
            self.leases -= 1
            done = self.retired and self.leases == 0
        if done:
            self.batcher.close()

    def retire(self) -> None:
        with self._lock:
            self.retired = True
            done = self.leases == 0
        if done:
            self.batcher.close()


# ------------------------------------------------------------------------------ hooks
@dataclass(frozen=True)
class PredictContext:
    """What a :class:`VersionSelector` knows of a request."""

    name: str
    requested: str | None  # the version or alias the client asked for, if any
    request_id: str
    endpoint: str
    headers: Mapping[str, str]


class VersionSelector:
    """Picks the version that answers a request; rollouts, A/B tests and canaries subclass it.

    Contract: :meth:`select` runs on the event loop, must not block, and returns a version
    number or alias of ``entry`` (an unknown one answers 404). The default honours the
    client's choice, else ``production``.
    """

    def select(self, ctx: PredictContext, entry: ModelEntry) -> str | int:
        return ctx.requested if ctx.requested is not None else DEFAULT_ALIAS


@dataclass(frozen=True)
class PredictionEvent:
    """One answered request, as :class:`PredictionHook` sees it.

    For a detector (``task == "detect"``) the classifier's arrays (``probabilities``,
    ``features``, ``pixels``) are empty (``n`` rows of nothing: detection images keep their own
    sizes and there are no class probabilities); ``detections`` holds the answer per image,
    ``images`` the decoded RGB images the detector saw, ``threshold`` the score threshold it
    applied, and ``labels`` the strongest object's label per image (``""`` when none).
    """

    model: str
    version: int
    request_id: str
    endpoint: str
    classes: list[str]
    labels: list[str]
    probabilities: np.ndarray  # (n, classes)
    features: np.ndarray  # (n, feature_dim)
    pixels: np.ndarray  # (n, side, side, 3) uint8: what the model saw
    latency_s: float
    timestamp: float
    task: str = "classify"
    detections: Sequence[Detections] = ()
    images: Sequence[Image.Image] = ()
    threshold: float | None = None


class PredictionHook:
    """Sees every answered prediction after the response is sent (drift, feedback, shadow
    traffic). Runs in a request thread; an exception is logged and never reaches the client."""

    def after_predict(self, event: PredictionEvent) -> None:  # pragma: no cover - interface
        raise NotImplementedError


# ------------------------------------------------------------------------------ sources
class ModelSource:
    """Where served models come from; subclasses implement :meth:`scan` and :meth:`load`
    (and :meth:`revision` to be polled for changes).

    The app calls :meth:`bind` then :meth:`start` (blocking: loads and warms the aliased
    versions) in a background thread, and :meth:`stop` at shutdown.
    """

    def __init__(self) -> None:
        self.settings = ServeSettings()
        self.metrics: ServeMetrics | None = None
        self.ready = False
        self.error: str | None = None
        self._catalog: dict[str, ModelEntry] = {}
        self._loaded: dict[tuple[str, int], LoadedModel] = {}
        self._lock = threading.RLock()
        self._refresh_lock = threading.Lock()
        self._key_locks: dict[tuple[str, int], threading.Lock] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._revision: int | None = None

    # ---- to implement
    def scan(self) -> dict[str, ModelEntry]:
        """The models and versions there are now (nothing loaded)."""
        raise NotImplementedError

    def load(self, info: VersionInfo) -> Any:
        """Load one version: a classifier (``pixels``, ``run``, ``classes`` and ``meta``) or
        a detector (``task = "detect"``, ``detect``, ``classes``, ``meta`` and
        ``score_threshold``: see :class:`DetectionRunner`)."""
        raise NotImplementedError

    def revision(self) -> int | None:
        """A number that changes whenever :meth:`scan` would; None: never changes (no poll)."""
        return None

    # ---- lifecycle
    def bind(self, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.settings = settings
        self.metrics = metrics

    def start(self) -> None:
        """Load and warm every aliased version, then poll for changes (if the source can)."""
        try:
            self._revision = self.revision()
            self.refresh(force=True)
            self.ready = True
            log.info("models ready: %s", ", ".join(sorted(self._catalog)) or "none")
        except Exception as exc:
            self.error = str(exc)
            log.error("cannot load the models: %s", exc)
            raise
        if self._revision is not None:
            self._poller = threading.Thread(
                target=self._poll, name="visionflow-source-poll", daemon=True
            )
            self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=10)
        with self._lock:
            loaded = list(self._loaded.values())
            self._loaded.clear()
        for lm in loaded:
            lm.retire()
            lm.batcher.close(wait=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                revision = self.revision()
                if revision != self._revision:
                    self._revision = revision
                    self.refresh()
            except Exception:
                log.exception("model source refresh failed; serving the models already loaded")

    # ---- table
    def catalog(self) -> dict[str, ModelEntry]:
        return self._catalog

    def entry(self, name: str) -> ModelEntry:
        catalog = self._catalog
        if name not in catalog:
            if not self.ready:
                raise ServeError(
                    503,
                    "not_ready",
                    "models are still loading; retry shortly",
                    headers={"Retry-After": "1"},
                )
            raise unknown_model(name, catalog)
        return catalog[name]

    def loaded(self, name: str, version: int) -> LoadedModel | None:
        return self._loaded.get((name, version))

    def refresh(self, *, force: bool = False) -> bool:
        """Rescan; load and warm versions that gained an alias, then swap the table and retire
        versions that are gone or lost their alias. Returns whether anything changed."""
        with self._refresh_lock:
            catalog = self.scan()
            wanted = {(n, v) for n, e in catalog.items() for v in e.aliases.values()}
            fresh: dict[tuple[str, int], LoadedModel] = {}
            for key in sorted(wanted):
                if key not in self._loaded:
                    fresh[key] = self._load_warm(catalog[key[0]].versions[key[1]])
            with self._lock:
                changed = force or catalog != self._catalog or bool(fresh)
                self._catalog = catalog
                self._loaded.update(fresh)
                gone = []
                for key, lm in list(self._loaded.items()):
                    entry = catalog.get(key[0])
                    info = entry.versions.get(key[1]) if entry else None
                    if info is None or (lm.pinned and key not in wanted):
                        gone.append(self._loaded.pop(key))
                        continue
                    lm.info = info
                    lm.pinned = lm.pinned or key in wanted
            for lm in gone:
                log.info("retiring %s version %s", lm.name, lm.version)
                lm.retire()
                if self.metrics:
                    self.metrics.loaded.labels(lm.name, str(lm.version)).set(0)
            if fresh or gone:
                log.info("models now: %s", self.describe())
            return changed

    def describe(self) -> str:
        return "; ".join(
            f"{n} " + ", ".join(f"{a}=v{v}" for a, v in sorted(e.aliases.items()))
            for n, e in sorted(self._catalog.items())
        )

    @contextmanager
    def lease(self, name: str, version: int) -> Iterator[LoadedModel]:
        """Hold a version for the duration of a request (loading it first if it is not)."""
        lm = self.acquire(name, version)
        try:
            yield lm
        finally:
            lm.release()

    def acquire(self, name: str, version: int) -> LoadedModel:
        """A lease on a loaded version (503 if it is not loaded: see :meth:`ensure_loaded`
        for versions asked for by number). Give it back with ``release()``."""
        with self._lock:
            lm = self._loaded.get((name, version))
            if lm is None:
                raise ServeError(
                    503,
                    "not_loaded",
                    f"{name} version {version} is not loaded",
                    headers={"Retry-After": "1"},
                )
            return lm.acquire()

    def ensure_loaded(self, name: str, version: int) -> None:
        """Load a version asked for by number (not behind an alias); blocking, once."""
        key = (name, version)
        if key in self._loaded:
            return
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            if key in self._loaded:
                return
            entry = self.entry(name)
            if version not in entry.versions:
                raise unknown_version(name, str(version), entry.versions, entry.aliases)
            lm = self._load_warm(entry.versions[version])
            with self._lock:
                if self._catalog.get(name) is not None and version in self._catalog[name].versions:
                    self._loaded[key] = lm
                    return
            lm.retire()

    def _load_warm(self, info: VersionInfo) -> LoadedModel:
        started = time.perf_counter()
        model = self.load(info)
        label = (info.name, str(info.version))
        metrics = self.metrics
        detector = is_detector(model)
        if self.settings.warmup:
            if detector:
                model.detect([Image.new("RGB", (32, 32))])
            else:
                model.run(model.pixels([Image.new("RGB", (8, 8))]))

        def on_batch(n: int, seconds: float) -> None:
            if metrics:
                metrics.batch_size.labels(*label).observe(n)
                metrics.inference.labels(*label).observe(seconds)

        def on_depth(depth: int) -> None:
            if metrics:
                metrics.queue_depth.labels(*label).set(depth)

        s = self.settings
        queue_name = f"{info.name}-v{info.version}"
        batcher: Batcher | DetectionRunner
        if detector:
            batcher = DetectionRunner(
                model, capacity=s.queue, name=queue_name, on_batch=on_batch, on_depth=on_depth
            ).start()
        else:
            batcher = Batcher(
                model,
                max_batch=s.max_batch,
                max_wait_s=s.max_wait_ms / 1000.0,
                capacity=s.queue,
                name=queue_name,
                on_batch=on_batch,
                on_depth=on_depth,
            ).start()
        if metrics:
            metrics.loaded.labels(*label).set(1)
            metrics.queue_depth.labels(*label).set(0)
        log.info(
            "loaded %s version %s in %.2fs", info.name, info.version, time.perf_counter() - started
        )
        return LoadedModel(info, model, batcher)


class StaticSource(ModelSource):
    """Models given as objects (or loaders), each served as version 1 with alias
    ``production``: tests and embedding use it; :class:`BundleSource` is the file case."""

    def __init__(self, models: Mapping[str, Any]) -> None:
        super().__init__()
        self._models = dict(models)

    def scan(self) -> dict[str, ModelEntry]:
        out = {}
        for name in self._models:
            info = VersionInfo(name, 1, (DEFAULT_ALIAS,))
            out[name] = ModelEntry(name, {1: info}, {DEFAULT_ALIAS: 1})
        return out

    def load(self, info: VersionInfo) -> Any:
        model = self._models[info.name]
        ready = hasattr(model, "run") or hasattr(model, "detect")
        return model() if callable(model) and not ready else model


class BundleSource(ModelSource):
    """One bundle file or directory, served as version 1 (``production``) of ``name`` (default:
    the name in the bundle's manifest, else the file name)."""

    def __init__(self, path: str | Path, *, name: str | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.name = name

    def scan(self) -> dict[str, ModelEntry]:
        from visionflow.export.bundle import open_bundle

        if self.name is None:
            meta = open_bundle(self.path).meta
            self.name = _safe_name(str(meta.get("name") or self.path.stem))
        info = VersionInfo(self.name, 1, (DEFAULT_ALIAS,))
        return {self.name: ModelEntry(self.name, {1: info}, {DEFAULT_ALIAS: 1})}

    def load(self, info: VersionInfo) -> Any:
        from visionflow.export.runtime import load_bundle

        return load_bundle(self.path, threads=self.settings.ort_threads)


def _safe_name(name: str) -> str:
    """A model name usable in a URL path segment."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.")
    return cleaned or "model"


class RegistrySource(ModelSource):
    """Every model of a :mod:`visionflow.registry` store, polled for new versions and alias
    moves (``Registry.revision()`` changes on each). The registry is safe to share between
    threads (a connection per thread), so the poller and lazy loads use one instance."""

    def __init__(self, root: str | Path, *, url: str | None = None) -> None:
        super().__init__()
        self.root = Path(root)
        self.url = url
        self._registry: Any = None
        self._open_lock = threading.Lock()

    def _open(self) -> Any:
        with self._open_lock:
            if self._registry is None:
                from visionflow.registry.store import Registry  # lazy: only a registry needs it

                self._registry = Registry.open(self.root, url=self.url)
            return self._registry

    def registry(self) -> Any:
        """The :class:`~visionflow.registry.store.Registry` served (rollouts promote in it)."""
        return self._open()

    def revision(self) -> int | None:
        return int(self._open().revision())

    def scan(self) -> dict[str, ModelEntry]:
        from visionflow.errors import VisionflowError

        registry = self._open()
        out = {}
        for name in registry.models():
            try:
                found = registry.versions(name)
            except VisionflowError:  # deleted between the two reads: gone next time anyway
                continue
            versions: dict[int, VersionInfo] = {}
            aliases: dict[str, int] = {}
            for mv in found:
                info = VersionInfo(
                    name=name,
                    version=int(mv.version),
                    aliases=tuple(mv.aliases),
                    meta=dict(mv.meta or {}),
                    created_at=str(mv.created_at) if mv.created_at is not None else None,
                )
                versions[info.version] = info
                for alias in info.aliases:
                    aliases[alias] = info.version
            if versions:
                out[name] = ModelEntry(name, versions, aliases)
        return out

    def load(self, info: VersionInfo) -> Any:
        return self._open().load(info.name, info.version, threads=self.settings.ort_threads)
