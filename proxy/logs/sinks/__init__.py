"""Log sinks: where the LogQueue's writer puts batches of LogRecords."""

from __future__ import annotations

from typing import Protocol

from proxy.logs.record import LogRecord


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


def make_sink(type: str, path: str) -> Sink:
    if type == "sqlite":
        from proxy.logs.sinks.sqlite import SQLiteSink

        return SQLiteSink(path)
    if type == "jsonl":
        from proxy.logs.sinks.jsonl import JSONLSink

        return JSONLSink(path)
    raise ValueError(f"unknown log sink type {type!r}: expected 'sqlite' or 'jsonl'")
