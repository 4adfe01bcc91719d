"""GET /api/ready/: readiness against real Redis and PostgreSQL, on real gateway processes.

200 while every Redis URL the config uses answers PING and every log sink is healthy; 503 naming
the check that failed and why (never a password) when not; 503 "stopping" once SIGTERM started the
drain. /api/health-check/ stays the liveness answer: 200 whatever the backends do.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from proxy.readiness import CACHE_SECONDS, Readiness, masked_url
from proxy.settings import parse_settings
from tests.conftest import KEY, REDIS_URL, wait_until
from tests.mock_upstream import free_port
from tests.relay import Relay

PASSWORD = "s3cret-pw-1234"  # trust auth ignores it; it must never show in an answer


def ready(url: str) -> httpx.Response:
    return httpx.get(f"{url}/api/ready/", timeout=5)


def test_ready_with_real_redis_and_postgres(start_gateway, pg_store):
    redis = {"backend": "redis", "url": REDIS_URL}
    sinks = [{"type": "postgres", "dsn": pg_store.replace("postgres@", f"postgres:{PASSWORD}@")}]
    gateway = start_gateway(workers=2, state={"cache": redis, "counters": redis, "cooldowns": redis},
                            store={"backend": "postgres", "dsn": pg_store, "notify_url": REDIS_URL},
                            pipeline=["auth", "limits", "cache", "routing", "fallback"],
                            logs={"spool_dir": "spool", "flush_interval": 0.05,
                                  "sinks": [*sinks, {"type": "sqlite", "path": "logs.db"}]})
    for path in ("/api/ready/", "/api/ready"):  # no key needed, like the liveness route
        response = httpx.get(gateway.url + path, timeout=5)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "ready"
        assert response.headers["cache-control"] == "no-store"
    checks = body["checks"]
    # one PING per distinct Redis URL, saying what uses it
    assert checks[f"redis:{REDIS_URL}"] == {
        "ok": True, "used_by": ["state.cache", "state.counters", "state.cooldowns", "store.notify_url"]}
    assert checks["log_sink:postgres"]["ok"] and checks["log_sink:sqlite"]["ok"]
    assert checks["log_sink:postgres"]["target"] == masked_url(sinks[0]["dsn"])
    assert set(checks) == {f"redis:{REDIS_URL}", "log_sink:postgres", "log_sink:sqlite"}
    assert PASSWORD not in response.text
    # the gateway serves meanwhile, and the answer goes through the sink the check watches
    answer = httpx.post(f"{gateway.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert answer.status_code == 200


def test_ready_names_redis_when_it_cannot_be_reached(start_gateway):
    closed = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    gateway = start_gateway(state={"cache": {"backend": "redis", "url": REDIS_URL},
                                   "counters": {"backend": "redis", "url": closed}},
                            pipeline=["auth", "limits", "cache"])
    response = ready(gateway.url)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    failing = {name: check for name, check in body["checks"].items() if not check["ok"]}
    assert list(failing) == [f"redis:{masked_url(closed)}"]
    check = failing[f"redis:{masked_url(closed)}"]
    assert check["used_by"] == ["state.counters"]
    assert "Connection refused" in check["error"] and "127.0.0.1" in check["error"]
    assert body["checks"][f"redis:{REDIS_URL}"]["ok"]  # the other Redis is fine and said so
    assert PASSWORD not in response.text and ":***@" in response.text
    # liveness does not depend on the backends
    assert httpx.get(f"{gateway.url}/api/health-check/").status_code == 200


def test_ready_names_the_postgres_sink_while_it_is_down_and_recovers(start_gateway, pg_store):
    relay = Relay(("127.0.0.1", 5432)).start()
    try:
        dsn = pg_store.replace("postgres@127.0.0.1:5432", f"postgres:{PASSWORD}@127.0.0.1:{relay.port}")
        gateway = start_gateway(logs={"spool_dir": "spool", "flush_interval": 0.05,
                                      "sinks": [{"type": "postgres", "dsn": dsn}]})
        assert wait_until(lambda: ready(gateway.url).status_code == 200, 10), ready(gateway.url).text

        relay.stop()  # PostgreSQL is gone: open connections cut, the port closed
        assert wait_until(lambda: ready(gateway.url).status_code == 503, 5)
        response = ready(gateway.url)
        body = response.json()
        assert body["status"] == "not_ready"
        check = body["checks"]["log_sink:postgres"]
        assert not check["ok"] and check["error"], check
        assert check["target"] == masked_url(dsn)
        assert PASSWORD not in response.text
        # requests are still answered (their logs wait in the spool)
        answer = httpx.post(f"{gateway.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                            json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert answer.status_code == 200

        relay.start()  # back
        started = time.monotonic()
        assert wait_until(lambda: ready(gateway.url).status_code == 200, 15), ready(gateway.url).text
        assert time.monotonic() - started < 10
        assert ready(gateway.url).json()["checks"]["log_sink:postgres"]["ok"]
    finally:
        relay.stop()


def read_stream(url: str, out: dict[str, Any]) -> None:
    body = {"model": "mock/mock-slow-40", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", f"{url}/api/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        out["events"] = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_ready_answers_stopping_once_sigterm_started_the_drain(start_gateway, mock):
    gateway = start_gateway(server={"shutdown_timeout": 10})
    assert ready(gateway.url).status_code == 200
    out: dict[str, Any] = {}
    reader = threading.Thread(target=read_stream, args=(gateway.url, out))
    reader.start()
    # A probe already on its way when SIGTERM comes: granian closes the listener and idle
    # connections at once, but finishes a request it has started reading.
    probe = socket.create_connection(("127.0.0.1", gateway.port))
    probe.sendall(b"GET /api/ready/ HTTP/1.1\r\nHost: gateway\r\n")
    time.sleep(0.5)  # the stream is under way
    gateway.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    probe.sendall(b"\r\n")
    probe.settimeout(5)
    answer = b""
    while chunk := probe.recv(65536):
        answer += chunk
    probe.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert b'"status":"stopping"' in body and b"draining" in body
    with pytest.raises(httpx.ConnectError):  # and no new connection gets in
        httpx.get(f"{gateway.url}/api/health-check/", timeout=1)
    reader.join(30)
    assert out["events"][-1] == "[DONE]" and len(out["events"]) == 41  # the stream drained whole
    assert gateway.proc.wait(30) == 0


# -- the check itself, in process ------------------------------------------------------------

class CountingRedis:
    def __init__(self) -> None:
        self.pings = 0

    def get(self, url: str) -> CountingRedis:
        return self

    async def execute(self, *args: Any) -> bytes:
        self.pings += 1
        await asyncio.sleep(0.05)
        return b"PONG"


class HealthyLogs:
    async def health(self, timeout: float) -> dict[str, str | None]:
        return {"sqlite": None}


class Stub:
    def __init__(self) -> None:
        self.settings = parse_settings({"state": {"cache": {"backend": "redis", "url": REDIS_URL}}}, "test")
        self.redis = CountingRedis()
        self.logs = HealthyLogs()
        self.draining = False


def test_results_are_shared_and_cached_so_probes_do_not_hammer_backends():
    gateway = Stub()
    readiness = Readiness(gateway)  # type: ignore[arg-type]

    async def run() -> None:
        results = await asyncio.gather(*(readiness.result() for _ in range(20)))  # at once: one round
        assert {status for status, _ in results} == {200} and gateway.redis.pings == 1
        for _ in range(10):  # within CACHE_SECONDS: the same answer, no PING
            assert (await readiness.result())[0] == 200
        assert gateway.redis.pings == 1
        await asyncio.sleep(CACHE_SECONDS + 0.05)
        await readiness.result()
        assert gateway.redis.pings == 2
        gateway.draining = True  # stopping is answered at once, never from the cache
        status, body = await readiness.result()
        assert status == 503 and body["status"] == "stopping" and gateway.redis.pings == 2

    asyncio.run(run())


def test_masked_url_hides_passwords_only():
    assert masked_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert masked_url("postgresql://u:pw@db:5432/x?sslmode=require") == "postgresql://u:***@db:5432/x?sslmode=require"
    assert masked_url("redis://h/0?password=pw&db=1") == "redis://h/0?password=***&db=1"
    assert masked_url("redis://127.0.0.1:6379/2") == "redis://127.0.0.1:6379/2"
