"""Where cached answers live: in this process (aiocache's memory backend) or in Redis.

An Entry is one successful answer as the gateway relayed it: a whole JSON body, or the whole
SSE stream. In memory the Entry object itself is kept (a hit decodes nothing); in Redis it is
msgpack. Listing (for the cache admin) walks the backend's keys: the memory backend's dict, or
a Redis SCAN over the namespace.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
from aiocache import SimpleMemoryCache
from aiocache.serializers import BaseSerializer

from proxy.state.redis import RedisClient

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


class KeepObjects(BaseSerializer):
    DEFAULT_ENCODING = None

    def dumps(self, value: Any) -> Any:
        return value

    def loads(self, value: Any) -> Any:
        return value


class _Listing(abc.ABC):
    """What both stores build on their own ids(), get() and delete()."""

    @abc.abstractmethod
    def ids(self) -> AsyncIterator[str]: ...

    @abc.abstractmethod
    async def get(self, key: str) -> Entry | None: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> bool: ...

    async def clear(self) -> int:
        count = 0
        async for key in self.ids():
            count += await self.delete(key)
        return count

    async def entries(self) -> AsyncIterator[tuple[str, Entry]]:
        async for key in self.ids():
            entry = await self.get(key)
            if entry is not None:
                yield key, entry


class MemoryStore(_Listing):
    """This process's cache: aiocache's memory backend, holding Entry objects (a hit decodes nothing)."""

    backend = "memory"

    def __init__(self, *, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        # no timeout: a memory lookup never waits, and asyncio.wait_for would cost more than it
        self.cache: Any = SimpleMemoryCache(serializer=KeepObjects(), namespace=NAMESPACE, timeout=None)

    async def get(self, key: str) -> Entry | None:
        entry = await self.cache.get(key)
        if entry is not None and entry.expires <= time.time():  # the backend's TTL is the usual guard
            return None
        return entry

    async def set(self, key: str, entry: Entry) -> None:
        # a key stored again replaces itself (and becomes the newest): nothing to evict
        if self.cache._cache.pop(self.cache.build_key(key), None) is None:
            self._make_room()
        await self.cache.set(key, entry, ttl=max(entry.expires - time.time(), 0.001))

    def _make_room(self) -> None:
        """Past max_entries, drop the oldest entries (dicts keep insertion order)."""
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

    def __len__(self) -> int:
        return len(self.cache._cache)

    async def ids(self) -> AsyncIterator[str]:
        """Every stored key, without the namespace."""
        prefix = self.cache.build_key("")
        for key in list(self.cache._cache):
            yield key[len(prefix):]

    async def close(self) -> None:
        await self.cache.close()


class RedisStore(_Listing):
    """Entries shared by every worker and replica: msgpack under NAMESPACE + key, with a TTL
    (PSETEX: sub-second TTLs are kept, so 1.9 s is not cut to 1 s). Redis's own maxmemory policy
    bounds it. Commands go through the gateway's auto-pipelined RedisClient."""

    backend = "redis"
    _encoder = msgspec.msgpack.Encoder()
    _decoder = msgspec.msgpack.Decoder(Entry)

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis

    async def get(self, key: str) -> Entry | None:
        raw = await self.redis.submit("GET", NAMESPACE + key)
        if raw is None:
            return None
        try:
            entry = self._decoder.decode(raw)
        except msgspec.DecodeError:  # written by another version: a miss, not an error
            return None
        return entry if entry.expires > time.time() else None

    def set(self, key: str, entry: Entry) -> asyncio.Future[Any]:
        """Sent with the next command someone awaits (a lookup, a limit reservation), or within a few
        milliseconds (RedisClient's `later`); the future says whether it landed."""
        ttl_ms = max(int((entry.expires - time.time()) * 1000), 1)
        return self.redis.submit("SET", NAMESPACE + key, self._encoder.encode(entry), "PX", ttl_ms, later=True)

    async def delete(self, key: str) -> bool:
        return bool(await self.redis.execute("DEL", NAMESPACE + key))

    async def ids(self) -> AsyncIterator[str]:
        """Every stored key, without the namespace, once (a SCAN: never blocks Redis, but may return
        a key twice when the keyspace is rehashed meanwhile)."""
        cursor: bytes | int = 0
        seen: set[bytes] = set()
        while True:
            cursor, keys = await self.redis.execute("SCAN", cursor, "MATCH", NAMESPACE + "*", "COUNT", 500)
            for raw in keys:
                if raw not in seen:
                    seen.add(raw)
                    yield raw.decode()[len(NAMESPACE):]
            if cursor in (b"0", 0):
                return

    async def close(self) -> None:
        return None  # the connection belongs to the gateway's RedisClients


CacheStore = MemoryStore | RedisStore
