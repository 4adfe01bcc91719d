"""Log sinks: where the LogQueue's writer puts batches of LogRecords."""

from __future__ import annotations

from typing import Protocol

from proxy.logs.record import LogRecord
from proxy.settings import LogSink


class RejectedRecords(Exception):
    """Raised by `write` when every record was written except `records`, which the destination
    refuses for good (a receiver that answers 400 for them). The LogQueue moves those to a
    dead-letter file instead of replaying them forever behind the rest."""

    def __init__(self, records: list[LogRecord], reason: str) -> None:
        super().__init__(reason)
        self.records = records
        self.reason = reason


class Sink(Protocol):
    """A destination for log records.

    `write` raises on failure (the queue then spools the batch for this sink) and must be
    idempotent per `unique_id` where the sink can be: a spooled batch may be replayed after a
    write whose outcome was unknown.
    """

    name: str

    async def open(self) -> None: ...

    async def write(self, records: list[LogRecord]) -> None: ...

    async def close(self) -> None: ...


def make_sink(config: LogSink) -> Sink:
    """The sink a config entry describes (settings validation made sure its fields are there)."""
    if config.type == "sqlite":
        from proxy.logs.sinks.sqlite import SQLiteSink

        return SQLiteSink(config.path or "")
    if config.type == "jsonl":
        from proxy.logs.sinks.jsonl import JSONLSink

        return JSONLSink(config.path or "")
    if config.type == "postgres":
        from proxy.logs.sinks.postgres import PostgresSink

        return PostgresSink(config.dsn or "", pool_size=config.pool_size)
    if config.type == "http":
        from proxy.logs.sinks.http import HTTPSink

        return HTTPSink(config.url or "", api_key=config.api_key, timeout=config.timeout, retries=config.retries)
    raise ValueError(f"unknown log sink type {config.type!r}: expected sqlite, jsonl, postgres or http")
