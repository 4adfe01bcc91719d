"""Shared fixtures: a mock provider on loopback and real gateway processes (`llmrelay serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg
import httpx
import pytest
import yaml
from openai import OpenAI

from proxy.call import Call, Target
from proxy.keys import hash_key
from proxy.params import EMPTY
from proxy.providers.azure import AzureOpenAI
from proxy.settings import Provider, Timeouts
from proxy.upstream import UpstreamClient
from tests.mock_upstream import MockUpstream, free_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-gateway-key"
TEST_KEY = "sk-test-env-key"
EXPIRED_KEY = "sk-test-expired-key"
UPSTREAM_KEY = "sk-upstream-secret-1234567890"
ADMIN_KEY = "sk-test-admin-key"  # an admin key: configure ADMIN_KEYS, call the admin API with admin_request
# each pytest-xdist worker gets its own Redis database (gw0 -> 1, gw1 -> 2, ...; no xdist: 0), so tests
# running at once never see each other's counters, cache entries or cooldowns (channels are per database)
REDIS_DB = int(os.environ.get("PYTEST_XDIST_WORKER", "gw-1").removeprefix("gw")) + 1
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"  # the machine's PostgreSQL (trust auth)
# two OpenAI function tools, for the adapters' tool-call translation tests
WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}}}},
]


class GatewayProcess:
    """`llmrelay serve` as a child process, with its config, log database and spool in tmp_path."""

    # how the CLI is started (a test module may run it through a wrapper, e.g. tests/test_reload.py)
    command: tuple[str, ...] = (sys.executable, "-m", "proxy.cli")

    def __init__(self, config: dict[str, Any] | None, workdir: Path, env: dict[str, str] | None = None,
                 workers: int = 1) -> None:
        """`config` None: no --config at all (the embedded defaults)."""
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_path = workdir / "llmrelay.yaml"
        if config is not None:
            self.config_path.write_text(yaml.safe_dump(config))
        self.has_config = config is not None
        self.scheme = "https" if ((config or {}).get("server") or {}).get("tls_cert") else "http"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = workdir / "gateway.out"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def log_db(self) -> Path:
        return self.workdir / "logs.db"

    def start(self) -> GatewayProcess:
        """Start and wait for the health check. A port picked by free_port() can be taken by another
        test process's server before ours binds it (granian binds with SO_REUSEPORT, so both then
        listen and the kernel splits the connections): if a listener on the port is not ours, start
        again on another port."""
        for _ in range(3):
            self._start_once()
            if _listeners(self.port) <= _socket_inodes(self.proc.pid):  # type: ignore[union-attr]
                return self
            self.stop()
            self.port = free_port()
        raise RuntimeError(f"three ports in a row were also bound by another process:\n{self.output.read_text()}")

    def _start_once(self) -> None:
        with self.output.open("wb") as out:
            config = ["--config", str(self.config_path)] if self.has_config else []
            self.proc = subprocess.Popen(
                [*self.command, "serve", *config, "--port", str(self.port),
                 "--workers", str(self.workers)],
                cwd=self.workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.output.read_text()}")
            try:
                if httpx.get(f"{self.url}/api/health-check/", timeout=0.5, verify=False).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        self.stop()  # never left running after a failed start: nobody else would stop it
        raise RuntimeError(f"gateway did not come up:\n{self.output.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def records(self, timeout: float = 5.0, count: int = 1, where: str = "", args: tuple = ()) -> list[dict[str, Any]]:
        """Log rows from the SQLite sink, waiting until at least `count` are there."""
        from proxy.logs.sinks.sqlite import read_records

        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            if self.log_db.exists():
                try:
                    rows = read_records(str(self.log_db), where, args)
                except Exception:
                    rows = []
                if len(rows) >= count:
                    return rows
            time.sleep(0.05)
        return rows

    def record(self, log_id: str, timeout: float = 5.0) -> dict[str, Any]:
        rows = self.records(timeout, 1, "unique_id = ?", (log_id,))
        assert rows, f"no log record {log_id} in {self.log_db}"
        return rows[0]


def _listeners(port: int) -> set[int]:
    """Socket inodes listening on TCP `port` (any address, IPv4 and IPv6), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets open in process `pid` and its descendants."""
    inodes: set[int] = set()
    pids = [pid]
    while pids:
        current = pids.pop()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{current}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{current}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
            for tid in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{current}/task/{tid}/children") as f:
                    pids += [int(child) for child in f.read().split()]
    return inodes


ADMIN_KEYS = [{"name": "ops", "key_hash": hash_key(ADMIN_KEY)}]


def admin_request(gw: GatewayProcess, method: str, path: str, body: Any = None, key: str | None = ADMIN_KEY,
                  **params: Any) -> httpx.Response:
    """A call to the admin API (key None: no Authorization header at all)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{gw.url}{path}", json=body, params=params or None, headers=headers, timeout=10)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Poll `predicate` every 50 ms until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def metric(url: str, sample: str, **labels: str) -> float:
    """Sum of a gateway's /metrics samples named `sample` whose labels include `labels` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@contextlib.asynccontextmanager
async def app_lifespan(app: Any) -> AsyncIterator[None]:
    """Run an ASGI app's lifespan around the block, for tests that drive the app in process (its
    shutdown flushes the log queue)."""
    startup: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    lifespan = asyncio.ensure_future(app({"type": "lifespan"}, startup.get, events.put))
    assert (await events.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await startup.put({"type": "lifespan.shutdown"})
        assert (await events.get())["type"] == "lifespan.shutdown.complete"
        await lifespan


def base_config(mock: MockUpstream, workdir: Path, extra_providers: Iterable[dict[str, Any]] = (),
                extra_models: Iterable[dict[str, Any]] = (), **overrides: Any) -> dict[str, Any]:
    """The standard test config; `overrides` replace top-level keys, then the `extra_*` entries are appended."""
    config: dict[str, Any] = {
        "providers": [
            {"id": "mock", "protocol": "openai", "base_url": mock.base_url, "api_key": UPSTREAM_KEY},
            {"id": "openai", "base_url": mock.base_url, "api_key": UPSTREAM_KEY},  # catalog id, pointed at the mock
            {"id": "refused", "protocol": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "api_key": "x"},
            {"id": "demo", "protocol": "demo"},
        ],
        "models": [
            {"name": "gpt-test", "provider": "mock", "model": "mock-ok",
             "prices": {"input": 1.0, "output": 2.0, "cached_input": 0.5}, "aliases": ["gpt-test-alias"]},
            {"name": "down-model", "provider": "refused", "model": "anything"},
        ],
        "keys": [
            {"name": "tests", "key_hash": hash_key(KEY), "environment": "production"},
            {"name": "tests-env", "key_hash": hash_key(TEST_KEY), "environment": "test"},
            {"name": "expired", "key_hash": hash_key(EXPIRED_KEY), "expires_at": "2020-01-01T00:00:00Z"},
        ],
        "pipeline": ["auth"],
        "server": {"max_body_bytes": 64 * 1024},
        "logs": {"spool_dir": str(workdir / "spool"), "flush_interval": 0.05,
                 "sinks": [{"type": "sqlite", "path": str(workdir / "logs.db")},
                           {"type": "jsonl", "path": str(workdir / "logs.jsonl")}]},
        "auto_providers": False,
        # the mock upstreams listen on loopback, which the egress policy refuses for request-supplied
        # base URLs unless the operator allows it (tests/test_egress.py sets its own)
        "egress": {"allow": ["127.0.0.0/8"]},
    }
    config.update(overrides)
    config["providers"] = [*config["providers"], *extra_providers]
    config["models"] = [*config["models"], *extra_models]
    return config


class Server(Protocol):
    """What the mock servers share: start() (returning the server), stop() and reset()."""

    def start(self) -> Any: ...
    def stop(self) -> Any: ...
    def reset(self) -> Any: ...


S = TypeVar("S", bound=Server)


def serving(server: S) -> Iterator[S]:
    """For a fixture: `yield from serving(MockX())` starts the server, yields it, stops it afterwards."""
    started = server.start()
    yield started
    started.stop()


def server_fixtures(factory: Callable[[], Server], name: str, fresh_name: str) -> tuple[Any, Any]:
    """Two fixtures for a mock server: `name`, one running server per module, and `fresh_name`, the same
    server reset for each test. Use as `server, fresh = server_fixtures(MockX, "server", "fresh")`."""

    @pytest.fixture(scope="module", name=name)
    def module_server() -> Iterator[Server]:
        yield from serving(factory())

    @pytest.fixture(name=fresh_name)
    def reset_server(request: pytest.FixtureRequest) -> Server:
        server = request.getfixturevalue(name)
        server.reset()
        return server

    return module_server, reset_server


def module_gateway(tmp_path_factory: pytest.TempPathFactory, name: str, mock: MockUpstream | None = None, *,
                   config: Callable[[Path], dict[str, Any]] | None = None, env: dict[str, str] | None = None,
                   **overrides: Any) -> Iterator[GatewayProcess]:
    """For a module-scoped fixture: `yield from module_gateway(...)` runs one gateway in a fresh
    tmp directory `name`, on config(workdir), or else on base_config(mock, workdir, **overrides)."""
    workdir = tmp_path_factory.mktemp(name)
    cfg = config(workdir) if config is not None else base_config(mock, workdir, **overrides)  # type: ignore[arg-type]
    process = GatewayProcess(cfg, workdir, env=env).start()
    yield process
    process.stop()


def openai_client(gateway: GatewayProcess, prefix: str = "/api") -> OpenAI:
    """The official SDK on the gateway, with the test key and no retries."""
    return OpenAI(base_url=gateway.url + prefix, api_key=KEY, max_retries=0)


def azure_url(endpoint: str, base_url: str, api_version: str | None) -> str:
    """The URL the Azure adapter builds for a call to `endpoint` (e.g. "embeddings") on deployment "dep"."""
    config = Provider(id="azure", protocol="azure", base_url=base_url, api_key="k", api_version=api_version)
    az = AzureOpenAI(config, Timeouts(), UpstreamClient())
    call = Call(endpoint=endpoint, path=f"/api/{endpoint}", body={"model": "m", "input": "a"}, params=EMPTY,
                headers={})
    return az.url(call, Target(provider="azure", protocol="azure", model="dep", base_url=base_url))


def add_tool_call_deltas(calls: dict[int, dict[str, Any]], deltas: Iterable[Any] | None) -> None:
    """Accumulate streamed tool-call deltas into `calls` by index, as the SDK's users do."""
    for delta in deltas or ():
        slot = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
        if delta.id:
            slot["id"] = delta.id
        if delta.function and delta.function.name:
            slot["name"] += delta.function.name
        if delta.function and delta.function.arguments:
            slot["arguments"] += delta.function.arguments


# tests/run spreads whole files over two processes (pytest-xdist --dist loadfile), handing each process
# the next file when it is almost done. By default xdist hands out the files with the most tests first,
# which left these, few tests that take long (gateways reloaded, restarted, cut off from their backends,
# several replicas), for the end: one of them running on one process while the other had nothing left
# decided the wall clock. tests/run's --no-loadscope-reorder keeps the order this hook makes: these
# first, roughly longest first, then the rest as xdist ordered them (most tests first). Only the order
# changes: every file still runs whole, in one process.
SLOW_FILES = (
    "tests/test_reload.py",
    "tests/test_http_sink.py",
    "tests/faults/test_backend_faults.py",
    "tests/test_metrics.py",
    "tests/test_replicas.py",
    "tests/test_logging.py",
    "tests/test_ready.py",
    "tests/faults/test_stream_faults.py",
    "tests/test_cooldowns.py",
    "tests/faults/test_connection_faults.py",
    "tests/test_shutdown.py",
    "tests/faults/test_status_faults.py",
    "tests/faults/test_flapping.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def file_of(item: pytest.Item) -> str:
        return item.nodeid.split("::", 1)[0]

    counts: dict[str, int] = {}
    for item in items:
        counts[file_of(item)] = counts.get(file_of(item), 0) + 1

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = file_of(item)
        return (SLOW_FILES.index(name), 0) if name in SLOW_FILES else (len(SLOW_FILES), -counts[name])

    items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[MockUpstream]:
    yield from serving(MockUpstream())


@pytest.fixture
def mock(mock_upstream: MockUpstream) -> MockUpstream:
    mock_upstream.reset()
    return mock_upstream


@pytest.fixture(scope="module")
def gateway(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway per test module on the standard test config."""
    yield from module_gateway(tmp_path_factory, "gateway", mock_upstream)


@pytest.fixture
def start_gateway(mock_upstream: MockUpstream, tmp_path: Path) -> Iterator[Any]:
    """Start a gateway with a custom config: start_gateway(config=None, env=None, workers=1, **overrides)."""
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any] | None = None, env: dict[str, str] | None = None, workers: int = 1,
              **overrides: Any) -> GatewayProcess:
        workdir = tmp_path / f"gw{len(started)}"
        workdir.mkdir()
        cfg = config if config is not None else base_config(mock_upstream, workdir, **overrides)
        process = GatewayProcess(cfg, workdir, env, workers).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def pg_store() -> Iterator[str]:
    """A fresh PostgreSQL database for one test's admin store."""
    name = f"llmrelay_admin_{uuid.uuid4().hex[:10]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(f"{PG_SERVER}/test")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    yield f"{PG_SERVER}/{name}"
    asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
