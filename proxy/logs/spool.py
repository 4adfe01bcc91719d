"""Local spool files for log records that could not reach a sink yet.

Layout: `<spool_dir>/<sink-name>.<pid>[.<n>].spool`, JSON lines. A process appends only to
files it holds an exclusive flock on, for as long as it has them open. Replay claims a file
by taking its flock without blocking, so files of live processes are left alone and files of
dead ones (even after SIGKILL: the kernel drops the lock) go to whoever replays next.
After taking a lock, both sides check that the path still names the locked inode: another
process may have replayed and deleted the file in between.

Counting (per record and per sink, so that spilled == replayed + still spooled):
`log_spilled` for each copy that reached a spool file, `log_spool_errors` for each copy that
did not (disk full, bad permissions, unencodable record) and for each unreadable line found
on replay (a torn last line after a crash).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from proxy.logs.record import LogRecord, decoder, encoder
from proxy.metrics import Metrics

log = logging.getLogger("llmrelay.logs")

READ_BLOCK = 1 << 20
ERROR_LOG_INTERVAL = 10.0  # seconds between repeated "spool write failed" log lines


@dataclass
class Chunk:
    records: list[LogRecord]
    end: int  # file offset just past the last line read
    bad: int  # unreadable lines skipped
    eof: bool


@dataclass(eq=False)
class SpoolFile:
    """A spool file this process holds the flock on, being replayed from `offset`."""

    path: Path
    fd: int
    offset: int = 0

    def read(self, limit: int) -> Chunk:
        """Up to `limit` records from `offset`. Blocking."""
        records: list[LogRecord] = []
        bad = 0
        pos = self.offset  # file offset of buf[0]
        buf = b""
        eof = False
        while len(records) < limit:
            block = os.pread(self.fd, READ_BLOCK, pos + len(buf))
            if not block:
                eof = True
                if buf.strip():  # no newline at the end: torn by a crash mid-write
                    bad += 1
                pos += len(buf)
                break
            buf += block
            start = 0
            while len(records) < limit:
                nl = buf.find(b"\n", start)
                if nl < 0:
                    break
                line = buf[start:nl]
                start = nl + 1
                if line.strip():
                    try:
                        records.append(decoder.decode(line))
                    except msgspec.DecodeError:
                        bad += 1
            pos += start
            buf = buf[start:]
        return Chunk(records, pos, bad, eof)


@dataclass
class _Live:
    path: Path
    fd: int


@dataclass
class _ErrorLog:
    last: float = float("-inf")
    suppressed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _encode(records: Sequence[LogRecord]) -> tuple[bytes, int]:
    """JSON lines for the records that encode, and how many did not."""
    try:
        return encoder.encode_lines(records), 0
    except Exception:
        parts = []
        for r in records:
            try:
                parts.append(encoder.encode(r) + b"\n")
            except Exception:
                log.exception("log record %s cannot be encoded; dropped", getattr(r, "unique_id", "?"))
        return b"".join(parts), len(records) - len(parts)


class Spool:
    """This process's spool files in one directory, for any number of sinks."""

    def __init__(self, spool_dir: str | Path, metrics: Metrics) -> None:
        self.dir = Path(spool_dir)
        self.metrics = metrics
        # Guards _live and _held: put() appends on the loop thread, the writer in worker threads.
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._held: dict[str, list[SpoolFile]] = {}
        self._closed = False
        self._errors = _ErrorLog()

    def _pattern(self, sink_name: str) -> re.Pattern[str]:
        return re.compile(rf"{re.escape(sink_name)}\.\d+(\.\d+)?\.spool")

    # -- writing ---------------------------------------------------------------------------

    def append(self, sink_names: Sequence[str], records: Sequence[LogRecord]) -> None:
        """Append records to each sink's spool. Never raises; failures are counted and logged."""
        if not records or not sink_names:
            return
        try:
            data, unencodable = _encode(records)
        except Exception as e:  # pragma: no cover - _encode already guards each record
            self._error(len(records) * len(sink_names), "encode", e)
            return
        if unencodable:
            self._error(unencodable * len(sink_names), "encode", "record not encodable as JSON")
        n = len(records) - unencodable
        if not n:
            return
        for name in sink_names:
            try:
                with self._lock:
                    self._append(name, data)
            except Exception as e:
                self._error(n, name, e)
            else:
                self.metrics.log_spilled.inc(n)

    def reject(self, sink_name: str, records: Sequence[LogRecord]) -> Path:
        """Append records a sink refuses for good to `<sink>.rejected.jsonl` (never replayed: kept
        for a person to look at). Blocking."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{sink_name}.rejected.jsonl"
        data, _ = _encode(records)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        return path

    def _append(self, name: str, data: bytes) -> None:
        live = self._live.get(name)
        if live is None:
            live = self._live[name] = self._open_live(name)
        try:
            _write_all(live.fd, data)
        except OSError:
            # The file may now end in a torn line; reopening puts a newline after it.
            del self._live[name]
            os.close(live.fd)
            raise
        if self._closed:  # a straggler after close(): leave the file unlocked for replay
            del self._live[name]
            os.close(live.fd)

    def _open_live(self, name: str) -> _Live:
        self.dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            suffix = "" if attempt == 0 else f".{time.time_ns()}"
            path = self.dir / f"{name}.{os.getpid()}{suffix}.spool"  # not cached: forks
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                # Lock busy: a replayer (maybe this process) holds it. Deleted meanwhile: retry.
                if not _lock(fd) or not _same_file(fd, path):
                    os.close(fd)
                    continue
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    _write_all(fd, b"\n")  # a dead process with our pid left a torn line
            except BaseException:
                os.close(fd)
                raise
            return _Live(path, fd)
        raise OSError(f"no spool file could be locked in {self.dir}")

    def _error(self, n: int, where: str, exc: BaseException | str) -> None:
        self.metrics.log_spool_errors.inc(n)
        e = self._errors
        with e.lock:
            now = time.monotonic()
            if now - e.last < ERROR_LOG_INTERVAL:
                e.suppressed += n
                return
            suppressed, e.suppressed, e.last = e.suppressed, 0, now
        log.error(
            "log spool write failed (%s, dir %s): %d record(s) lost%s: %s",
            where, self.dir, n, f", {suppressed} more since the last report" if suppressed else "", exc,
        )

    # -- replay ----------------------------------------------------------------------------

    def claim(self, sink_name: str) -> list[SpoolFile]:
        """The spool files for a sink that this process holds and should replay. Blocking.

        Takes this process's own non-empty live file off the append path (the next append
        opens a fresh file) and claims every unlocked file of other processes.
        """
        with self._lock:
            if self._closed:
                return []
            held = self._held.setdefault(sink_name, [])
            live = self._live.get(sink_name)
            if live is not None and os.fstat(live.fd).st_size > 0:
                del self._live[sink_name]
                held.append(SpoolFile(live.path, live.fd))
                live = None
            taken = {f.path for f in held}
            if live is not None:
                taken.add(live.path)
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            entries = []
        pattern = self._pattern(sink_name)
        claimed = []
        for entry in entries:
            path = Path(entry.path)
            if path in taken or not pattern.fullmatch(entry.name):
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if _lock(fd) and _same_file(fd, path):
                    claimed.append(SpoolFile(path, fd))
                    continue
            except OSError as e:
                log.warning("cannot claim log spool file %s: %s", path, e)
            os.close(fd)
        with self._lock:
            if self._closed:
                for f in claimed:
                    os.close(f.fd)
                return []
            held.extend(claimed)
            return list(held)

    def commit(self, sink_name: str, file: SpoolFile, chunk: Chunk) -> None:
        """Record that `chunk` reached the sink; delete the file when it is all done. Blocking."""
        file.offset = chunk.end
        if chunk.bad:
            self.metrics.log_spool_errors.inc(chunk.bad)
            log.warning("skipped %d unreadable line(s) in log spool file %s", chunk.bad, file.path)
        if not chunk.eof:
            return
        with self._lock:
            held = self._held.get(sink_name, [])
            if not any(f is file for f in held):  # released by close() meanwhile
                return
            held[:] = [f for f in held if f is not file]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(file.path)  # while still locked: no one else can be replaying it
            os.close(file.fd)

    def close(self) -> None:
        """Release every file (unreplayed data stays on disk for the next replay). Blocking."""
        with self._lock:
            self._closed = True
            for live in self._live.values():
                try:
                    if os.fstat(live.fd).st_size == 0:
                        os.unlink(live.path)  # still locked by us: nobody else is using it
                except OSError:
                    pass
                os.close(live.fd)
            self._live.clear()
            for files in self._held.values():
                for f in files:
                    os.close(f.fd)
            self._held.clear()
