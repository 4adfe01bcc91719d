"""Response caching (spec 3.4, plugins/cache) end to end: real gateway processes in front of the
mock upstreams (tests/mock_upstream.py, tests/mock_anthropic.py), driven by the official openai and
anthropic SDKs and plain httpx.

Every test puts a random tag in its prompt (and uses it as the customer id), so its cache entries
and upstream requests are its own even on the shared gateways; an entry is stored in the
background right after the response, so tests poll the cache admin for it rather than sleep.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
import redis
from openai import OpenAI

from proxy.keys import hash_key
from proxy.logs.sinks.sqlite import read_records
from tests.conftest import (
    KEY,
    REDIS_URL,
    TEST_KEY,
    GatewayProcess,
    add_tool_call_deltas,
    base_config,
    module_gateway,
    server_fixtures,
)
from tests.mock_anthropic import TEXT as CLAUDE_TEXT
from tests.mock_anthropic import MockAnthropic
from tests.mock_server import free_port
from tests.mock_upstream import USAGE, WORDS, MockUpstream

ANSWER = "".join(WORDS)
ADMIN = "sk-admin-cache-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
# mock usage: 11 prompt tokens (2 of them cached), 7 completion; gpt-test prices per 1M tokens:
# input 1.0, cached input 0.5, output 2.0
GPT_TEST_COST = (9 * 1.0 + 2 * 0.5 + 7 * 2.0) / 1e6
CLAUDE_PRICES = {"input": 3.0, "output": 15.0}
CLAUDE_COST = (12 * 3.0 + 6 * 15.0) / 1e6  # mock_anthropic.USAGE: 12 input, 6 output
THIRTY_DAYS = 30 * 24 * 3600
ENTRY_FIELDS = {"id", "cache_key", "kind", "client_format", "endpoint", "model", "served_by", "customer_identifier",
                "size_bytes", "prompt_tokens", "completion_tokens", "created_at", "expires_at"}
CACHE_ON = {"cache_enabled": True}


amock, anthropic_mock = server_fixtures(MockAnthropic, "amock", "anthropic_mock")


def cache_config(mock: MockUpstream, amock: MockAnthropic, workdir: Path, options: dict[str, Any] | None = None,
                 **overrides: Any) -> dict[str, Any]:
    """The standard test config with the default pipeline (the cache stage with `options`), an
    admin key, the Anthropic mock as provider `anthropic`, and cooldowns that never trigger (the
    error tests must not take the mock out of rotation for the tests after them)."""
    cache = {"name": "cache", "options": options or {}}
    return base_config(
        mock, workdir,
        pipeline=["auth", "limits", cache, "routing", "credentials", "fallback"],
        admin_keys=[{"name": "ops", "key_hash": hash_key(ADMIN)}],
        cooldowns={"failures": 100_000},
        extra_providers=[{"id": "anthropic", "protocol": "anthropic", "base_url": amock.base_url,
                          "api_key": "sk-ant-upstream"}],
        extra_models=[{"name": "claude-test", "provider": "anthropic", "model": "claude-sonnet-test",
                       "prices": CLAUDE_PRICES},
                      {"name": "claude-cut", "provider": "anthropic", "model": "claude-cut"},
                      {"name": "claude-stream-error", "provider": "anthropic", "model": "claude-stream-error"}],
        **overrides,
    )


@pytest.fixture(scope="module")
def gw(mock_upstream, amock, tmp_path_factory) -> Iterator[GatewayProcess]:
    """Memory backend; no stage defaults, except for the key `tests-env` (TEST_KEY)."""
    options = {"keys": {"tests-env": {"cache_enabled": True, "cache_by_customer": True}}, "max_entry_bytes": 4000}
    yield from module_gateway(tmp_path_factory, "gateway-cache",
                              config=lambda workdir: cache_config(mock_upstream, amock, workdir, options))


@pytest.fixture(scope="module")
def gw_defaults(mock_upstream, amock, tmp_path_factory) -> Iterator[GatewayProcess]:
    """Stage defaults: caching on, entries separated by model."""
    options = {"defaults": {"cache_enabled": True, "is_cached_by_model": True}}
    yield from module_gateway(tmp_path_factory, "gateway-cache-defaults",
                              config=lambda workdir: cache_config(mock_upstream, amock, workdir, options))


def redis_gateway(mock: MockUpstream, amock: MockAnthropic, tmp_path_factory: pytest.TempPathFactory, name: str,
                  url: str = REDIS_URL) -> Iterator[GatewayProcess]:
    state = {"cache": {"backend": "redis", "url": url}}
    yield from module_gateway(tmp_path_factory, name, config=lambda workdir: cache_config(mock, amock, workdir,
                                                                                           state=state))


@pytest.fixture(scope="module")
def redis_a(mock_upstream, amock, tmp_path_factory) -> Iterator[GatewayProcess]:
    yield from redis_gateway(mock_upstream, amock, tmp_path_factory, "gateway-cache-redis-a")


@pytest.fixture(scope="module")
def redis_b(mock_upstream, amock, tmp_path_factory) -> Iterator[GatewayProcess]:
    yield from redis_gateway(mock_upstream, amock, tmp_path_factory, "gateway-cache-redis-b")


# -- helpers -----------------------------------------------------------------------------


def new_tag() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


def messages(tag: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {tag}"}]


def sdk(gw: GatewayProcess, key: str = KEY) -> OpenAI:
    return OpenAI(base_url=f"{gw.url}/api", api_key=key, max_retries=0)


def claude(gw: GatewayProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.url}/api/anthropic/", api_key=KEY, max_retries=0)


def sent(server: Any, tag: str) -> int:
    """Requests the mock server received whose body holds `tag`."""
    return sum(tag in orjson.dumps(r["body"]).decode() for r in list(server.requests))


def chat(gw: GatewayProcess, body: dict[str, Any], headers: dict[str, str] | None = None,
         key: str = KEY) -> httpx.Response:
    return httpx.post(f"{gw.url}/api/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}", **(headers or {})}, timeout=10)


def body_for(tag: str, model: str = "gpt-test", **extra: Any) -> dict[str, Any]:
    """A chat body with the tag in the prompt and as the customer id, caching on."""
    return {"model": model, "messages": messages(tag), "customer_identifier": tag, **CACHE_ON, **extra}


def split_events(raw: bytes) -> list[bytes]:
    return [event for event in raw.split(b"\n\n") if event.strip()]


def stream_events(gw: GatewayProcess, body: dict[str, Any]) -> tuple[httpx.Headers, list[bytes]]:
    """The headers and raw SSE events of a chat stream request, in order."""
    with httpx.stream("POST", f"{gw.url}/api/chat/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=10) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes())
    return response.headers, split_events(raw)


def data_of(event: bytes) -> Any:
    line = next(line for line in event.split(b"\n") if line.startswith(b"data: "))
    payload = line[len(b"data: "):]
    return payload.decode() if payload == b"[DONE]" else orjson.loads(payload)


def admin(gw: GatewayProcess, method: str, path: str, body: Any = None, key: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, gw.url + path, json=body, headers=headers, timeout=10)


def listed(gw: GatewayProcess, **filters: Any) -> list[dict[str, Any]]:
    response = admin(gw, "POST", "/api/caches/", {"page_size": 1000, **filters})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def wait_listed(gw: GatewayProcess, count: int = 1, timeout: float = 5.0, **filters: Any) -> list[dict[str, Any]]:
    """The entries matching `filters` once there are `count` of them (they are stored in the background)."""
    deadline = time.monotonic() + timeout
    rows = listed(gw, **filters)
    while len(rows) < count and time.monotonic() < deadline:
        time.sleep(0.02)
        rows = listed(gw, **filters)
    assert len(rows) == count, f"expected {count} cache entries for {filters}, got {rows}"
    return rows


def stored(gw: GatewayProcess, tag: str, count: int = 1) -> list[dict[str, Any]]:
    """The entries of customer `tag` (every test uses its tag as the customer id)."""
    return wait_listed(gw, count, customer_identifier=tag)


def no_record(gw: GatewayProcess, log_id: str, later_log_id: str) -> None:
    """`log_id` has no log record: `later_log_id`, logged after it, is already in the database
    (the log queue is FIFO), and `log_id` is not."""
    gw.record(later_log_id)
    assert read_records(gw.log_db, "unique_id = ?", (log_id,)) == []


def b64(data: dict[str, Any]) -> str:
    return base64.b64encode(orjson.dumps(data)).decode()


# -- 1. miss, then hit ---------------------------------------------------------------------------


def test_miss_then_hit(gw, mock):
    tag = new_tag()
    client = sdk(gw)
    kwargs = {"model": "gpt-test", "messages": messages(tag), "extra_body": {**CACHE_ON, "customer_identifier": tag}}
    miss = client.chat.completions.with_raw_response.create(**kwargs)
    assert miss.headers["x-llmrelay-cache"] == "miss"
    assert miss.parse().choices[0].message.content == ANSWER
    [entry] = stored(gw, tag)
    assert entry["kind"] == "whole" and entry["size_bytes"] == len(miss.content)

    hit = client.chat.completions.with_raw_response.create(**kwargs)
    assert hit.headers["x-llmrelay-cache"] == "hit"
    assert hit.content == miss.content  # the answer exactly as relayed the first time
    completion = hit.parse()
    assert completion.choices[0].message.content == ANSWER
    assert completion.usage.prompt_tokens == USAGE["prompt_tokens"]
    assert sent(mock, tag) == 1
    assert hit.headers["x-llmrelay-provider"] == "respan"
    assert hit.headers["x-llmrelay-cost"] == "0"
    assert float(miss.headers["x-llmrelay-cost"]) == pytest.approx(GPT_TEST_COST)

    missed = gw.record(miss.headers["x-respan-log-id"])
    assert missed["model"] == "mock-ok" and missed["provider_id"] == "mock"
    assert missed["cache_hit"] is False
    assert missed["cost"] == pytest.approx(GPT_TEST_COST)
    hit_record = gw.record(hit.headers["x-respan-log-id"])
    assert hit_record["model"] == "respan/cache"
    assert hit_record["model_requested"] == "gpt-test"
    assert hit_record["provider_id"] == "respan"
    assert hit_record["cache_hit"] is True
    assert hit_record["cost"] == 0
    assert hit_record["status_code"] == 200 and hit_record["status"] == "success"
    assert hit_record["customer_identifier"] == tag
    assert hit_record["completion_message"]["content"] == ANSWER
    assert (hit_record["prompt_tokens"], hit_record["completion_tokens"]) == (11, 7)
    assert hit_record["stream"] is False


def test_request_breakdown_says_cached(gw, mock):
    tag = new_tag()
    miss = chat(gw, body_for(tag, request_breakdown=True))
    assert miss.headers["x-llmrelay-cache"] == "miss"
    assert miss.json()["request_breakdown"]["cached"] is False
    [entry] = stored(gw, tag)
    hit = chat(gw, body_for(tag, request_breakdown=True))
    assert hit.headers["x-llmrelay-cache"] == "hit"
    breakdown = hit.json()["request_breakdown"]
    assert breakdown["cached"] is True
    assert breakdown["cost"] == 0
    # the stored answer is the provider's, without the first request's breakdown
    assert entry["size_bytes"] == len(orjson.dumps({k: v for k, v in miss.json().items() if k != "request_breakdown"}))
    assert sent(mock, tag) == 1


# -- 2. the options ------------------------------------------------------------------------------


def test_off_by_default(gw, mock):
    tag = new_tag()
    body = {"model": "gpt-test", "messages": messages(tag), "customer_identifier": tag}
    for _ in range(2):
        response = chat(gw, body)
        assert response.status_code == 200
        assert "x-llmrelay-cache" not in response.headers
    gw.record(response.headers["x-respan-log-id"])
    assert sent(mock, tag) == 2
    assert listed(gw, customer_identifier=tag) == []
    # cache_enabled: false is off too
    response = chat(gw, {**body, "cache_enabled": False})
    assert "x-llmrelay-cache" not in response.headers
    assert sent(mock, tag) == 3


def test_cache_by_customer(gw, mock):
    tag = new_tag()
    by_customer = {"cache_options": {"cache_by_customer": True}}
    first = {**body_for(tag), **by_customer, "customer_identifier": f"{tag}-a"}
    second = {**first, "customer_identifier": f"{tag}-b"}
    assert chat(gw, first).headers["x-llmrelay-cache"] == "miss"
    wait_listed(gw, customer_identifier=f"{tag}-a")
    assert chat(gw, second).headers["x-llmrelay-cache"] == "miss"  # another customer: its own entry
    wait_listed(gw, customer_identifier=f"{tag}-b")
    assert chat(gw, first).headers["x-llmrelay-cache"] == "hit"
    assert chat(gw, second).headers["x-llmrelay-cache"] == "hit"
    assert sent(mock, tag) == 2
    # without the option, a customer gets another customer's answer
    other = new_tag()
    assert chat(gw, {**body_for(other), "customer_identifier": f"{other}-a"}).headers["x-llmrelay-cache"] == "miss"
    wait_listed(gw, customer_identifier=f"{other}-a")
    assert chat(gw, {**body_for(other), "customer_identifier": f"{other}-b"}).headers["x-llmrelay-cache"] == "hit"
    assert sent(mock, other) == 1


def test_is_cached_by_model(gw, mock):
    # default: the same prompt gets the cached answer whatever model is asked for
    tag = new_tag()
    assert chat(gw, body_for(tag)).headers["x-llmrelay-cache"] == "miss"
    stored(gw, tag)
    hit = chat(gw, body_for(tag, model="mock/mock-tools"))
    assert hit.headers["x-llmrelay-cache"] == "hit"
    assert hit.json()["choices"][0]["message"]["content"] == ANSWER  # the gpt-test answer, not a tool call
    assert sent(mock, tag) == 1
    assert gw.record(hit.headers["x-respan-log-id"])["model_requested"] == "mock/mock-tools"

    # is_cached_by_model: one entry per model
    tag = new_tag()
    by_model = {"cache_options": {"is_cached_by_model": True}}
    assert chat(gw, body_for(tag, **by_model)).headers["x-llmrelay-cache"] == "miss"
    stored(gw, tag)
    tools = chat(gw, body_for(tag, model="mock/mock-tools", **by_model))
    assert tools.headers["x-llmrelay-cache"] == "miss"
    assert tools.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    entries = stored(gw, tag, 2)
    assert sorted(e["model"] for e in entries) == ["gpt-test", "mock/mock-tools"]
    again = chat(gw, body_for(tag, model="mock/mock-tools", **by_model))
    assert again.headers["x-llmrelay-cache"] == "hit"
    assert again.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    text = chat(gw, body_for(tag, **by_model))
    assert text.headers["x-llmrelay-cache"] == "hit"
    assert text.json()["choices"][0]["message"]["content"] == ANSWER
    assert sent(mock, tag) == 2


def test_omit_log(gw, mock):
    tag = new_tag()
    miss = chat(gw, body_for(tag, cache_options={"omit_log": True}))
    assert miss.headers["x-llmrelay-cache"] == "miss"
    assert gw.record(miss.headers["x-respan-log-id"])["cache_hit"] is False  # a miss is logged all the same
    stored(gw, tag)
    omitted = [chat(gw, body_for(tag, cache_options={option: True})) for option in ("omit_log", "omit_logs")]
    logged = chat(gw, body_for(tag))
    for response in [*omitted, logged]:
        assert response.headers["x-llmrelay-cache"] == "hit"
        assert response.json()["choices"][0]["message"]["content"] == ANSWER
    assert gw.record(logged.headers["x-respan-log-id"])["cache_hit"] is True
    for response in omitted:
        no_record(gw, response.headers["x-respan-log-id"], logged.headers["x-respan-log-id"])
    assert sent(mock, tag) == 1


@pytest.mark.parametrize("channel", ["top-level", "respan_params", "header"])
def test_params_channels(gw, mock, channel):
    """cache_enabled and cache_options work from each channel of gateway params."""
    tag = new_tag()
    params = {"cache_enabled": True, "cache_options": {"cache_by_customer": True}}

    def ask(customer: str) -> httpx.Response:
        body: dict[str, Any] = {"model": "gpt-test", "messages": messages(tag), "customer_identifier": customer}
        headers = {}
        if channel == "top-level":
            body.update(params)
        elif channel == "respan_params":
            body["respan_params"] = params
        else:
            headers["X-Data-Respan-Params"] = b64(params)
        return chat(gw, body, headers)

    assert ask(f"{tag}-a").headers["x-llmrelay-cache"] == "miss"
    wait_listed(gw, customer_identifier=f"{tag}-a")
    assert ask(f"{tag}-a").headers["x-llmrelay-cache"] == "hit"
    assert ask(f"{tag}-b").headers["x-llmrelay-cache"] == "miss"  # cache_by_customer came through too
    assert sent(mock, tag) == 2


def test_per_key_defaults(gw, mock):
    """The key `tests-env` has defaults cache_enabled and cache_by_customer; `tests` has none."""
    tag = new_tag()
    body = {"model": "gpt-test", "messages": messages(tag), "customer_identifier": f"{tag}-a"}
    assert chat(gw, body, key=TEST_KEY).headers["x-llmrelay-cache"] == "miss"
    wait_listed(gw, customer_identifier=f"{tag}-a")
    assert chat(gw, body, key=TEST_KEY).headers["x-llmrelay-cache"] == "hit"
    assert chat(gw, {**body, "customer_identifier": f"{tag}-b"}, key=TEST_KEY).headers["x-llmrelay-cache"] == "miss"
    assert "x-llmrelay-cache" not in chat(gw, {**body, "cache_enabled": False}, key=TEST_KEY).headers
    assert "x-llmrelay-cache" not in chat(gw, body).headers  # the other key: the built-in default, off
    assert sent(mock, tag) == 4


def test_stage_defaults(gw_defaults, mock):
    """Stage defaults: cache_enabled and is_cached_by_model without any param; a param overrides."""
    gw = gw_defaults
    tag = new_tag()
    body = {"model": "gpt-test", "messages": messages(tag), "customer_identifier": tag}
    assert chat(gw, body).headers["x-llmrelay-cache"] == "miss"
    stored(gw, tag)
    assert chat(gw, body).headers["x-llmrelay-cache"] == "hit"
    other_model = chat(gw, {**body, "model": "mock/mock-tools"})
    assert other_model.headers["x-llmrelay-cache"] == "miss"  # is_cached_by_model from the defaults
    assert "x-llmrelay-cache" not in chat(gw, {**body, "cache_enabled": False}).headers
    # the request's own option wins: one entry for every model (a key of its own, without the model)
    by_any_model = {**body, "cache_options": {"is_cached_by_model": False}}
    assert chat(gw, by_any_model).headers["x-llmrelay-cache"] == "miss"
    stored(gw, tag, 3)
    explicit = chat(gw, {**by_any_model, "model": "mock/mock-tools"})
    assert explicit.headers["x-llmrelay-cache"] == "hit"
    assert explicit.json()["choices"][0]["message"]["content"] == ANSWER
    assert sent(mock, tag) == 4


def test_stage_defaults_survive_partial_cache_options(gw_defaults, mock):
    gw = gw_defaults
    tag = new_tag()
    body = {"model": "gpt-test", "messages": messages(tag), "customer_identifier": tag,
            "cache_options": {"omit_log": True}}
    assert chat(gw, body).headers["x-llmrelay-cache"] == "miss"
    stored(gw, tag)
    # is_cached_by_model (a default) was not overridden: another model must be a miss
    assert chat(gw, {**body, "model": "mock/mock-tools"}).headers["x-llmrelay-cache"] == "miss"


# -- 3. TTL --------------------------------------------------------------------------------------


def test_ttl(gw, mock):
    """Entries expire at their own TTL, fractions of a second kept. Checked against a clock started
    before the writes, with margins of 0.5 s or more either side, so a slow machine cannot flip it."""
    short, longer = new_tag(), new_tag()
    started = time.monotonic()
    assert chat(gw, body_for(short, cache_ttl=1)).headers["x-llmrelay-cache"] == "miss"
    assert chat(gw, body_for(longer, cache_ttl=2.8)).headers["x-llmrelay-cache"] == "miss"
    [entry] = stored(gw, short)
    assert entry["expires_at"] - entry["created_at"] == pytest.approx(1.0)
    [entry] = stored(gw, longer)
    assert entry["expires_at"] - entry["created_at"] == pytest.approx(2.8)
    assert chat(gw, body_for(short, cache_ttl=1)).headers["x-llmrelay-cache"] == "hit"
    assert chat(gw, body_for(longer, cache_ttl=2.8)).headers["x-llmrelay-cache"] == "hit"
    time.sleep(max(0.0, started + 1.5 - time.monotonic()))
    assert chat(gw, body_for(short, cache_ttl=1)).headers["x-llmrelay-cache"] == "miss"
    assert sent(mock, short) == 2
    # 2.8 s is 2.8 s, not cut to a whole 2 s
    time.sleep(max(0.0, started + 2.2 - time.monotonic()))
    assert chat(gw, body_for(longer, cache_ttl=2.8)).headers["x-llmrelay-cache"] == "hit"
    assert sent(mock, longer) == 1


# -- 4. streams ----------------------------------------------------------------------------------


def test_stream_miss_then_hit_same_events(gw, mock):
    tag = new_tag()
    headers, original = stream_events(gw, body_for(tag))
    assert headers["x-llmrelay-cache"] == "miss"
    assert original[-1] == b"data: [DONE]"
    assert "".join(data_of(e)["choices"][0]["delta"].get("content") or "" for e in original[:-1]) == ANSWER
    assert all(data_of(e)["choices"] for e in original[:-1])  # the usage chunk is hidden: not asked for
    [entry] = stored(gw, tag)
    assert entry["kind"] == "stream"

    headers, replayed = stream_events(gw, body_for(tag))
    assert headers["x-llmrelay-cache"] == "hit"
    assert replayed == original
    assert sent(mock, tag) == 1
    record = gw.record(headers["x-respan-log-id"])
    assert record["model"] == "respan/cache" and record["cache_hit"] is True and record["cost"] == 0
    assert record["stream"] is True and record["status_code"] == 200
    assert record["completion_message"]["content"] == ANSWER

    # with include_usage the same entry answers, now with the usage chunk the gateway asked upstream for
    headers, with_usage = stream_events(gw, body_for(tag, stream_options={"include_usage": True}))
    assert headers["x-llmrelay-cache"] == "hit"
    assert with_usage[:-2] == original[:-1] and with_usage[-1] == b"data: [DONE]"
    usage_chunk = data_of(with_usage[-2])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == USAGE
    assert sent(mock, tag) == 1


def test_sdk_reads_replayed_stream(gw, mock):
    tag = new_tag()
    client = sdk(gw)
    kwargs = {"model": "gpt-test", "messages": messages(tag), "stream": True,
              "stream_options": {"include_usage": True}, "extra_body": {**CACHE_ON, "customer_identifier": tag}}
    results = []
    for expected in ("miss", "hit"):
        raw = client.chat.completions.with_raw_response.create(**kwargs)
        assert raw.headers["x-llmrelay-cache"] == expected
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        results.append((text, finish, chunks[-1].usage.model_dump(exclude_none=True)))
        if expected == "miss":
            stored(gw, tag)
    assert results[0] == results[1] == (ANSWER, ["stop"], {**USAGE, "prompt_tokens_details": {"cached_tokens": 2}})
    assert sent(mock, tag) == 1


def test_whole_answer_from_cached_stream(gw, mock):
    tag = new_tag()
    headers, _ = stream_events(gw, body_for(tag))
    assert headers["x-llmrelay-cache"] == "miss"
    stored(gw, tag)
    raw = sdk(gw).chat.completions.with_raw_response.create(
        model="gpt-test", messages=messages(tag), extra_body={**CACHE_ON, "customer_identifier": tag})
    assert raw.headers["x-llmrelay-cache"] == "hit"
    completion = raw.parse()
    assert completion.id == "chatcmpl-mock" and completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 7)
    assert sent(mock, tag) == 1
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["model"] == "respan/cache" and record["stream"] is False and record["cost"] == 0


def test_stream_from_cached_whole_answer(gw, mock):
    tag = new_tag()
    whole = chat(gw, body_for(tag))
    assert whole.headers["x-llmrelay-cache"] == "miss"
    stored(gw, tag)
    headers, events = stream_events(gw, body_for(tag))
    assert headers["x-llmrelay-cache"] == "hit"
    assert events[-1] == b"data: [DONE]"
    chunks = [data_of(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == ANSWER
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-mock" for c in chunks)
    # the SDK reads it, usage included when asked for
    stream = sdk(gw).chat.completions.create(
        model="gpt-test", messages=messages(tag), stream=True, stream_options={"include_usage": True},
        extra_body={**CACHE_ON, "customer_identifier": tag})
    parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == ANSWER
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 7
    assert sent(mock, tag) == 1


def test_tool_calls_replayed_both_ways(gw, mock):
    expected = {0: {"id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'}}
    client = sdk(gw)
    # a whole answer replayed as a stream
    tag = new_tag()
    kwargs: dict[str, Any] = {"model": "mock/mock-tools", "messages": messages(tag),
                              "extra_body": {**CACHE_ON, "customer_identifier": tag}}
    assert client.chat.completions.with_raw_response.create(**kwargs).headers["x-llmrelay-cache"] == "miss"
    stored(gw, tag)
    raw = client.chat.completions.with_raw_response.create(**kwargs, stream=True)
    assert raw.headers["x-llmrelay-cache"] == "hit"
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for part in raw.parse():
        if part.choices:
            add_tool_call_deltas(calls, part.choices[0].delta.tool_calls)
            finish = part.choices[0].finish_reason or finish
    assert calls == expected and finish == "tool_calls"
    # a stream replayed as a whole answer
    tag = new_tag()
    kwargs = {**kwargs, "messages": messages(tag), "extra_body": {**CACHE_ON, "customer_identifier": tag}}
    assert len(list(client.chat.completions.create(**kwargs, stream=True))) > 0
    stored(gw, tag)
    raw = client.chat.completions.with_raw_response.create(**kwargs)
    assert raw.headers["x-llmrelay-cache"] == "hit"
    message = raw.parse().choices[0].message
    assert message.content is None
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("call_1", "get_weather", '{"city":"Paris"}')]
    assert raw.parse().choices[0].finish_reason == "tool_calls"
    assert sent(mock, tag) == 1


def test_entries_over_max_entry_bytes_are_not_stored(gw, mock):
    """max_entry_bytes is 4000 on `gw`: a 40-choice answer or a 10-choice stream is larger."""
    for stream in (False, True):
        tag = new_tag()
        body = body_for(tag, n=10 if stream else 40)
        if stream:
            headers, events = stream_events(gw, body)
            assert len(b"\n\n".join(events)) > 4000
        else:
            response = chat(gw, body)
            headers = response.headers
            assert len(response.content) > 4000
        assert headers["x-llmrelay-cache"] == "miss"
        gw.record(headers["x-respan-log-id"])  # finished: whatever it stores is being stored
        assert listed(gw, customer_identifier=tag) == []
        again = stream_events(gw, body)[0] if stream else chat(gw, body).headers
        assert again["x-llmrelay-cache"] == "miss"
        assert sent(mock, tag) == 2


def test_responses_api_both_ways(gw, mock):
    client = sdk(gw)
    for first_stream in (False, True):
        tag = new_tag()
        kwargs: dict[str, Any] = {"model": "gpt-test", "input": f"say hi {tag}",
                                  "extra_body": {**CACHE_ON, "customer_identifier": tag}}
        texts = []
        for stream, expected in ((first_stream, "miss"), (not first_stream, "hit")):
            raw = client.responses.with_raw_response.create(**kwargs, stream=stream)
            assert raw.headers["x-llmrelay-cache"] == expected
            if stream:
                events = list(raw.parse())
                assert events[-1].type == "response.completed"
                assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
                response = events[-1].response
            else:
                response = raw.parse()
            texts.append((response.id, response.status, response.output_text, response.usage.output_tokens))
            if expected == "miss":
                [entry] = stored(gw, tag)
                assert entry["endpoint"] == "responses" and entry["kind"] == ("stream" if stream else "whole")
        assert texts[0] == texts[1] == ("resp_mock", "completed", ANSWER, 9)
        assert sent(mock, tag) == 1


def test_embeddings(gw, mock):
    tag = new_tag()
    client = sdk(gw)
    kwargs: dict[str, Any] = {"model": "gpt-test", "input": [f"a {tag}", "b"], "encoding_format": "float",
                              "extra_body": {**CACHE_ON, "customer_identifier": tag}}
    miss = client.embeddings.with_raw_response.create(**kwargs)
    assert miss.headers["x-llmrelay-cache"] == "miss"
    [entry] = stored(gw, tag)
    assert (entry["endpoint"], entry["kind"]) == ("embeddings", "whole")
    hit = client.embeddings.with_raw_response.create(**kwargs)
    assert hit.headers["x-llmrelay-cache"] == "hit"
    assert [d.embedding for d in hit.parse().data] == [d.embedding for d in miss.parse().data]
    assert len(hit.parse().data) == 2
    assert sent(mock, tag) == 1
    record = gw.record(hit.headers["x-respan-log-id"])
    assert record["log_type"] == "embedding" and record["cache_hit"] is True and record["cost"] == 0


# -- 5. never cached -----------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "stream"), [
    ("mock/mock-status-400", False),
    ("mock/mock-status-500", False),
    ("mock/mock-status-503", True),  # refused before the stream starts
    ("mock/mock-stream-error-500", True),  # an error event in a 200 stream
    ("mock/mock-cut-3", True),  # the connection drops mid-stream
    ("mock/mock-no-done", True),  # ends without finish_reason or [DONE]
])
def test_failures_are_not_cached(gw, mock, model, stream):
    tag = new_tag()
    body = body_for(tag, model=model, stream=stream, retry_params={"retry_enabled": False})
    upstream = []
    for _ in range(2):
        response = chat(gw, body)
        if stream and response.status_code == 200:
            assert b"error" in response.content
        else:
            assert response.status_code >= 400
        assert response.headers.get("x-llmrelay-cache") != "hit"
        record = gw.record(response.headers["x-respan-log-id"])
        assert record["status"] == "error" and record["cache_hit"] is False
        assert listed(gw, customer_identifier=tag) == []
        upstream.append(sent(mock, tag))
    assert upstream[0] >= 1
    assert upstream[1] == 2 * upstream[0]  # the second request went upstream again


def test_client_disconnect_is_not_cached(gw, mock):
    tag = new_tag()
    body = body_for(tag, model="mock/mock-slow-6", stream=True)
    with httpx.stream("POST", f"{gw.url}/api/chat/completions", json=body, headers=AUTH, timeout=10) as response:
        assert response.headers["x-llmrelay-cache"] == "miss"
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        log_id = response.headers["x-respan-log-id"]
    assert mock.wait_for_closed_stream() is not None
    assert gw.record(log_id)["status_code"] == 499
    assert listed(gw, customer_identifier=tag) == []
    headers, events = stream_events(gw, body)
    assert headers["x-llmrelay-cache"] == "miss"
    assert sent(mock, tag) == 2
    # the complete stream is kept: the next one is a hit
    stored(gw, tag)
    hit_headers, replayed = stream_events(gw, body)
    assert hit_headers["x-llmrelay-cache"] == "hit" and replayed == events
    assert sent(mock, tag) == 2


# -- 6. Anthropic passthrough --------------------------------------------------------------------


def claude_kwargs(tag: str, model: str = "claude-test") -> dict[str, Any]:
    return {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": f"hi {tag}"}],
            "metadata": {"respan_params": {**CACHE_ON, "customer_identifier": tag}}}


def test_anthropic_whole(gw, anthropic_mock):
    tag = new_tag()
    client = claude(gw)
    miss = client.messages.with_raw_response.create(**claude_kwargs(tag))
    assert miss.headers["x-llmrelay-cache"] == "miss"
    [entry] = stored(gw, tag)
    assert (entry["client_format"], entry["endpoint"], entry["kind"]) == ("anthropic", "anthropic.messages", "whole")
    hit = client.messages.with_raw_response.create(**claude_kwargs(tag))
    assert hit.headers["x-llmrelay-cache"] == "hit"
    assert hit.http_response.content == miss.http_response.content
    assert hit.parse().content[0].text == CLAUDE_TEXT
    assert sent(anthropic_mock, tag) == 1
    assert gw.record(miss.headers["x-respan-log-id"])["cost"] == pytest.approx(CLAUDE_COST)
    record = gw.record(hit.headers["x-respan-log-id"])
    assert record["model"] == "respan/cache" and record["cache_hit"] is True and record["cost"] == 0
    assert record["completion_message"]["content"] == CLAUDE_TEXT
    # and as a stream, from the whole answer
    with client.messages.stream(**claude_kwargs(tag)) as stream:
        assert stream.response.headers["x-llmrelay-cache"] == "hit"
        final = stream.get_final_message()
    assert final.model_dump() == hit.parse().model_dump()
    assert sent(anthropic_mock, tag) == 1


def test_anthropic_stream(gw, anthropic_mock):
    tag = new_tag()
    client = claude(gw)
    finals = []
    for expected in ("miss", "hit"):
        with client.messages.stream(**claude_kwargs(tag)) as stream:
            assert stream.response.headers["x-llmrelay-cache"] == expected
            finals.append(stream.get_final_message())
        if expected == "miss":
            [entry] = stored(gw, tag)
            assert entry["kind"] == "stream"
    assert finals[0].model_dump() == finals[1].model_dump()
    assert finals[1].content[0].text == CLAUDE_TEXT
    assert (finals[1].usage.input_tokens, finals[1].usage.output_tokens) == (12, 6)
    # the raw replay is the mock's event stream, byte for byte
    with httpx.stream("POST", f"{gw.url}/api/anthropic/v1/messages", json={**claude_kwargs(tag), "stream": True},
                      headers={**AUTH, "anthropic-version": "2023-06-01"}, timeout=10) as response:
        assert response.headers["x-llmrelay-cache"] == "hit"
        raw = b"".join(response.iter_bytes())
    assert raw == b"".join(anthropic_mock.events("claude-sonnet-test"))
    # a whole answer from the cached stream
    whole = client.messages.with_raw_response.create(**claude_kwargs(tag))
    assert whole.headers["x-llmrelay-cache"] == "hit"
    message = whole.parse()
    assert message.content[0].text == CLAUDE_TEXT and message.stop_reason == "end_turn"
    assert message.id == finals[0].id and message.usage.output_tokens == 6
    assert sent(anthropic_mock, tag) == 1


@pytest.mark.parametrize("model", ["claude-cut", "claude-stream-error"])
def test_anthropic_broken_stream_not_cached(gw, anthropic_mock, model):
    tag = new_tag()
    kwargs = claude_kwargs(tag, model)
    for count in (1, 2):
        with pytest.raises(anthropic.APIError), claude(gw).messages.stream(**kwargs) as stream:
            log_id = stream.response.headers["x-respan-log-id"]
            stream.get_final_message()
        assert gw.record(log_id)["status"] == "error"
        assert listed(gw, customer_identifier=tag) == []
        assert sent(anthropic_mock, tag) == count


# -- 7. Redis: one cache for several gateways ----------------------------------------------------


def test_redis_shared_between_gateways(redis_a, redis_b, mock):
    tag = new_tag()
    ids: list[str] = []
    try:
        miss = chat(redis_a, body_for(tag, cache_ttl=100))
        assert miss.headers["x-llmrelay-cache"] == "miss"
        [entry] = stored(redis_a, tag)
        ids.append(entry["id"])
        assert listed(redis_b, customer_identifier=tag) == [entry]
        # the backend's own TTL is the entry's (to the millisecond, not rounded down to the second)
        pttl = redis.Redis.from_url(REDIS_URL).pttl(f"llmrelay:cache:{entry['id']}")
        assert 99_000 < pttl <= 100_000

        hit = chat(redis_b, body_for(tag, cache_ttl=100))
        assert hit.headers["x-llmrelay-cache"] == "hit"
        assert hit.content == miss.content
        headers, events = stream_events(redis_b, body_for(tag, cache_ttl=100))
        assert headers["x-llmrelay-cache"] == "hit"
        assert "".join(data_of(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == ANSWER
        assert sent(mock, tag) == 1
        assert redis_b.record(hit.headers["x-respan-log-id"])["model"] == "respan/cache"
        detail = admin(redis_b, "GET", f"/api/cache/{entry['id']}/")
        assert detail.status_code == 200 and detail.json() == entry
        summary = admin(redis_b, "POST", "/api/caches/summary/")
        assert summary.json()["backend"] == "redis" and summary.json()["number_of_entries"] >= 1

        deleted = admin(redis_b, "DELETE", "/api/caches/bulk/", {"ids": ids})
        assert deleted.json() == {"deleted": 1}
        ids.clear()
        assert admin(redis_a, "GET", f"/api/cache/{entry['id']}/").status_code == 404
        assert chat(redis_a, body_for(tag, cache_ttl=100)).headers["x-llmrelay-cache"] == "miss"
        ids.append(stored(redis_a, tag)[0]["id"])
        assert sent(mock, tag) == 2
    finally:
        if ids:
            admin(redis_a, "DELETE", "/api/caches/bulk/", {"ids": ids})


def test_redis_down_is_a_miss(mock_upstream, amock, tmp_path, mock):
    """A cache backend that cannot be reached: every request is a miss that goes upstream."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    gw = GatewayProcess(cache_config(mock_upstream, amock, tmp_path, state={"cache": {"backend": "redis", "url": url}}),
                        tmp_path).start()
    try:
        tag = new_tag()
        for _ in range(2):
            response = chat(gw, body_for(tag))
            assert response.status_code == 200
            assert response.headers["x-llmrelay-cache"] == "miss"
            assert response.json()["choices"][0]["message"]["content"] == ANSWER
        assert sent(mock, tag) == 2
    finally:
        gw.stop()


# -- 8. cache admin ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/api/caches/", {}),
    ("POST", "/api/caches/summary/", {}),
    ("GET", "/api/cache/0123/", None),
    ("DELETE", "/api/caches/bulk/", {"all": True}),
])
def test_admin_needs_the_admin_key(gw, method, path, body):
    assert admin(gw, method, path, body, key=KEY).status_code == 403  # a gateway key
    assert admin(gw, method, path, body, key=None).status_code == 401
    assert admin(gw, method, path, body, key="sk-nobody").status_code == 401


def test_admin_list_summary_detail_delete(gw, mock):
    assert admin(gw, "DELETE", "/api/caches/bulk/", {"all": True}).status_code == 200
    whole_tag, stream_tag = new_tag(), new_tag()
    whole = chat(gw, body_for(whole_tag))
    _, events = stream_events(gw, body_for(stream_tag, model="mock/mock-tools"))
    [whole_entry] = stored(gw, whole_tag)
    [stream_entry] = stored(gw, stream_tag)

    response = admin(gw, "POST", "/api/caches/", {})
    assert response.status_code == 200
    data = response.json()
    assert data["count"] == 2 and data["page"] == 1 and data["page_size"] == 100
    assert [row["id"] for row in data["results"]] == [stream_entry["id"], whole_entry["id"]]  # newest first
    for row in data["results"]:
        assert set(row) == ENTRY_FIELDS
        assert row["cache_key"] == row["id"] and len(row["id"]) == 64
        assert row["expires_at"] - row["created_at"] == pytest.approx(THIRTY_DAYS)
        assert (row["client_format"], row["endpoint"]) == ("openai", "chat")
    # never the content
    assert "quick" not in response.text and "question" not in response.text and "Paris" not in response.text
    assert {k: whole_entry[k] for k in ("kind", "model", "served_by", "customer_identifier", "size_bytes",
                                        "prompt_tokens", "completion_tokens")} == {
        "kind": "whole", "model": "gpt-test", "served_by": "mock/mock-ok", "customer_identifier": whole_tag,
        "size_bytes": len(whole.content), "prompt_tokens": 11, "completion_tokens": 7}
    assert (stream_entry["kind"], stream_entry["model"], stream_entry["served_by"]) == (
        "stream", "mock/mock-tools", "mock/mock-tools")
    # the stored stream holds the usage chunk the client did not see
    assert stream_entry["size_bytes"] > len(b"\n\n".join(events))

    # filters and pages
    assert [r["id"] for r in listed(gw, model="gpt-test")] == [whole_entry["id"]]
    assert [r["id"] for r in listed(gw, endpoint="chat", customer_identifier=stream_tag)] == [stream_entry["id"]]
    assert listed(gw, model="nobody") == []
    page = admin(gw, "POST", "/api/caches/", {"page": 2, "page_size": 1}).json()
    assert page["count"] == 2 and [r["id"] for r in page["results"]] == [whole_entry["id"]]
    for bad in ({"page": 0}, {"page_size": 1001}, {"page_size": "10"}, {"page": True}):
        assert admin(gw, "POST", "/api/caches/", bad).status_code == 400

    summary = admin(gw, "POST", "/api/caches/summary/")
    assert summary.status_code == 200
    assert summary.json() == {"number_of_entries": 2,
                              "total_size_bytes": whole_entry["size_bytes"] + stream_entry["size_bytes"],
                              "by_model": {"gpt-test": 1, "mock/mock-tools": 1}, "by_endpoint": {"chat": 2},
                              "backend": "memory"}
    assert admin(gw, "GET", "/api/caches/summary/").json() == summary.json()

    detail = admin(gw, "GET", f"/api/cache/{whole_entry['id']}/")
    assert detail.status_code == 200 and detail.json() == whole_entry
    missing = admin(gw, "GET", f"/api/cache/{'0' * 64}/")
    assert missing.status_code == 404 and "No cache entry" in missing.json()["detail"]

    # bulk delete: by cache_keys, by ids, all; each makes the next request a miss
    delete = admin(gw, "DELETE", "/api/caches/bulk/", {"cache_keys": [whole_entry["id"], "0" * 64]})
    assert delete.status_code == 200 and delete.json() == {"deleted": 1}
    assert admin(gw, "DELETE", "/api/caches/bulk/", {"cache_keys": [whole_entry["id"]]}).json() == {"deleted": 0}
    assert admin(gw, "GET", f"/api/cache/{whole_entry['id']}/").status_code == 404
    assert chat(gw, body_for(whole_tag)).headers["x-llmrelay-cache"] == "miss"
    assert sent(mock, whole_tag) == 2

    assert admin(gw, "DELETE", "/api/caches/bulk/", {"ids": [stream_entry["id"]]}).json() == {"deleted": 1}
    assert stream_events(gw, body_for(stream_tag, model="mock/mock-tools"))[0]["x-llmrelay-cache"] == "miss"
    assert sent(mock, stream_tag) == 2

    stored(gw, whole_tag)
    stored(gw, stream_tag)
    assert admin(gw, "DELETE", "/api/caches/bulk/", {"all": True}).json() == {"deleted": 2}
    assert admin(gw, "POST", "/api/caches/summary/").json()["number_of_entries"] == 0
    assert chat(gw, body_for(whole_tag)).headers["x-llmrelay-cache"] == "miss"
    assert sent(mock, whole_tag) == 3


@pytest.mark.parametrize("body", [
    {},
    {"all": False},
    {"cache_keys": ["a"], "ids": ["a"]},
    {"ids": [], "all": True},
    {"cache_keys": "abc"},
    {"ids": [1, 2]},
    {"all": "yes"},
    [],
])
def test_admin_bulk_delete_bad_bodies(gw, body):
    response = admin(gw, "DELETE", "/api/caches/bulk/", body)
    assert response.status_code == 400, response.text
    assert response.json()["detail"]


# -- 9. bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "field"), [
    ({"cache_ttl": -1}, "cache_ttl"),
    ({"cache_ttl": 0}, "cache_ttl"),
    ({"cache_ttl": "long"}, "cache_ttl"),
    ({"cache_options": "yes"}, "cache_options"),
    ({"cache_options": {"cache_by_customer": "yes"}}, "cache_options.cache_by_customer"),
    ({"cache_enabled": "yes"}, "cache_enabled"),
    ({"respan_params": {"cache_ttl": -1}}, "cache_ttl"),
])
def test_bad_cache_params_are_422(gw, mock, params, field):
    tag = new_tag()
    response = chat(gw, {"model": "gpt-test", "messages": messages(tag), "cache_enabled": True, **params})
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == "Validation error"
    assert list(response.json()["errors"]) == [field]
    assert mock.requests == []


def test_bad_stage_options_fail_startup(mock_upstream, amock, tmp_path):
    config = cache_config(mock_upstream, amock, tmp_path, {"defaults": {"cache_ttl": 0}})
    with pytest.raises(RuntimeError, match=r"defaults\.cache_ttl"):
        GatewayProcess(config, tmp_path).start()


def test_memory_store_evicts_the_oldest_only_for_new_keys():
    import asyncio

    from plugins.cache.store import Entry, MemoryStore

    def entry(body: bytes) -> Entry:
        now = time.time()
        return Entry(kind="whole", body=body, client_format="openai", endpoint="chat", model="m", served_by="p/m",
                     customer=None, created=now, expires=now + 60)

    async def run() -> None:
        store = MemoryStore(max_entries=2)
        await store.set("a", entry(b"1"))
        await store.set("b", entry(b"2"))
        await store.set("a", entry(b"3"))  # stored again: replaces itself, evicts nothing
        assert (await store.get("a")).body == b"3" and (await store.get("b")) is not None
        await store.set("c", entry(b"4"))  # a new key: the oldest goes
        assert sorted([k async for k in store.ids()]) == ["a", "c"]

    asyncio.run(run())


def test_redis_store_lists_a_key_once_when_scan_returns_it_twice():
    """SCAN may return a key again when Redis rehashes the keyspace between calls."""
    import asyncio

    from plugins.cache.store import NAMESPACE, RedisStore

    class Rehashing:  # what the store calls on its RedisClient; the pages as a rehash gives them
        pages = {0: (b"7", [b"a", b"b"]), b"7": (b"9", [b"b", b"c"]), b"9": (b"0", [b"a"])}

        async def execute(self, *args: object) -> object:
            assert args[0] == "SCAN" and args[2:4] == ("MATCH", NAMESPACE + "*")
            cursor, keys = self.pages[args[1]]
            return cursor, [NAMESPACE.encode() + k for k in keys]

    async def listing() -> list[str]:
        return [k async for k in RedisStore(Rehashing()).ids()]  # type: ignore[arg-type]

    assert asyncio.run(listing()) == ["a", "b", "c"]
