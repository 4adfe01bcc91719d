"""Policies created through the admin API, and how every process learns of them.

In memory they belong to this process. With Redis (`state.counters`), they live in one hash and
a version counter; every process polls the version (one GET a second) and reloads the hash when
it moved, so a policy created through any replica applies everywhere within about a second.
The request path never waits on this: it reads the stage's in-memory index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from plugins.limits.policy import Policy

log = logging.getLogger("llmrelay.limits")

POLICIES_KEY = "llmrelay:limits:policies"
VERSION_KEY = "llmrelay:limits:version"
POLL_INTERVAL = 1.0


class PolicyStore:
    def __init__(self, redis_url: str | None, on_change: Callable[[list[Policy]], None]) -> None:
        self.redis_url = redis_url
        self.on_change = on_change  # called with every admin-created policy after each change
        self.policies: dict[str, Policy] = {}
        self._redis: Any = None
        self._version: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not self.redis_url:
            return
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        with contextlib.suppress(Exception):  # Redis down at start: the poller catches up later
            await self._reload()
        self._task = asyncio.ensure_future(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()

    async def put(self, policy: Policy) -> None:
        if self._redis is not None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(POLICIES_KEY, policy.name, msgspec.json.encode(policy))
                pipe.incr(VERSION_KEY)
                await pipe.execute()
        self.policies[policy.name] = policy
        self.on_change(list(self.policies.values()))

    async def delete(self, name: str) -> None:
        if self._redis is not None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(POLICIES_KEY, name)
                pipe.incr(VERSION_KEY)
                await pipe.execute()
        self.policies.pop(name, None)
        self.on_change(list(self.policies.values()))

    async def _reload(self) -> None:
        version = int(await self._redis.get(VERSION_KEY) or 0)
        if version == self._version:
            return
        raw = await self._redis.hgetall(POLICIES_KEY)
        policies = {}
        for name, value in raw.items():
            try:
                policies[name.decode()] = msgspec.json.decode(value, type=Policy)
            except msgspec.ValidationError as exc:  # written by another version: skip, say so
                log.warning("ignoring stored limit policy %r: %s", name, exc)
        self._version = version
        self.policies = policies
        self.on_change(list(policies.values()))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await self._reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("could not reload limit policies: %s", exc)
