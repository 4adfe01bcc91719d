"""Readiness (`GET /api/ready/`): can this worker serve with its required state backends?

Liveness (`/api/health-check/`) says the process answers; readiness says whether a load balancer
should send it traffic:

- every distinct Redis URL the config uses (`state.cache`, `state.counters`, `state.cooldowns`,
  `store.notify_url`, and any other a stage opened through the gateway's shared Redis clients)
  answers PING, through the same client the request path uses;
- every log sink is healthy: its last open, write or replay did not fail, and its own check
  passes (PostgreSQL: `SELECT 1` through the sink's pool; SQLite and JSONL: the file is writable;
  http: the last delivery's outcome);
- the worker is not draining (SIGTERM): then 503 with `"status": "stopping"` at once.

One result is computed at a time and kept for CACHE_SECONDS, so probes from many load balancers
cost the backends one PING and one query a second per worker. Nothing here runs per request.
Check names and messages never carry a secret: passwords in URLs and DSNs are masked.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from proxy.gateway import Gateway
from proxy.settings import LogSink
from proxy.state.redis import RedisClient

CACHE_SECONDS = 1.0  # a result is reused this long
TIMEOUT = 0.5  # seconds each check gets (a Redis PING: the client's own connect and reply timeouts)
REDIS_DEADLINE = 1.0  # connect (0.5 s) then PING (0.5 s), at most
STOPPING = "the worker is draining in-flight requests (SIGTERM)"


def masked_url(url: str) -> str:
    """`url` with its password (in the userinfo or a `password=` query parameter) shown as ***."""
    try:
        parts = urlsplit(url)
        if parts.password is None and "password=" not in parts.query.lower():
            return url
        netloc = parts.netloc
        if parts.password is not None:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.partition(':')[0]}:***@{host}"
        query = "&".join("password=***" if p.lower().startswith("password=") else p for p in parts.query.split("&"))
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<invalid url>"


def sink_target(sink: LogSink) -> str:
    """Where a log sink writes, without secrets: a file, a DSN with its password masked, an http
    receiver's URL without userinfo or query (a hosted endpoint may carry a token there)."""
    if sink.type == "postgres":
        return masked_url(sink.dsn or "")
    if sink.type == "http":
        try:
            parts = urlsplit(sink.url or "")
            host = parts.hostname or ""
            return urlunsplit((parts.scheme, f"{host}:{parts.port}" if parts.port else host, parts.path, "", ""))
        except ValueError:
            return "<invalid url>"
    return sink.path or ""


def secrets_of(gateway: Gateway) -> list[str]:
    """Passwords and keys that a backend's error message could echo (masked in every answer)."""
    settings = gateway.settings
    urls = [b.url for b in (settings.state.cache, settings.state.counters, settings.state.cooldowns) if b.url]
    urls += [u for u in (settings.store.notify_url, settings.store.dsn) if u]
    urls += [s.dsn or "" for s in settings.logs.sinks] + [s.url or "" for s in settings.logs.sinks]
    urls += list(_shared_clients(gateway))
    found = [s.api_key for s in settings.logs.sinks if s.api_key]
    for url in urls:
        try:
            parts = urlsplit(url)
        except ValueError:
            continue
        if parts.password:
            found.append(parts.password)
        found += [v for k, _, v in (p.partition("=") for p in parts.query.split("&")) if k.lower() == "password" and v]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def _shared_clients(gateway: Gateway) -> dict[str, RedisClient]:
    """The request path's Redis clients by URL (those the stages opened)."""
    return dict(getattr(gateway.redis, "_clients", {}))


def redis_uses(gateway: Gateway) -> dict[str, list[str]]:
    """Each distinct Redis URL the gateway uses -> what uses it."""
    settings = gateway.settings
    uses: dict[str, list[str]] = {}
    for name in ("cache", "counters", "cooldowns"):
        backend = getattr(settings.state, name)
        if backend.backend == "redis" and backend.url:
            uses.setdefault(backend.url, []).append(f"state.{name}")
    if settings.store.notify_url:
        uses.setdefault(settings.store.notify_url, []).append("store.notify_url")
    for url in _shared_clients(gateway):
        uses.setdefault(url, ["a stage"])
    return uses


class Readiness:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._result: tuple[int, dict[str, Any]] | None = None
        self._expires = 0.0
        self._running: asyncio.Task[tuple[int, dict[str, Any]]] | None = None
        self._secrets: list[str] | None = None

    async def result(self) -> tuple[int, dict[str, Any]]:
        """(status code, body): 200 ready, 503 not_ready (naming what failed) or stopping."""
        if getattr(self.gateway, "draining", False):
            return 503, {"status": "stopping", "checks": {"shutdown": {"ok": False, "error": STOPPING}}}
        now = time.monotonic()
        if self._result is not None and now < self._expires:
            return self._result
        if self._running is None or self._running.done():  # concurrent probes share one round of checks
            self._running = asyncio.create_task(self._check(), name="llmrelay-readiness")
        result = await asyncio.shield(self._running)  # a probe that gives up does not cut it short
        self._result, self._expires = result, time.monotonic() + CACHE_SECONDS
        return result

    async def _check(self) -> tuple[int, dict[str, Any]]:
        uses = redis_uses(self.gateway)
        redis = [self._redis(url, used_by) for url, used_by in uses.items()]
        sinks, *pings = await asyncio.gather(self.gateway.logs.health(TIMEOUT), *redis)
        checks: dict[str, dict[str, Any]] = dict(pings)
        targets = {sink.type: sink_target(sink) for sink in self.gateway.settings.logs.sinks}
        for sink, problem in sinks.items():
            check = {"ok": problem is None, "target": targets.get(sink, "")}
            if problem is not None:
                check["error"] = problem
            checks[f"log_sink:{sink}"] = check
        checks = self._masked(checks)
        ready = all(c["ok"] for c in checks.values())
        return (200 if ready else 503), {"status": "ready" if ready else "not_ready", "checks": checks}

    async def _redis(self, url: str, used_by: list[str]) -> tuple[str, dict[str, Any]]:
        name = f"redis:{masked_url(url)}"
        try:
            client = self.gateway.redis.get(url)  # the request path's client (made here if no stage has one)
            async with asyncio.timeout(REDIS_DEADLINE):
                await client.execute("PING")
        except TimeoutError:
            error = f"no answer to PING within {REDIS_DEADLINE:g} s"
        except Exception as exc:
            error = str(exc) or type(exc).__name__
        else:
            return name, {"ok": True, "used_by": used_by}
        return name, {"ok": False, "used_by": used_by, "error": error}

    def _masked(self, checks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if self._secrets is None:
            self._secrets = secrets_of(self.gateway)
        for check in checks.values():
            error = check.get("error")
            if error:
                for secret in self._secrets:
                    error = error.replace(secret, "***")
                check["error"] = error
        return checks
