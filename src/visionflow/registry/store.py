"""The model registry: numbered versions of named models, and aliases that move atomically.

Layout of a registry root (a local folder, or a volume every server replica mounts)::

    root/
      registry.db                 SQLite database (WAL mode), unless a PostgreSQL URL is given
      artifacts/<name>/<version>/ the verified bundle directory of each version (model.json ...)
      artifacts/.staging/         bundles being added (verified and copied before they get a number)
      artifacts/.trash/           versions being deleted (renamed here, then removed)

The database holds five tables, all prefixed ``registry_``: ``state`` (one row: the revision
counter and the schema version), ``models`` (one row per name, with the next version number, so a
deleted version's number is never given again), ``versions``, ``aliases`` and
``alias_history`` (every alias move, the audit log that :meth:`Registry.rollback` replays).

**Concurrency.** Every change runs in one transaction that first takes the write lock
(SQLite's ``BEGIN IMMEDIATE``; PostgreSQL: ``SELECT ... FOR UPDATE`` of the one row holding the
revision counter) and bumps the counter if it changed anything. Writers are thus serialised, so
two processes adding at once get distinct version numbers (the ``(name, version)`` primary key
is the safety net), an alias never points at a version being deleted, and readers see either
the old alias or the new one, never none. Servers poll :meth:`Registry.revision` (one indexed
read) and reload only when it moves.

**Artifacts.** A bundle is verified and copied into ``.staging`` outside the transaction (the
slow part), then renamed to ``artifacts/<name>/<version>`` inside it, before the commit: a row
never points at a missing directory. A crash (or a failed commit) between the rename and the commit
leaves an unreferenced directory; the number was not committed, so the next add gets it again
and replaces the directory.

**Checksums.** :attr:`ModelVersion.sha256` is the sha256 of the version's ``model.json``
(``sha256sum artifacts/<name>/<version>/model.json`` reproduces it). The manifest lists the
sha256 of every other file, so this one hash pins the whole bundle; recorded in the database,
it also refuses a bundle that was swapped on the artifact volume for another, internally
consistent one.

**Rollback.** An alias's history is a stack: ``promote``/``set_alias`` push the new holder,
``rollback`` pops the current one and returns to the holder below it (skipping versions deleted
since), ``remove_alias`` empties it. Promote v1, v2, v3; rollback gives v2, rollback again
gives v1, and a third rollback is refused (there is nothing earlier).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from visionflow._io import _fsync_dir, sha256_file
from visionflow.errors import BundleError, MissingDependencyError, RegistryError
from visionflow.export.bundle import MANIFEST, open_bundle, verify_bundle

if TYPE_CHECKING:
    from visionflow.export.detect_runtime import DetectionBundleModel
    from visionflow.export.runtime import BundleModel

__all__ = ["DEFAULT_ALIAS", "ModelVersion", "Registry"]

#: The alias :meth:`Registry.promote`, :meth:`Registry.get` and servers use by default.
DEFAULT_ALIAS = "production"
#: Version of the database layout; a registry written by a newer layout is refused.
SCHEMA_VERSION = 1

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_VERSION_RE = re.compile(r"v?(\d+)")
_NAME_RULE = "1 to 64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
_BUSY_TIMEOUT_S = 30.0
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model.

    Attributes:
        name: The model's name.
        version: Its number, 1, 2, 3... per name (never reused, even after a delete).
        path: The verified bundle directory inside the registry's artifact store.
        sha256: sha256 of the bundle's ``model.json``, which lists every file's own hash.
        created_at: When the version was added (UTC, ISO 8601).
        aliases: The aliases pointing at this version, sorted.
        meta: A summary of the manifest: ``task``, ``backbone``, ``classes``,
            ``default_graph``, ``metrics``, and ``description``, ``bundle`` (the name the
            export gave it) and ``source`` (the path it was added from).
    """

    name: str
    version: int
    path: Path
    sha256: str
    created_at: str
    aliases: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def ref(self) -> str:
        """``name:v3``, how messages and logs name this version."""
        return f"{self.name}:v{self.version}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``--json`` prints and a server returns)."""
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.path),
            "sha256": self.sha256,
            "created_at": self.created_at,
            "aliases": list(self.aliases),
            "meta": self.meta,
        }


class Registry:
    """Versions of named models, stored in a database plus an artifact directory.

    ``Registry(root)`` only remembers where the registry lives; the first operation (or
    :meth:`open`) creates the folder and the tables. One instance may be shared by threads
    (each gets its own connection) and survives a fork (the child reconnects).

    Args:
        root: The registry folder; bundles live in ``root/artifacts``.
        url: The database: default ``sqlite`` in ``root/registry.db``; ``sqlite:///path.db``
            (SQLAlchemy style: four slashes for an absolute path); or ``postgresql://...``
            so several server replicas share one registry (the artifacts must then be on a
            volume they all mount at ``root``).
    """

    def __init__(self, root: str | os.PathLike[str], *, url: str | None = None) -> None:
        self.root = Path(root)
        self.url = url
        self._backend: _Backend | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, url: str | None = None) -> Registry:
        """A registry whose folder and tables exist (created if needed)."""
        registry = cls(root, url=url)
        registry._db()
        return registry

    def __repr__(self) -> str:
        where = _redact(self.url) if self.url else "sqlite"
        return f"Registry({str(self.root)!r}, {where})"

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this thread's database connection (others close when their thread ends)."""
        if self._backend is not None:
            self._backend.close()

    # ------------------------------------------------------------------------ reading

    def revision(self) -> int:
        """A counter bumped by every change: poll it and reload only when it moves."""
        with self._db().transaction(write=False) as tx:
            row = tx.one("SELECT revision FROM registry_state WHERE id = 1")
        return int(row[0]) if row else 0

    def models(self) -> list[str]:
        """Names of the models that have at least one version, sorted."""
        with self._db().transaction(write=False) as tx:
            rows = tx.all("SELECT DISTINCT name FROM registry_versions ORDER BY name")
        return [str(r[0]) for r in rows]

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of ``name``, oldest first (empty once all were deleted)."""
        _check_name(name, "name")
        with self._db().transaction(write=False) as tx:
            self._require_model(tx, name)
            rows = tx.all(f"{_VERSION_SELECT} WHERE name = ? ORDER BY version", (name,))
            aliases = self._aliases(tx, name)
        return [self._version(row, aliases) for row in rows]

    def get(self, name: str, ref: int | str = DEFAULT_ALIAS) -> ModelVersion:
        """The version ``ref`` of ``name``.

        Args:
            name: The model.
            ref: A version number (``3``, ``"3"``, ``"v3"``), an alias (``"production"``) or
                ``"latest"`` (the highest version).

        Raises:
            RegistryError: Unknown model (with a "did you mean"), version or alias (listing
                what exists).
        """
        _check_name(name, "name")
        target = _parse_ref(ref)
        with self._db().transaction(write=False) as tx:
            number = self._resolve(tx, name, target)
            row = tx.one(f"{_VERSION_SELECT} WHERE name = ? AND version = ?", (name, number))
            aliases = self._aliases(tx, name)
        if row is None:  # pragma: no cover - _resolve checked it in the same snapshot
            raise RegistryError(f"{name} has no version {number}")
        return self._version(row, aliases)

    def history(self, name: str, alias: str = DEFAULT_ALIAS) -> list[dict[str, Any]]:
        """Every move of ``alias`` on ``name``, oldest first.

        Each entry: ``at``, ``action`` (``add``, ``set``, ``promote``, ``rollback`` or
        ``remove``), ``version`` (the new holder; ``None`` after ``remove``) and ``previous``.
        """
        _check_name(name, "name")
        _check_alias(alias)
        with self._db().transaction(write=False) as tx:
            self._require_model(tx, name)
            rows = self._history(tx, name, alias)
        return [
            {"at": at, "action": action, "alias": alias, "version": version, "previous": previous}
            for _, action, version, previous, at in rows
        ]

    def verify(self, name: str, ref: int | str = DEFAULT_ALIAS) -> ModelVersion:
        """Check every file of a version against its manifest and the recorded sha256.

        Raises:
            BundleError: A file is missing, truncated or tampered with, or ``model.json`` is
                not the one registered.
        """
        version = self.get(name, ref)
        self._check_manifest(version)
        verify_bundle(version.path)
        return version

    def load(
        self, name: str, ref: int | str = DEFAULT_ALIAS, **kwargs: Any
    ) -> BundleModel | DetectionBundleModel:
        """Load a version on ONNX Runtime, verifying it first.

        ``model.json`` must still have the sha256 recorded when the version was added, and
        :func:`~visionflow.export.runtime.load_bundle` verifies every other file against it.

        Args:
            name: The model.
            ref: See :meth:`get`.
            **kwargs: Passed to :func:`~visionflow.export.runtime.load_bundle` (``graph``,
                ``threads``, ``providers``).
        """
        from visionflow.export.runtime import load_bundle

        version = self.get(name, ref)
        self._check_manifest(version)
        return load_bundle(version.path, **kwargs)

    # ------------------------------------------------------------------------ changing

    def add(
        self,
        bundle: str | os.PathLike[str],
        *,
        name: str,
        aliases: Sequence[str] = (),
        description: str | None = None,
    ) -> ModelVersion:
        """Verify a bundle (directory or ``.vfb``), store a copy and give it the next version.

        Args:
            bundle: The bundle to add; it is verified before anything is recorded.
            name: The model it becomes a version of (created on first use).
            aliases: Aliases to point at the new version in the same transaction (e.g.
                ``["candidate"]``).
            description: A note shown by ``list`` and ``show``.

        Returns:
            The new version.

        Raises:
            BundleError: The bundle does not verify.
            RegistryError: A bad name or alias.
        """
        _check_name(name, "name")
        wanted = _unique([_check_alias(a) for a in _as_list(aliases, "aliases")])
        if description is not None and not isinstance(description, str):
            raise RegistryError(f"description must be text, got {type(description).__name__}")
        source = Path(bundle)
        db = self._db()
        staging_root = self.root / "artifacts" / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=staging_root))
        try:
            staged, manifest = _stage(source, staging)
            sha = sha256_file(staged / MANIFEST)
            meta = _summary(manifest, description=description, source=source)
            now = _now()
            with db.transaction(write=True) as tx:
                tx.run(
                    "INSERT INTO registry_models (name, next_version, created_at) VALUES (?, 1, ?)"
                    " ON CONFLICT (name) DO NOTHING",
                    (name, now),
                )
                tx.run(
                    "UPDATE registry_models SET next_version = next_version + 1 WHERE name = ?",
                    (name,),
                )
                row = tx.one("SELECT next_version FROM registry_models WHERE name = ?", (name,))
                assert row is not None  # inserted above, in this transaction
                number = int(row[0]) - 1
                tx.run(
                    "INSERT INTO registry_versions (name, version, sha256, created_at, meta)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (name, number, sha, now, json.dumps(meta, ensure_ascii=False)),
                )
                for alias in wanted:
                    self._move(tx, name, alias, number, action="add")
                # Last step before the commit. Should the commit fail, the folder stays: it
                # may have committed after all (a lost connection), and if it did not, the
                # number is handed out again and the next add replaces the folder.
                self._place(staged, self._path(name, number))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(name, number)

    def set_alias(self, name: str, alias: str, version: int | str) -> ModelVersion:
        """Point ``alias`` at ``version`` (one atomic update; no moment without a holder)."""
        return self._set(name, alias, version, action="set")

    def promote(self, name: str, version: int | str, *, alias: str = DEFAULT_ALIAS) -> ModelVersion:
        """Make ``version`` the holder of ``alias`` (``production`` by default).

        The previous holder is kept in the alias history, so :meth:`rollback` can return to
        it. Promoting the current holder changes nothing.
        """
        return self._set(name, alias, version, action="promote")

    def rollback(self, name: str, *, alias: str = DEFAULT_ALIAS) -> ModelVersion:
        """Point ``alias`` back at the version that held it before the current one.

        Repeated rollbacks walk further back (see the module docstring); versions deleted since
        are skipped.

        Raises:
            RegistryError: The alias is not set, or no earlier holder exists any more.
        """
        _check_name(name, "name")
        _check_alias(alias)
        with self._db().transaction(write=True) as tx:
            self._require_model(tx, name)
            current = self._alias_version(tx, name, alias)
            if current is None:
                raise RegistryError(
                    f"{name}: alias {alias!r} is not set, so there is nothing to roll back; "
                    f"{self._aliases_hint(tx, name)}"
                )
            stack = _replay(self._history(tx, name, alias))
            if not stack or stack[-1] != current:  # pragma: no cover - history is complete
                stack.append(current)
            existing = set(self._numbers(tx, name))
            earlier = [v for v in stack[:-1] if v in existing]
            if not earlier:
                trail = " -> ".join(f"v{v}" for v in stack)
                raise RegistryError(
                    f"{name}: {alias!r} has no earlier version to roll back to (history: "
                    f"{trail}); point it at a version with `visionflow registry promote {name} "
                    f"VERSION --alias {alias}`"
                )
            self._move(tx, name, alias, earlier[-1], action="rollback")
            number = earlier[-1]
        return self.get(name, number)

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove ``alias`` from ``name`` (the versions stay); its rollback history ends."""
        _check_name(name, "name")
        _check_alias(alias)
        with self._db().transaction(write=True) as tx:
            self._require_model(tx, name)
            current = self._alias_version(tx, name, alias)
            if current is None:
                raise RegistryError(
                    f"{name} has no alias {alias!r}; {self._aliases_hint(tx, name)}"
                )
            tx.run("DELETE FROM registry_aliases WHERE name = ? AND alias = ?", (name, alias))
            tx.run(
                "INSERT INTO registry_alias_history (name, alias, action, version, previous, at)"
                " VALUES (?, ?, 'remove', NULL, ?, ?)",
                (name, alias, current, _now()),
            )

    def delete(self, name: str, version: int | str) -> None:
        """Delete a version and its artifacts; refused while an alias points at it.

        The number is not given again: the next :meth:`add` continues after the highest ever.

        Raises:
            RegistryError: Unknown version, or aliases still point at it (named, with the
                commands that move them).
        """
        _check_name(name, "name")
        target = _parse_ref(version)
        if not isinstance(target, int):
            raise RegistryError(
                f"delete takes a version number, not {version!r}: an alias moves, so deleting "
                "through it could remove the wrong version"
            )
        with self._db().transaction(write=True) as tx:
            number = self._resolve(tx, name, target)
            held = [
                str(r[0])
                for r in tx.all(
                    "SELECT alias FROM registry_aliases WHERE name = ? AND version = ?"
                    " ORDER BY alias",
                    (name, number),
                )
            ]
            if held:
                listed = ", ".join(repr(a) for a in held)
                raise RegistryError(
                    f"{name} v{number} is still aliased ({listed}); point those aliases at "
                    f"another version (`visionflow registry promote {name} VERSION --alias "
                    f"{held[0]}`) or remove them (`visionflow registry unalias {name} "
                    f"{held[0]}`) first"
                )
            tx.run("DELETE FROM registry_versions WHERE name = ? AND version = ?", (name, number))
        # After the commit: a crash here leaves an unreferenced folder, never a dangling row.
        self._discard(self._path(name, number))

    # ------------------------------------------------------------------------ internals

    def _db(self) -> _Backend:
        with self._lock:
            if self._backend is None:
                backend = _backend_for(self.root, self.url)
                self.root.mkdir(parents=True, exist_ok=True)
                (self.root / "artifacts").mkdir(exist_ok=True)
                backend.setup()
                self._backend = backend
            return self._backend

    def _path(self, name: str, version: int) -> Path:
        return self.root / "artifacts" / name / str(version)

    def _version(self, row: Sequence[Any], aliases: dict[int, list[str]]) -> ModelVersion:
        name, version, sha, created_at, meta = row
        return ModelVersion(
            name=str(name),
            version=int(version),
            path=self._path(str(name), int(version)),
            sha256=str(sha),
            created_at=str(created_at),
            aliases=tuple(sorted(aliases.get(int(version), []))),
            meta=json.loads(meta),
        )

    def _set(self, name: str, alias: str, version: int | str, *, action: str) -> ModelVersion:
        _check_name(name, "name")
        _check_alias(alias)
        target = _parse_ref(version)
        with self._db().transaction(write=True) as tx:
            number = self._resolve(tx, name, target)
            if self._alias_version(tx, name, alias) != number:
                self._move(tx, name, alias, number, action=action)
        return self.get(name, number)

    def _move(self, tx: _Tx, name: str, alias: str, version: int, *, action: str) -> None:
        """Point ``alias`` at ``version`` and log it; one upsert, so never unset in between."""
        now = _now()
        previous = self._alias_version(tx, name, alias)
        tx.run(
            "INSERT INTO registry_aliases (name, alias, version, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version,"
            " updated_at = excluded.updated_at",
            (name, alias, version, now),
        )
        tx.run(
            "INSERT INTO registry_alias_history (name, alias, action, version, previous, at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (name, alias, action, version, previous, now),
        )

    def _resolve(self, tx: _Tx, name: str, ref: int | str) -> int:
        """The version number ``ref`` names, or a RegistryError saying what exists."""
        self._require_model(tx, name)
        numbers = self._numbers(tx, name)
        if ref == "latest":
            if not numbers:
                raise RegistryError(f"{name} has no versions (all were deleted); add one")
            return numbers[-1]
        if isinstance(ref, int):
            if ref not in numbers:
                have = ", ".join(map(str, numbers)) if numbers else "none (all were deleted)"
                raise RegistryError(f"{name} has no version {ref}; its versions: {have}")
            return ref
        version = self._alias_version(tx, name, ref)
        if version is None:
            hint = self._aliases_hint(tx, name)
            fix = ""
            if ref == DEFAULT_ALIAS and numbers:
                fix = f"; promote one with `visionflow registry promote {name} {numbers[-1]}`"
            raise RegistryError(f"{name} has no alias {ref!r}; {hint}{fix}")
        return version

    def _require_model(self, tx: _Tx, name: str) -> None:
        if tx.one("SELECT 1 FROM registry_models WHERE name = ?", (name,)) is not None:
            return
        known = [str(r[0]) for r in tx.all("SELECT name FROM registry_models ORDER BY name")]
        hint = difflib.get_close_matches(name, known, n=1)
        if hint:
            extra = f"; did you mean {hint[0]!r}?"
        elif known:
            extra = f"; it holds {', '.join(known[:20])}"
        else:
            extra = "; it is empty (add a bundle with `visionflow registry add BUNDLE --name NAME`)"
        raise RegistryError(f"no model {name!r} in the registry at {self.root}{extra}")

    def _numbers(self, tx: _Tx, name: str) -> list[int]:
        rows = tx.all(
            "SELECT version FROM registry_versions WHERE name = ? ORDER BY version", (name,)
        )
        return [int(r[0]) for r in rows]

    def _aliases(self, tx: _Tx, name: str) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for alias, version in tx.all(
            "SELECT alias, version FROM registry_aliases WHERE name = ?", (name,)
        ):
            out.setdefault(int(version), []).append(str(alias))
        return out

    def _aliases_hint(self, tx: _Tx, name: str) -> str:
        rows = tx.all(
            "SELECT alias, version FROM registry_aliases WHERE name = ? ORDER BY alias", (name,)
        )
        if not rows:
            return "it has no aliases"
        return "its aliases: " + ", ".join(f"{a} -> v{v}" for a, v in rows)

    def _alias_version(self, tx: _Tx, name: str, alias: str) -> int | None:
        row = tx.one(
            "SELECT version FROM registry_aliases WHERE name = ? AND alias = ?", (name, alias)
        )
        return None if row is None else int(row[0])

    def _history(self, tx: _Tx, name: str, alias: str) -> list[tuple[Any, ...]]:
        return [
            tuple(r)
            for r in tx.all(
                "SELECT id, action, version, previous, at FROM registry_alias_history"
                " WHERE name = ? AND alias = ? ORDER BY id",
                (name, alias),
            )
        ]

    def _check_manifest(self, version: ModelVersion) -> None:
        manifest = version.path / MANIFEST
        try:
            actual = sha256_file(manifest)
        except FileNotFoundError:
            raise BundleError(
                f"{version.path}: the artifact of {version.ref} is missing (no {MANIFEST}); "
                f"delete the version (`visionflow registry delete {version.name} "
                f"{version.version}`) or restore the folder"
            ) from None
        except OSError as exc:
            raise BundleError(
                f"{manifest}: cannot read the artifact of {version.ref} ({exc})"
            ) from exc
        if actual != version.sha256:
            raise BundleError(
                f"{manifest}: the manifest of {version.ref} is not the one registered (sha256 "
                f"{actual[:16]}..., recorded {version.sha256[:16]}...): the artifact was replaced "
                "or corrupted; add the bundle again as a new version"
            )

    def _place(self, staged: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            # Left by a crash between rename and commit: no committed row references it
            # (numbers are handed out under the write lock and never reused).
            self._discard(target)
        os.rename(staged, target)
        _fsync_dir(target.parent)

    def _discard(self, path: Path) -> None:
        """Remove an artifact folder: renamed aside first, so it vanishes at once."""
        if not (path.exists() or path.is_symlink()):
            return
        trash = self.root / "artifacts" / ".trash"
        trash.mkdir(parents=True, exist_ok=True)
        aside = trash / f"{path.parent.name}.{path.name}.{uuid.uuid4().hex}"
        try:
            os.rename(path, aside)
        except OSError:  # pragma: no cover - removed by another process meanwhile
            return
        shutil.rmtree(aside, ignore_errors=True)


_VERSION_SELECT = "SELECT name, version, sha256, created_at, meta FROM registry_versions"


# ---------------------------------------------------------------------------- names and refs


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RegistryError(f"{what} {name!r} is not valid: use {_NAME_RULE}")
    return name


def _check_alias(alias: Any) -> str:
    _check_name(alias, "alias")
    if alias == "latest" or _VERSION_RE.fullmatch(alias):
        raise RegistryError(
            f"alias {alias!r} is not valid: 'latest' and version-like names (3, v3) already "
            "mean a version"
        )
    return str(alias)


def _parse_ref(ref: Any) -> int | str:
    """A version number, ``"latest"`` or a checked alias name."""
    if isinstance(ref, bool):
        raise RegistryError(f"version must be a number, 'latest' or an alias, got {ref!r}")
    if isinstance(ref, int):
        if ref < 1:
            raise RegistryError(f"versions start at 1, got {ref}")
        return ref
    if not isinstance(ref, str):
        raise RegistryError(f"version must be a number, 'latest' or an alias, got {ref!r}")
    text = ref.strip()
    match = _VERSION_RE.fullmatch(text)
    if match:
        return _parse_ref(int(match.group(1)))
    if text == "latest":
        return text
    try:
        return _check_alias(text)
    except RegistryError:
        raise RegistryError(
            f"{ref!r} is neither a version (3, v3, latest) nor a valid alias ({_NAME_RULE})"
        ) from None


def _as_list(values: Sequence[str] | str, what: str) -> list[str]:
    if isinstance(values, str):
        return [values]
    try:
        return list(values)
    except TypeError:
        raise RegistryError(f"{what} must be a list of names, got {values!r}") from None


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _replay(history: list[tuple[Any, ...]]) -> list[int]:
    """The alias's stack of holders after replaying its history (see the module docstring)."""
    stack: list[int] = []
    for _, action, version, _previous, _ in history:
        if action == "remove":
            stack = []
        elif action == "rollback":
            while stack and stack[-1] != version:
                stack.pop()
            if not stack:
                stack.append(int(version))
        elif not stack or stack[-1] != version:
            stack.append(int(version))
    return stack


# ---------------------------------------------------------------------------- artifacts


def _stage(source: Path, staging: Path) -> tuple[Path, dict[str, Any]]:
    """Verify ``source`` and leave a verified copy in ``staging/bundle``; its manifest.

    A directory is copied file by file (only what the manifest lists) and the copy verified
    again, so a change made while copying is caught. An archive is extracted with every safety
    check of :func:`~visionflow.export.bundle.open_bundle` into a private cache inside
    ``staging`` and moved, not copied.
    """
    dest = staging / "bundle"
    if source.is_dir():
        manifest = open_bundle(source).meta
        dest.mkdir()
        names = [MANIFEST, *manifest["files"]]
        for name in names:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            _copy_synced(source / name, dest / name)
        for directory in sorted({(dest / n).parent for n in names}, reverse=True):
            _fsync_dir(directory)
        copied = verify_bundle(dest)
        if copied != manifest:
            raise BundleError(f"{source}: the bundle changed while it was being added; retry")
        return dest, copied
    bundle = open_bundle(source, cache_dir=staging / "cache")
    os.rename(bundle.path, dest)
    return dest, bundle.meta


def _copy_synced(src: Path, dest: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(src, flags), "rb") as fin, open(dest, "xb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
        fout.flush()
        os.fsync(fout.fileno())


def _summary(manifest: dict[str, Any], *, description: str | None, source: Path) -> dict[str, Any]:
    keys = ("task", "backbone", "classes", "default_graph", "metrics")
    meta: dict[str, Any] = {k: manifest.get(k) for k in keys}
    meta["bundle"] = manifest.get("name")
    meta["description"] = description
    meta["source"] = str(source.resolve())
    return meta


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _redact(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<database url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# ---------------------------------------------------------------------------- databases
#
# One small interface over sqlite3 and psycopg2: SQL is written once with '?' placeholders
# and ON CONFLICT upserts (both dialects); ``_Tx.run`` translates placeholders for psycopg2.


class _Tx:
    """One transaction: ``run`` / ``one`` / ``all`` with '?' placeholders."""

    def __init__(self, cursor: Any, placeholder: str) -> None:
        self._cursor = cursor
        self._placeholder = placeholder
        #: Whether a statement changed something (the revision is bumped at commit).
        self.changed = False

    def run(self, sql: str, params: Sequence[Any] = ()) -> None:
        if self._placeholder != "?":
            sql = sql.replace("?", self._placeholder)
        self._cursor.execute(sql, tuple(params))
        if sql.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            self.changed = True

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self.run(sql, params)
        if self._cursor.description is None:
            return []
        return [tuple(r) for r in self._cursor.fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS registry_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision BIGINT NOT NULL,
    schema_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS registry_models (
    name TEXT PRIMARY KEY,
    next_version INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS registry_versions (
    name TEXT NOT NULL REFERENCES registry_models (name),
    version INTEGER NOT NULL CHECK (version >= 1),
    sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    meta TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS registry_aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES registry_versions (name, version)
);
CREATE TABLE IF NOT EXISTS registry_alias_history (
    id {serial},
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    action TEXT NOT NULL,
    version INTEGER,
    previous INTEGER,
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS registry_alias_history_by_alias
    ON registry_alias_history (name, alias, id);
"""


class _Backend:
    """A database connection per thread and process, and transactions on it."""

    placeholder = "?"
    serial = ""

    def __init__(self, where: str) -> None:
        self.where = where
        self._local = threading.local()

    # Dialect hooks.
    def _connect(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _begin(self, cursor: Any, *, write: bool, setup: bool = False) -> None:  # pragma: no cover
        raise NotImplementedError

    def _lock(self, tx: _Tx) -> None:
        """Take the registry's write lock, held until the transaction ends."""

    def _commit(self, conn: Any) -> None:
        conn.commit()

    def _rollback(self, conn: Any) -> None:
        conn.rollback()

    def _translate(self, exc: Exception) -> RegistryError | None:  # pragma: no cover
        return None

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            # After a fork the parent's connection belongs to the parent: never reuse it.
            conn = self._connect()
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.close()
        self._local.conn = None

    @contextlib.contextmanager
    def transaction(self, *, write: bool, setup: bool = False) -> Iterator[_Tx]:
        """A transaction; a write one first takes the registry's write lock (the revision)."""
        conn = self._connection()
        cursor = conn.cursor()
        tx = _Tx(cursor, self.placeholder)
        try:
            try:
                self._begin(cursor, write=write, setup=setup)
                if write and not setup:
                    self._lock(tx)
                yield tx
                if tx.changed and not setup:
                    tx.run("UPDATE registry_state SET revision = revision + 1 WHERE id = 1")
                self._commit(conn)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    self._rollback(conn)
                if isinstance(exc, Exception) and not isinstance(exc, RegistryError):
                    translated = self._translate(exc)
                    if translated is not None:
                        if getattr(self._local, "broken", False):
                            self.close()
                        raise translated from exc
                raise
        finally:
            with contextlib.suppress(Exception):
                cursor.close()

    def setup(self) -> None:
        """Create the tables (idempotent, safe when several processes start at once)."""
        with self.transaction(write=True, setup=True) as tx:
            for statement in _SCHEMA.format(serial=self.serial).split(";"):
                if statement.strip():
                    tx.run(statement)
            tx.run(
                "INSERT INTO registry_state (id, revision, schema_version) VALUES (1, 0, ?)"
                " ON CONFLICT (id) DO NOTHING",
                (SCHEMA_VERSION,),
            )
            row = tx.one("SELECT schema_version FROM registry_state WHERE id = 1")
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise RegistryError(
                f"the registry database {self.where} has layout {row[0]}, newer than this "
                f"visionflow understands ({SCHEMA_VERSION}); upgrade visionflow"
            )


class _SQLite(_Backend):
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = path

    def _connect(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(
                self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=True
            )
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise RegistryError(
                f"cannot open the registry database {self.path} ({exc}); check that the folder "
                "is writable and the file is an SQLite database"
            ) from exc
        return conn

    def _begin(self, cursor: Any, *, write: bool, setup: bool = False) -> None:
        # IMMEDIATE takes the write lock now (waiting up to the busy timeout), so two writers
        # never both read the same next version; a read gets one consistent snapshot.
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def _commit(self, conn: Any) -> None:
        conn.execute("COMMIT")

    def _rollback(self, conn: Any) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def _translate(self, exc: Exception) -> RegistryError | None:
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return RegistryError(
                f"the registry database {self.path} stayed locked for {_BUSY_TIMEOUT_S:g} s "
                "(another process is writing); retry"
            )
        if isinstance(exc, sqlite3.DatabaseError):
            return RegistryError(f"the registry database {self.path} failed: {exc}")
        return None


class _Postgres(_Backend):
    placeholder = "%s"
    serial = "BIGSERIAL PRIMARY KEY"
    #: pg_advisory_xact_lock key serialising CREATE TABLE IF NOT EXISTS across processes.
    _SETUP_LOCK = 0x7669_7369_6F6E  # "vision"

    def __init__(self, url: str) -> None:
        super().__init__(_redact(url))
        self.url = url

    def _connect(self) -> Any:
        try:
            import psycopg2
        except ImportError as exc:
            raise MissingDependencyError(
                "a PostgreSQL registry needs psycopg2; install it with "
                "`pip install 'visionflow[postgres]'`"
            ) from exc
        try:
            return psycopg2.connect(self.url, connect_timeout=10)
        except psycopg2.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RegistryError(
                f"cannot connect to the registry database {self.where} ({reason}); check the "
                "URL (--db / VISIONFLOW_REGISTRY_DB) and that the server is running"
            ) from None

    def _begin(self, cursor: Any, *, write: bool, setup: bool = False) -> None:
        # psycopg2 opens the transaction at the first statement. Reads use one snapshot; writes
        # are serialised by the revision row lock taken next (READ COMMITTED then sees every
        # earlier commit).
        if setup:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (self._SETUP_LOCK,))
        elif not write:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def _lock(self, tx: _Tx) -> None:
        # Every writer locks the one state row first: writers run one after another, and
        # under READ COMMITTED each later statement sees everything committed before.
        tx.all("SELECT revision FROM registry_state WHERE id = 1 FOR UPDATE")

    def _translate(self, exc: Exception) -> RegistryError | None:
        import psycopg2

        if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
            self._local.broken = True  # reconnect next time (server restart, network)
            return RegistryError(f"the registry database {self.where} failed: {exc}; retry")
        if isinstance(exc, psycopg2.Error):
            return RegistryError(f"the registry database {self.where} failed: {exc}")
        return None

    def close(self) -> None:
        super().close()
        self._local.broken = False


def _backend_for(root: Path, url: str | None) -> _Backend:
    if url is None or url == "sqlite":
        return _SQLite(root / "registry.db")
    if not isinstance(url, str):
        raise RegistryError(f"url must be a database URL, got {url!r}")
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        # SQLAlchemy style: sqlite:///relative.db, sqlite:////absolute.db
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise RegistryError(
                f"url {url!r}: an SQLite URL is sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db"
            )
        return _SQLite(Path(url[len("sqlite:///") :]))
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        return _Postgres("postgresql://" + url.split("://", 1)[1] if "://" in url else url)
    raise RegistryError(
        f"url {_redact(url)!r}: unsupported database; use sqlite:///path.db or "
        "postgresql://user@host/db (or leave it out for root/registry.db)"
    )
