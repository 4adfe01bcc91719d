"""The processes of a benchmark run (mock, gateway, floor) and the checks made on them.

run.py re-exports these names (peers.py and profile.py use them as ``run.start``, ``run.Proc``, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import scenarios

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GATEWAY_CORE = 0
MOCK_CORE = 1  # the mock and the load client share it; both are reported to stay well below 100 %
GATEWAY_START_TIMEOUT = 15.0


class BenchError(RuntimeError):
    """A failure that ends the run with a clear message."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cmd: list[str], core: int | str) -> list[str]:
    """``core``: one core, or a taskset list such as "0,1"."""
    cores = [int(c) for c in str(core).split(",")]
    if shutil.which("taskset") and (os.cpu_count() or 1) > max(cores):
        return ["taskset", "-c", str(core), *cmd]
    return cmd


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(
    url: str, body: str, token: str | None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """Status, body and (lower-cased) headers of one POST."""
    sent = {"Content-Type": "application/json", **(headers or {})}
    if token:
        sent["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body.encode(), headers=sent, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr_tail(self, limit: int = 4000) -> str:
        text = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        out = self.stdout.read_text(errors="replace") if self.stdout.exists() else ""
        both = (text + ("\n[stdout]\n" + out if out.strip() else "")).strip()
        return both[-limit:] or "(no output)"

    def stop(self) -> None:
        """SIGTERM the process group we started (its workers too), SIGKILL after 5 s."""
        if self.popen.poll() is not None:
            return
        pgid = os.getpgid(self.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.popen.wait()


def start(
    name: str, cmd: list[str], workdir: Path, core: int | str, env: dict[str, str] | None = None
) -> Proc:
    out, err = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    full_env = dict(os.environ, **env) if env else None
    with out.open("wb") as fo, err.open("wb") as fe:
        popen = subprocess.Popen(
            pinned(cmd, core), stdout=fo, stderr=fe, cwd=REPO, env=full_env, start_new_session=True
        )
    return Proc(name, popen, out, err)


def wait_http(proc: Proc, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.stderr_tail()}")
        try:
            status, body = http_get(url, timeout=0.5)
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(
        f"{proc.name} did not answer 200 on {url} within {timeout:g} s ({last}):\n{proc.stderr_tail()}"
    )


def start_mock(workdir: Path) -> tuple[Proc, int]:
    port = free_port()
    mock = start("mock", [sys.executable, str(HERE / "mock_upstream.py"), "--port", str(port)], workdir, MOCK_CORE)
    wait_http(mock, f"http://127.0.0.1:{port}/health", 10)
    return mock, port


# --------------------------------------------------------------------------- gateway


def llmrelay_bin() -> Path:
    candidate = Path(sys.executable).parent / "llmrelay"
    if candidate.exists():
        return candidate
    found = shutil.which("llmrelay")
    if found:
        return Path(found)
    raise BenchError(
        f"no llmrelay executable next to {sys.executable}; install the project first: "
        f"{Path(sys.executable).parent / 'pip'} install -e {REPO}"
    )


def start_gateway(
    mock_port: int, token: str, tmp: Path, pipeline: str = "full", workers: int = 1, core: int | str = GATEWAY_CORE
) -> tuple[Proc, str]:
    """``llmrelay serve`` with a config for ``pipeline`` (a scenarios.PIPELINES key) in ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    key_hash = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    config = tmp / "gateway.yaml"
    config.write_text(scenarios.gateway_config(mock_port, key_hash, tmp, pipeline, workers))
    port = free_port()
    cmd = [str(llmrelay_bin()), "serve", "--config", str(config), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", str(workers)]
    return serve("gateway", cmd, port, tmp, core=core)


def start_floor(mock_port: int, tmp: Path) -> tuple[Proc, str]:
    """The floor reference: floor_app.py under granian, served like the gateway."""
    tmp.mkdir(parents=True, exist_ok=True)
    granian = Path(sys.executable).parent / "granian"
    port = free_port()
    cmd = [str(granian), "--interface", "asgi", "--loop", "uvloop", "--runtime-mode", "st", "--workers", "1",
           "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--no-access-log", "--working-dir", str(HERE), "floor_app:app"]
    env = {"BENCH_FLOOR_UPSTREAM": f"http://127.0.0.1:{mock_port}/v1/chat/completions"}
    return serve("floor", batch_scheduled(cmd), port, tmp, env)


def batch_scheduled(cmd: list[str]) -> list[str]:
    """``cmd`` under SCHED_BATCH, the policy the gateway's workers use here (``server.scheduling: batch``:
    each server measured has core 0 to itself), so the floor and the peers are measured the same way."""
    return ["chrt", "--batch", "0", *cmd] if shutil.which("chrt") else cmd


def serve(
    name: str, cmd: list[str], port: int, tmp: Path, env: dict[str, str] | None = None, core: int | str = GATEWAY_CORE
) -> tuple[Proc, str]:
    """Start a server (on the gateway's core by default) and wait for its health check."""
    proc = start(name, cmd, tmp, core, env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc, base + "/api/health-check/", GATEWAY_START_TIMEOUT)
    except BenchError:
        proc.stop()
        raise
    return proc, base


def smoke_check(ep: scenarios.Endpoint, shape: scenarios.Shape, body: str) -> dict[str, str]:
    """One request before measuring, so a broken path fails loudly instead of producing numbers;
    returns the response headers."""
    status, raw, headers = http_post(ep.url, body, ep.token, ep.header_dict)
    if status != 200:
        raise BenchError(f"{ep.name}: POST {ep.url} -> HTTP {status}: {raw[:1000]!r}")
    anthropic = ep.fmt == "anthropic"
    if shape.stream:
        end = b'"type":"message_stop"}' if anthropic else b"data: [DONE]"
        if not raw.rstrip().endswith(end):
            raise BenchError(f"{ep.name}: stream from {ep.url} did not end with {end!r}: {raw[-1000:]!r}")
    else:
        try:
            data = json.loads(raw)
            assert data["content"][0]["text"] if anthropic else data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, AssertionError):
            raise BenchError(f"{ep.name}: POST {ep.url} returned no completion: {raw[:1000]!r}") from None
    return headers


# --------------------------------------------------------------------------- checks


_METRIC_RE = re.compile(r'^llmrelay_cache_lookups_total\{result="(hit|miss)"\}\s+([0-9.e+]+)', re.M)


def cache_lookups(metrics_url: str | None) -> dict[str, float]:
    """The gateway's cache hit and miss counters ({} without a cache stage or /metrics)."""
    if not metrics_url:
        return {}
    try:
        status, body = http_get(metrics_url, timeout=5)
    except OSError:
        return {}
    if status != 200:
        return {}
    return {kind: float(value) for kind, value in _METRIC_RE.findall(body.decode(errors="replace"))}


def redis_client() -> Any:
    import redis  # a project dependency; only the Redis-backed scenarios need it

    return redis.Redis.from_url(scenarios.REDIS_URL, socket_timeout=5)


def flush_redis() -> str:
    """FLUSHDB the benchmark database; '' if done, else why not."""
    try:
        redis_client().flushdb()
    except Exception as exc:  # noqa: BLE001 - any failure means: no Redis for the full pipeline
        return f"{type(exc).__name__}: {exc}"
    return ""


def redis_cache_keys() -> int | str:
    """Entries the gateway's Redis cache holds now (a SCAN count)."""
    try:
        return sum(1 for _ in redis_client().scan_iter(match="llmrelay:cache:*", count=1000))
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def count_log_rows(db: Path) -> int | str:
    """Rows the gateway's sqlite sink wrote (read after the gateway has stopped and flushed)."""
    if not db.exists():
        return "no database file"
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT count(*) FROM request_logs").fetchone()[0])
    except sqlite3.Error as exc:
        return f"unreadable: {exc}"
