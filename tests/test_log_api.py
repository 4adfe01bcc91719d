"""The log plane's HTTP API end to end: ingestion of every payload generation, the query language,
PATCH, summary, users and the dashboard's stats, on a real gateway process with its SQLite log."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openai import OpenAI

from proxy.keys import hash_key
from tests.conftest import KEY, TEST_KEY, GatewayProcess, base_config
from tests.mock_upstream import MockUpstream

ADMIN = "sk-admin-logs-tests"


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("logapi")
    config = base_config(mock_upstream, workdir, admin_keys=[{"name": "ops", "key_hash": hash_key(ADMIN)}])
    process = GatewayProcess(config, workdir).start()
    yield process
    process.stop()


def post(gw: GatewayProcess, path: str, body: Any, key: str | None = KEY,
         headers: dict[str, str] | None = None) -> httpx.Response:
    sent = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{gw.url}{path}", content=orjson.dumps(body), headers={**sent, **(headers or {})}, timeout=30)


def admin(gw: GatewayProcess, method: str, path: str, body: Any = None, key: str = ADMIN, **params: Any) -> httpx.Response:
    content = orjson.dumps(body) if body is not None else None
    return httpx.request(method, f"{gw.url}{path}", content=content, params=params or None,
                         headers={"authorization": f"Bearer {key}"}, timeout=10)


def tag() -> str:
    return f"cust-{uuid.uuid4().hex[:10]}"


def listed(gw: GatewayProcess, filters: dict[str, Any], operator: str = "AND", **params: Any) -> list[dict[str, Any]]:
    r = admin(gw, "POST", "/api/request-logs/list/", {"filters": filters, "operator": operator}, **params)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


# -- ingestion: payload generations ------------------------------------------------------------


def test_current_schema_with_aliases_is_normalized(gw: GatewayProcess) -> None:
    customer = tag()
    end = datetime.now(UTC).replace(microsecond=0)
    payload = {
        "model": "gpt-4o-mini",
        "input": orjson.dumps([{"role": "user", "content": "What is 2+2?"}]).decode(),  # a JSON string
        "output": {"role": "assistant", "content": "4"},
        "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "prompt_tokens_details": {"cached_tokens": 200}},
        "ttft": 0.25,
        "generation_time": 1.5,
        "timestamp": iso(end),
        "customer_params": {"customer_identifier": customer, "name": "Ada", "email": "ada@example.com"},
        "metadata": {"team": "search", "attempt": 2, "flag": True},
        "properties": {"score": 0.9, "nested": {"a": [1, 2]}},
        "thread_identifier": "thread-1",
        "custom_identifier": "custom-1",
        "prompt": {"prompt_id": "p-42", "variables": {"x": "1"}},
        "response_format": "json_object",
        "temperature": 0.3,
        "environment": "ignored",
    }
    r = post(gw, "/api/request-logs/", payload, key=TEST_KEY)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["unique_id"] == created["id"] and created["customer_identifier"] == customer
    assert created["environment"] == "test"  # taken from the key, never from the payload
    # catalog price of gpt-4o-mini: 0.15 in, 0.60 out, 0.075 cached (USD per 1M)
    expected_cost = (800 * 0.15 + 200 * 0.075 + 500 * 0.60) / 1e6
    assert created["cost"] == pytest.approx(expected_cost)
    assert created["latency"] == 1.5 and created["time_to_first_token"] == 0.25
    assert created["prompt_cache_hit_tokens"] == 200

    log = admin(gw, "GET", f"/api/request-logs/{created['unique_id']}/").json()
    assert log["prompt_messages"] == [{"role": "user", "content": "What is 2+2?"}]
    assert log["completion_message"] == {"role": "assistant", "content": "4"}
    assert log["input"] == log["prompt_messages"] and log["output"] == log["completion_message"]
    assert log["prompt_tokens"] == 1000 and log["completion_tokens"] == 500 and log["total_request_tokens"] == 1500
    assert log["customer_email"] == "ada@example.com" and log["customer_name"] == "Ada"
    assert log["metadata"] == {"team": "search", "attempt": "2", "flag": "true"}  # values become strings
    assert log["properties"] == {"score": 0.9, "nested": {"a": [1, 2]}}  # properties keep their types
    assert log["prompt_id"] == "p-42" and log["variables"] == {"x": "1"}
    assert log["response_format"] == {"type": "json_object"}
    assert log["timestamp"] == iso(end) and log["start_time"] == iso(end - timedelta(seconds=1.5))
    assert log["log_method"] == "logging_api" and log["status"] == "success" and log["status_code"] == 200
    assert log["key_name"] == log["organization_key__name"] == "tests-env" and log["is_test"] is True
    assert log["tokens_per_second"] == pytest.approx(500 / 1.25, rel=1e-3)
    assert log["limit_info"] == {"is_allowed": True, "limits": []}


def test_legacy_create_payload_and_keywordsai_params(gw: GatewayProcess) -> None:
    customer = tag()
    payload = {  # the Keywords AI logger of LiteLLM (spec 8.3): failures come as status_code 400
        "model": "gpt-test",
        "prompt_messages": [{"role": "user", "content": "hi"}],
        "completion_message": {"role": "assistant", "content": None,
                               "tool_calls": [{"id": "c1", "type": "function",
                                               "function": {"name": "f", "arguments": "{}"}}]},
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "latency": 0.8,
        "status_code": 400,
        "error_message": "bad request upstream",
        "stream": True,
        "keywordsai_params": {"customer_identifier": customer, "thread_identifier": "t-legacy",
                              "metadata": {"k": "v"}},
    }
    r = post(gw, "/api/request-logs/create/", payload)
    assert r.status_code == 201, r.text
    log = admin(gw, "GET", f"/api/request-logs/{r.json()['unique_id']}/").json()
    assert log["customer_identifier"] == customer and log["thread_identifier"] == "t-legacy"
    assert log["status"] == "error" and log["failed"] is True and log["status_code"] == 400
    assert log["tool_calls"] == payload["completion_message"]["tool_calls"]  # extracted from the message
    assert log["stream"] is True and log["metadata"] == {"k": "v"}
    assert log["cost"] == 0  # no usage: nothing to price


def test_anthropic_usage_shape_counts_cache_tokens_in_the_prompt(gw: GatewayProcess) -> None:
    r = post(gw, "/api/request-logs/", {
        "model": "claude-sonnet-4-5", "log_type": "chat",
        "usage": {"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 300,
                  "cache_creation_input_tokens": 50}})
    assert r.status_code == 201, r.text
    log = admin(gw, "GET", f"/api/request-logs/{r.json()['unique_id']}/").json()
    assert log["prompt_tokens"] == 450 and log["completion_tokens"] == 20
    assert log["prompt_cache_hit_tokens"] == 300 and log["prompt_cache_creation_tokens"] == 50
    assert log["cost"] > 0  # the catalog knows the model


def test_custom_unit_prices_win_over_the_catalog(gw: GatewayProcess) -> None:
    r = post(gw, "/api/request-logs/", {"model": "my-finetune", "prompt_tokens": 1_000_000, "completion_tokens": 500_000,
                                        "prompt_unit_price": 2.0, "completion_unit_price": 4.0})
    assert r.json()["cost"] == pytest.approx(4.0)
    r = post(gw, "/api/request-logs/", {"model": "gpt-4o-mini", "prompt_tokens": 10, "cost": 1.25})
    assert r.json()["cost"] == 1.25  # a given cost is kept


def test_traces_ingest_litellm_exporter_shape(gw: GatewayProcess) -> None:
    """respan-exporter-litellm (spec 8.1): an array holding one span, input as JSON text, ISO times."""
    trace = uuid.uuid4().hex
    now = datetime.now(UTC)
    span = {"span_name": "litellm.completion", "span_workflow_name": "litellm", "log_type": "generation",
            "timestamp": iso(now), "start_time": iso(now - timedelta(seconds=2)), "latency": 2.0,
            "model": "gpt-4o-mini", "input": orjson.dumps([{"role": "user", "content": "q"}]).decode(),
            "stream": False, "status": "success", "trace_unique_id": trace, "trace_name": "litellm",
            "span_unique_id": trace, "customer_identifier": "c-exporter",
            "metadata": {"customer_email": "x@y.z", "extra_key": "e"}}
    r = post(gw, "/api/v1/traces/ingest", [span], headers={"X-Respan-Dogfood": "1"})
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "ingested_spans": 1, "created_traces": 1, "trace_ids": [trace], "errors": []}
    rows = listed(gw, {"trace_unique_id": {"operator": "", "value": [trace]}})
    assert len(rows) == 1
    log = rows[0]
    assert log["log_type"] == "generation" and log["log_method"] == "tracing_integration"
    assert log["prompt_messages"] == [{"role": "user", "content": "q"}]
    assert log["span_unique_id"] == trace and log["span_name"] == "litellm.completion"
    assert log["latency"] == 2.0 and log["prompt_tokens"] == 0 and log["cost"] == 0


def test_trace_ingest_of_a_tree_and_the_legacy_endpoint(gw: GatewayProcess) -> None:
    trace = uuid.uuid4().hex
    spans = [{"trace_unique_id": trace, "span_unique_id": "root", "span_name": "agent", "log_type": "trace",
              "input": "plan a trip", "output": "done"},
             {"trace_unique_id": trace, "span_unique_id": "llm", "span_parent_id": "root", "log_type": "llm",
              "model": "gpt-4o-mini", "usage": {"prompt_tokens": 10, "completion_tokens": 5}},
             {"trace_unique_id": trace, "span_unique_id": "tool", "span_parent_id": "root", "log_type": "step",
              "span_tools": ["search"]}]
    r = post(gw, "/api/v1/traces/ingest", {"data": spans})
    assert r.json()["ingested_spans"] == 3
    rows = listed(gw, {"trace_unique_id": {"operator": "", "value": [trace]}}, sort_by="start_time")
    types = {row["span_unique_id"]: row["log_type"] for row in rows}
    assert types == {"root": "workflow", "llm": "generation", "tool": "task"}  # aliases folded
    root = next(row for row in rows if row["span_unique_id"] == "root")
    assert root["input"] == "plan a trip" and root["output"] == "done"  # non-chat types keep input/output
    assert [r["span_unique_id"] for r in listed(gw, {"trace_unique_id": {"operator": "", "value": [trace]},
                                                     "is_root_span": {"operator": "", "value": [True]}})] == ["root"]
    r = post(gw, "/api/traces/ingest/", [{"trace_unique_id": uuid.uuid4().hex, "span_name": "x"}])
    assert r.status_code == 200 and r.json() == {"success": True, "ingested_count": 1}


def test_an_array_on_request_logs_is_a_batch(gw: GatewayProcess) -> None:
    customer = tag()
    r = post(gw, "/api/request-logs/", [{"model": "gpt-test", "customer_identifier": customer}] * 3)
    assert r.status_code == 201 and len(r.json()) == 3
    assert len(listed(gw, {"customer_identifier": {"operator": "", "value": [customer]}})) == 3


def test_the_same_unique_id_is_stored_once(gw: GatewayProcess) -> None:
    unique_id = uuid.uuid4().hex
    for _ in range(3):
        assert post(gw, "/api/request-logs/", {"unique_id": unique_id, "model": "gpt-test"}).status_code == 201
    assert len(listed(gw, {"unique_id": {"operator": "", "value": [unique_id]}})) == 1


def test_block_false_returns_once_queued_and_the_log_still_lands(gw: GatewayProcess) -> None:
    customer = tag()
    r = post(gw, "/api/request-logs/", {"model": "gpt-test", "customer_identifier": customer,
                                        "respan_api_controls": {"block": False}})
    assert r.status_code == 201
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not listed(gw, {"customer_identifier": {"operator": "", "value": [customer]}}):
        time.sleep(0.05)
    assert listed(gw, {"customer_identifier": {"operator": "", "value": [customer]}})


def test_disable_log_keeps_metrics_and_drops_content(gw: GatewayProcess) -> None:
    r = post(gw, "/api/request-logs/", {"model": "gpt-4o-mini", "prompt_messages": [{"role": "user", "content": "secret"}],
                                        "completion_message": {"role": "assistant", "content": "secret"},
                                        "prompt_tokens": 5, "disable_log": True})
    log = admin(gw, "GET", f"/api/request-logs/{r.json()['unique_id']}/").json()
    assert log["prompt_messages"] is None and log["completion_message"] is None and log["prompt_tokens"] == 5
    assert "secret" not in orjson.dumps(log).decode()


def test_ingestion_errors_name_the_field_and_store_nothing(gw: GatewayProcess) -> None:
    customer = tag()
    r = post(gw, "/api/request-logs/", {"model": "gpt-test", "prompt_tokens": "many"})
    assert r.status_code == 400 and "prompt_tokens" in r.json()["detail"]
    r = post(gw, "/api/request-logs/", {"log_type": "banana"})
    assert r.status_code == 400 and "log_type" in r.json()["detail"]
    r = post(gw, "/api/request-logs/", {"metadata": ["not", "an", "object"]})
    assert r.status_code == 400 and "metadata" in r.json()["detail"]
    r = post(gw, "/api/request-logs/", {"timestamp": "yesterday-ish"})
    assert r.status_code == 400 and "timestamp" in r.json()["detail"]
    r = post(gw, "/api/request-logs/", {"respan_api_controls": {"block": "no"}})
    assert r.status_code == 400 and "respan_api_controls" in r.json()["detail"]
    spans = [{"customer_identifier": customer}, {"customer_identifier": customer, "latency": [1]}]
    r = post(gw, "/api/v1/traces/ingest", spans)
    assert r.status_code == 400 and r.json()["detail"].startswith("[1].latency")
    r = httpx.post(f"{gw.url}/api/request-logs/", content=b"{not json", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    r = post(gw, "/api/v1/traces/ingest", {"span": 1})
    assert r.status_code == 400 and "array" in r.json()["detail"]
    assert listed(gw, {"customer_identifier": {"operator": "", "value": [customer]}}) == []  # nothing half-stored


def test_a_payload_over_20_mb_is_413(gw: GatewayProcess) -> None:
    big = {"model": "gpt-test", "input": "x" * (20 * 1024 * 1024 + 1)}
    r = post(gw, "/api/request-logs/", big)
    assert r.status_code == 413 and "20971520" in r.json()["detail"]
    # just under the limit is accepted
    r = post(gw, "/api/request-logs/", {"log_type": "custom", "input": "x" * (19 * 1024 * 1024)})
    assert r.status_code == 201


def test_keys_ingestion_takes_gateway_or_admin_keys_queries_only_admin(gw: GatewayProcess) -> None:
    assert post(gw, "/api/request-logs/", {"model": "m"}, key=None).status_code == 401
    assert post(gw, "/api/request-logs/", {"model": "m"}, key="sk-wrong").status_code == 401
    r = post(gw, "/api/request-logs/", {"model": "m"}, key=ADMIN)
    assert r.status_code == 201 and r.json()["environment"] == "production"
    assert admin(gw, "GET", "/api/request-logs/list/", key=KEY).status_code == 403
    assert httpx.get(f"{gw.url}/api/request-logs/list/").status_code == 401
    assert admin(gw, "GET", f"/api/request-logs/{r.json()['unique_id']}/", key=KEY).status_code == 403


# -- gateway logs through the same API ---------------------------------------------------------


def test_gateway_requests_are_queryable_with_their_fields(gw: GatewayProcess) -> None:
    customer = tag()
    client = OpenAI(api_key=KEY, base_url=f"{gw.url}/api")
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello"}],
        extra_body={"customer_identifier": customer, "metadata": {"feature": "chat"}})
    log_id = raw.headers["x-respan-log-id"]
    gw.record(log_id)
    log = admin(gw, "GET", f"/api/request-logs/{log_id}/").json()
    assert log["customer_identifier"] == customer and log["log_method"] == "inference"
    assert log["model"] == "mock-ok" and log["prompt_tokens"] > 0 and log["cost"] > 0
    assert log["metadata"] == {"feature": "chat"}
    rows = listed(gw, {"metadata__feature": {"operator": "", "value": ["chat"]},
                       "customer_identifier": {"operator": "", "value": [customer]}})
    assert [r["unique_id"] for r in rows] == [log_id]


# -- the query language --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(gw: GatewayProcess) -> dict[str, Any]:
    """Ten logs with known values, all tagged with one group_identifier."""
    group = f"corpus-{uuid.uuid4().hex[:8]}"
    now = time.time()
    logs = []
    for i in range(10):
        logs.append({"unique_id": f"{group}-{i}", "group_identifier": group, "model": ["alpha", "beta", "Gamma"][i % 3],
                     "customer_identifier": f"{group}-c{i % 4}", "cost": float(i), "latency": i / 10,
                     "prompt_tokens": i * 10, "completion_tokens": i, "timestamp": now - 60 * (10 - i),
                     "status_code": 500 if i in (3, 7) else 200, "error_message": "boom" if i in (3, 7) else "",
                     "metadata": {"tier": "gold" if i < 4 else "free", "n": str(i)},
                     "prompt_messages": [{"role": "user", "content": f"Question number {i}"}],
                     "thread_identifier": None if i % 2 else f"{group}-thread"})
    r = post(gw, "/api/request-logs/", logs)
    assert r.status_code == 201
    return {"group": group, "now": now}


def ids(rows: list[dict[str, Any]]) -> list[int]:
    return sorted(int(r["unique_id"].rsplit("-", 1)[1]) for r in rows)


def q(gw: GatewayProcess, corpus: dict[str, Any], filters: dict[str, Any], operator: str = "AND", **params: Any) -> list[int]:
    scoped = {"group_identifier": {"operator": "", "value": [corpus["group"]]}}
    if operator == "OR":  # the group scope must hold for every row: put it in the URL filters (always ANDed)
        params["group_identifier"] = corpus["group"]
        scoped = {}
    return ids(listed(gw, {**scoped, **filters}, operator, **params))


@pytest.mark.parametrize(("field", "operator", "value", "expected"), [
    ("model", "", ["alpha"], [0, 3, 6, 9]),
    ("model", "iexact", ["gamma"], [2, 5, 8]),
    ("cost", "lt", [2], [0, 1]),
    ("cost", "lte", [2], [0, 1, 2]),
    ("cost", "gt", [7], [8, 9]),
    ("cost", "gte", [7], [7, 8, 9]),
    ("latency", "gte", [0.85], [9]),
    ("prompt_messages", "contains", ["number 5"], [5]),
    ("messages", "icontains", ["QUESTION NUMBER 4"], [4]),
    ("customer_identifier", "startswith", ["corpus"], list(range(10))),
    ("customer_identifier", "endswith", ["-c1"], [1, 5, 9]),
    ("model", "in", ["alpha", "beta"], [0, 1, 3, 4, 6, 7, 9]),
    ("thread_identifier", "isnull", [True], [1, 3, 5, 7, 9]),
    ("thread_identifier", "isnull", [False], [0, 2, 4, 6, 8]),
    ("model", "not", ["alpha"], [1, 2, 4, 5, 7, 8]),
    ("status_code", "", [500], [3, 7]),
    ("status", "", ["error"], [3, 7]),
    ("failed", "", [True], [3, 7]),
    ("total_tokens", "gt", [80], [8, 9]),
    ("metadata__tier", "", ["gold"], [0, 1, 2, 3]),
    ("metadata__n", "in", ["1", "8"], [1, 8]),
    ("metadata__missing", "isnull", [True], list(range(10))),
    ("error_message", "icontains", ["BOOM"], [3, 7]),
])
def test_every_filter_operator(gw: GatewayProcess, corpus: dict[str, Any], field: str, operator: str,
                               value: list[Any], expected: list[int]) -> None:
    assert q(gw, corpus, {field: {"operator": operator, "value": value}}) == expected


def test_or_and_ranges(gw: GatewayProcess, corpus: dict[str, Any]) -> None:
    either = {"model": {"operator": "", "value": ["beta"]}, "cost": {"operator": "gte", "value": [8]}}
    assert q(gw, corpus, either, "OR") == [1, 4, 7, 8, 9]
    ranged = {"cost": [{"operator": "gte", "value": [2]}, {"operator": "lt", "value": [5]}]}
    assert q(gw, corpus, ranged) == [2, 3, 4]


def test_url_quick_filters(gw: GatewayProcess, corpus: dict[str, Any]) -> None:
    base = f"{gw.url}/api/request-logs/list/"
    headers = {"authorization": f"Bearer {ADMIN}"}

    def get(**params: Any) -> list[int]:
        r = httpx.get(base, params={"group_identifier": corpus["group"], **params}, headers=headers)
        assert r.status_code == 200, r.text
        return ids(r.json()["results"])

    assert get(model="beta") == [1, 4, 7]
    assert get(**{"cost[value]": "6", "cost[operator]": "gt"}) == [7, 8, 9]
    assert get(tier="free", model="alpha") == [6, 9]  # an unknown key is a metadata key
    assert get(**{"model[value]": "beta", "model[connector]": "OR", "cost[value]": "0",
                  "cost[connector]": "OR"}) == [0, 1, 4, 7]
    r = httpx.get(base, params={"cost[value]": "x", "cost[operator]": "gt"}, headers=headers)
    assert r.status_code == 400 and "cost" in r.json()["detail"]


def test_sorting_and_pagination(gw: GatewayProcess, corpus: dict[str, Any]) -> None:
    scope = {"group_identifier": {"operator": "", "value": [corpus["group"]]}}
    r = admin(gw, "POST", "/api/request-logs/list/", {"filters": scope}, sort_by="cost", page_size=4)
    page1 = r.json()
    assert page1["count"] == 10 and [x["cost"] for x in page1["results"]] == [0, 1, 2, 3]
    assert page1["previous"] is None and "page=2" in page1["next"]
    page3 = admin(gw, "POST", "/api/request-logs/list/", {"filters": scope}, sort_by="cost", page_size=4, page=3).json()
    assert [x["cost"] for x in page3["results"]] == [8, 9] and page3["next"] is None and "page=2" in page3["previous"]
    newest = listed(gw, scope, page_size=3)  # default sort: -id, the newest first
    assert [x["unique_id"] for x in newest] == [f"{corpus['group']}-{i}" for i in (9, 8, 7)]
    by_latency = listed(gw, scope, sort_by="-latency", page_size=2)
    assert [x["latency"] for x in by_latency] == [0.9, 0.8]
    only = listed(gw, scope, page_size=1, include_fields="model,cost")
    assert set(only[0]) == {"unique_id", "id", "model", "cost"}


def test_the_time_range(gw: GatewayProcess) -> None:
    customer = tag()
    two_hours_ago = time.time() - 7200
    post(gw, "/api/request-logs/", [{"customer_identifier": customer, "timestamp": two_hours_ago},
                                    {"customer_identifier": customer}])
    scope = {"customer_identifier": {"operator": "", "value": [customer]}}
    assert len(listed(gw, scope)) == 1  # the default range is the last hour
    since = iso(datetime.now(UTC) - timedelta(hours=3))
    assert len(listed(gw, scope, start_time=since)) == 2
    assert len(listed(gw, scope, start_time=two_hours_ago - 1, end_time=two_hours_ago + 1)) == 1


@pytest.mark.parametrize(("body", "params", "names"), [
    ({"filters": {"nope": {"operator": "", "value": [1]}}}, {}, "nope"),
    ({"filters": {"cost": {"operator": "bigger", "value": [1]}}}, {}, "filters.cost.operator"),
    ({"filters": {"cost": {"operator": "gt", "value": ["cheap"]}}}, {}, "filters.cost.value"),
    ({"filters": {"cost": {"operator": "gt", "value": [1, 2]}}}, {}, "exactly one value"),
    ({"filters": {"metadata": {"operator": "", "value": ["x"]}}}, {}, "JSON"),
    ({"filters": {"cost": 5}}, {}, "filters.cost"),
    ({"operator": "XOR"}, {}, "operator"),
    ({}, {"sort_by": "-prompt_messages"}, "sort_by"),
    ({}, {"page_size": "5000"}, "page_size"),
    ({}, {"page": "0"}, "page"),
    ({}, {"start_time": "soon"}, "start_time"),
    ({"filter": {}}, {}, "filter"),
])
def test_bad_queries_are_400_naming_the_field(gw: GatewayProcess, body: dict[str, Any], params: dict[str, str],
                                              names: str) -> None:
    r = admin(gw, "POST", "/api/request-logs/list/", body, **params)
    assert r.status_code == 400 and names in r.json()["detail"], r.text


# -- edits ---------------------------------------------------------------------------------------


def test_patch_merges_metadata_and_sets_feedback(gw: GatewayProcess) -> None:
    log_id = post(gw, "/api/request-logs/", {"model": "m", "metadata": {"a": "1", "b": "2"}}).json()["unique_id"]
    r = admin(gw, "PATCH", f"/api/request-logs/{log_id}/", {"metadata": {"b": None, "c": 3}, "note": "looked at",
                                                           "positive_feedback": True, "is_pinned": True})
    assert r.status_code == 200, r.text
    log = r.json()
    assert log["metadata"] == {"a": "1", "c": "3"} and log["note"] == "looked at"
    assert log["positive_feedback"] is True and log["is_pinned"] is True
    log = admin(gw, "PATCH", f"/api/request-logs/{log_id}/", {"positive_feedback": None}).json()
    assert log["positive_feedback"] is None and log["note"] == "looked at"  # null clears; the rest stays
    r = admin(gw, "PATCH", f"/api/request-logs/{log_id}/", {"model": "other"})
    assert r.status_code == 400 and "model: not editable" in r.json()["detail"]
    r = admin(gw, "PATCH", f"/api/request-logs/{log_id}/", {"note": 5})
    assert r.status_code == 400 and "note" in r.json()["detail"]
    assert admin(gw, "PATCH", "/api/request-logs/no-such-log/", {"note": "x"}).status_code == 404
    assert admin(gw, "GET", "/api/request-logs/no-such-log/").json() == {"detail": "Not found."}


def test_batch_update_is_all_or_nothing(gw: GatewayProcess) -> None:
    first = post(gw, "/api/request-logs/", {"model": "m"}).json()["unique_id"]
    second = post(gw, "/api/request-logs/", {"model": "m"}).json()["unique_id"]
    r = admin(gw, "PATCH", "/api/request-logs/batch-update/", {"logs": [
        {"unique_id": first, "note": "one"}, {"unique_id": "missing-id", "note": "two"}]})
    assert r.status_code == 404 and r.json()["missing"] == ["missing-id"]
    assert admin(gw, "GET", f"/api/request-logs/{first}/").json()["note"] is None  # nothing applied
    r = admin(gw, "PATCH", "/api/request-logs/batch-update/", {"logs": [
        {"unique_id": first, "note": "one", "metadata": {"x": "1"}}, {"unique_id": second, "is_pinned": True}]})
    assert r.status_code == 200 and r.json() == {"updated": 2}
    assert admin(gw, "GET", f"/api/request-logs/{first}/").json()["metadata"] == {"x": "1"}
    assert admin(gw, "GET", f"/api/request-logs/{second}/").json()["is_pinned"] is True
    r = admin(gw, "PATCH", "/api/request-logs/batch-update/", {"logs": [{"note": "no id"}]})
    assert r.status_code == 400 and "logs[0].unique_id" in r.json()["detail"]


# -- summary, users, stats ------------------------------------------------------------------------


def test_summary(gw: GatewayProcess, corpus: dict[str, Any]) -> None:
    r = admin(gw, "POST", "/api/request-logs/summary/", {"filters": {
        "group_identifier": {"operator": "", "value": [corpus["group"]]}}})
    s = r.json()
    assert s["number_of_requests"] == 10 and s["total_cost"] == pytest.approx(45.0)
    assert s["total_prompt_tokens"] == 450 and s["total_completion_tokens"] == 45 and s["total_tokens"] == 495
    assert s["avg_latency"] == pytest.approx(0.45) and s["error_count"] == 2


def test_users_spend_per_customer(gw: GatewayProcess, corpus: dict[str, Any]) -> None:
    r = admin(gw, "GET", "/api/users/",
              **{"customer_identifier[value]": corpus["group"], "customer_identifier[operator]": "startswith"})
    users = r.json()
    assert users["count"] == 4
    spend = {u["customer_identifier"]: u["total_cost"] for u in users["results"]}
    g = corpus["group"]
    assert spend == {f"{g}-c0": 0 + 4 + 8, f"{g}-c1": 1 + 5 + 9, f"{g}-c2": 2 + 6, f"{g}-c3": 3 + 7}
    assert [u["customer_identifier"] for u in users["results"]] == [f"{g}-c1", f"{g}-c0", f"{g}-c3", f"{g}-c2"]
    detail = admin(gw, "GET", f"/api/users/{g}-c1/").json()
    assert detail["number_of_requests"] == 3 and detail["total_spend"] == 15
    assert sum(d["cost"] for d in detail["spend_by_day"]) == 15
    assert {m["model"]: m["cost"] for m in detail["models"]} == {"beta": 1, "Gamma": 5, "alpha": 9}
    assert admin(gw, "GET", "/api/users/nobody-at-all/").status_code == 404


def test_dashboard_stats(gw: GatewayProcess, corpus: dict[str, Any]) -> None:
    r = admin(gw, "GET", "/api/dashboard/stats/", group_identifier=corpus["group"])
    stats = r.json()
    assert stats["summary"]["number_of_requests"] == 10 and stats["summary"]["error_rate"] == pytest.approx(0.2)
    assert sum(p["requests"] for p in stats["series"]) == 10
    assert {m["name"] for m in stats["by_model"]} == {"alpha", "beta", "Gamma"}
    # exact over a small range (nearest rank): latencies 0.0, 0.1, ..., 0.9
    assert stats["percentiles"]["latency"] == {"p50": 0.4, "p90": 0.8, "p99": 0.9}
    assert stats["percentiles"]["time_to_first_token"] == {"p50": None, "p90": None, "p99": None}
    assert sum(p["cost"] for p in stats["model_series"]) == pytest.approx(45.0)


# -- retention ---------------------------------------------------------------------------------


def test_retention_blurs_then_deletes_and_keeps_pinned(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    config = base_config(mock_upstream, seed, admin_keys=[{"name": "ops", "key_hash": hash_key(ADMIN)}])
    first = GatewayProcess(config, seed).start()
    day = 86400
    now = time.time()
    logs = [{"unique_id": "fresh", "timestamp": now - 1 * day},
            {"unique_id": "old", "timestamp": now - 10 * day},
            {"unique_id": "ancient", "timestamp": now - 40 * day},
            {"unique_id": "ancient-pinned", "timestamp": now - 40 * day}]
    for log in logs:
        log.update(model="gpt-test", prompt_messages=[{"role": "user", "content": "private"}],
                   completion_message={"role": "assistant", "content": "answer"})
    post(first, "/api/request-logs/", logs)
    admin(first, "PATCH", "/api/request-logs/ancient-pinned/", {"is_pinned": True})
    first.stop()
    # the same database, now with retention: content after 7 days, rows after 30
    config["logs"]["retention"] = {"content_days": 7, "delete_days": 30, "interval": 0.2}
    second = GatewayProcess(config, seed).start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if admin(second, "GET", "/api/request-logs/ancient/").status_code == 404:
                break
            time.sleep(0.1)
        get = lambda i: admin(second, "GET", f"/api/request-logs/{i}/")  # noqa: E731
        assert get("ancient").status_code == 404
        fresh, old, pinned = get("fresh").json(), get("old").json(), get("ancient-pinned").json()
        assert fresh["prompt_messages"] and fresh["blurred"] is False
        assert old["prompt_messages"] is None and old["completion_message"] is None and old["blurred"] is True
        assert old["model"] == "gpt-test"  # metrics stay
        assert pinned["prompt_messages"] and pinned["blurred"] is False
        metrics = httpx.get(f"{second.url}/metrics").text
        assert 'llmrelay_log_retention_rows_total{action="deleted"} 1.0' in metrics
    finally:
        second.stop()
