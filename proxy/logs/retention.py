"""Retention: a background task that blurs old logs' content and deletes older rows."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from proxy.logs.stores import LogStore
from proxy.metrics import Metrics
from proxy.settings import Retention

log = logging.getLogger("llmrelay.logs")
DAY = 86400.0


async def apply_retention(store: LogStore, retention: Retention, metrics: Metrics, now: float | None = None) -> tuple[int, int]:
    """One pass: (rows blurred, rows deleted)."""
    now = time.time() if now is None else now
    content_before = now - retention.content_days * DAY if retention.content_days is not None else None
    delete_before = now - retention.delete_days * DAY if retention.delete_days is not None else None
    blurred, deleted = await store.purge(content_before=content_before, delete_before=delete_before)
    if blurred:
        metrics.log_retention.labels("blurred").inc(blurred)
    if deleted:
        metrics.log_retention.labels("deleted").inc(deleted)
    if blurred or deleted:
        log.info("log retention: %d rows blurred, %d deleted", blurred, deleted)
    return blurred, deleted


async def run_retention(store: LogStore, retention: Retention, metrics: Metrics) -> None:
    """Forever: a pass, then `interval` seconds (with jitter, so that workers spread out)."""
    while True:
        try:
            await apply_retention(store, retention, metrics)
        except Exception:
            log.exception("log retention pass failed; trying again next interval")
        await asyncio.sleep(retention.interval * random.uniform(0.8, 1.2))
