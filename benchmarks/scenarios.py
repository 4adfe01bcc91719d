"""What the benchmark suite measures: gateway configs, request bodies and the scenario list.

run.py runs these; report.py renders the results. See benchmarks/README.md for the figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL = "bench-model"  # the gateway's name for the mock's OpenAI model
UPSTREAM_MODEL = "gpt-4o-mini"
CLAUDE = "bench-claude"  # the gateway's name for the mock's Anthropic model
UPSTREAM_CLAUDE = "claude-3-5-haiku-latest"
REDIS_URL = "redis://127.0.0.1:6379/15"  # flushed at the start of a run
CACHE_TTL_S = 300  # bounds Redis during the soak (about 3,000 stores a second)
UNIQUE_MARK = "@@UNIQ@@"  # the load clients put a 10-digit counter here (see wrk_post.lua, stream_client.py)

# A realistic stream: 100 tokens a second, one chunk per token.
PACED_DELAY_MS = 10.0
PACED_CHUNKS = (20, 200)
# 1,000 streams held open: 50 chunks 100 ms apart (about 5 s each) keeps the event rate
# (10,000 a second) within what one gateway worker relays, so the test is of open streams, not throughput.
HOLD_STREAMS = 1000
HOLD_CHUNKS = 50
HOLD_DELAY_MS = 100.0


@dataclass(frozen=True)
class Pipeline:
    stages: str  # YAML flow list for the config's `pipeline:`
    redis: bool  # state (cache, counters, cooldowns) on Redis instead of in memory
    about: str


_POLICIES = (
    "{policies: ["
    "{name: bench-rpm, scope: api_key, metric: requests, window: minute, block_threshold: 1.0e+12}, "
    "{name: bench-tpd, scope: api_key, metric: tokens, window: day, block_threshold: 1.0e+15}, "
    "{name: bench-cpm, scope: api_key, metric: cost, window: month, block_threshold: 1.0e+12}]}"
)
_CACHE_ON = f"{{defaults: {{cache_enabled: true, cache_ttl: {CACHE_TTL_S}}}}}"
_FULL_STAGES = (
    f"[auth, prompts, {{name: limits, options: {_POLICIES}}}, {{name: cache, options: {_CACHE_ON}}}, "
    "routing, credentials, fallback]"
)

PIPELINES: dict[str, Pipeline] = {
    "minimal": Pipeline("[auth]", False, "auth only"),
    "full": Pipeline(
        _FULL_STAGES,
        True,
        "the default stages; limits: 3 policies on the key (requests/minute, tokens/day, cost/month, never "
        "reached); cache on for every request; cache, counters and cooldowns on Redis",
    ),
    # the gateway's default as shipped (no policy, cache off, state in memory): for comparing with older rows
    "default": Pipeline("[auth, prompts, limits, cache, routing, credentials, fallback]", False,
                        "the default stages as shipped: no policy, cache off, state in memory"),
    # the default with every request traced: spans go to the mock, which accepts and drops them
    "otel": Pipeline(
        "[auth, {name: otel, options: {endpoint: 'http://127.0.0.1:{mock_port}/v1/traces', schedule_delay_ms: 200}}, "
        "prompts, limits, cache, routing, credentials, fallback]",
        False,
        "the shipped default plus the otel stage, every request traced",
    ),
}


def gateway_config(mock_port: int, key_hash: str, tmp: Path, pipeline: str = "full", workers: int = 1) -> str:
    """Both providers (OpenAI and Anthropic protocol, both the mock) are always configured: an unused
    model costs nothing per request, and one config serves every scenario family."""
    p = PIPELINES[pipeline]
    state = ""
    if p.redis:
        state = (
            f"state: {{cache: {{backend: redis, url: '{REDIS_URL}'}}, counters: {{backend: redis, url: '{REDIS_URL}'}}, "
            f"cooldowns: {{backend: redis, url: '{REDIS_URL}'}}}}\n"
        )
    return f"""\
server: {{host: 127.0.0.1, port: 0, workers: {workers}, scheduling: batch}}
providers:
  - {{id: mock, protocol: openai, base_url: 'http://127.0.0.1:{mock_port}/v1', api_key: sk-mock-upstream}}
  - {{id: anth, protocol: anthropic, base_url: 'http://127.0.0.1:{mock_port}', api_key: sk-ant-mock}}
models:
  - {{name: {MODEL}, provider: mock, model: {UPSTREAM_MODEL}, prices: {{input: 0.15, output: 0.6}}}}
  - {{name: {CLAUDE}, provider: anth, model: {UPSTREAM_CLAUDE}, prices: {{input: 0.8, output: 4.0}}}}
keys:
  - {{name: bench, key_hash: "{key_hash}", environment: test}}
pipeline: {p.stages.replace("{mock_port}", str(mock_port))}
{state}store: {{path: '{tmp / "admin.db"}'}}
auto_providers: false
logs:
  spool_dir: '{tmp / "spool"}'
  sinks: [{{type: sqlite, path: '{tmp / "logs.db"}'}}]
"""


# --------------------------------------------------------------------------- request bodies


@dataclass(frozen=True)
class Shape:
    """What one request asks for: a whole answer, or a stream of ``chunks`` events ``delay_ms`` apart."""

    stream: bool
    chunks: int = 20
    delay_ms: float = 0.0

    @property
    def mode(self) -> str:
        if not self.stream:
            return "non-stream"
        return "paced" if self.delay_ms else "stream"

    def text(self, tag: str = "") -> str:
        """The user message: the mock reads the stream shape from it; ``tag`` makes it unique."""
        text = f"chunks={self.chunks} delay_ms={self.delay_ms:g}"
        return f"{text} u={tag}" if tag else text


NON_STREAM = Shape(False)


def chat_body(model: str, shape: Shape, tag: str = "", include_usage: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": shape.text(tag)}]}
    if shape.stream:
        body["stream"] = True
        if include_usage:  # direct: the mock then sends the usage chunk the gateway asks for
            body["stream_options"] = {"include_usage": True}
    return body


def messages_body(model: str, shape: Shape, tag: str = "") -> dict[str, Any]:
    """Anthropic Messages format, what the gateway sends upstream for a translated request."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": shape.text(tag)}],
    }
    if shape.stream:
        body["stream"] = True
    return body


@dataclass(frozen=True)
class Endpoint:
    """Where a scenario sends its requests, and in which format."""

    name: str  # row label: direct, direct-anthropic, minimal, full, cache-hit, translation, floor, litellm, ...
    url: str
    model: str
    fmt: str = "openai"  # the body's format: "openai" (chat completions) or "anthropic" (messages)
    token: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    pid: int | None = None  # the server under test: CPU and RSS are read from its process tree
    unique: bool = False  # every request body distinct (each a cache miss and a store)
    direct: bool = False  # the mock itself (a baseline)
    baseline: str | None = None  # the direct endpoint that added latency is computed against
    events_extra: int | None = 1  # SSE events a stream has beyond its N content chunks; None: not checked
    metrics_url: str | None = None  # the gateway's /metrics, for cache hit counts

    def body(self, shape: Shape, tag: str = "") -> str:
        if self.fmt == "anthropic":
            data = messages_body(self.model, shape, tag)
        else:
            data = chat_body(self.model, shape, tag, include_usage=self.direct and shape.stream)
        return json.dumps(data)

    def events(self, shape: Shape) -> int | None:
        """The SSE event count every correct stream has (None: not checked)."""
        return None if self.events_extra is None else shape.chunks + self.events_extra

    @property
    def header_dict(self) -> dict[str, str]:
        return dict(self.headers)


# --------------------------------------------------------------------------- scenario families


@dataclass(frozen=True)
class Family:
    """A gateway scenario measured like the direct baseline: non-stream and unpaced 20-chunk streams."""

    name: str
    pipeline: str  # a PIPELINES key
    model: str
    fmt: str  # the client's format is always OpenAI; this is the direct baseline's: openai or anthropic
    unique: bool
    about: str


FAMILIES: dict[str, Family] = {
    "minimal": Family("minimal", "minimal", MODEL, "openai", False, "pipeline [auth]"),
    "full": Family("full", "full", MODEL, "openai", True,
                   "full default pipeline, every request a cache miss and a Redis store"),
    "cache-hit": Family("cache-hit", "full", MODEL, "openai", False,
                        "full default pipeline, one fixed body: every request after the first a cache hit"),
    "translation": Family("translation", "full", CLAUDE, "anthropic", True,
                          "full default pipeline, OpenAI client to the Anthropic Messages upstream (each a miss)"),
}

# Every scenario --scenarios accepts, in run order. `peers` runs only with --peers (or when named).
SCENARIOS = ("direct", "minimal", "full", "cache-hit", "translation", "paced", "hold", "soak", "scaling", "peers")
DEFAULT_SCENARIOS = SCENARIOS[:-1]
NON_STREAM_LEVELS = (1, 16, 64, 256)
STREAM_LEVELS = (1, 16, 64)
PEER_NON_STREAM_LEVELS = (1, 16, 64)
PEER_STREAM_LEVELS = (1, 16)
SCALING_CONCURRENCY = 64
SOAK_CONCURRENCY = 64
SOAK_REQUESTS = 1_000_000
