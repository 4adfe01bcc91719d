"""The gateway's own backends failing: Redis (limit counters and the response cache) and a PostgreSQL log sink,
each behind a TCP relay that is stopped and started again, and a log spool on a full disk."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis

from proxy.logs.schema import TABLE
from tests.conftest import REDIS_DB, metric, wait_until
from tests.faults.conftest import AUTH, HI, unique
from tests.faults.fault_upstream import ok
from tests.relay import Relay

COUNTER_WARNING = "limits not checked: the counter backend is unreachable"


def chat(gw: Any, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/api/chat/completions", headers=AUTH, timeout=30,
                      json={"model": model, "messages": HI, **extra})


def test_redis_down_then_back(start_fault_gateway, fault):
    relay = Relay(("127.0.0.1", 6379)).start()
    direct = redis.Redis.from_url(f"redis://127.0.0.1:6379/{REDIS_DB}")
    lenient, strict = unique("faults-open"), unique("faults-closed")
    try:
        url = f"redis://127.0.0.1:{relay.port}/{REDIS_DB}"
        gw = start_fault_gateway(
            pipeline=["auth", {"name": "limits", "options": {"policies": [
                {"name": lenient, "scope": "api_key", "metric": "requests", "window": "lifetime",
                 "block_threshold": 1000},
                {"name": strict, "scope": "customer", "scope_id": "strict-cust", "metric": "requests",
                 "window": "lifetime", "block_threshold": 1000, "on_backend_error": "closed"}]}},
                      "cache", "routing", "credentials", "fallback"],
            state={"counters": {"backend": "redis", "url": url}, "cache": {"backend": "redis", "url": url}})
        model = unique("cached")
        fault.default(model, lambda n: ok(model, f"answer {n}"))
        cached = {"cache_enabled": True, "cache_options": {"is_cached_by_model": True}}

        def counter() -> float:
            keys = list(direct.scan_iter(match=f"*{lenient}*"))
            return float(direct.get(keys[0]) or 0) if keys else 0.0

        # up: counted in Redis, a miss then a hit
        first = chat(gw, f"fault-a/{model}", **cached)
        assert first.status_code == 200 and first.headers["x-llmrelay-cache"] == "miss"
        assert wait_until(lambda: chat(gw, f"fault-a/{model}", **cached).headers["x-llmrelay-cache"] == "hit", 5)
        assert fault.count(model) == 1
        assert wait_until(lambda: counter() >= 2, 5)
        counted = counter()

        # down: the open policy admits (warning, metric), the closed one refuses, the cache misses
        relay.stop()
        opened = metric(gw.url, "llmrelay_limit_backend_errors_total", outcome="open")
        misses = metric(gw.url, "llmrelay_cache_lookups_total", result="miss")
        down = chat(gw, f"fault-a/{model}", **cached)
        assert down.status_code == 200 and down.headers["x-llmrelay-cache"] == "miss"
        assert down.json()["choices"][0]["message"]["content"] == "answer 1"  # went upstream
        record = gw.record(down.headers["x-respan-log-id"])
        assert COUNTER_WARNING in record["warnings"] and record["status_code"] == 200
        refused = chat(gw, f"fault-a/{model}", customer_identifier="strict-cust")
        assert refused.status_code == 503 and strict in refused.json()["detail"]
        record = gw.record(refused.headers["x-respan-log-id"])
        assert record["status_code"] == 503
        assert metric(gw.url, "llmrelay_limit_backend_errors_total", outcome="open") - opened >= 1
        assert metric(gw.url, "llmrelay_limit_backend_errors_total", outcome="closed") >= 1
        assert metric(gw.url, "llmrelay_cache_lookups_total", result="miss") - misses >= 1
        assert counter() == counted  # nothing reached Redis while it was away
        assert "limit counters unreachable" in gw.output.read_text()

        # back: no restart; within a few seconds counting, refusing policy and cache work again
        relay.start()

        def recovered() -> bool:
            reply = chat(gw, f"fault-a/{model}", customer_identifier="strict-cust", **cached)
            return reply.status_code == 200 and reply.headers["x-llmrelay-cache"] == "hit"

        assert wait_until(recovered, 10)
        back = chat(gw, f"fault-a/{model}", **cached)
        assert back.status_code == 200 and back.headers["x-llmrelay-cache"] == "hit"
        record = gw.record(back.headers["x-respan-log-id"])
        assert COUNTER_WARNING not in (record["warnings"] or [])
        assert wait_until(lambda: counter() > counted, 5)
    finally:
        relay.close()
        for key in direct.scan_iter(match="*faults-*"):
            direct.delete(key)


async def _ids_in(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r["unique_id"] for r in await conn.fetch(f"SELECT unique_id FROM {TABLE}")]
    finally:
        await conn.close()


def test_postgres_down_then_back_spools_and_replays_exactly_once(start_fault_gateway, fault, pg_store, tmp_path):
    relay = Relay(("127.0.0.1", 5432)).start()
    try:
        database = pg_store.rsplit("/", 1)[1]
        relayed = f"postgresql://postgres@127.0.0.1:{relay.port}/{database}"
        workdir = tmp_path / "pglogs"
        gw = start_fault_gateway(logs={"spool_dir": str(workdir / "spool"), "flush_interval": 0.05, "sinks": [
            {"type": "postgres", "dsn": relayed, "pool_size": 2},
            {"type": "sqlite", "path": str(tmp_path / "gw0" / "logs.db")}]})
        model = unique("pg")
        fault.default(model, lambda n: ok(model))
        ids = [chat(gw, f"fault-a/{model}").headers["x-respan-log-id"]]
        assert wait_until(lambda: asyncio.run(_ids_in(pg_store)) == ids, 10)

        relay.stop()
        spilled = metric(gw.url, "llmrelay_log_records_spilled_total")
        for i in range(5):
            reply = chat(gw, f"fault-a/{model}", customer_identifier=f"pg-{i}")
            assert reply.status_code == 200  # the request path never waits for the sink
            ids.append(reply.headers["x-respan-log-id"])
        assert wait_until(lambda: metric(gw.url, "llmrelay_log_records_spilled_total") - spilled >= 5, 15)
        assert len(gw.records(count=6)) == 6  # the SQLite sink got them live
        assert asyncio.run(_ids_in(pg_store)) == ids[:1]
        replayed = metric(gw.url, "llmrelay_log_records_replayed_total")

        relay.start()
        assert wait_until(lambda: len(asyncio.run(_ids_in(pg_store))) >= 6, 20)
        time.sleep(0.5)  # a duplicate would land now
        stored = asyncio.run(_ids_in(pg_store))
        assert sorted(stored) == sorted(ids)  # nothing lost, nothing twice
        assert metric(gw.url, "llmrelay_log_records_replayed_total") - replayed >= 5
        assert metric(gw.url, "llmrelay_log_spool_errors_total") == 0
        # and live again
        ids.append(chat(gw, f"fault-a/{model}").headers["x-respan-log-id"])
        assert wait_until(lambda: sorted(asyncio.run(_ids_in(pg_store))) == sorted(ids), 10)
    finally:
        relay.close()


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 64 KiB tmpfs filled to the last byte. Mounting it needs root (CAP_SYS_ADMIN), which the test
    machines and CI have; elsewhere this fails loudly rather than skip the disk-full case."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode:
        pytest.fail(f"the disk-full case needs a 64 KiB tmpfs, and mounting one failed (uid {os.geteuid()}; "
                    f"needs root or CAP_SYS_ADMIN): {mounted.stderr.decode().strip()}")
    try:
        (mount / "spool").mkdir()  # the spool directory exists; only its files cannot grow
        with (mount / "filler").open("wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"x" * 512)
            except OSError:
                pass
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_log_spool_on_a_full_disk_counts_errors_and_the_requests_still_answer(start_fault_gateway, fault,
                                                                              full_disk, tmp_path):
    broken = tmp_path / "not-a-db"
    broken.mkdir()  # a directory where the database should be: the sink cannot open, records go to the spool
    gw = start_fault_gateway(logs={"spool_dir": str(full_disk / "spool"), "flush_interval": 0.05,
                                   "sinks": [{"type": "sqlite", "path": str(broken)}]})
    model = unique("full")
    fault.default(model, lambda n: ok(model))
    for _ in range(3):
        reply = chat(gw, f"fault-a/{model}")
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "ok"
    assert wait_until(lambda: metric(gw.url, "llmrelay_log_spool_errors_total") >= 3, 10)
    assert metric(gw.url, "llmrelay_log_records_written_total") == 0
    assert metric(gw.url, "llmrelay_requests_total", status="200") == 3
    assert wait_until(lambda: "log spool write failed" in gw.output.read_text(), 5)
    line = next(x for x in gw.output.read_text().splitlines() if "log spool write failed" in x)
    assert str(full_disk / "spool") in line and "lost" in line and "No space left on device" in line


def test_a_redis_that_accepts_but_never_answers_costs_one_timeout_not_one_per_request(start_fault_gateway, fault):
    """Regression: the cache asked a dead Redis on every request (0.5 s each) while the limits stage had already
    stopped asking for a second; a black-holed Redis (a partition: connections open, nothing comes back) added
    0.5 s to every cached request."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(100)  # the kernel completes the handshakes; nothing is ever read or answered
    try:
        url = f"redis://127.0.0.1:{hole.getsockname()[1]}/0"
        gw = start_fault_gateway(
            pipeline=["auth", {"name": "limits", "options": {"policies": [
                {"name": "hole", "scope": "api_key", "metric": "requests", "window": "minute",
                 "block_threshold": 100}]}}, "cache", "routing", "credentials", "fallback"],
            state={"counters": {"backend": "redis", "url": url}, "cache": {"backend": "redis", "url": url}})
        model = unique("hole")
        fault.default(model, lambda n: ok(model))
        assert chat(gw, f"fault-a/{model}", cache_enabled=True).status_code == 200  # pays the timeout once
        started = time.monotonic()
        replies = [chat(gw, f"fault-a/{model}", cache_enabled=True) for _ in range(5)]
        elapsed = time.monotonic() - started
        assert [r.status_code for r in replies] == [200] * 5
        assert {r.headers["x-llmrelay-cache"] for r in replies} == {"miss"}
        assert elapsed < 2.0  # five lookups at 0.5 s each would be 2.5 s
        record = gw.record(replies[-1].headers["x-respan-log-id"])
        assert COUNTER_WARNING in record["warnings"]
        assert metric(gw.url, "llmrelay_cache_lookups_total", result="miss") == 6
        assert "cache lookup failed" in gw.output.read_text()
    finally:
        hole.close()
