"""JSON-lines sink: one JSON object per line, appended to a file."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.logs.record import LogRecord, encoder
from proxy.logs.sinks.threaded import ThreadedSink


class JSONLSink(ThreadedSink):
    """Appends each batch with O_APPEND writes from one dedicated thread.

    Not idempotent: a batch replayed after a write of unknown outcome can appear twice.
    """

    name = "jsonl"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._fd: int | None = None

    def _open(self) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _write(self, records: list[LogRecord]) -> None:
        if self._fd is None:
            raise RuntimeError(f"jsonl log sink {self.path} is not open")
        data = encoder.encode_lines(records)
        # Unbuffered: the batch is on the OS side when this returns (the "flush"), and one
        # O_APPEND write per batch keeps lines from several processes from interleaving.
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
