"""The `otel` stage end to end: gateway processes export their spans over OTLP/HTTP (protobuf) to a
collector stub on loopback, which decodes them with the OpenTelemetry protos."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from proxy.catalog import load_catalog
from proxy.model_table import ModelTable
from proxy.pipeline import load_stages
from proxy.settings import ConfigError, parse_settings
from tests.conftest import KEY, ROOT, UPSTREAM_KEY, GatewayProcess, base_config
from tests.mock_upstream import USAGE, MockUpstream, free_port

HI = [{"role": "user", "content": "hi"}]
SERVER = Span.SpanKind.SPAN_KIND_SERVER
CLIENT = Span.SpanKind.SPAN_KIND_CLIENT


class Collector:
    """An OTLP/HTTP traces receiver: keeps every raw body and the spans decoded from it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.spans: list[tuple[dict[str, Any], Span]] = []  # (resource attributes, span)
        self.paths: list[str] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.receive(self.path, body)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def receive(self, path: str, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        with self._lock:
            self.paths.append(path)
            self.bodies.append(body)
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((resource, span) for span in scope_spans.spans)

    def trace_of(self, log_id: str, count: int, timeout: float = 10.0) -> list[Span]:
        """The spans of the request logged as `log_id`: its server span and the server span's
        children, once there are at least `count` of them."""
        deadline = time.monotonic() + timeout
        found: list[Span] = []
        while time.monotonic() < deadline:
            with self._lock:
                spans = [span for _, span in self.spans]
            server = [s for s in spans if attributes(s.attributes).get("llmrelay.log_id") == log_id]
            if server:
                found = server + [s for s in spans if s.parent_span_id == server[0].span_id
                                  and s.trace_id == server[0].trace_id]
                if len(found) >= count:
                    return found
            time.sleep(0.05)
        return found

    def start(self) -> Collector:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs}


def otel_stage(collector: Collector, **options: Any) -> dict[str, Any]:
    return {"name": "otel", "options": {"endpoint": collector.endpoint, "service_name": "llmrelay-test",
                                        "schedule_delay_ms": 50, **options}}


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, collector: Collector,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("otel")
    config = base_config(mock_upstream, workdir, pipeline=["auth", otel_stage(collector), "cache", "routing",
                                                                 "fallback"])
    process = GatewayProcess(config, workdir).start()
    yield process
    process.stop()


def post(gateway: GatewayProcess, model: str, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}/api/chat/completions",
                      headers={"Authorization": f"Bearer {KEY}", **(headers or {})},
                      json={"model": model, "messages": HI, **extra}, timeout=30)


def split(spans: list[Span]) -> tuple[Span, list[Span]]:
    servers = [s for s in spans if s.kind == SERVER]
    assert len(servers) == 1, spans
    children = sorted((s for s in spans if s.kind == CLIENT), key=lambda s: s.start_time_unix_nano)
    assert len(children) == len(spans) - 1
    return servers[0], children


def test_chat_gives_a_server_span_and_an_attempt_span(gw, collector, mock):
    response = post(gw, "gpt-test", temperature=0.5, max_tokens=20, customer_identifier="cust-7")
    assert response.status_code == 200
    log_id = response.headers["x-respan-log-id"]
    server, children = split(collector.trace_of(log_id, 2))
    assert len(children) == 1
    attempt = children[0]
    assert attempt.parent_span_id == server.span_id and attempt.trace_id == server.trace_id
    assert server.parent_span_id == b""  # no traceparent: a new trace

    assert server.name == "chat gpt-test"
    attrs = attributes(server.attributes)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "gpt-test"
    assert attrs["gen_ai.response.model"] == "mock-ok"
    assert attrs["gen_ai.provider.name"] == attrs["gen_ai.system"] == "mock"
    assert attrs["gen_ai.usage.input_tokens"] == USAGE["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == USAGE["completion_tokens"]
    assert attrs["gen_ai.request.temperature"] == 0.5
    assert attrs["gen_ai.request.max_tokens"] == 20
    assert attrs["http.response.status_code"] == 200
    assert attrs["llmrelay.customer"] == "cust-7"
    assert "llmrelay.cache_hit" not in attrs and "llmrelay.fallback" not in attrs  # false flags are left out
    assert attrs["llmrelay.cost"] == pytest.approx(float(gw.record(log_id)["cost"]))
    assert attrs["llmrelay.cost"] > 0
    assert "error.type" not in attrs
    assert server.status.code != Status.StatusCode.STATUS_CODE_ERROR

    assert attempt.name == "chat mock-ok"
    child = attributes(attempt.attributes)
    assert child["gen_ai.request.model"] == "mock-ok"
    assert child["gen_ai.provider.name"] == "mock"
    assert child["server.address"] == "127.0.0.1"
    assert child["server.port"] == mock.port
    assert child["llmrelay.attempt.status"] == 200
    assert child["gen_ai.usage.output_tokens"] == USAGE["completion_tokens"]
    assert server.start_time_unix_nano <= attempt.start_time_unix_nano <= attempt.end_time_unix_nano
    assert attempt.end_time_unix_nano <= server.end_time_unix_nano

    resources = [resource for resource, span in collector.spans if span.span_id == server.span_id]
    assert resources[0]["service.name"] == "llmrelay-test"
    assert collector.paths[0] == "/v1/traces"


def test_fallback_gives_one_span_per_attempt(gw, collector, mock):
    response = post(gw, "down-model", fallback_models=["gpt-test"], retries=0)
    assert response.status_code == 200
    assert response.headers["x-llmrelay-attempts"] == "2"
    server, children = split(collector.trace_of(response.headers["x-respan-log-id"], 3))
    assert [c.name for c in children] == ["chat anything", "chat mock-ok"]
    assert all(c.parent_span_id == server.span_id for c in children)
    failed, served = (attributes(c.attributes) for c in children)
    assert children[0].status.code == Status.StatusCode.STATUS_CODE_ERROR
    assert failed["error.type"] == "502"
    assert failed["gen_ai.provider.name"] == "refused"
    assert "gen_ai.usage.input_tokens" not in failed
    assert children[1].status.code != Status.StatusCode.STATUS_CODE_ERROR
    assert "error.type" not in served
    assert served["gen_ai.usage.input_tokens"] == USAGE["prompt_tokens"]
    assert children[0].end_time_unix_nano <= children[1].start_time_unix_nano
    attrs = attributes(server.attributes)
    assert attrs["llmrelay.fallback"] is True and attrs["llmrelay.attempts"] == 2
    assert attrs["gen_ai.provider.name"] == "mock"  # who served
    assert server.status.code != Status.StatusCode.STATUS_CODE_ERROR


def test_a_failed_request_is_an_error_span(gw, collector, mock):
    response = post(gw, "down-model", retries=0)
    assert response.status_code == 502
    server, children = split(collector.trace_of(response.headers["x-respan-log-id"], 2))
    assert server.status.code == Status.StatusCode.STATUS_CODE_ERROR
    assert attributes(server.attributes)["error.type"] == "502"
    assert [attributes(c.attributes)["error.type"] for c in children] == ["502"]
    assert children[0].status.code == Status.StatusCode.STATUS_CODE_ERROR


def test_a_cache_hit_has_no_attempt_span(gw, collector, mock):
    content = [{"role": "user", "content": f"cached {os.urandom(4).hex()}"}]
    first = post(gw, "gpt-test", cache_enabled=True, messages=content)
    hit = post(gw, "gpt-test", cache_enabled=True, messages=content)
    assert first.headers["x-llmrelay-cache"] == "miss" and hit.headers["x-llmrelay-cache"] == "hit"
    assert len(collector.trace_of(first.headers["x-respan-log-id"], 2)) == 2
    spans = collector.trace_of(hit.headers["x-respan-log-id"], 1)
    time.sleep(0.3)  # a child span would be in the same export
    server, children = split(collector.trace_of(hit.headers["x-respan-log-id"], 1))
    assert children == [] and spans == [server]
    attrs = attributes(server.attributes)
    assert attrs["llmrelay.cache_hit"] is True
    assert attrs["gen_ai.response.model"] == "respan/cache"


def test_stream(gw, collector, mock):
    with httpx.stream("POST", f"{gw.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "gpt-test", "messages": HI, "stream": True,
                            "stream_options": {"include_usage": True}}, timeout=30) as response:
        body = b"".join(response.iter_raw())
    assert response.status_code == 200 and body.endswith(b"data: [DONE]\n\n")
    server, children = split(collector.trace_of(response.headers["x-respan-log-id"], 2))
    attrs = attributes(server.attributes)
    assert attrs["llmrelay.stream"] is True
    assert attrs["gen_ai.usage.output_tokens"] == USAGE["completion_tokens"]
    assert attrs["llmrelay.ttft"] > 0
    assert len(children) == 1
    # the upstream stream lasts until the relay ends: the attempt span ends with the request
    assert children[0].end_time_unix_nano == server.end_time_unix_nano


def test_traceparent_joins_the_clients_trace(gw, collector, mock):
    trace_id = os.urandom(16)
    parent_id = os.urandom(8)
    traceparent = f"00-{trace_id.hex()}-{parent_id.hex()}-01"
    response = post(gw, "gpt-test", headers={"traceparent": traceparent})
    assert response.status_code == 200
    server, children = split(collector.trace_of(response.headers["x-respan-log-id"], 2))
    assert server.trace_id == trace_id
    assert server.parent_span_id == parent_id
    assert children[0].trace_id == trace_id and children[0].parent_span_id == server.span_id


def test_an_unsampled_parent_is_not_exported(gw, collector, mock):
    traceparent = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-00"
    unsampled = post(gw, "gpt-test", headers={"traceparent": traceparent})
    sampled = post(gw, "gpt-test")
    assert collector.trace_of(sampled.headers["x-respan-log-id"], 2)
    assert collector.trace_of(unsampled.headers["x-respan-log-id"], 1, timeout=0.5) == []


def test_secrets_never_exported(gw, collector, mock):
    assert post(gw, "gpt-test").status_code == 200
    response = post(gw, "down-model", fallback_models=["gpt-test"], retries=0)
    assert collector.trace_of(response.headers["x-respan-log-id"], 3)
    with collector._lock:
        bodies = list(collector.bodies)
    assert bodies
    for raw in bodies:
        assert UPSTREAM_KEY.encode() not in raw
        assert KEY.encode() not in raw
        assert b"/v1" not in raw.replace(b"/v1/traces", b"")  # the upstream's host only, never its URL


def test_spans_are_flushed_at_shutdown_and_content_is_opt_in(start_gateway, collector, mock):
    """A long schedule delay: nothing goes out until SIGTERM, which exports the queue."""
    gateway = start_gateway(pipeline=["auth", otel_stage(collector, schedule_delay_ms=600_000,
                                                         capture_content=True)])
    captured = post(gateway, "gpt-test")
    hidden = post(gateway, "gpt-test", disable_log=True)
    time.sleep(0.3)
    assert collector.trace_of(captured.headers["x-respan-log-id"], 1, timeout=0.1) == []
    assert gateway.stop() == 0
    server, children = split(collector.trace_of(captured.headers["x-respan-log-id"], 2))
    attrs = attributes(server.attributes)
    assert '"content":"hi"' in attrs["gen_ai.input.messages"]
    assert attrs["gen_ai.output.messages"].startswith("[{")
    # no fallback stage: the one dispatch is the attempt
    assert len(children) == 1 and attributes(children[0].attributes)["llmrelay.attempt.status"] == 200
    server, _ = split(collector.trace_of(hidden.headers["x-respan-log-id"], 2))
    assert "gen_ai.input.messages" not in attributes(server.attributes)


def test_a_collector_that_is_down_changes_nothing_for_clients(start_gateway, mock):
    endpoint = f"http://127.0.0.1:{free_port()}/v1/traces"
    gateway = start_gateway(pipeline=["auth", {"name": "otel", "options": {
        "endpoint": endpoint, "schedule_delay_ms": 50, "export_timeout_ms": 1000}}])
    for _ in range(3):
        assert post(gateway, "gpt-test").status_code == 200
    time.sleep(0.2)  # an export has failed by now
    assert post(gateway, "gpt-test").status_code == 200
    assert gateway.stop() == 0
    assert len(gateway.records(count=4)) == 4


@pytest.mark.parametrize(("options", "message"), [
    ({"sample_ratio": 2}, r"stage 'otel' rejected its options.*sample_ratio"),
    ({"endpoint": "collector:4318"}, r"endpoint: expected an http"),
    ({"max_queue_size": 10, "max_export_batch_size": 20}, r"max_export_batch_size: must not exceed"),
    ({"headers": {"authorization": 1}}, r"headers"),
    ({"service": "x"}, r"unknown field `service`"),
])
def test_bad_options_fail_startup(options, message):
    settings = parse_settings({"pipeline": [{"name": "otel", "options": options}]}, "test.yaml")
    with pytest.raises(ConfigError, match=message):
        load_stages(settings, ModelTable(settings, load_catalog()))


def test_missing_extra_names_it(tmp_path: Path):
    """Without the OpenTelemetry packages, the stage says which extra to install."""
    script = (
        "import sys\n"
        "sys.modules['opentelemetry.sdk'] = None\n"  # as if opentelemetry-sdk were not installed
        "from proxy.model_table import ModelTable\n"
        "from proxy.catalog import load_catalog\n"
        "from proxy.pipeline import load_stages\n"
        "from proxy.settings import ConfigError, parse_settings\n"
        "settings = parse_settings({'pipeline': ['otel']}, 'test.yaml')\n"
        "try:\n"
        "    load_stages(settings, ModelTable(settings, load_catalog()))\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "pip install 'llmrelay[otel]'" in done.stdout, done.stdout + done.stderr
