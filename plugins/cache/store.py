"""Where cached answers live: aiocache's memory or Redis backend.

An Entry is one successful answer as the gateway relayed it: a whole JSON body, or the whole
SSE stream. In memory the Entry object itself is kept (a hit decodes nothing); in Redis it is
msgpack. Listing (for the cache admin) walks the backend's keys: the memory backend's dict, or
a Redis SCAN over the namespace.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
from aiocache import RedisCache, SimpleMemoryCache
from aiocache.serializers import BaseSerializer

NAMESPACE = "llmrelay:cache:"


class Entry(msgspec.Struct, kw_only=True, array_like=True):
    kind: Literal["whole", "stream"]
    body: bytes
    client_format: str
    endpoint: str
    model: str  # the model requested when the answer was made
    served_by: str  # provider/model that answered
    customer: str | None
    created: float  # unix seconds
    expires: float  # unix seconds
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def summary(self, key: str) -> dict[str, Any]:
        """What the cache admin shows of an entry (never the content)."""
        return {"id": key, "cache_key": key, "kind": self.kind, "client_format": self.client_format,
                "endpoint": self.endpoint, "model": self.model, "served_by": self.served_by,
                "customer_identifier": self.customer, "size_bytes": len(self.body),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "created_at": self.created, "expires_at": self.expires}


class MsgpackSerializer(BaseSerializer):
    DEFAULT_ENCODING = None  # bytes in, bytes out: aiocache must not decode what Redis returns

    _encoder = msgspec.msgpack.Encoder()
    _decoder = msgspec.msgpack.Decoder(Entry)

    def dumps(self, value: Entry) -> bytes:
        return self._encoder.encode(value)

    def loads(self, value: bytes | None) -> Entry | None:
        if value is None:
            return None
        try:
            return self._decoder.decode(value)
        except msgspec.DecodeError:  # written by another version: a miss, not an error
            return None


class KeepObjects(BaseSerializer):
    DEFAULT_ENCODING = None

    def dumps(self, value: Any) -> Any:
        return value

    def loads(self, value: Any) -> Any:
        return value


class CacheStore:
    """get / set / delete / list / clear over one aiocache backend."""

    def __init__(self, redis_url: str | None = None, *, max_entries: int = 10_000, timeout: float = 0.5) -> None:
        self.max_entries = max_entries  # memory only: Redis has its own maxmemory policy
        if redis_url:
            from redis.asyncio.connection import parse_url

            options = parse_url(redis_url)
            # RedisCache puts a ":" between namespace and key itself: the Redis key is NAMESPACE + key
            self.cache: Any = RedisCache(
                serializer=MsgpackSerializer(), namespace=NAMESPACE.removesuffix(":"), timeout=timeout,
                endpoint=options.get("host", "127.0.0.1"), port=options.get("port", 6379), db=options.get("db", 0),
                password=options.get("password"), create_connection_timeout=timeout,
                connection_pool_kwargs={"socket_timeout": timeout},
            )
            self.redis = True
        else:
            # no timeout: a memory lookup never waits, and asyncio.wait_for would cost more than it
            self.cache = SimpleMemoryCache(serializer=KeepObjects(), namespace=NAMESPACE, timeout=None)
            self.redis = False

    async def get(self, key: str) -> Entry | None:
        entry = await self.cache.get(key)
        if entry is not None and entry.expires <= time.time():  # the backend's TTL is the usual guard
            return None
        return entry

    async def set(self, key: str, entry: Entry) -> None:
        # a float: both backends keep sub-second TTLs (Redis PSETEX), so 1.9 s is not cut to 1 s
        ttl = max(entry.expires - time.time(), 0.001)
        # memory: a key stored again replaces itself (and becomes the newest): nothing to evict
        if not self.redis and self.cache._cache.pop(self.cache.build_key(key), None) is None:
            self._make_room()
        await self.cache.set(key, entry, ttl=ttl)

    def _make_room(self) -> None:
        """Memory: past max_entries, drop the oldest entries (dicts keep insertion order)."""
        stored: dict[str, Any] = self.cache._cache  # aiocache's memory backend keeps its dict here
        handlers: dict[str, Any] = self.cache._handlers
        while len(stored) >= self.max_entries:
            oldest = next(iter(stored))
            del stored[oldest]
            handle = handlers.pop(oldest, None)
            if handle is not None:
                handle.cancel()

    async def delete(self, key: str) -> bool:
        return bool(await self.cache.delete(key))

    async def clear(self) -> int:
        count = 0
        async for key in self.ids():
            count += await self.delete(key)
        return count

    async def ids(self) -> AsyncIterator[str]:
        """Every stored key, without the namespace."""
        prefix = self.cache.build_key("")  # the backend's own: what get/delete put before a key
        if self.redis:
            async for raw in self.cache.client.scan_iter(match=prefix + "*", count=500):
                yield raw.decode()[len(prefix):]
        else:
            for key in list(self.cache._cache):
                yield key[len(prefix):]

    async def entries(self) -> AsyncIterator[tuple[str, Entry]]:
        async for key in self.ids():
            entry = await self.get(key)
            if entry is not None:
                yield key, entry

    async def close(self) -> None:
        await self.cache.close()
