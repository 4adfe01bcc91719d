"""Cooldowns: which deployments are out of rotation, and until when.

Failures are counted in each process; when a deployment crosses the threshold (or a 429 says
how long to wait), the process puts it in cooldown. With Redis configured, that decision is
stored (SET with a TTL) and published, so every worker and replica takes the deployment out
within a second; the request path itself only ever reads the local map.

A cooled deployment is never removed from a plan, only moved behind the healthy ones: the only
deployment of a model is still tried when nothing else is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from proxy.metrics import Metrics
from proxy.settings import Cooldowns as CooldownPolicy
from proxy.state.channel import follow, scoped

log = logging.getLogger("llmrelay.cooldowns")

CHANNEL = "llmrelay:cooldowns"
# Store a cooldown end only if it is later than the stored one: replicas may race, and a shorter
# cooldown must never cut a longer one short. Returns 1 when it stored.
EXTEND_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
KEY_PREFIX = "llmrelay:cooldown:"


class Cooldowns:
    def __init__(self, policy: CooldownPolicy, metrics: Metrics, redis_url: str | None = None) -> None:
        self.policy = policy
        self.statuses = frozenset(policy.statuses)
        self.metrics = metrics
        self.redis_url = redis_url
        self._until: dict[str, float] = {}  # deployment key -> unix time the cooldown ends
        self._failures: dict[str, deque[float]] = {}
        self._redis: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def sizes(self) -> dict[str, int]:
        return {"cooling": len(self._until), "failures": len(self._failures)}

    # -- the request path: memory only -------------------------------------------------

    def until(self, key: str) -> float:
        """Unix time the deployment's cooldown ends, or 0.0 when it is in rotation."""
        until = self._until.get(key)
        if until is None:
            return 0.0
        if until <= time.time():
            del self._until[key]
            self._gauge(key, 0)
            return 0.0
        return until

    def cooling(self, key: str) -> bool:
        return self.until(key) > 0.0

    def failure(self, key: str, status: int, retry_after: float | None = None) -> bool:
        """Count a failed attempt; True when it put the deployment in cooldown just now."""
        if status not in self.statuses or self.cooling(key):
            return False
        now = time.time()
        if status == 429 and retry_after:
            duration = min(retry_after, self.policy.max_duration)
        else:
            failures = self._failures.setdefault(key, deque())
            failures.append(now)
            while failures and failures[0] < now - self.policy.window:
                failures.popleft()
            if len(failures) < self.policy.failures:
                return False
            duration = self.policy.duration
        self._failures.pop(key, None)
        self.enter(key, now + duration)
        provider, _, deployment = key.partition("/")
        self.metrics.cooldowns_entered.labels(provider, deployment).inc()
        if self._redis is not None:
            self._spawn(self._publish(key, now + duration))
        return True

    def success(self, key: str) -> None:
        if key in self._failures:
            del self._failures[key]

    def enter(self, key: str, until: float) -> None:
        if until > self._until.get(key, 0.0):
            self._until[key] = until
            self._gauge(key, 1)
            # so the gauge drops back to 0 at the end even when no request asks again (without a
            # running loop, in a plain unit test, `until` resets it when asked)
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(max(until - time.time(), 0.0) + 0.01, self.until, key)

    def _gauge(self, key: str, value: int) -> None:
        provider, _, deployment = key.partition("/")
        self.metrics.deployment_cooling.labels(provider, deployment).set(value)

    # -- Redis: shared across workers and replicas ---------------------------------------

    async def start(self) -> None:
        if not self.redis_url:
            return
        import redis.asyncio as redis  # only needed when configured

        self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._spawn(self._listen())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, key: str, until: float) -> None:
        ttl_ms = max(int((until - time.time()) * 1000), 1)
        try:
            if await self._redis.eval(EXTEND_SCRIPT, 1, KEY_PREFIX + key, repr(until), ttl_ms):
                await self._redis.publish(scoped(self._redis, CHANNEL), f"{until!r} {key}")
        except Exception as exc:  # Redis down: this process still honours its own cooldown
            log.warning("could not share cooldown of %s through redis: %s", key, exc)

    async def _load(self) -> None:
        async for raw_key in self._redis.scan_iter(match=KEY_PREFIX + "*", count=500):
            value = await self._redis.get(raw_key)
            if value is not None:
                self.enter(raw_key.decode()[len(KEY_PREFIX):], float(value))

    async def _listen(self) -> None:
        """Follow the cooldown channel (after each subscription, load what is already stored)."""

        async def on_message(data: bytes) -> None:
            until, _, key = data.decode().partition(" ")
            self.enter(key, float(until))

        await follow(self._redis, scoped(self._redis, CHANNEL), on_subscribed=self._load, on_message=on_message, what="cooldown")
