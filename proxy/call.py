"""The Call (one client request as it moves through the stages) and the Reply that comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from random import getrandbits as _random_bits
from typing import Any

import msgspec

from proxy.params import GatewayParams


class Prices(msgspec.Struct, frozen=True):
    """USD per 1M tokens.

    Usage counts cache reads (`cached_tokens`) and cache writes (`cache_creation_tokens`) inside
    `prompt_tokens` (OpenAI reports cache hits that way; the Anthropic, Bedrock and Gemini adapters
    add them in), so the uncached part is what is left and no token is billed twice.
    """

    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None  # cache reads; `input` when absent
    cache_write: float | None = None  # cache creation (e.g. Anthropic's 5-minute writes); `input` when absent

    def cost(self, usage: Usage) -> float:
        cached = usage.cached_tokens
        written = usage.cache_creation_tokens
        cached_price = self.input if self.cached_input is None else self.cached_input
        write_price = self.input if self.cache_write is None else self.cache_write
        uncached = max(usage.prompt_tokens - cached - written, 0)
        return (
            uncached * self.input + cached * cached_price + written * write_price + usage.completion_tokens * self.output
        ) / 1e6


class Target(msgspec.Struct, kw_only=True, frozen=True):
    """Where one attempt goes: a provider, an upstream model and the credential to use.

    Targets are shared between requests: derive a changed one with msgspec.structs.replace.
    """

    provider: str  # provider id, e.g. "openai"
    protocol: str  # wire protocol module, e.g. "openai" or "demo"
    model: str  # model name the upstream expects
    base_url: str = ""
    api_key: str | None = None  # secret: never logged, never put in an error
    deployment: str | None = None  # name of the credential/deployment that serves
    custom_credential: bool = False
    prices: Prices | None = None
    timeout: float | None = None  # seconds; None: the provider's own
    extra_headers: dict[str, str] | None = None
    requested: str = ""  # the model name this target was resolved from (credential_override's key)
    credentials: dict[str, Any] | None = None  # a load-balance entry's credentials, for the credentials stage
    group_id: str | None = None  # the load_balance_group that chose it
    context_window: int | None = None  # tokens the model takes, when known
    egress: str | None = None  # base_url is a tenant's (the field it came from): checked by proxy/egress.py

    @property
    def deployment_key(self) -> str:
        """Identifies the deployment for cooldowns: provider id and deployment name."""
        return f"{self.provider}/{self.deployment or self.provider}"


class Attempt(msgspec.Struct, kw_only=True):
    """One try of one Target, for the log's attempt list (never a secret)."""

    model: str
    provider: str
    deployment: str | None
    status: int
    error: str | None = None
    latency: float = 0.0  # seconds
    started_at: float = 0.0  # unix seconds when this attempt began


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the provider's prompt cache
    cache_creation_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: Any) -> Usage:
        """From an OpenAI `usage` object, with the cache counters of spec 2.1.2 where present."""
        if not isinstance(usage, dict):
            return cls()
        details = usage.get("prompt_tokens_details")
        details = details if isinstance(details, dict) else {}
        return cls(
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=_int(usage.get("completion_tokens")),
            cached_tokens=_int(details.get("cached_tokens") or usage.get("cache_read_input_tokens")),
            cache_creation_tokens=_int(details.get("cache_creation_tokens") or usage.get("cache_creation_input_tokens")),
        )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


class KeyInfo(msgspec.Struct, frozen=True):
    """Who called: set by the auth stage."""

    name: str
    environment: str = "production"  # test | production


def new_id() -> str:
    """32 hex digits: unix time in microseconds (56 bits), then 72 random bits. Ids made later
    sort later, so the log tables' unique_id indexes grow at one end instead of at random
    places (an insert costs SQLite about a quarter less). The random bits come from `random`, not
    os.urandom: a log id is no secret, and this saves a system call per request (the module
    reseeds itself in every forked worker)."""
    return f"{time.time_ns() // 1000:014x}{_random_bits(72):018x}"


class Call:
    """One client request. Stages read and write it; the core logs it when it finishes."""

    __slots__ = (
        "id",
        "request_id",
        "endpoint",
        "path",
        "query",
        "client_format",
        "body",
        "params",
        "headers",
        "client_ip",
        "model",
        "stream",
        "client_wants_usage",
        "started",
        "started_at",
        "dispatched",
        "key",
        "target",
        "plan",
        "usage",
        "cost",
        "ttft",
        "upstream_time",
        "routing_time",
        "status_code",
        "error",
        "response_model",
        "completion",
        "finish_hooks",
        "attempts",
        "warnings",
        "cache_hit",
        "omit_log",
        "finished",
        "gates",
        "state",
    )

    def __init__(
        self,
        *,
        endpoint: str,
        path: str,
        body: dict[str, Any],
        params: GatewayParams,
        headers: Mapping[str, str],
        client_ip: str | None = None,
        client_format: str = "openai",
        query: str = "",
    ) -> None:
        self.id = new_id()  # unique_id of the log, sent back as x-respan-log-id
        self.request_id = new_id()  # x-respan-gateway-request-id
        self.endpoint = endpoint
        self.path = path
        self.query = query  # the URL's query string, undecoded
        self.client_format = client_format
        self.body = body  # provider params only: gateway params are already split off
        self.params = params
        self.headers = headers  # the client's request headers: lower-case names (read-only)
        self.client_ip = client_ip
        self.model: str = body.get("model") or ""
        self.stream: bool = body.get("stream") is True
        opts = body.get("stream_options")
        self.client_wants_usage: bool = isinstance(opts, dict) and opts.get("include_usage") is True
        self.started = time.perf_counter()
        self.started_at = time.time()
        self.dispatched = 0.0  # perf_counter when the first upstream attempt began (0: never)
        self.key: KeyInfo | None = None
        self.target: Target | None = None  # set by routing (or by dispatch's default resolution)
        self.plan: list[Target] = []  # ordered candidates, for stages that walk them
        self.usage = Usage()
        self.cost: float = 0.0
        self.ttft: float | None = None  # seconds from start to the first content chunk
        self.upstream_time: float = 0.0  # seconds spent waiting on providers
        self.routing_time: float = 0.0
        self.status_code: int = 0
        self.error: str | None = None
        self.response_model: str | None = None  # model the upstream says served
        self.completion: Any = None  # assistant message(s) for the log
        self.finish_hooks: list[Callable[[Call], None]] = []
        self.attempts: list[Attempt] = []  # every try, when a stage walks the plan
        self.warnings: list[str] = []  # go to the log's `warnings`
        self.cache_hit = False  # answered from the response cache (the log's cache_hit)
        self.omit_log = False  # finish writes no log record (a cache hit with cache_options.omit_log)
        self.finished = False  # Gateway.finish ran: accounted, logged, measured
        self.gates: list[asyncio.Future[Any]] = []  # checks still under way (see hold)
        self.state: dict[str, Any] = {}  # free-form scratch space for stages

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def hold(self, gate: asyncio.Future[Any]) -> None:
        """A check still under way that must pass before anything answers the request (the limits
        stage's reservation on Redis). The stages after it go on meanwhile, so that their own I/O
        (the cache's lookup) goes out in the same write and comes back in the same read: one round
        trip instead of two. The gate's exception is the refusal."""
        self.gates.append(gate)

    async def ready(self) -> None:
        """Every held check has passed; raises the first refusal. Awaited by whatever is about to
        answer: the first upstream attempt, a cache hit. Costs nothing once the checks are done."""
        for gate in self.gates:
            if not gate.done():
                await gate
            elif gate.exception() is not None:
                raise gate.exception()  # type: ignore[misc]
        self.gates.clear()  # passed: later callers skip the await (a refusal stays and is raised again)


class Reply:
    """What comes back through the pipeline: bytes, or an async byte stream (already in client format)."""

    __slots__ = ("status", "headers", "body", "stream", "media_type")

    def __init__(
        self,
        status: int = 200,
        *,
        body: bytes = b"",
        stream: AsyncIterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
        media_type: str = "application/json",
    ) -> None:
        self.status = status
        self.body = body
        self.stream = stream
        self.headers = headers if headers is not None else {}
        self.media_type = media_type
