"""A lean Redis client for the request path: auto-pipelined commands on one connection.

Every command submitted during one turn of the event loop goes out in a single write, and the
replies come back in order on the same connection: with many requests in flight, the limit
reservations, cache lookups and finish-time writes of all of them share round trips. hiredis
packs commands and parses replies in C. A write nobody waits for (a cache store, a limit
reconciliation) is submitted without a task: its future carries the outcome (an error nobody
looks at is not logged). Such a write may also be held back a moment (`later=True`) to go out
with the next command someone awaits: at low load, one request's finish-time writes then share
the next request's round trip instead of costing Redis and the event loop a wake-up each. Commands submitted while the connection is being opened wait for it,
in order, and go out before anything submitted once it is up.

Errors are RedisError: an error reply, a lost connection, or replies late by more than the
timeout (the connection is then dropped: a server that stopped answering is not trusted with
the next command; every command waiting on it fails, so a wait lasts at most twice the
timeout). After a failed connect the client fails fast for a second instead of making every
request wait for its own connect timeout. Pub/sub and the admin plane stay on redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

Arg = bytes | str | int | float
RETRY_CONNECT_AFTER = 1.0  # seconds of failing fast after a connect failed
HOLD_WRITES = 0.002  # seconds a write nobody waits for may wait for company


class RedisError(Exception):
    """Redis answered with an error, or could not be reached in time."""


class Script:
    """A Lua script, run by its SHA1 (loaded once per connection, in the same write as its first use)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


Rerun = tuple[Script, tuple[Arg, ...]] | None  # a script call, sent again with EVAL on NOSCRIPT


class _Connection(asyncio.Protocol):
    """One connection: replies are matched to waiting commands in the order they were sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        # (waiter, when sent, the script call to run with EVAL should the server answer NOSCRIPT)
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float, Rerun]] = collections.deque()
        self.outgoing: list[bytes] = []
        self.flush_scheduled = False
        self.flush_timer: asyncio.TimerHandle | None = None  # a write held back (send(later=True)) goes out by then
        self.watchdog: asyncio.TimerHandle | None = None
        self.scripts: set[str] = set()  # SHA1s loaded on this connection
        self.lost: str | None = None
        self.backlog: list[tuple[bytes, asyncio.Future[Any], Rerun]] = []  # submitted while it connects

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(f"Redis sent an invalid reply ({exc})")
                return
            if reply is False:
                return
            if not waiting:  # a reply nobody asked for: the stream is out of step
                self.abort("Redis sent a reply nobody asked for")
                return
            waiter, _, rerun = waiting.popleft()
            if waiter.done():
                continue  # its caller gave up (cancelled)
            if isinstance(reply, hiredis.ReplyError):
                if str(reply).startswith("NOSCRIPT"):  # flushed behind our back (SCRIPT FLUSH)
                    self.scripts.clear()  # loaded again on next use; this call runs with EVAL
                    if rerun is not None:
                        script, command = rerun
                        self.send(hiredis.pack_command(("EVAL", script.source, *command[2:])), waiter)
                        continue
                _fail(waiter, str(reply))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"Redis closed the connection ({type(exc).__name__})" if exc else "Redis closed the connection")

    def send(self, command: bytes, waiter: asyncio.Future[Any] | None = None,
             rerun: Rerun = None, later: bool = False) -> asyncio.Future[Any]:
        """Queue `command` for this loop turn's write; `waiter` (or a new future) gets its reply.
        `later`: a write nobody waits for, held back until the next command that is waited on (or
        HOLD_WRITES seconds): at low load it shares that command's write, and its reply that
        command's read, instead of waking the loop on its own."""
        if waiter is None:
            waiter = self.loop.create_future()
        if self.lost is not None:
            return _fail(waiter, self.lost)
        self.outgoing.append(command)
        self.waiting.append((waiter, time.monotonic(), rerun))
        if later:
            if self.flush_timer is None and not self.flush_scheduled:
                self.flush_timer = self.loop.call_later(HOLD_WRITES, self.flush)
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)
        if self.watchdog is None:
            self.watchdog = self.loop.call_later(self.timeout, self.watch)
        return waiter

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        if self.outgoing and self.transport is not None and self.lost is None:
            data = self.outgoing[0] if len(self.outgoing) == 1 else b"".join(self.outgoing)
            self.outgoing.clear()
            self.transport.write(data)

    def watch(self) -> None:
        """One timer per connection instead of one per command: the oldest reply is overdue?"""
        self.watchdog = None
        if not self.waiting or self.lost is not None:
            return
        late = time.monotonic() - self.waiting[0][1]
        if late >= self.timeout:
            self.abort(f"Redis did not answer within {self.timeout:g} s")
        else:
            self.watchdog = self.loop.call_later(self.timeout - late, self.watch)

    def abort(self, reason: str) -> None:
        self.fail(reason)
        if self.transport is not None:
            self.transport.abort()

    def fail(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
        self.outgoing.clear()
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        while self.waiting:
            _fail(self.waiting.popleft()[0], reason)


class RedisClient:
    """Commands on one auto-pipelined connection, opened on first use (and again after a loss)."""

    def __init__(self, url: str, *, timeout: float = 0.5) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"a Redis URL starts with redis://, rediss:// or unix://, got {parts.scheme!r}")
        query = parse_qs(parts.query)
        self.socket_path = parts.path if parts.scheme == "unix" else None
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.tls = parts.scheme == "rediss"
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else (query.get("password") or [None])[0]
        # the path selects the database (redis://host/2); ?db=2 as well, as redis-py reads it
        db = (parts.path.strip("/") if self.socket_path is None else "") or (query.get("db") or [""])[0]
        if db and not db.isdigit():
            raise ValueError(f"a Redis URL's database is a number, got {db!r}")
        self.db = int(db) if db else 0
        self.where = self.socket_path or f"{self.host}:{self.port}"
        self.timeout = timeout
        self._connection: _Connection | None = None
        self._opening: _Connection | None = None  # being connected: what is submitted meanwhile waits in it
        self._connecting: asyncio.Task[None] | None = None
        self._down_until = 0.0
        self._down_reason = ""

    async def execute(self, *args: Arg) -> Any:
        """Run one command and return its reply."""
        return await self.submit(*args)

    async def run_script(self, script: Script, keys: list[str], args: list[Arg]) -> Any:
        return await self.submit_script(script, keys, args)

    def submit(self, *args: Arg, later: bool = False) -> asyncio.Future[Any]:
        """Send one command with this loop turn's others; the future gets its reply (or RedisError).
        `later`: a write nobody waits for, sent with the next command that is waited on (see
        _Connection.send)."""
        return self._submit(args, None, later)

    def _submit(self, args: tuple[Arg, ...], rerun: Rerun, later: bool = False) -> asyncio.Future[Any]:
        connection = self._connection
        if connection is not None and connection.lost is None and connection.loop is asyncio.get_running_loop():
            return connection.send(hiredis.pack_command(args), None, rerun, later)
        return self._send_connected(hiredis.pack_command(args), rerun)

    def submit_script(self, script: Script, keys: list[str], args: list[Arg], *,
                      later: bool = False) -> asyncio.Future[Any]:
        """EVALSHA `script`, loading it first (in the same write) on a connection that lacks it.
        Should the server have dropped its scripts meanwhile (SCRIPT FLUSH), it runs once more."""
        connection = self._connection
        if connection is None or connection.lost is not None or connection.loop is not asyncio.get_running_loop():
            connection = self._connect()  # the one its commands will go out on (None: failing fast)
        if connection is not None and script.sha not in connection.scripts:
            connection.scripts.add(script.sha)
            self.submit("SCRIPT", "LOAD", script.source, later=later).add_done_callback(_consume)
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        return self._submit(command, (script, command), later)  # one future: a NOSCRIPT rerun answers it too

    def _send_connected(self, command: bytes, rerun: Rerun = None) -> asyncio.Future[Any]:
        """No usable connection: the command waits in the backlog of the one being opened, which sends
        it (in order, in one write) before anything submitted once it is up can overtake it."""
        connection = self._connect()
        if connection is None:
            return _fail(asyncio.get_running_loop().create_future(), self._down_reason)
        waiter = connection.loop.create_future()
        connection.backlog.append((command, waiter, rerun))
        return waiter

    def _connect(self) -> _Connection | None:
        """The connection being opened on this loop, opening one if need be (None: failing fast)."""
        loop = asyncio.get_running_loop()
        opening = self._opening
        if opening is None or opening.loop is not loop:
            if time.monotonic() < self._down_until:
                return None
            opening = self._opening = _Connection(loop, self.timeout)
            self._connecting = loop.create_task(self._open(opening))
        return opening

    async def _open(self, connection: _Connection) -> None:
        """Connect, send AUTH and SELECT, then the backlog; or fail the backlog."""
        loop = connection.loop
        try:
            async with asyncio.timeout(self.timeout):
                if self.socket_path is not None:
                    await loop.create_unix_connection(lambda: connection, self.socket_path)
                else:
                    await loop.create_connection(lambda: connection, self.host, self.port,
                                                 ssl=ssl.create_default_context() if self.tls else None)
                setup = []
                if self.password is not None:
                    auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                    setup.append(connection.send(hiredis.pack_command(auth)))
                if self.db:
                    setup.append(connection.send(hiredis.pack_command(("SELECT", self.db))))
                for waiter in setup:
                    await waiter
        except BaseException as exc:
            if self._opening is connection:
                self._opening = None
            if isinstance(exc, TimeoutError):
                reason = f"no connection to Redis at {self.where} within {self.timeout:g} s"
            elif isinstance(exc, OSError):
                reason = f"cannot connect to Redis at {self.where}: {exc.strerror or type(exc).__name__}"
            elif isinstance(exc, RedisError):  # AUTH or SELECT refused: say which, never the password
                reason = f"Redis at {self.where} refused the connection setup: {exc}"
            else:  # cancelled (its loop is ending: the cancellation goes on), or unforeseen
                reason = f"no connection to Redis at {self.where} ({type(exc).__name__})"
            connection.abort(reason)
            for _, waiter, _ in connection.backlog:  # nothing waits for ever on a connection that never came
                _fail(waiter, reason)
            if not isinstance(exc, Exception):
                raise
            self._down_until = time.monotonic() + RETRY_CONNECT_AFTER
            self._down_reason = reason
            return
        if self._opening is connection:
            self._opening = None
        self._connection = connection
        backlog, connection.backlog = connection.backlog, []
        for command, waiter, rerun in backlog:
            connection.send(command, waiter, rerun)

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.abort("the client was closed")
            self._connection = None


def _fail(waiter: asyncio.Future[Any], reason: str) -> asyncio.Future[Any]:
    """Fail a command's future, marked as looked at: a write nobody waits for (its future dropped)
    fails quietly instead of the loop logging "Future exception was never retrieved"."""
    if not waiter.done():
        waiter.set_exception(RedisError(reason))
        waiter.exception()
    return waiter


def _consume(future: asyncio.Future[Any]) -> None:
    """A reply nobody reads (SCRIPT LOAD): a failure shows in the command that follows it."""
    if not future.cancelled():
        future.exception()


class RedisClients:
    """One RedisClient per URL: stages that point at the same Redis share its connection, so
    their commands for one request (and for every request in flight) share writes."""

    def __init__(self) -> None:
        self._clients: dict[str, RedisClient] = {}

    def get(self, url: str) -> RedisClient:
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = RedisClient(url)
        return client

    def sizes(self) -> dict[str, int]:
        awaiting = sum(len(c._connection.waiting) for c in self._clients.values() if c._connection is not None)
        return {"clients": len(self._clients), "awaiting_replies": awaiting}

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
