"""Run the llmrelay benchmark suite: direct-to-mock vs through the gateway.

    .venv/bin/python benchmarks/run.py            # full run, about 3 minutes
    .venv/bin/python benchmarks/run.py --quick    # under a minute
    .venv/bin/python benchmarks/run.py --direct-only   # the mock alone (no gateway)

Starts the mock upstream pinned to core 1 and the gateway (``llmrelay serve --workers 1``)
pinned to core 0, then for non-stream and 20-chunk streams at each concurrency measures the mock
directly and through the gateway. Writes benchmarks/results/latest.{md,json} and refreshes the
results block in benchmarks/README.md. See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import loadgen
import procstat
import report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
GATEWAY_CORE = 0
MOCK_CORE = 1  # the mock and the load client share it; both are reported to stay well below 100 %
GATEWAY_START_TIMEOUT = 15.0
OTHER_CPU_WARN = report.OTHER_CPU_WARN
SETTLE_S = 0.5
QUIET_BUSY = 0.25  # cores: below this the machine counts as idle
RETRY_WAIT_S = 15.0  # idle time before/after a measured run, so background work (log sinks) is counted


class BenchError(RuntimeError):
    """A failure that ends the run with a clear message."""


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cmd: list[str], core: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > core:
        return ["taskset", "-c", str(core), *cmd]
    return cmd


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(url: str, body: dict[str, Any], token: str | None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


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


def start(name: str, cmd: list[str], workdir: Path, core: int, env: dict[str, str] | None = None) -> Proc:
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


# --------------------------------------------------------------------------- gateway


PIPELINES = {
    "auth": "[auth]",  # the minimal pipeline
    "default": "[auth, prompts, limits, cache, routing, credentials, fallback]",  # the gateway's default (no policy, cache off)
    "classic": "[auth, routing, credentials, fallback]",  # the default before limits and cache joined it
    # the default with a requests and a cost policy on the key (memory counters): reserve + reconcile per request
    "limits": "[auth, {name: limits, options: {policies: ["
              "{name: bench-requests, scope: api_key, metric: requests, window: day, block_threshold: 1.0e+12}, "
              "{name: bench-cost, scope: api_key, metric: cost, window: day, block_threshold: 1.0e+12}]}}, "
              "cache, routing, credentials, fallback]",
    # the default with caching on for every request: after the first, every request is a cache hit
    "cache-hit": "[auth, limits, {name: cache, options: {defaults: {cache_enabled: true}}}, routing, credentials, "
                 "fallback]",
    # the default with every request traced: spans exported to the mock, which accepts and drops them
    "otel": "[auth, {name: otel, options: {endpoint: 'http://127.0.0.1:{mock_port}/v1/traces', "
            "schedule_delay_ms: 200}}, limits, cache, routing, credentials, fallback]",
}


def gateway_config(mock_port: int, key_hash: str, tmp: Path, pipeline: str = "auth") -> str:
    return f"""\
server: {{host: 127.0.0.1, port: 0, workers: 1}}
providers:
  - id: mock
    protocol: openai
    base_url: http://127.0.0.1:{mock_port}/v1
    api_key: sk-mock-upstream
models:
  - name: bench-model
    provider: mock
    model: gpt-4o-mini
    prices: {{input: 0.15, output: 0.6}}
keys:
  - name: bench
    key_hash: "{key_hash}"
    environment: test
pipeline: {PIPELINES[pipeline].replace("{mock_port}", str(mock_port))}
logs:
  spool_dir: {tmp / "spool"}
  sinks: [{{type: sqlite, path: {tmp / "logs.db"}}}]
"""


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


def start_gateway(mock_port: int, token: str, tmp: Path, pipeline: str = "auth") -> tuple[Proc, str]:
    key_hash = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    config = tmp / "gateway.yaml"
    config.write_text(gateway_config(mock_port, key_hash, tmp, pipeline))
    port = free_port()
    cmd = [str(llmrelay_bin()), "serve", "--config", str(config), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    return serve("gateway", cmd, port, tmp)


def start_floor(mock_port: int, tmp: Path) -> tuple[Proc, str]:
    """The floor reference: floor_app.py under granian, served like the gateway."""
    granian = Path(sys.executable).parent / "granian"
    port = free_port()
    cmd = [str(granian), "--interface", "asgi", "--loop", "uvloop", "--workers", "1", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--no-access-log", "--working-dir", str(HERE), "floor_app:app"]
    env = {"BENCH_FLOOR_UPSTREAM": f"http://127.0.0.1:{mock_port}/v1/chat/completions"}
    return serve("floor", cmd, port, tmp, env)


def serve(name: str, cmd: list[str], port: int, tmp: Path, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    """Start a server on the gateway's core and wait for its health check."""
    proc = start(name, cmd, tmp, GATEWAY_CORE, env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc, base + "/api/health-check/", GATEWAY_START_TIMEOUT)
    except BenchError:
        proc.stop()
        raise
    return proc, base


def smoke_check(url: str, body: dict[str, Any], token: str | None, stream: bool) -> None:
    """One request before measuring, so a broken path fails loudly instead of producing numbers."""
    status, raw = http_post(url, body, token)
    if status != 200:
        raise BenchError(f"POST {url} -> HTTP {status}: {raw[:1000]!r}")
    if stream:
        if not raw.rstrip().endswith(b"data: [DONE]"):
            raise BenchError(f"stream from {url} did not end with 'data: [DONE]': {raw[-1000:]!r}")
    else:
        try:
            data = json.loads(raw)
            assert data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, AssertionError):
            raise BenchError(f"POST {url} returned no chat completion: {raw[:1000]!r}") from None


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Target:
    name: str  # "direct", "floor" or "gateway"
    url: str
    model: str
    token: str | None
    server: Proc | None = None  # the process under test (CPU and RSS are read from its tree)


def request_body(model: str, stream: bool, direct: bool, chunks: int, delay_ms: float) -> dict[str, Any]:
    content = "hi" if (chunks == 20 and not delay_ms) else f"chunks={chunks} delay_ms={delay_ms:g}"
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
        if direct:  # the mock then sends the same usage chunk the gateway asks for
            body["stream_options"] = {"include_usage": True}
    return body


def run_load(
    target: Target, body: str, stream: bool, concurrency: int, duration: float
) -> loadgen.LoadResult:
    if stream or not loadgen.wrk_available():
        return loadgen.run_stream_client(target.url, body, target.token, concurrency, duration, MOCK_CORE)
    return loadgen.run_wrk(target.url, body, target.token, concurrency, duration, MOCK_CORE)


def measure(
    target: Target, stream: bool, concurrency: int, args: argparse.Namespace, mock: Proc
) -> dict[str, Any]:
    body = json.dumps(request_body(target.model, stream, target.name == "direct", args.chunks, args.delay_ms))
    # Warm-up with the Python client (fractional seconds), then settle.
    warm = loadgen.run_stream_client(target.url, body, target.token, concurrency, args.warmup, MOCK_CORE)
    time.sleep(SETTLE_S)
    server = target.server
    t0 = time.perf_counter()
    sys0, mock0 = procstat.system_sample(), procstat.sample(mock.pid)
    srv0 = procstat.sample(server.pid) if server else None
    result = run_load(target, body, stream, concurrency, args.duration)
    time.sleep(SETTLE_S)
    sys1, mock1 = procstat.system_sample(), procstat.sample(mock.pid)
    srv1 = procstat.sample(server.pid) if server else None
    window = time.perf_counter() - t0

    wall = result.wall_s or 1.0
    mock_cpu = procstat.cpu_delta(mock0, mock1)
    server_cpu = procstat.cpu_delta(srv0, srv1) if srv0 and srv1 else 0.0
    other = sys1.busy_s - sys0.busy_s - mock_cpu - server_cpu - result.client_cpu_s
    row: dict[str, Any] = {
        "target": target.name,
        "mode": "stream" if stream else "non-stream",
        "concurrency": concurrency,
        "requests": result.requests,
        "errors": result.errors,
        "error_sample": result.error_sample,
        "wall_s": result.wall_s,
        "rps": result.rps,
        "latency_ms": result.latency_ms,
        "ttft_ms": result.ttft_ms,
        "client": "stream_client.py" if stream or not loadgen.wrk_available() else "wrk",
        "client_cpu_util": result.client_cpu_util,
        "mock_cpu_util": mock_cpu / wall,
        "other_cpu_util": max(other, 0.0) / window,
        "steal_util": (sys1.steal_s - sys0.steal_s) / window,
        "warmup_requests": warm.requests + warm.errors,
        **result.extra,
    }
    if srv0 and srv1:
        row |= {
            "server_cpu_s": server_cpu,
            "server_cpu_us_per_req": server_cpu / result.requests * 1e6 if result.requests else None,
            "server_cpu_util": server_cpu / wall,
            "server_rss_mb_before": srv0.total_rss / 2**20,
            "server_rss_mb_after": srv1.total_rss / 2**20,
            "server_pids": len(srv1.rss),
        }
    return row


def wait_quiet(limit_s: float, busy_max: float = QUIET_BUSY) -> float:
    """Wait up to ``limit_s`` for the machine to idle; returns the last busy reading (in cores)."""
    deadline = time.monotonic() + limit_s
    busy = procstat.machine_busy(1.0)
    while busy > busy_max and time.monotonic() < deadline:
        busy = procstat.machine_busy(1.0)
    return busy


def measure_quietly(
    target: Target, stream: bool, concurrency: int, args: argparse.Namespace, mock: Proc
) -> dict[str, Any]:
    """measure(), again (up to --retries times) if other programs were busy; keeps the quietest."""
    row = measure(target, stream, concurrency, args, mock)
    for attempt in range(args.retries):
        if row["other_cpu_util"] <= OTHER_CPU_WARN:
            break
        print(f"  other programs used {row['other_cpu_util']:.0%} of a core: retry {attempt + 1}", flush=True)
        wait_quiet(RETRY_WAIT_S)
        again = measure(target, stream, concurrency, args, mock)
        row = min(row, again, key=lambda r: r["other_cpu_util"])
    return row


def add_deltas(rows: list[dict[str, Any]]) -> None:
    """Added latency = gateway (or floor) minus direct, for the same mode and concurrency."""
    direct = {(r["mode"], r["concurrency"]): r for r in rows if r["target"] == "direct"}
    for r in rows:
        base = direct.get((r["mode"], r["concurrency"]))
        if r["target"] == "direct" or base is None:
            continue
        r["added_p50_ms"] = r["latency_ms"]["p50"] - base["latency_ms"]["p50"]
        r["added_p99_ms"] = r["latency_ms"]["p99"] - base["latency_ms"]["p99"]
        if r.get("ttft_ms") and base.get("ttft_ms"):
            r["added_ttft_p50_ms"] = r["ttft_ms"]["p50"] - base["ttft_ms"]["p50"]


def describe(row: dict[str, Any]) -> str:
    lat = row["latency_ms"]
    text = (
        f"{row['target']:>7} {row['mode']:<10} c={row['concurrency']:<3} {row['rps']:>9,.0f} rps  "
        f"p50 {lat['p50']:.3f} ms  p99 {lat['p99']:.3f} ms  client CPU {row['client_cpu_util']:.0%}  "
        f"mock CPU {row['mock_cpu_util']:.0%}"
    )
    if row.get("server_cpu_us_per_req") is not None:
        text += f"  server {row['server_cpu_us_per_req']:.0f} us/req ({row['server_cpu_util']:.0%})"
    if row["other_cpu_util"] > OTHER_CPU_WARN:
        text += f"  (other CPU {row['other_cpu_util']:.0%}!)"
    if row["errors"]:
        text += f"  ERRORS {row['errors']}: {row['error_sample'][:200]}"
    return text


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
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def count_log_rows(db: Path) -> int | str:
    """Rows the gateway's sqlite sink wrote (read after the gateway has stopped and flushed)."""
    if not db.exists():
        return "no database file"
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT count(*) FROM request_logs").fetchone()[0])
    except sqlite3.Error as exc:
        return f"unreadable: {exc}"


def results_stem(args: argparse.Namespace) -> str:
    """'latest' for the standard suite; other shapes get their own files and leave README.md alone."""
    if args.direct_only:
        return "direct-only"
    parts = []
    if args.chunks != 20:
        parts.append(f"chunks{args.chunks}")
    if args.delay_ms:
        parts.append(f"paced{args.delay_ms:g}ms")
    if getattr(args, "pipeline", "auth") != "auth":
        parts.append(f"pipeline-{args.pipeline}")
    return "latest-" + "-".join(parts) if parts else "latest"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs: whole suite under a minute")
    p.add_argument("--direct-only", action="store_true", help="measure the mock alone, no gateway")
    p.add_argument(
        "--floor", action="store_true", help="also measure floor_app.py (bare Starlette + aiohttp proxy)"
    )
    p.add_argument("--duration", type=float, help="measured seconds per scenario (default 10, quick 2)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per scenario (default 1, quick 0.5)")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated list (default 1,16,64)")
    p.add_argument("--modes", default="non-stream,stream", help="comma-separated subset of non-stream,stream")
    p.add_argument("--chunks", type=int, default=20, help="content chunks per stream (default 20)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="mock delay between stream chunks")
    p.add_argument(
        "--retries", type=int, default=1, help="re-runs of a scenario disturbed by other programs (default 1)"
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        help="seconds to wait at start for an idle machine (default 30)",
    )
    p.add_argument("--pipeline", choices=sorted(PIPELINES), default="auth",
                   help="gateway pipeline: auth (minimal, the default here), default (the gateway's default: auth, limits, "
                        "cache, routing, credentials, fallback), classic (without limits and cache), limits (two "
                        "policies), cache-hit (every request answered from the cache), otel (the default, "
                        "every request traced)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--no-readme", action="store_true", help="do not refresh the table in README.md")
    args = p.parse_args(argv)
    args.duration = args.duration or (2.0 if args.quick else 10.0)
    args.warmup = args.warmup or (0.5 if args.quick else 1.0)
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    modes = {m.strip() for m in args.modes.split(",") if m.strip()}
    if not modes or not modes <= {"non-stream", "stream"}:
        p.error("--modes takes non-stream, stream or both")
    args.streams = [stream for stream in (False, True) if ("stream" if stream else "non-stream") in modes]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not loadgen.wrk_available():
        print(
            "wrk not found (apt-get install -y wrk): non-stream runs use stream_client.py instead",
            file=sys.stderr,
        )
    busy = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else procstat.machine_busy(0.5)
    if busy > QUIET_BUSY:
        print(f"warning: the machine is busy ({busy:.0%} of a core used by other programs)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="llmrelay-bench-"))
    token = "sk-bench-" + secrets.token_hex(16)
    procs: list[Proc] = []
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results: dict[str, Any] = {"scenarios": []}
    try:
        mock_port = free_port()
        mock_cmd = [sys.executable, str(HERE / "mock_upstream.py"), "--port", str(mock_port)]
        mock = start("mock", mock_cmd, tmp, MOCK_CORE)
        procs.append(mock)
        wait_http(mock, f"http://127.0.0.1:{mock_port}/health", 10)
        direct = Target("direct", f"http://127.0.0.1:{mock_port}/v1/chat/completions", "gpt-4o-mini", None)
        targets = [direct]
        gateway: Proc | None = None
        if args.floor:
            floor, floor_base = start_floor(mock_port, tmp)
            procs.append(floor)
            targets.append(Target("floor", floor_base + "/api/chat/completions", "bench-model", None, floor))
        if not args.direct_only:
            gateway, base = start_gateway(mock_port, token, tmp, args.pipeline)
            procs.append(gateway)
            targets.append(Target("gateway", base + "/api/chat/completions", "bench-model", token, gateway))
            print(f"gateway up: pid {gateway.pid} on {base}")
            results["gateway_rss_mb"] = {"startup": procstat.sample(gateway.pid).total_rss / 2**20}
        for t in targets:
            for stream in (False, True):
                body = request_body(t.model, stream, t.name == "direct", args.chunks, args.delay_ms)
                smoke_check(t.url, body, t.token, stream)

        for stream in args.streams:
            for concurrency in args.levels:
                for t in targets:
                    row = measure_quietly(t, stream, concurrency, args, mock)
                    print(describe(row), flush=True)
                    results["scenarios"].append(row)
        add_deltas(results["scenarios"])
        if gateway is not None:
            results["gateway_rss_mb"]["end"] = procstat.sample(gateway.pid).total_rss / 2**20
            results["targets"] = report.check_targets(results["scenarios"])
            if gateway.popen.poll() is not None:
                raise BenchError(f"gateway died during the run:\n{gateway.stderr_tail()}")
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}\n(config and process logs kept in {tmp})", file=sys.stderr)
        return 2
    finally:
        for proc in reversed(procs):
            proc.stop()

    if not args.direct_only:
        rows = count_log_rows(tmp / "logs.db")
        sent = sum(
            r["requests"] + r["errors"] + r["warmup_requests"]
            for r in results["scenarios"]
            if r["target"] == "gateway"
        )
        sent += 2  # the smoke checks
        results["gateway_log"] = {"sqlite_rows": rows, "requests_sent": sent}
        if not isinstance(rows, int) or rows < sent:
            print(f"warning: the gateway logged {rows} rows for {sent} requests sent", file=sys.stderr)

    results["meta"] = {
        "started": started,
        "command": " ".join(["benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "gateway": "not run (--direct-only)" if args.direct_only
        else f"llmrelay serve --workers 1 (granian), pipeline {PIPELINES[args.pipeline]}",
        "commit": git_commit(),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "chunks": args.chunks,
        "delay_ms": args.delay_ms,
        "gateway_core": GATEWAY_CORE,
        "mock_core": MOCK_CORE,
        "nonstream_client": "wrk -t1" if loadgen.wrk_available() else "stream_client.py",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(args)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    report.write_markdown(args.out / f"{stem}.md", results)
    print("\n" + report.render(results))
    if not args.no_readme and stem == "latest" and report.update_readme(HERE / "README.md", results):
        print("README.md results block updated")
    print(f"wrote {args.out / (stem + '.md')} and {args.out / (stem + '.json')}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
