"""LogQueue: the request path puts LogRecords; a background writer batches them to the sinks.

A full queue or a sink that is down spills to the local spool (proxy.logs.spool), which the
writer replays into the sink once it takes writes again. Nothing is dropped silently: a record
that reaches no sink is in a spool file, or counted in `log_spool_errors` with a log line.

Counting: `log_written{sink}` counts records written by the live path, `log_replayed` those
written from the spool; together they are what each sink received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path

from proxy.logs.record import LogRecord
from proxy.logs.sinks import RejectedRecords, Sink
from proxy.logs.spool import Spool
from proxy.metrics import Metrics

log = logging.getLogger("llmrelay.logs")


START_REPLAY_WAIT = 2.0  # seconds start() waits for the first replays before serving anyway


class _SinkState:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.name = sink.name
        self.opened = False
        self.up = False  # False: batches go to the spool until a replay succeeds
        self.replay: asyncio.Task[None] | None = None  # this sink's replay, running beside the writer
        # why the last open, write or replay failed; None once one succeeds (readiness reads it)
        self.problem: str | None = "not opened yet"


class LogQueue:
    def __init__(
        self,
        sinks: Sequence[Sink],
        spool_dir: str | Path,
        metrics: Metrics,
        *,
        maxsize: int = 10000,
        batch_size: int = 32,
        flush_interval: float = 0.2,
        replay_interval: float = 2.0,
    ) -> None:
        names = [s.name for s in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"log sink names must be unique, got {names}")
        self._states = [_SinkState(s) for s in sinks]
        self._names = names
        self._metrics = metrics
        self._spool = Spool(spool_dir, metrics)
        # a plain deque: nothing ever awaits it (the writer wakes on _ready), and asyncio.Queue's
        # bookkeeping cost more per record than the append
        self._queue: deque[LogRecord] = deque()
        self._maxsize = maxsize
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._replay_interval = replay_interval
        self._closing = False
        self._stopped = False
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()  # a full batch is waiting, or stop() wants the writer
        self._idle = False  # the writer sleeps until a record comes: put() wakes it with the first
        # put_and_wait: records queued so far, records the writer has handled (written or
        # spooled), and who waits for which count; the queue is FIFO, so counts order them.
        self._queued = 0
        self._handled = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def put(self, record: LogRecord) -> bool:
        """Hand a record to the writer. Never blocks on the writer and never raises.
        False: the queue was full (or closing) and the record went to the spool at once."""
        queue = self._queue
        if not self._closing and len(queue) < self._maxsize:
            queue.append(record)
            self._queued += 1
            if len(queue) >= self._batch_size or self._idle:
                self._ready.set()
            return True
        # A local append to the page cache (no fsync): the queue is full or we are stopping.
        self._spool.append(self._names, (record,))
        return False

    async def put_and_wait(self, records: Iterable[LogRecord]) -> None:
        """Put records, then wait until the writer has written them to every sink or spooled
        them (the ingestion API's `block: true`)."""
        queued = False
        for record in records:
            queued = self.put(record) or queued
        if not queued or self._stopped:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((self._queued, waiter))
        self._ready.set()  # do not sit out the flush interval: someone is waiting
        await waiter

    def _handled_up_to(self, count: int) -> None:
        self._handled += count
        while self._waiters and self._waiters[0][0] <= self._handled:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _release_waiters(self) -> None:
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def start(self) -> None:
        for st in self._states:
            await self._open(st)
        # what an earlier process left in the spool goes first, unless a sink is slow to answer
        await asyncio.wait(self._replay_all(), timeout=START_REPLAY_WAIT)
        self._task = asyncio.create_task(self._run(), name="llmrelay-log-writer")

    async def stop(self, deadline: float = 10.0) -> None:
        """Drain the queue into the sinks within `deadline` seconds, spool the rest, close."""
        if self._stopped:
            return
        self._stopped = True
        self._closing = True
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        if self._task is not None:
            self._ready.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), deadline)
            except TimeoutError:
                log.warning("log writer did not drain within %.1fs; spooling the rest", deadline)
                self._task.cancel()
                await asyncio.wait({self._task})
            except Exception:
                log.exception("log writer failed")
        leftover = self._drain_nowait()
        if leftover:
            await asyncio.to_thread(self._spool.append, self._names, leftover)
        self._release_waiters()
        replays = {st.replay for st in self._states if st.replay is not None and not st.replay.done()}
        if replays:  # they stop between chunks once closing; a write cut short is replayed next time
            _, late = await asyncio.wait(replays, timeout=max(end - loop.time(), 0.1))
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        await asyncio.to_thread(self._spool.close)
        for st in self._states:
            try:
                await asyncio.wait_for(st.sink.close(), max(end - loop.time(), 1.0))
            except Exception:
                log.exception("closing log sink %s failed", st.name)
        self._metrics.log_queue_depth.set(0)

    async def health(self, timeout: float) -> dict[str, str | None]:
        """Each sink's problem (None: healthy), for readiness: the last open, write or replay that
        failed, until one succeeds; else what the sink's own `check` finds within `timeout`
        seconds (a query through its pool, the file writable). A sink without one (http) is as its
        last delivery left it. Never raises."""

        async def one(st: _SinkState) -> str | None:
            if st.problem is not None:
                return st.problem
            check = getattr(st.sink, "check", None)
            if check is None:
                return None
            try:
                async with asyncio.timeout(timeout):
                    await check()
            except TimeoutError:
                return f"no answer within {timeout:g} s"
            except Exception as e:
                return f"check failed: {e!r}"
            return None

        problems = await asyncio.gather(*(one(st) for st in self._states))
        return dict(zip(self._names, problems, strict=True))

    # -- writer ----------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_replay = loop.time() + self._replay_interval
        while True:
            try:
                if self._closing:
                    batch = self._drain_nowait(self._batch_size)
                    if not batch:
                        return
                else:
                    batch = await self._next_batch(next_replay)
                if batch:
                    try:
                        await self._write(batch)
                    finally:  # written or spooled, either way
                        self._handled_up_to(len(batch))
                self._metrics.log_queue_depth.set(len(self._queue))
                if not self._closing and loop.time() >= next_replay:
                    self._replay_all()
                    next_replay = loop.time() + self._replay_interval
            except Exception:  # (a cancelled _write spools the batch it was cut off in)
                # _write and the replays handle sink errors; this is a bug or a spool failure.
                log.exception("log writer error")
                await asyncio.sleep(self._flush_interval)

    async def _next_batch(self, wait_until: float) -> list[LogRecord]:
        """Up to batch_size records, once a full batch waits or flush_interval has passed since
        the writer saw the first of them (never later than `wait_until`). The writer wakes per
        batch, not per record, and an idle gateway's writer not at all until `wait_until` (it
        used to wake every flush_interval to find nothing)."""
        if self._unhurried():
            if not self._queue:
                await self._wait_ready(wait_until, idle=True)
            if self._unhurried():
                await self._wait_ready(min(asyncio.get_running_loop().time() + self._flush_interval, wait_until))
        return self._drain_nowait(self._batch_size)

    def _unhurried(self) -> bool:
        """Nothing asks for a write now: no full batch, no stop, no put_and_wait."""
        return len(self._queue) < self._batch_size and not self._closing and not self._waiters

    async def _wait_ready(self, until: float, *, idle: bool = False) -> None:
        """Until `until`, or until _ready is set (`idle`: by the first record put, too)."""
        self._ready.clear()
        self._idle = idle
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(until):
                    await self._ready.wait()
        finally:
            self._idle = False

    def _drain_nowait(self, limit: int | None = None) -> list[LogRecord]:
        q = self._queue
        count = len(q) if limit is None else min(limit, len(q))
        popleft = q.popleft
        return [popleft() for _ in range(count)]

    async def _write(self, batch: list[LogRecord]) -> None:
        handled: set[str] = set()  # sinks whose copy was written or handed to the spool
        try:
            if len(self._states) == 1:
                await self._deliver(self._states[0], batch, handled)
            else:
                await asyncio.gather(*(self._deliver(st, batch, handled) for st in self._states))
        except asyncio.CancelledError:
            # stop() ran out of time. A write cut short may still land: sinks dedupe by unique_id.
            self._spool.append([n for n in self._names if n not in handled], batch)
            raise

    async def _deliver(self, st: _SinkState, batch: list[LogRecord], handled: set[str]) -> None:
        if st.up:
            try:
                await st.sink.write(batch)
            except RejectedRecords as e:
                handled.add(st.name)
                self._metrics.log_written.labels(st.name).inc(len(batch) - len(e.records))
                await self._reject(st, e)
                return
            except Exception as e:
                st.up = False
                st.problem = f"write failed: {e!r}"
                log.warning("log sink %s write failed, spooling until it recovers: %r", st.name, e)
            else:
                st.problem = None
                handled.add(st.name)
                self._metrics.log_written.labels(st.name).inc(len(batch))
                return
        handled.add(st.name)  # the thread finishes the append even if we are cancelled
        await asyncio.to_thread(self._spool.append, (st.name,), batch)

    async def _reject(self, st: _SinkState, rejected: RejectedRecords) -> None:
        self._metrics.log_rejected.labels(st.name).inc(len(rejected.records))
        try:
            path = await asyncio.to_thread(self._spool.reject, st.name, rejected.records)
        except Exception:
            log.exception("log sink %s refused %d records and the dead-letter file could not be written",
                          st.name, len(rejected.records))
            self._metrics.log_spool_errors.inc(len(rejected.records))
            return
        log.error("log sink %s refused %d records for good (%s); kept in %s", st.name, len(rejected.records),
                  rejected.reason, path)

    # -- open and replay -------------------------------------------------------------------

    async def _open(self, st: _SinkState) -> bool:
        try:
            await st.sink.open()
        except Exception as e:
            st.problem = f"cannot open: {e!r}"
            log.warning("log sink %s failed to open, spooling until it does: %r", st.name, e)
            return False
        st.opened = st.up = True
        st.problem = None
        return True

    def _replay_all(self) -> set[asyncio.Task[None]]:
        """Start a replay for each sink that has none running. Replays run beside the writer, so
        a sink that takes its time to fail (an HTTP receiver that hangs) never holds up the
        writes to the others."""
        for st in self._states:
            if st.replay is None or st.replay.done():
                st.replay = asyncio.create_task(self._replay_guarded(st), name=f"llmrelay-log-replay-{st.name}")
        return {st.replay for st in self._states if st.replay is not None}

    async def _replay_guarded(self, st: _SinkState) -> None:
        try:
            await self._replay(st)
        except Exception:
            log.exception("log spool replay for sink %s failed", st.name)

    async def _replay(self, st: _SinkState) -> None:
        """Replay this sink's spool files in batch_size chunks; stop at the first failure.
        A sink that is down comes back up once its spool is empty."""
        if not st.opened and not await self._open(st):
            return
        files = await asyncio.to_thread(self._spool.claim, st.name)
        for f in files:
            while not self._closing:
                chunk = await asyncio.to_thread(f.read, self._batch_size)
                if chunk.records:
                    refused = 0
                    try:
                        await st.sink.write(chunk.records)
                    except RejectedRecords as e:
                        refused = len(e.records)
                        await self._reject(st, e)
                    except Exception as e:
                        if st.up:
                            log.warning("log sink %s replay failed, spooling until it recovers: %r", st.name, e)
                        st.up = False
                        st.problem = f"replay failed: {e!r}"
                        return
                    st.problem = None  # it takes writes again (the rest of the spool follows)
                    self._metrics.log_replayed.inc(len(chunk.records) - refused)
                await asyncio.to_thread(self._spool.commit, st.name, f, chunk)
                if chunk.eof:
                    break
        if self._closing:
            return
        if not st.up:
            log.info("log sink %s recovered", st.name)
        st.up = True
        st.problem = None
