"""The data plane's view of the admin store: every object in memory, reloaded when the store's
change counter moves. Readers get plain dicts; nothing on the request path awaits the store.

Workers poll the counter every `poll_interval`. With a Redis URL (`store.notify_url`), a write
is also published, and every worker and replica reloads at once instead of at its next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

from proxy.state.channel import follow, scoped
from proxy.store import AdminStore, Conflict, StoredObject, StoreUnavailable

log = logging.getLogger("llmrelay.store")
CHANNEL = "llmrelay:admin:changed"
UPDATE_TRIES = 10
Listener = Callable[[dict[str, StoredObject]], None]


class Snapshot:
    def __init__(self, store: AdminStore, poll_interval: float, notify_url: str | None = None) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.notify_url = notify_url
        self._redis: Any = None
        self._listener: asyncio.Task[None] | None = None
        self.version = -1
        self.objects: dict[str, dict[str, StoredObject]] = {}  # kind -> id -> object
        self._listeners: dict[str, list[Listener]] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._opened = False

    def of(self, kind: str) -> dict[str, StoredObject]:
        return self.objects.get(kind, {})

    def subscribe(self, kind: str, listener: Listener) -> None:
        """Call `listener(objects of kind)` now and after every reload that changed the store."""
        self._listeners.setdefault(kind, []).append(listener)
        listener(self.of(kind))

    async def start(self) -> None:
        """Open the store and load it. A store that cannot be reached now does not stop the
        gateway: it serves the config file's objects, and the poll keeps trying."""
        try:
            await self._open_and_load()
        except Exception as exc:
            log.error("admin store unreachable at start-up; serving the config file's objects only: %r", exc)
        self._task = asyncio.create_task(self._poll(), name="llmrelay-admin-snapshot")
        if self.notify_url:
            import redis.asyncio as redis

            self._redis = redis.Redis.from_url(self.notify_url, socket_connect_timeout=2)
            self._listener = asyncio.create_task(self._listen(), name="llmrelay-admin-notices")

    async def _open_and_load(self) -> None:
        if not self._opened:
            await self.store.open()
            self._opened = True
        await self.refresh()

    async def stop(self) -> None:
        for task in (self._task, self._listener):
            if task is not None:
                task.cancel()
                await asyncio.wait({task})
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
        if self._opened:
            await self.store.close()

    async def refresh(self, force: bool = False) -> bool:
        """Reload when the store changed (or when forced); True when it did."""
        async with self._lock:
            if not force and await self.store.version() == self.version:
                return False
            version, objects = await self.store.load()
            by_kind: dict[str, dict[str, StoredObject]] = {}
            for obj in objects:
                by_kind.setdefault(obj.kind, {})[obj.id] = obj
            self.objects, self.version = by_kind, version
            for kind, listeners in self._listeners.items():
                for listener in listeners:
                    try:
                        listener(self.of(kind))
                    except Exception:
                        log.exception("applying admin-store objects of kind %s failed", kind)
            return True

    async def _poll(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self._open_and_load()
            except Exception as exc:  # the store is down: keep serving the last snapshot
                if not failing:
                    log.warning("admin store unreachable, serving the last snapshot: %r", exc)
                failing = True
            else:
                if failing:
                    log.info("admin store reachable again")
                failing = False

    async def _listen(self) -> None:
        """Reload on every notice (and after each subscription, so no change falls in between).
        A reload that fails here is retried by the poll."""

        async def reload(*_: Any) -> None:
            with contextlib.suppress(Exception):
                await self._open_and_load()

        await follow(self._redis, scoped(self._redis, CHANNEL), on_subscribed=reload, on_message=reload, what="admin change")

    async def _changed(self) -> None:
        """After a write: reload here before answering, and tell the other workers and replicas."""
        await self.refresh(force=True)
        if self._redis is not None:
            try:
                await self._redis.publish(scoped(self._redis, CHANNEL), str(self.version))
            except Exception as exc:  # they will see it at their next poll
                log.warning("could not publish an admin change notice: %r", exc)

    async def put(self, kind: str, id: str, data: dict[str, Any], *, create: bool = False) -> StoredObject:
        """Write through the store; this worker has the change when this returns."""
        with _reachable():
            obj = await self.store.put(kind, id, data, create=create)
        await self._changed()
        return obj

    async def update(self, kind: str, id: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> StoredObject | None:
        """Read-modify-write of one object against the store (never a stale snapshot): `change`
        gets a copy of the stored data and returns the new data (or raises to abort). When another
        worker or replica wrote the object in between, it runs again on the fresh data.
        None when there is no such object."""
        for _ in range(UPDATE_TRIES):
            with _reachable():
                current = await self.store.get(kind, id)
            if current is None:
                return None
            data = change(copy.deepcopy(current.data))
            try:
                with _reachable():
                    obj = await self.store.put(kind, id, data, if_updated_at=current.updated_at)
            except Conflict:
                continue
            await self._changed()
            return obj
        raise Conflict(f"{kind} {id!r} is being changed by other writers; try again")

    async def delete(self, kind: str, id: str) -> bool:
        with _reachable():
            deleted = await self.store.delete(kind, id)
        if deleted:
            await self._changed()
        return deleted


@contextlib.contextmanager
def _reachable() -> Iterator[None]:
    """A write that cannot reach the store (connection refused or lost) is StoreUnavailable."""
    try:
        yield
    except (TimeoutError, OSError) as exc:
        raise StoreUnavailable(f"the admin store cannot be reached ({type(exc).__name__})") from None
