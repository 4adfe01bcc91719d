"""The mixed soak: a million requests of every kind through the full pipeline, watching for leaks.

    .venv/bin/python benchmarks/soak_mixed.py                  # 1,000,000 requests: about 10 minutes
    .venv/bin/python benchmarks/soak_mixed.py --requests 50000 # a short check

One gateway worker (the `full` pipeline of run.py: limits, cache and cooldowns on Redis, logs to
SQLite) takes wrk_mixed.lua's mix at concurrency 64: cache misses, cache hits, 20-chunk streams,
unknown models (404), a model whose provider refuses connections (502, its deployment cooling
down) and invalid bodies (400). After each slice it reads, for the gateway's processes: RSS, open
file descriptors and sockets, and from /metrics every `llmrelay_internal_entries` map, the log
queue and the log counters. At the end every answered request must have its log row.

Writes results/soak-mixed.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procstat  # noqa: E402
import scenarios  # noqa: E402
import servers  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONCURRENCY = 64
DOWN_MODEL = "bench-down"


def config_text(mock_port: int, key_hash: str, tmp: Path) -> str:
    config = yaml.safe_load(scenarios.gateway_config(mock_port, key_hash, tmp, "full"))
    config["providers"].append({"id": "down", "protocol": "openai", "api_key": "sk-down",
                                "base_url": f"http://127.0.0.1:{servers.free_port()}/v1"})  # nothing listens
    config["models"].append({"name": DOWN_MODEL, "provider": "down", "model": "gone"})
    return yaml.safe_dump(config)


def descriptors(pids: list[int]) -> tuple[int, int]:
    """(open file descriptors, of which sockets) over `pids`."""
    fds = sockets = 0
    for pid in pids:
        try:
            entries = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for entry in entries:
            fds += 1
            try:
                if os.readlink(f"/proc/{pid}/fd/{entry}").startswith("socket:"):
                    sockets += 1
            except OSError:
                pass
    return fds, sockets


def scrape(base: str) -> dict[str, float]:
    _, body = servers.http_get(base + "/metrics", timeout=5)
    wanted = ("llmrelay_internal_entries", "llmrelay_log_queue_depth", "llmrelay_log_records_written_total",
              "llmrelay_log_records_spilled_total", "llmrelay_in_flight_requests")
    found: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            found[name.replace("llmrelay_internal_entries", "entries")] = float(value)
    return found


def run_wrk(base: str, token: str, seconds: int, seed: str) -> dict[str, Any]:
    env = dict(os.environ, WRK_AUTH=token, WRK_MODEL=scenarios.MODEL, WRK_DOWN_MODEL=DOWN_MODEL, WRK_SEED=seed)
    cmd = servers.pinned(["wrk", "-t1", f"-c{CONCURRENCY}", f"-d{seconds}s", "--timeout", "10s",
                          "-s", str(HERE / "wrk_mixed.lua"), base], servers.MOCK_CORE)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise servers.BenchError(f"wrk printed no summary:\n{out}")
    return json.loads(line.removeprefix("WRK_JSON "))


def log_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM request_logs").fetchone()[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--slices", type=int, default=10)
    args = p.parse_args()
    procstat.raise_open_files_limit()
    servers.flush_redis()
    tmp = Path(tempfile.mkdtemp(prefix="llmrelay-soak-"))
    token = "sk-soak-" + secrets.token_hex(8)
    mock, mock_port = servers.start_mock(tmp)
    gateway = None
    slices: list[dict[str, Any]] = []
    try:
        import hashlib

        config = tmp / "gateway.yaml"
        config.write_text(config_text(mock_port, "sha256:" + hashlib.sha256(token.encode()).hexdigest(), tmp))
        port = servers.free_port()
        gateway, base = servers.serve("gateway", [str(servers.llmrelay_bin()), "serve", "--config", str(config),
                                                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                      port, tmp)
        time.sleep(1.0)
        pids = procstat.descendants(gateway.pid)
        fds, sockets = descriptors(pids)
        start = {"rss_mb": procstat.sample(gateway.pid).total_rss / 2**20, "fds": fds, "sockets": sockets}
        print(f"idle: {start}", flush=True)
        done, rate, answered, statuses = 0, 0.0, 0, {}
        per_slice = args.requests / args.slices
        while done < args.requests:
            want = min(args.requests - done, per_slice)
            seconds = max(1, round(want / rate)) if rate else 5
            result = run_wrk(base, token, seconds, secrets.token_hex(4))
            time.sleep(1.5)  # the log writer catches up, idle connections settle
            errors = sum(result["errors"].values())
            done += result["requests"]
            rate = result["requests"] / (result["duration_us"] / 1e6)
            for status, n in result["statuses"].items():
                statuses[status] = statuses.get(status, 0) + n
                answered += n
            pids = procstat.descendants(gateway.pid)
            fds, sockets = descriptors(pids)
            row = {"requests_done": done, "rps": round(rate), "p99_ms": result["p99_ms"], "errors": errors,
                   "statuses": result["statuses"], "rss_mb": round(procstat.sample(gateway.pid).total_rss / 2**20, 1),
                   "fds": fds, "sockets": sockets, "metrics": scrape(base)}
            slices.append(row)
            print(json.dumps(row), flush=True)
        time.sleep(3.0)
        rows = log_rows(tmp / "logs.db")
        report = {"requests": done, "answered": answered, "statuses": statuses, "log_rows": rows,
                  "idle": start, "slices": slices, "concurrency": CONCURRENCY,
                  "machine": f"{os.cpu_count()} cores", "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        write(report)
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        mock.stop()


def write(report: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak-mixed.json").write_text(json.dumps(report, indent=1))
    slices = report["slices"]
    maps = sorted({k for s in slices for k in s["metrics"] if k.startswith("entries")})
    lines = [f"# Mixed soak: {report['requests']:,} requests ({report['when']}, {report['machine']}, "
             f"concurrency {report['concurrency']})", "",
             f"Answers by status: {json.dumps(report['statuses'])}; log rows: {report['log_rows']:,} "
             f"for {report['answered']:,} answers wrk counted (at each slice's deadline wrk drops up to "
             f"{report['concurrency']} requests in flight, which the gateway still answers and logs: so rows "
             f"may exceed answers by at most {report['concurrency']} a slice, never fall short).", "",
             "| after | rps | p99 ms | transport errors | RSS MB | fds | sockets |",
             "|---:|---:|---:|---:|---:|---:|---:|",
             f"| idle | | | | {report['idle']['rss_mb']:.1f} | {report['idle']['fds']} | {report['idle']['sockets']} |"]
    lines += [f"| {s['requests_done']:,} | {s['rps']:,} | {s['p99_ms']:.1f} | {s['errors']} | {s['rss_mb']:.1f} | "
              f"{s['fds']} | {s['sockets']} |" for s in slices]
    lines += ["", "In-memory maps (`llmrelay_internal_entries`) after each slice:", "",
              "| map | " + " | ".join(f"{s['requests_done'] // 1000}k" for s in slices) + " |",
              "|---|" + "---:|" * len(slices)]
    for m in maps:
        name = m.removeprefix('entries{map="').removesuffix('"}')
        lines.append(f"| {name} | " + " | ".join(f"{s['metrics'].get(m, 0):g}" for s in slices) + " |")
    (RESULTS / "soak-mixed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
