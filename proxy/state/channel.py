"""Following a Redis pub/sub channel for as long as the gateway runs, through Redis outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("llmrelay.state")


def scoped(redis: Any, channel: str) -> str:
    """The channel name for this Redis database: pub/sub ignores the database number, so two
    deployments sharing one Redis server on different databases would otherwise hear each other."""
    return f"{channel}:{redis.connection_pool.connection_kwargs.get('db', 0)}"


async def follow(redis: Any, channel: str, *, on_subscribed: Callable[[], Awaitable[None]],
                 on_message: Callable[[bytes], Awaitable[None]], what: str) -> None:
    """Subscribe to `channel` and hand every message's data to `on_message`. `on_subscribed` runs
    after each (re)subscription, so that nothing published while unsubscribed is missed. A lost
    connection is retried with back-off (0.5 s doubling to 10 s); runs until cancelled."""
    delay = 0.5
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(channel)
            await on_subscribed()
            delay = 0.5
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    await on_message(message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s channel lost (%s); retrying in %.1fs", what, exc, delay)
        finally:  # never leak the old connection when reconnecting or stopping
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)
