"""Shared fixtures: a mock provider on loopback and real gateway processes (`llmrelay serve`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.keys import hash_key
from tests.mock_upstream import MockUpstream, free_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-gateway-key"
TEST_KEY = "sk-test-env-key"
EXPIRED_KEY = "sk-test-expired-key"
UPSTREAM_KEY = "sk-upstream-secret-1234567890"


class GatewayProcess:
    """`llmrelay serve` as a child process, with its config, log database and spool in tmp_path."""

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
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = workdir / "gateway.out"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_db(self) -> Path:
        return self.workdir / "logs.db"

    def start(self) -> GatewayProcess:
        with self.output.open("wb") as out:
            config = ["--config", str(self.config_path)] if self.has_config else []
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", *config, "--port", str(self.port),
                 "--workers", str(self.workers)],
                cwd=self.workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.output.read_text()}")
            try:
                if httpx.get(f"{self.url}/api/health-check/", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
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


def base_config(mock: MockUpstream, workdir: Path, **overrides: Any) -> dict[str, Any]:
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
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[MockUpstream]:
    mock = MockUpstream().start()
    yield mock
    mock.stop()


@pytest.fixture
def mock(mock_upstream: MockUpstream) -> MockUpstream:
    mock_upstream.reset()
    return mock_upstream


@pytest.fixture(scope="module")
def gateway(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway per test module on the standard test config."""
    workdir = tmp_path_factory.mktemp("gateway")
    process = GatewayProcess(base_config(mock_upstream, workdir), workdir).start()
    yield process
    process.stop()


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
