"""Run one load burst with wrk (non-stream) or stream_client.py (SSE) and return its figures.

Both clients run as child processes pinned with taskset; their CPU comes from
``getrusage(RUSAGE_CHILDREN)`` around the run, so every result says how busy the client was.
``unique`` (a mark in the body) makes every request body different; ``tick`` is called about
every ``TICK_S`` while the client runs (run.py samples the gateway's memory with it).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk_post.lua"
STREAM_CLIENT = HERE / "stream_client.py"
TICK_S = 0.25
Tick = Callable[[], None] | None


@dataclass
class LoadResult:
    requests: int
    errors: int
    wall_s: float
    latency_ms: dict[str, float]
    ttft_ms: dict[str, float] | None = None
    client_cpu_s: float = 0.0
    error_sample: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    @property
    def client_cpu_util(self) -> float:
        return self.client_cpu_s / self.wall_s if self.wall_s else 0.0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _pinned(cmd: list[str], core: int | str | None) -> list[str]:
    if core is None or shutil.which("taskset") is None:
        return cmd
    return ["taskset", "-c", str(core), *cmd]


def _run(cmd: list[str], env: dict[str, str] | None, timeout: float, tick: Tick = None) -> tuple[str, float, float]:
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = t0 + timeout
    while True:
        try:
            out, err = proc.communicate(timeout=TICK_S if tick else max(deadline - time.perf_counter(), 0.01))
            break
        except subprocess.TimeoutExpired:
            if time.perf_counter() > deadline:
                proc.kill()
                proc.communicate()
                raise RuntimeError(f"{cmd[0]} did not finish within {timeout:g} s") from None
            if tick:
                tick()
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err.strip() or out.strip()}")
    return out, cpu, wall


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    body: str,
    token: str | None,
    concurrency: int,
    duration: float,
    core: int | str | None,
    headers: dict[str, str] | None = None,
    unique: str | None = None,
    tick: Tick = None,
) -> LoadResult:
    """A closed-loop wrk run: one thread (so ``unique`` counters never repeat), ``concurrency``
    keep-alive connections; ``headers`` are sent too."""
    extra = "\n".join(f"{name}: {value}" for name, value in (headers or {}).items())
    env = dict(os.environ, WRK_BODY=body, WRK_AUTH=token or "", WRK_HEADERS=extra, WRK_UNIQUE=unique or "")
    seconds = max(1, round(duration))
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s", "-s", str(WRK_SCRIPT), url]
    out, cpu, _ = _run(_pinned(cmd, core), env, seconds + 30, tick)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    errors = data["errors"]
    failed = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"] + errors["status"]
    return LoadResult(
        requests=data["requests"] - errors["status"],
        errors=failed,
        wall_s=data["duration_us"] / 1e6,
        latency_ms=data["latency_ms"],
        client_cpu_s=cpu,
        error_sample=f"wrk errors: {errors}" if failed else "",
    )


def run_stream_client(
    url: str,
    body: str,
    token: str | None,
    concurrency: int,
    duration: float,
    core: int | str | None,
    headers: dict[str, str] | None = None,
    unique: str | None = None,
    expect_events: int | None = None,
    tick: Tick = None,
) -> LoadResult:
    """A closed-loop run of stream_client.py (TTFT, total time and SSE event gaps per request)."""
    cmd = ["-c", str(concurrency), "-d", str(duration)]
    return _stream_client(url, body, token, cmd, duration + 60, core, headers, unique, expect_events, tick)


def run_stream_hold(
    url: str,
    body: str,
    token: str | None,
    streams: int,
    timeout: float,
    core: int | str | None,
    headers: dict[str, str] | None = None,
    unique: str | None = None,
    expect_events: int | None = None,
    tick: Tick = None,
) -> LoadResult:
    """stream_client.py --hold: ``streams`` connections at once, one stream each."""
    cmd = ["--hold", str(streams), "--timeout", str(timeout)]
    return _stream_client(url, body, token, cmd, timeout + 120, core, headers, unique, expect_events, tick)


def _stream_client(
    url: str,
    body: str,
    token: str | None,
    mode: list[str],
    timeout: float,
    core: int | str | None,
    headers: dict[str, str] | None,
    unique: str | None,
    expect_events: int | None,
    tick: Tick,
) -> LoadResult:
    cmd = [sys.executable, str(STREAM_CLIENT), "--url", url, "--body", body, *mode]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    if unique:
        cmd += ["--unique", unique]
    if expect_events is not None:
        cmd += ["--expect-events", str(expect_events)]
    out, cpu, _ = _run(_pinned(cmd, core), None, timeout, tick)
    data = json.loads(out)
    keep = ("events_per_stream", "chunk_gap_ms", "inner_gap_ms", "error_samples", "peak_open", "ramp_s", "connect_ms",
            "streams")
    return LoadResult(
        requests=data["requests"],
        errors=data["errors"],
        wall_s=data["wall_s"],
        latency_ms=data["latency_ms"],
        ttft_ms=data.get("ttft_ms"),
        client_cpu_s=cpu,
        error_sample=data.get("error_sample", ""),
        extra={k: data[k] for k in keep if k in data},
    )
