"""Wall-clock budgets: ``"10m"`` on the command line, a :class:`Deadline` in the code.

Every phase of a run asks the deadline how much time is left before it starts something it
cannot interrupt cheaply (an epoch, a feature pass), so the whole run ends inside the budget.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from visionflow.errors import BudgetError

__all__ = ["Deadline", "format_seconds", "parse_budget"]

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|d)?", re.IGNORECASE)


def parse_budget(value: str | float | int | None) -> float | None:
    """Parse ``"90s"``, ``"10m"``, ``"1h30m"``, ``"1.5h"`` or a number of seconds.

    Returns:
        Seconds, or ``None`` for no budget (``None``, ``""``, ``"none"``, ``"inf"``).

    Raises:
        BudgetError: the text is not a duration, or it is not positive.
    """
    if value is None:
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower().replace(" ", "")
        if text in {"", "none", "inf", "unlimited"}:
            return None
        pos, seconds = 0, 0.0
        for match in _PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]
            pos = match.end()
        if pos != len(text) or pos == 0:
            raise BudgetError(
                f"budget {value!r} is not a duration; use e.g. '90s', '10m', '1h30m' or seconds"
            )
    if seconds <= 0:
        raise BudgetError(f"budget must be positive, got {value!r}")
    return seconds


def format_seconds(seconds: float) -> str:
    """``754.2`` -> ``"12m34s"``: short durations for progress bars and reports."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@dataclass
class Deadline:
    """A monotonic wall-clock deadline; ``seconds=None`` never expires.

    ``spent`` carries time already used by an earlier process (a resumed run), so a run that is
    killed and resumed still respects the budget it was given as a whole.
    """

    seconds: float | None
    spent: float = 0.0
    _start: float = field(default_factory=time.monotonic, repr=False)

    def elapsed(self) -> float:
        return self.spent + (time.monotonic() - self._start)

    def remaining(self) -> float:
        if self.seconds is None:
            return float("inf")
        return self.seconds - self.elapsed()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def allows(self, seconds_needed: float) -> bool:
        """True when ``seconds_needed`` more seconds still fit in the budget."""
        return self.remaining() >= seconds_needed
