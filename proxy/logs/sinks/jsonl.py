"""JSON-lines sink: one JSON object per line, appended to a file."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from proxy.logs.record import LogRecord, encoder

T = TypeVar("T")


class JSONLSink:
    """Appends each batch with O_APPEND writes from one dedicated thread.

    Not idempotent: a batch replayed after a write of unknown outcome can appear twice.
    """

    name = "jsonl"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmrelay-log-jsonl")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def write(self, records: list[LogRecord]) -> None:
        if records:
            await self._run(self._write, records)

    def _write(self, records: list[LogRecord]) -> None:
        if self._fd is None:
            raise RuntimeError(f"jsonl log sink {self.path} is not open")
        data = encoder.encode_lines(records)
        # Unbuffered: the batch is on the OS side when this returns (the "flush"), and one
        # O_APPEND write per batch keeps lines from several processes from interleaving.
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    async def close(self) -> None:
        if self._executor is None:
            return
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=False)
            self._executor = None

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
