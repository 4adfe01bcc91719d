"""Limit windows: fixed, calendar-aligned, in UTC.

A counter belongs to one window; its key carries the window's start, so a new window starts
from zero without anyone resetting anything, and the old counter simply expires.
"""

from __future__ import annotations

import calendar
import functools
import time
from datetime import UTC, datetime, timedelta
from typing import Literal

Window = Literal["minute", "hour", "day", "week", "month", "year", "lifetime"]
WINDOWS: tuple[str, ...] = ("minute", "hour", "day", "week", "month", "year", "lifetime")
FIXED = {"minute": 60, "hour": 3600, "day": 86400}


def bounds(window: str, now: float) -> tuple[int, float | None]:
    """(start, end) of the window holding `now`, in unix seconds; a lifetime window never ends."""
    size = FIXED.get(window)
    if size is not None:
        start = int(now // size * size)
        return start, float(start + size)
    if window == "lifetime":
        return 0, None
    return _calendar_bounds(window, int(now // 86400))


@functools.lru_cache(maxsize=64)
def _calendar_bounds(window: str, day_number: int) -> tuple[int, float]:
    """Week, month and year windows of the UTC day `day_number` (days since the epoch): the
    same for every request of that day, so worked out once."""
    day = datetime.fromtimestamp(day_number * 86400, UTC)
    if window == "week":  # ISO weeks start on Monday
        first = day - timedelta(days=day.weekday())
        following = first + timedelta(days=7)
    elif window == "month":
        first = day.replace(day=1)
        following = first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1)
    elif window == "year":
        first = day.replace(month=1, day=1)
        following = first.replace(year=first.year + 1)
    else:
        raise ValueError(f"unknown window {window!r}; expected one of {', '.join(WINDOWS)}")
    return calendar.timegm(first.timetuple()), float(calendar.timegm(following.timetuple()))


def seconds_left(end: float | None, now: float | None = None) -> int | None:
    """Whole seconds until the window resets (at least 1), or None when it never does."""
    if end is None:
        return None
    return max(int(-(-(end - (time.time() if now is None else now)) // 1)), 1)
