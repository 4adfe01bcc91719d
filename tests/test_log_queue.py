"""The async log pipeline: LogQueue, spool files, SQLite and JSONL sinks."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.logs.queue import LogQueue
from proxy.logs.record import LogRecord, decoder, encoder
from proxy.logs.sinks import make_sink
from proxy.logs.sinks.jsonl import JSONLSink
from proxy.logs.sinks.sqlite import SQLiteSink, read_records
from proxy.metrics import Metrics
from proxy.settings import LogSink

FAST = {"flush_interval": 0.01, "replay_interval": 0.03}


def rec(i: int, **kw) -> LogRecord:
    now = time.time()
    fields = {
        "unique_id": f"req-{i}",
        "start_time": now - 0.5,
        "timestamp": now,
        "model": "gpt-4o-mini",
        "customer_identifier": "cust-1",
        "customer_params": {"tier": "gold", "n": 3},
        "prompt_messages": [{"role": "user", "content": f"hello {i}"}],
        "completion_message": {"role": "assistant", "content": "hi"},
        "metadata": {"env": "test"},
        "stream": True,
        "cache_hit": False,
        "prompt_tokens": 10,
        "cost": 0.0012,
    }
    fields.update(kw)
    return LogRecord(**fields)


def val(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return m.registry.get_sample_value(name, labels or {}) or 0.0


def spilled(m: Metrics) -> float:
    return val(m, "llmrelay_log_records_spilled_total")


def replayed(m: Metrics) -> float:
    return val(m, "llmrelay_log_records_replayed_total")


def spool_errors(m: Metrics) -> float:
    return val(m, "llmrelay_log_spool_errors_total")


def written(m: Metrics, sink: str) -> float:
    return val(m, "llmrelay_log_records_written_total", {"sink": sink})


async def until(cond: Callable[[], bool], timeout: float = 1.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def row_ids(db: Path) -> list[str]:
    return [r["unique_id"] for r in read_records(db)]


class FlakySink:
    """An SQLite sink that fails (open and/or write) until told to recover."""

    def __init__(self, path: Path, *, fail_write: bool = True, fail_open: bool = False, name: str = "sqlite"):
        self.name = name
        self.inner = SQLiteSink(path)
        self.fail_write = fail_write
        self.fail_open = fail_open
        self.attempts = 0

    def recover(self) -> None:
        self.fail_write = self.fail_open = False

    async def open(self) -> None:
        if self.fail_open:
            raise ConnectionError("sink unreachable")
        await self.inner.open()

    async def write(self, records: list[LogRecord]) -> None:
        self.attempts += 1
        if self.fail_write:
            raise ConnectionError("sink down")
        await self.inner.write(records)

    async def close(self) -> None:
        await self.inner.close()


class HangingSink:
    name = "sqlite"

    async def open(self) -> None:
        pass

    async def write(self, records: list[LogRecord]) -> None:
        await asyncio.sleep(30)

    async def close(self) -> None:
        pass


def spool_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.spool")) if d.exists() else []


# -- sinks -----------------------------------------------------------------------------------


def test_sqlite_records_land_with_fields_decoded(tmp_path: Path) -> None:
    db = tmp_path / "db" / "logs.sqlite"
    m = Metrics()

    async def main() -> None:
        q = LogQueue([SQLiteSink(db)], tmp_path / "spool", m, **FAST)
        await q.start()
        for i in range(3):
            q.put(rec(i))
        await until(lambda: written(m, "sqlite") == 3)
        await q.stop()

    asyncio.run(main())
    rows = sorted(read_records(db), key=lambda r: r["unique_id"])
    assert [r["unique_id"] for r in rows] == ["req-0", "req-1", "req-2"]
    r = rows[0]
    assert r["customer_params"] == {"tier": "gold", "n": 3}
    assert r["prompt_messages"] == [{"role": "user", "content": "hello 0"}]
    assert r["completion_message"] == {"role": "assistant", "content": "hi"}
    assert r["metadata"] == {"env": "test"}
    assert r["stream"] is True and r["cache_hit"] is False
    assert r["tools"] is None and r["warnings"] is None
    assert r["prompt_tokens"] == 10 and r["cost"] == pytest.approx(0.0012)
    assert read_records(db, "model = ? AND unique_id = ?", ("gpt-4o-mini", "req-1"))[0]["unique_id"] == "req-1"
    assert spilled(m) == 0 and spool_files(tmp_path / "spool") == []


def test_sqlite_insert_is_idempotent_and_wal(tmp_path: Path) -> None:
    db = tmp_path / "logs.sqlite"

    async def main() -> None:
        sink = SQLiteSink(db)
        await sink.open()
        await sink.write([rec(i) for i in range(5)])
        await sink.write([rec(i) for i in range(5)])
        await sink.close()

    asyncio.run(main())
    assert sorted(row_ids(db)) == [f"req-{i}" for i in range(5)]
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(request_logs)")}
    conn.close()
    for name in ("timestamp", "customer_time", "model_time", "status_time", "thread_time", "trace"):
        assert f"request_logs_{name}" in indexes


def test_jsonl_sink(tmp_path: Path) -> None:
    path = tmp_path / "out" / "logs.jsonl"
    m = Metrics()

    async def main() -> None:
        q = LogQueue([JSONLSink(path)], tmp_path / "spool", m, **FAST)
        await q.start()
        for i in range(4):
            q.put(rec(i))
        await q.stop()

    asyncio.run(main())
    lines = path.read_bytes().splitlines()
    assert [decoder.decode(line).unique_id for line in lines] == [f"req-{i}" for i in range(4)]
    assert decoder.decode(lines[0]).customer_params == {"tier": "gold", "n": 3}
    assert written(m, "jsonl") == 4


def test_make_sink(tmp_path: Path) -> None:
    assert isinstance(make_sink(LogSink(type="sqlite", path=str(tmp_path / "a.db"))), SQLiteSink)
    assert isinstance(make_sink(LogSink(type="jsonl", path=str(tmp_path / "a.jsonl"))), JSONLSink)


# -- outages and the spool -------------------------------------------------------------------


def test_failing_sink_spills_then_replays_exactly_once(tmp_path: Path) -> None:
    db, spool = tmp_path / "logs.sqlite", tmp_path / "spool"
    m = Metrics()
    n = 60
    sink = FlakySink(db)

    async def main() -> None:
        q = LogQueue([sink], spool, m, batch_size=25, **FAST)
        await q.start()
        for i in range(n):
            q.put(rec(i))
        await until(lambda: spilled(m) == n)
        assert [p.name for p in spool_files(spool)] == [f"sqlite.{os.getpid()}.spool"]
        assert row_ids(db) == []
        sink.recover()
        await until(lambda: replayed(m) == n)
        q.put(rec(n))  # the sink is back up: this one goes straight through
        await until(lambda: written(m, "sqlite") == 1)
        await q.stop()

    asyncio.run(main())
    ids = row_ids(db)
    assert len(ids) == len(set(ids)) == n + 1
    assert spilled(m) == n and replayed(m) == n and spool_errors(m) == 0
    assert spool_files(spool) == []


def test_one_failing_sink_does_not_affect_the_other(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    m = Metrics()
    bad = FlakySink(tmp_path / "bad.sqlite", name="bad")

    async def main() -> None:
        q = LogQueue([SQLiteSink(tmp_path / "good.sqlite"), bad], spool, m, **FAST)
        await q.start()
        for i in range(10):
            q.put(rec(i))
        await until(lambda: written(m, "sqlite") == 10 and spilled(m) == 10)
        assert [p.name.split(".")[0] for p in spool_files(spool)] == ["bad"]
        bad.recover()
        await until(lambda: replayed(m) == 10)
        await q.stop()

    asyncio.run(main())
    assert len(row_ids(tmp_path / "good.sqlite")) == 10
    assert len(row_ids(tmp_path / "bad.sqlite")) == 10


def test_sink_that_fails_to_open_is_down_until_it_opens(tmp_path: Path) -> None:
    db = tmp_path / "logs.sqlite"
    m = Metrics()
    sink = FlakySink(db, fail_write=False, fail_open=True)

    async def main() -> None:
        q = LogQueue([sink], tmp_path / "spool", m, **FAST)
        await q.start()
        for i in range(5):
            q.put(rec(i))
        await until(lambda: spilled(m) == 5)
        assert sink.attempts == 0
        sink.recover()
        await until(lambda: replayed(m) == 5)
        await q.stop()

    asyncio.run(main())
    assert len(row_ids(db)) == 5


def test_queue_full_spills_and_nothing_is_lost(tmp_path: Path) -> None:
    db, spool = tmp_path / "logs.sqlite", tmp_path / "spool"
    m = Metrics()

    async def main() -> None:
        q = LogQueue([SQLiteSink(db)], spool, m, maxsize=5, **FAST)
        for i in range(12):  # writer not started: the queue fills
            q.put(rec(i))
        assert q.depth == 5
        assert spilled(m) == 7
        assert len(spool_files(spool)) == 1
        await q.start()  # replays the 7 spilled records
        assert replayed(m) == 7
        await q.stop()  # drains the 5 queued ones

    asyncio.run(main())
    assert sorted(row_ids(db), key=lambda s: int(s.split("-")[1])) == [f"req-{i}" for i in range(12)]
    assert spool_files(spool) == []


def test_stop_drains_without_waiting_for_the_flush_interval(tmp_path: Path) -> None:
    db, spool = tmp_path / "logs.sqlite", tmp_path / "spool"
    m = Metrics()

    async def main() -> None:
        q = LogQueue([SQLiteSink(db)], spool, m, batch_size=1000, flush_interval=30, replay_interval=30)
        await q.start()
        for i in range(300):
            q.put(rec(i))
        await asyncio.sleep(0)
        # a stop that waited for the 30 s flush interval would not end within this guard
        await asyncio.wait_for(q.stop(deadline=5), timeout=15)
        q.put(rec(999))  # after stop: spooled, not lost

    asyncio.run(main())
    assert len(row_ids(db)) == 300 and written(m, "sqlite") == 300
    assert spilled(m) == 1 and len(spool_files(spool)) == 1


def test_an_idle_writer_sleeps_until_the_first_record_then_flushes_it_within_the_interval(tmp_path: Path) -> None:
    """No records, no wake-ups (an idle gateway used to wake its writer every flush_interval); the
    first record wakes it, and it is written one flush interval later, with those that followed."""
    db, spool = tmp_path / "logs.sqlite", tmp_path / "spool"
    m = Metrics()

    async def main() -> None:
        q = LogQueue([SQLiteSink(db)], spool, m, batch_size=1000, flush_interval=0.05, replay_interval=30)
        await q.start()
        looks = 0
        drain = q._drain_nowait

        def counted(limit: int | None = None) -> list[LogRecord]:
            nonlocal looks
            looks += 1
            return drain(limit)

        q._drain_nowait = counted  # type: ignore[method-assign]
        await asyncio.sleep(0.5)  # ten flush intervals with nothing to write
        assert looks <= 1, f"the idle writer woke {looks} times"
        started = time.monotonic()
        q.put(rec(1))
        q.put(rec(2))
        await until(lambda: written(m, "sqlite") == 2, timeout=5)
        assert time.monotonic() - started >= 0.045  # it waited the flush interval for company
        await q.stop()

    asyncio.run(main())
    assert row_ids(db) == ["req-1", "req-2"]


def test_stop_deadline_spools_what_could_not_be_written(tmp_path: Path) -> None:
    db, spool = tmp_path / "logs.sqlite", tmp_path / "spool"
    m = Metrics()

    async def main() -> None:
        q = LogQueue([HangingSink()], spool, m, batch_size=10, **FAST)
        await q.start()
        for i in range(35):
            q.put(rec(i))
        await asyncio.sleep(0.05)  # the writer is stuck in its first write
        await q.stop(deadline=0.1)

    asyncio.run(main())
    assert spilled(m) == 35

    async def restart() -> None:  # the next process (here: queue) replays them
        q = LogQueue([SQLiteSink(db)], spool, Metrics(), **FAST)
        await q.start()
        await q.stop()

    asyncio.run(restart())
    assert sorted(row_ids(db)) == sorted(f"req-{i}" for i in range(35))
    assert spool_files(spool) == []


def test_dead_process_spool_replayed_on_start_torn_line_skipped(tmp_path: Path, caplog) -> None:
    db, spool = tmp_path / "logs.sqlite", tmp_path / "spool"
    spool.mkdir()
    dead = spool / "sqlite.999999.spool"  # a pid that is not ours; nobody holds its lock
    dead.write_bytes(encoder.encode_lines([rec(i) for i in range(20)]) + b'{"unique_id": "req-20", "sta')
    other_sink = spool / "jsonl.999999.spool"  # belongs to another sink: left alone
    other_sink.write_bytes(encoder.encode_lines([rec(100)]))
    m = Metrics()

    async def main() -> None:
        q = LogQueue([SQLiteSink(db)], spool, m, batch_size=8, **FAST)
        await q.start()
        assert replayed(m) == 20
        await q.stop()

    with caplog.at_level(logging.WARNING, logger="llmrelay.logs"):
        asyncio.run(main())
    assert sorted(row_ids(db)) == sorted(f"req-{i}" for i in range(20))
    assert not dead.exists() and other_sink.exists()
    assert spool_errors(m) == 1
    assert "unreadable" in caplog.text


def test_locked_spool_file_of_a_live_process_is_left_alone(tmp_path: Path) -> None:
    db, spool = tmp_path / "logs.sqlite", tmp_path / "spool"
    spool.mkdir()
    live = spool / "sqlite.424242.spool"
    live.write_bytes(encoder.encode_lines([rec(i) for i in range(3)]))
    m = Metrics()

    async def main() -> None:
        fd = os.open(live, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # "another process" is alive and holds it
        q = LogQueue([SQLiteSink(db)], spool, m, **FAST)
        await q.start()
        await asyncio.sleep(0.08)
        assert replayed(m) == 0 and live.exists()
        os.close(fd)  # that process dies: the next replay tick takes the file
        await until(lambda: replayed(m) == 3)
        await q.stop()

    asyncio.run(main())
    assert len(row_ids(db)) == 3 and not live.exists()


def test_spool_of_a_sigkilled_process_is_replayed(tmp_path: Path) -> None:
    db, spool = tmp_path / "logs.sqlite", tmp_path / "spool"
    child = (
        "import os, signal, time\n"
        "from proxy.logs.spool import Spool\n"
        "from proxy.logs.record import LogRecord\n"
        "from proxy.metrics import Metrics\n"
        f"s = Spool({str(spool)!r}, Metrics())\n"
        "s.append(['sqlite'], [LogRecord(unique_id=f'k{i}', start_time=1.0, timestamp=2.0) for i in range(4)])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", child], cwd=Path(__file__).parents[1])
    assert proc.returncode == -9
    assert len(spool_files(spool)) == 1
    m = Metrics()

    async def main() -> None:
        q = LogQueue([SQLiteSink(db)], spool, m, **FAST)
        await q.start()
        await q.stop()

    asyncio.run(main())
    assert sorted(row_ids(db)) == ["k0", "k1", "k2", "k3"]
    assert replayed(m) == 4 and spool_files(spool) == []


def test_spool_write_failure_is_counted_and_never_raises(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    spool = blocker / "spool"  # mkdir fails: a file is in the way
    m = Metrics()
    sink = FlakySink(tmp_path / "logs.sqlite")

    async def main() -> None:
        q = LogQueue([sink], spool, m, maxsize=2, **FAST)
        for i in range(5):
            q.put(rec(i))  # 3 overflow; the spool cannot take them
        assert spool_errors(m) == 3
        await q.start()  # the writer's batch fails and cannot be spooled either
        await until(lambda: spool_errors(m) == 5)
        await q.stop()

    with caplog.at_level(logging.ERROR, logger="llmrelay.logs"):
        asyncio.run(main())
    assert spilled(m) == 0
    assert "log spool write failed" in caplog.text


def test_a_sink_that_hangs_on_replay_does_not_hold_up_the_others(tmp_path: Path) -> None:
    """A sink goes down, and its replays then hang (an HTTP receiver that accepts and never
    answers): the other sinks keep receiving every batch meanwhile, and stop() still returns."""
    released = asyncio.Event()

    class Hanging:
        name = "hanging"
        writes = 0

        async def open(self) -> None: ...

        async def write(self, records: list[LogRecord]) -> None:
            Hanging.writes += 1
            if Hanging.writes == 1:
                raise ConnectionError("receiver down")  # the live write fails: the sink is down
            await released.wait()  # every replay after that hangs

        async def close(self) -> None: ...

    async def main() -> None:
        m = Metrics()
        db = tmp_path / "logs.db"
        q = LogQueue([SQLiteSink(db), Hanging()], tmp_path / "spool", m, batch_size=5, **FAST)
        await q.start()
        for i in range(5):
            q.put(rec(i))
        await until(lambda: Hanging.writes >= 2)  # down, and a replay is hanging now
        for i in range(5, 40):
            q.put(rec(i))
            await asyncio.sleep(0.005)
        await until(lambda: len(row_ids(db)) == 40, timeout=5)
        assert Hanging.writes == 2  # one replay at a time, still hanging
        await q.stop(deadline=1.0)
        assert spilled(m) == 40  # the failed first batch and every later one, for the hanging sink

    asyncio.run(asyncio.wait_for(main(), 15))
