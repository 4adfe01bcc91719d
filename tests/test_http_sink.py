"""The HTTP exporter sink end to end: gateway A logs to SQLite and ships every record to gateway B's
/api/v1/traces/ingest; B stores them whole (same unique_id, tokens, cost, content). B down: A spools
and replays after B is back, and every record lands exactly once. B refusing the key: the records
stay in A's spool and the key appears in no log line."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.keys import hash_key
from proxy.logs.queue import LogQueue
from proxy.logs.record import LogRecord, decoder
from proxy.logs.sinks.http import HTTPSink, HTTPSinkError
from proxy.metrics import Metrics
from tests.conftest import KEY, GatewayProcess, base_config, metric, wait_until
from tests.mock_upstream import MockUpstream, free_port

ADMIN = "sk-admin-http-sink-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
# the fields a record must keep on its way from A to B (api views compared one to one)
SHIPPED = ("unique_id", "gateway_request_id", "log_type", "log_method", "start_time", "timestamp", "model",
           "model_requested", "provider_id", "status_code", "status", "error_message", "stream", "prompt_tokens",
           "completion_tokens", "total_request_tokens", "prompt_cache_hit_tokens", "cost", "latency",
           "time_to_first_token", "tokens_per_second", "customer_identifier", "thread_identifier",
           "custom_identifier", "metadata", "prompt_messages", "completion_message", "tools", "tool_calls",
           "key_name", "warnings", "request_url_path", "temperature")


# -- helpers -----------------------------------------------------------------------------




def detail(gw: GatewayProcess, log_id: str) -> httpx.Response:
    return httpx.get(f"{gw.url}/api/request-logs/{log_id}/", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)


def arrived(gw: GatewayProcess, ids: list[str], timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """The api views of `ids` on `gw`, once all of them are there."""
    found: dict[str, dict[str, Any]] = {}

    def all_there() -> bool:
        for log_id in ids:
            if log_id not in found and (r := detail(gw, log_id)).status_code == 200:
                found[log_id] = r.json()
        return len(found) == len(ids)

    assert wait_until(all_there, timeout), f"{len(ids) - len(found)} of {len(ids)} records never arrived"
    return found


def jsonl_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [orjson.loads(line)["unique_id"] for line in path.read_bytes().splitlines() if line.strip()]


def chat(gw: GatewayProcess, **body: Any) -> str:
    """One chat request through `gw` (any status); the log id it answered with."""
    response = httpx.post(f"{gw.url}/api/chat/completions", headers=AUTH, timeout=10,
                          json={"model": "gpt-test", "messages": MESSAGES, **body})
    if body.get("stream"):
        assert "[DONE]" in response.text
    return response.headers["x-respan-log-id"]


def receiver_config(mock: MockUpstream, workdir: Path) -> dict[str, Any]:
    return base_config(mock, workdir, admin_keys=[{"name": "ops", "key_hash": hash_key(ADMIN)}])


def exporter_config(mock: MockUpstream, workdir: Path, receiver: GatewayProcess | str, api_key: str) -> dict[str, Any]:
    """A gateway logging to its own SQLite file and to `receiver`'s traces ingest."""
    url = receiver if isinstance(receiver, str) else receiver.url
    config = receiver_config(mock, workdir)
    config["logs"]["sinks"] = [
        {"type": "sqlite", "path": str(workdir / "logs.db")},
        {"type": "http", "url": f"{url}/api/v1/traces/ingest", "api_key": api_key, "timeout": 5, "retries": 2},
    ]
    return config


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Callable[[Callable[[Path], dict[str, Any]]], GatewayProcess]]:
    """start(config_for_workdir) -> a running gateway in its own directory; all stopped afterwards."""
    started: list[GatewayProcess] = []

    def start(config: Callable[[Path], dict[str, Any]]) -> GatewayProcess:
        workdir = tmp_path / f"gw{len(started)}"
        process = GatewayProcess(config(workdir), workdir)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


# -- tests -------------------------------------------------------------------------------


def test_every_record_of_a_arrives_whole_at_b(gateways, mock):
    b = gateways(lambda d: receiver_config(mock, d))
    a = gateways(lambda d: exporter_config(mock, d, b, KEY))
    customer = f"cust-{uuid.uuid4().hex[:8]}"
    ids = [
        chat(a, customer_identifier=customer, thread_identifier="t-1", custom_identifier="c-1",
             metadata={"team": "search", "n": 2}, temperature=0.25),
        chat(a, customer_identifier=customer, stream=True, stream_options={"include_usage": True}),
        chat(a, model="mock/mock-tools", customer_identifier=customer,
             tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]),
        chat(a, model="mock/mock-status-500", customer_identifier=customer),  # an upstream error is logged too
    ]
    at_a = arrived(a, ids)
    at_b = arrived(b, ids)
    for log_id in ids:
        sent, got = at_a[log_id], at_b[log_id]
        for field in SHIPPED:
            assert got[field] == sent[field], (field, got[field], sent[field])
        assert got["customer_identifier"] == customer
    ok, streamed, tools, failed = (at_b[i] for i in ids)
    assert ok["prompt_tokens"] == 11 and ok["completion_tokens"] == 7 and ok["prompt_cache_hit_tokens"] == 2
    assert ok["cost"] == pytest.approx((9 * 1.0 + 2 * 0.5 + 7 * 2.0) / 1e6) and ok["cost"] > 0
    assert ok["metadata"] == {"team": "search", "n": "2"} and ok["temperature"] == 0.25
    assert ok["prompt_messages"] == MESSAGES
    assert ok["completion_message"] == {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}
    assert streamed["stream"] is True and streamed["time_to_first_token"] is not None
    assert streamed["completion_tokens"] == 7
    assert tools["tool_calls"][0]["function"]["name"] == "get_weather" and tools["tools"]
    assert failed["status"] == "error" and failed["status_code"] == 500 and failed["error_message"]
    assert all(r["log_method"] == "inference" for r in at_b.values())  # A's own method, not "tracing_integration"
    # B took each record once, and A counted them as written to the http sink (nothing spooled)
    assert metric(b.url, "llmrelay_logs_ingested_total", endpoint="traces") == len(ids)
    assert metric(a.url, "llmrelay_log_records_written_total", sink="http") == len(ids)
    assert metric(a.url, "llmrelay_log_records_spilled_total") == 0


def test_receiver_outage_spools_and_replays_exactly_once(gateways, mock):
    b = gateways(lambda d: receiver_config(mock, d))
    a = gateways(lambda d: exporter_config(mock, d, b, KEY))
    before = [chat(a, customer_identifier="before")]
    arrived(b, before)

    b.stop()  # B is down; its port stays reserved for its restart below
    during = [chat(a, customer_identifier=f"outage-{i}", stream=i % 2 == 1) for i in range(6)]
    arrived(a, during)  # A's own SQLite sink is unaffected
    assert wait_until(lambda: metric(a.url, "llmrelay_log_records_spilled_total") >= len(during))
    spooled = {r.unique_id for p in (a.workdir / "spool").glob("http.*.spool")
               for r in (decoder.decode(line) for line in p.read_bytes().splitlines() if line.strip())}
    assert set(during) <= spooled, "a record A could not ship is missing from its spool"

    b.start()  # same port, same log database and JSONL file
    at_b = arrived(b, during, timeout=15)  # the spool is replayed every 2 s
    assert {r["customer_identifier"] for r in at_b.values()} == {f"outage-{i}" for i in range(6)}
    assert all(r["prompt_tokens"] == 11 and r["cost"] > 0 for r in at_b.values())
    assert sum(r["stream"] for r in at_b.values()) == 3

    # exactly once: B's JSONL sink appends whatever it receives (no dedupe there), and the
    # restarted B took exactly the six records
    after = [chat(a, customer_identifier="after")]  # the sink is live again
    arrived(b, after)
    assert wait_until(lambda: set(after) <= set(jsonl_ids(b.workdir / "logs.jsonl")))
    lines = jsonl_ids(b.workdir / "logs.jsonl")
    for log_id in before + during + after:
        assert lines.count(log_id) == 1, f"{log_id} reached B {lines.count(log_id)} times"
    assert metric(b.url, "llmrelay_logs_ingested_total", endpoint="traces") == len(during) + len(after)
    assert metric(a.url, "llmrelay_log_records_replayed_total") >= len(during)
    assert not [p for p in (a.workdir / "spool").glob("http.*.spool") if p.stat().st_size > 0]


def test_a_refused_key_keeps_the_records_in_the_spool_and_out_of_the_logs(gateways, mock):
    b = gateways(lambda d: receiver_config(mock, d))
    wrong = f"sk-wrong-{uuid.uuid4().hex}"
    a = gateways(lambda d: exporter_config(mock, d, b, wrong))
    ids = [chat(a, customer_identifier=f"refused-{i}") for i in range(3)]
    arrived(a, ids)
    assert wait_until(lambda: metric(a.url, "llmrelay_log_records_spilled_total") >= len(ids))
    time.sleep(2.5)  # at least one replay of the spool (every 2 s) meets the 401 again
    assert metric(a.url, "llmrelay_log_records_written_total", sink="http") == 0
    assert metric(a.url, "llmrelay_log_records_replayed_total") == 0
    spooled = [decoder.decode(line) for p in (a.workdir / "spool").glob("http.*.spool")
               for line in p.read_bytes().splitlines() if line.strip()]
    assert sorted(r.unique_id for r in spooled) == sorted(ids), "the refused records must all wait in the spool"
    for log_id in ids:
        assert detail(b, log_id).status_code == 404
    assert metric(b.url, "llmrelay_logs_ingested_total", endpoint="traces") == 0

    output = a.output.read_text()
    assert "log sink http" in output and "401" in output, output[-2000:]  # the failure is reported...
    assert wrong not in output  # ...without the key
    assert wrong not in "".join(p.read_text() for p in (a.workdir / "spool").glob("*.spool"))


# -- the sink on its own: request size, retries ---------------------------------------------


def write(sink: HTTPSink, records: list[LogRecord]) -> None:
    async def run() -> None:
        await sink.open()
        try:
            await sink.write(records)
        finally:
            await sink.close()

    asyncio.run(run())


def record(text: str = "hi", **fields: Any) -> LogRecord:
    now = time.time()
    return LogRecord(unique_id=uuid.uuid4().hex, start_time=now - 1, timestamp=now, model="gpt-test",
                     prompt_tokens=3, completion_tokens=4, prompt_messages=[{"role": "user", "content": text}],
                     completion_message={"role": "assistant", "content": "ok"}, **fields)


def test_a_batch_larger_than_the_receivers_limit_is_split(gateways, mock):
    """24 MB of records (the receiver takes 20 MB per request) all arrive; a record that alone is
    over the limit arrives without its content instead of blocking the spool forever."""
    b = gateways(lambda d: receiver_config(mock, d))
    sink = HTTPSink(f"{b.url}/api/v1/traces/ingest", api_key=KEY, timeout=30, retries=1)
    records = [record(f"{i}" * (4 * 1024 * 1024)) for i in range(6)]
    huge = record("h" * (21 * 1024 * 1024), customer_identifier="huge")
    write(sink, [*records, huge])
    at_b = arrived(b, [r.unique_id for r in records + [huge]])
    for r in records:
        assert at_b[r.unique_id]["prompt_messages"] == r.prompt_messages
    assert at_b[huge.unique_id]["prompt_messages"] is None and at_b[huge.unique_id]["completion_message"] is None
    assert at_b[huge.unique_id]["prompt_tokens"] == 3 and at_b[huge.unique_id]["customer_identifier"] == "huge"
    assert metric(b.url, "llmrelay_logs_ingested_total", endpoint="traces") == 7


class ScriptedReceiver:
    """An ingestion endpoint that answers each POST with the next scripted (status, headers)."""

    def __init__(self, *script: tuple[int, dict[str, str]]) -> None:
        self.script = list(script)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append((dict(self.headers), body))
                status, headers = receiver.script.pop(0) if receiver.script else (200, {})
                payload = b'{"status":"ok"}' if status < 300 else b'{"detail":"no"}'
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(payload))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1/traces/ingest"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_transient_failures_are_retried_and_a_refusal_is_not():
    secret = f"sk-secret-{uuid.uuid4().hex}"
    batch = [record(), record()]
    receiver = ScriptedReceiver((503, {}), (429, {"Retry-After": "0"}), (200, {}))
    try:
        write(HTTPSink(receiver.url, api_key=secret, timeout=5, retries=3), batch)
        assert len(receiver.requests) == 3  # 503, 429, then taken
        headers, body = receiver.requests[-1]
        assert headers["Authorization"] == f"Bearer {secret}" and headers["X-LLMRelay-Exporter"] == "1"
        assert {r["unique_id"] for r in orjson.loads(body)} == {r.unique_id for r in batch}  # one JSON array
        assert len({b for _, b in receiver.requests}) == 1  # every try sent the same batch

        receiver.requests.clear()
        receiver.script = [(401, {})]
        with pytest.raises(HTTPSinkError) as refused:
            write(HTTPSink(receiver.url, api_key=secret, timeout=5, retries=3), batch)
        assert len(receiver.requests) == 1  # a 401 is not retried now (the spool keeps the batch)
        assert "401" in str(refused.value) and secret not in str(refused.value)

        receiver.requests.clear()
        receiver.script = [(500, {})] * 3
        with pytest.raises(HTTPSinkError, match="after 2 tries"):
            write(HTTPSink(receiver.url, api_key=secret, timeout=5, retries=2), batch)
        assert len(receiver.requests) == 2

        # a key with a stray newline (from a secrets file) is an invalid header: h11 quotes it
        with pytest.raises(HTTPSinkError, match="LocalProtocolError") as invalid:
            write(HTTPSink(receiver.url, api_key=secret + "\n", timeout=5, retries=1), batch)
        assert secret not in str(invalid.value)
    finally:
        receiver.close()
    with pytest.raises(HTTPSinkError, match="ConnectError") as down:
        write(HTTPSink(f"http://user:{secret}@127.0.0.1:{free_port()}/ingest?token={secret}", api_key=secret,
                       timeout=5, retries=2), batch)
    assert secret not in str(down.value)


def test_records_the_receiver_refuses_for_good_go_to_a_dead_letter_file(tmp_path: Path):
    """A receiver that answers 400 for one record: the sink halves the batch until it finds it,
    the other records are delivered, and the queue keeps the bad one in <sink>.rejected.jsonl
    instead of replaying it (and everything behind it) forever."""
    delivered: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            spans = orjson.loads(self.rfile.read(int(self.headers["content-length"])))
            poisoned = any(s.get("customer_identifier") == "poison" for s in spans)
            if not poisoned:
                delivered.extend(s["unique_id"] for s in spans)
            payload = b'{"detail":"[0].x: bad"}' if poisoned else b'{"status":"ok"}'
            self.send_response(400 if poisoned else 200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api/v1/traces/ingest"
    good = [record() for _ in range(9)]
    bad = record(customer_identifier="poison")
    metrics = Metrics()

    async def run() -> None:
        queue = LogQueue([HTTPSink(url, api_key="k", timeout=5, retries=1)], tmp_path / "spool", metrics,
                         flush_interval=0.05)
        await queue.start()
        await queue.put_and_wait([*good[:4], bad, *good[4:]])
        await queue.stop()

    try:
        asyncio.run(run())
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(delivered) == sorted(r.unique_id for r in good)
    rejected = (tmp_path / "spool" / "http.rejected.jsonl").read_text().splitlines()
    assert [orjson.loads(line)["unique_id"] for line in rejected] == [bad.unique_id]
    assert not list((tmp_path / "spool").glob("*.spool")) or all(
        p.stat().st_size == 0 for p in (tmp_path / "spool").glob("*.spool"))  # nothing left to replay
    text = metrics.render()[0].decode()
    assert 'llmrelay_log_records_rejected_total{sink="http"} 1.0' in text
    assert 'llmrelay_log_records_written_total{sink="http"} 9.0' in text
