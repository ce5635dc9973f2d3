"""The feedback loop: true labels for served images, stored durably, then a dataset.

Three parts, all torch-free:

* :class:`FeedbackStore` — a directory a server (or anyone) appends labelled images to::

      STORE/images/<sha256[:2]>/<sha256>.<ext>     the encoded image, saved once (by content)
      STORE/feedback.db                            SQLite (WAL): one row per (model, image, label)

  An image is written to a temp file, fsynced and renamed before its row is committed (WAL,
  ``synchronous=FULL``), so a row never names a missing file and an acknowledged entry survives
  a crash. Sending the same image with the same label for the same model again returns the
  first entry (idempotent).
* :class:`RequestCache` — the server's memory of recent predict requests (their encoded images
  and answers, bounded by count, bytes and age) so that feedback can name a request id instead
  of uploading the image again; :class:`RequestCapture` is the ASGI middleware that fills it.
* :func:`export_dataset` and :func:`merge_with_run` — a folder-per-class dataset from the store
  (copies, never moves), alone or merged with the data of a training run (``visionflow
  retrain --from-feedback``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visionflow._io import atomic_write_bytes, read_json, sha256_file
from visionflow.errors import ConfigError, DataError

__all__ = [
    "CachedRequest",
    "FeedbackEntry",
    "FeedbackStore",
    "MergeReport",
    "RequestCache",
    "RequestCapture",
    "check_label",
    "export_dataset",
    "merge_with_run",
]

log = logging.getLogger("visionflow.serve")

#: Image file suffix per Pillow format name; anything else is stored as ``.img``.
_SUFFIX = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
           "TIFF": "tiff", "MPO": "jpg"}  # fmt: skip
_BAD_LABEL = re.compile(r"[/\\\x00-\x1f]")
DB_NAME = "feedback.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_sha256 TEXT NOT NULL,
    image_ext TEXT NOT NULL,
    label TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER,
    request_id TEXT,
    predicted TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (model, image_sha256, label)
)
"""


def check_label(label: Any, where: str = "label") -> str:
    """A label usable as a class-folder name, or :class:`ConfigError` saying why not."""
    if not isinstance(label, str) or not label.strip():
        raise ConfigError(f"{where} must be a non-empty string")
    label = label.strip()
    if len(label) > 200 or _BAD_LABEL.search(label) or label in {".", ".."}:
        raise ConfigError(
            f"{where} {label[:50]!r} cannot be a class name (no slashes, control characters, "
            "'.' or '..'; at most 200 characters)"
        )
    return label


@dataclass(frozen=True)
class FeedbackEntry:
    """One stored label; ``path`` is the image in the store."""

    id: int
    image_sha256: str
    image_ext: str
    label: str
    model: str
    version: int | None
    request_id: str | None
    predicted: str | None
    created_at: str
    path: Path
    created: bool = True  # False: this (model, image, label) was already stored

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image_sha256": self.image_sha256,
            "label": self.label,
            "model": self.model,
            "version": self.version,
            "request_id": self.request_id,
            "predicted": self.predicted,
            "created_at": self.created_at,
            "duplicate": not self.created,
        }


class FeedbackStore:
    """A feedback directory (see the module docstring); safe to share between threads.

    Constructors store; :meth:`add` and the readers open the database on first use (``create``:
    make the directory if it is missing, else a missing store is a :class:`DataError`).
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        self.create = create
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FeedbackStore({str(self.root)!r})"

    # ---------------------------------------------------------------- database
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            db = self.root / DB_NAME
            if not db.is_file():
                if not self.create:
                    raise DataError(
                        f"{self.root} is not a feedback store ({DB_NAME} missing); give the "
                        "folder the server was started with (--feedback DIR)"
                    )
                (self.root / "images").mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(_SCHEMA)
            self._conn = conn
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def image_path(self, sha: str, ext: str) -> Path:
        return self.root / "images" / sha[:2] / f"{sha}.{ext}"

    # ---------------------------------------------------------------- writing
    def add(
        self,
        image: bytes,
        *,
        label: str,
        model: str,
        image_format: str | None = None,
        version: int | None = None,
        request_id: str | None = None,
        predicted: str | None = None,
    ) -> FeedbackEntry:
        """Store ``image`` (encoded, already checked to decode) with its true ``label``.

        Returns once the image file and the row are both on disk. The same (model, image,
        label) again returns the first entry with ``created=False``.
        """
        label = check_label(label)
        sha = hashlib.sha256(image).hexdigest()
        ext = _SUFFIX.get((image_format or "").upper(), "img")
        with self._lock:
            conn = self._db()
            found = self._find(conn, model, sha, label)
            if found is not None:
                return found
            path = self.image_path(sha, ext)
            if not (path.is_file() and path.stat().st_size == len(image)):
                atomic_write_bytes(path, image)  # temp file, fsync, rename, fsync the folder
            now = datetime.now(UTC).isoformat(timespec="milliseconds")
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(
                    "INSERT INTO feedback (image_sha256, image_ext, label, model, version,"
                    " request_id, predicted, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (sha, ext, label, model, version, request_id, predicted, now),
                )
                conn.execute("COMMIT")
            except sqlite3.IntegrityError:  # another process stored it first
                conn.execute("ROLLBACK")
                found = self._find(conn, model, sha, label)
                if found is None:  # pragma: no cover - the constraint said it exists
                    raise
                return found
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            number = int(cur.lastrowid or 0)
        return FeedbackEntry(number, sha, ext, label, model, version, request_id, predicted,
                             now, path)  # fmt: skip

    def _find(
        self, conn: sqlite3.Connection, model: str, sha: str, label: str
    ) -> FeedbackEntry | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM feedback WHERE model = ? AND image_sha256 = ? AND label = ?",
            (model, sha, label),
        ).fetchone()
        return self._entry(row, created=False) if row else None

    def _entry(self, row: Sequence[Any], *, created: bool = True) -> FeedbackEntry:
        number, sha, ext, label, model, version, request_id, predicted, created_at = row
        return FeedbackEntry(int(number), sha, ext, label, model, version, request_id, predicted,
                             created_at, self.image_path(sha, ext), created)  # fmt: skip

    # ---------------------------------------------------------------- reading
    def entries(self, model: str | None = None) -> list[FeedbackEntry]:
        """Every entry (of ``model``), oldest first."""
        with self._lock:
            conn = self._db()
            sql = f"SELECT {_COLUMNS} FROM feedback"
            args: tuple[Any, ...] = ()
            if model is not None:
                sql += " WHERE model = ?"
                args = (model,)
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
        return [self._entry(r) for r in rows]

    def get(self, number: int) -> FeedbackEntry | None:
        with self._lock:
            row = (
                self._db()
                .execute(f"SELECT {_COLUMNS} FROM feedback WHERE id = ?", (number,))
                .fetchone()
            )
        return self._entry(row) if row else None

    def labels(self, model: str | None = None) -> tuple[dict[str, FeedbackEntry], list[str]]:
        """The label of each image (by sha256; the newest entry wins) and a line per image
        whose entries disagree."""
        latest: dict[str, FeedbackEntry] = {}
        seen: dict[str, set[str]] = {}
        for entry in self.entries(model):
            latest[entry.image_sha256] = entry
            seen.setdefault(entry.image_sha256, set()).add(entry.label)
        conflicts = [
            f"{sha[:12]}: labelled {sorted(labels)}; kept the newest, {latest[sha].label!r}"
            for sha, labels in seen.items()
            if len(labels) > 1
        ]
        return latest, conflicts


_COLUMNS = "id, image_sha256, image_ext, label, model, version, request_id, predicted, created_at"


# ------------------------------------------------------------------------------ datasets
def _place(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` (a hard link when both sit on one file system: same bytes,
    no space; the source is never moved or changed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _fresh_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def export_dataset(
    store: FeedbackStore | str | os.PathLike[str], out: str | os.PathLike[str], *,
    model: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write the store's images as ``out/<label>/<sha256>.<ext>`` (copies; a folder-per-class
    dataset ``visionflow train`` reads). An image with several labels goes under the newest.

    Returns a summary: images per class, conflicts, the folder.
    """
    store = store if isinstance(store, FeedbackStore) else FeedbackStore(store, create=False)
    target = Path(out)
    latest, conflicts = store.labels(model)
    if not latest:
        which = f" for model {model!r}" if model else ""
        raise DataError(f"{store.root} holds no feedback{which}; nothing to export")
    _fresh_folder(target)
    counts: dict[str, int] = {}
    missing = []
    for sha, entry in sorted(latest.items()):
        if not entry.path.is_file():
            missing.append(str(entry.path))
            continue
        dest = target / check_label(entry.label) / f"{sha}.{entry.image_ext}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry.path, dest)
        counts[entry.label] = counts.get(entry.label, 0) + 1
    return {
        "out": str(target),
        "images": sum(counts.values()),
        "classes": dict(sorted(counts.items())),
        "conflicts": conflicts,
        "missing": missing,
    }


@dataclass
class MergeReport:
    """What :func:`merge_with_run` did."""

    out: Path
    original: int = 0
    added: int = 0
    relabelled: list[str] = field(default_factory=list)  # "<file>: old -> new"
    confirmed: int = 0  # feedback equal to the original label
    duplicates: int = 0  # byte-identical original images kept once
    unreadable: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)
    new_classes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "original": self.original, "added": self.added,
            "relabelled": self.relabelled, "confirmed": self.confirmed,
            "duplicates": self.duplicates, "unreadable": self.unreadable,
            "conflicts": self.conflicts, "classes": self.classes,
            "new_classes": self.new_classes,
        }  # fmt: skip


def merge_with_run(
    run_dir: str | os.PathLike[str],
    store: FeedbackStore | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
) -> MergeReport:
    """The run's data plus the feedback, as ``out/{train,val,test}/<label>/<sha256>.<ext>``.

    The run's split is kept (its validation and test images stay there, so the new model is
    measured on the same held-out images as the old one); feedback images join ``train``. When
    a feedback image is byte-identical to an original one, the feedback label wins and the
    change is reported. Files are hard links or copies; nothing is moved.
    """
    from visionflow.data.index import DatasetIndex, Split

    run = Path(run_dir)
    for name in ("index.json", "split.json"):
        if not (run / name).is_file():
            raise DataError(f"{run / name} is missing; --from-feedback needs the run's data index")
    index = DatasetIndex.from_json(read_json(run / "index.json"))
    split = Split.from_json(read_json(run / "split.json"))
    store = store if isinstance(store, FeedbackStore) else FeedbackStore(store, create=False)
    latest, conflicts = store.labels(model)
    target = Path(out)
    _fresh_folder(target)
    report = MergeReport(out=target, conflicts=conflicts)
    where = {pos: name for name in ("train", "val", "test") for pos in split[name]}
    placed: dict[str, str] = {}  # sha -> split it went to
    for pos, sample in enumerate(index.samples):
        part = where.get(pos)
        if part is None or sample.label is None:
            continue
        try:
            sha = sha256_file(sample.path)
        except OSError as exc:
            report.unreadable.append(f"{sample.path}: {exc.strerror or exc}")
            continue
        if sha in placed:
            report.duplicates += 1
            continue
        label = sample.label
        fb = latest.get(sha)
        if fb is not None:
            if fb.label != label:
                report.relabelled.append(f"{sample.path}: {label!r} -> {fb.label!r}")
                label = fb.label
            else:
                report.confirmed += 1
        suffix = sample.path.suffix.lower() or ".img"
        _place(sample.path, target / part / check_label(label) / f"{sha}{suffix}")
        placed[sha] = part
        report.original += 1
    for sha, fb in sorted(latest.items()):
        if sha in placed:
            continue
        if not fb.path.is_file():
            report.unreadable.append(f"{fb.path}: missing from the feedback store")
            continue
        _place(fb.path, target / "train" / check_label(fb.label) / f"{sha}.{fb.image_ext}")
        placed[sha] = "train"
        report.added += 1
    for part in ("train", "val", "test"):
        folder = target / part
        if folder.is_dir():
            for cls in folder.iterdir():
                report.classes[cls.name] = report.classes.get(cls.name, 0) + sum(
                    1 for _ in cls.iterdir()
                )
    report.classes = dict(sorted(report.classes.items()))
    report.new_classes = sorted(set(report.classes) - set(index.classes))
    return report


# ------------------------------------------------------------------------------ request cache
@dataclass(frozen=True)
class CachedRequest:
    """A recent predict request: its body (to re-read the images), and its answer."""

    model: str
    version: int | None
    content_type: str
    body: bytes
    predicted: list[str]
    at: float


class RequestCache:
    """The most recent predict requests by request id: an LRU bounded by ``max_requests``,
    ``max_bytes`` of bodies and ``max_age_s``."""

    def __init__(self, *, max_requests: int, max_bytes: int, max_age_s: float) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._items: OrderedDict[str, CachedRequest] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, request_id: str, item: CachedRequest) -> None:
        if len(item.body) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(request_id, None)
            if old is not None:
                self._bytes -= len(old.body)
            self._items[request_id] = item
            self._bytes += len(item.body)
            self._evict(time.monotonic())

    def get(self, request_id: str) -> CachedRequest | None:
        with self._lock:
            self._evict(time.monotonic())
            item = self._items.get(request_id)
            if item is not None:
                self._items.move_to_end(request_id)
            return item

    def _evict(self, now: float) -> None:
        items = self._items
        while items and (
            len(items) > self.max_requests
            or self._bytes > self.max_bytes
            or now - next(iter(items.values())).at > self.max_age_s
        ):
            _, old = items.popitem(last=False)
            self._bytes -= len(old.body)


_PREDICT_PATH = re.compile(r"^/v1/models/(?P<name>[^/]+):predict$")


class RequestCapture:
    """ASGI middleware keeping each successful v1 predict request in a :class:`RequestCache`
    (stored before the answer's last byte leaves, so feedback can follow at once).

    It sits inside the gateway middleware, which has already read (and bounded) the body and
    set the request id; other requests pass untouched.
    """

    def __init__(self, app: ASGIApp, *, cache: RequestCache) -> None:
        self.app = app
        self.cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _PREDICT_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        body = bytearray()
        answer = bytearray()
        status = [0]
        version: list[int | None] = [None]

        async def recv() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
            return message

        async def snd(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                for key, value in message.get("headers", []):
                    if key.lower() == b"x-model-version" and value.isdigit():
                        version[0] = int(value)
            elif message["type"] == "http.response.body" and status[0] == 200:
                answer.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    self._keep(scope, match.group("name"), version[0], bytes(body), bytes(answer))
            await send(message)

        await self.app(scope, recv, snd)

    def _keep(self, scope: Scope, name: str, version: int | None, body: bytes,
              answer: bytes) -> None:  # fmt: skip
        request_id = (scope.get("state") or {}).get("request_id")
        if not request_id:
            return
        try:
            predicted = [str(p["label"]) for p in json.loads(answer)["predictions"]]
        except (ValueError, KeyError, TypeError):
            predicted = []
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        self.cache.put(
            request_id,
            CachedRequest(name, version, content_type, body, predicted, time.monotonic()),
        )
