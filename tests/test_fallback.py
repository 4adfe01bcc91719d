"""The `fallback` stage: the retry loop on its own (a scripted `next`, a fake clock), then end to end
through gateway processes against the mock provider's failure scenarios."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import msgspec
import orjson
import pytest

from plugins import fallback as fb
from proxy.call import Call, Reply, Target
from proxy.catalog import load_catalog
from proxy.errors import GatewayError, ModelNotFound, UpstreamTimeout, UpstreamUnavailable
from proxy.gateway import STREAM_CUT_AT_SHUTDOWN
from proxy.metrics import Metrics
from proxy.model_table import ModelTable
from proxy.params import to_params
from proxy.pipeline import StageContext
from proxy.settings import ConfigError, Settings
from proxy.settings import Cooldowns as Policy
from proxy.state.cooldowns import Cooldowns
from proxy.upstream import UpstreamStreamError
from tests.conftest import KEY, base_config
from tests.mock_upstream import MALFORMED, USAGE, WORDS, MockUpstream
from tests.test_cooldowns import plan_stage_env

HI = [{"role": "user", "content": "hi"}]

# -- unit: the loop with a scripted `next` ------------------------------------------------------


class Clock:
    """A fake perf_counter and sleep: sleeps are recorded and advance the clock at once."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(fb, "_now", c.time)
    monkeypatch.setattr(fb, "_sleep", c.sleep)
    return c


def target(name: str, provider: str | None = None, deployment: str | None = None) -> Target:
    provider = provider or f"prov-{name}"
    return Target(provider=provider, protocol="openai", model=name, deployment=deployment or provider)


def make_stage(policy: Policy | None = None, **options: Any) -> fb.FallbackStage:
    metrics = Metrics()
    cooldowns = Cooldowns(policy or Policy(statuses=[]), metrics)  # no cooldowns unless a test asks
    return fb.FallbackStage(msgspec.convert(options, fb.Options), metrics, cooldowns)


def make_call(plan: list[Target], stream: bool = False, **params: Any) -> Call:
    call = Call(endpoint="chat", path="/api/chat/completions", body={"model": "m", "messages": HI, "stream": stream},
                params=to_params(params), headers={})
    call.plan = list(plan)
    return call


def ok(status: int = 200) -> Reply:
    return Reply(status, body=b'{"ok": true}')


def err(status: int, headers: dict[str, str] | None = None, message: str = "boom", code: str | None = None) -> Reply:
    body = {"error": {"message": message, "type": "server_error", "code": code or f"c{status}"}}
    return Reply(status, body=orjson.dumps(body), headers=dict(headers or {}))


class Script:
    """A fake `next`: per upstream model, the outcomes in order (the last one repeats). An outcome is a
    Reply, an exception, or a callable returning one of those (for fresh streams)."""

    def __init__(self, **outcomes: list[Any]) -> None:
        self.outcomes = {k: list(v) for k, v in outcomes.items()}
        self.calls: list[str] = []

    async def __call__(self, call: Call) -> Reply:
        assert call.target is not None
        name = call.target.model
        self.calls.append(name)
        queue = self.outcomes[name]
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if callable(item):
            item = item()
        if isinstance(item, BaseException):
            raise item
        return item


def run(stage: fb.FallbackStage, call: Call, script: Callable[[Call], Any]) -> Reply:
    return asyncio.run(stage(call, script))


def sample(stage: fb.FallbackStage, name: str, **labels: str) -> float:
    stage.metrics.flush()  # counts reach the collectors at a flush, as before every scrape
    return stage.metrics.registry.get_sample_value(name, labels) or 0.0


def statuses(call: Call) -> list[tuple[str, int]]:
    return [(a.model, a.status) for a in call.attempts]


def test_success_first_try_is_one_attempt_and_no_sleep(clock):
    stage = make_stage()
    call = make_call([target("a"), target("b")])
    script = Script(a=[ok()], b=[ok()])
    reply = run(stage, call, script)
    assert reply.status == 200
    assert script.calls == ["a"]
    assert statuses(call) == [("a", 200)]
    assert call.attempts[0].error is None and call.attempts[0].deployment == "prov-a"
    assert clock.sleeps == []
    assert call.target is not None and call.target.model == "a"
    assert sample(stage, "llmrelay_attempts_total", provider="prov-a", outcome="success") == 1


def test_one_500_then_success_retries_the_same_candidate(clock):
    stage = make_stage()
    call = make_call([target("a"), target("b")])
    script = Script(a=[err(500), ok()], b=[ok()])
    reply = run(stage, call, script)
    assert reply.status == 200
    assert statuses(call) == [("a", 500), ("a", 200)]
    assert call.attempts[0].error == "500: boom"
    assert len(clock.sleeps) == 1 and 0.15 <= clock.sleeps[0] <= 0.25  # retry_after 0.2 +-25%
    assert sample(stage, "llmrelay_retries_total", reason="500") == 1
    assert sample(stage, "llmrelay_fallbacks_total", reason="500") == 0
    assert sample(stage, "llmrelay_attempts_total", provider="prov-a", outcome="failure") == 1


def test_backoff_is_exponential_with_jitter_then_gives_up_with_the_last_error(clock):
    stage = make_stage()
    call = make_call([target("a")])
    replies = [err(503, message=f"try {i}") for i in range(4)]
    script = Script(a=replies)
    reply = run(stage, call, script)
    assert reply is replies[-1]  # the last upstream error, unchanged
    assert statuses(call) == [("a", 503)] * 4  # the first try and num_retries (3) retries
    for n, delay in enumerate(clock.sleeps):
        assert 0.2 * 2**n * 0.75 <= delay <= 0.2 * 2**n * 1.25
    assert len(clock.sleeps) == 3
    assert sample(stage, "llmrelay_retries_total", reason="503") == 3


def test_jitter_varies():
    stage = make_stage()
    delays = {stage._backoff(0, 0.2, None) for _ in range(50)}
    assert len(delays) > 1
    assert all(0.15 <= d <= 0.25 for d in delays)


def test_persistent_failure_moves_to_the_next_candidate_after_its_retries(clock):
    stage = make_stage()
    call = make_call([target("a"), target("b")], retry_params={"num_retries": 2})
    script = Script(a=[err(503)], b=[ok()])
    reply = run(stage, call, script)
    assert reply.status == 200
    assert statuses(call) == [("a", 503), ("a", 503), ("a", 503), ("b", 200)]
    assert sample(stage, "llmrelay_fallbacks_total", reason="503") == 1
    assert sample(stage, "llmrelay_retries_total", reason="503") == 2


def test_429_with_a_next_candidate_moves_on_at_once(clock):
    stage = make_stage()
    call = make_call([target("a"), target("b")])
    script = Script(a=[err(429, {"retry-after": "1"})], b=[ok()])
    assert run(stage, call, script).status == 200
    assert statuses(call) == [("a", 429), ("b", 200)]
    assert clock.sleeps == []
    assert sample(stage, "llmrelay_fallbacks_total", reason="429") == 1


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after": "1"}, 1.0),
    ({"retry-after-ms": "300"}, 0.3),
    ({"retry-after-ms": "300", "retry-after": "1"}, 0.3),  # the finer one wins
    ({"Retry-After": "2"}, 2.0),  # any spelling
    ({"retry-after": "3600"}, 10.0),  # capped by max_retry_after
])
def test_429_alone_retries_honouring_retry_after(clock, headers, expected):
    stage = make_stage()
    call = make_call([target("a")], retry_params={"num_retries": 2})
    script = Script(a=[err(429, headers), err(429, headers), ok()])
    assert run(stage, call, script).status == 200
    assert clock.sleeps == [expected, expected]
    assert sample(stage, "llmrelay_retries_total", reason="429") == 2


def test_429_alone_without_retry_after_backs_off_exponentially(clock):
    stage = make_stage()
    call = make_call([target("a")])
    script = Script(a=[err(429), err(429), ok()])
    assert run(stage, call, script).status == 200
    assert len(clock.sleeps) == 2
    assert 0.15 <= clock.sleeps[0] <= 0.25 and 0.3 <= clock.sleeps[1] <= 0.5


def test_retry_after_as_an_http_date(clock):
    stage = make_stage()
    call = make_call([target("a")])
    script = Script(a=[err(429, {"retry-after": formatdate(time.time() + 5, usegmt=True)}), ok()])
    assert run(stage, call, script).status == 200
    assert 3.5 <= clock.sleeps[0] <= 5.0


def test_retry_after_parsing():
    assert fb.retry_after_seconds({}) is None
    assert fb.retry_after_seconds({"retry-after": "soon"}) is None
    assert fb.retry_after_seconds({"retry-after": "-3"}) is None
    assert fb.retry_after_seconds({"retry-after-ms": "nan", "retry-after": "2"}) == 2.0
    assert fb.retry_after_seconds({"retry-after": "0.5"}) == 0.5
    assert fb.retry_after_seconds({"retry-after": formatdate(time.time() - 60, usegmt=True)}) == 0.0


def test_max_retry_after_option_caps_each_sleep(clock):
    stage = make_stage(max_retry_after=0.5)
    call = make_call([target("a")], retry_params={"num_retries": 1})
    script = Script(a=[err(429, {"retry-after": "5"}), ok()])
    assert run(stage, call, script).status == 200
    assert clock.sleeps == [0.5]


def test_max_retry_time_caps_the_total_time_spent_retrying(clock):
    stage = make_stage(max_retry_time=5)
    call = make_call([target("a"), target("b")], retry_params={"num_retries": 10, "retry_after": 1})
    script = Script(a=[err(500)], b=[ok()])
    assert run(stage, call, script).status == 200
    # sleeps of ~1 s and ~2 s (at most 3.75 s with jitter); the next (at least 3 s) would pass 5 s:
    # no more retries of a, on to b
    assert len(clock.sleeps) == 2
    assert sum(clock.sleeps) <= 5
    assert statuses(call) == [("a", 500), ("a", 500), ("a", 500), ("b", 200)]

    clock.sleeps.clear()
    call = make_call([target("a")], retry_params={"num_retries": 10, "retry_after": 1})
    last = err(500)
    assert run(stage, call, Script(a=[err(500), err(500), last])) is last  # alone: give up
    assert len(clock.sleeps) == 2 and len(call.attempts) == 3


def test_sleeps_count_as_upstream_time():
    stage = make_stage()
    call = make_call([target("a")], retry_params={"num_retries": 2, "retry_after": 0.05})
    script = Script(a=[err(500), err(500), ok()])
    started = time.perf_counter()
    assert run(stage, call, script).status == 200
    elapsed = time.perf_counter() - started
    assert call.upstream_time >= 0.05 * 0.75 + 0.1 * 0.75
    assert call.upstream_time <= elapsed


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_statuses_return_at_once(clock, status):
    stage = make_stage()
    call = make_call([target("a"), target("b")])
    failure = err(status)
    script = Script(a=[failure], b=[ok()])
    assert run(stage, call, script) is failure
    assert script.calls == ["a"]
    assert statuses(call) == [("a", status)]
    assert clock.sleeps == []


def test_fallback_statuses_are_configurable(clock):
    stage = make_stage(fallback_statuses=["4xx", 503])
    call = make_call([target("a"), target("b")], retries=0)
    script = Script(a=[err(404)], b=[ok()])
    assert run(stage, call, script).status == 200
    assert statuses(call) == [("a", 404), ("b", 200)]

    call = make_call([target("a"), target("b")])
    failure = err(500)
    script = Script(a=[failure], b=[ok()])
    assert run(stage, call, script) is failure  # 500 is not in the list any more
    assert script.calls == ["a"]


def test_connection_errors_and_timeouts_fall_back_whatever_the_statuses(clock):
    stage = make_stage(fallback_statuses=[429])
    call = make_call([target("a"), target("b"), target("c")], retries=0)
    script = Script(a=[UpstreamUnavailable("refused")], b=[UpstreamTimeout("slow")], c=[ok()])
    assert run(stage, call, script).status == 200
    assert statuses(call) == [("a", 502), ("b", 504), ("c", 200)]
    assert call.attempts[0].error == "refused"
    assert sample(stage, "llmrelay_fallbacks_total", reason="connection") == 1
    assert sample(stage, "llmrelay_fallbacks_total", reason="timeout") == 1


def test_connection_error_is_retried_then_reraised_when_last(clock):
    stage = make_stage()
    call = make_call([target("a")], retry_params={"num_retries": 1})
    script = Script(a=[UpstreamUnavailable("refused")])
    with pytest.raises(UpstreamUnavailable):
        run(stage, call, script)
    assert statuses(call) == [("a", 502), ("a", 502)]
    assert sample(stage, "llmrelay_retries_total", reason="connection") == 1


def test_other_gateway_errors_propagate_at_once(clock):
    stage = make_stage()
    call = make_call([target("a"), target("b")])
    script = Script(a=[ModelNotFound("x")], b=[ok()])
    with pytest.raises(ModelNotFound):
        run(stage, call, script)
    assert script.calls == ["a"]
    assert statuses(call) == [("a", 404)]
    script = Script(a=[GatewayError("nope", 400)], b=[ok()])
    with pytest.raises(GatewayError):
        run(stage, make_call([target("a"), target("b")]), script)


def test_every_candidate_fails_the_client_gets_the_last_upstream_error(clock):
    stage = make_stage()
    call = make_call([target("a"), target("b")], retries=0)
    last = err(500, message="b is down")
    script = Script(a=[err(503)], b=[last])
    assert run(stage, call, script) is last
    assert statuses(call) == [("a", 503), ("b", 500)]
    assert call.target is not None and call.target.model == "b"

    call = make_call([target("a"), target("b")], retries=0)
    script = Script(a=[err(503)], b=[UpstreamTimeout("b timed out")])
    with pytest.raises(UpstreamTimeout):
        run(stage, call, script)


def test_context_length_does_not_fall_back_by_default(clock):
    stage = make_stage()
    call = make_call([target("a"), target("b")])
    failure = err(400, message="This model's maximum context length is 8192 tokens", code="context_length_exceeded")
    script = Script(a=[failure], b=[ok()])
    assert run(stage, call, script) is failure
    assert script.calls == ["a"]


def test_context_length_falls_back_when_configured_without_retrying(clock):
    stage = make_stage(fallback_on_context_length=True)
    call = make_call([target("a"), target("b")])
    failure = err(400, message="This model's maximum context length is 8192 tokens", code="context_length_exceeded")
    script = Script(a=[failure], b=[ok()])
    assert run(stage, call, script).status == 200
    assert statuses(call) == [("a", 400), ("b", 200)]
    assert clock.sleeps == []
    assert sample(stage, "llmrelay_fallbacks_total", reason="400") == 1
    # an ordinary 400 still goes back at once
    call = make_call([target("a"), target("b")])
    script = Script(a=[err(400, message="bad temperature")], b=[ok()])
    assert run(stage, call, script).status == 400
    # and a context-length error on the last candidate is returned as it is
    call = make_call([target("a")])
    script = Script(a=[failure])
    assert run(stage, call, script) is failure
    assert len(call.attempts) == 1


def test_context_length_detection():
    assert fb.is_context_length({"error": {"code": "context_length_exceeded", "message": "x"}})
    assert fb.is_context_length({"error": {"type": "invalid_request_error", "message": "prompt is too long: 210000 tokens"}})
    assert fb.is_context_length({"error": "This model's maximum context length is 4097 tokens"})
    assert not fb.is_context_length({"error": {"message": "invalid temperature"}})
    assert not fb.is_context_length({"detail": "context_length_exceeded"})
    assert not fb.is_context_length(None)


def test_retries_disabled_and_overridden(clock):
    stage = make_stage()
    call = make_call([target("a")], retry_params={"retry_enabled": False})
    script = Script(a=[err(500), ok()])
    assert run(stage, call, script).status == 500
    assert clock.sleeps == []

    call = make_call([target("a")], retries=1)  # `retries` overrides num_retries
    script = Script(a=[err(500), err(500), ok()])
    assert run(stage, call, script).status == 500
    assert len(call.attempts) == 2

    call = make_call([target("a"), target("b")], retry_params={"retry_enabled": False})
    script = Script(a=[err(429)], b=[ok()])
    assert run(stage, call, script).status == 200  # a fallback is not a retry: still happens


def test_stage_retry_defaults_and_request_params(clock):
    stage = make_stage(retry={"enabled": True, "num_retries": 1, "retry_after": 1.0})
    call = make_call([target("a")])
    script = Script(a=[err(500)])
    run(stage, call, script)
    assert len(call.attempts) == 2
    assert 0.75 <= clock.sleeps[0] <= 1.25
    # a request's retry_params replace the stage's defaults as a whole
    clock.sleeps.clear()
    call = make_call([target("a")], retry_params={"num_retries": 2})
    run(stage, call, Script(a=[err(500)]))
    assert len(call.attempts) == 3
    assert all(d <= 0.2 * 2**n * 1.25 for n, d in enumerate(clock.sleeps))
    stage = make_stage(retry={"enabled": False})
    call = make_call([target("a")])
    run(stage, call, Script(a=[err(500)]))
    assert len(call.attempts) == 1


def test_no_plan_uses_the_target_and_no_target_calls_next_once(clock):
    stage = make_stage()
    call = make_call([])
    call.target = target("a")
    script = Script(a=[err(500), ok()])
    assert run(stage, call, script).status == 200
    assert len(call.attempts) == 2

    call = make_call([])
    calls = []

    async def resolving_next(c: Call) -> Reply:
        calls.append(c.target)
        c.target = target("resolved")
        return err(500)

    assert asyncio.run(stage(call, resolving_next)).status == 500
    assert calls == [None]
    assert call.attempts == []


# -- unit: cooldowns in the loop -----------------------------------------------------------------


def test_a_cooling_candidate_is_skipped_when_a_later_one_is_healthy(clock):
    stage = make_stage(Policy(failures=1))
    a, b = target("a"), target("b")
    stage.cooldowns.enter(a.deployment_key, time.time() + 30)
    call = make_call([a, b])
    script = Script(a=[ok()], b=[ok()])
    assert run(stage, call, script).status == 200
    assert script.calls == ["b"]
    assert statuses(call) == [("b", 200)]

    # the only candidate: tried all the same
    call = make_call([a])
    assert run(stage, call, script).status == 200
    assert script.calls == ["b", "a"]

    # every candidate cooling: the first is tried
    stage.cooldowns.enter(b.deployment_key, time.time() + 30)
    call = make_call([a, b])
    assert run(stage, call, script).status == 200
    assert script.calls[-1] == "a"


def test_failures_feed_the_cooldowns_and_success_resets(clock):
    stage = make_stage(Policy(failures=2))
    a, b = target("a"), target("b")
    call = make_call([a, b], retries=0)
    run(stage, call, Script(a=[err(503)], b=[ok()]))
    assert not stage.cooldowns.cooling(a.deployment_key)
    run(stage, make_call([a]), Script(a=[ok()]))  # a success: the count starts again
    run(stage, make_call([a, b], retries=0), Script(a=[err(503)], b=[ok()]))
    assert not stage.cooldowns.cooling(a.deployment_key)
    run(stage, make_call([a, b], retries=0), Script(a=[err(503)], b=[ok()]))
    assert stage.cooldowns.cooling(a.deployment_key)


def test_a_429_retry_after_puts_the_deployment_in_cooldown_for_that_long(clock):
    stage = make_stage(Policy(failures=5))
    a, b = target("a"), target("b")
    run(stage, make_call([a, b]), Script(a=[err(429, {"retry-after": "5"})], b=[ok()]))
    assert 4 < stage.cooldowns.until(a.deployment_key) - time.time() <= 5


def test_no_more_retries_once_the_candidate_is_cooling_and_another_is_healthy(clock):
    stage = make_stage(Policy(failures=1))
    a, b = target("a"), target("b")
    call = make_call([a, b])
    script = Script(a=[err(500)], b=[ok()])
    assert run(stage, call, script).status == 200
    assert statuses(call) == [("a", 500), ("b", 200)]  # no retries of a: it just went into cooldown
    assert clock.sleeps == []
    # the only candidate keeps its retries even in cooldown
    call = make_call([a], retries=2)
    run(stage, call, Script(a=[err(500)]))
    assert len(call.attempts) == 3


def test_deployments_of_one_provider_cool_separately(clock):
    stage = make_stage(Policy(failures=1))
    d1, d2 = target("m", "p", "key1"), target("m", "p", "key2")
    call = make_call([d1, d2])
    outcomes = iter([err(500), ok()])

    async def by_deployment(c: Call) -> Reply:
        return next(outcomes)

    assert asyncio.run(stage(call, by_deployment)).status == 200
    assert [a.deployment for a in call.attempts] == ["key1", "key2"]
    assert stage.cooldowns.cooling("p/key1") and not stage.cooldowns.cooling("p/key2")


# -- unit: streams -------------------------------------------------------------------------------


class Upstream:
    """A fake upstream stream: its chunks (an exception raises there), and whether it was closed."""

    def __init__(self, chunks: list[Any], delay: float = 0.0) -> None:
        self.chunks = chunks
        self.delay = delay
        self.closed = False
        self.sent = 0

    async def iterate(self) -> AsyncIterator[bytes]:
        try:
            for item in self.chunks:
                if self.delay:
                    await asyncio.sleep(self.delay)
                if isinstance(item, BaseException):
                    raise item
                self.sent += 1
                yield item
        finally:
            self.closed = True

    def reply(self) -> Reply:
        return Reply(200, stream=self.iterate(), headers={"x-request-id": "r1"}, media_type="text/event-stream")


def data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


CHUNK = data({"choices": [{"index": 0, "delta": {"content": "hi"}}]})


async def collect(reply: Reply) -> bytes:
    assert reply.stream is not None
    return b"".join([c async for c in reply.stream])


def test_a_good_stream_is_returned_with_the_peeked_chunk_first():
    stage = make_stage()
    upstream = Upstream([CHUNK, CHUNK, b"data: [DONE]\n\n"], delay=0.05)
    call = make_call([target("a"), target("b")], stream=True)

    async def main() -> bytes:
        reply = await stage(call, Script(a=[upstream.reply]))
        assert reply.status == 200 and reply.headers == {"x-request-id": "r1"}
        assert upstream.sent == 1  # only the first chunk was read before returning
        assert call.upstream_time >= 0.04  # the wait for the first chunk is upstream time
        return await collect(reply)

    assert asyncio.run(main()) == CHUNK + CHUNK + b"data: [DONE]\n\n"
    assert statuses(call) == [("a", 200)]
    assert len(call.finish_hooks) == 1


def test_a_first_event_split_over_reads_is_peeked_whole():
    stage = make_stage()
    upstream = Upstream([b": keep-alive\n\n", CHUNK[:10], CHUNK[10:], b"data: [DONE]\n\n"])
    call = make_call([target("a")], stream=True)

    async def main() -> bytes:
        return await collect(await stage(call, Script(a=[upstream.reply])))

    assert asyncio.run(main()) == b": keep-alive\n\n" + CHUNK + b"data: [DONE]\n\n"


@pytest.mark.parametrize(("first", "status", "reason"), [
    ([UpstreamStreamError("provider 'a' broke the stream: ClientPayloadError")], 502, "stream"),
    ([], 502, "stream"),  # ended before its first event
    ([b": keep-alive\n\n"], 502, "stream"),  # only a comment, then the end
    ([data({"error": {"message": "overloaded", "code": 503}}), b"data: [DONE]\n\n"], 503, "stream"),
    ([data({"error": {"message": "weird", "code": "nope"}})], 502, "stream"),
    ([data({"error": {"message": "slow down", "type": "rate_limit", "code": 429}})], 429, "stream"),
])
def test_a_stream_that_fails_before_its_first_byte_falls_back(clock, first, status, reason):
    stage = make_stage()
    bad = Upstream(first)
    good = Upstream([CHUNK, b"data: [DONE]\n\n"])
    call = make_call([target("a"), target("b")], stream=True, retries=0)

    async def main() -> bytes:
        return await collect(await stage(call, Script(a=[bad.reply], b=[good.reply])))

    assert asyncio.run(main()) == CHUNK + b"data: [DONE]\n\n"
    assert statuses(call) == [("a", status), ("b", 200)]
    assert bad.closed  # never relayed, closed at once
    assert sample(stage, "llmrelay_fallbacks_total", reason=reason) == 1


def test_a_stream_error_event_as_the_last_failure_is_returned_as_json(clock):
    stage = make_stage()
    bad = Upstream([data({"error": {"message": "overloaded", "type": "server_error", "code": 503}})])
    call = make_call([target("a")], stream=True, retries=0)
    reply = asyncio.run(stage(call, Script(a=[bad.reply])))
    assert reply.status == 503
    assert reply.stream is None
    assert orjson.loads(reply.body) == {"error": {"message": "overloaded", "type": "server_error", "code": 503}}


def test_a_stream_broken_before_its_first_byte_as_the_last_failure_is_a_502(clock):
    stage = make_stage()
    call = make_call([target("a")], stream=True, retries=0)
    with pytest.raises(UpstreamUnavailable) as info:
        asyncio.run(stage(call, Script(a=[Upstream([]).reply])))
    assert info.value.status == 502
    assert "before its first event" in info.value.detail


def test_closing_the_returned_stream_closes_the_upstream():
    stage = make_stage()
    upstream = Upstream([CHUNK] * 10)
    call = make_call([target("a")], stream=True)

    async def main() -> None:
        reply = await stage(call, Script(a=[upstream.reply]))
        assert reply.stream is not None
        assert await anext(reply.stream) == CHUNK
        assert await anext(reply.stream) == CHUNK
        await reply.stream.aclose()  # type: ignore[attr-defined]

    asyncio.run(main())
    assert upstream.closed and upstream.sent == 2


def test_a_stream_that_breaks_after_its_first_byte_counts_for_cooldowns():
    stage = make_stage(Policy(failures=1))
    call = make_call([target("a")], stream=True)
    upstream = Upstream([CHUNK, UpstreamStreamError("cut")])
    asyncio.run(stage(call, Script(a=[upstream.reply])))
    (hook,) = call.finish_hooks
    call.status_code = 200
    hook(call)
    assert not stage.cooldowns.cooling("prov-a/prov-a")
    call.status_code, call.error = 503, STREAM_CUT_AT_SHUTDOWN  # the gateway's own shutdown: not the provider
    hook(call)
    assert not stage.cooldowns.cooling("prov-a/prov-a")
    call.status_code, call.error = 502, "provider 'a' broke the stream"
    hook(call)
    assert stage.cooldowns.cooling("prov-a/prov-a")


# -- unit: options --------------------------------------------------------------------------------


def context(options: dict[str, Any]) -> StageContext:
    settings = Settings()
    return StageContext("fallback", options, settings, ModelTable(settings, load_catalog()), {"metrics": Metrics()})


def test_options_are_validated():
    stage = fb.create_stage(context({}))
    assert stage.statuses == frozenset({408, 409, 429, *range(500, 600)})
    assert not stage.on_context_length
    assert (stage.max_retry_after, stage.max_retry_time) == (10.0, 30.0)
    assert (stage.retry_enabled, stage.num_retries, stage.retry_after) == (True, 3, 0.2)
    stage = fb.create_stage(context({"fallback_statuses": [429, "4xx", "503"], "retry": {"num_retries": 0}}))
    assert stage.statuses == frozenset(range(400, 500)) | {503}
    assert stage.num_retries == 0
    for bad in ({"fallback_statuses": ["6xx"]}, {"fallback_statuses": [200]}, {"fallback_statuses": "5xx"},
                {"max_retry_time": -1}, {"retry": {"retry_after": 0}}, {"retry": {"tries": 3}}, {"unknown": 1}):
        with pytest.raises(ValueError):
            fb.create_stage(context(bad))


def test_bad_options_fail_gateway_start_up_naming_the_stage(tmp_path):
    from proxy.pipeline import load_stages
    from proxy.settings import parse_settings

    settings = parse_settings({"pipeline": [{"name": "fallback", "options": {"fallback_statuses": ["9xx"]}}],
                               "auto_providers": False}, "test.yaml")
    with pytest.raises(ConfigError, match=r"pipeline\[0\].options: stage 'fallback'"):
        load_stages(settings, ModelTable(settings, load_catalog()))


# -- end to end: gateway processes and the mock provider ------------------------------------------

# name -> (provider, upstream model); every name X gets the plans [X] and "X+good" = [X, good]
MODELS = {
    "s503": ("mock", "mock-status-503"),
    "s500": ("mock", "mock-status-500"),
    "s429": ("mock", "mock-status-429"),
    "s400": ("mock", "mock-status-400"),
    "s401": ("mock", "mock-status-401"),
    "ra1": ("mock", "mock-retry-after-1"),
    "rams": ("mock", "mock-retry-after-ms-300"),
    "flaky": ("mock", "mock-flaky-e2e"),
    "ctx": ("mock", "mock-context-length"),
    "malformed": ("mock", "mock-malformed"),
    "cut": ("mock", "mock-cut-3"),
    "serr": ("mock", "mock-stream-error-503"),
    "slowheaders": ("slow", "mock-headers-after-1500"),
    "slowfirst": ("slow", "mock-first-byte-after-1500"),
    "down": ("refused", "anything"),
    "good": ("alt", "mock-ok"),
}


def e2e_overrides(mock: MockUpstream, options: dict[str, Any] | None = None,
                  cooldowns: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the fallback tests change in tests/conftest.py's base_config."""
    base = base_config(mock, Path("unused"))
    plans = {}
    for name in MODELS:
        plans[name] = [name]
        plans[f"{name}+good"] = [name, "good"]
    plans["s503+s429"] = ["s503", "s429"]
    return {
        "providers": base["providers"] + [
            {"id": "alt", "base_url": mock.base_url, "api_key": "key-alt"},
            {"id": "slow", "base_url": mock.base_url, "api_key": "key-slow",
             "timeouts": {"read": 0.3, "stream_idle": 0.3}},
        ],
        "models": base["models"] + [{"name": name, "provider": p, "model": m} for name, (p, m) in MODELS.items()],
        "pipeline": ["auth", {"name": "testplan", "options": {"plans": plans}},
                     {"name": "fallback", "options": options or {}}],
        # no cooldowns unless a test asks: the failing scenarios share one deployment (mock/mock)
        "cooldowns": cooldowns or {"statuses": []},
    }


def start(start_gateway: Any, mock: MockUpstream, tmp_path: Path, options: dict[str, Any] | None = None,
          cooldowns: dict[str, Any] | None = None, **changes: Any) -> Any:
    overrides = {**e2e_overrides(mock, options, cooldowns), **changes}
    return start_gateway(env=plan_stage_env(tmp_path / "site"), **overrides)


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import GatewayProcess

    workdir = tmp_path_factory.mktemp("fallback")
    env = plan_stage_env(workdir / "site")
    config = base_config(mock_upstream, workdir / "gw", **e2e_overrides(mock_upstream))
    process = GatewayProcess(config, workdir / "gw", env).start()
    yield process
    process.stop()


def post(gateway: Any, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "messages": HI, **extra}, timeout=30)


def stream(gateway: Any, model: str, **extra: Any) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", f"{gateway.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "messages": HI, "stream": True, **extra}, timeout=30) as response:
        body = b"".join(response.iter_raw())
    return response, body


def attempts_of(record: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(a["provider"], a["model"], a["status"]) for a in record["attempts"] or []]


def metric(gateway: Any, line: str) -> bool:
    return line in httpx.get(f"{gateway.url}/metrics").text


def test_e2e_one_500_then_success(gw, mock):
    response = post(gw, "flaky")
    assert response.status_code == 200
    assert response.headers["x-llmrelay-attempts"] == "2"
    assert mock.count("mock-flaky-e2e") == 2
    record = gw.record(response.headers["x-respan-log-id"])
    assert attempts_of(record) == [("mock", "mock-flaky-e2e", 500), ("mock", "mock-flaky-e2e", 200)]
    assert "flaky: first request fails" in record["attempts"][0]["error"]
    assert record["attempts"][1]["error"] is None
    assert record["fallback"] is False  # a retry of the same model is not a fallback
    assert record["status_code"] == 200 and record["prompt_tokens"] == USAGE["prompt_tokens"]
    assert metric(gw, 'llmrelay_retries_total{reason="500"}')


def test_e2e_persistent_503_falls_back_to_a_second_provider(gw, mock):
    response = post(gw, "s503+good", retry_params={"num_retries": 1, "retry_after": 0.05})
    assert response.status_code == 200
    assert response.json()["model"] == "mock-ok"
    assert response.headers["x-llmrelay-provider"] == "alt"
    assert response.headers["x-llmrelay-model"] == "mock-ok"
    assert response.headers["x-llmrelay-attempts"] == "3"
    assert mock.count("mock-status-503") == 2
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["fallback"] is True
    assert record["provider_id"] == "alt"
    assert attempts_of(record) == [("mock", "mock-status-503", 503), ("mock", "mock-status-503", 503),
                                   ("alt", "mock-ok", 200)]
    assert all(a["deployment"] for a in record["attempts"])
    assert record["attempts"][0]["error"] == "503: mock upstream error 503"
    assert metric(gw, 'llmrelay_fallbacks_total{reason="503"}')
    assert metric(gw, 'llmrelay_attempts_total{outcome="failure",provider="mock"}')
    fallbacks = gw.records(where="fallback = 1")
    assert response.headers["x-respan-log-id"] in {r["unique_id"] for r in fallbacks}  # filterable


def test_e2e_all_candidates_fail_the_client_gets_the_last_upstream_error(gw, mock):
    response = post(gw, "s503+s429", retry_params={"num_retries": 1, "retry_after": 0.05})
    assert response.status_code == 429
    assert response.json() == {"error": {"message": "mock upstream error 429", "type": "mock_error",
                                         "param": None, "code": "mock_429"}}
    assert response.headers["x-request-id"] == "req-mock"  # the provider's own headers too
    assert response.headers["x-llmrelay-attempts"] == "4"
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 429 and record["status"] == "error"
    assert record["fallback"] is True
    assert [a[2] for a in attempts_of(record)] == [503, 503, 429, 429]


def test_e2e_429_with_retry_after_and_a_second_candidate_moves_on_at_once(gw, mock):
    response = post(gw, "ra1+good")
    assert response.status_code == 200
    assert response.headers["x-llmrelay-provider"] == "alt"
    assert mock.count("mock-retry-after-1") == 1
    assert post(gw, "s429+good").status_code == 200  # without Retry-After: the same
    assert metric(gw, 'llmrelay_fallbacks_total{reason="429"}')


def test_e2e_429_alone_retries_honouring_retry_after(gw, mock):
    started = time.monotonic()
    response = post(gw, "ra1", retry_params={"num_retries": 1})
    elapsed = time.monotonic() - started
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"  # passed through
    assert mock.count("mock-retry-after-1") == 2
    assert elapsed >= 1.0  # it waited (upper bounds are benchmark matters)

    started = time.monotonic()
    response = post(gw, "rams", retry_params={"num_retries": 2})
    elapsed = time.monotonic() - started
    assert response.status_code == 429
    assert mock.count("mock-retry-after-ms-300") == 3
    assert elapsed >= 0.6  # it waited (upper bounds are benchmark matters)

    started = time.monotonic()
    response = post(gw, "s429", retry_params={"num_retries": 2, "retry_after": 0.1})  # no header: back-off
    elapsed = time.monotonic() - started
    assert mock.count("mock-status-429") == 3
    assert elapsed >= 0.1 * 0.75 + 0.2 * 0.75  # it waited (upper bounds are benchmark matters)


def test_e2e_retry_after_is_capped(start_gateway, mock, tmp_path):
    gateway = start(start_gateway, mock, tmp_path, {"max_retry_after": 0.2})
    response = post(gateway, "ra1", retry_params={"num_retries": 2})
    assert response.status_code == 429
    assert mock.count("mock-retry-after-1") == 3


def test_e2e_max_retry_time_caps_total_time(start_gateway, mock, tmp_path):
    gateway = start(start_gateway, mock, tmp_path, {"max_retry_time": 0.5})
    response = post(gateway, "s503", retry_params={"num_retries": 10, "retry_after": 0.2})
    assert response.status_code == 503
    assert 2 <= mock.count("mock-status-503") <= 3


def test_e2e_connection_refused_falls_back(gw, mock):
    response = post(gw, "down+good", retries=0)
    assert response.status_code == 200
    assert response.headers["x-llmrelay-provider"] == "alt"
    record = gw.record(response.headers["x-respan-log-id"])
    assert attempts_of(record) == [("refused", "anything", 502), ("alt", "mock-ok", 200)]
    assert "connection refused" in record["attempts"][0]["error"]
    assert metric(gw, 'llmrelay_fallbacks_total{reason="connection"}')
    # alone, the client gets the gateway's own 502
    response = post(gw, "down", retries=1)
    assert response.status_code == 502
    assert "connection refused" in response.json()["detail"]
    assert response.headers["x-llmrelay-attempts"] == "2"


def test_e2e_upstream_timeout_falls_back(gw, mock):
    response = post(gw, "slowheaders+good", retries=0)
    assert response.status_code == 200
    assert response.headers["x-llmrelay-provider"] == "alt"
    record = gw.record(response.headers["x-respan-log-id"])
    assert attempts_of(record)[0] == ("slow", "mock-headers-after-1500", 504)
    assert metric(gw, 'llmrelay_fallbacks_total{reason="timeout"}')
    # a stream whose headers are late: the same
    response, body = stream(gw, "slowheaders+good", retries=0)
    assert response.status_code == 200
    assert b'"model":"mock-ok"' in body and body.endswith(b"data: [DONE]\n\n")


def test_e2e_stream_first_byte_after_a_long_delay_falls_back_before_anything_is_sent(gw, mock):
    response, body = stream(gw, "slowfirst+good", retries=0)
    assert response.status_code == 200
    assert response.headers["x-llmrelay-provider"] == "alt"
    assert b"mock-first-byte-after" not in body  # nothing of the slow one reached the client
    assert b"error" not in body
    text = "".join(orjson.loads(e[6:])["choices"][0]["delta"].get("content") or ""
                   for e in body.split(b"\n\n") if e.startswith(b"data: {") and b'"choices":[{' in e)
    assert text == "".join(WORDS)
    record = gw.record(response.headers["x-respan-log-id"])
    assert attempts_of(record) == [("slow", "mock-first-byte-after-1500", 502), ("alt", "mock-ok", 200)]
    assert "stalled" in record["attempts"][0]["error"]
    assert record["status_code"] == 200 and record["completion_tokens"] == USAGE["completion_tokens"]
    assert metric(gw, 'llmrelay_fallbacks_total{reason="stream"}')


def test_e2e_stream_error_event_first_falls_back(gw, mock):
    response, body = stream(gw, "serr+good", retries=0)
    assert response.status_code == 200
    assert b"mock stream error" not in body
    assert body.endswith(b"data: [DONE]\n\n")
    # alone: the provider's error object, with its code as the status, before any stream starts
    response, body = stream(gw, "serr", retries=0)
    assert response.status_code == 503
    assert orjson.loads(body)["error"]["message"] == "mock stream error 503"


def test_e2e_stream_cut_after_n_chunks(start_gateway, mock, tmp_path):
    gateway = start(start_gateway, mock, tmp_path, cooldowns={"failures": 1, "duration": 30})
    response, body = stream(gateway, "cut+good")
    assert response.status_code == 200
    events = [e for e in body.split(b"\n\n") if e]
    assert sum(b'"content"' in e for e in events) == 3  # the three chunks, as they came
    error = orjson.loads(events[-2][6:])["error"]  # then an SSE error event, then [DONE]
    assert error["code"] == 502 and "broke the stream" in error["message"]
    assert events[-1] == b"data: [DONE]"
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 502
    assert record["completion_tokens"] == 3  # partial usage, estimated from the deltas seen
    assert record["prompt_tokens"] > 0
    assert any("usage estimated" in w for w in record["warnings"])
    assert record["attempts"] is None  # one attempt, not listed
    # it counted as a failure for cooldowns (threshold 1): the next request skips that deployment
    response, body = stream(gateway, "cut+good")
    assert response.headers["x-llmrelay-provider"] == "alt"
    assert response.headers["x-llmrelay-attempts"] == "1"
    assert mock.count("mock-cut-3") == 1
    assert b"error" not in body
    assert metric(gateway, 'llmrelay_cooldowns_entered_total{deployment="mock",provider="mock"} 1.0')


def test_e2e_malformed_sse_chunk_is_forwarded_and_the_stream_completes(gw, mock):
    response, body = stream(gw, "malformed+good")
    assert response.status_code == 200
    assert response.headers["x-llmrelay-provider"] == "mock"
    assert MALFORMED in body  # unchanged
    assert body.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in body
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 200 and record["status"] == "success"
    assert record["completion_message"]["content"] == "".join(WORDS)


def test_e2e_context_length_exceeded_no_fallback_by_default(gw, mock):
    response = post(gw, "ctx+good")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert response.headers["x-llmrelay-attempts"] == "1"
    assert mock.count("mock-ok") == 0
    assert mock.count("mock-context-length") == 1


def test_e2e_context_length_exceeded_falls_back_when_configured(start_gateway, mock, tmp_path):
    gateway = start(start_gateway, mock, tmp_path, {"fallback_on_context_length": True})
    response = post(gateway, "ctx+good")
    assert response.status_code == 200
    assert response.headers["x-llmrelay-attempts"] == "2"
    assert mock.count("mock-context-length") == 1  # not retried
    record = gateway.record(response.headers["x-respan-log-id"])
    assert attempts_of(record) == [("mock", "mock-context-length", 400), ("alt", "mock-ok", 200)]


@pytest.mark.parametrize("model", ["s400", "s401"])
def test_e2e_400_and_401_from_the_provider_return_at_once(gw, mock, model):
    status = int(model[1:])
    response = post(gw, f"{model}+good")
    assert response.status_code == status
    assert response.json()["error"]["code"] == f"mock_{status}"
    assert response.headers["x-llmrelay-attempts"] == "1"
    assert mock.count(f"mock-status-{status}") == 1
    assert mock.count("mock-ok") == 0


@pytest.mark.parametrize(("params", "field"), [
    ({"retry_params": {"num_retries": 0}}, "retry_params.num_retries"),
    ({"retry_params": {"retry_after": 0}}, "retry_params.retry_after"),
    ({"retry_params": {"retry_enabled": True, "tries": 2}}, "retry_params"),
    ({"retries": -1}, "retries"),
])
def test_e2e_invalid_retry_params_are_422(gw, mock, params, field):
    response = post(gw, "good", **params)
    assert response.status_code == 422
    body = response.json()
    assert body["detail"] == "Validation error"
    assert field in body["errors"]
    assert mock.requests == []


def test_e2e_no_plan_without_routing_is_one_try(start_gateway, mock):
    gateway = start_gateway(pipeline=["auth", "fallback"])
    response = post(gateway, "gpt-test")
    assert response.status_code == 200
    assert response.headers["x-llmrelay-attempts"] == "1"
    response = post(gateway, "down-model")
    assert response.status_code == 502


def test_e2e_with_routing_fallback_models(start_gateway, mock, tmp_path):
    gateway = start(start_gateway, mock, tmp_path, pipeline=["auth", "routing", "fallback"])
    response = post(gateway, "s503", fallback_models=["good"], retry_params={"num_retries": 1, "retry_after": 0.05})
    assert response.status_code == 200
    assert response.headers["x-llmrelay-provider"] == "alt"
    assert response.headers["x-llmrelay-attempts"] == "3"
    response = post(gateway, "s503", fallback_models=["good"], disable_fallback=True, retries=0)
    assert response.status_code == 503


def test_request_supplied_credentials_never_feed_or_follow_cooldowns(clock):
    """One customer's bad key must not take the shared name `openai/customer_credentials` out of rotation."""
    stage = make_stage(Policy(failures=1, statuses=[401, 503]))
    custom = msgspec.structs.replace(target("a", "openai", "customer_credentials"), custom_credential=True)
    for _ in range(3):
        run(stage, make_call([custom, target("b")], retries=0), Script(a=[err(503)], b=[ok()]))
    assert not stage.cooldowns.cooling(custom.deployment_key)
    stage.cooldowns.enter(custom.deployment_key, 4e9)  # even if that name were cooling, it is tried first
    call = make_call([custom, target("b")])
    run(stage, call, Script(a=[ok()], b=[ok()]))
    assert statuses(call) == [("a", 200)]


@pytest.mark.parametrize(("event", "status"), [
    ({"error": {"message": "m", "code": 429}}, 429),  # OpenAI chat / Gemini
    ({"type": "error", "error": {"type": "overloaded_error", "message": "m"}}, 529),  # Anthropic
    ({"type": "error", "code": "rate_limit_exceeded", "message": "m", "param": None}, 429),  # Responses
    ({"type": "response.failed", "response": {"error": {"code": "server_error", "message": "m"}}}, 500),
    ({"error": "just text"}, None),
])
def test_in_stream_error_of_each_format(event, status):
    error, code = fb._in_stream_error(event)
    assert error and code == status


def test_first_data_skips_responses_lifecycle_events():
    created = b'event: response.created\ndata: {"type":"response.created","response":{"error":null}}\n\n'
    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta"}\n\n'
    assert fb._first_data(created) is None  # nothing said yet: keep peeking
    assert fb._first_data(created + delta) == b'{"type":"response.output_text.delta"}'
    assert fb._in_stream_error({"type": "response.created", "response": {"error": None}}) == (None, None)
