"""The server's error answers: ``{"error": {"code", "message"}}`` and a status, never a trace."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from visionflow.errors import ImageDecodeError

__all__ = ["ServeError", "decode_error", "queue_full", "unknown_model", "unknown_version"]


class ServeError(Exception):
    """An error answer: HTTP ``status``, a stable machine ``code`` and a human ``message``."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


def decode_error(exc: ImageDecodeError) -> ServeError:
    """The answer for an image that cannot be used, by what was wrong with it."""
    reason = exc.reason
    if "more than the limit" in reason or "decompression-bomb" in reason:
        return ServeError(413, "image_too_large", f"{exc.path}: {reason}")
    if reason == "empty file":
        return ServeError(422, "empty_upload", f"{exc.path}: empty file")
    if reason.startswith("not an image"):
        return ServeError(422, "not_an_image", f"{exc.path}: {reason}")
    return ServeError(422, "corrupt_image", f"{exc.path}: {reason}")


def queue_full(name: str, version: int) -> ServeError:
    """The answer when a version's queue is full (see ``ServeSettings.queue``)."""
    return ServeError(
        503,
        "queue_full",
        f"{name} version {version} is busy; retry shortly",
        headers={"Retry-After": "1"},
    )


def _suggest(given: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(given, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_model(name: str, known: Iterable[str]) -> ServeError:
    known = sorted(known)
    return ServeError(
        404,
        "unknown_model",
        f"no model named {name!r}{_suggest(name, known)} (served: {', '.join(known) or 'none'})",
    )


def unknown_version(
    name: str, ref: str, versions: Iterable[int], aliases: Iterable[str]
) -> ServeError:
    have = [str(v) for v in sorted(versions)] + sorted(aliases)
    return ServeError(
        404,
        "unknown_version",
        f"model {name!r} has no version {ref!r}{_suggest(ref, have)} (has: {', '.join(have)})",
    )
