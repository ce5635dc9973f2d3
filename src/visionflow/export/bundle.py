"""The model bundle: one verified container for everything after training.

A bundle is a directory holding the model files (``model.onnx``, optionally ``model.int8.onnx``,
``model.fp16.onnx``, ``weights.safetensors``, the ``README.md`` model card) and ``model.json``,
the manifest: the caller's metadata (task, classes, preprocessing, metrics...) plus

* ``"format"``: ``"visionflow-bundle/1"``; a reader refuses another major version, because it
  cannot know what a newer writer meant. A larger minor version (``/1.3``) only adds fields and
  is accepted.
* ``"files"``: ``{name: {"sha256": hex, "bytes": n}}`` for every file, so that a tampered,
  truncated or missing file is refused by name before anything loads it.
* ``"checksum"``: the sha256 of the manifest itself in canonical JSON (keys sorted, no spaces,
  UTF-8) without this field. A file cannot hold its own hash; this way a flipped byte in
  ``model.json`` is refused too (as invalid JSON, or as a checksum mismatch).

The checksums catch corruption and careless edits, not a determined forger (who can recompute
them); authenticity would need a signature, which is outside this format.

Nothing here unpickles anything or imports torch: serving needs only the standard library.

**Archive format.** A ``.vfb`` file is a zip of the bundle directory, chosen over tar because

* zip has a central directory: every member's name, type and declared size is known, and
  refused if wrong, *before* a single byte is extracted; a tar must be read to its end first;
* each member picks its compression: ``.onnx`` / ``.safetensors`` are ``ZIP_STORED`` (float
  weights barely compress and deflating hundreds of MB costs seconds), text is ``DEFLATE``;
* tar can express symlinks, hard links and devices natively (the usual extraction exploits), and
  Python 3.11's ``tarfile`` has no safe extraction filter; in zip the only such thing is a Unix
  mode in ``external_attr``, which we refuse;
* any operating system opens a zip without extra tools.

Extraction never trusts the archive: names are checked (no absolute paths, ``..``, backslashes,
drive letters, duplicates, case-insensitive clashes), only regular files listed in the
manifest are accepted, member count and sizes are bounded by :class:`Limits`, and the bytes
actually decompressed are counted while streaming (headers can lie), so a zip bomb stops at the
limit. Archives are written deterministically (fixed timestamps and modes), so packing the
same bundle twice gives the same bytes and the same cache entry.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionflow._io import _fsync_dir, atomic_write, sha256_file
from visionflow.errors import BundleError

__all__ = [
    "ARCHIVE_SUFFIX",
    "BUNDLE_FORMAT",
    "MANIFEST",
    "Bundle",
    "Limits",
    "default_cache_dir",
    "open_bundle",
    "pack",
    "verify_bundle",
    "write_bundle",
]

#: Format of the bundles this version writes; readers accept any ``visionflow-bundle/1.x``.
BUNDLE_FORMAT = "visionflow-bundle/1"
#: The manifest's file name, at the root of every bundle.
MANIFEST = "model.json"
#: Suffix of single-file bundles (a zip archive; opened by content, whatever its suffix).
ARCHIVE_SUFFIX = ".vfb"

_FORMAT_NAME = "visionflow-bundle"
_FORMAT_MAJOR = 1
_FORMAT_RE = re.compile(r"visionflow-bundle/(\d+)(?:\.(\d+))?")
_RESERVED = ("format", "files", "checksum")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
#: model.json is read whole into memory; no real manifest comes near this.
_MAX_MANIFEST_BYTES = 64 << 20
#: The compression-ratio test starts after this many bytes: a tiny member with a high ratio
#: (a README of blank lines) is harmless, and the ratio of a few bytes is noise.
_RATIO_FLOOR = 1 << 20
#: Weights and graphs: stored, not deflated (they barely compress).
_STORED_SUFFIXES = (".onnx", ".safetensors", ".bin", ".npy", ".npz")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


@dataclass(frozen=True)
class Limits:
    """Bounds on what extracting an archive may produce; the defaults fit any real model.

    Attributes:
        max_files: Most members an archive may hold (manifest included).
        max_file_bytes: Most bytes one member may decompress to.
        max_total_bytes: Most bytes all members together may decompress to.
        max_ratio: Most uncompressed bytes per compressed byte of one compressed member
            (a zip bomb reaches thousands; real ONNX/JSON stays far below 200).
    """

    max_files: int = 64
    max_file_bytes: int = 4 << 30
    max_total_bytes: int = 8 << 30
    max_ratio: float = 200.0

    def __post_init__(self) -> None:
        for name in ("max_files", "max_file_bytes", "max_total_bytes", "max_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise BundleError(f"Limits.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk, ready to load from.

    Attributes:
        path: The verified bundle directory (for an archive: its extracted copy in the cache).
        meta: The manifest (``model.json``), already checked.
        source: What the user opened (the directory, or the ``.vfb`` archive).
    """

    path: Path
    meta: dict[str, Any] = field(repr=False)
    source: Path

    def file(self, name: str) -> Path:
        """The path of ``name``; only files the manifest lists (and verified) are served.

        Extra files a user dropped in a bundle directory are never handed out, so nothing
        unverified is ever loaded.
        """
        if not self.has(name):
            listed = sorted(self.meta.get("files", {}))
            raise BundleError(f"{self.source}: the bundle has no file {name!r}; it has {listed}")
        return self.path / name

    def has(self, name: str) -> bool:
        """Whether the manifest lists ``name`` (``model.json`` itself counts)."""
        return name == MANIFEST or name in self.meta.get("files", {})


# ---------------------------------------------------------------------------- writing


def write_bundle(
    directory: str | os.PathLike[str],
    files: Mapping[str, str | os.PathLike[str] | bytes],
    meta: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a bundle directory: copy ``files`` in and record each one's hash in ``model.json``.

    The bundle is built in a hidden sibling directory and renamed into place, so a reader never
    sees a half-written bundle and a failure leaves any previous one untouched.

    Args:
        directory: Where the bundle goes.
        files: Bundle-relative POSIX names (``"model.onnx"``, ``"extra/labels.txt"``) mapped to
            a source file or its bytes. ``model.json`` is written here, not passed in.
        meta: The manifest's content; must be JSON-serialisable. The keys ``format``,
            ``files`` and ``checksum`` belong to the bundle and are overwritten.
        overwrite: Replace an existing ``directory``. Without it an existing path is refused,
            so an export never silently destroys a previous model.

    Returns:
        The bundle directory.

    Raises:
        BundleError: A bad name, a missing source, unserialisable ``meta``, or ``directory``
            exists and ``overwrite`` is false.
    """
    target = Path(directory)
    _check_target(target, overwrite=overwrite)
    names = list(files)
    for name in names:
        _check_name(name, where="write_bundle")
    _check_name_set(names, where="write_bundle")
    if not isinstance(meta, Mapping):
        raise BundleError(f"meta must be a mapping, got {type(meta).__name__}")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        entries: dict[str, dict[str, Any]] = {}
        for name in sorted(names):
            entries[name] = _copy_in(files[name], tmp / name, name)
        body = {**meta, "format": BUNDLE_FORMAT, "files": entries}
        body.pop("checksum", None)
        try:
            # A JSON round trip first, so the checksum covers exactly what a reader will parse
            # (tuples become lists, int keys become strings).
            body = json.loads(json.dumps(body, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise BundleError(f"meta cannot be written as JSON: {exc}") from exc
        manifest = {**body, "checksum": _manifest_checksum(body)}
        text = json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        _write_synced(tmp / MANIFEST, text.encode("utf-8"))
        _fsync_dir(tmp)
        _swap_in(tmp, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def pack(
    directory: str | os.PathLike[str],
    archive: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Pack a bundle directory into a single-file ``.vfb`` archive.

    Every listed file is checked against the manifest while it is copied (one read per file),
    so a damaged directory never becomes an archive that looks sound. The archive is written to
    a temp file and renamed into place.

    Args:
        directory: A bundle directory (as written by :func:`write_bundle`).
        archive: The archive to write; ``.vfb`` by convention.
        overwrite: Replace an existing ``archive``.

    Returns:
        The archive path.

    Raises:
        BundleError: The directory does not verify, or ``archive`` exists and ``overwrite`` is
            false.
    """
    source = Path(directory)
    target = Path(archive)
    manifest, manifest_bytes = _read_manifest(source)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise BundleError(f"{target} already exists; pass overwrite=True to replace it")
    if target.is_dir() and not target.is_symlink():
        raise BundleError(f"{target} is a directory; an archive must be a file path")

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            with zf.open(_zip_info(MANIFEST, len(manifest_bytes)), "w") as out:
                out.write(manifest_bytes)
            for name, entry in manifest["files"].items():
                info = _zip_info(name, entry["bytes"])
                with zf.open(info, "w") as out:
                    _verify_file(source, name, entry, sink=out.write)

    return atomic_write(target, write)


# ---------------------------------------------------------------------------- reading


def verify_bundle(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a bundle directory against its manifest and return the manifest.

    Every listed file must exist as a regular file (not a symlink, which could point anywhere)
    with the recorded size and sha256. Files the manifest does not list are ignored: users may
    keep notes beside a model, and :meth:`Bundle.file` never serves them.

    Raises:
        BundleError: Naming the first file that is missing, truncated, altered or unsafe, or
            the manifest itself when it is malformed, altered or of an unknown format.
    """
    root = Path(directory)
    manifest, _ = _read_manifest(root)
    for name, entry in manifest["files"].items():
        _verify_file(root, name, entry)
    return manifest


def open_bundle(
    path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    limits: Limits | None = None,
) -> Bundle:
    """Open and verify a bundle directory or ``.vfb`` archive.

    A directory is verified in place. An archive (recognised by its content, not its suffix)
    is extracted safely into ``<cache>/bundles/<sha256 of the archive>`` and checked while it
    streams; a copy extracted earlier is reused after it verifies again. Extraction goes to a
    private temp directory renamed into place, so processes opening the same archive at once
    never see each other's half-written files: whoever renames second uses the winner's copy.

    Args:
        path: A bundle directory or archive.
        cache_dir: Where archives are extracted; default :func:`default_cache_dir`.
        limits: Bounds on the archive's members; default :class:`Limits`.

    Returns:
        The verified :class:`Bundle`.

    Raises:
        BundleError: The path is missing, neither kind of bundle, unsafe to extract, or does
            not verify.
    """
    source = Path(path)
    if source.is_dir():
        meta = verify_bundle(source)
        return Bundle(path=source, meta=meta, source=source)
    if not source.exists():
        raise BundleError(f"{source}: no such bundle (expected a directory or a .vfb archive)")
    if not source.is_file():
        raise BundleError(f"{source} is neither a bundle directory nor a .vfb archive")
    with open(source, "rb") as fh:
        head = fh.read(4)
    if head not in _ZIP_MAGIC:
        raise BundleError(
            f"{source} is neither a bundle directory nor a {ARCHIVE_SUFFIX} archive "
            "(a .vfb is a zip file; it does not start like one)"
        )
    limits = limits or Limits()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    store = root / "bundles"
    store.mkdir(parents=True, exist_ok=True)
    digest = sha256_file(source)
    dest = store / digest

    with _open_zip(source) as zf:
        manifest_bytes = _check_members(zf, source, limits)
        manifest = _parse_manifest(manifest_bytes, source)

        cached = _reuse(dest, manifest)
        if cached is not None:
            return Bundle(path=dest, meta=cached, source=source)

        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", suffix=".tmp", dir=store))
        try:
            _extract(zf, source, tmp, manifest, manifest_bytes, limits)
            try:
                os.rename(tmp, dest)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # Another process finished first: its copy holds the same bytes.
                shutil.rmtree(tmp, ignore_errors=True)
                meta = verify_bundle(dest)
                return Bundle(path=dest, meta=meta, source=source)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _fsync_dir(store)
    return Bundle(path=dest, meta=manifest, source=source)


def default_cache_dir() -> Path:
    """``$VISIONFLOW_CACHE``, else ``$XDG_CACHE_HOME/visionflow``, else ``~/.cache/visionflow``.

    Read at call time, so tests and servers can point it elsewhere through the environment.
    """
    env = os.environ
    if env.get("VISIONFLOW_CACHE"):
        return Path(env["VISIONFLOW_CACHE"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "visionflow"


# ---------------------------------------------------------------------------- manifest


def _manifest_checksum(body: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest without its ``checksum`` field."""
    rest = {k: v for k, v in body.items() if k != "checksum"}
    canonical = json.dumps(
        rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _read_manifest(root: Path) -> tuple[dict[str, Any], bytes]:
    """The checked manifest of the bundle directory ``root`` and its raw bytes."""
    if not root.exists():
        raise BundleError(f"{root}: no such bundle directory")
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle directory")
    path = root / MANIFEST
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise BundleError(
            f"{root}: {MANIFEST} is missing; this is not a visionflow bundle"
        ) from None
    except OSError as exc:
        raise BundleError(f"{root}: cannot read {MANIFEST} ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise BundleError(f"{root}: {MANIFEST} is not a regular file")
        data = fh.read(_MAX_MANIFEST_BYTES + 1)
    if len(data) > _MAX_MANIFEST_BYTES:
        raise BundleError(f"{root}: {MANIFEST} is larger than {_MAX_MANIFEST_BYTES} bytes")
    return _parse_manifest(data, root), data


def _parse_manifest(data: bytes, where: Path) -> dict[str, Any]:
    """Parse and check ``model.json``: JSON object, known format, checksum, file table."""
    try:
        manifest = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(
            f"{where}: {MANIFEST} is not valid JSON ({exc}); the bundle is corrupted"
        ) from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: {MANIFEST} must hold a JSON object")
    _check_format(manifest.get("format"), where)
    checksum = manifest.get("checksum")
    if not isinstance(checksum, str):
        raise BundleError(f"{where}: {MANIFEST} has no checksum field")
    try:
        expected = _manifest_checksum(manifest)
    except ValueError as exc:  # NaN or Infinity
        raise BundleError(f"{where}: {MANIFEST} holds a non-finite number ({exc})") from None
    if checksum != expected:
        raise BundleError(
            f"{where}: {MANIFEST} does not match its checksum (tampered or corrupted)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{where}: {MANIFEST} has no 'files' table")
    for name, entry in files.items():
        _check_name(name, where=f"{where}: {MANIFEST}")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _SHA_RE.fullmatch(entry["sha256"])
            or isinstance(entry.get("bytes"), bool)
            or not isinstance(entry.get("bytes"), int)
            or entry["bytes"] < 0
        ):
            raise BundleError(
                f"{where}: {MANIFEST} entry {name!r} needs a hex 'sha256' and a size in 'bytes'"
            )
    _check_name_set(list(files), where=f"{where}: {MANIFEST}")
    return manifest


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers may keep different copies of a duplicated key; refuse the ambiguity.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _check_format(value: Any, where: Path) -> None:
    if not isinstance(value, str) or not value.startswith(f"{_FORMAT_NAME}/"):
        raise BundleError(
            f"{where}: {MANIFEST} has format {value!r}, not {BUNDLE_FORMAT!r}; "
            "this is not a visionflow bundle"
        )
    match = _FORMAT_RE.fullmatch(value)
    if match is None:
        raise BundleError(f"{where}: {MANIFEST} has a malformed format {value!r}")
    major = int(match.group(1))
    if major > _FORMAT_MAJOR:
        raise BundleError(
            f"{where}: bundle format {value!r} is newer than this visionflow understands "
            f"({BUNDLE_FORMAT!r}); upgrade visionflow to open it"
        )
    if major != _FORMAT_MAJOR:
        raise BundleError(
            f"{where}: unknown bundle format {value!r}; this visionflow reads {BUNDLE_FORMAT!r}"
        )


# ---------------------------------------------------------------------------- names


def _check_name(name: Any, *, where: str) -> None:
    """A bundle-relative POSIX path that cannot leave the bundle on any operating system."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{where}: file names must be non-empty strings, got {name!r}")
    if name == MANIFEST:
        raise BundleError(f"{where}: {MANIFEST} is written by the bundle itself, not listed")
    bad = None
    if len(name) > 1024:
        bad = "is too long"
    elif "\\" in name:
        bad = "contains a backslash (names use '/')"
    elif ":" in name:
        bad = "contains ':' (a drive letter or stream name)"
    elif name.startswith("/"):
        bad = "is an absolute path"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        bad = "contains a control character"
    else:
        for part in name.split("/"):
            if part in ("", ".", ".."):
                bad = "has an empty, '.' or '..' component"
                break
            if len(part.encode("utf-8")) > 255:
                bad = "has a component longer than 255 bytes"
                break
    if bad:
        raise BundleError(f"{where}: file name {name!r} {bad}")


def _check_name_set(names: list[str], *, where: str) -> None:
    """No two names that collide on a case-insensitive disk, and no file used as a folder."""
    seen: dict[str, str] = {}
    for name in names:
        key = name.casefold()
        if key in seen:
            raise BundleError(f"{where}: file names {seen[key]!r} and {name!r} clash")
        seen[key] = name
    folded = set(seen)
    for key, name in seen.items():
        parts = key.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in folded:
                raise BundleError(f"{where}: {name!r} lies inside another listed file")


# ---------------------------------------------------------------------------- files


def _verify_file(
    root: Path, name: str, entry: Mapping[str, Any], sink: Callable[[bytes], Any] | None = None
) -> None:
    """Check ``root/name`` against its manifest entry, feeding its bytes to ``sink`` if given."""
    expected = int(entry["bytes"])
    path = root
    for part in name.split("/")[:-1]:
        path = path / part
        if path.is_symlink() or not path.is_dir():
            raise BundleError(f"{root}: {name} is missing ({path.name}/ is not a folder)")
    path = root / name
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise BundleError(f"{root}: {name} is missing (listed in {MANIFEST})") from None
    except OSError as exc:
        if path.is_symlink():
            raise BundleError(f"{root}: {name} is a symlink; a bundle holds files only") from None
        raise BundleError(f"{root}: cannot read {name} ({exc.strerror})") from exc
    digest = hashlib.sha256()
    count = 0
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{root}: {name} is not a regular file")
        _check_size(root, name, info.st_size, expected)
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            count += len(chunk)
            if count > expected:
                break
            digest.update(chunk)
            if sink is not None:
                sink(chunk)
    _check_size(root, name, count, expected)
    if digest.hexdigest() != entry["sha256"]:
        raise BundleError(f"{root}: {name} does not match its checksum (tampered or corrupted)")


def _check_size(root: Path, name: str, actual: int, expected: int) -> None:
    if actual < expected:
        raise BundleError(
            f"{root}: {name} is truncated ({actual} bytes, {MANIFEST} records {expected})"
        )
    if actual > expected:
        raise BundleError(
            f"{root}: {name} is larger than recorded ({actual} bytes, {MANIFEST} records "
            f"{expected}); tampered or corrupted"
        )


def _copy_in(source: str | os.PathLike[str] | bytes, dest: Path, name: str) -> dict[str, Any]:
    """Copy one file into the bundle being built; its manifest entry."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        _write_synced(dest, data)
        return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if not isinstance(source, str | os.PathLike):
        raise BundleError(f"{name}: the source must be a path or bytes, got {type(source)}")
    src = Path(source)
    if not src.is_file():
        raise BundleError(f"{name}: source file {src} does not exist or is not a file")
    digest = hashlib.sha256()
    count = 0
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        for chunk in iter(lambda: fin.read(_CHUNK), b""):
            digest.update(chunk)
            count += len(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return {"sha256": digest.hexdigest(), "bytes": count}


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _check_target(target: Path, *, overwrite: bool) -> None:
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise BundleError(f"{target} already exists; pass overwrite=True to replace it")


def _swap_in(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Rename the finished ``tmp`` directory to ``target``, replacing it if allowed.

    POSIX cannot atomically swap two directories, so an existing ``target`` is first renamed
    aside: a reader in that instant finds no bundle rather than half of one.
    """
    if not (target.exists() or target.is_symlink()):
        try:
            os.rename(tmp, target)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if not overwrite:
                raise BundleError(
                    f"{target} already exists; pass overwrite=True to replace it"
                ) from None
        else:
            _fsync_dir(target.parent)
            return
    if not overwrite:
        raise BundleError(f"{target} already exists; pass overwrite=True to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    aside = old / "previous"
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        shutil.rmtree(old, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- archives


def _zip_info(name: str, size: int) -> zipfile.ZipInfo:
    """A deterministic member header: fixed date and mode, compression by file kind."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.create_system = 3  # Unix, so the mode below means what it says
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    stored = name.lower().endswith(_STORED_SUFFIXES)
    info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    info.file_size = size
    return info


@contextlib.contextmanager
def _open_zip(source: Path) -> Iterator[zipfile.ZipFile]:
    try:
        with zipfile.ZipFile(source) as zf:
            yield zf
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as exc:
        raise BundleError(f"{source}: the archive is damaged ({exc})") from None
    except NotImplementedError as exc:
        raise BundleError(f"{source}: the archive uses an unsupported feature ({exc})") from None


def _check_members(zf: zipfile.ZipFile, source: Path, limits: Limits) -> bytes:
    """Refuse an unsafe archive from its directory alone; the raw ``model.json`` bytes."""
    infos = zf.infolist()
    if len(infos) > limits.max_files:
        raise BundleError(
            f"{source}: the archive has {len(infos)} members, more than the limit of "
            f"{limits.max_files}"
        )
    seen: set[str] = set()
    declared = 0
    for info in infos:
        name = info.filename
        if name.endswith("/"):
            raise BundleError(f"{source}: member {name!r} is a folder entry; not allowed")
        if name != MANIFEST:
            _check_name(name, where=f"{source}: member")
        if name.casefold() in seen:
            raise BundleError(f"{source}: member {name!r} appears more than once")
        seen.add(name.casefold())
        # A Unix mode with no file type (Python's own writestr) means a plain file.
        kind_bits = stat.S_IFMT(info.external_attr >> 16)
        if info.create_system == 3 and kind_bits not in (0, stat.S_IFREG):
            kind = "a symlink" if kind_bits == stat.S_IFLNK else "not a regular file"
            raise BundleError(f"{source}: member {name!r} is {kind}; a bundle holds files only")
        if info.flag_bits & 0x1:
            raise BundleError(f"{source}: member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BundleError(
                f"{source}: member {name!r} uses compression method {info.compress_type}; "
                "only stored and deflate are accepted"
            )
        if info.file_size > limits.max_file_bytes:
            raise BundleError(
                f"{source}: member {name!r} declares {info.file_size} bytes, more than the "
                f"per-file limit of {limits.max_file_bytes}"
            )
        declared += info.file_size
    if declared > limits.max_total_bytes:
        raise BundleError(
            f"{source}: the archive declares {declared} bytes in all, more than the limit of "
            f"{limits.max_total_bytes}"
        )
    if MANIFEST not in zf.NameToInfo:
        raise BundleError(f"{source}: the archive has no {MANIFEST}; not a visionflow bundle")
    cap = min(_MAX_MANIFEST_BYTES, limits.max_file_bytes)
    data = bytearray()
    for chunk in _stream(zf, zf.getinfo(MANIFEST), source, cap, limits, os.path.getsize(source)):
        data += chunk
    return bytes(data)


def _stream(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    source: Path,
    cap: int,
    limits: Limits,
    archive_size: int,
    total: list[int] | None = None,
    too_big: str = "more than the per-file limit",
) -> Iterator[bytes]:
    """Yield a member's bytes, counting what is really decompressed (headers can lie).

    More than ``cap`` bytes is refused with ``too_big`` as the reason; ``total`` (a one-item
    counter shared by all members) bounds the archive as a whole.
    """
    name = info.filename
    # The compressed size is only as large as the archive can hold.
    compressed = max(1, min(info.compress_size, archive_size))
    ratio_applies = info.compress_type != zipfile.ZIP_STORED
    count = 0
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(_CHUNK):
                count += len(chunk)
                if count > cap:
                    raise BundleError(
                        f"{source}: member {name!r} decompresses to {too_big} ({cap} bytes); "
                        "refused"
                    )
                if total is not None:
                    total[0] += len(chunk)
                    if total[0] > limits.max_total_bytes:
                        raise BundleError(
                            f"{source}: the archive decompresses to more than the limit of "
                            f"{limits.max_total_bytes} bytes; refused"
                        )
                if ratio_applies and count > _RATIO_FLOOR and count > limits.max_ratio * compressed:
                    raise BundleError(
                        f"{source}: member {name!r} expands more than {limits.max_ratio:g} times "
                        "(a compression bomb); refused"
                    )
                yield chunk
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise BundleError(f"{source}: member {name!r} is damaged ({exc})") from None


def _extract(
    zf: zipfile.ZipFile,
    source: Path,
    target: Path,
    manifest: Mapping[str, Any],
    manifest_bytes: bytes,
    limits: Limits,
) -> None:
    """Extract the checked members of ``zf`` into the empty private folder ``target``.

    Each member is hashed while it streams, so a tampered file is refused by name without
    reading it twice; files are created with ``O_EXCL | O_NOFOLLOW`` so nothing already there
    (a planted symlink) is written through.
    """
    files: Mapping[str, Mapping[str, Any]] = manifest["files"]
    members = [n for n in zf.NameToInfo if n != MANIFEST]
    for name in members:
        if name not in files:
            raise BundleError(
                f"{source}: member {name!r} is not listed in {MANIFEST}; refused (a bundle "
                "archive holds only what its manifest lists)"
            )
    for name in files:
        if name not in zf.NameToInfo:
            raise BundleError(f"{source}: {name} is missing (listed in {MANIFEST})")
    declared = sum(int(entry["bytes"]) for entry in files.values()) + len(manifest_bytes)
    if declared > limits.max_total_bytes:
        raise BundleError(
            f"{source}: {MANIFEST} records {declared} bytes in all, more than the limit of "
            f"{limits.max_total_bytes}"
        )

    base = os.path.realpath(target)
    archive_size = os.path.getsize(source)
    total = [len(manifest_bytes)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    _write_synced(target / MANIFEST, manifest_bytes)
    for name, entry in files.items():
        dest = target / name
        # Belt and braces: names are already checked, but never write outside ``target``.
        if os.path.commonpath([base, os.path.realpath(dest)]) != base:
            raise BundleError(f"{source}: member {name!r} would be written outside the bundle")
        expected = int(entry["bytes"])
        if expected > limits.max_file_bytes:
            raise BundleError(
                f"{source}: {MANIFEST} records {expected} bytes for {name}, more than the "
                f"per-file limit of {limits.max_file_bytes}"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        count = 0
        with os.fdopen(os.open(dest, flags, 0o644), "wb") as out:
            stream = _stream(
                zf,
                zf.getinfo(name),
                source,
                expected,
                limits,
                archive_size,
                total,
                too_big=f"more than the size {MANIFEST} records (tampered or corrupted)",
            )
            for chunk in stream:
                count += len(chunk)
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        _check_size(source, name, count, expected)
        if digest.hexdigest() != entry["sha256"]:
            raise BundleError(
                f"{source}: {name} does not match its checksum (tampered or corrupted)"
            )
    _fsync_dir(target)


def _reuse(dest: Path, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest of a cached extraction that still verifies, else ``None`` (and it is gone).

    The cached manifest must equal the archive's, so a cache entry cannot be swapped for a
    different (if internally consistent) bundle.
    """
    if not (dest.exists() or dest.is_symlink()):
        return None
    try:
        if dest.is_symlink():
            raise BundleError(f"{dest} is a symlink")
        meta = verify_bundle(dest)
        if meta != manifest:
            raise BundleError(f"{dest} holds a different bundle")
        return meta
    except BundleError:
        # Broken (disk error, a user's edit): move it aside atomically and extract afresh.
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name[:16]}.", suffix=".old", dir=dest.parent))
        with contextlib.suppress(OSError):
            os.rename(dest, trash / "broken")
        shutil.rmtree(trash, ignore_errors=True)
        return None
