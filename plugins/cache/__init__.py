"""The `cache` stage: exact-match response caching (spec 3.4).

With `cache_enabled` (a request param, or a default from the options), a request whose key
(plugins/cache/keys.py) is stored is answered from the cache: no upstream call, cost 0, the log
says model `respan/cache` and cache_hit (or nothing at all with `cache_options.omit_log`), and
`x-llmrelay-cache: hit`. A stored stream replays as the same SSE events in the same order; a
whole answer serves a stream request and the other way round (proxy/replay.py converts).

A miss goes on down the pipeline; its answer is stored in the background when it is a complete
success: a 200 body, or a stream the relay saw end properly (never an error, an error event, a
cut stream or one the client left).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import msgspec

from plugins.cache.admin import admin_routes
from plugins.cache.keys import cache_key
from plugins.cache.store import CacheStore, Entry, MemoryStore, RedisStore
from proxy import replay
from proxy.call import Call, Prices, Reply, Target
from proxy.metrics import Metrics
from proxy.params import CacheOptions
from proxy.pipeline import Next, StageContext, redis_client

log = logging.getLogger("llmrelay.cache")

CACHE_MODEL = "respan/cache"  # the model a cache hit is logged with (spec 3.4)
CACHE_TARGET = Target(provider="respan", protocol="cache", model=CACHE_MODEL, prices=Prices())
HEADER = "x-llmrelay-cache"
CACHEABLE = frozenset({"chat", "embeddings", "responses", "anthropic.messages", "gemini.generateContent",
                       "gemini.streamGenerateContent", "gemini.embedContent", "gemini.batchEmbedContents"})
THIRTY_DAYS = 30 * 24 * 3600.0
RETRY_BACKEND = 1.0  # seconds a cache backend that failed is not asked again (as the limits stage does)
NO_OPTIONS = CacheOptions()


class Defaults(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Values a request's cache params fall back to."""

    cache_enabled: bool = False
    cache_ttl: float = THIRTY_DAYS
    cache_by_customer: bool = False
    is_cached_by_model: bool = False
    omit_log: bool = False


class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    defaults: Defaults = msgspec.field(default_factory=Defaults)
    keys: dict[str, Defaults] = msgspec.field(default_factory=dict)  # per API key name, instead of `defaults`
    max_entries: int = 10_000  # memory backend only
    max_entry_bytes: int = 4 * 1024 * 1024  # larger answers are not stored


class Settings(msgspec.Struct, frozen=True):
    """The cache params of one request, after its defaults."""

    enabled: bool
    ttl: float
    by_customer: bool
    by_model: bool
    omit_log: bool


class CacheStage:
    def __init__(self, options: Options, store: CacheStore, metrics: Metrics, admin: Any = None) -> None:
        self.options = options
        self.store = store
        self.metrics = metrics
        self.admin = admin
        self.hits = metrics.cache_lookups.labels("hit")
        self.misses = metrics.cache_lookups.labels("miss")
        self._tasks: set[asyncio.Future[Any]] = set()  # stores on their way
        self._down_until = 0.0  # after a failed lookup: every request until then is a miss at once
        metrics.track_sizes("cache", self.sizes)

    def sizes(self) -> dict[str, int]:
        sizes = {"pending_stores": len(self._tasks)}
        if isinstance(self.store, MemoryStore):
            sizes["entries"] = len(self.store)
        return sizes

    def defaults_for(self, call: Call) -> Defaults:
        if self.options.keys and call.key is not None:
            return self.options.keys.get(call.key.name, self.options.defaults)
        return self.options.defaults

    def settings_for(self, call: Call) -> Settings:
        defaults = self.defaults_for(call)
        params = call.params
        opts = params.cache_options or NO_OPTIONS
        omit_log = opts.omit_log if opts.omit_log is not None else opts.omit_logs
        return Settings(
            enabled=defaults.cache_enabled if params.cache_enabled is None else params.cache_enabled,
            ttl=params.cache_ttl or defaults.cache_ttl,
            by_customer=_given(opts.cache_by_customer, defaults.cache_by_customer),
            by_model=_given(opts.is_cached_by_model, defaults.is_cached_by_model),
            omit_log=_given(omit_log, defaults.omit_log),
        )

    def __call__(self, call: Call, next: Next) -> Awaitable[Reply]:
        enabled = call.params.cache_enabled
        if enabled is None:
            enabled = self.defaults_for(call).cache_enabled
        if not enabled or call.endpoint not in CACHEABLE:
            return next(call)
        return self.cached(call, next)

    async def cached(self, call: Call, next: Next) -> Reply:
        settings = self.settings_for(call)
        key = cache_key(call, by_model=settings.by_model, by_customer=settings.by_customer)
        entry = None
        if time.monotonic() >= self._down_until:  # a backend that just failed is not waited on again
            try:
                entry = await self.store.get(key)
            except Exception as exc:  # a cache that is down is a miss, never a failed request
                self._down_until = time.monotonic() + RETRY_BACKEND
                log.warning("cache lookup failed (%s: %s): treated as a miss for %.0f s", type(exc).__name__, exc,
                            RETRY_BACKEND)
        if entry is not None and call.gates:
            await call.ready()  # a refused request is not answered, not even from the cache
        reply = self.replay(call, entry, settings) if entry is not None else None
        if reply is not None:
            self.metrics.count(self.hits)
            return reply
        self.metrics.count(self.misses)
        reply = await next(call)
        reply.headers[HEADER] = "miss"
        if reply.status == 200:
            self.keep(call, reply, key, settings)
        return reply

    # -- hits --------------------------------------------------------------------------

    def replay(self, call: Call, entry: Entry, settings: Settings) -> Reply | None:
        """The cached answer in the mode the request asks for; None when it cannot be converted."""
        body = entry.body
        if call.stream and entry.kind == "whole":
            body = replay.stream_from_whole(call.client_format, call.endpoint, body)
        elif not call.stream and entry.kind == "stream":
            body = replay.whole_from_stream(call.client_format, call.endpoint, body)
        if body is None:
            return None
        call.target = CACHE_TARGET
        call.cache_hit = True
        call.state["cache_hit"] = True  # what proxy/breakdown.py reads: request_breakdown.cached
        call.omit_log = settings.omit_log
        call.finish_hooks.append(_log_as_cache)
        headers = {HEADER: "hit"}
        if call.stream:
            return Reply(200, stream=_once(body), headers=headers, media_type="text/event-stream")
        return Reply(200, body=body, headers=headers)

    # -- misses ------------------------------------------------------------------------

    def keep(self, call: Call, reply: Reply, key: str, settings: Settings) -> None:
        """Store the answer once it is known to be complete and successful."""
        if reply.stream is None:
            if reply.body and len(reply.body) <= self.options.max_entry_bytes:
                body = reply.body  # before the finish: a request breakdown is added after this
                call.finish_hooks.append(lambda done: self._store(done, key, "whole", body, settings))
            return
        parts: list[bytes] = []
        reply.stream = self._tee(reply.stream, parts)
        call.finish_hooks.append(lambda done: self._store(done, key, "stream", b"".join(parts), settings))

    async def _tee(self, stream: AsyncIterator[bytes], parts: list[bytes]) -> AsyncIterator[bytes]:
        size = 0
        limit = self.options.max_entry_bytes
        try:
            async for chunk in stream:
                if size <= limit:
                    size += len(chunk)
                    parts.append(chunk)
                yield chunk
        finally:
            if size > limit:
                parts.clear()
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def _store(self, call: Call, key: str, kind: str, body: bytes, settings: Settings) -> None:
        if call.status_code != 200 or call.error is not None or not body or time.monotonic() < self._down_until:
            return
        now = time.time()
        target = call.target
        entry = Entry(kind=kind, body=body, client_format=call.client_format, endpoint=call.endpoint,
                      model=call.model, served_by=f"{target.provider}/{call.response_model or target.model}"
                      if target else "", customer=call.params.customer(), created=now, expires=now + settings.ttl,
                      prompt_tokens=call.usage.prompt_tokens, completion_tokens=call.usage.completion_tokens)
        # Redis: the write is sent now and followed by its future (no task); memory: a task
        written = asyncio.ensure_future(self.store.set(key, entry))
        self._tasks.add(written)
        written.add_done_callback(self._written)

    def _written(self, done: asyncio.Future[Any]) -> None:
        self._tasks.discard(done)
        if done.cancelled():
            return
        exc = done.exception()
        if exc is None:
            self.metrics.count(self.metrics.cache_stores)
        else:
            log.warning("could not store a cache entry (%s: %s)", type(exc).__name__, exc)

    # -- lifecycle and admin -----------------------------------------------------------

    def routes(self) -> list[Any]:
        return admin_routes(self.store, self.admin) if self.admin is not None else []

    async def shutdown(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        with contextlib.suppress(Exception):
            await self.store.close()


def _given(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _log_as_cache(call: Call) -> None:
    call.response_model = CACHE_MODEL


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


def create_stage(context: StageContext) -> CacheStage:
    try:
        options = msgspec.convert(context.options, Options)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    for where, defaults in [("defaults", options.defaults), *((f"keys.{k}", d) for k, d in options.keys.items())]:
        if not defaults.cache_ttl > 0:
            raise ValueError(f"{where}.cache_ttl: expected seconds > 0, got {defaults.cache_ttl}")
    backend = context.settings.state.cache
    store: CacheStore = RedisStore(redis_client(context, backend.url)) if backend.backend == "redis" and backend.url \
        else MemoryStore(max_entries=options.max_entries)
    metrics = context.services.get("metrics") or Metrics()
    return CacheStage(options, store, metrics, context.services.get("admin"))
