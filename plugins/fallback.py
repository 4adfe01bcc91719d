"""The `fallback` stage: the one retry loop of the gateway (spec 3.3, section 4 steps 9-10).

It walks `call.plan` (routing's ordered candidates, already expanded into deployments by the
credentials stage); with no plan it tries `call.target`, and with neither it calls `next` once.
For each candidate in order:

- a candidate in cooldown is skipped (no attempt) when a later candidate is not cooling; the
  last candidate is always tried, so the only deployment of a model is never cooled into a 503;
- the try: `call.target = candidate`, `next(call)`. Success is a status < 400 and, for a
  stream, a good first event: the stage peeks at the stream before returning it, so a stream
  that breaks, ends empty or opens with an SSE `error` event falls back before the client has
  seen a byte. A GatewayError of 502 (connection) or 504 (timeout) is a failure of the
  candidate; any other GatewayError goes to the client at once;
- connection errors, timeouts and broken streams always fall back; an upstream error reply (or
  in-stream error event) whose status is not in `fallback_statuses` (default 408, 409, 429,
  5xx) goes to the client unchanged at once. A 400 that says context_length_exceeded moves on to the next
  candidate only with `fallback_on_context_length: true` (never retried: the same prompt fails
  the same way);
- a 429 moves on to the next candidate at once; with none left it is retried after a back-off.
  Any other failure is retried on the same candidate up to `num_retries` times (unless it just
  went into cooldown and a later candidate is healthy), then the loop moves on;
- back-off: `retry_after * 2**n` seconds with +-25% jitter, or the reply's `retry-after-ms` /
  `Retry-After` (seconds or HTTP date); either way at most `max_retry_after`. No retry starts
  once `max_retry_time` seconds (from the first failure: retried tries and sleeps) would pass.

Every try is appended to `call.attempts` (the log lists them when there is more than one) and
counted in the metrics; each failure goes to the cooldowns, each success clears the failure
count. When every candidate fails, the client gets the last upstream error as the provider sent
it (or the last gateway error). A stream that breaks after its first byte is the relay's to end
(SSE error event); a finish hook then counts it as a failure of its deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
import orjson

from proxy.call import Attempt, Call, Reply, Target
from proxy.errors import GatewayError, UpstreamUnavailable
from proxy.gateway import STREAM_CUT_AT_SHUTDOWN, upstream_error_message
from proxy.metrics import Metrics
from proxy.pipeline import Next, StageContext
from proxy.retry import retry_after_seconds
from proxy.settings import Cooldowns as CooldownPolicy
from proxy.sse_anthropic import ERROR_STATUS as ANTHROPIC_ERROR_STATUS
from proxy.sse_responses import ERROR_STATUS as RESPONSES_ERROR_STATUS
from proxy.state.cooldowns import Cooldowns
from proxy.upstream import UpstreamStreamError

DEFAULT_STATUSES: tuple[int | str, ...] = (408, 409, 429, "5xx")
GATEWAY_FAILOVER = {502: "connection", 504: "timeout"}  # GatewayErrors that are a candidate's failure
CONTEXT_LENGTH_MARKERS = ("context_length_exceeded", "maximum context length", "context window", "prompt is too long")
# Responses API events that open a stream before any output or failure: peek past them
LIFECYCLE_EVENTS = frozenset({b"event: response.created", b"event: response.in_progress", b"event: response.queued"})
MAX_PEEK_BYTES = 64 * 1024  # stop looking for the first data event after this much (comments, keep-alives)
_now = time.perf_counter  # module globals, so the unit tests can run the loop on a fake clock
_sleep = asyncio.sleep



def cooldown_key(target: Target) -> str | None:
    """The deployment's cooldown key; None for a request-supplied credential, whose failures
    (one customer's bad key) must not take a shared deployment name out of rotation for all."""
    return None if target.custom_credential else target.deployment_key

class RetryDefaults(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a request without `retry_params` gets (Respan's org-level Retries page)."""

    enabled: bool = True
    num_retries: Annotated[int, msgspec.Meta(ge=0)] = 3
    retry_after: Annotated[float, msgspec.Meta(gt=0)] = 0.2


class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    fallback_statuses: list[int | str] = msgspec.field(default_factory=lambda: list(DEFAULT_STATUSES))
    fallback_on_context_length: bool = False
    max_retry_after: Annotated[float, msgspec.Meta(ge=0)] = 10.0  # cap on one sleep, Retry-After included
    max_retry_time: Annotated[float, msgspec.Meta(ge=0)] = 30.0  # cap on the time spent retrying
    retry: RetryDefaults = msgspec.field(default_factory=RetryDefaults)


def parse_statuses(values: list[int | str]) -> frozenset[int]:
    """Ints and "5xx"-style classes (also digit strings) -> the set of statuses."""
    out: set[int] = set()
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
            out.add(value)
        elif isinstance(value, str) and len(value) == 3 and value[0] in "45" and value[1:].lower() == "xx":
            start = int(value[0]) * 100
            out.update(range(start, start + 100))
        elif isinstance(value, str) and value.isdigit() and 400 <= int(value) <= 599:
            out.add(int(value))
        else:
            raise ValueError(f"fallback_statuses: expected a status 400-599 or a class like '5xx', got {value!r}")
    return frozenset(out)


def _error_object(body: bytes) -> Any:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def is_context_length(data: Any) -> bool:
    """True when an (OpenAI or Anthropic shaped) error body says the prompt is too long."""
    if not isinstance(data, dict):
        return False
    error = data.get("error")
    if isinstance(error, dict):
        text = " ".join(str(error.get(k) or "") for k in ("code", "type", "message"))
    elif isinstance(error, str):
        text = error
    else:
        return False
    text = text.lower()
    return any(marker in text for marker in CONTEXT_LENGTH_MARKERS)


def _first_data(buffer: bytes) -> bytes | None:
    """The payload of the first complete SSE event that says something: it has a data line and is
    not one of the Responses API's lifecycle events (which come before any output or failure);
    None if there is none yet."""
    if b"\r" in buffer:
        buffer = buffer.replace(b"\r\n", b"\n")
    start = 0
    while True:
        end = buffer.find(b"\n\n", start)
        if end == -1:
            return None
        block = buffer[start:end].split(b"\n")
        lines = [line[5:].lstrip(b" ") for line in block if line.startswith(b"data:")]
        if lines and not any(line in LIFECYCLE_EVENTS for line in block):
            return b"\n".join(lines)
        start = end + 2


def _in_stream_error(event: dict[str, Any]) -> tuple[Any, int | None]:
    """(the error object, its HTTP status when the format says one) of a stream's opening event:
    a top-level `error` (OpenAI chat, Gemini, Anthropic's `event: error`), or the Responses API's
    `error` event and `response.failed`."""
    error = event.get("error")
    kind = event.get("type")
    if error and isinstance(error, dict):
        code = error.get("code")
        if code is None and kind == "error":
            return error, ANTHROPIC_ERROR_STATUS.get(error.get("type"))  # Anthropic's `event: error`
        return error, code if isinstance(code, int) and not isinstance(code, bool) else None
    if error:
        return error, None
    if kind == "response.failed":
        response = event.get("response")
        error = response.get("error") if isinstance(response, dict) else None
    elif kind == "error" and "code" in event:
        error = {k: event.get(k) for k in ("code", "message", "param")}
    if not isinstance(error, dict) or not error:
        return None, None
    return error, RESPONSES_ERROR_STATUS.get(error.get("code"))  # type: ignore[arg-type]


async def _replay(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The peeked bytes, then the rest of the stream; closing this closes the upstream stream."""
    try:
        yield first
        async for data in rest:
            yield data
    finally:
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            await aclose()


class FallbackStage:
    def __init__(self, options: Options, metrics: Metrics, cooldowns: Cooldowns) -> None:
        self.statuses = parse_statuses(options.fallback_statuses)
        self.on_context_length = options.fallback_on_context_length
        self.max_retry_after = options.max_retry_after
        self.max_retry_time = options.max_retry_time
        self.retry_enabled = options.retry.enabled
        self.num_retries = options.retry.num_retries
        self.retry_after = options.retry.retry_after
        self.metrics = metrics
        self.cooldowns = cooldowns
        self._success: dict[str, Any] = {}  # provider -> attempts{outcome="success"} child
        self._failure: dict[str, Any] = {}

    # -- bookkeeping -------------------------------------------------------------------

    def _succeeded(self, call: Call, target: Target, key: str | None, started: float, status: int) -> None:
        latency = _now() - started
        call.attempts.append(Attempt(model=target.model, provider=target.provider, deployment=target.deployment,
                                     status=status, latency=latency, started_at=time.time() - latency))
        counter = self._success.get(target.provider)
        if counter is None:
            counter = self._success[target.provider] = self.metrics.attempts.labels(target.provider, "success")
        self.metrics.count(counter)
        if key:
            self.cooldowns.success(key)

    def _failed(self, call: Call, target: Target, started: float, status: int, error: str | None) -> None:
        latency = _now() - started
        call.attempts.append(Attempt(model=target.model, provider=target.provider, deployment=target.deployment,
                                     status=status, error=error, latency=latency, started_at=time.time() - latency))
        counter = self._failure.get(target.provider)
        if counter is None:
            counter = self._failure[target.provider] = self.metrics.attempts.labels(target.provider, "failure")
        counter.inc()

    def _healthy_after(self, plan: list[Target], index: int) -> bool:
        cooling = self.cooldowns.cooling
        return any(
            (key := cooldown_key(plan[i])) is None or not cooling(key) for i in range(index + 1, len(plan))
        )

    def _stream_finished(self, key: str, call: Call) -> None:
        """Finish hook of a stream returned as a success: a break after the first byte is a failure."""
        if call.status_code >= 500 and call.error != STREAM_CUT_AT_SHUTDOWN:
            self.cooldowns.failure(key, call.status_code)

    # -- streams -------------------------------------------------------------------------

    async def _open_stream(self, call: Call, reply: Reply, target: Target) -> Reply | GatewayError:
        """Peek at a stream's first data event. The same Reply (its stream now replays the peeked
        bytes first) when the stream is good; else the failure: a JSON error Reply for an in-stream
        `error` event (status: its int `code` when 4xx/5xx, else 502), or a 502 GatewayError for a
        stream that broke, or ended before any data event."""
        stream = reply.stream
        assert stream is not None
        buffer = b""
        problem: str | None = None
        started = _now()
        try:
            while True:
                data = await anext(stream)
                buffer = buffer + data if buffer else data
                payload = _first_data(buffer)
                if payload is not None or len(buffer) > MAX_PEEK_BYTES:
                    break
        except StopAsyncIteration:
            if b"data:" not in buffer:  # nothing, or only comments
                problem = f"provider '{target.provider}' ended the stream before its first event"
        except UpstreamStreamError as exc:
            problem = str(exc)
        finally:
            call.upstream_time += _now() - started
        if problem is None:
            payload = _first_data(buffer)
            error: Any = None
            code: int | None = None
            event = None
            if payload is not None and payload.startswith(b"{") and b'"error"' in payload:
                event = _error_object(payload)
                if event is not None:
                    error, code = _in_stream_error(event)
            if not error:
                reply.stream = _replay(buffer, stream)
                return reply
            status = code if code is not None and 400 <= code <= 599 else 502
            await _close(stream)
            assert payload is not None and event is not None
            # nothing was sent yet: the event's own JSON (the provider's format) as a whole error
            # reply; a Responses event becomes the API's error body
            body = payload if "error" in event else orjson.dumps({"error": error})
            return Reply(status, body=body, headers=reply.headers)
        await _close(stream)
        return UpstreamUnavailable(problem)

    # -- the loop ------------------------------------------------------------------------

    def _backoff(self, tries: int, base: float, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return min(base * 2**tries * random.uniform(0.75, 1.25), self.max_retry_after)

    async def __call__(self, call: Call, next: Next) -> Reply:
        if call.gates:  # a refusal (a limit) is the client's answer, never an attempt that failed over
            await call.ready()
        plan = call.plan
        if not plan:
            if call.target is None:
                return await next(call)
            plan = [call.target]
        last = len(plan) - 1
        cooldowns = self.cooldowns
        outcome: Reply | GatewayError | None = None
        retry_params: tuple[int, float] | None = None  # (num_retries, retry_after), once something failed
        first_failure: float | None = None
        for index in range(last + 1):
            target = plan[index]
            key = cooldown_key(target)
            if index < last and key and cooldowns.cooling(key) and self._healthy_after(plan, index):
                continue  # out of rotation, and a later candidate is healthy
            tries = 0
            while True:
                call.target = target
                started = _now()
                reason: str | None = None
                try:
                    reply = await next(call)
                except GatewayError as exc:
                    reason = GATEWAY_FAILOVER.get(exc.status)
                    if reason is None:  # the gateway's own answer (bad request, unknown provider, ...)
                        self._failed(call, target, started, exc.status, exc.detail)
                        raise
                    outcome = exc
                else:
                    if reply.status < 400:
                        if reply.stream is None:
                            self._succeeded(call, target, key, started, reply.status)
                            return reply
                        opened = await self._open_stream(call, reply, target)
                        if isinstance(opened, Reply) and opened.status < 400:
                            self._succeeded(call, target, key, started, reply.status)
                            if key:
                                call.finish_hooks.append(functools.partial(self._stream_finished, key))
                            return opened
                        outcome = opened
                        reason = "stream"
                    else:
                        outcome = reply

                # a failure: what it was
                if first_failure is None:
                    first_failure = started
                status, message, retry_after, context_length = await self._describe(outcome)
                if reason is None:
                    reason = str(status)
                self._failed(call, target, started, status, message)
                if key:
                    cooldowns.failure(key, status, retry_after)
                if not (context_length or status in self.statuses or isinstance(outcome, GatewayError)):
                    return self._give_up(outcome)  # not a status that falls back: as it is, at once
                has_next = index < last

                # retry the same candidate, or move on
                if not context_length and not (status == 429 and has_next):
                    if retry_params is None:
                        retry_params = self._retry_params(call)
                    if tries < retry_params[0] and not (
                        has_next and key and cooldowns.cooling(key) and self._healthy_after(plan, index)
                    ):
                        delay = self._backoff(tries, retry_params[1], retry_after)
                        if _now() - first_failure + delay <= self.max_retry_time:
                            self.metrics.retries.labels(reason).inc()
                            slept = _now()
                            await _sleep(delay)
                            call.upstream_time += _now() - slept
                            tries += 1
                            continue
                if has_next:
                    self.metrics.fallbacks.labels(reason).inc()
                break
        return self._give_up(outcome)

    @staticmethod
    def _give_up(outcome: Reply | GatewayError | None) -> Reply:
        """The last failure, for the client: the provider's own error reply, or the gateway error."""
        if isinstance(outcome, GatewayError):
            raise outcome
        assert outcome is not None
        return outcome

    async def _describe(self, outcome: Reply | GatewayError) -> tuple[int, str, float | None, bool]:
        """(status, error message, Retry-After seconds, says context length exceeded) of a failure."""
        if isinstance(outcome, GatewayError):
            return outcome.status, outcome.detail, None, False
        status = outcome.status
        retry_after = retry_after_seconds(outcome.headers)
        if outcome.stream is not None:  # an error with a streamed body: not read, dropped
            await _close(outcome.stream)
            outcome.stream = None
            return status, f"{status}: upstream error", retry_after, False
        data = _error_object(outcome.body)
        if data is None:
            return status, f"{status}: {outcome.body[:200].decode(errors='replace')}", retry_after, False
        context_length = status == 400 and self.on_context_length and is_context_length(data)
        return status, upstream_error_message(data, status), retry_after, context_length

    def _retry_params(self, call: Call) -> tuple[int, float]:
        """(num_retries, retry_after) for this request: `retry_params` replaces the stage's defaults as
        a whole; `retries` overrides the number; `retry_enabled: false` means no retries."""
        params = call.params
        given = params.retry_params
        if given is None:
            enabled, num_retries, base = self.retry_enabled, self.num_retries, self.retry_after
        else:
            enabled, num_retries, base = given.retry_enabled, given.num_retries, given.retry_after
        if params.retries is not None:
            num_retries = params.retries
        return (num_retries if enabled else 0), base


async def _close(stream: AsyncIterator[bytes]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):  # a broken stream may fail again on close: it is dropped anyway
            await aclose()


def create_stage(context: StageContext) -> FallbackStage:
    try:
        options = msgspec.convert(context.options, Options)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    metrics = context.services.get("metrics") or Metrics()
    cooldowns = context.services.get("cooldowns") or Cooldowns(context.settings.cooldowns or CooldownPolicy(), metrics)
    return FallbackStage(options, metrics, cooldowns)
