"""A sink whose blocking file work runs on one dedicated thread, never on the event loop."""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from proxy.logs.record import LogRecord

T = TypeVar("T")


class ThreadedSink(abc.ABC):
    """Subclasses implement the blocking `_open`, `_write` and `_close`; the thread owns their state."""

    name = "threaded"
    path: Path  # the file the subclass writes

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llmrelay-log-{self.name}")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        await self._run(self._open)

    async def write(self, records: list[LogRecord]) -> None:
        if records:
            await self._run(self._write, records)

    async def close(self) -> None:
        if self._executor is None:
            return
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def check(self) -> None:
        """Readiness: the file can be written (checked on a thread of its own, so a batch being
        written on the sink's thread does not hold it up)."""
        await asyncio.to_thread(_check_writable, self.path)

    @abc.abstractmethod
    def _open(self) -> None: ...

    @abc.abstractmethod
    def _write(self, records: list[LogRecord]) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...


def _check_writable(path: Path) -> None:
    """Raise when `path` (or, before it exists, its folder) cannot be written."""
    target = path if path.exists() else path.parent
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist")
    if not os.access(target, os.W_OK):
        raise PermissionError(f"{target} is not writable")
