"""Request logs end to end: one record per request (success, upstream error, gateway error, auth
failure, client disconnect), its fields, the JSONL sink, spill and replay in a running gateway,
and the drain on SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgspec
import orjson
import pytest
from openai import OpenAI

from proxy.logs.record import decoder
from proxy.logs.sinks.sqlite import read_records
from tests.conftest import KEY, TEST_KEY, GatewayProcess, base_config, metric, wait_until
from tests.mock_upstream import WORDS

ANSWER = "".join(WORDS)
# mock usage: 11 prompt tokens (2 of them cached), 7 completion; gpt-test prices per 1M tokens:
# input 1.0, cached input 0.5, output 2.0
GPT_TEST_COST = (9 * 1.0 + 2 * 0.5 + 7 * 2.0) / 1e6
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


# -- helpers -----------------------------------------------------------------------------


def jsonl_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def wait_for_ids(db: Path, ids: list[str], timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            rows = read_records(db) if db.exists() else []
        except Exception:
            rows = []
        if set(ids) <= {r["unique_id"] for r in rows}:
            return rows
        time.sleep(0.05)
    return rows


def exactly_one_each(gw: GatewayProcess, ids: list[str], before: int) -> dict[str, dict[str, Any]]:
    """Every id is logged once in SQLite and once in JSONL, and nothing else was logged."""
    assert len(set(ids)) == len(ids), "log ids must be unique per request"
    rows = wait_for_ids(gw.log_db, ids)
    time.sleep(0.15)  # several flush intervals: a duplicate or stray record would show up now
    rows = read_records(gw.log_db)
    assert len(rows) == before + len(ids), f"expected {len(ids)} new records, got {len(rows) - before}"
    by_id = {r["unique_id"]: r for r in rows}
    assert set(ids) <= set(by_id)
    lines = jsonl_records(gw.workdir / "logs.jsonl")
    for log_id in ids:
        assert sum(line["unique_id"] == log_id for line in lines) == 1, f"{log_id} not exactly once in JSONL"
    return {i: by_id[i] for i in ids}


def count_rows(gw: GatewayProcess) -> int:
    """Rows once earlier tests' records have all landed (the count holds still)."""
    last = -1
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        count = len(read_records(gw.log_db)) if gw.log_db.exists() else 0
        if count == last:
            return count
        last = count
        time.sleep(0.15)
    return last




def client(gw: GatewayProcess, key: str = KEY) -> OpenAI:
    return OpenAI(base_url=f"{gw.url}/api", api_key=key, max_retries=0)


# -- one record per request, with its fields --------------------------------------------------


def test_success_record_fields(gateway, mock):
    before = count_rows(gateway)
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=MESSAGES,
        temperature=0.3,
        max_tokens=50,
        extra_body={
            "customer_identifier": "cust-42",
            "thread_identifier": "thread-7",
            "custom_identifier": "custom-9",
            "metadata": {"team": "search", "attempt": 2},
        },
    )
    assert raw.parse().choices[0].message.content == ANSWER
    log_id = raw.headers["x-respan-log-id"]
    request_id = raw.headers["x-respan-gateway-request-id"]
    assert log_id != request_id

    record = exactly_one_each(gateway, [log_id], before)[log_id]
    assert record["unique_id"] == log_id
    assert record["gateway_request_id"] == request_id
    assert record["start_time"] < record["timestamp"]
    assert record["timestamp"] <= time.time()
    assert record["request_url_path"] == "/api/chat/completions"
    assert record["model"] == "mock-ok"  # what served
    assert record["model_requested"] == "gpt-test"
    assert record["provider_id"] == "mock"
    assert record["deployment_name"] == "mock"
    assert record["status_code"] == 200
    assert record["status"] == "success"
    assert record["error_message"] == ""
    assert record["stream"] is False
    assert record["prompt_tokens"] == 11
    assert record["completion_tokens"] == 7
    assert record["total_request_tokens"] == 18
    assert record["prompt_cache_hit_tokens"] == 2
    assert record["cost"] == pytest.approx(GPT_TEST_COST, rel=1e-9)
    assert 0 < record["latency"] <= record["timestamp"] - record["start_time"] + 0.01
    assert record["time_to_first_token"] is None
    assert 0 <= record["routing_time"] < record["latency"]
    assert record["customer_identifier"] == "cust-42"
    assert record["thread_identifier"] == "thread-7"
    assert record["custom_identifier"] == "custom-9"
    assert record["metadata"] == {"team": "search", "attempt": "2"}  # values stored as strings
    assert record["key_name"] == "tests"
    assert record["environment"] == "production"
    assert record["ip_address"] == "127.0.0.1"
    assert record["temperature"] == 0.3
    assert record["max_tokens"] == 50
    assert record["prompt_messages"] == MESSAGES
    assert record["completion_message"]["role"] == "assistant"
    assert record["completion_message"]["content"] == ANSWER
    assert not record["warnings"]
    # the gateway params went to the log, not upstream
    sent = mock.last()["body"]
    assert not {"customer_identifier", "thread_identifier", "custom_identifier", "metadata"} & set(sent)


def test_stream_record_fields(gateway, mock):
    before = count_rows(gateway)
    with client(gateway, TEST_KEY).chat.completions.with_streaming_response.create(
        model="gpt-test", messages=MESSAGES, stream=True,
        extra_body={"respan_params": {"customer_identifier": "cust-stream", "metadata": {"k": "v"}}},
    ) as response:
        log_id = response.headers["x-respan-log-id"]
        request_id = response.headers["x-respan-gateway-request-id"]
        chunks = list(response.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage

    record = exactly_one_each(gateway, [log_id], before)[log_id]
    assert record["gateway_request_id"] == request_id
    assert record["stream"] is True
    assert record["status_code"] == 200 and record["status"] == "success" and record["error_message"] == ""
    # usage from the chunk the gateway asked for on the client's behalf
    assert (record["prompt_tokens"], record["completion_tokens"], record["prompt_cache_hit_tokens"]) == (11, 7, 2)
    assert record["cost"] == pytest.approx(GPT_TEST_COST, rel=1e-9)
    assert record["time_to_first_token"] is not None
    assert 0 < record["time_to_first_token"] <= record["latency"]
    assert record["routing_time"] >= 0
    assert record["start_time"] < record["timestamp"]
    assert record["model"] == "mock-ok" and record["model_requested"] == "gpt-test"
    assert record["provider_id"] == "mock" and record["deployment_name"] == "mock"
    assert record["customer_identifier"] == "cust-stream"
    assert record["metadata"] == {"k": "v"}
    assert record["key_name"] == "tests-env"
    assert record["environment"] == "test"
    assert record["prompt_messages"] == MESSAGES
    assert record["completion_message"]["content"] == ANSWER
    assert not record["warnings"]


def test_upstream_error_record(gateway, mock):
    before = count_rows(gateway)
    response = httpx.post(f"{gateway.url}/api/chat/completions", headers=AUTH,
                          json={"model": "mock/mock-status-500", "messages": MESSAGES, "customer_identifier": "c-err"})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "mock upstream error 500"  # the provider's format
    log_id = response.headers["x-respan-log-id"]

    record = exactly_one_each(gateway, [log_id], before)[log_id]
    assert record["status_code"] == 500
    assert record["status"] == "error"
    assert "mock upstream error 500" in record["error_message"]
    assert record["model_requested"] == "mock/mock-status-500"
    assert record["model"] == "mock-status-500"
    assert record["provider_id"] == "mock"
    assert record["prompt_tokens"] == 0 and record["completion_tokens"] == 0 and record["cost"] == 0
    assert record["customer_identifier"] == "c-err"
    assert record["key_name"] == "tests"
    assert record["gateway_request_id"] == response.headers["x-respan-gateway-request-id"]
    assert record["start_time"] < record["timestamp"]
    assert record["latency"] > 0


def test_gateway_error_records(gateway, mock):
    before = count_rows(gateway)
    url = f"{gateway.url}/api/chat/completions"
    unknown = httpx.post(url, headers=AUTH, json={"model": "no-such-model", "messages": MESSAGES})
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": "Requested model no-such-model is not available in the model list"}
    malformed = httpx.post(url, headers={**AUTH, "content-type": "application/json"}, content=b'{"model": "gpt-test", ')
    assert malformed.status_code == 400
    assert "JSON" in malformed.json()["detail"]
    ids = [unknown.headers["x-respan-log-id"], malformed.headers["x-respan-log-id"]]
    assert not mock.requests  # nothing reached the provider

    records = exactly_one_each(gateway, ids, before)
    r404, r400 = records[ids[0]], records[ids[1]]
    assert r404["status_code"] == 404 and r404["status"] == "error"
    assert r404["error_message"] == "Requested model no-such-model is not available in the model list"
    assert r404["model_requested"] == "no-such-model"
    assert r404["provider_id"] is None
    assert r404["key_name"] == "tests"  # auth ran before routing
    assert r404["prompt_messages"] == MESSAGES
    assert r400["status_code"] == 400 and r400["status"] == "error"
    assert "JSON" in r400["error_message"]
    assert r400["model_requested"] is None and r400["provider_id"] is None
    for r in (r404, r400):
        assert r["start_time"] <= r["timestamp"]
        assert r["latency"] > 0
        assert r["prompt_tokens"] == 0 and r["cost"] == 0
        assert r["gateway_request_id"]


def test_auth_failure_record(gateway, mock):
    before = count_rows(gateway)
    url = f"{gateway.url}/api/chat/completions"
    bad_key = "sk-wrong-key-should-not-be-logged"
    wrong = httpx.post(url, headers={"Authorization": f"Bearer {bad_key}"}, json={"model": "gpt-test", "messages": MESSAGES})
    missing = httpx.post(url, json={"model": "gpt-test", "messages": MESSAGES})
    for response in (wrong, missing):
        assert response.status_code == 401
        assert "invalid" in response.json()["detail"]
    assert not mock.requests
    ids = [wrong.headers["x-respan-log-id"], missing.headers["x-respan-log-id"]]

    records = exactly_one_each(gateway, ids, before)
    for r in records.values():
        assert r["status_code"] == 401 and r["status"] == "error"
        assert "invalid" in r["error_message"]
        assert r["key_name"] is None and r["environment"] is None
        assert r["model_requested"] == "gpt-test"
        assert r["provider_id"] is None
    assert bad_key not in orjson.dumps(list(records.values())).decode()


def test_disable_log_drops_content_but_keeps_the_record(gateway, mock):
    before = count_rows(gateway)
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="gpt-test", messages=MESSAGES, extra_body={"disable_log": True})
    log_id = raw.headers["x-respan-log-id"]
    record = exactly_one_each(gateway, [log_id], before)[log_id]
    assert record["prompt_tokens"] == 11 and record["cost"] == pytest.approx(GPT_TEST_COST)
    assert record["prompt_messages"] is None and record["completion_message"] is None
    assert "hi there" not in orjson.dumps(record).decode()


def test_jsonl_sink_gets_the_same_records(gateway, mock):
    c = client(gateway)
    ids = [c.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES,
                                                        extra_body={"customer_identifier": f"j{i}"}).headers["x-respan-log-id"]
           for i in range(3)]
    wait_for_ids(gateway.log_db, ids)
    time.sleep(0.15)
    rows = {r["unique_id"]: r for r in read_records(gateway.log_db)}
    # JSONL lines omit fields at their default (status_code 200, error_message ""...): read them
    # back as LogRecords
    path = gateway.workdir / "logs.jsonl"
    lines = {r.unique_id: msgspec.structs.asdict(r) for r in map(decoder.decode, path.read_bytes().splitlines())}
    assert set(rows) == set(lines)  # every request of this module, in both sinks
    for log_id in ids:
        row, line = rows[log_id], lines[log_id]
        for field in ("gateway_request_id", "start_time", "timestamp", "model", "model_requested", "provider_id",
                      "status_code", "prompt_tokens", "completion_tokens", "prompt_cache_hit_tokens", "cost",
                      "latency", "customer_identifier", "key_name", "environment", "prompt_messages",
                      "completion_message"):
            assert line[field] == row[field], field


# -- client disconnect mid-stream ---------------------------------------------------------


def test_client_disconnect_mid_stream(gateway, mock):
    before = count_rows(gateway)
    read = 0
    with httpx.Client(timeout=10) as http, http.stream(
        "POST", f"{gateway.url}/api/chat/completions", headers=AUTH,
        json={"model": "mock/mock-slow", "messages": MESSAGES, "stream": True},
    ) as response:
        assert response.status_code == 200
        log_id = response.headers["x-respan-log-id"]
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                read += 1
                if read == 5:
                    break
    # leaving the block closed the connection with the stream half read
    closed = mock.wait_for_closed_stream(timeout=5)
    assert closed is not None, "the gateway kept the upstream stream open after the client left"
    assert closed["model"] == "mock-slow"
    assert read <= closed["sent"] < 40, closed  # 200 chunks at 50 ms: closed well before the end

    record = exactly_one_each(gateway, [log_id], before)[log_id]
    assert record["status_code"] == 499
    assert record["status"] == "error"
    assert record["error_message"]
    assert record["stream"] is True
    assert record["provider_id"] == "mock" and record["model_requested"] == "mock/mock-slow"
    # usage seen so far: estimated from the content chunks relayed, one token each
    assert read <= record["completion_tokens"] <= closed["sent"], (record["completion_tokens"], closed)
    assert record["prompt_tokens"] > 0
    assert any("estimated" in w for w in record["warnings"] or [])
    assert record["time_to_first_token"] is not None
    assert record["completion_message"]["content"].startswith(" w0 w1 w2 w3 w4")


# -- spill and replay in a running gateway ---------------------------------------------------


def test_spill_and_replay_when_the_sink_is_down(start_gateway, mock, tmp_path):
    data = tmp_path / "spill"
    config = base_config(mock, data)
    db = data / "logs.db"
    db.mkdir(parents=True)  # a directory where the database should be: the sink cannot open
    gw = start_gateway(config=config)
    n = 6
    c = client(gw)
    ids = [c.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES,
                                                        extra_body={"customer_identifier": f"spill-{i}"})
           .headers["x-respan-log-id"] for i in range(n)]
    # the requests were all answered; their records went to the spool
    assert wait_until(lambda: metric(gw.url, "llmrelay_log_records_spilled_total") >= n)
    assert metric(gw.url, "llmrelay_log_records_replayed_total") == 0
    assert any(p.stat().st_size > 0 for p in (data / "spool").glob("sqlite.*.spool"))
    assert db.is_dir()
    # the JSONL sink was fine all along and got them live
    assert wait_until(lambda: len(jsonl_records(data / "logs.jsonl")) >= n)
    assert sorted(r["unique_id"] for r in jsonl_records(data / "logs.jsonl")) == sorted(ids)
    assert metric(gw.url, "llmrelay_log_records_written_total", sink="jsonl") == n
    assert metric(gw.url, "llmrelay_log_records_written_total", sink="sqlite") == 0

    db.rmdir()  # the sink can open now; the writer retries every 2 s
    rows = wait_for_ids(db, ids, timeout=8)
    assert sorted(r["unique_id"] for r in rows) == sorted(ids)
    time.sleep(0.3)
    rows = read_records(db)
    assert len(rows) == n, "replay must not duplicate records"
    assert sorted(r["unique_id"] for r in rows) == sorted(ids)
    assert {r["customer_identifier"] for r in rows} == {f"spill-{i}" for i in range(n)}
    assert all(r["prompt_tokens"] == 11 and r["cost"] == pytest.approx(GPT_TEST_COST) for r in rows)
    assert metric(gw.url, "llmrelay_log_records_replayed_total") >= n
    assert metric(gw.url, "llmrelay_log_records_spool_errors_total") == 0
    # the spool is consumed
    assert not [p for p in (data / "spool").glob("sqlite.*.spool") if p.stat().st_size > 0]

    # and the sink is live again: a new request goes straight in
    log_id = c.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES).headers["x-respan-log-id"]
    assert wait_for_ids(db, [log_id], timeout=3)
    assert len(read_records(db)) == n + 1
    # the batch reaches the sinks one after the other: the jsonl line may land a moment later
    assert wait_until(lambda: len(jsonl_records(data / "logs.jsonl")) >= n + 1)
    assert len(jsonl_records(data / "logs.jsonl")) == n + 1


# -- SIGTERM drains the log queue -----------------------------------------------------------


def test_sigterm_drains_the_log_queue(start_gateway, mock, tmp_path):
    data = tmp_path / "drain"
    config = base_config(mock, data)
    # a writer that would sit on its batch for a minute: only the shutdown drain can write it
    config["logs"].update(flush_interval=60, batch_size=10_000)
    gw = start_gateway(config=config)
    db = data / "logs.db"

    def one(i: int) -> str:
        with httpx.Client(timeout=10) as http:
            body: dict[str, Any] = {"model": "gpt-test", "messages": MESSAGES, "customer_identifier": f"drain-{i}"}
            if i % 3 == 0:
                body["stream"] = True
            response = http.post(f"{gw.url}/api/chat/completions", headers=AUTH, json=body)
            assert response.status_code == 200
            return response.headers["x-respan-log-id"]

    n = 24
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(one, range(n)))
    assert len(read_records(db)) == 0  # still queued in the gateway
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(30) == 0
    rows = read_records(db)
    assert sorted(r["unique_id"] for r in rows) == sorted(ids)
    assert len(jsonl_records(data / "logs.jsonl")) == n
    assert sum(bool(r["stream"]) for r in rows) == n // 3
    # nothing was left behind for a later replay
    assert not [p for p in data.glob("spool/*.spool") if p.stat().st_size > 0]


def test_sigterm_with_a_stream_in_flight_still_drains_within_the_deadline(start_gateway, mock, tmp_path):
    """SIGTERM lets in-flight streams run up to server.shutdown_timeout, then ends them, and
    still flushes every log record (the cut stream's too) before the process exits."""
    data = tmp_path / "inflight"
    config = base_config(mock, data)
    config["server"]["shutdown_timeout"] = 0.5
    # the writer holds its batch: only the shutdown drain can write these records
    config["logs"].update(flush_interval=60, batch_size=10_000)
    gw = start_gateway(config=config)
    db = data / "logs.db"
    c = client(gw)
    done = [c.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES).headers["x-respan-log-id"]
            for _ in range(5)]

    seen: list[str] = []
    http = httpx.Client(timeout=30)
    stream = http.send(http.build_request("POST", f"{gw.url}/api/chat/completions", headers=AUTH,
                                          json={"model": "mock/mock-slow", "messages": MESSAGES, "stream": True}), stream=True)
    try:
        assert stream.status_code == 200
        stream_id = stream.headers["x-respan-log-id"]
        lines = stream.iter_lines()
        while len(seen) < 3:
            line = next(lines)
            if '"content"' in line:
                seen.append(line)
        assert gw.proc is not None
        stopped_at = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        # the 10 s stream is ended by the shutdown (an SSE error event, or a cut connection)
        with contextlib.suppress(httpx.HTTPError):
            seen.extend(line for line in lines if '"content"' in line)
        assert len(seen) < 200, "the stream ran to its end: shutdown did not end it"
        rc = gw.proc.wait(30)
        took = time.monotonic() - stopped_at
    finally:
        stream.close()
        http.close()
    rows = {r["unique_id"]: r for r in read_records(db)}
    assert set(done) <= set(rows), f"{len(set(done) - set(rows))} of 5 finished requests lost at shutdown"
    assert stream_id in rows, "the stream cut by the shutdown was not logged"
    assert rows[stream_id]["status_code"] >= 400 and rows[stream_id]["error_message"]
    assert rows[stream_id]["completion_tokens"] >= 3
    assert rc == 0
    assert took < 0.5 + 15, f"shutdown took {took:.1f}s with shutdown_timeout 0.5s (granian's kill comes at +15 s)"


def test_unpriced_model_says_so_in_warnings(gateway, mock):
    """Tokens of a model no price is known for: cost 0, and the log says why (never a silent 0)."""
    response = httpx.post(f"{gateway.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "mock/unpriced-model", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["prompt_tokens"] > 0 and record["cost"] == 0
    assert record["warnings"] == ["no price known for mock/unpriced-model: cost not computed"]
    response = httpx.post(f"{gateway.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
    assert gateway.record(response.headers["x-respan-log-id"])["warnings"] is None  # priced: no warning
