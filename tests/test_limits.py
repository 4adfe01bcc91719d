"""The limits stage end to end: gateway processes, the official SDKs, the real Redis, a local
alert receiver. 200 concurrent requests against a limit of 50 admit exactly 50, in memory and
across two gateway processes on Redis; streams reconcile tokens and cost; Redis down fails open
or closed as each policy says; alerts arrive signed and once."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis
from aiohttp import web

from plugins.limits.counters import KEY_PREFIX
from tests.conftest import KEY, REDIS_DB, REDIS_URL, GatewayProcess, base_config, free_port
from tests.mock_server import MockServer
from tests.relay import Relay

AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]
WEBHOOK_SECRET = "whsec-limits-test-9f8e7d"


def limits(*policies: dict[str, Any]) -> list[Any]:
    return ["auth", {"name": "limits", "options": {"policies": list(policies)}}]


def unique(name: str) -> str:
    return f"{name}-{os.urandom(4).hex()}"


@pytest.fixture
def redis_cleanup():
    """Names used in a test; their counters are deleted afterwards (lifetime counters never expire)."""
    names: list[str] = []
    yield names
    client = redis.Redis.from_url(REDIS_URL)
    for name in names:
        for key in client.scan_iter(match=f"{KEY_PREFIX}*{name}*"):
            client.delete(key)


async def burst(urls: list[str], n: int, body: dict[str, Any] | None = None) -> list[int]:
    """n concurrent chat requests, spread over the gateways' urls; their statuses."""
    body = body or {"model": "gpt-test", "messages": MESSAGES}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        replies = await asyncio.gather(*(client.post(f"{urls[i % len(urls)]}/api/chat/completions", json=body,
                                                     headers=AUTH) for i in range(n)))
    return [r.status_code for r in replies]


def test_200_concurrent_requests_against_50_admit_exactly_50_in_memory(start_gateway, mock, tmp_path):
    gw = start_gateway(pipeline=limits({
        "name": "fifty", "scope": "api_key", "metric": "requests", "window": "lifetime", "block_threshold": 50}))
    mock.reset()
    statuses = asyncio.run(burst([gw.url], 200))
    assert statuses.count(200) == 50 and statuses.count(429) == 150
    assert mock.count("mock-ok") == 50  # a refused request never reaches the upstream


def test_200_concurrent_requests_against_50_admit_exactly_50_across_two_gateways_on_redis(
        start_gateway, mock, tmp_path, redis_cleanup):
    name = unique("fifty")
    redis_cleanup.append(name)
    policy = {"name": name, "scope": "api_key", "metric": "requests", "window": "lifetime", "block_threshold": 50}
    state = {"counters": {"backend": "redis", "url": REDIS_URL}}
    a = start_gateway(pipeline=limits(policy), state=state, workers=2)
    b = start_gateway(pipeline=limits(policy), state=state, workers=2)
    mock.reset()
    statuses = asyncio.run(burst([a.url, b.url], 200))
    assert statuses.count(200) == 50 and statuses.count(429) == 150
    assert mock.count("mock-ok") == 50


def test_block_is_a_429_with_retry_after_and_rate_limit_headers(start_gateway, mock, tmp_path):
    gw = start_gateway(pipeline=limits({
        "name": "per-minute", "scope": "api_key", "metric": "requests", "window": "minute", "block_threshold": 2}))
    client = openai.OpenAI(base_url=f"{gw.url}/api", api_key=KEY, max_retries=0)
    first = client.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES)
    assert first.headers["x-ratelimit-limit"] == "2"
    assert first.headers["x-ratelimit-remaining"] == "1"
    assert 1 <= int(first.headers["x-ratelimit-reset"]) <= 60
    assert first.headers["x-ratelimit-policy"] == "per-minute;metric=requests;window=minute"
    second = client.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES)
    if second.headers["x-ratelimit-remaining"] != "0":  # the minute turned between the two: start again
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as blocked:
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    response = blocked.value.response
    body = response.json()
    assert set(body) == {"detail", "retry_after"}
    assert body["detail"] == "Limit exceeded: limit 'per-minute' allows api key 'tests' 2 requests per minute; 2 used"
    assert 1 <= body["retry_after"] <= 60
    assert response.headers["retry-after"] == str(body["retry_after"])
    assert response.headers["x-ratelimit-remaining"] == "0"
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 429 and "per-minute" in record["error_message"]
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert 'llmrelay_limit_blocks_total{metric="requests",scope="api_key"} 1.0' in metrics


def test_lifetime_block_has_no_retry_after(start_gateway, mock, tmp_path):
    gw = start_gateway(pipeline=limits({
        "name": "once", "scope": "organization", "metric": "requests", "window": "lifetime", "block_threshold": 1}))
    ok = httpx.post(f"{gw.url}/api/chat/completions", json={"model": "gpt-test", "messages": MESSAGES}, headers=AUTH)
    assert ok.status_code == 200 and "x-ratelimit-reset" not in ok.headers
    blocked = httpx.post(f"{gw.url}/api/chat/completions", json={"model": "gpt-test", "messages": MESSAGES},
                         headers=AUTH)
    assert blocked.status_code == 429
    assert blocked.json()["retry_after"] is None and "retry-after" not in blocked.headers
    assert "in total" in blocked.json()["detail"]


def redis_value(name: str, scope_value: str = "tests", scope: str = "api_key", window: str = "lifetime") -> float:
    value = redis.Redis.from_url(REDIS_URL).get(f"{KEY_PREFIX}{name}:{scope}:{scope_value}:{window}:0")
    return float(value or 0)


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.parametrize("model", ["gpt-test", "gpt-cut"])
def test_streams_reconcile_tokens_and_cost_to_what_was_used(start_gateway, mock, tmp_path, redis_cleanup, model):
    tokens, cost = unique("tokens"), unique("cost")
    redis_cleanup += [tokens, cost]
    gw = start_gateway(pipeline=limits(
        {"name": tokens, "scope": "api_key", "metric": "tokens", "window": "lifetime", "block_threshold": 1_000_000},
        {"name": cost, "scope": "api_key", "metric": "cost", "window": "lifetime", "block_threshold": 1000}),
        state={"counters": {"backend": "redis", "url": REDIS_URL}},
        extra_models=[{"name": "gpt-cut", "provider": "mock", "model": "mock-cut-3",
                       "prices": {"input": 1.0, "output": 2.0}}])
    client = openai.OpenAI(base_url=f"{gw.url}/api", api_key=KEY, max_retries=0)
    log_ids = []
    for _ in range(2):
        stream = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "count to three " * 20}], stream=True)
        log_ids.append(stream.headers["x-respan-log-id"])
        try:
            for _chunk in stream.parse():
                pass
        except openai.APIError:
            assert model == "gpt-cut"  # the cut stream ends with an SSE error event
    records = [gw.record(log_id) for log_id in log_ids]
    used_tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in records)
    used_cost = sum(r["cost"] for r in records)
    assert used_tokens > 0 and used_cost > 0
    assert wait_for(lambda: redis_value(tokens) == used_tokens), (redis_value(tokens), used_tokens)
    assert wait_for(lambda: redis_value(cost) == pytest.approx(used_cost, rel=1e-9))


def test_counters_survive_a_restart_on_redis(start_gateway, mock, tmp_path, redis_cleanup):
    name = unique("restart")
    redis_cleanup.append(name)
    config = {"pipeline": limits({"name": name, "scope": "api_key", "metric": "requests", "window": "lifetime",
                                  "block_threshold": 3}),
              "state": {"counters": {"backend": "redis", "url": REDIS_URL}}}
    first = start_gateway(**config)
    assert asyncio.run(burst([first.url], 2)) == [200, 200]
    first.stop()
    second = start_gateway(**config)
    assert sorted(asyncio.run(burst([second.url], 3))) == [200, 429, 429]


def test_redis_down_fails_open_by_default(start_gateway, mock, tmp_path):
    down = f"redis://127.0.0.1:{free_port()}/0"
    gw = start_gateway(pipeline=limits({
        "name": "open", "scope": "api_key", "metric": "requests", "window": "minute", "block_threshold": 1}),
        state={"counters": {"backend": "redis", "url": down}})
    replies = [httpx.post(f"{gw.url}/api/chat/completions", json={"model": "gpt-test", "messages": MESSAGES},
                          headers=AUTH) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 200]
    record = gw.record(replies[0].headers["x-respan-log-id"])
    assert "limits not checked: the counter backend is unreachable" in record["warnings"]
    assert 'llmrelay_limit_backend_errors_total{outcome="open"} 3.0' in httpx.get(f"{gw.url}/metrics").text
    assert "limit counters unreachable" in gw.output.read_text()


def test_redis_down_fails_closed_when_the_policy_says_so(start_gateway, mock, tmp_path):
    down = f"redis://127.0.0.1:{free_port()}/0"
    gw = start_gateway(pipeline=limits({
        "name": "strict", "scope": "api_key", "metric": "requests", "window": "minute", "block_threshold": 100,
        "on_backend_error": "closed"}), state={"counters": {"backend": "redis", "url": down}})
    mock.reset()
    reply = httpx.post(f"{gw.url}/api/chat/completions", json={"model": "gpt-test", "messages": MESSAGES}, headers=AUTH)
    assert reply.status_code == 503
    assert "limit 'strict' does not admit unchecked requests" in reply.json()["detail"]
    assert mock.count("mock-ok") == 0


def test_customer_params_rate_limit_and_budget(start_gateway, mock, tmp_path):
    gw = start_gateway(pipeline=limits())
    client = openai.OpenAI(base_url=f"{gw.url}/api", api_key=KEY, max_retries=0)
    params = {"customer_params": {"customer_identifier": "acme", "rate_limit": 2}}
    client.chat.completions.create(model="gpt-test", messages=MESSAGES, extra_body=params)
    client.chat.completions.create(model="gpt-test", messages=MESSAGES, extra_body={"customer_identifier": "acme"})
    with pytest.raises(openai.RateLimitError) as blocked:
        client.chat.completions.create(model="gpt-test", messages=MESSAGES, extra_body=params)
    assert "customer 'acme'" in blocked.value.response.json()["detail"]
    # a budget of $0.00003: a gpt-test answer costs $0.000024, so the second one passes it and the third is refused
    budget = {"customer_params": {"customer_identifier": "thrifty", "total_budget": 0.00003}}
    for _ in range(2):
        client.chat.completions.create(model="gpt-test", messages=MESSAGES, extra_body=budget)
        time.sleep(0.1)  # the reconciliation lands in the background
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-test", messages=MESSAGES, extra_body=budget)
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.chat.completions.create(model="gpt-test", messages=MESSAGES, extra_body={
            "customer_params": {"customer_identifier": "x", "budget_duration": "hourly", "period_budget": 1}})
    assert "customer_params.budget_duration" in bad.value.response.json()["errors"]


def test_api_key_rate_limit_from_the_config(start_gateway, mock, tmp_path):
    from proxy.keys import hash_key

    limited = "sk-limited-key-123"
    keys = [*base_config(mock, tmp_path)["keys"], {"name": "limited", "key_hash": hash_key(limited), "max_usage": 2}]
    gw = start_gateway(pipeline=limits(), keys=keys)
    statuses = [httpx.post(f"{gw.url}/api/chat/completions", json={"model": "gpt-test", "messages": MESSAGES},
                           headers={"Authorization": f"Bearer {limited}"}).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    other = httpx.post(f"{gw.url}/api/chat/completions", json={"model": "gpt-test", "messages": MESSAGES}, headers=AUTH)
    assert other.status_code == 200  # another key is not limited


def test_limits_apply_to_the_anthropic_passthrough(start_gateway, mock, tmp_path):
    gw = start_gateway(pipeline=limits({
        "name": "one", "scope": "model", "scope_id": "claude-limited", "metric": "requests", "window": "lifetime",
        "block_threshold": 0.5}))
    client = anthropic.Anthropic(base_url=f"{gw.url}/api/anthropic", api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(model="claude-limited", max_tokens=10, messages=MESSAGES)


def test_bad_policies_fail_startup_naming_the_field(mock, tmp_path):
    config = base_config(mock, tmp_path, pipeline=limits({"name": "x", "scope": "api_key", "metric": "requests",
                                                           "window": "fortnight", "block_threshold": 1}))
    with pytest.raises(RuntimeError) as failed:
        GatewayProcess(config, tmp_path / "gw").start()
    assert "$.pipeline[1].options" in str(failed.value) and "policies[0].window" in str(failed.value)


# -- alerts -------------------------------------------------------------------------------


class AlertReceiver(MockServer):
    def __init__(self) -> None:
        super().__init__()
        self.alerts: list[dict[str, Any]] = []

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/hook", self.hook)

    async def hook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw)
        expected = hmac.new(WEBHOOK_SECRET.encode(), json.dumps(body).encode(), hashlib.sha256).hexdigest()
        self.alerts.append({"body": body, "valid": hmac.compare_digest(request.headers["X-Respan-Signature"], expected),
                            "raw_valid": hmac.compare_digest(request.headers["X-Respan-Signature"], hmac.new(
                                WEBHOOK_SECRET.encode(), raw, hashlib.sha256).hexdigest())})
        return web.json_response({"ok": True})


@pytest.fixture
def receiver():
    server = AlertReceiver().start()
    yield server
    server.stop()


def alert_policy(name: str, receiver: AlertReceiver) -> dict[str, Any]:
    return {"name": name, "scope": "api_key", "metric": "requests", "window": "lifetime", "warn_threshold": 2,
            "block_threshold": 4, "notify": {"webhooks": [{"url": f"{receiver.base_url}/hook", "secret": WEBHOOK_SECRET}]}}


def test_alerts_are_signed_and_sent_once_per_threshold_and_window(start_gateway, mock, tmp_path, receiver):
    gw = start_gateway(pipeline=limits(alert_policy("alerting", receiver)))
    statuses = asyncio.run(burst([gw.url], 8))
    assert statuses.count(200) == 4
    assert wait_for(lambda: len(receiver.alerts) >= 2)
    time.sleep(0.3)  # nothing more arrives
    events = sorted((a["body"]["event"], a["body"]["alert"]["threshold"]) for a in receiver.alerts)
    assert events == [("limit.block", 4.0), ("limit.warn", 2.0)]
    assert all(a["valid"] and a["raw_valid"] for a in receiver.alerts)
    warn = next(a["body"] for a in receiver.alerts if a["body"]["event"] == "limit.warn")
    assert warn["alert"]["policy"] == "alerting" and warn["alert"]["scope_id"] == "tests"
    assert WEBHOOK_SECRET not in gw.output.read_text()


def test_alerts_are_deduplicated_across_gateways_on_redis(start_gateway, mock, tmp_path, receiver, redis_cleanup):
    name = unique("alerting")
    redis_cleanup.append(name)
    state = {"counters": {"backend": "redis", "url": REDIS_URL}}
    a = start_gateway(pipeline=limits(alert_policy(name, receiver)), state=state)
    b = start_gateway(pipeline=limits(alert_policy(name, receiver)), state=state)
    statuses = asyncio.run(burst([a.url, b.url], 12))
    assert statuses.count(200) == 4
    assert wait_for(lambda: len(receiver.alerts) >= 2)
    time.sleep(0.5)
    assert sorted(a["body"]["event"] for a in receiver.alerts) == ["limit.block", "limit.warn"]


# -- the admin API ------------------------------------------------------------------------

ADMIN_KEY = "sk-limits-admin-key"


def admin_keys() -> list[dict[str, str]]:
    from proxy.keys import hash_key

    return [{"name": "ops", "key_hash": hash_key(ADMIN_KEY)}]


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_policies_over_the_admin_api(start_gateway, mock, tmp_path):
    gw = start_gateway(pipeline=limits({"name": "from-config", "scope": "organization", "metric": "requests",
                                        "window": "day", "warn_threshold": 1000}), admin_keys=admin_keys())
    api = httpx.Client(base_url=f"{gw.url}/api/limits", headers=ADMIN)
    listed = api.get("/").json()
    assert [(p["name"], p["source"]) for p in listed["results"]] == [("from-config", "config")]
    policy = {"name": "two-a-day", "scope": "customer", "scope_id": "acme", "metric": "requests", "window": "day",
              "block_threshold": 2}
    created = api.post("/", json=policy)
    assert created.status_code == 201 and created.json()["source"] == "admin"
    assert api.post("/", json=policy).status_code == 409
    bad = api.post("/", json={**policy, "name": "bad", "window": "fortnight"})
    assert bad.status_code == 400 and "window" in bad.json()["detail"]
    # in force at once
    body = {"model": "gpt-test", "messages": MESSAGES, "customer_identifier": "acme"}
    statuses = [httpx.post(f"{gw.url}/api/chat/completions", json=body, headers=AUTH).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    usage = api.get("/two-a-day/usage/").json()
    assert (usage["value"], usage["remaining"], usage["scope_id"]) == (2.0, 0.0, "acme")
    # raise the limit
    patched = api.patch("/two-a-day/", json={"block_threshold": 3})
    assert patched.status_code == 200 and patched.json()["block_threshold"] == 3
    assert httpx.post(f"{gw.url}/api/chat/completions", json=body, headers=AUTH).status_code == 200
    assert api.patch("/two-a-day/", json={"block_threshold": -1}).status_code == 400
    assert api.patch("/from-config/", json={"warn_threshold": 5}).status_code == 403
    assert api.delete("/from-config/").status_code == 403
    assert api.delete("/two-a-day/").status_code == 204
    assert api.get("/two-a-day/").status_code == 404
    assert httpx.post(f"{gw.url}/api/chat/completions", json=body, headers=AUTH).status_code == 200
    # gateway keys and no key
    assert httpx.get(f"{gw.url}/api/limits/", headers=AUTH).status_code == 403
    assert httpx.get(f"{gw.url}/api/limits/").status_code == 401


def test_a_policy_created_on_one_gateway_applies_on_another_through_redis(start_gateway, mock, tmp_path):
    state = {"counters": {"backend": "redis", "url": REDIS_URL}}
    a = start_gateway(pipeline=limits(), state=state, admin_keys=admin_keys())
    b = start_gateway(pipeline=limits(), state=state, admin_keys=admin_keys())
    name = unique("shared")
    customer = unique("cust")
    try:
        created = httpx.post(f"{a.url}/api/limits/", headers=ADMIN, json={
            "name": name, "scope": "customer", "scope_id": customer, "metric": "requests", "window": "lifetime",
            "block_threshold": 1})
        assert created.status_code == 201
        assert wait_for(lambda: httpx.get(f"{b.url}/api/limits/{name}/", headers=ADMIN).status_code == 200, 3)
        body = {"model": "gpt-test", "messages": MESSAGES, "customer_identifier": customer}
        assert httpx.post(f"{b.url}/api/chat/completions", json=body, headers=AUTH).status_code == 200
        assert httpx.post(f"{a.url}/api/chat/completions", json=body, headers=AUTH).status_code == 429
    finally:
        httpx.delete(f"{a.url}/api/limits/{name}/", headers=ADMIN)
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{KEY_PREFIX}*{name}*"):
            client.delete(key)


def test_the_limit_reservation_and_the_cache_lookup_share_one_round_trip(start_gateway, mock, redis_cleanup):
    """The limits stage does not wait for Redis before the cache stage looks up: both commands go out
    in one write, and the answer waits for both (Call.hold / Call.ready). A refusal still wins over
    a cached answer."""
    name = unique("round-trip")
    redis_cleanup.append(name)
    tap = Relay(("127.0.0.1", 6379), keep_sent=True).start()
    url = f"redis://127.0.0.1:{tap.port}/{REDIS_DB}"
    try:
        policy = {"name": name, "scope": "api_key", "metric": "requests", "window": "lifetime", "block_threshold": 2}
        gw = start_gateway(pipeline=["auth", {"name": "limits", "options": {"policies": [policy]}},
                                     {"name": "cache", "options": {"defaults": {"cache_enabled": True}}}],
                           state={"counters": {"backend": "redis", "url": url},
                                  "cache": {"backend": "redis", "url": url}})
        body = {"model": "gpt-test", "messages": [{"role": "user", "content": unique("once")}]}
        for expected in ("miss", "hit"):
            before = len(tap.sent)
            reply = httpx.post(f"{gw.url}/api/chat/completions", json=body, headers=AUTH, timeout=10)
            assert reply.status_code == 200 and reply.headers["x-llmrelay-cache"] == expected
            writes = tap.sent[before:]
            lookups = [w for w in writes if b"\r\nGET\r\n" in w]
            assert len(lookups) == 1, writes
            assert b"EVALSHA" in lookups[0] or b"EVAL\r\n" in lookups[0], writes  # the reservation, same write
        refused = httpx.post(f"{gw.url}/api/chat/completions", json=body, headers=AUTH, timeout=10)
        assert refused.status_code == 429 and "x-llmrelay-cache" not in refused.headers
        assert f"limit '{name}'" in refused.json()["detail"]
    finally:
        tap.close()
