"""Profile the gateway's worker under load: py-spy samples it while wrk drives non-stream requests
(or the stream client drives streams), and the flame graph and the top functions are written.

    .venv/bin/pip install py-spy            # once; a benchmark tool, never a project dependency
    .venv/bin/python benchmarks/profile.py --pipeline default --concurrency 16 --duration 20

Writes results/profile-<pipeline>-<mode>.txt (collapsed stacks) and prints the functions that take the
most samples (own time and with callees). It uses run.py's mock, gateway configs and pinning;
``--pipeline full`` is the suite's full pipeline (limits, cache and state on Redis). Every request
body is unique, as in the suite's full scenario, so with the cache on each request is a miss.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
import run  # noqa: E402
import scenarios  # noqa: E402


def worker_pid(parent: int) -> int:
    """granian's worker: the child of the gateway's main process (the main process itself with none)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return int(children[0]) if children else parent


def top_functions(raw: Path, limit: int) -> None:
    """The py-spy raw (collapsed stacks) file as two top lists: own samples and inclusive samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f"\n{total} samples. Own time:")
    for frame, n in own.most_common(limit):
        print(f"{100 * n / total:5.1f}%  {frame}")
    print("\nWith callees:")
    for frame, n in inclusive.most_common(limit):
        print(f"{100 * n / total:5.1f}%  {frame}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", choices=sorted(run.PIPELINES), default="default")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--stream", action="store_true", help="profile 20-chunk streams instead of non-stream requests")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--native", action="store_true", help="native frames too (granian, uvloop, sqlite, ...)")
    args = p.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    mode = "stream" if args.stream else "non-stream"
    out = HERE / "results" / f"profile-{args.pipeline}-{mode}"
    with tempfile.TemporaryDirectory(prefix="llmrelay-profile-") as tmp_name:
        tmp = Path(tmp_name)
        mock_port = run.free_port()
        mock = run.start("mock", [sys.executable, str(HERE / "mock_upstream.py"), "--port", str(mock_port)], tmp,
                         run.MOCK_CORE)
        gateway = None
        try:
            run.wait_http(mock, f"http://127.0.0.1:{mock_port}/health", 10)
            token = "sk-bench-profile"
            gateway, base = run.start_gateway(mock_port, token, tmp, args.pipeline)
            url = base + "/api/chat/completions"
            mark = scenarios.UNIQUE_MARK
            shape = scenarios.Shape(args.stream)
            body = json.dumps(scenarios.chat_body(scenarios.MODEL, shape, f"{secrets.token_hex(4)}-{mark}"))
            loadgen.run_stream_client(url, body, token, args.concurrency, 2.0, run.MOCK_CORE, unique=mark)  # warm-up
            spy = subprocess.Popen([py_spy, "record", "--pid", str(worker_pid(gateway.pid)), "--rate", str(args.rate),
                                    "--duration", str(int(args.duration)), "--format", "raw",
                                    "--output", str(out.with_suffix(".txt")), "--nonblocking", *(["--native"] if args.native else [])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            if args.stream:
                loadgen.run_stream_client(url, body, token, args.concurrency, args.duration, run.MOCK_CORE,
                                          unique=mark)
            else:
                loadgen.run_wrk(url, body, token, args.concurrency, args.duration, run.MOCK_CORE, unique=mark)
            spy.wait(timeout=args.duration + 30)
        finally:
            if gateway is not None:
                gateway.stop()
            mock.stop()
    top_functions(out.with_suffix(".txt"), args.top)
    print(f"\ncollapsed stacks: {out.with_suffix('.txt')} (flamegraph.pl or speedscope read them)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
