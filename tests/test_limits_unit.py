"""The limits stage on its own: windows, counters (memory and the real Redis), every metric and
window with an injectable clock, warn vs block, reconciliation, backend failures."""

from __future__ import annotations

import asyncio
import calendar
import os
import re
from datetime import datetime
from typing import Any

import pytest
import redis

from plugins.limits import LimitExceeded, LimitsStage, rate_limit_headers
from plugins.limits.counters import KEY_PREFIX, Charge, MemoryCounters, RedisCounters, reserve
from plugins.limits.policy import Policy, counter_key, customer_policies, key_policies, parse_policies
from plugins.limits.windows import bounds, seconds_left
from proxy.call import Call, KeyInfo, Reply, Usage
from proxy.catalog import load_catalog
from proxy.errors import GatewayError, ValidationFailed
from proxy.metrics import Metrics
from proxy.model_table import ModelTable
from proxy.params import GatewayParams
from proxy.settings import ApiKey, parse_settings
from proxy.state.redis import RedisClient
from tests.conftest import REDIS_URL


def ts(text: str) -> float:
    return float(calendar.timegm(datetime.fromisoformat(text).timetuple()))


class Clock:
    def __init__(self, now: str) -> None:
        self.now = ts(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- windows ------------------------------------------------------------------------------


@pytest.mark.parametrize(("window", "now", "start", "end"), [
    ("minute", "2026-11-24T10:15:42", "2026-11-24T10:15:00", "2026-11-24T10:16:00"),
    ("hour", "2026-11-24T10:15:42", "2026-11-24T10:00:00", "2026-11-24T11:00:00"),
    ("day", "2026-11-24T10:15:42", "2026-11-24T00:00:00", "2026-11-25T00:00:00"),
    ("week", "2026-11-26T10:15:42", "2026-11-23T00:00:00", "2026-11-30T00:00:00"),  # Thursday -> Monday
    ("month", "2026-12-31T23:59:59", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
    ("month", "2026-02-10T00:00:00", "2026-02-01T00:00:00", "2026-03-01T00:00:00"),
    ("year", "2026-11-24T10:15:42", "2026-01-01T00:00:00", "2027-01-01T00:00:00"),
])
def test_windows_are_calendar_aligned_in_utc(window, now, start, end):
    assert bounds(window, ts(now)) == (ts(start), ts(end))


def test_lifetime_never_resets():
    assert bounds("lifetime", ts("2026-11-24T10:00:00")) == (0, None)
    assert seconds_left(None) is None
    assert seconds_left(100.0, 40.2) == 60  # whole seconds, rounded up
    assert seconds_left(100.0, 99.99) == 1


# -- policies -----------------------------------------------------------------------------


def test_policy_validation_names_the_field():
    ok = {"name": "p", "scope": "customer", "metric": "cost", "window": "day", "block_threshold": 5}
    assert parse_policies([ok])[0].block_threshold == 5
    cases = [
        ({**ok, "metric": "dollars"}, "policies[0].metric"),
        ({**ok, "window": "fortnight"}, "policies[0].window"),
        ({**ok, "block_threshold": -1}, "block_threshold"),
        ({**ok, "block_threshold": None}, "set warn_threshold, block_threshold or both"),
        ({**ok, "warn_threshold": 9}, "warn_threshold must be below block_threshold"),
        ({**ok, "scope": "organization", "scope_id": "x"}, "scope_id"),
        ({**ok, "colour": "red"}, "colour"),
        ({**ok, "name": "a:b"}, "name"),
    ]
    for raw, expected in cases:
        with pytest.raises(ValueError, match=re.escape(expected)):
            parse_policies([raw])
    with pytest.raises(ValueError, match=r"policies\[1\].name: duplicate"):
        parse_policies([ok, ok])


def test_customer_params_map_onto_policies():
    policies = customer_policies("acme", {"customer_identifier": "acme", "period_budget": 10, "budget_duration": "weekly",
                                          "total_budget": 100, "rate_limit": 30, "markup_percentage": 20})
    assert [(p.name, p.metric, p.window, p.block_threshold, p.markup) for p in policies] == [
        ("customer.period_budget", "cost", "week", 10.0, 1.2),
        ("customer.total_budget", "cost", "lifetime", 100.0, 1.2),
        ("customer.rate_limit", "requests", "minute", 30.0, 1.0),
    ]
    assert customer_policies("acme", {"period_budget": 1})[0].window == "month"  # the default duration
    with pytest.raises(ValueError, match="customer_params.budget_duration"):
        customer_policies("acme", {"period_budget": 1, "budget_duration": "hourly"})
    with pytest.raises(ValueError, match="customer_params.rate_limit"):
        customer_policies("acme", {"rate_limit": "many"})


def test_api_key_fields_map_onto_policies():
    keys = [ApiKey(name="a", key_hash="sha256:" + "0" * 64, rate_limit=60, spending_limit=5.0, max_usage=-1)]
    assert [(p.name, p.scope_id, p.metric, p.window, p.block_threshold) for p in key_policies(keys)] == [
        ("key.a.rate_limit", "a", "requests", "minute", 60.0),
        ("key.a.spending_limit", "a", "cost", "lifetime", 5.0),
    ]  # max_usage -1: unlimited


# -- counters -----------------------------------------------------------------------------


def counters_under_test() -> list[Any]:
    return [MemoryCounters(), RedisCounters(RedisClient(REDIS_URL))]


@pytest.fixture
def redis_keys():
    """A unique key prefix for Redis counters, deleted afterwards."""
    prefix = f"t{os.urandom(4).hex()}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{KEY_PREFIX}*{prefix}*"):
        client.delete(key)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_reserve_is_all_or_nothing(kind, redis_keys):
    async def run() -> None:
        counters = MemoryCounters() if kind == "memory" else RedisCounters(RedisClient(REDIS_URL))
        a, b = f"{redis_keys}:a", f"{redis_keys}:b"
        first = await reserve(counters, [Charge(a, 1, 2, 60), Charge(b, 5, None, 60)])
        assert first.admitted and first.values == [1.0, 5.0]
        second = await reserve(counters, [Charge(a, 1, 2, 60), Charge(b, 5, None, 60)])
        assert second.admitted and second.values == [2.0, 10.0]
        third = await reserve(counters, [Charge(b, 5, None, 60), Charge(a, 1, 2, 60)])
        assert not third.admitted and third.refused_by == 1 and third.values == [10.0, 2.0]
        # the refusal added nothing anywhere
        fourth = await reserve(counters, [Charge(b, 0, None, 60)])
        assert fourth.values == [10.0]
        await counters.add([Charge(b, -2.5, None, 60)])
        assert (await reserve(counters, [Charge(b, 0, None, 60)])).values == [7.5]
        await counters.close()

    asyncio.run(run())


def test_an_amount_that_would_pass_the_limit_is_refused_and_a_full_counter_refuses_even_zero():
    async def run() -> None:
        counters = MemoryCounters()
        assert not (await reserve(counters, [Charge("c", 11, 10, 60)])).admitted
        assert (await reserve(counters, [Charge("c", 10, 10, 60)])).admitted
        assert not (await reserve(counters, [Charge("c", 0, 10, 60)])).admitted

    asyncio.run(run())


def test_memory_counters_expire_with_their_window():
    clock = Clock("2026-11-24T10:00:00")
    counters = MemoryCounters(clock)
    assert counters.reserve_now([Charge("k", 1, 1, 60)]).admitted
    assert not counters.reserve_now([Charge("k", 1, 1, 60)]).admitted
    clock.advance(61)
    assert counters.reserve_now([Charge("k", 1, 1, 60)]).admitted
    clock.advance(3600)
    counters.reserve_now([Charge("other", 1, None, 60)])  # a new counter sweeps the expired ones
    assert len(counters) == 1


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_concurrent_reservations_admit_exactly_the_limit(kind, redis_keys):
    async def run() -> None:
        counters = MemoryCounters() if kind == "memory" else RedisCounters(RedisClient(REDIS_URL))
        results = await asyncio.gather(*(reserve(counters, [Charge(f"{redis_keys}:n", 1, 50, 60)]) for _ in range(200)))
        assert sum(r.admitted for r in results) == 50
        await counters.close()

    asyncio.run(run())


def test_redis_counters_expire_after_their_window(redis_keys):
    async def run() -> None:
        counters = RedisCounters(RedisClient(REDIS_URL))
        await reserve(counters, [Charge(f"{redis_keys}:ttl", 1, None, 90), Charge(f"{redis_keys}:life", 1, None, 0)])
        client = redis.Redis.from_url(REDIS_URL)
        assert 85 <= client.ttl(f"{KEY_PREFIX}{redis_keys}:ttl") <= 90
        assert client.ttl(f"{KEY_PREFIX}{redis_keys}:life") == -1  # lifetime: kept
        await counters.close()

    asyncio.run(run())


# -- the stage ----------------------------------------------------------------------------


SETTINGS = parse_settings({
    "providers": [{"id": "p", "protocol": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "x"}],
    "models": [{"name": "priced", "provider": "p", "prices": {"input": 1000.0, "output": 2000.0}}],
    "auto_providers": False,
}, "test")
MODELS = ModelTable(SETTINGS, load_catalog())


def make_call(model: str = "priced", key: str = "team-a", text: str = "x" * 400, **params: Any) -> Call:
    call = Call(endpoint="chat", path="/api/chat/completions",
                body={"model": model, "messages": [{"role": "user", "content": text}]},
                params=GatewayParams(**params), headers={})
    call.key = KeyInfo(name=key)
    return call


class Upstream:
    """The rest of the pipeline: answers with the given usage and cost, once the checks held on the
    call have passed (as the core's dispatch does before its upstream call)."""

    def __init__(self, usage: Usage | None = None, cost: float = 0.0) -> None:
        self.usage = usage or Usage(prompt_tokens=100, completion_tokens=50)
        self.cost = cost
        self.calls = 0

    async def __call__(self, call: Call) -> Reply:
        await call.ready()
        self.calls += 1
        call.usage = self.usage
        call.cost = self.cost
        call.status_code = 200
        return Reply(200, body=b"{}")


class Notifier:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, alert: Any, targets: Any) -> None:
        self.sent.append(alert)


def stage_with(*policies: dict[str, Any], clock: Clock | None = None, counters: Any = None) -> LimitsStage:
    clock = clock or Clock("2026-11-24T10:00:00")
    counters = counters if counters is not None else MemoryCounters(clock)  # (empty counters are falsy)
    return LimitsStage(parse_policies(list(policies)), counters, MODELS, Metrics(), Notifier(), clock=clock)


async def request(stage: LimitsStage, call: Call, upstream: Upstream) -> Reply:
    """One request through the stage, finished the way the gateway finishes it."""
    reply = await stage(call, upstream)
    for hook in call.finish_hooks:
        hook(call)
    while stage._tasks or stage._fixed:  # reconciliations go out at the end of the loop turn
        await asyncio.sleep(0)
    return reply


async def admitted(stage: LimitsStage, upstream: Upstream, n: int, **call_args: Any) -> int:
    count = 0
    for _ in range(n):
        try:
            await request(stage, make_call(**call_args), upstream)
            count += 1
        except LimitExceeded:
            pass
    return count


@pytest.mark.parametrize(("window", "step"), [("minute", 60), ("hour", 3600), ("day", 86400), ("week", 7 * 86400),
                                              ("month", 31 * 86400), ("year", 366 * 86400)])
def test_requests_per_window_block_and_reset(window, step):
    async def run() -> None:
        clock = Clock("2026-11-24T10:00:00")
        stage = stage_with({"name": "r", "scope": "api_key", "metric": "requests", "window": window,
                            "block_threshold": 3}, clock=clock)
        upstream = Upstream()
        assert await admitted(stage, upstream, 5) == 3
        assert upstream.calls == 3  # a blocked request never reaches the upstream
        clock.advance(step)
        assert await admitted(stage, upstream, 5) == 3

    asyncio.run(run())


def test_lifetime_requests_never_reset():
    async def run() -> None:
        clock = Clock("2026-11-24T10:00:00")
        stage = stage_with({"name": "r", "scope": "api_key", "metric": "requests", "window": "lifetime",
                            "block_threshold": 2}, clock=clock)
        assert await admitted(stage, Upstream(), 3) == 2
        clock.advance(10 * 365 * 86400)
        assert await admitted(stage, Upstream(), 3) == 0

    asyncio.run(run())


def test_tokens_reserve_the_estimate_then_count_what_was_used():
    async def run() -> None:
        stage = stage_with({"name": "t", "scope": "api_key", "metric": "tokens", "window": "hour",
                            "block_threshold": 400})
        upstream = Upstream(Usage(prompt_tokens=100, completion_tokens=50))  # 150 a request; estimate 100
        reply = await request(stage, make_call(), upstream)
        assert reply.headers["x-ratelimit-remaining"] == "300"  # after the estimate: 400 - 100
        await request(stage, make_call(), upstream)  # counter now 300 (two reconciled to 150)
        with pytest.raises(LimitExceeded) as blocked:  # 300 + an estimate of 100 = 400: allowed
            await request(stage, make_call(), upstream)
            await request(stage, make_call(), upstream)  # 450 + 100 > 400
        assert "450 used" in blocked.value.detail

    asyncio.run(run())


def test_cost_uses_the_models_input_price_then_the_real_cost():
    async def run() -> None:
        stage = stage_with({"name": "c", "scope": "customer", "metric": "cost", "window": "day",
                            "block_threshold": 0.5})
        # 400 chars = 100 tokens at $1000/1M = $0.1 estimated; each answer really costs $0.2
        upstream = Upstream(cost=0.2)
        assert await admitted(stage, upstream, 5, customer_identifier="acme") == 3  # 0.2, 0.4, then 0.6 > 0.5
        assert await admitted(stage, upstream, 1, customer_identifier="other") == 1  # each customer separately
        assert await admitted(stage, upstream, 1) == 1  # no customer: the policy does not apply

    asyncio.run(run())


def test_a_failed_answer_gives_back_its_token_and_cost_reservation_but_counts_as_a_request():
    async def run() -> None:
        stage = stage_with({"name": "c", "scope": "organization", "metric": "cost", "window": "day",
                            "block_threshold": 0.15},
                           {"name": "r", "scope": "organization", "metric": "requests", "window": "day",
                            "block_threshold": 5})
        failing = Upstream(Usage(), cost=0.0)
        assert await admitted(stage, failing, 7) == 5  # the cost reservations came back; requests counted

    asyncio.run(run())


def test_scopes_and_scope_ids():
    async def run() -> None:
        stage = stage_with(
            {"name": "only-b", "scope": "api_key", "scope_id": "team-b", "metric": "requests", "window": "day",
             "block_threshold": 1},
            {"name": "per-model", "scope": "model", "metric": "requests", "window": "day", "block_threshold": 2},
        )
        upstream = Upstream()
        assert await admitted(stage, upstream, 3, key="team-a", model="priced") == 2  # per-model caps it
        assert await admitted(stage, upstream, 3, key="team-b", model="other") == 1  # only-b caps team-b
        assert await admitted(stage, upstream, 3, key="team-a", model="other") == 1  # "other" has 1 left

    asyncio.run(run())


def test_warn_lets_requests_through_and_alerts_once_per_window():
    async def run() -> None:
        clock = Clock("2026-11-24T10:00:00")
        policy = {"name": "w", "scope": "api_key", "metric": "requests", "window": "hour", "warn_threshold": 2,
                  "block_threshold": 4, "notify": {"webhooks": [{"url": "http://127.0.0.1:9/hook", "secret": "s"}]}}
        stage = stage_with(policy, clock=clock)
        assert await admitted(stage, Upstream(), 6) == 4
        sent = stage.notifier.sent
        assert [(a.event, a.threshold, a.value) for a in sent] == [("limit.warn", 2.0, 2.0), ("limit.block", 4.0, 4.0)]
        assert stage.metrics.limit_warnings.labels("api_key", "requests")._value.get() == 3  # requests 2, 3, 4
        assert stage.metrics.limit_blocks.labels("api_key", "requests")._value.get() == 2
        clock.advance(3600)  # a new window: new alerts
        assert await admitted(stage, Upstream(), 5) == 4
        assert len(sent) == 4

    asyncio.run(run())


def test_a_policy_without_notify_targets_sends_nothing():
    async def run() -> None:
        stage = stage_with({"name": "w", "scope": "api_key", "metric": "requests", "window": "hour",
                            "warn_threshold": 1})
        assert await admitted(stage, Upstream(), 3) == 3
        assert stage.notifier.sent == []

    asyncio.run(run())


def test_the_429_names_the_limit_and_when_it_resets():
    async def run() -> None:
        clock = Clock("2026-11-24T10:59:20")
        stage = stage_with({"name": "hourly", "scope": "api_key", "metric": "requests", "window": "hour",
                            "block_threshold": 1}, clock=clock)
        await request(stage, make_call(), Upstream())
        with pytest.raises(LimitExceeded) as blocked:
            await request(stage, make_call(), Upstream())
        error = blocked.value
        assert error.status == 429
        assert error.extra == {"retry_after": 40}
        assert error.headers["retry-after"] == "40"
        assert error.headers["x-ratelimit-limit"] == "1" and error.headers["x-ratelimit-remaining"] == "0"
        assert error.headers["x-ratelimit-reset"] == "40"
        assert error.detail == "Limit exceeded: limit 'hourly' allows api key 'team-a' 1 requests per hour; 1 used"

    asyncio.run(run())


def test_headers_show_the_tightest_policy():
    async def run() -> None:
        stage = stage_with(
            {"name": "loose", "scope": "api_key", "metric": "requests", "window": "day", "block_threshold": 100},
            {"name": "tight", "scope": "api_key", "metric": "requests", "window": "minute", "block_threshold": 4},
        )
        reply = await request(stage, make_call(), Upstream())
        assert reply.headers["x-ratelimit-policy"] == "tight;metric=requests;window=minute"
        assert reply.headers["x-ratelimit-remaining"] == "3"
        assert rate_limit_headers([], 0.0) == {}

    asyncio.run(run())


def test_customer_budgets_from_the_request_are_remembered():
    async def run() -> None:
        stage = stage_with()
        budget = {"customer_identifier": "acme", "rate_limit": 2}
        assert await admitted(stage, Upstream(), 1, customer_params=budget) == 1
        # later requests of the same customer that do not repeat the budget still get it
        assert await admitted(stage, Upstream(), 3, customer_identifier="acme") == 1
        with pytest.raises(ValidationFailed) as bad:
            await request(stage, make_call(customer_params={"customer_identifier": "x", "period_budget": "lots"}),
                          Upstream())
        assert bad.value.field == "customer_params.period_budget"

    asyncio.run(run())


def test_customer_budget_counts_the_markup():
    async def run() -> None:
        stage = stage_with()
        budget = {"customer_identifier": "m", "total_budget": 1.0, "markup_percentage": 100}
        # each answer costs $0.3, counted as $0.6 with a 100% markup: the second one passes the budget
        assert await admitted(stage, Upstream(cost=0.3), 3, customer_params=budget) == 2

    asyncio.run(run())


def test_a_policy_added_later_applies_to_the_next_request():
    async def run() -> None:
        stage = stage_with({"name": "day", "scope": "api_key", "metric": "requests", "window": "day",
                            "block_threshold": 100})
        assert await admitted(stage, Upstream(), 2) == 2  # the (key, customer, model) rules are now remembered
        stage.set_policies([*stage.configured, *parse_policies([
            {"name": "one", "scope": "api_key", "scope_id": "team-a", "metric": "requests", "window": "minute",
             "block_threshold": 1}])])
        assert await admitted(stage, Upstream(), 3) == 1
        stage.set_policies(stage.configured)  # and a removed one stops applying
        assert await admitted(stage, Upstream(), 3) == 3

    asyncio.run(run())


def test_a_changed_customer_budget_applies_at_once_and_a_forgotten_one_stops(monkeypatch):
    async def run() -> None:
        stage = stage_with()
        assert await admitted(stage, Upstream(), 2, customer_identifier="acme") == 2  # no budget yet
        assert await admitted(stage, Upstream(), 2, customer_params={"customer_identifier": "acme",
                                                                        "rate_limit": 1}) == 1
        raised = {"customer_identifier": "acme", "rate_limit": 3}
        assert await admitted(stage, Upstream(), 3, customer_params=raised) == 2  # 1 of 3 already used
        monkeypatch.setattr("plugins.limits.REMEMBERED_CUSTOMERS", 1)
        assert await admitted(stage, Upstream(), 1, customer_params={"customer_identifier": "other",
                                                                        "rate_limit": 5}) == 1
        assert await admitted(stage, Upstream(), 2, customer_identifier="acme") == 2  # acme's budget is forgotten

    asyncio.run(run())


def test_budgets_stored_for_a_customer_apply_and_stop_applying_when_removed():
    async def run() -> None:
        stage = stage_with({"name": "day", "scope": "api_key", "metric": "requests", "window": "day",
                            "block_threshold": 100})  # so that the stage works out the rules of every request
        assert await admitted(stage, Upstream(), 2, customer_identifier="acme") == 2
        stage.set_stored_customers({"acme": {"rate_limit": 3}})
        assert await admitted(stage, Upstream(), 4, customer_identifier="acme") == 3
        stage.set_stored_customers({})
        assert await admitted(stage, Upstream(), 2, customer_identifier="acme") == 2

    asyncio.run(run())


def test_each_request_is_counted_in_the_window_it_arrives_in():
    async def run() -> None:
        clock = Clock("2026-11-24T10:00:59")
        stage = stage_with({"name": "r", "scope": "api_key", "metric": "requests", "window": "minute",
                            "block_threshold": 10}, clock=clock)
        upstream = Upstream()
        await request(stage, make_call(), upstream)
        clock.advance(1)  # the next minute: a new counter
        reply = await request(stage, make_call(), upstream)
        assert reply.headers["x-ratelimit-remaining"] == "9"
        assert reply.headers["x-ratelimit-reset"] == "60"
        clock.advance(-30)  # a clock stepped back counts in the window it now reads
        reply = await request(stage, make_call(), upstream)
        assert reply.headers["x-ratelimit-remaining"] == "8"
        assert reply.headers["x-ratelimit-reset"] == "30"
        key = counter_key(stage.policies[0], "team-a", int(ts("2026-11-24T10:00:00")))
        assert await stage.counters.value(key) == 2

    asyncio.run(run())


class DownCounters:
    def submit_reserve(self, charges):
        answer = asyncio.get_running_loop().create_future()
        answer.set_exception(ConnectionError("redis is down"))
        return answer

    def decision(self, answer):
        raise AssertionError("never called: the answer is an error")

    async def add(self, charges):
        raise ConnectionError("redis is down")

    async def close(self):
        pass


def test_backend_down_fails_open_by_default():
    async def run() -> None:
        stage = stage_with({"name": "r", "scope": "api_key", "metric": "requests", "window": "day",
                            "block_threshold": 1}, counters=DownCounters())
        call = make_call()
        reply = await request(stage, call, Upstream())
        assert reply.status == 200 and "x-ratelimit-limit" not in reply.headers
        assert call.warnings == ["limits not checked: the counter backend is unreachable"]
        assert stage.metrics.limit_backend_errors.labels("open")._value.get() == 1

    asyncio.run(run())


def test_backend_down_fails_closed_when_a_policy_says_so():
    async def run() -> None:
        stage = stage_with({"name": "strict", "scope": "api_key", "metric": "requests", "window": "day",
                            "block_threshold": 1, "on_backend_error": "closed"}, counters=DownCounters())
        upstream = Upstream()
        with pytest.raises(GatewayError) as refused:
            await request(stage, make_call(), upstream)
        assert refused.value.status == 503 and "'strict'" in refused.value.detail
        assert upstream.calls == 0

    asyncio.run(run())


def test_no_policy_no_work():
    async def run() -> None:
        stage = stage_with()
        call = make_call()
        reply = await request(stage, call, Upstream())
        assert call.finish_hooks == [] and "x-ratelimit-limit" not in reply.headers

    asyncio.run(run())


def test_policy_from_parse_is_frozen():
    policy = Policy(name="p", scope="organization", metric="requests", window="day", block_threshold=1)
    with pytest.raises(AttributeError):
        policy.name = "q"  # type: ignore[misc]


# -- the gate: later stages go on while the backend decides ------------------------------------------


class SlowCounters(MemoryCounters):
    """Memory counters whose answers come only when the test releases them (as Redis's would)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.pending: list[tuple[asyncio.Future[Any], Any]] = []

    def submit_reserve(self, charges: list[Charge]) -> asyncio.Future[Any]:
        answer = asyncio.get_running_loop().create_future()
        self.pending.append((answer, self.reserve_now(charges)))
        return answer

    def release(self) -> None:
        for answer, decision in self.pending:
            answer.set_result(decision)
        self.pending.clear()


ONE_A_DAY = {"name": "one", "scope": "api_key", "metric": "requests", "window": "day", "block_threshold": 1}


def test_later_stages_run_before_the_decision_and_the_upstream_waits_for_it():
    async def run() -> None:
        clock = Clock("2026-11-24T10:00:00")
        counters = SlowCounters(clock)
        stage = stage_with(ONE_A_DAY, clock=clock, counters=counters)
        upstream = Upstream()
        seen: list[str] = []

        async def lookup_then_upstream(call: Call) -> Reply:  # what the cache stage does on a miss
            seen.append("lookup sent")
            return await upstream(call)

        for admitted in (True, False):
            call = make_call()
            answer = asyncio.ensure_future(stage(call, lookup_then_upstream))
            for _ in range(5):
                await asyncio.sleep(0)
            assert seen.pop() == "lookup sent" and upstream.calls == (0 if admitted else 1)  # waiting in ready()
            counters.release()
            if admitted:
                assert (await answer).status == 200 and upstream.calls == 1
            else:
                with pytest.raises(LimitExceeded):
                    await answer
                assert upstream.calls == 1  # the refused request never reached it

    asyncio.run(run())


def test_a_refusal_wins_over_a_later_stage_that_answers_or_fails_without_waiting():
    """A stage after limits that answers on its own (without Call.ready) or fails (an unknown model):
    the client still gets the 429, as when the limits stage decided before calling on."""

    async def answers(call: Call) -> Reply:
        return Reply(200, body=b"{}")

    async def fails(call: Call) -> Reply:
        raise GatewayError("Model 'nope' is not served here", 404)

    async def run() -> None:
        for later in (answers, fails):
            clock = Clock("2026-11-24T10:00:00")
            counters = SlowCounters(clock)
            stage = stage_with(ONE_A_DAY, clock=clock, counters=counters)
            first = asyncio.ensure_future(stage(make_call(), later))
            await asyncio.sleep(0)  # the request reaches the later stage, its reservation still undecided
            counters.release()
            if later is answers:
                assert (await first).status == 200
            else:
                with pytest.raises(GatewayError) as failed:
                    await first
                assert failed.value.status == 404  # admitted: the later stage's own error
            second = asyncio.ensure_future(stage(make_call(), later))
            await asyncio.sleep(0)
            counters.release()
            with pytest.raises(LimitExceeded):
                await second

    asyncio.run(run())


# -- reconciliations: merged per loop turn --------------------------------------------------------------


class RecordingRedisCounters(RedisCounters):
    def __init__(self, client: RedisClient) -> None:
        super().__init__(client)
        self.added: list[list[Charge]] = []

    def add(self, charges: list[Charge]) -> asyncio.Future[None]:
        self.added.append(list(charges))
        return super().add(charges)


def test_reconciliations_finishing_in_one_loop_turn_reach_redis_as_one_merged_call(redis_keys):
    """Three requests that finish together: one ADD script call, one charge per counter, holding the sum of
    their corrections; the counters end at what was used."""

    async def run() -> None:
        counters = RecordingRedisCounters(RedisClient(REDIS_URL))
        tokens = {"name": f"tok-{redis_keys}", "scope": "api_key", "metric": "tokens", "window": "day",
                  "block_threshold": 1e9}
        cost = {"name": f"usd-{redis_keys}", "scope": "api_key", "metric": "cost", "window": "day",
                "block_threshold": 1e9}
        stage = stage_with(tokens, cost, counters=counters)
        upstream = Upstream(usage=Usage(prompt_tokens=10, completion_tokens=5), cost=0.25)
        calls = [make_call(text="x" * (400 * (i + 1))) for i in range(3)]  # three different estimates
        await asyncio.gather(*(stage(call, upstream) for call in calls))
        for call in calls:
            for hook in call.finish_hooks:
                hook(call)
        assert counters.added == []  # nothing sent yet: at the end of this loop turn
        while stage._tasks or stage._fixed:
            await asyncio.sleep(0)
        assert len(counters.added) == 1 and len(counters.added[0]) == 2  # one call; one charge per counter
        start = bounds("day", stage.clock())[0]
        for policy, used in ((stage.policies[0], 3 * 15.0), (stage.policies[1], 3 * 0.25)):
            assert await counters.value(counter_key(policy, "team-a", start)) == pytest.approx(used)

    asyncio.run(run())
