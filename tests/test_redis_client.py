"""proxy/state/redis.py against the real Redis and against RESP servers the tests write by hand.

The real Redis (this worker's database, see conftest) answers round trips, error replies, batching,
database selection and scripts; small fake servers on loopback (or a unix socket) do what a real
one will not on demand: never answer, hang up, send garbage, refuse AUTH. Each test runs on
asyncio's loop and on uvloop (the gateway's), and fails if any future or task of the loop ends
with an exception nobody retrieved ("... exception was never retrieved").
"""

from __future__ import annotations

import asyncio
import gc
import time
import traceback
import uuid
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
import uvloop

from plugins.cache.store import NAMESPACE, Entry, RedisStore
from plugins.limits.counters import KEY_PREFIX, Charge, Decision, RedisCounters, reserve
from proxy.state import redis as redis_module
from proxy.state.redis import RedisClient, RedisClients, RedisError, Script
from tests.conftest import REDIS_DB, REDIS_URL
from tests.mock_server import free_port

DEADLINE = 10.0  # seconds a test may run: a hang fails it instead of blocking the run
STALL = 0.2  # the client timeout of tests that wait for it to expire
Run = Callable[[Coroutine[Any, Any, Any]], Any]
LOOPS = {"asyncio": None, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a test's coroutine on a fresh loop of the kind the parameter names, then fails the test if
    the loop reported an error (a failed future or task collected without anyone looking at it)."""

    def run(main: Coroutine[Any, Any, Any]) -> Any:
        reported: list[dict[str, Any]] = []
        gc.freeze()  # what exists already is left out of the collection below, which is then quick
        try:
            with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
                runner.get_loop().set_exception_handler(lambda loop, context: reported.append(context))
                result = runner.run(asyncio.wait_for(main, DEADLINE))
            gc.collect()  # a future that failed unobserved says so (to its loop) when it is collected
        finally:
            gc.unfreeze()
        assert not reported, [context.get("message") for context in reported]
        return result

    return run


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique key prefix in this worker's database; its keys (plain, counters, cache) are deleted afterwards."""
    unique = f"t{uuid.uuid4().hex[:12]}"
    yield unique
    client = redis.Redis.from_url(REDIS_URL)
    for pattern in (f"{unique}*", f"{KEY_PREFIX}{unique}*", f"{NAMESPACE}{unique}*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    client.close()


class Recorder:
    """A connection's transport, keeping a copy of every write."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write of every client connection opened during the test, in order."""
    recorded: list[bytes] = []
    made = redis_module._Connection.connection_made

    def connection_made(self: Any, transport: Any) -> None:
        made(self, Recorder(transport, recorded))

    monkeypatch.setattr(redis_module._Connection, "connection_made", connection_made)
    return recorded


def commands_in(data: bytes) -> list[list[bytes]]:
    """The commands in one write (a command is a RESP array of bulk strings)."""
    reader = hiredis.Reader()
    reader.feed(data)
    commands = []
    while (command := reader.gets()) is not False:
        commands.append(command)
    return commands


def names(data: bytes) -> list[bytes]:
    """The command names (with SCRIPT's subcommand) in one write."""
    return [b" ".join(c[:2]) if c[0] == b"SCRIPT" else c[0] for c in commands_in(data)]


def count_connects(loop: asyncio.AbstractEventLoop) -> list[Any]:
    """Counts the loop's outgoing connection attempts: one entry per create_connection call."""
    attempts: list[Any] = []
    original = loop.create_connection

    def create_connection(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args[1:3])
        return original(*args, **kwargs)

    loop.create_connection = create_connection  # type: ignore[method-assign]
    return attempts


# -- the fake server --------------------------------------------------------------------------------


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


class Peer:
    """The server's end of one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.commands: list[list[bytes]] = []  # read on this connection, in order
        self.closed = asyncio.Event()  # the client closed its end (or the server did)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


Handler = Callable[[Peer, list[bytes]], Awaitable[None]]


async def answer(peer: Peer, command: list[bytes]) -> None:
    """What a healthy Redis says to the few commands the fake servers see."""
    name = command[0].upper()
    if name == b"PING":
        peer.send(b"+PONG\r\n")
    elif name in (b"AUTH", b"SELECT"):
        peer.send(b"+OK\r\n")
    elif name == b"ECHO":
        peer.send(bulk(command[1]))
    else:
        peer.send(b"-ERR unknown command '%s'\r\n" % command[0])


class FakeRedis:
    """A RESP server on loopback (or on a unix socket): reads commands with hiredis and hands each to
    `handler`, which writes the answer by hand (or doesn't)."""

    def __init__(self, handler: Handler = answer, *, port: int = 0, path: Path | None = None) -> None:
        self.handler = handler
        self.port = port
        self.path = path
        self.peers: list[Peer] = []  # every connection accepted, in order
        self.arrived = asyncio.Condition()

    @property
    def accepted(self) -> int:
        return len(self.peers)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def commands(self) -> list[list[bytes]]:
        return [command for peer in self.peers for command in peer.commands]

    async def read(self, count: int) -> None:
        """Until the server has read `count` commands in all."""
        async with self.arrived:
            await self.arrived.wait_for(lambda: len(self.commands) >= count)

    async def __aenter__(self) -> FakeRedis:
        if self.path is not None:
            self.server = await asyncio.start_unix_server(self._serve, str(self.path))
        else:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for peer in self.peers:
            peer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        self.peers.append(peer)
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    peer.commands.append(command)
                    async with self.arrived:
                        self.arrived.notify_all()
                    await self.handler(peer, command)
        except ConnectionError:
            pass
        finally:
            peer.closed.set()
            writer.close()


# -- against the real Redis -------------------------------------------------------------------------


def test_round_trips(run: Run, prefix: str) -> None:
    async def main() -> None:
        client = RedisClient(REDIS_URL)
        binary = bytes(range(256)) + b"\r\n$-1\r\n"  # every byte value, and what looks like RESP
        assert await client.execute("SET", f"{prefix}:b", binary) == b"OK"
        assert await client.execute("GET", f"{prefix}:b") == binary
        assert await client.execute("SET", f"{prefix}:s", "naïve €") == b"OK"
        assert (await client.submit("GET", f"{prefix}:s")).decode() == "naïve €"
        assert await client.execute("INCRBY", f"{prefix}:n", 41) == 41
        assert await client.submit("INCR", f"{prefix}:n") == 42
        assert await client.execute("INCRBYFLOAT", f"{prefix}:f", 1.5) == b"1.5"
        assert await client.execute("GET", f"{prefix}:missing") is None
        assert await client.execute("RPUSH", f"{prefix}:l", b"a", "b", 3) == 3
        assert await client.execute("LRANGE", f"{prefix}:l", 0, -1) == [b"a", b"b", b"3"]
        assert await client.execute("LRANGE", f"{prefix}:missing", 0, -1) == []
        assert await client.execute("EVAL", "return {1, 'two', {3, false}}", 0) == [1, b"two", [3, None]]
        await client.close()

    run(main())


def test_error_reply_raises_with_redis_message_and_the_connection_goes_on(run: Run, prefix: str) -> None:
    async def main() -> None:
        client = RedisClient(REDIS_URL)
        connection_id = await client.execute("CLIENT", "ID")
        await client.execute("SET", f"{prefix}:k", "not a number")
        with pytest.raises(RedisError, match="^ERR value is not an integer or out of range$"):
            await client.execute("INCR", f"{prefix}:k")
        with pytest.raises(RedisError, match="^ERR unknown command 'NOSUCHCOMMAND'"):
            await client.execute("NOSUCHCOMMAND", "x")
        # in a batch, only the command Redis refused fails
        batch = [client.submit("GET", f"{prefix}:k"), client.submit("INCR", f"{prefix}:k"),
                 client.submit("ECHO", "after")]
        outcomes = await asyncio.gather(*batch, return_exceptions=True)
        assert outcomes[0] == b"not a number" and outcomes[2] == b"after"
        assert isinstance(outcomes[1], RedisError) and "not an integer" in str(outcomes[1])
        assert await client.execute("CLIENT", "ID") == connection_id  # still the same connection
        await client.close()

    run(main())


def test_commands_of_one_loop_turn_go_out_in_one_write(run: Run, prefix: str, writes: list[bytes]) -> None:
    async def main() -> None:
        client = RedisClient(REDIS_URL)
        assert await client.execute("PING") == b"PONG"
        writes.clear()
        futures = []
        for i in range(30):
            futures.append(client.submit("INCR", f"{prefix}:n"))
            futures.append(client.submit("ECHO", f"echo {i}"))
            futures.append(client.submit("GET", f"{prefix}:missing"))
            futures.append(client.submit("LRANGE", f"{prefix}:missing", 0, -1))
        replies = await asyncio.gather(*futures)
        assert len(writes) == 1
        assert len(commands_in(writes[0])) == 120
        for i in range(30):  # each future got its own reply, in order
            assert replies[i * 4:i * 4 + 4] == [i + 1, f"echo {i}".encode(), None, []]

        writes.clear()
        first = [client.submit("ECHO", str(i)) for i in range(3)]
        await asyncio.sleep(0)  # the next loop turn
        second = [client.submit("ECHO", str(i)) for i in range(3, 6)]
        assert await asyncio.gather(*first, *second) == [str(i).encode() for i in range(6)]
        assert [len(commands_in(w)) for w in writes] == [3, 3]
        await client.close()

    run(main())


def test_held_writes_go_out_with_the_next_awaited_command_or_after_a_moment(
        run: Run, prefix: str, writes: list[bytes]) -> None:
    """A write nobody waits for (later=True: a cache store, a limit reconciliation) does not go out
    alone: it rides with the next command someone awaits, ahead of it, so Redis sees it first; with
    none coming, it goes out HOLD_WRITES seconds later on its own."""

    async def main() -> None:
        client = RedisClient(REDIS_URL)
        assert await client.execute("PING") == b"PONG"
        writes.clear()
        held = client.submit("SET", f"{prefix}:k", "v1", later=True)
        script = client.submit_script(Script("return redis.call('INCR', KEYS[1])"), [f"{prefix}:n"], [],
                                      later=True)
        for _ in range(5):
            await asyncio.sleep(0)
        assert writes == [] and not held.done() and not script.done()  # a few loop turns on, still held
        assert await client.execute("GET", f"{prefix}:k") == b"v1"  # the GET went out after the SET
        assert [names(w) for w in writes] == [[b"SET", b"SCRIPT LOAD", b"EVALSHA", b"GET"]]
        assert await held == b"OK" and await script == 1

        writes.clear()
        started = time.monotonic()
        alone = client.submit("SET", f"{prefix}:k", "v2", later=True)
        assert await alone == b"OK"  # nothing else came: it went out by itself
        assert time.monotonic() - started >= redis_module.HOLD_WRITES * 0.9
        assert [names(w) for w in writes] == [[b"SET"]]
        await client.close()

    run(main())


def test_commands_submitted_before_the_connection_is_up_go_out_together_and_first(
        run: Run, prefix: str, writes: list[bytes]) -> None:
    """A fresh client: what is submitted while it connects waits, in order, and goes out in one write
    (after AUTH/SELECT); a command submitted once the connection is up does not overtake it."""

    async def main() -> None:
        client = RedisClient(REDIS_URL)
        stored = client.submit("SET", f"{prefix}:k", "v")
        incremented = [client.submit("INCR", f"{prefix}:n") for _ in range(10)]
        while client._connection is None:  # up, but the commands above may not be sent yet
            await asyncio.sleep(0)
        assert await client.submit("GET", f"{prefix}:k") == b"v"
        assert await client.submit("GET", f"{prefix}:n") == b"10"
        assert await asyncio.gather(stored, *incremented) == [b"OK", *range(1, 11)]
        batches = [names(w) for w in writes if b"SELECT" not in w]
        assert batches[0][:11] == [b"SET", *[b"INCR"] * 10]  # the backlog in one write
        assert sum(batches, []) == [b"SET", *[b"INCR"] * 10, b"GET", b"GET"]
        await client.close()

    run(main())


def test_database_comes_from_the_url(run: Run, prefix: str) -> None:
    db = REDIS_DB or 1  # this worker's database; without xdist that is 0, so another one

    async def main() -> None:
        client = RedisClient(f"redis://127.0.0.1:6379/{db}")
        await client.execute("SET", f"{prefix}:where", "here", "EX", 60)
        await client.close()

    run(main())
    try:
        assert redis.Redis(db=db).get(f"{prefix}:where") == b"here"
        assert redis.Redis(db=0).get(f"{prefix}:where") is None
    finally:
        redis.Redis(db=db).delete(f"{prefix}:where")


def test_scripts_load_with_their_first_use_and_survive_script_flush(run: Run, writes: list[bytes]) -> None:
    # a script Redis has never seen: its EVALSHA fails unless it is loaded first
    script = Script(f"-- {uuid.uuid4().hex}\nreturn {{KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}}")
    admin = redis.Redis.from_url(REDIS_URL)

    def sent() -> list[list[bytes]]:
        batches = [names(w) for w in writes if b"SELECT" not in w]
        writes.clear()
        return batches

    async def main() -> None:
        client = RedisClient(REDIS_URL)
        # a fresh client: the load goes out in the same write as the first EVALSHA
        assert await client.run_script(script, ["k"], ["a", 1]) == [b"k", b"a", 2]
        assert sent() == [[b"SCRIPT LOAD", b"EVALSHA"]]
        assert admin.script_exists(script.sha) == [True]
        assert await client.run_script(script, ["k"], ["b", 2]) == [b"k", b"b", 3]
        assert sent() == [[b"EVALSHA"]]

        admin.script_flush()  # behind the client's back
        assert await client.run_script(script, ["k"], ["c", 3]) == [b"k", b"c", 4]
        assert sent() == [[b"EVALSHA"], [b"EVAL"]]  # NOSCRIPT: run from its source
        assert await client.run_script(script, ["k"], ["d", 4]) == [b"k", b"d", 5]
        assert sent() == [[b"SCRIPT LOAD", b"EVALSHA"]]  # and loaded again with the next use
        assert await client.run_script(script, ["k"], ["e", 5]) == [b"k", b"e", 6]
        assert sent() == [[b"EVALSHA"]]

        # many uses in one loop turn, on a connection that has the script: one write, each its own reply
        futures = [client.submit_script(script, [f"k{i}"], ["x", i]) for i in range(20)]
        assert await asyncio.gather(*futures) == [[f"k{i}".encode(), b"x", i + 1] for i in range(20)]
        assert sent() == [[b"EVALSHA"] * 20]

        admin.script_flush()  # and all of them at once after a flush: each falls back
        futures = [client.submit_script(script, [f"k{i}"], ["y", i]) for i in range(5)]
        assert await asyncio.gather(*futures) == [[f"k{i}".encode(), b"y", i + 1] for i in range(5)]
        await client.close()

    run(main())
    admin.close()


def test_clients_share_one_client_per_url(run: Run, prefix: str, writes: list[bytes]) -> None:
    async def main() -> None:
        clients = RedisClients()
        client = clients.get(REDIS_URL)
        assert clients.get(REDIS_URL) is client
        other = clients.get(f"redis://127.0.0.1:6379/{REDIS_DB + 1}")
        assert other is not client
        # two stages on one URL: their commands of one loop turn share a write
        counters, store = RedisCounters(clients.get(REDIS_URL)), RedisStore(clients.get(REDIS_URL))
        await client.execute("PING")
        writes.clear()
        value, entry = await asyncio.gather(counters.value(f"{prefix}:c"), store.get(f"{prefix}:e"))
        assert (value, entry) == (0.0, None)
        assert [names(w) for w in writes] == [[b"GET", b"GET"]]
        assert await other.execute("PING") == b"PONG"
        await clients.close()

    run(main())


# -- against fake servers ---------------------------------------------------------------------------


def test_server_that_never_answers(run: Run) -> None:
    """The watchdog drops the connection: every command waiting on it fails, the next one reconnects."""

    async def main() -> None:
        async def handler(peer: Peer, command: list[bytes]) -> None:
            if peer is not server.peers[0]:  # the first connection hangs, later ones answer
                await answer(peer, command)

        async with FakeRedis(handler) as server:
            client = RedisClient(server.url, timeout=STALL)
            started = time.monotonic()
            first = client.submit("PING")
            await server.read(1)
            await asyncio.sleep(STALL / 2)  # a second command, half a timeout later
            second = client.submit("ECHO", "x")
            with pytest.raises(RedisError, match=r"Redis did not answer within 0\.2 s"):
                await first
            elapsed = time.monotonic() - started
            assert STALL * 0.9 <= elapsed < 2 * STALL + 0.5
            assert second.done()  # failed with the first, not a timeout later
            with pytest.raises(RedisError, match=r"did not answer within 0\.2 s"):
                await second
            await server.peers[0].closed.wait()  # the client dropped the connection
            assert await client.execute("ECHO", "again") == b"again"
            assert server.accepted == 2
            await client.close()

    run(main())


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_server_that_hangs_up_with_commands_waiting(run: Run, how: str) -> None:
    async def main() -> None:
        async def handler(peer: Peer, command: list[bytes]) -> None:
            if command == [b"ECHO", b"hang up"]:
                if how == "reset":
                    peer.writer.transport.abort()
                else:
                    peer.close()
            else:
                await answer(peer, command)

        async with FakeRedis(handler) as server:
            client = RedisClient(server.url, timeout=5.0)
            assert await client.execute("PING") == b"PONG"
            waiting = [client.submit("ECHO", "hang up"), client.submit("ECHO", "b"), client.submit("PING")]
            for future in waiting:
                with pytest.raises(RedisError, match="Redis closed the connection"):
                    await future
            assert await client.execute("ECHO", "back") == b"back"
            assert server.accepted == 2
            await client.close()

    run(main())


@pytest.mark.parametrize("garbage", [b"?what\r\n", b"$abc\r\n", b"*-5\r\n", b":12x\r\n"],
                         ids=["type-byte", "bad-length", "bad-array-length", "bad-integer"])
def test_server_that_sends_garbage(run: Run, garbage: bytes) -> None:
    async def main() -> None:
        async def handler(peer: Peer, command: list[bytes]) -> None:
            if command[0] == b"ECHO" and peer is server.peers[0]:
                peer.send(garbage)
            else:
                await answer(peer, command)

        async with FakeRedis(handler) as server:
            client = RedisClient(server.url, timeout=5.0)  # a hang would show as the test's deadline
            waiting = [client.submit("ECHO", "a"), client.submit("PING")]
            for future in waiting:
                with pytest.raises(RedisError, match="Redis sent an invalid reply"):
                    await future
            await server.peers[0].closed.wait()
            assert await client.execute("ECHO", "ok") == b"ok"
            assert server.accepted == 2
            await client.close()

    run(main())


def test_server_that_sends_a_reply_nobody_asked_for(run: Run) -> None:
    """The stream is out of step: the connection is dropped, not trusted with the next command."""

    async def main() -> None:
        async def handler(peer: Peer, command: list[bytes]) -> None:
            await answer(peer, command)
            if command == [b"ECHO", b"a"]:
                peer.send(b"+SURPRISE\r\n")

        async with FakeRedis(handler) as server:
            client = RedisClient(server.url, timeout=5.0)
            assert await client.execute("ECHO", "a") == b"a"
            await server.peers[0].closed.wait()  # dropped by the client
            assert await client.execute("ECHO", "b") == b"b"  # not "SURPRISE"
            assert server.accepted == 2
            await client.close()

    run(main())


def test_refused_connection_fails_fast_for_a_second(run: Run) -> None:
    async def main() -> None:
        port = free_port()  # nobody listens there
        attempts = count_connects(asyncio.get_running_loop())
        client = RedisClient(f"redis://127.0.0.1:{port}/2", timeout=5.0)
        waiting = [client.submit("PING"), client.submit("SET", "k", "v"), client.submit("ECHO", "x")]
        for future in waiting:
            with pytest.raises(RedisError, match=f"^cannot connect to Redis at 127.0.0.1:{port}: "):
                await future
        assert len(attempts) == 1  # one attempt for all of them
        async with FakeRedis(port=port) as server:  # Redis is back, but within the second
            with pytest.raises(RedisError, match=f"cannot connect to Redis at 127.0.0.1:{port}"):
                await client.execute("PING")
            with pytest.raises(RedisError, match=f"cannot connect to Redis at 127.0.0.1:{port}"):
                await client.run_script(Script("return 1"), [], [])
            assert len(attempts) == 1 and server.accepted == 0  # failed fast, no new attempt
        await client.close()

    run(main())


def test_refused_connection_is_tried_again_after_the_fail_fast_window(
        run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_module, "RETRY_CONNECT_AFTER", 0.0)

    async def main() -> None:
        port = free_port()
        client = RedisClient(f"redis://127.0.0.1:{port}", timeout=5.0)
        with pytest.raises(RedisError, match=f"cannot connect to Redis at 127.0.0.1:{port}"):
            await client.execute("PING")
        async with FakeRedis(port=port) as server:
            assert await client.execute("PING") == b"PONG"
            assert server.accepted == 1
            await client.close()

    run(main())


@pytest.mark.parametrize(("credentials", "setup"), [
    ("", []),
    (":s3cret@", [[b"AUTH", b"s3cret"]]),
    ("alice:s3cret@", [[b"AUTH", b"alice", b"s3cret"]]),
    ("alice:p%40ss%3Aw%2Fd@", [[b"AUTH", b"alice", b"p@ss:w/d"]]),
], ids=["none", "password", "username-password", "escaped"])
@pytest.mark.parametrize("db", [0, 7])
def test_auth_and_select_on_connect(run: Run, credentials: str, setup: list[list[bytes]], db: int) -> None:
    async def main() -> None:
        async with FakeRedis() as server:
            client = RedisClient(f"redis://{credentials}127.0.0.1:{server.port}/{db}")
            assert await asyncio.gather(client.execute("PING"), client.execute("ECHO", "x")) == [b"PONG", b"x"]
            selected = [[b"SELECT", str(db).encode()]] if db else []
            assert server.commands == [*setup, *selected, [b"PING"], [b"ECHO", b"x"]]
            await client.close()
            # and again on the next connection
            assert await client.execute("PING") == b"PONG"
            assert server.accepted == 2
            assert server.peers[1].commands == [*setup, *selected, [b"PING"]]
            await client.close()

    run(main())


def test_password_from_the_query(run: Run) -> None:
    async def main() -> None:
        async with FakeRedis() as server:
            client = RedisClient(f"redis://127.0.0.1:{server.port}/3?password=s3cret")
            assert await client.execute("PING") == b"PONG"
            assert server.commands == [[b"AUTH", b"s3cret"], [b"SELECT", b"3"], [b"PING"]]
            await client.close()

    run(main())


@pytest.mark.parametrize("refused", ["AUTH", "SELECT"])
def test_refused_setup_is_an_error_without_the_password(run: Run, refused: str) -> None:
    async def main() -> None:
        async def handler(peer: Peer, command: list[bytes]) -> None:
            if command[0] == b"AUTH" and refused == "AUTH":
                peer.send(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
            elif command[0] == b"SELECT" and refused == "SELECT":
                peer.send(b"-ERR DB index is out of range\r\n")
            elif command[0] == b"SELECT":
                peer.send(b"-NOAUTH Authentication required.\r\n")  # what Redis says after a failed AUTH
            else:
                await answer(peer, command)

        async with FakeRedis(handler) as server:
            client = RedisClient(f"redis://alice:top-s3cret@127.0.0.1:{server.port}/99")
            waiting = [client.submit("PING"), client.submit_script(Script("return 1"), [], [])]
            for future in waiting:
                with pytest.raises(RedisError) as failed:
                    await future
                message = str(failed.value)
                assert f"Redis at 127.0.0.1:{server.port} refused the connection setup" in message
                assert ("WRONGPASS" if refused == "AUTH" else "DB index is out of range") in message
                assert "top-s3cret" not in "".join(traceback.format_exception(failed.value))
            await server.peers[0].closed.wait()
            assert [c[0] for c in server.commands] == [b"AUTH", b"SELECT"]  # the commands were not sent
            with pytest.raises(RedisError, match="refused the connection setup"):  # failing fast
                await client.execute("PING")
            assert server.accepted == 1

    run(main())


def test_unix_socket_url(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"

    async def main() -> None:
        async with FakeRedis(path=path) as server:
            client = RedisClient(f"unix://{path}?db=5")
            assert await client.execute("ECHO", "over unix") == b"over unix"
            assert server.commands == [[b"SELECT", b"5"], [b"ECHO", b"over unix"]]
            await client.close()
            secret = RedisClient(f"unix://{path}?db=6&password=s3cret")
            assert await secret.execute("PING") == b"PONG"
            assert server.peers[1].commands == [[b"AUTH", b"s3cret"], [b"SELECT", b"6"], [b"PING"]]
            await secret.close()
        with pytest.raises(RedisError, match=f"cannot connect to Redis at {path}"):  # nobody listens now
            await RedisClient(f"unix://{path}").execute("PING")

    run(main())


def test_url_forms() -> None:
    """The URL forms the client understands (and the one it refuses)."""
    client = RedisClient("rediss://u%40x:p%3Aw@redis.example:6380/4")
    assert (client.tls, client.host, client.port, client.db) == (True, "redis.example", 6380, 4)
    assert (client.username, client.password, client.where) == ("u@x", "p:w", "redis.example:6380")
    client = RedisClient("unix:///run/redis.sock?db=2&password=pw")
    assert (client.socket_path, client.db, client.password, client.where) == ("/run/redis.sock", 2, "pw",
                                                                               "/run/redis.sock")
    client = RedisClient("redis://")
    assert (client.host, client.port, client.db, client.password) == ("127.0.0.1", 6379, 0, None)
    assert RedisClient("redis://127.0.0.1:6379?db=3").db == 3  # redis-py's query form
    assert RedisClient("redis://127.0.0.1:6379/5?db=3").db == 5  # the path wins
    with pytest.raises(ValueError, match="redis://, rediss:// or unix://"):
        RedisClient("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="database is a number, got 'x'"):
        RedisClient("redis://127.0.0.1:6379/x")


# -- futures nobody awaits --------------------------------------------------------------------------


def test_commands_nobody_awaits_fail_quietly(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes sent without anyone waiting (a cache store, a limit reconciliation): when the connection
    fails, their futures fail without the loop reporting "exception was never retrieved" (the `run`
    fixture checks that too, after every test)."""
    monkeypatch.setattr(redis_module, "RETRY_CONNECT_AFTER", 0.0)
    script = Script("return 1")

    def fire_and_forget(client: RedisClient) -> None:
        client.submit("SET", "k", "v")
        client.submit_script(script, ["k"], [1])
        RedisCounters(client).add([Charge("k", 1.0, None, 60)])

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda loop, context: reported.append(context))

        async def handler(peer: Peer, command: list[bytes]) -> None:
            if command[0] != b"PING":
                peer.close()  # hang up on anything else
            else:
                await answer(peer, command)

        async with FakeRedis(handler) as server:
            client = RedisClient(server.url, timeout=STALL)
            fire_and_forget(client)  # while connecting
            with pytest.raises(RedisError):
                await client.execute("ECHO", "the last")
            assert await client.execute("PING") == b"PONG"
            fire_and_forget(client)  # on an open connection
            with pytest.raises(RedisError):
                await client.execute("ECHO", "the last")
            await client.close()

        refused = RedisClient(f"redis://127.0.0.1:{free_port()}", timeout=STALL)
        fire_and_forget(refused)
        with pytest.raises(RedisError):
            await refused.execute("PING")

        async def silent(peer: Peer, command: list[bytes]) -> None:
            pass

        async with FakeRedis(silent) as server:  # no answer to AUTH, then none at all
            hanging = RedisClient(f"redis://:pw@127.0.0.1:{server.port}/1", timeout=STALL)
            fire_and_forget(hanging)
            with pytest.raises(RedisError, match=f"127.0.0.1:{server.port}"):
                await hanging.execute("PING")

        gc.collect()
        assert not reported, [context.get("message") for context in reported]

    run(main())


# -- event loops one after the other ----------------------------------------------------------------


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_connection_made_on_a_closed_loop_is_not_reused(loop: str) -> None:
    client = RedisClient(REDIS_URL)

    async def connection_id() -> int:
        return await client.execute("CLIENT", "ID")

    async def submit_and_leave() -> None:
        client.submit("PING")  # the loop ends while the client is still connecting

    # each loop but the last ends with the client's connection open, on purpose: the loop (uvloop as it
    # closes) or the garbage collector (asyncio) warns about that transport
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(submit_and_leave())
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            first = runner.run(connection_id())
            assert runner.run(connection_id()) == first
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            second = runner.run(connection_id())
            assert second != first
            runner.run(client.close())
        gc.collect()


# -- the request-path users -------------------------------------------------------------------------


def test_redis_counters(run: Run, prefix: str) -> None:
    async def main() -> None:
        client = RedisClient(REDIS_URL)
        counters = RedisCounters(client)
        a, b = f"{prefix}:a", f"{prefix}:b"
        assert await reserve(counters, [Charge(a, 2, 5, 60), Charge(b, 1, None, 0)]) == Decision(True, [2.0, 1.0])
        assert await reserve(counters, [Charge(a, 4, 5, 60), Charge(b, 1, None, 0)]) == \
            Decision(False, [2.0, 1.0], 0)
        added = counters.add([Charge(a, -1.5, None, 60), Charge(b, 2.25, None, 0)])  # not awaited yet
        # submitted after the add: sees it (0.5 + 3 <= 5)
        assert await reserve(counters, [Charge(a, 3, 5, 60)]) == Decision(True, [3.5])
        await added
        assert await counters.value(a) == 3.5 and await counters.value(b) == 3.25
        assert await counters.value(f"{prefix}:none") == 0.0
        assert await counters.claim(f"{prefix}:alert", 60) is True
        assert await counters.claim(f"{prefix}:alert", 60) is False

        # a fresh client: an add nobody awaits yet, then a read submitted after it
        fresh = RedisCounters(RedisClient(REDIS_URL))
        pending = fresh.add([Charge(b, 1, None, 0)])
        assert await fresh.value(b) == 4.25
        await pending
        await fresh._redis.close()
        await client.close()

    run(main())
    admin = redis.Redis.from_url(REDIS_URL)
    assert 0 < admin.ttl(f"{KEY_PREFIX}{prefix}:a") <= 60
    assert admin.ttl(f"{KEY_PREFIX}{prefix}:b") == -1  # ttl 0: never expires
    admin.close()


def entry(body: bytes, ttl: float = 60.0) -> Entry:
    now = time.time()
    return Entry(kind="whole", body=body, client_format="openai", endpoint="chat/completions", model="m",
                 served_by="p/m", customer=None, created=now, expires=now + ttl, prompt_tokens=3,
                 completion_tokens=4)


def test_redis_store(run: Run, prefix: str, writes: list[bytes]) -> None:
    async def main() -> None:
        client = RedisClient(REDIS_URL)
        store = RedisStore(client)
        first = entry(b'{"answer": 1}')
        stored = store.set(f"{prefix}:a", first)  # not awaited yet
        assert await store.get(f"{prefix}:a") == first  # submitted after the set: sees it
        await stored
        assert await store.get(f"{prefix}:missing") is None
        await store.set(f"{prefix}:old", entry(b"old", ttl=-1))  # expired: never a hit
        assert await store.get(f"{prefix}:old") is None
        await client.execute("SET", f"{NAMESPACE}{prefix}:junk", b"\xc1 not msgpack")
        assert await store.get(f"{prefix}:junk") is None  # another version's entry: a miss
        assert await store.delete(f"{prefix}:a") is True
        assert await store.delete(f"{prefix}:a") is False
        assert await store.get(f"{prefix}:a") is None
        await client.execute("DEL", f"{NAMESPACE}{prefix}:junk")

        # more keys than one SCAN page holds
        count = 1200
        await asyncio.gather(*(store.set(f"{prefix}:{i}", entry(b"x")) for i in range(count)))
        writes.clear()
        found = [key async for key in store.ids() if key.startswith(prefix)]
        assert sorted(set(found)) == sorted(f"{prefix}:{i}" for i in range(count))
        assert sum(b"SCAN" in w for w in writes) >= 2  # paged
        await client.close()

    run(main())
    pttl = redis.Redis.from_url(REDIS_URL).pttl(f"{NAMESPACE}{prefix}:0")
    assert 0 < pttl <= 60_000  # stored with its TTL

