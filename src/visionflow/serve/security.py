"""API keys: stored as hashes, checked in constant time, granted by scope.

The key file has one ``scope:hash`` per line (``#`` starts a comment), where ``hash`` is
``sha256:<hex>`` or bare hex of the SHA-256 of the key. Keys are random tokens of 32 bytes (see
:func:`generate_key`), not passwords, so a plain SHA-256 is enough: there is nothing to brute
force, and a stolen file does not reveal a usable key. Make a line with::

    visionflow serve --hash-key predict            # prints a new key and its file line
    python -c "import hashlib,sys; print('predict:sha256:' +
        hashlib.sha256(sys.argv[1].encode()).hexdigest())" KEY      # (one line)

Scopes: ``predict`` (inference and read-only model listing) and ``admin`` (changes: rollouts,
reloads). ``admin`` includes ``predict``. Clients send ``Authorization: Bearer KEY`` or
``X-API-Key: KEY``. With no file configured, the API is open.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, Request

from visionflow.errors import ConfigError
from visionflow.serve._errors import ServeError

__all__ = ["SCOPES", "ApiKey", "KeyStore", "generate_key", "hash_key", "require_scope"]

SCOPES = ("predict", "admin")
_HEX = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """The stored form of ``key``: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random key (256 bits, URL-safe)."""
    return "vf_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    scope: str
    digest: bytes  # the raw 32-byte SHA-256


class KeyStore:
    """The configured keys; empty means open access."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self.keys = list(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @classmethod
    def from_file(cls, path: str | Path | None) -> KeyStore:
        """Read a key file; a malformed line is a :class:`ConfigError` naming the line."""
        if path is None:
            return cls()
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the API key file ({exc.strerror})") from None
        keys = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            scope, sep, digest = line.partition(":")
            scope = scope.strip()
            digest = digest.strip().lower().removeprefix("sha256:")
            if not sep or scope not in SCOPES or not _HEX.match(digest):
                raise ConfigError(
                    f"{path}, line {number}: expected 'SCOPE:sha256:HEX' with SCOPE one of "
                    f"{list(SCOPES)} (make one with `visionflow serve --hash-key predict`)"
                )
            keys.append(ApiKey(scope, bytes.fromhex(digest)))
        if not keys:
            raise ConfigError(
                f"{path}: no keys in the API key file (an empty file would lock "
                "nobody out; remove --api-keys to serve without keys)"
            )
        return cls(keys)

    def scopes(self, presented: str) -> set[str]:
        """Scopes granted to ``presented`` (empty if it matches no key).

        Every stored digest is compared, in constant time, whatever matches first: the time
        taken says nothing about which key, or how much of one, was right.
        """
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        granted: set[str] = set()
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                granted.add(key.scope)
        if "admin" in granted:
            granted.add("predict")
        return granted


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        kind, _, value = auth.partition(" ")
        if kind.lower() == "bearer" and value.strip():
            return value.strip()
    header = request.headers.get("x-api-key")
    return header.strip() if header and header.strip() else None


def get_keys(request: Request) -> KeyStore:
    """The app's key store (a dependency: tests may override it)."""
    store: KeyStore = request.app.state.keys
    return store


def require_scope(scope: str) -> Callable[..., None]:
    """A dependency that lets a request through only with a key holding ``scope``.

    401 when no key or an unknown key is sent, 403 when the key lacks the scope.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def check(request: Request, keys: KeyStore = Depends(get_keys)) -> None:
        if not keys.enabled:
            return
        presented = _presented_key(request)
        if presented is None:
            raise ServeError(
                401,
                "unauthorized",
                "an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        granted = keys.scopes(presented)
        if not granted:
            raise ServeError(
                401, "unauthorized", "unknown API key", headers={"WWW-Authenticate": "Bearer"}
            )
        if scope not in granted:
            raise ServeError(403, "forbidden", f"this API key lacks the {scope!r} scope")

    check.__name__ = f"require_{scope}"
    return check
