"""LLMRelayCallback with the real LiteLLM package: LiteLLM calls the mock OpenAI upstream directly,
the callback ships its spans to a real gateway's /api/v1/traces/ingest, and the gateway's admin
API shows what was stored (answer, usage, cost, latency, customer, metadata, status). Also: the
callback never holds up a LiteLLM call when the endpoint hangs or is down (counters, not timings),
and the package fails to import with a clear message when LiteLLM is missing."""

from __future__ import annotations

import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before litellm is imported: no fetch of the cost map

import asyncio
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import litellm
import pytest

from plugins.litellm import LLMRelayCallback
from proxy.keys import hash_key
from tests.conftest import KEY, ROOT, GatewayProcess, base_config, wait_until
from tests.mock_upstream import WORDS, MockUpstream, free_port

ADMIN = "sk-admin-litellm-tests"
UPSTREAM_KEY = "sk-litellm-upstream"
ANSWER = "".join(WORDS)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
PRICES = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}  # LiteLLM's per-call custom pricing
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("litellm-receiver")
    config = base_config(mock_upstream, workdir, admin_keys=[{"name": "ops", "key_hash": hash_key(ADMIN)}])
    process = GatewayProcess(config, workdir).start()
    yield process
    process.stop()


def unregister(cb: LLMRelayCallback) -> None:
    """Take the callback out of every list LiteLLM copies `litellm.callbacks` into."""
    for name in ("callbacks", "success_callback", "failure_callback", "_async_success_callback",
                 "_async_failure_callback", "input_callback"):
        setattr(litellm, name, [c for c in getattr(litellm, name, []) if c is not cb])


@pytest.fixture
def register() -> Iterator[Callable[[LLMRelayCallback], LLMRelayCallback]]:
    """register(cb): make cb LiteLLM's only callback for this test; closed and removed afterwards."""
    registered: list[LLMRelayCallback] = []

    def add(cb: LLMRelayCallback) -> LLMRelayCallback:
        registered.append(cb)
        litellm.callbacks = [cb]
        return cb

    yield add
    for cb in registered:
        cb.close(timeout=2)
        unregister(cb)


@pytest.fixture
def cb(receiver: GatewayProcess, register: Callable[[LLMRelayCallback], LLMRelayCallback]) -> LLMRelayCallback:
    return register(LLMRelayCallback(api_key=KEY, base_url=receiver.url, flush_interval=0.05))


def call(mock: MockUpstream, model: str, params: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments of a LiteLLM call to the mock, with a known litellm_call_id."""
    args: dict[str, Any] = {"model": f"openai/{model}", "api_base": mock.base_url, "api_key": UPSTREAM_KEY,
                            "messages": MESSAGES, "litellm_call_id": str(uuid.uuid4()), "num_retries": 0}
    if params is not None:
        args["metadata"] = {"respan_params": params}
    return {**args, **kwargs}


def stored(receiver: GatewayProcess, log_id: str) -> dict[str, Any]:
    r = httpx.get(f"{receiver.url}/api/request-logs/{log_id}/", headers={"Authorization": f"Bearer {ADMIN}"},
                  timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def listed(receiver: GatewayProcess, customer: str) -> list[dict[str, Any]]:
    r = httpx.post(f"{receiver.url}/api/request-logs/list/", headers={"Authorization": f"Bearer {ADMIN}"},
                   json={"filters": {"customer_identifier": {"operator": "", "value": [customer]}}}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def tag() -> str:
    return f"cust-{uuid.uuid4().hex[:10]}"


def settle(cb: LLMRelayCallback, events: int) -> None:
    """Wait until LiteLLM has handed `events` events to the callback (it logs a sync call from a
    thread of its own, after the call returned), then until the callback has sent them."""
    assert wait_until(lambda: cb.sent + cb.failed + cb.dropped + cb.pending >= events), "LiteLLM never logged"
    assert cb.flush(10)


async def logged(cb: LLMRelayCallback, events: int) -> None:
    """Inside asyncio.run: let LiteLLM's logging tasks run before the loop ends (it cancels them)."""
    for _ in range(500):
        if cb.sent + cb.failed + cb.dropped + cb.pending >= events:
            return
        await asyncio.sleep(0.01)



# -- what reaches the gateway ----------------------------------------------------------------


def test_sync_completion_is_logged_with_output_usage_cost_and_params(cb, receiver, mock_upstream):
    customer = tag()
    params = {"customer_identifier": customer, "thread_identifier": "thread-7", "trace_id": "trace-7",
              "metadata": {"team": "search", "attempt": 2}, "experiment": "a1",  # an unknown key: into metadata
              "customer_params": {"email": "ada@example.com", "name": "Ada"}, "custom_identifier": "cid-1",
              "workflow_name": "checkout"}
    args = call(mock_upstream, "mock-litellm-sync", params, temperature=0.2, **PRICES)
    before = time.time()
    response = litellm.completion(**args)
    after = time.time()
    assert response.choices[0].message.content == ANSWER
    settle(cb, 1)
    log = stored(receiver, args["litellm_call_id"])

    assert log["unique_id"] == args["litellm_call_id"]
    assert log["log_type"] == "chat" and log["log_method"] == "tracing_integration"
    assert log["model"] == "mock-litellm-sync" and log["provider_id"] == "openai"
    assert log["status"] == "success" and log["status_code"] == 200 and log["stream"] is False
    assert log["prompt_messages"] == MESSAGES
    assert log["completion_message"] == {"role": "assistant", "content": ANSWER}
    assert log["prompt_tokens"] == 11 and log["completion_tokens"] == 7 and log["prompt_cache_hit_tokens"] == 2
    assert log["total_request_tokens"] == 18
    assert log["cost"] == pytest.approx(response._hidden_params["response_cost"]) and log["cost"] > 0
    assert 0 < log["latency"] <= after - before
    # times are UTC: the call happened between `before` and `after` on this machine's clock
    assert before - 1 <= seconds(log["start_time"]) <= seconds(log["timestamp"]) <= after + 1
    assert log["customer_identifier"] == customer and log["customer_email"] == "ada@example.com"
    assert log["customer_name"] == "Ada"
    assert log["thread_identifier"] == "thread-7" and log["custom_identifier"] == "cid-1"
    assert log["trace_unique_id"] == "trace-7" and log["span_workflow_name"] == "checkout"
    assert log["span_name"] == "litellm.completion"
    assert log["metadata"] == {"team": "search", "attempt": "2", "experiment": "a1"}
    assert log["temperature"] == 0.2
    assert cb.sent == 1 and cb.failed == 0 and cb.dropped == 0 and cb.pending == 0


def test_async_completion_and_async_stream(cb, receiver, mock_upstream):
    customer = tag()
    plain = call(mock_upstream, "mock-litellm-async", {"customer_identifier": customer}, **PRICES)
    streamed = call(mock_upstream, "mock-litellm-astream", {"customer_identifier": customer, "span_name": "answer"},
                    stream=True, stream_options={"include_usage": True}, **PRICES)

    async def run() -> str:
        await litellm.acompletion(**plain)
        text = ""
        async for chunk in await litellm.acompletion(**streamed):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        await logged(cb, 2)
        return text

    assert asyncio.run(run()) == ANSWER
    settle(cb, 2)
    one, two = stored(receiver, plain["litellm_call_id"]), stored(receiver, streamed["litellm_call_id"])
    assert one["stream"] is False and one["time_to_first_token"] is None
    assert one["completion_message"]["content"] == ANSWER and one["prompt_tokens"] == 11 and one["cost"] > 0
    assert two["stream"] is True and two["span_name"] == "answer"
    assert two["completion_message"] == {"role": "assistant", "content": ANSWER}  # the whole streamed answer
    assert two["prompt_tokens"] == 11 and two["completion_tokens"] == 7
    assert two["cost"] == pytest.approx((11 * 1 + 7 * 2) / 1e6)
    assert two["time_to_first_token"] is not None and 0 <= two["time_to_first_token"] <= two["latency"]
    # the stream's intermediate events were not logged: one record per call
    assert len(listed(receiver, customer)) == 2
    assert cb.sent == 2 and cb.failed == 0


def test_sync_stream_is_one_record_with_the_whole_answer(cb, receiver, mock_upstream):
    customer = tag()
    args = call(mock_upstream, "mock-litellm-stream", {"customer_identifier": customer}, stream=True,
                stream_options={"include_usage": True})
    text = "".join(c.choices[0].delta.content or "" for c in litellm.completion(**args) if c.choices)
    assert text == ANSWER
    # LiteLLM runs the final stream event on a thread of its own after the last chunk
    settle(cb, 1)
    log = stored(receiver, args["litellm_call_id"])
    assert log["stream"] is True and log["completion_message"]["content"] == ANSWER
    assert log["completion_tokens"] == 7 and log["time_to_first_token"] is not None
    assert [r["unique_id"] for r in listed(receiver, customer)] == [args["litellm_call_id"]]


def test_tool_calls_and_tools_are_logged(cb, receiver, mock_upstream):
    # This LiteLLM imports the optional `mcp` package whenever `tools` is passed (its MCP bridge);
    # `_skip_mcp_handler` is LiteLLM's own switch to bypass that bridge.
    args = call(mock_upstream, "mock-tools", {"customer_identifier": tag()}, tools=TOOLS, tool_choice="auto",
                _skip_mcp_handler=True)
    response = litellm.completion(**args)
    assert response.choices[0].message.tool_calls[0].function.name == "get_weather"
    settle(cb, 1)
    log = stored(receiver, args["litellm_call_id"])
    assert log["tools"] == TOOLS and log["tool_choice"] == "auto"
    assert log["tool_calls"] == [{"id": "call_1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assert log["completion_message"]["tool_calls"] == log["tool_calls"] and log["has_tool_calls"] is True


def test_failures_are_logged_with_status_and_error(cb, receiver, mock_upstream):
    customer = tag()
    failing = call(mock_upstream, "mock-status-503", {"customer_identifier": customer, "metadata": {"k": "v"}})
    with pytest.raises(litellm.ServiceUnavailableError):
        litellm.completion(**failing)
    refused = call(mock_upstream, "mock-ok", {"customer_identifier": customer},
                   api_base=f"http://127.0.0.1:{free_port()}/v1")

    async def run() -> None:
        with pytest.raises(litellm.InternalServerError):  # LiteLLM's mapping of a refused connection
            await litellm.acompletion(**refused)
        await logged(cb, 2)

    asyncio.run(run())
    settle(cb, 2)
    upstream_error, connection_error = stored(receiver, failing["litellm_call_id"]), stored(receiver, refused["litellm_call_id"])
    assert upstream_error["status"] == "error" and upstream_error["failed"] is True
    assert upstream_error["status_code"] == 503  # the exception's own status code
    assert "mock upstream error 503" in upstream_error["error_message"]
    assert upstream_error["metadata"] == {"k": "v"} and upstream_error["customer_identifier"] == customer
    assert upstream_error["prompt_messages"] == MESSAGES and upstream_error["completion_message"] is None
    assert upstream_error["cost"] == 0 and upstream_error["latency"] > 0
    assert connection_error["status"] == "error" and connection_error["status_code"] == 500
    assert "Connection error" in connection_error["error_message"]
    assert cb.sent == 2 and cb.failed == 0


def test_disable_log_keeps_the_metrics_and_drops_the_content(cb, receiver, mock_upstream):
    args = call(mock_upstream, "mock-litellm-private", {"customer_identifier": tag(), "disable_log": True})
    litellm.completion(**args)
    settle(cb, 1)
    log = stored(receiver, args["litellm_call_id"])
    assert log["prompt_messages"] is None and log["completion_message"] is None and log["input"] is None
    assert log["prompt_tokens"] == 11 and log["completion_tokens"] == 7 and log["status"] == "success"


def test_embeddings_are_logged_as_embedding(cb, receiver, mock_upstream):
    call_id = str(uuid.uuid4())
    litellm.embedding(model="openai/mock-embed", input=["a", "b"], api_base=mock_upstream.base_url,
                      api_key=UPSTREAM_KEY, litellm_call_id=call_id, metadata={"respan_params": {"customer_identifier": "emb"}})
    settle(cb, 1)
    log = stored(receiver, call_id)
    assert log["log_type"] == "embedding" and log["input"] == ["a", "b"] and log["prompt_tokens"] == 10
    assert log["customer_identifier"] == "emb" and log["status"] == "success"


def test_a_span_the_receiver_refuses_does_not_take_its_batch_with_it(register, receiver, mock_upstream):
    cb = register(LLMRelayCallback(api_key=KEY, base_url=receiver.url, batch_size=3, flush_interval=30))
    good = [call(mock_upstream, "mock-litellm-batch", {"customer_identifier": tag()}) for _ in range(2)]
    bad = call(mock_upstream, "mock-litellm-batch", max_tokens=-1)  # echoed; the receiver refuses it (400)
    for args in (good[0], bad, good[1]):
        litellm.completion(**args)
    # three spans make a batch (no flush_interval wait); the 400 is retried in halves
    assert wait_until(lambda: cb.sent + cb.failed == 3)
    assert cb.sent == 2 and cb.failed == 1
    for args in good:
        assert stored(receiver, args["litellm_call_id"])["status"] == "success"
    r = httpx.get(f"{receiver.url}/api/request-logs/{bad['litellm_call_id']}/",
                  headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert r.status_code == 404


# -- never blocks the caller -------------------------------------------------------------


def test_a_hanging_endpoint_never_holds_up_a_call(register, mock_upstream):
    """The endpoint accepts connections and never answers: calls still return, the records wait
    in the bounded queue (the oldest dropped when it is full), and nothing is lost uncounted."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # the kernel completes the handshakes; nobody ever reads or answers
    endpoint = f"http://127.0.0.1:{hole.getsockname()[1]}/api/v1/traces/ingest"
    cb = register(LLMRelayCallback(api_key=KEY, endpoint=endpoint, batch_size=2, flush_interval=0.05,
                                   max_queue=5, timeout=60))
    n = 10
    try:
        for _ in range(n):
            assert litellm.completion(**call(mock_upstream, "mock-litellm-hole")).choices[0].message.content == ANSWER
        # LiteLLM logs from its own threads: wait until every call's event reached the callback
        assert wait_until(lambda: cb.pending + cb.dropped == n)
        assert cb.sent == 0 and cb.failed == 0
        assert cb.dropped >= n - 5 - 2  # at most 5 queued and one batch of 2 in flight
        assert cb.pending <= 5 + 2
        assert not cb.flush(0.2)  # the endpoint never answers: a bounded flush says so
    finally:
        hole.close()  # the stuck request fails now; close() gives up on what is left
    cb.close(timeout=1)
    assert wait_until(lambda: cb.failed + cb.dropped == n), (cb.sent, cb.failed, cb.dropped, cb.pending)
    assert cb.sent == 0


def test_an_endpoint_that_is_down_counts_failures_and_calls_still_succeed(register, mock_upstream):
    endpoint = f"http://127.0.0.1:{free_port()}/api/v1/traces/ingest"
    cb = register(LLMRelayCallback(api_key=KEY, endpoint=endpoint, flush_interval=0.05))
    for _ in range(3):
        assert litellm.completion(**call(mock_upstream, "mock-litellm-down")).choices[0].message.content == ANSWER
    assert wait_until(lambda: cb.pending + cb.failed == 3)
    assert cb.flush(15)  # the batch is retried with backoff, then given up on
    assert cb.failed == 3 and cb.sent == 0 and cb.dropped == 0 and cb.pending == 0


def test_a_wrong_key_is_refused_and_counted_without_retrying(register, receiver, mock_upstream):
    cb = register(LLMRelayCallback(api_key="sk-not-a-gateway-key", base_url=receiver.url + "/api", flush_interval=0.05))
    assert cb.endpoint == f"{receiver.url}/api/v1/traces/ingest"  # a base_url ending in /api is the API root
    args = call(mock_upstream, "mock-litellm-401", {"customer_identifier": tag()})
    litellm.completion(**args)
    assert wait_until(lambda: cb.pending + cb.failed == 1)
    assert cb.flush(10)
    assert cb.failed == 1 and cb.sent == 0
    r = httpx.get(f"{receiver.url}/api/request-logs/{args['litellm_call_id']}/",
                  headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert r.status_code == 404


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLMRELAY_API_KEY", "sk-from-env")
    monkeypatch.setenv("LLMRELAY_BASE_URL", "http://relay.internal:9000/")
    cb = LLMRelayCallback()
    try:
        assert cb.endpoint == "http://relay.internal:9000/api/v1/traces/ingest"
        # LiteLLM builds (and debug-logs) a key from a callback's public attributes
        public = {k: v for k, v in vars(cb).items() if not k.startswith("_")}
        assert "sk-from-env" not in repr(cb) and "sk-from-env" not in str(public)
    finally:
        cb.close(timeout=0)
    monkeypatch.delenv("LLMRELAY_API_KEY")
    monkeypatch.delenv("LLMRELAY_BASE_URL")
    monkeypatch.setenv("RESPAN_API_KEY", "sk-respan")
    monkeypatch.setenv("RESPAN_BASE_URL", "https://logs.example.com/api")
    cb = LLMRelayCallback(endpoint="http://127.0.0.1:1/custom/ingest")
    try:
        assert cb.endpoint == "http://127.0.0.1:1/custom/ingest"
    finally:
        cb.close(timeout=0)


def test_import_without_litellm_says_how_to_install_it():
    code = "import sys; sys.modules['litellm'] = None; import plugins.litellm"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "pip install llmrelay[litellm]" in result.stderr


def test_times_are_utc_whatever_the_local_zone(cb, receiver, mock_upstream, monkeypatch):
    """LiteLLM hands the callback naive local datetimes; the span's times must still be UTC."""
    monkeypatch.setenv("TZ", "XYZ-5:45")  # a POSIX zone 5 h 45 min east of UTC (no tzdata needed)
    time.tzset()
    try:
        assert datetime.now().astimezone().utcoffset().total_seconds() == 5 * 3600 + 45 * 60
        args = call(mock_upstream, "mock-litellm-tz", {"customer_identifier": tag()})
        before = time.time()
        litellm.completion(**args)
        after = time.time()
        settle(cb, 1)  # LiteLLM logs the call from another thread: keep the zone until it has
    finally:
        monkeypatch.undo()
        time.tzset()
    log = stored(receiver, args["litellm_call_id"])
    assert before - 1 <= seconds(log["start_time"]) <= seconds(log["timestamp"]) <= after + 1
