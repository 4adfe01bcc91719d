"""Run the llmrelay benchmark suite: the mock directly, then the gateway in each scenario.

    .venv/bin/python benchmarks/run.py                         # everything: 18-20 minutes (the 1M-request soak 5-7)
    .venv/bin/python benchmarks/run.py --quick                 # the same scenarios, short: about 5 minutes
    .venv/bin/python benchmarks/run.py --scenarios full,cache-hit --concurrency 1,16 --duration 5
    .venv/bin/python benchmarks/run.py --peers                 # also LiteLLM and Portkey (benchmarks/peers/install.sh)

Scenarios (--scenarios, in this order): direct, minimal, full, cache-hit, translation, paced, hold, soak,
scaling, peers (only with --peers or when named). Each gateway scenario starts its own gateway
(``llmrelay serve --workers 1`` pinned to core 0; the mock and the load client on core 1). Writes
benchmarks/results/latest.{md,json} and refreshes the results block in benchmarks/README.md (a
subset or --quick writes latest-<...>.{md,json} and leaves the README alone). See
benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import loadgen
import procstat
import report
import scenarios
from measure import MB, QUIET_BUSY, SETTLE_S, RssPeak, Run, body_for, measure, measure_row, sent, wait_quiet
from scenarios import FAMILIES, NON_STREAM, PIPELINES, Endpoint, Family, Shape
from servers import (  # re-exported: peers.py and profile.py use them as run.<name>
    GATEWAY_CORE,
    MOCK_CORE,
    REPO,
    BenchError,
    Proc,
    batch_scheduled,
    cache_lookups,
    count_log_rows,
    flush_redis,
    free_port,
    redis_cache_keys,
    smoke_check,
    start,
    start_floor,
    start_gateway,
    start_mock,
    wait_http,
)

__all__ = ["GATEWAY_CORE", "MOCK_CORE", "PIPELINES", "BenchError", "Proc", "batch_scheduled", "free_port", "start",
           "start_gateway", "wait_http"]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# --------------------------------------------------------------------------- gateway scenarios


@dataclass
class Gateway:
    proc: Proc
    base: str
    tmp: Path
    rss_mb_startup: float = 0.0
    smoke_requests: int = 0

    def endpoint(self, r: Run, fam: Family) -> Endpoint:
        translated = fam.fmt == "anthropic"
        return Endpoint(fam.name, self.base + "/api/chat/completions", fam.model, token=r.token, pid=self.proc.pid,
                        unique=fam.unique, baseline="direct-anthropic" if translated else "direct",
                        events_extra=3 if translated else 1,  # translated: a role chunk and a finish chunk
                        metrics_url=self.base + "/metrics")


def launch(r: Run, name: str, pipeline: str, workers: int = 1, core: int | str = GATEWAY_CORE) -> Gateway:
    proc, base = start_gateway(r.mock_port, r.token, r.tmp / name, pipeline, workers, core)
    print(f"{name}: gateway pid {proc.pid} on {base}, pipeline {pipeline}, {workers} worker(s)", flush=True)
    return Gateway(proc, base, r.tmp / name, procstat.sample(proc.pid).total_rss / MB)


def finish(r: Run, name: str, gw: Gateway, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """Stop the gateway (its log queue flushes), then compare its sqlite rows with the requests sent."""
    if gw.proc.popen.poll() is not None:
        r.issue(f"{name}: the gateway died (exit code {gw.proc.popen.returncode}):\n{gw.proc.stderr_tail(2000)}")
    else:
        info.setdefault("rss_mb_startup", gw.rss_mb_startup)
        info.setdefault("rss_mb_end", procstat.sample(gw.proc.pid).total_rss / MB)
    gw.proc.stop()
    rows_logged = count_log_rows(gw.tmp / "logs.db")
    requests = sent(rows) + gw.smoke_requests + info.pop("extra_requests", 0)
    info |= {"log_rows": rows_logged, "requests_sent": requests}
    if not isinstance(rows_logged, int) or rows_logged < requests:
        r.issue(f"{name}: the gateway logged {rows_logged} rows for {requests:,} requests sent "
                f"(sqlite sink, counted after shutdown); process logs in {gw.tmp}")
    r.results["gateways"][name] = info


def smoke_family(r: Run, fam: Family, gw: Gateway, ep: Endpoint) -> list[str]:
    """One request of each mode; for the cache scenarios, what the cache answered (and for
    cache-hit a second request, which must be a hit)."""
    notes = []
    for shape in (NON_STREAM, Shape(True, r.args.chunks)):
        body, _ = body_for(ep, shape, r.seed if fam.name == "cache-hit" else f"smoke{secrets.token_hex(4)}")
        first = smoke_check(ep, shape, body).get("x-llmrelay-cache", "-")
        gw.smoke_requests += 1
        if fam.pipeline == "minimal":
            continue
        note = f"{shape.mode}: x-llmrelay-cache {first}"
        if fam.name == "cache-hit":
            time.sleep(0.3)  # the answer is stored in the background
            second = smoke_check(ep, shape, body).get("x-llmrelay-cache", "-")
            gw.smoke_requests += 1
            note += f", then {second}"
            if second != "hit":
                r.issue(f"cache-hit: the second identical {shape.mode} request was a {second}, not a hit")
        elif fam.pipeline == "full" and first != "miss":
            r.issue(f"{fam.name}: a {shape.mode} request with a new body was answered {first!r}, not 'miss'")
        notes.append(note)
    return notes


def run_family(r: Run, fam: Family) -> None:
    gw = launch(r, fam.name, fam.pipeline)
    ep = gw.endpoint(r, fam)
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {"pipeline": fam.pipeline, "about": fam.about}
    try:
        info["smoke"] = smoke_family(r, fam, gw, ep)
        for shape in r.shapes():
            for conc in r.levels(shape.stream):
                if fam.fmt == "anthropic":
                    measure_row(r, r.direct("anthropic"), shape, conc)
                rows.append(measure_row(r, ep, shape, conc, fixed_tag=r.seed if fam.name == "cache-hit" else ""))
                if gw.proc.popen.poll() is not None:
                    raise BenchError(f"{fam.name}: gateway died:\n{gw.proc.stderr_tail()}")
        info["cache_lookups"] = cache_lookups(ep.metrics_url)
        if PIPELINES[fam.pipeline].redis:
            info["redis_cache_keys"] = keys = redis_cache_keys()
            if fam.unique and keys == 0:
                r.issue(f"{fam.name}: no cache entries in Redis after the run (every answer should be stored)")
    finally:
        finish(r, fam.name, gw, rows, info)
    hits = sum(x.get("cache_hits", 0) for x in rows)
    if fam.unique and hits > 0.001 * sum(x["requests"] for x in rows):
        r.issue(f"{fam.name}: {hits:.0f} cache hits while every body was unique (expected ~0)")


def run_direct(r: Run) -> None:
    ep = r.direct()
    for shape in r.shapes():
        for conc in r.levels(shape.stream):
            measure_row(r, ep, shape, conc)


def floor_endpoint(r: Run, name: str) -> tuple[Proc, Endpoint]:
    proc, base = start_floor(r.mock_port, r.tmp / name)
    return proc, Endpoint("floor", base + "/api/chat/completions", scenarios.MODEL, pid=proc.pid, baseline="direct",
                          events_extra=None)


def run_floor(r: Run) -> None:
    proc, ep = floor_endpoint(r, "floor")
    try:
        for shape in r.shapes():
            for conc in r.levels(shape.stream):
                measure_row(r, ep, shape, conc)
    finally:
        proc.stop()


def run_paced(r: Run) -> None:
    """Streams paced like a model (--delay-ms apart), direct and through the full pipeline (and the
    floor with --floor)."""
    fam = FAMILIES["full"]
    gw = launch(r, "paced", fam.pipeline)
    ep = gw.endpoint(r, fam)
    floor, floor_ep = floor_endpoint(r, "paced-floor") if r.args.floor else (None, None)
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {"pipeline": fam.pipeline, "about": "paced streams through the full pipeline"}
    try:
        info["smoke"] = smoke_family(r, fam, gw, ep)
        for chunks in r.args.paced_chunks:
            shape = Shape(True, chunks, r.args.delay_ms)
            # at least a few whole streams per connection, so each figure has more than one sample
            duration = max(r.args.duration, r.args.paced_streams * chunks * r.args.delay_ms / 1000)
            for conc in r.args.levels or scenarios.STREAM_LEVELS:
                measure_row(r, r.direct(), shape, conc, duration)
                if floor_ep:
                    measure_row(r, floor_ep, shape, conc, duration)
                rows.append(measure_row(r, ep, shape, conc, duration))
    finally:
        if floor:
            floor.stop()
        finish(r, "paced", gw, rows, info)


def run_hold(r: Run) -> None:
    """--hold streams open at once through the full pipeline; the gateway's RSS is sampled while they run."""
    a = r.args
    fam = FAMILIES["full"]
    gw = launch(r, "hold", fam.pipeline)
    ep = gw.endpoint(r, fam)
    shape = Shape(True, a.hold_chunks, a.hold_delay_ms)
    info: dict[str, Any] = {"pipeline": fam.pipeline, "streams": a.hold, "chunks": a.hold_chunks,
                            "delay_ms": a.hold_delay_ms}
    try:
        info["smoke"] = smoke_family(r, fam, gw, ep)
        body, unique = body_for(ep, shape, secrets.token_hex(4))
        peak = RssPeak(gw.proc.pid)
        sys0, mock0, srv0 = procstat.system_sample(), procstat.sample(r.mock.pid), procstat.sample(gw.proc.pid)
        t0 = time.perf_counter()
        res = loadgen.run_stream_hold(ep.url, body, r.token, a.hold, a.hold_timeout, MOCK_CORE, None, unique,
                                      ep.events(shape), peak.tick)
        time.sleep(SETTLE_S)
        sys1, mock1, srv1 = procstat.system_sample(), procstat.sample(r.mock.pid), procstat.sample(gw.proc.pid)
        window = time.perf_counter() - t0
        server_cpu, mock_cpu = procstat.cpu_delta(srv0, srv1), procstat.cpu_delta(mock0, mock1)
        wall = res.wall_s or 1.0
        info |= {
            "completed": res.requests, "errors": res.errors, "error_sample": res.error_sample,
            "error_samples": res.extra.get("error_samples"), "peak_open": res.extra.get("peak_open"),
            "ramp_s": res.extra.get("ramp_s"), "wall_s": res.wall_s, "latency_ms": res.latency_ms,
            "ttft_ms": res.ttft_ms, "chunk_gap_ms": res.extra.get("chunk_gap_ms"),
            "inner_gap_ms": res.extra.get("inner_gap_ms"),
            "connect_ms": res.extra.get("connect_ms"),
            "server_cpu_util": server_cpu / wall,
            "server_cpu_us_per_stream": server_cpu / res.requests * 1e6 if res.requests else None,
            "rss_mb_before": srv0.total_rss / MB, "rss_mb_peak": peak.total / MB,
            "rss_mb_peak_proc": peak.proc / MB, "rss_mb_after": srv1.total_rss / MB,
            "client_cpu_util": res.client_cpu_util, "mock_cpu_util": mock_cpu / wall,
            "other_cpu_util": max(sys1.busy_s - sys0.busy_s - server_cpu - mock_cpu - res.client_cpu_s, 0) / window,
            "extra_requests": a.hold,
        }
        print(report.describe_hold(info), flush=True)
        if res.errors or res.requests != a.hold:
            r.issue(f"hold: {res.requests} of {a.hold} streams correct, {res.errors} errors; samples: "
                    f"{res.extra.get('error_samples')} (reproduce: run.py --scenarios hold --hold {a.hold})")
    finally:
        finish(r, "hold", gw, [], info)


def run_soak(r: Run) -> None:
    """--soak requests at concurrency 64 through the full pipeline, in slices, with the RSS after each."""
    a = r.args
    fam = FAMILIES["full"]
    gw = launch(r, "soak", fam.pipeline)
    ep = gw.endpoint(r, fam)
    info: dict[str, Any] = {"pipeline": fam.pipeline, "target_requests": a.soak, "concurrency": scenarios.SOAK_CONCURRENCY}
    slices: list[dict[str, Any]] = []
    try:
        info["smoke"] = smoke_family(r, fam, gw, ep)
        time.sleep(1.0)
        info["rss_mb_idle"] = procstat.sample(gw.proc.pid).total_rss / MB
        done, rate, per_slice = 0, 0.0, a.soak / a.soak_slices
        while done < a.soak:
            want = min(a.soak - done, per_slice)
            duration = max(1, round(want / rate)) if rate else min(5, max(1, round(want / 2000)))
            body, unique = body_for(ep, NON_STREAM, secrets.token_hex(4))
            peak = RssPeak(gw.proc.pid)
            srv0 = procstat.sample(gw.proc.pid)
            res = loadgen.run_wrk(ep.url, body, r.token, scenarios.SOAK_CONCURRENCY, duration, MOCK_CORE, None,
                                  unique, peak.tick)
            time.sleep(SETTLE_S)
            srv1 = procstat.sample(gw.proc.pid)
            done += res.requests + res.errors
            rate = res.rps
            cpu = procstat.cpu_delta(srv0, srv1)
            slices.append({"requests_done": done, "requests": res.requests, "errors": res.errors, "rps": res.rps,
                           "p99_ms": res.latency_ms["p99"],
                           "server_cpu_us_per_req": cpu / res.requests * 1e6 if res.requests else None,
                           "rss_mb_during_max": peak.total / MB, "rss_mb_max_proc": peak.proc / MB,
                           "rss_mb_after": srv1.total_rss / MB})
            print(report.describe_slice(slices[-1]), flush=True)
            if res.errors:
                r.issue(f"soak: {res.errors} errors in slice {len(slices)} ({res.error_sample})")
            if res.errors > res.requests:
                r.issue("soak: stopped early, most requests failed")
                break
        time.sleep(2.0)
        info["rss_mb_end"] = procstat.sample(gw.proc.pid).total_rss / MB
        info |= report.soak_growth(slices, info)
        info["slices"] = slices
        info["requests_done"] = done
        info["extra_requests"] = done
        info["redis_cache_keys"] = redis_cache_keys()
    finally:
        finish(r, "soak", gw, [], info)


def set_affinity(pids: list[int], cores: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):  # a pid that is gone
            os.sched_setaffinity(pid, cores)


def run_scaling(r: Run) -> None:
    """Full pipeline, non-stream, concurrency 64: one worker on core 0, then two workers on both cores
    (the mock and wrk then run on both cores too: on a 2-core machine they compete with the gateway)."""
    fam = FAMILIES["full"]
    both = "0,1"
    mock_pids = procstat.descendants(r.mock.pid)
    runs = []
    for workers in (1, 2):
        name = f"scaling-{workers}w"
        gw = launch(r, name, fam.pipeline, workers, GATEWAY_CORE if workers == 1 else both)
        ep = gw.endpoint(r, fam)
        ep = replace(ep, name=name, metrics_url=None)
        rows: list[dict[str, Any]] = []
        info: dict[str, Any] = {"pipeline": fam.pipeline, "workers": workers}
        try:
            info["smoke"] = smoke_family(r, fam, gw, ep)
            if workers == 2:
                set_affinity(mock_pids, {0, 1})
            row = measure(r, ep, NON_STREAM, scenarios.SCALING_CONCURRENCY, r.args.duration,
                          core=MOCK_CORE if workers == 1 else both)
            row["workers"] = workers
            print(report.describe(row), flush=True)
            rows.append(row)
            runs.append(row)
            if row["errors"]:
                r.issue(f"{name}: {row['errors']} errors; samples: {row.get('error_samples') or row['error_sample']}")
        finally:
            set_affinity(mock_pids, {MOCK_CORE})
            finish(r, name, gw, rows, info)
    r.results["scaling"] = report.scaling_summary(runs)


def run_peers(r: Run) -> None:
    import peers

    installed = [name for name, ok in peers.available().items() if ok]
    if not installed:
        print(f"peers: none installed ({peers.INSTALL_HINT}): skipped", flush=True)
        r.results["peers"] = {"installed": {}}
        return
    r.results["peers"] = {"installed": {n: peers.version(n) for n in installed}, "caveats": peers.CAVEATS}
    duration = r.args.peer_duration
    for name in installed:
        try:
            peer = peers.start(name, r.mock_port, r.tmp / name, GATEWAY_CORE)
        except BenchError as exc:  # one peer failing to start leaves the other to measure
            r.issue(f"peer {name} did not start: {exc}")
            continue
        print(f"{name}: pid {peer.pid} on {peer.url}", flush=True)
        ep = Endpoint(name, peer.url, peer.model, headers=tuple(peer.headers.items()), pid=peer.pid,
                      baseline="direct", events_extra=None)
        try:
            peers.check_peer(peer)
            for stream, levels in ((False, scenarios.PEER_NON_STREAM_LEVELS), (True, scenarios.PEER_STREAM_LEVELS)):
                shape = Shape(True, r.args.chunks) if stream else NON_STREAM
                if shape.mode not in r.args.modes:
                    continue
                for conc in [c for c in levels if not r.args.levels or c in r.args.levels]:
                    measure_row(r, ep, shape, conc, duration)
        except (BenchError, RuntimeError) as exc:
            r.issue(f"peer {name} failed: {exc}\n{peer.stderr_tail(1000)}")
        finally:
            peer.stop()


RUNNERS: dict[str, Callable[[Run], None]] = {
    "direct": run_direct,
    **{name: (lambda r, fam=fam: run_family(r, fam)) for name, fam in FAMILIES.items()},
    "paced": run_paced,
    "hold": run_hold,
    "soak": run_soak,
    "scaling": run_scaling,
    "peers": run_peers,
}


# --------------------------------------------------------------------------- main


def machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, Python {platform.python_version()}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="short runs: 1 s per measurement, a 30,000-request soak, peers 1 s (about 5 minutes)")
    p.add_argument("--scenarios", help=f"comma-separated subset of {','.join(scenarios.SCENARIOS)} "
                   "(default: all but peers; direct is added when a gateway scenario needs its baseline)")
    p.add_argument("--peers", action="store_true", help="also run the installed peers (LiteLLM, Portkey)")
    p.add_argument("--floor", action="store_true", help="also measure floor_app.py (plain ASGI + the gateway's upstream client: the stack's least)")
    p.add_argument("--duration", type=float, help="measured seconds per closed-loop run (default 8, quick 1)")
    p.add_argument("--warmup", type=float, help="warm-up seconds before each (default 1, quick 0.3)")
    p.add_argument("--concurrency", help="comma-separated levels for every closed-loop run "
                   "(default: non-stream 1,16,64,256; streams 1,16,64)")
    p.add_argument("--modes", default="non-stream,stream", help="non-stream, stream or both (closed-loop families)")
    p.add_argument("--chunks", type=int, default=20, help="content chunks of the unpaced streams (default 20)")
    p.add_argument("--delay-ms", type=float, default=scenarios.PACED_DELAY_MS,
                   help="paced scenario: ms between chunks (default 10: 100 tokens/s)")
    p.add_argument("--paced-chunks", default=",".join(map(str, scenarios.PACED_CHUNKS)),
                   help="paced scenario: stream lengths (default 20,200)")
    p.add_argument("--hold", type=int, default=scenarios.HOLD_STREAMS, help="hold: streams open at once (1000)")
    p.add_argument("--hold-chunks", type=int, default=scenarios.HOLD_CHUNKS, help="hold: chunks per stream (50)")
    p.add_argument("--hold-delay-ms", type=float, default=scenarios.HOLD_DELAY_MS, help="hold: ms between chunks (100)")
    p.add_argument("--hold-timeout", type=float, default=60.0, help="hold: seconds allowed per stream (60)")
    p.add_argument("--soak", type=int, help="soak: requests (default 1,000,000; quick 30,000)")
    p.add_argument("--soak-slices", type=int, default=10, help="soak: slices, with an RSS reading after each (10)")
    p.add_argument("--peer-duration", type=float, help="peers: measured seconds per run (default 5, quick 1)")
    p.add_argument("--retries", type=int, default=1, help="re-runs of a run disturbed by other programs (default 1)")
    p.add_argument("--wait-quiet", type=float, default=30.0, help="seconds to wait at start for an idle machine")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--no-readme", action="store_true", help="do not refresh the results block in README.md")
    args = p.parse_args(argv)
    args.duration = args.duration or (1.0 if args.quick else 8.0)
    args.warmup = args.warmup or (0.3 if args.quick else 1.0)
    args.soak = args.soak or (30_000 if args.quick else scenarios.SOAK_REQUESTS)
    args.peer_duration = args.peer_duration or (1.0 if args.quick else 5.0)
    args.paced_streams = 1 if args.quick else 3
    args.levels = [int(c) for c in csv(args.concurrency)] if args.concurrency else []
    args.modes = set(csv(args.modes))
    args.paced_chunks = [int(c) for c in csv(args.paced_chunks)]
    if not args.modes or not args.modes <= {"non-stream", "stream"}:
        p.error("--modes takes non-stream, stream or both")
    chosen = set(csv(args.scenarios)) if args.scenarios else set(scenarios.DEFAULT_SCENARIOS)
    if unknown := chosen - set(scenarios.SCENARIOS):
        p.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {', '.join(scenarios.SCENARIOS)}")
    if args.peers:
        chosen.add("peers")
    if chosen & {*FAMILIES, "peers"} or args.floor:
        chosen.add("direct")
    args.chosen = [s for s in scenarios.SCENARIOS if s in chosen]
    args.complete = set(scenarios.DEFAULT_SCENARIOS) <= chosen and not args.levels and len(args.modes) == 2
    return args


def results_stem(args: argparse.Namespace) -> str:
    """'latest' for the whole suite; --quick and subsets get their own files and leave README.md alone."""
    if args.quick:
        return "latest-quick"
    if args.complete:
        return "latest"
    return "latest-" + "-".join(args.chosen)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (os.cpu_count() or 1) > MOCK_CORE:
        os.sched_setaffinity(0, {MOCK_CORE})  # this script's own sampling stays off the gateway's core
    if not loadgen.wrk_available():
        print("wrk not found (apt-get install -y wrk): non-stream runs use stream_client.py", file=sys.stderr)
    busy = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else procstat.machine_busy(0.5)
    if busy > QUIET_BUSY:
        print(f"warning: the machine is busy ({busy:.0%} of a core used by other programs)", file=sys.stderr)
    needs_redis = any(s not in ("direct", "minimal", "peers") for s in args.chosen)
    if needs_redis and (why := flush_redis()):
        print(f"BENCHMARK FAILED: Redis at {scenarios.REDIS_URL} is needed by the full pipeline: {why}",
              file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="llmrelay-bench-"))
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results: dict[str, Any] = {"rows": [], "gateways": {}, "issues": [], "failed": {}, "timings_s": {}}
    mock: Proc | None = None
    t_all = time.perf_counter()
    try:
        mock, mock_port = start_mock(tmp)
        r = Run(args, tmp, "sk-bench-" + secrets.token_hex(16), secrets.token_hex(4), mock, mock_port, results)
        for fmt in ("openai", "anthropic"):
            for shape in (NON_STREAM, Shape(True, args.chunks)):
                smoke_check(r.direct(fmt), shape, r.direct(fmt).body(shape))
        for name in args.chosen:
            t0 = time.perf_counter()
            print(f"--- {name}", flush=True)
            r.current = name
            try:
                RUNNERS[name](r)
                if name == "direct" and args.floor:
                    run_floor(r)
            except (BenchError, RuntimeError) as exc:  # one scenario failed: report it, run the others
                results["failed"][name] = str(exc)
                r.issue(f"scenario {name} FAILED: {exc} (reproduce: benchmarks/run.py --scenarios {name} "
                        f"--duration 1; process logs in {tmp})")
                if mock.popen.poll() is not None:
                    raise BenchError(f"the mock died:\n{mock.stderr_tail()}") from exc
            results["timings_s"][name] = time.perf_counter() - t0
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}\n(configs and process logs kept in {tmp})", file=sys.stderr)
        return 2
    finally:
        if mock is not None:
            mock.stop()
    results["timings_s"]["total"] = time.perf_counter() - t_all

    report.add_deltas(results["rows"])
    results["targets"] = report.check_targets(results)
    results["meta"] = {
        "started": started,
        "command": " ".join(["benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "commit": git_commit(),
        "scenarios": args.chosen,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "chunks": args.chunks,
        "delay_ms": args.delay_ms,
        "gateway_core": GATEWAY_CORE,
        "mock_core": MOCK_CORE,
        "nonstream_client": "wrk -t1" if loadgen.wrk_available() else "stream_client.py",
        "pipelines": {name: {"stages": p.stages, "redis": p.redis, "about": p.about} for name, p in PIPELINES.items()},
        "redis": scenarios.REDIS_URL,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(args)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    report.write_markdown(args.out / f"{stem}.md", results)
    print("\n" + report.render(results))
    if results["failed"]:
        print(f"scenarios failed: {', '.join(results['failed'])} (process logs kept in {tmp})", file=sys.stderr)
    elif not args.no_readme and stem == "latest" and report.update_readme(HERE / "README.md", results):
        print("README.md results block updated")
    print(f"wrote {args.out / (stem + '.md')} and {args.out / (stem + '.json')}")
    if results["failed"]:
        return 2
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
