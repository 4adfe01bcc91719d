"""Peer gateways (LiteLLM proxy, Portkey gateway) served against the benchmark mock, for side-by-side runs.

    bash benchmarks/peers/install.sh              # once: installs both into benchmarks/.peers/ (git-ignored)
    .venv/bin/python benchmarks/peers.py --check  # starts the mock and each installed peer, one request of each kind

Neither peer is a project dependency: each lives in its own environment under benchmarks/.peers/
(see peers/install.sh for the pinned versions). ``start()`` writes a peer's config into a work directory,
starts it pinned to one core like run.py pins the gateway, waits until it answers and returns a
``PeerServer``: ``pid`` is the top process (CPU and RSS of its tree are read from /proc like the
gateway's), ``url``/``model``/``headers`` are what the load client sends, ``stop()`` ends the process group.

Each peer runs with the least work per request it offers, one process, no database, no outbound calls
(checked with strace: the only connect() calls go to the mock):

- litellm (1.108.0): ``env -u DATABASE_URL ... <venv>/bin/litellm --config <workdir>/litellm.yaml
  --host 127.0.0.1 --port <p> --num_workers 1`` under ``taskset -c <core>``: uvicorn in one process,
  uvloop + httptools (install.sh adds httptools; ``litellm[proxy]`` alone leaves uvicorn on h11), access
  log off through ``LITELLM_LOG=ERROR``. ``server="granian"`` adds ``--run_granian`` (a main process
  and one worker, like llmrelay; about the same CPU per request in a quick test, twice the RSS).
  Config (``litellm_config``): one model ``bench-model`` -> ``openai/gpt-4o-mini`` at the mock, a master
  key (checked per request like the gateway's key; no database, so no key table), no callbacks,
  ``disable_spend_logs``, ``disable_error_logs``, message logging off, no retries, no background health
  checks. ``LITELLM_LOCAL_MODEL_COST_MAP=True`` and the other ``LITELLM_LOCAL_*`` switches keep it off the
  internet (cost map, Anthropic beta headers, blog posts, policy templates, autorouter presets);
  ``LITELLM_MODE=PRODUCTION`` stops it reading a ``.env``; ``DATABASE_URL``/``REDIS_*`` are unset.
- portkey (@portkey-ai/gateway 1.15.2, @hono/node-server pinned to 1.14.1 by install.sh): ``env -u ...
  node <prefix>/node_modules/@portkey-ai/gateway/build/start-server.js --port=<p> --headless`` under
  taskset, ``NODE_ENV=production`` (no UI, no log-stream endpoint), ``TRUSTED_CUSTOM_HOSTS=127.0.0.1``.
  No provider config file: each request names the provider in headers (``x-portkey-provider: openai``,
  ``x-portkey-custom-host: <mock>/v1``; ``Authorization`` goes upstream as the provider's key).

Not equal work, either way:

- Portkey's open-source gateway checks no key of its own (the Authorization header is the upstream's
  key, passed through); llmrelay and LiteLLM check a key per request.
- Portkey sleeps 25 ms before relaying the first event of every stream (its stream handler does this on
  purpose; it cannot be configured): a stream through it takes at least 25 ms, so its stream latency and
  its stream RPS at low concurrency say nothing about its CPU cost; compare CPU per stream.
- Portkey runs a request-log middleware on every /v1/ request that cannot be switched off: for a
  non-stream answer it clones and parses the response JSON and serialises a log entry, even with no log
  client connected. It listens on all interfaces (no option binds it to 127.0.0.1 only).
- LiteLLM always runs about 18 ASGI middlewares (CORS, security headers, admission control, in-flight
  and billable-request counters, telemetry, gzip, ...), its auth and route checks, the Router, the
  OpenAI SDK client and the success-logging path with a response cost calculation; none of this can be
  switched off from config. Streams go through its CustomStreamWrapper chunk by chunk (it also moves
  ``finish_reason`` into a chunk of its own: 21 events before ``[DONE]`` where the mock sent 20).
- llmrelay (``run.py``) writes every request to a sqlite log sink; neither peer logs requests anywhere.
- Node has a JIT and libuv threads, uvicorn runs one Python thread (plus a thread pool LiteLLM uses for
  logging); each peer gets the single pinned core the gateway gets.

Importing this module from run.py: run.py is then ``__main__``; so that ``run.BenchError`` raised here is
the class run.py catches, this module registers ``__main__`` as ``run`` in that case instead of importing
a second copy of run.py.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if Path(getattr(sys.modules.get("__main__"), "__file__", "") or "").resolve() == HERE / "run.py":
    sys.modules.setdefault("run", sys.modules["__main__"])  # run.py imported us: share its module
import run  # noqa: E402

PEERS_DIR = HERE / ".peers"
LITELLM_VENV = PEERS_DIR / "litellm" / "venv"
LITELLM_BIN = LITELLM_VENV / "bin" / "litellm"
PORTKEY_PREFIX = PEERS_DIR / "portkey"
PORTKEY_SERVER = PORTKEY_PREFIX / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
NAMES = ("litellm", "portkey")
LITELLM_SERVERS = ("uvicorn", "granian")  # the first is the default (LiteLLM's own)
START_TIMEOUT = 90.0  # LiteLLM imports for 5-15 s on one pinned core
MOCK_MODEL = "gpt-4o-mini"
MOCK_KEY = "sk-mock-upstream"
MOCK_CHUNKS = 20  # content chunks per stream the mock sends by default
INSTALL_HINT = "bash benchmarks/peers/install.sh"

CAVEATS = {  # one line each for a report; the module docstring has the details
    "litellm": "no DB, master key checked; its middlewares, hooks and per-request cost calculation always run",
    "portkey": "no gateway key check (Authorization goes upstream); request-log middleware always runs; "
    "sleeps 25 ms before the first event of each stream",
}

# Environment variables that must not reach the peer (a database, Redis, or a .env would change what it does).
UNSET_ENV = ("DATABASE_URL", "DIRECT_URL", "REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD")

LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map from GitHub at start-up
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOG": "ERROR",  # also uvicorn's log level: no access log line per request
    "LITELLM_MODE": "PRODUCTION",  # no load_dotenv() from the working directory
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
    "NO_DOCS": "True",
    "NO_REDOC": "True",
    "DISABLE_ADMIN_UI": "True",
    "STORE_MODEL_IN_DB": "False",
}

PORTKEY_ENV = {
    "NODE_ENV": "production",
    "TRUSTED_CUSTOM_HOSTS": "127.0.0.1",  # the mock is the only custom host it may call
}


@dataclass
class PeerServer:
    """A running peer gateway: where to send requests, and its process for /proc readings."""

    name: str
    proc: run.Proc
    url: str  # full chat completions URL
    model: str  # the model name to send
    headers: dict[str, str] = field(default_factory=dict)  # extra request headers, Authorization included
    command: list[str] = field(default_factory=list)  # the command line, without taskset

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM the peer's process group, SIGKILL after 5 s."""
        self.proc.stop()

    def stderr_tail(self, limit: int = 4000) -> str:
        return self.proc.stderr_tail(limit)


def available() -> dict[str, bool]:
    """Which peers are installed under benchmarks/.peers/."""
    return {
        "litellm": LITELLM_BIN.is_file(),
        "portkey": PORTKEY_SERVER.is_file() and shutil.which("node") is not None,
    }


def version(name: str) -> str:
    """The installed version of a peer ("" when it is not installed)."""
    try:
        if name == "litellm":
            dist = next((LITELLM_VENV / "lib").glob("python3*/site-packages/litellm-*.dist-info"))
            return dist.name.removeprefix("litellm-").removesuffix(".dist-info")
        if name == "portkey":
            return str(json.loads((PORTKEY_SERVER.parent.parent / "package.json").read_text())["version"])
    except (OSError, StopIteration, ValueError, KeyError):
        pass
    return ""


def litellm_config(mock_port: int, master_key: str) -> str:
    return f"""\
model_list:
  - model_name: bench-model
    litellm_params:
      model: openai/{MOCK_MODEL}
      api_base: http://127.0.0.1:{mock_port}/v1
      api_key: {MOCK_KEY}
litellm_settings:
  callbacks: []
  success_callback: []
  failure_callback: []
  turn_off_message_logging: true
  json_logs: false
  set_verbose: false
  cache: false
  drop_params: true
  request_timeout: 600
router_settings:
  routing_strategy: simple-shuffle
  enable_pre_call_checks: false
  num_retries: 0
general_settings:
  master_key: {master_key}
  disable_spend_logs: true
  disable_error_logs: true
  disable_reset_budget: true
  background_health_checks: false
  store_model_in_db: false
  allow_requests_on_db_unavailable: true
"""


def command(name: str, port: int, workdir: Path, server: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line (without taskset) and the extra environment that serve peer ``name`` on ``port``."""
    if name == "litellm":
        server = server or LITELLM_SERVERS[0]
        if server not in LITELLM_SERVERS:
            raise ValueError(f"litellm server {server!r}: one of {', '.join(LITELLM_SERVERS)}")
        cmd = [str(LITELLM_BIN), "--config", str(workdir / "litellm.yaml"), "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--num_workers", "1"]
        return cmd + (["--run_granian"] if server == "granian" else []), LITELLM_ENV
    if server not in (None, "node"):
        raise ValueError(f"portkey server {server!r}: only node")
    cmd = [shutil.which("node") or "node", str(PORTKEY_SERVER), f"--port={port}", "--headless"]
    return cmd, PORTKEY_ENV


def start(name: str, mock_port: int, workdir: Path, core: int, server: str | None = None) -> PeerServer:
    """Write ``name``'s config into ``workdir``, start it pinned to ``core`` and wait until it answers.

    ``server``: for litellm the HTTP server, "uvicorn" (LiteLLM's default, one process) or "granian"
    (``--run_granian``: a main process and one worker, like llmrelay; the same CPU per request in a
    quick test); portkey has only "node".
    """
    if name not in NAMES:
        raise ValueError(f"unknown peer {name!r} (one of {', '.join(NAMES)})")
    if not available()[name]:
        raise run.BenchError(f"peer {name} is not installed: {INSTALL_HINT} {name}")
    workdir.mkdir(parents=True, exist_ok=True)
    port = run.free_port()
    base = f"http://127.0.0.1:{port}"
    if name == "litellm":
        key = "sk-bench-" + secrets.token_hex(16)
        (workdir / "litellm.yaml").write_text(litellm_config(mock_port, key))
        headers = {"Authorization": f"Bearer {key}"}
        url, model, health = base + "/v1/chat/completions", "bench-model", base + "/health/liveliness"
    else:
        headers = {
            "Authorization": f"Bearer {MOCK_KEY}",  # Portkey passes it upstream as the provider's key
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": f"http://127.0.0.1:{mock_port}/v1",
        }
        url, model, health = base + "/v1/chat/completions", MOCK_MODEL, base + "/"
    cmd, env = command(name, port, workdir, server)
    unset = [arg for var in UNSET_ENV for arg in ("-u", var)]
    # `env -u` execs the peer, so the pid taskset starts is the peer's own process.
    # under SCHED_BATCH like the gateway's workers and the floor (servers.batch_scheduled)
    proc = run.start(name, run.batch_scheduled(["env", *unset, *cmd]), workdir, core, env)
    try:
        run.wait_http(proc, health, START_TIMEOUT)
    except BaseException:
        proc.stop()
        raise
    return PeerServer(name, proc, url, model, headers, cmd)


# --------------------------------------------------------------------------- self-check


def post(url: str, body: dict[str, Any], headers: dict[str, str], timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def content_chunks(raw: bytes) -> int:
    """SSE events of a chat completion stream whose first choice's delta carries content."""
    count = 0
    for event in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in event.split(b"\n"):
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            try:
                choices = json.loads(line[5:])["choices"]
            except (ValueError, KeyError, TypeError):
                continue
            if choices and (choices[0].get("delta") or {}).get("content"):
                count += 1
    return count


def check_peer(peer: PeerServer) -> str:
    """One non-stream and one stream request through ``peer``; raises run.BenchError on failure."""
    messages = [{"role": "user", "content": "hi"}]
    status, raw = post(peer.url, {"model": peer.model, "messages": messages}, peer.headers)
    if status != 200:
        raise run.BenchError(f"{peer.name} non-stream: HTTP {status}: {raw[:500]!r}")
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        content = None
    if not content:
        raise run.BenchError(f"{peer.name} non-stream: no chat completion content: {raw[:500]!r}")
    status, raw = post(peer.url, {"model": peer.model, "messages": messages, "stream": True}, peer.headers)
    if status != 200:
        raise run.BenchError(f"{peer.name} stream: HTTP {status}: {raw[:500]!r}")
    if not raw.rstrip().endswith(b"data: [DONE]"):
        raise run.BenchError(f"{peer.name} stream did not end with 'data: [DONE]': {raw[-500:]!r}")
    chunks = content_chunks(raw)
    if chunks != MOCK_CHUNKS:
        raise run.BenchError(f"{peer.name} stream: {chunks} content chunks, the mock sent {MOCK_CHUNKS}")
    return f"non-stream 200 {content!r}; stream 200, {chunks} content chunks, [DONE]"


def check(litellm_server: str | None = None) -> int:
    """Start the mock and every installed peer, send one request of each kind through each."""
    installed = available()
    for name, ok in installed.items():
        print(f"{name}: {'installed ' + version(name) if ok else 'not installed (' + INSTALL_HINT + ')'}")
    if not any(installed.values()):
        print("no peer installed: nothing to check", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="llmrelay-peers-"))
    failed = False
    mock: run.Proc | None = None
    try:
        mock_port = run.free_port()
        mock = run.start("mock", [sys.executable, str(HERE / "mock_upstream.py"), "--port", str(mock_port)],
                         tmp, run.MOCK_CORE)
        run.wait_http(mock, f"http://127.0.0.1:{mock_port}/health", 10)
        for name in (n for n, ok in installed.items() if ok):
            t0 = time.perf_counter()
            peer: PeerServer | None = None
            try:
                server = litellm_server if name == "litellm" else None
                peer = start(name, mock_port, tmp / name, run.GATEWAY_CORE, server)
                up = time.perf_counter() - t0
                print(f"{name}: OK (up in {up:.1f} s, pid {peer.pid}) {check_peer(peer)}", flush=True)
            except run.BenchError as exc:
                failed = True
                tail = f"\n{peer.stderr_tail(2000)}" if peer else ""
                print(f"{name}: FAILED {exc}{tail}", file=sys.stderr, flush=True)
            finally:
                if peer is not None:
                    peer.stop()
    except run.BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        failed = True
    finally:
        if mock is not None:
            mock.stop()
    if failed:
        print(f"(configs and process logs kept in {tmp})", file=sys.stderr)
        return 1
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="start the mock and each installed peer, test one request")
    p.add_argument("--litellm-server", choices=LITELLM_SERVERS, help="litellm's HTTP server (default uvicorn)")
    args = p.parse_args(argv)
    if args.check:
        return check(args.litellm_server)
    print(json.dumps({name: version(name) if ok else None for name, ok in available().items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
