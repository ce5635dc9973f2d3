"""How every ``visionflow`` command reports errors; shared by the main CLI and its sub-apps
(a module of its own, so a sub-app need not import :mod:`visionflow.cli`, which imports it)."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from visionflow.errors import VisionflowError

__all__ = ["err", "handle_errors"]

#: Where errors and progress go (stdout stays clean for --json and --format output).
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    """Turn library errors into one red line and the error's exit code, no traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except VisionflowError as exc:
            # soft_wrap: a long path must stay on one line (copyable); escape: messages hold
            # lists like "['a', 'b']" that Rich would otherwise read as markup
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
