"""Fixtures of the fault suite: one fault upstream and one gateway per module, and a TCP relay to cut Redis or
PostgreSQL off and bring them back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import KEY, GatewayProcess, base_config
from tests.faults.fault_upstream import FaultUpstream

AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "hello there"}]
PIPELINE = ["auth", "limits", "cache", "routing", "credentials", "fallback"]
TIMEOUTS = {"connect": 1, "read": 1.0, "stream_idle": 0.5}
PRICES_A = {"input": 1.0, "output": 2.0}     # USD per 1M tokens
PRICES_B = {"input": 10.0, "output": 20.0}


class _NoMock:
    """base_config reads only `base_url` of its mock: its providers `mock`/`openai` point nowhere here."""

    base_url = "http://127.0.0.1:9/v1"


def fault_config(fault: FaultUpstream, workdir: Path, **overrides: Any) -> dict[str, Any]:
    """base_config plus providers on the fault upstream (fault-a, fault-b: short timeouts; fault-patient: 30 s)
    and two priced
    models; cooldowns off unless a test asks (the scenarios of a module share those deployments)."""
    config = base_config(_NoMock(),  # type: ignore[arg-type]
                          workdir, extra_providers=[
        {"id": "fault-a", "protocol": "openai", "base_url": fault.base_url, "api_key": "key-a", "timeouts": TIMEOUTS},
        {"id": "fault-b", "protocol": "openai", "base_url": fault.base_url, "api_key": "key-b", "timeouts": TIMEOUTS},
        {"id": "fault-patient", "protocol": "openai", "base_url": fault.base_url, "api_key": "key-p",
         "timeouts": {"connect": 1, "read": 30, "stream_idle": 30}},
    ], extra_models=[
        {"name": "priced-a", "provider": "fault-a", "model": "priced-a", "prices": PRICES_A},
        {"name": "priced-b", "provider": "fault-b", "model": "priced-b", "prices": PRICES_B},
    ], pipeline=PIPELINE, cooldowns={"statuses": []})
    config.update(overrides)
    return config


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def post(gateway: GatewayProcess, model: str, timeout: float = 30, **extra: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}/api/chat/completions", headers=AUTH,
                      json={"model": model, "messages": HI, **extra}, timeout=timeout)


def stream(gateway: GatewayProcess, model: str, **extra: Any) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", f"{gateway.url}/api/chat/completions", headers=AUTH,
                      json={"model": model, "messages": HI, "stream": True, **extra}, timeout=30) as response:
        body = b"".join(response.iter_raw())
    return response, body


def sse_events(body: bytes) -> list[bytes]:
    """The data payloads of an SSE body, in order."""
    return [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e.startswith(b"data: ")]


@pytest.fixture(scope="module")
def fault() -> Iterator[FaultUpstream]:
    server = FaultUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(fault: FaultUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway per module on fault_config."""
    workdir = tmp_path_factory.mktemp("faults")
    process = GatewayProcess(fault_config(fault, workdir), workdir).start()
    yield process
    process.stop()


@pytest.fixture
def start_fault_gateway(fault: FaultUpstream, tmp_path: Path) -> Iterator[Any]:
    """start(**overrides) -> a gateway on fault_config with those top-level overrides."""
    started: list[GatewayProcess] = []

    def start(env: dict[str, str] | None = None, **overrides: Any) -> GatewayProcess:
        workdir = tmp_path / f"gw{len(started)}"
        process = GatewayProcess(fault_config(fault, workdir, **overrides), workdir, env).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


