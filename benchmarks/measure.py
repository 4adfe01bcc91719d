"""One closed-loop measurement: warm-up, a measured load run, and the CPU and memory readings around it.

run.py runs the scenarios; each of their closed-loop runs is a measure_row() here.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import loadgen
import procstat
import report
import scenarios
from scenarios import NON_STREAM, Endpoint, Shape
from servers import MOCK_CORE, Proc, cache_lookups

SETTLE_S = 0.5  # after a run, so work the gateway does after answering (writing logs) is counted
QUIET_BUSY = 0.25  # cores: below this the machine counts as idle
RETRY_WAIT_S = 15.0
OTHER_CPU_WARN = report.OTHER_CPU_WARN
MARK = scenarios.UNIQUE_MARK
MB = 2**20


@dataclass
class Run:
    """What the scenarios of one run share."""

    args: argparse.Namespace
    tmp: Path
    token: str
    seed: str  # per run: fixed bodies (cache-hit) differ from any earlier run's
    mock: Proc
    mock_port: int
    results: dict[str, Any] = field(default_factory=dict)
    current: str = ""  # the scenario running, for the reproduce hints of issues

    def direct(self, fmt: str = "openai") -> Endpoint:
        base = f"http://127.0.0.1:{self.mock_port}"
        if fmt == "anthropic":
            return Endpoint("direct-anthropic", base + "/v1/messages", scenarios.UPSTREAM_CLAUDE, "anthropic",
                            direct=True, events_extra=5)
        return Endpoint("direct", base + "/v1/chat/completions", scenarios.UPSTREAM_MODEL, direct=True, events_extra=2)

    def issue(self, text: str) -> None:
        """Something wrong with the gateway or the run: printed now, listed in the report."""
        print(f"  ISSUE: {text}", file=sys.stderr, flush=True)
        self.results["issues"].append(text)

    def levels(self, stream: bool) -> list[int]:
        if self.args.levels:
            return self.args.levels
        return list(scenarios.STREAM_LEVELS if stream else scenarios.NON_STREAM_LEVELS)

    def shapes(self) -> list[Shape]:
        return [s for s in (NON_STREAM, Shape(True, self.args.chunks)) if s.mode in self.args.modes]


# --------------------------------------------------------------------------- one closed-loop measurement


def body_for(ep: Endpoint, shape: Shape, tag: str) -> tuple[str, str | None]:
    """The body to send and the mark the client replaces per request (None: the same body every time)."""
    if ep.unique:
        return ep.body(shape, f"{tag}-{MARK}"), MARK
    return ep.body(shape, f"{tag}-{shape.mode}" if tag else ""), None


def run_load(
    ep: Endpoint, shape: Shape, body: str, unique: str | None, conc: int, duration: float,
    core: int | str = MOCK_CORE, tick: loadgen.Tick = None,
) -> loadgen.LoadResult:
    if shape.stream or not loadgen.wrk_available():
        events = ep.events(shape) if shape.stream else None
        return loadgen.run_stream_client(ep.url, body, ep.token, conc, duration, core, ep.header_dict, unique,
                                         events, tick)
    return loadgen.run_wrk(ep.url, body, ep.token, conc, duration, core, ep.header_dict, unique, tick)


def measure(
    r: Run, ep: Endpoint, shape: Shape, conc: int, duration: float, fixed_tag: str = "", core: int | str = MOCK_CORE
) -> dict[str, Any]:
    """Warm-up (Python client, not counted), then one measured closed-loop run; CPU and RSS of the
    server's process tree and of the mock are read just before and 0.5 s after it (so work the gateway
    does after answering, such as writing logs, is counted)."""
    body, unique = body_for(ep, shape, fixed_tag or secrets.token_hex(4))
    warm_body, _ = body_for(ep, shape, fixed_tag or secrets.token_hex(4))
    warm = loadgen.run_stream_client(ep.url, warm_body, ep.token, conc, r.args.warmup, core, ep.header_dict, unique)
    time.sleep(SETTLE_S)
    lookups0 = cache_lookups(ep.metrics_url)
    t0 = time.perf_counter()
    sys0, mock0 = procstat.system_sample(), procstat.sample(r.mock.pid)
    srv0 = procstat.sample(ep.pid) if ep.pid else None
    result = run_load(ep, shape, body, unique, conc, duration, core)
    time.sleep(SETTLE_S)
    sys1, mock1 = procstat.system_sample(), procstat.sample(r.mock.pid)
    srv1 = procstat.sample(ep.pid) if ep.pid else None
    window = time.perf_counter() - t0
    lookups1 = cache_lookups(ep.metrics_url)

    wall = result.wall_s or 1.0
    mock_cpu = procstat.cpu_delta(mock0, mock1)
    server_cpu = procstat.cpu_delta(srv0, srv1) if srv0 and srv1 else 0.0
    other = sys1.busy_s - sys0.busy_s - mock_cpu - server_cpu - result.client_cpu_s
    row: dict[str, Any] = {
        "scenario": ep.name,
        "baseline": ep.baseline,
        "mode": shape.mode,
        "chunks": shape.chunks if shape.stream else None,
        "delay_ms": shape.delay_ms if shape.stream else None,
        "concurrency": conc,
        "requests": result.requests,
        "errors": result.errors,
        "error_sample": result.error_sample,
        "wall_s": result.wall_s,
        "rps": result.rps,
        "latency_ms": result.latency_ms,
        "ttft_ms": result.ttft_ms,
        "client": "stream_client.py" if shape.stream or not loadgen.wrk_available() else "wrk",
        "client_cpu_util": result.client_cpu_util,
        "mock_cpu_util": mock_cpu / wall,
        "other_cpu_util": max(other, 0.0) / window,
        "steal_util": (sys1.steal_s - sys0.steal_s) / window,
        "warmup_requests": warm.requests + warm.errors,
        **result.extra,
    }
    if srv0 and srv1:
        per_req = server_cpu / result.requests * 1e6 if result.requests else None
        row |= {
            "server_cpu_s": server_cpu,
            "server_cpu_us_per_req": per_req,
            "server_cpu_us_per_chunk": per_req / shape.chunks if per_req and shape.stream else None,
            "server_cpu_util": server_cpu / wall,
            "server_rss_mb_before": srv0.total_rss / MB,
            "server_rss_mb_after": srv1.total_rss / MB,
            "server_rss_mb_max_proc": max(srv1.rss.values(), default=0) / MB,
            "server_pids": len(srv1.rss),
        }
    if lookups0 or lookups1:
        row["cache_hits"] = lookups1.get("hit", 0.0) - lookups0.get("hit", 0.0)
        row["cache_misses"] = lookups1.get("miss", 0.0) - lookups0.get("miss", 0.0)
    return row


def wait_quiet(limit_s: float, busy_max: float = QUIET_BUSY) -> float:
    """Wait up to ``limit_s`` for the machine to idle; returns the last busy reading (in cores)."""
    deadline = time.monotonic() + limit_s
    busy = procstat.machine_busy(1.0)
    while busy > busy_max and time.monotonic() < deadline:
        busy = procstat.machine_busy(1.0)
    return busy


def measure_row(r: Run, ep: Endpoint, shape: Shape, conc: int, duration: float | None = None,
                fixed_tag: str = "") -> dict[str, Any]:
    """measure(), again (up to --retries times) if other programs were busy, keeping the quietest;
    prints the row, records it, and reports errors as issues."""
    duration = duration or r.args.duration
    row = measure(r, ep, shape, conc, duration, fixed_tag)
    total = sent([row])
    for attempt in range(r.args.retries):
        if row["other_cpu_util"] <= OTHER_CPU_WARN:
            break
        print(f"  other programs used {row['other_cpu_util']:.0%} of a core: retry {attempt + 1}", flush=True)
        wait_quiet(RETRY_WAIT_S)
        again = measure(r, ep, shape, conc, duration, fixed_tag)
        total += sent([again])
        row = min(row, again, key=lambda x: x["other_cpu_util"])
    row["sent_with_retries"] = total
    print(report.describe(row), flush=True)
    r.results["rows"].append(row)
    if row["errors"]:
        samples = row.get("error_samples") or [row["error_sample"]]
        r.issue(f"{ep.name} {row['mode']} c={conc}: {row['errors']} errors in {row['requests'] + row['errors']} "
                f"requests; samples: {samples} (reproduce: benchmarks/run.py --scenarios {r.current} "
                f"--concurrency {conc} --duration 2)")
    return row


def sent(rows: list[dict[str, Any]]) -> int:
    """Requests a gateway was sent for these rows: measured, failed, warm-up, and discarded retries."""
    return sum(x.get("sent_with_retries", x["requests"] + x["errors"] + x["warmup_requests"]) for x in rows)


class RssPeak:
    """Largest RSS of a process tree seen by ``tick()`` (the pids are looked up once: cheap to call often)."""

    def __init__(self, pid: int) -> None:
        self.pids = procstat.descendants(pid)
        self.total = self.proc = 0

    def tick(self) -> None:
        sizes = [procstat.rss_bytes(p) for p in self.pids]
        self.total = max(self.total, sum(sizes))
        self.proc = max([self.proc, *sizes])
