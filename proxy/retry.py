"""Retry timing shared by everything that retries over HTTP: a reply's Retry-After, and
exponential back-off with jitter."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """A reply's `retry-after-ms` or `Retry-After` (seconds or an HTTP date), in seconds."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    seconds = headers.get("retry-after")
    if ms is None and seconds is None:
        for name, value in headers.items():  # a Reply built by something other than the upstream client
            lower = name.lower()
            if lower == "retry-after-ms":
                ms = value
            elif lower == "retry-after":
                seconds = value
    if ms is not None:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    if seconds is not None:
        try:
            value = float(seconds)
        except ValueError:
            try:
                value = parsedate_to_datetime(seconds).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
            return max(value, 0.0)
        if math.isfinite(value) and value >= 0:
            return value
    return None


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds before try `attempt + 1`: base * 2^(attempt-1), capped, half of it random, so that
    many clients retrying at once spread out."""
    step = min(cap, base * 2 ** (attempt - 1))
    return step / 2 + random.uniform(0, step / 2)
