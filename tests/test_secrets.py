"""Secrets never leak (issue 10, item 3).

Two real gateways run with planted, distinctive secrets: provider keys (in the config and through
${ENV}), deployment keys, gateway and admin keys, temporary keys made through the admin API, a
custom provider's key and headers, customer_credentials / credential_override sent in requests,
an upstream that echoes the Authorization header it got (in its error body, its headers and a
stream's error event), Redis and PostgreSQL URLs with passwords on closed ports, an http log sink's
key, and alert webhook secrets. Every kind of request is driven, then every output is collected
(process output, SQLite log rows, the JSONL file, spool files, /metrics, the log API, the
dashboard and its data, every response body and header, the admin listings, readiness) and
grepped for each secret and its obvious encodings. Also: gateway keys are stored hashed, admin and
gateway keys do not open each other's doors, and key comparisons are hmac.compare_digest.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import re
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from proxy.call import Reply
from proxy.keys import hash_key
from proxy.redact import REDACTED, scrub_reply, secrets_of
from tests.conftest import GatewayProcess, base_config, free_port, wait_until
from tests.mock_anthropic import MockAnthropic
from tests.mock_server import MockServer
from tests.mock_upstream import MockUpstream
from tests.test_otel import Collector, otel_stage

# the planted secrets: distinctive, so a hit names what leaked
PROVIDER_KEY = "sk-CANARY-provider-9f2e71c3a4"
ENV_PROVIDER_KEY = "sk-CANARY-envprov-51be02d7aa"
DEPLOY_KEY_A = "sk-CANARY-deploy-a-7c3d19e0"
DEPLOY_KEY_B = "sk-CANARY-deploy-b-2a8f64b1"
ECHO_KEY = "sk-CANARY-echo-prov-64d0f1a9"
ANTHROPIC_KEY = "sk-ant-CANARY-anthropic-4e6a8c0b"
GEMINI_KEY = "AIzaCANARY-gemini-2b4d6f8a0c"
CUSTOMER_API_KEY = "sk-CANARY-custapikeys-5d7f9b1c"
GATEWAY_KEY = "sk-CANARY-gateway-c19a7e55f0"
ADMIN_KEY = "sk-CANARY-admin-0d7b3e91c6"
WRONG_KEY = "sk-CANARY-wrong-e3a1c2b4d5"
CUSTOMER_KEY = "sk-CANARY-customer-8b2c4d6e"
CUSTOMER_HDR_KEY = "sk-CANARY-custhdr-1f3e5a7c"
OVERRIDE_KEY = "sk-CANARY-override-3e9d7b51"
MALFORMED_KEY = "sk-CANARY-malformed-6a4c2e8f"
MANAGED_PROVIDER_KEY = "sk-CANARY-managed-5c7e9a1b"
MANAGED_HEADER = "CANARY-managed-header-0b2d4f6a"
REDIS_PASSWORD = "CANARYredispw4a1f9c"
PG_SINK_PASSWORD = "CANARYpgsinkpw8e3b2d"
PG_STORE_PASSWORD = "CANARYpgstorepw2c6a0e"
HTTP_SINK_KEY = "sk-CANARY-httpsink-9d1b3f5e"
HOOK_SECRET = "CANARY-hook-secret-6f0a2c4e"
SLACK_TOKEN = "CANARYslacktoken3b5d7f9a"
SMTP_PASSWORD = "CANARYsmtppw1e3c5a7b"
OTLP_HEADER_SECRET = "CANARY-otlp-header-7a9c1e3f"

SECRETS = [v for k, v in dict(globals()).items() if isinstance(v, str) and "CANARY" in v and k.isupper()]


def encodings(secret: str) -> set[str]:
    """The secret and its obvious encodings: URL-encoded, and base64 (standard and URL-safe) at any
    of the three byte alignments it can have inside a longer encoded value (the stable middle part)."""
    forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
    raw = secret.encode()
    for pad in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * pad + raw).decode().rstrip("=")
            forms.add(encoded[4 if pad else 0:-4])
    return {f for f in forms if len(f) >= 12}


def leaks(text: str, secrets: list[str] = SECRETS) -> list[tuple[str, str]]:
    """(secret, form found) for every planted secret present in `text` in some encoding."""
    found = []
    for secret in secrets:
        for form in encodings(secret):
            at = text.find(form)
            if at >= 0:
                found.append((secret, text[max(0, at - 150):at + len(form) + 60]))
                break
    return found


class EchoUpstream(MockServer):
    """An OpenAI-compatible provider that gives the caller's credentials back where it should not.

    echo-401: 401 whose error message holds the Authorization header, which is also echoed in a
    response header; echo-500: 500 whose message holds the bare key; echo-stream: a 200 stream whose
    first event is an error naming the key; anything else: a normal answer."""

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/chat/completions", self.chat)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.record(request, body)
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ")
        model = body.get("model", "")
        echoed = {"x-echo-authorization": auth, "x-request-id": f"req-{key}"}
        if model.startswith("echo-401"):
            return web.json_response({"error": {"message": f"Incorrect API key provided: {auth}. You can find your "
                                                           f"API key at https://example.invalid/?key={key}",
                                                "type": "invalid_request_error", "param": key,
                                                "code": "invalid_api_key"}}, status=401, headers=echoed)
        if model.startswith("echo-500"):
            return web.json_response({"error": {"message": f"internal error while using key {key}",
                                                "type": "server_error", "code": None}}, status=500, headers=echoed)
        if model.startswith("echo-stream"):
            event = {"error": {"message": f"key {key} was revoked", "type": "auth", "code": "revoked"}}
            return await self.send_stream(request, [b"data: " + orjson.dumps(event) + b"\n\n", b"data: [DONE]\n\n"],
                                          headers=echoed)
        data = {"id": "chatcmpl-echo", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
        return web.json_response(data)


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoUpstream]:
    server = EchoUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    server = Collector().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def amock() -> Iterator[MockAnthropic]:
    server = MockAnthropic().start()
    yield server
    server.stop()


class Seen:
    """Every response the tests received: status, headers and body, for the grep."""

    def __init__(self) -> None:
        self.responses: list[tuple[str, str]] = []  # (what, text)
        self.exempt: set[int] = set()  # indexes of answers meant to show a secret (a new key, once)

    def request(self, method: str, url: str, key: str | None = None, body: Any = None,
                headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        hdrs = {"authorization": f"Bearer {key}"} if key else {}
        hdrs.update(headers or {})
        response = httpx.request(method, url, json=body, headers=hdrs, timeout=15, **kwargs)
        head = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.responses.append((f"{method} {url} -> {response.status_code}", f"{head}\n\n{response.text}"))
        return response

    def texts(self) -> list[tuple[str, str]]:
        return [r for i, r in enumerate(self.responses) if i not in self.exempt]


def closed_port() -> int:
    return free_port()  # nothing listens there: connections are refused at once


def chat(seen: Seen, gw: GatewayProcess, model: str, key: str = GATEWAY_KEY, headers: dict[str, str] | None = None,
         **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": f"hello {model}"}], **extra}
    return seen.request("POST", f"{gw.url}/api/chat/completions", key, body, headers)


def main_config(mock: MockUpstream, echo: EchoUpstream, amock: MockAnthropic, collector: Collector,
                workdir: Path) -> dict[str, Any]:
    dead = f"127.0.0.1:{closed_port()}"
    config = base_config(
        mock, workdir,
        extra_providers=[
            {"id": "envprov", "protocol": "openai", "base_url": echo.base_url + "/v1", "api_key": "${LEAK_ENV_KEY}"},
            {"id": "echo", "protocol": "openai", "base_url": echo.base_url + "/v1", "api_key": ECHO_KEY},
            {"id": "deployed", "protocol": "openai", "base_url": echo.base_url + "/v1",
             "deployments": [{"name": "dep-a", "api_key": DEPLOY_KEY_A}, {"name": "dep-b", "api_key": DEPLOY_KEY_B}]},
            {"id": "anthropic", "protocol": "anthropic", "base_url": amock.base_url, "api_key": ANTHROPIC_KEY},
            {"id": "gem", "protocol": "gemini", "base_url": f"http://{dead}", "api_key": GEMINI_KEY},
        ],
        extra_models=[
            {"name": "leak-ok", "provider": "mock", "model": "mock-ok"},
            {"name": "leak-echo-401", "provider": "echo", "model": "echo-401"},
            {"name": "leak-echo-500", "provider": "echo", "model": "echo-500"},
            {"name": "leak-echo-stream", "provider": "echo", "model": "echo-stream"},
            {"name": "leak-env-401", "provider": "envprov", "model": "echo-401"},
            {"name": "leak-dep-401", "provider": "deployed", "model": "echo-401"},
            {"name": "leak-dep-500", "provider": "deployed", "model": "echo-500"},
            {"name": "leak-gem-down", "provider": "gem", "model": "gemini-2.0-flash"},
        ],
        keys=[{"name": "canary", "key_hash": hash_key(GATEWAY_KEY), "environment": "production"}],
        admin_keys=[{"name": "canary-admin", "key_hash": hash_key(ADMIN_KEY)}],
        store={"backend": "sqlite", "path": str(workdir / "admin.db")},
        alerts={"smtp": {"host": "127.0.0.1", "port": closed_port(), "username": "alerts",
                         "password": SMTP_PASSWORD, "from_address": "llmrelay@example.com"},
                "retries": 1, "backoff": 0.05, "timeout": 1},
        pipeline=["auth", otel_stage(collector, capture_content=True, headers={"authorization": OTLP_HEADER_SECRET}),
                  {"name": "limits", "options": {"policies": [{
            "name": "canary-customer", "scope": "customer", "scope_id": "leak-cust", "metric": "requests",
            "window": "day", "warn_threshold": 1, "block_threshold": 2,
            "notify": {"slack_webhook_urls": [f"http://{dead}/services/T0/B0/{SLACK_TOKEN}"],
                       "emails": ["oncall@example.com"],
                       "webhooks": [{"url": f"http://{dead}/hook", "secret": HOOK_SECRET}]}}]}},
            "cache", "routing", "credentials",
            {"name": "fallback", "options": {"retry": {"enabled": True, "num_retries": 1, "retry_after": 0.01}}}],
    )
    config["providers"][0]["api_key"] = PROVIDER_KEY  # the mock provider
    config["providers"][1]["api_key"] = PROVIDER_KEY
    return config


@pytest.fixture(scope="module")
def run(mock_upstream: MockUpstream, echo: EchoUpstream, amock: MockAnthropic, collector: Collector,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The main gateway, driven through every kind of request; yields what the checks need."""
    workdir = tmp_path_factory.mktemp("secrets")
    gw = GatewayProcess(main_config(mock_upstream, echo, amock, collector, workdir), workdir, env={"LEAK_ENV_KEY": ENV_PROVIDER_KEY})
    gw.start()
    seen = Seen()
    try:
        yield {"gw": gw, "seen": seen, "upstreams": [mock_upstream, echo, amock], "collector": collector, **drive(gw, seen, echo)}
    finally:
        gw.stop()


def drive(gw: GatewayProcess, seen: Seen, echo: EchoUpstream) -> dict[str, Any]:
    url = gw.url
    out: dict[str, Any] = {}
    # success, stream, cache miss then hit
    assert chat(seen, gw, "leak-ok").status_code == 200
    assert "data: [DONE]" in chat(seen, gw, "leak-ok", stream=True).text
    assert chat(seen, gw, "leak-ok", cache_enabled=True).status_code == 200
    assert wait_until(lambda: chat(seen, gw, "leak-ok", cache_enabled=True).headers.get("x-llmrelay-cache") == "hit",
                      5)
    # upstream errors that echo the configured keys, through every credential source
    assert chat(seen, gw, "leak-echo-401").status_code == 401
    assert chat(seen, gw, "leak-echo-500").status_code >= 500
    chat(seen, gw, "leak-echo-stream", stream=True)
    assert chat(seen, gw, "leak-env-401").status_code == 401
    chat(seen, gw, "leak-dep-401")
    chat(seen, gw, "leak-dep-500", stream=True)
    # fallbacks: the first candidate echoes its key, the next one answers
    assert chat(seen, gw, "leak-echo-500", fallback_models=["leak-ok"]).status_code == 200
    assert chat(seen, gw, "leak-echo-401", fallback_models=["leak-echo-500"]).status_code >= 400
    # credentials sent in requests: customer_credentials (body, respan_params, the params header), override
    chat(seen, gw, "leak-echo-401", customer_credentials={"echo": {"api_key": CUSTOMER_KEY}})
    chat(seen, gw, "leak-echo-stream", stream=True,
         respan_params={"customer_credentials": [{"credentials": {"echo": {"api_key": CUSTOMER_KEY}}, "weight": 1}]})
    params = base64.b64encode(json.dumps({"customer_credentials": {"echo": [
        {"weight": 1, "credentials": {"api_key": CUSTOMER_HDR_KEY}}]}}).encode()).decode()
    chat(seen, gw, "leak-echo-500", headers={"X-Data-Respan-Params": params})
    chat(seen, gw, "leak-echo-500", credential_override={"leak-echo-500": {"api_key": OVERRIDE_KEY}})
    chat(seen, gw, "leak-echo-401", customer_api_keys={"leak-echo-401": CUSTOMER_API_KEY})
    assert chat(seen, gw, "leak-gem-down").status_code >= 500  # refused connection: the error names no key
    chat(seen, gw, "leak-gem-down", stream=True)
    chat(seen, gw, "leak-ok", credential_override={"leak-ok": {"api_key": OVERRIDE_KEY}}, stream=True)
    # malformed credential params: 422 naming the field, never its value
    bad = chat(seen, gw, "leak-ok", customer_credentials={"echo": {"api_key": MALFORMED_KEY + "\nX-Injected: 1"}})
    assert bad.status_code == 422, bad.text
    bad = chat(seen, gw, "leak-ok", customer_credentials=[{"credentials": {"echo": {"api_key": MALFORMED_KEY}},
                                                           "weight": -1}])
    assert bad.status_code == 422, bad.text
    bad = chat(seen, gw, "leak-ok", credential_override={"leak-ok": {"api_key": MALFORMED_KEY,
                                                                       "api_base": f"http://u:{MALFORMED_KEY}@x/v1"}})
    assert bad.status_code == 422, bad.text
    # bad input of other kinds, with secrets in it
    seen.request("POST", f"{url}/api/chat/completions", GATEWAY_KEY,
                 headers={"content-type": "application/json"}, content=b'{"model": "' + PROVIDER_KEY.encode())
    chat(seen, gw, "leak-ok", messages="not-a-list")
    chat(seen, gw, "unknown-model")
    # limits: the customer's second request warns, the third is refused; alerts go to dead webhooks
    for _ in range(3):
        last = chat(seen, gw, "leak-ok", customer_identifier="leak-cust")
    assert last.status_code == 429, last.text
    # wrong keys: a gateway key on the admin API, an admin key on the gateway, unknown keys everywhere
    assert seen.request("GET", f"{url}/api/temporary-keys/", GATEWAY_KEY).status_code == 403
    assert seen.request("GET", f"{url}/api/temporary-keys/", WRONG_KEY).status_code == 401
    assert seen.request("GET", f"{url}/api/request-logs/list/", GATEWAY_KEY).status_code == 403
    assert chat(seen, gw, "leak-ok", key=ADMIN_KEY).status_code == 401
    assert chat(seen, gw, "leak-ok", key=WRONG_KEY).status_code == 401
    chat(seen, gw, "leak-ok", key=None, headers={"x-api-key": WRONG_KEY})
    chat(seen, gw, "leak-ok", key=None, headers={"authorization": f"Basic {WRONG_KEY}"})
    # temporary keys through the admin API: its secret is shown once, in the creation answer
    created = seen.request("POST", f"{url}/api/temporary-keys/", ADMIN_KEY, {"name": "canary-temp", "rate_limit": 60})
    assert created.status_code == 201, created.text
    seen.exempt.add(len(seen.responses) - 1)
    temp = created.json()["api_key"]
    out["temp_key"] = temp
    out["temp_id"] = created.json()["id"]
    assert chat(seen, gw, "leak-ok", key=temp).status_code == 200
    chat(seen, gw, "leak-echo-401", key=temp)
    assert seen.request("GET", f"{url}/api/temporary-keys/", temp).status_code == 403
    seen.request("GET", f"{url}/api/temporary-keys/", ADMIN_KEY)
    seen.request("GET", f"{url}/api/temporary-keys/{out['temp_id']}/", ADMIN_KEY)
    seen.request("PATCH", f"{url}/api/temporary-keys/{out['temp_id']}/", ADMIN_KEY, {"rate_limit": 30})
    # a custom provider with a key and a secret header, then a call to it that echoes the key
    made = seen.request("POST", f"{url}/api/providers/", ADMIN_KEY, {
        "provider_id": "canary-managed", "provider_name": "Canary", "api_key": MANAGED_PROVIDER_KEY,
        "extra_kwargs": {"base_url": echo.base_url + "/v1", "headers": {"X-Secret": MANAGED_HEADER}}})
    assert made.status_code in (200, 201), made.text
    chat(seen, gw, "canary-managed/echo-401")
    chat(seen, gw, "canary-managed/echo-stream", stream=True)
    seen.request("GET", f"{url}/api/providers/", ADMIN_KEY)
    seen.request("GET", f"{url}/api/providers/canary-managed/", ADMIN_KEY)
    seen.request("POST", f"{url}/api/models/", ADMIN_KEY, {"model_name": "canary-model",
                                                          "provider_id": "canary-managed"})
    seen.request("GET", f"{url}/api/models/?all=true", ADMIN_KEY)
    # customers
    seen.request("PATCH", f"{url}/api/users/leak-cust/", ADMIN_KEY, {"name": "Leak Customer", "rate_limit": 100})
    seen.request("GET", f"{url}/api/users/", ADMIN_KEY)
    seen.request("GET", f"{url}/api/users/leak-cust/", ADMIN_KEY)
    seen.request("GET", f"{url}/api/limits/", ADMIN_KEY)
    # Anthropic: the native passthrough (the gateway key as x-api-key) and chat, answers and errors
    native = {"max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    amsg = f"{url}/api/anthropic/v1/messages"
    anthropic_headers = {"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01"}
    assert seen.request("POST", amsg, None, {"model": "anthropic/claude-sonnet-4-5", **native},
                        anthropic_headers).status_code == 200
    seen.request("POST", amsg, None, {"model": "anthropic/claude-status-401", "stream": True, **native},
                 anthropic_headers)
    chat(seen, gw, "anthropic/claude-sonnet-4-5", stream=True)
    chat(seen, gw, "anthropic/claude-status-500")
    # ingestion with the gateway key (a log made elsewhere)
    seen.request("POST", f"{url}/api/request-logs/", GATEWAY_KEY, {
        "model": "gpt-4o-mini", "customer_identifier": "ingested", "input": [{"role": "user", "content": "hi"}],
        "output": {"role": "assistant", "content": "4"}, "usage": {"prompt_tokens": 2, "completion_tokens": 1}})
    # the echo upstream got the keys (so the test plants what it means to)
    sent = json.dumps([r["headers"] for r in echo.requests])
    for secret in (ECHO_KEY, ENV_PROVIDER_KEY, CUSTOMER_KEY, CUSTOMER_HDR_KEY, OVERRIDE_KEY, MANAGED_PROVIDER_KEY,
                   CUSTOMER_API_KEY):
        assert secret in sent, (secret, [r for r in seen.responses if "canary-managed" in r[0] or "echo-4" in r[1]][-6:])
    assert DEPLOY_KEY_A in sent or DEPLOY_KEY_B in sent
    return out


def collect(gw: GatewayProcess, seen: Seen) -> dict[str, str]:
    """Every output of the gateway, by where it came from (read after its logs are all written)."""
    url = gw.url
    outputs: dict[str, str] = {}
    # the log API, each record in full, summary, and the dashboard with its data
    listing = seen.request("GET", f"{url}/api/request-logs/list/?page_size=1000", ADMIN_KEY).json()
    for row in listing["results"]:
        seen.request("GET", f"{url}/api/request-logs/{row['unique_id']}/", ADMIN_KEY)
    seen.request("POST", f"{url}/api/request-logs/summary/", ADMIN_KEY)
    seen.request("GET", f"{url}/api/dashboard/stats/", ADMIN_KEY)
    page = seen.request("GET", f"{url}/dashboard", None).text
    for asset in set(re.findall(r'(?:src|href)="([^"]+)"', page)):
        if not asset.startswith(("http:", "https:", "data:", "#", "mailto:", "javascript:")):
            seen.request("GET", urllib.parse.urljoin(f"{url}/dashboard", asset), None)
    seen.request("GET", f"{url}/api/ready/", None)
    seen.request("GET", f"{url}/api/health-check/", None)
    outputs["metrics"] = seen.request("GET", f"{url}/metrics", None).text
    for i, (what, text) in enumerate(seen.texts()):
        outputs[f"response {i}: {what}"] = text
    # the log stores: every column of every SQLite row, the JSONL file, the spool files
    with sqlite3.connect(gw.log_db) as db:
        db.row_factory = sqlite3.Row
        for table, in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for row in db.execute(f'SELECT * FROM "{table}"'):
                outputs[f"sqlite {table} {row[0]}"] = json.dumps([str(v) for v in tuple(row)])
    for path in sorted(gw.workdir.rglob("*")):
        if path.is_file() and path.name != "llmrelay.yaml" and not path.name.startswith(("logs.db", "admin.db")):
            outputs[f"file {path.relative_to(gw.workdir)}"] = path.read_bytes().decode("utf-8", "replace")
    return outputs


def test_no_secret_in_any_output(run: dict[str, Any]) -> None:
    gw, seen = run["gw"], run["seen"]
    assert len(gw.records(count=35, timeout=10)) >= 35, len(gw.records())
    time.sleep(1.5)  # the alert deliveries fail and log; the log writer flushes
    outputs = collect(gw, seen)
    assert run["collector"].bodies, "no OpenTelemetry spans exported"
    for i, body in enumerate(list(run["collector"].bodies)):  # OTLP protobuf: strings are raw UTF-8
        outputs[f"otlp export {i}"] = body.decode("utf-8", "replace")
    assert any(k.startswith("sqlite") for k in outputs) and "file logs.jsonl" in outputs
    assert "file gateway.out" in outputs
    secrets = [*SECRETS, run["temp_key"]]
    # the grep sees what it must: the one answer meant to show a secret (the new key) is a hit
    shown = [text for i, (_, text) in enumerate(seen.responses) if i in seen.exempt]
    assert shown and leaks(shown[0], [run["temp_key"]])
    found = {where: hits for where, text in outputs.items() if (hits := leaks(text, secrets))}
    assert not found, "secrets leaked:\n" + "\n".join(
        f"- {where}: {secret} in ...{context}..." for where, hits in found.items() for secret, context in hits)


def test_admin_listings_mask_keys(run: dict[str, Any]) -> None:
    gw, seen = run["gw"], run["seen"]
    keys = seen.request("GET", f"{gw.url}/api/temporary-keys/", ADMIN_KEY).json()
    mine = [k for k in keys["results"] if k["name"] == "canary-temp"]
    assert mine and run["temp_key"] not in json.dumps(keys)
    providers = seen.request("GET", f"{gw.url}/api/providers/", ADMIN_KEY).json()
    managed = [p for p in providers["results"] if p["provider_id"] == "canary-managed"]
    assert managed and managed[0]["has_api_key"] is True
    assert MANAGED_PROVIDER_KEY not in json.dumps(providers) and MANAGED_HEADER not in json.dumps(providers)


def test_gateway_keys_stored_hashed(run: dict[str, Any]) -> None:
    """The admin store keeps a temporary key's SHA-256 only (queried directly), the config only hashes."""
    gw = run["gw"]
    temp = run["temp_key"]
    with sqlite3.connect(gw.workdir / "admin.db") as db:
        rows = db.execute("SELECT kind, id, data FROM admin_objects").fetchall()
    keys = [json.loads(data) for kind, _, data in rows if kind == "key"]
    assert [k for k in keys if k["name"] == "canary-temp"][0]["key_hash"] == hash_key(temp)
    dump = json.dumps(rows)
    assert not leaks(dump, [temp, GATEWAY_KEY, ADMIN_KEY])
    assert (gw.workdir / "admin.db").read_bytes().find(temp.encode()) < 0
    config = gw.config_path.read_text()
    assert GATEWAY_KEY not in config and ADMIN_KEY not in config and hash_key(GATEWAY_KEY) in config


def test_keys_are_separated(run: dict[str, Any]) -> None:
    """Admin keys never open the gateway API (ingestion excepted, as the README says) and gateway keys
    (config or temporary) never open the admin API: 403 there, so a leaked one reaches nothing."""
    gw, seen = run["gw"], run["seen"]
    for path in ("/api/temporary-keys/", "/api/providers/", "/api/request-logs/list/", "/api/users/",
                 "/api/limits/", "/api/dashboard/stats/", "/api/models/"):
        for key in (GATEWAY_KEY, run["temp_key"]):
            assert seen.request("GET", f"{gw.url}{path}", key).status_code == 403, (path, key)
        assert seen.request("GET", f"{gw.url}{path}", WRONG_KEY).status_code == 401, path
        assert seen.request("GET", f"{gw.url}{path}", ADMIN_KEY).status_code == 200, path
    for key in (ADMIN_KEY, WRONG_KEY):
        assert chat(seen, gw, "leak-ok", key=key).status_code == 401
        assert seen.request("POST", f"{gw.url}/api/embeddings", key, {"model": "leak-ok", "input": "x"}).status_code \
            == 401
    assert chat(seen, gw, "leak-ok", key=run["temp_key"]).status_code == 200
    # the one documented overlap: log ingestion takes a gateway key or an admin key (README, Ingestion)
    log = {"model": "gpt-4o-mini", "input": [{"role": "user", "content": "hi"}],
           "output": {"role": "assistant", "content": "4"}}
    for key in (ADMIN_KEY, GATEWAY_KEY):
        assert seen.request("POST", f"{gw.url}/api/request-logs/", key, log).status_code == 201
    assert seen.request("POST", f"{gw.url}/api/request-logs/", WRONG_KEY, log).status_code == 401


def test_key_comparisons_are_constant_time() -> None:
    """Key hashes are compared with hmac.compare_digest in the admin guard and the gateway's key ring
    (which the auth stage uses); no plain == on a secret's digest."""
    import hmac

    import plugins.auth
    import proxy.admin
    import proxy.keys

    guard = inspect.getsource(proxy.admin.AdminGuard)
    assert guard.count("hmac.compare_digest(") >= 3
    ring = inspect.getsource(proxy.keys.KeyRing.identify)
    assert "hmac.compare_digest(" in ring
    assert "KeyRing" in inspect.getsource(plugins.auth.AuthStage)
    for source in (guard, ring):
        assert not re.search(r"digest\s*==|==\s*digest|key_hash\s*==", source)

    # and the comparison really runs: a spy on compare_digest sees the digests of the presented keys
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    ring_obj = proxy.keys.KeyRing([_Key("k", hash_key(GATEWAY_KEY))])
    admin = proxy.admin.AdminGuard([hash_key(ADMIN_KEY)], [hash_key(GATEWAY_KEY)])
    original = hmac.compare_digest
    hmac.compare_digest = spy
    try:
        assert ring_obj.identify(GATEWAY_KEY) is not None
        assert admin.is_admin(ADMIN_KEY) and not admin.is_admin(GATEWAY_KEY)
    finally:
        hmac.compare_digest = original
    digest = hashlib.sha256(GATEWAY_KEY.encode()).hexdigest().encode()
    assert (digest, digest) in calls
    assert len(calls) >= 3


class _Key:
    def __init__(self, name: str, key_hash: str) -> None:
        self.name, self.key_hash, self.expires_at, self.environment = name, key_hash, None, "production"


def test_broken_backends_log_no_secrets(start_gateway: Any, tmp_path: Path) -> None:
    """Redis, PostgreSQL (log sink and admin store) and an http sink that all fail, with passwords and
    keys in their URLs: the process output, /metrics, readiness and the answers name none of them."""
    dead = f"127.0.0.1:{closed_port()}"
    workdir = tmp_path / "gw0"
    redis = {"backend": "redis", "url": f"redis://:{REDIS_PASSWORD}@{dead}/0"}
    mock_cfg = {"providers": [{"id": "demo", "protocol": "demo"}], "models": [],
                "keys": [{"name": "canary", "key_hash": hash_key(GATEWAY_KEY)}],
                "admin_keys": [{"name": "canary-admin", "key_hash": hash_key(ADMIN_KEY)}],
                "pipeline": ["auth", {"name": "limits", "options": {"policies": [
                    {"name": "rpm", "scope": "api_key", "metric": "requests", "window": "minute",
                     "block_threshold": 100}]}}, "cache", "routing", "credentials", "fallback"],
                "state": {"cache": redis, "counters": redis, "cooldowns": redis},
                "store": {"backend": "postgres", "dsn": f"postgresql://llmrelay:{PG_STORE_PASSWORD}@{dead}/llmrelay",
                          "poll_interval": 0.2, "notify_url": f"redis://:{REDIS_PASSWORD}@{dead}/0"},
                "logs": {"spool_dir": str(workdir / "spool"), "flush_interval": 0.05, "sinks": [
                    {"type": "sqlite", "path": str(workdir / "logs.db")},
                    {"type": "postgres", "dsn": f"postgresql://llmrelay:{PG_SINK_PASSWORD}@{dead}/llmrelay"},
                    {"type": "http", "url": f"http://{dead}/api/v1/traces/ingest", "api_key": HTTP_SINK_KEY,
                     "timeout": 1, "retries": 1}]},
                "auto_providers": False}
    gw = start_gateway(config=mock_cfg)
    seen = Seen()
    for _ in range(3):
        seen.request("POST", f"{gw.url}/api/chat/completions", GATEWAY_KEY,
                     {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "cache_enabled": True})
    seen.request("POST", f"{gw.url}/api/temporary-keys/", ADMIN_KEY, {"name": "x"})
    seen.request("GET", f"{gw.url}/api/request-logs/list/", ADMIN_KEY)
    ready = seen.request("GET", f"{gw.url}/api/ready/", None)
    assert ready.status_code == 503, ready.text
    time.sleep(1.5)
    seen.request("GET", f"{gw.url}/metrics", None)
    gw.stop()
    outputs = {what: text for what, text in seen.texts()}
    for path in sorted(gw.workdir.rglob("*")):
        if path.is_file() and path.name != "llmrelay.yaml":
            outputs[f"file {path.relative_to(gw.workdir)}"] = path.read_bytes().decode("utf-8", "replace")
    assert "gateway.out" in " ".join(outputs)
    found = {where: hits for where, text in outputs.items() if (hits := leaks(text))}
    assert not found, "secrets leaked:\n" + "\n".join(
        f"- {where}: {secret} in ...{context}..." for where, hits in found.items() for secret, context in hits)


def test_detector_finds_encodings() -> None:
    secret = PROVIDER_KEY
    assert leaks(f"Authorization: Basic {base64.b64encode(f'user:{secret}'.encode()).decode()}", [secret])
    assert leaks(base64.urlsafe_b64encode(b"ab" + secret.encode()).decode(), [secret])
    assert leaks(f"https://x.example/?key={urllib.parse.quote(secret + '/+')}", [secret])
    assert not leaks("sk-CANARY-provider", [secret])


def test_scrub_reply_headers_body_and_stream() -> None:
    """The dispatch's scrub: every place an upstream answer can carry the key it was sent."""
    import asyncio

    async def chunks() -> Any:
        yield b'data: {"error": {"message": "bad key ' + ECHO_KEY.encode() + b'"}}\n\n'
        yield b"data: [DONE]\n\n"

    secrets = secrets_of(ECHO_KEY, "none", None)
    assert secrets == (ECHO_KEY,)  # placeholders too short to be keys are left alone
    reply = scrub_reply(Reply(401, body=f'{{"error": "{ECHO_KEY}"}}'.encode(), headers={"x-request-id": ECHO_KEY}),
                        secrets)
    assert ECHO_KEY.encode() not in reply.body and REDACTED.encode() in reply.body
    assert reply.headers == {"x-request-id": REDACTED}
    streamed = scrub_reply(Reply(200, stream=chunks()), secrets)

    async def read() -> bytes:
        return b"".join([c async for c in streamed.stream])  # type: ignore[union-attr]

    assert ECHO_KEY.encode() not in asyncio.run(read())


def test_gateway_and_admin_keys_never_reach_a_provider(run: dict[str, Any]) -> None:
    """Providers are third parties: the client's gateway key (Authorization or x-api-key, also on the
    Anthropic passthrough), the admin key and temporary keys are never forwarded upstream."""
    sent = [r for upstream in run["upstreams"] for r in list(upstream.requests)]
    assert len(sent) > 20
    found = leaks(json.dumps([[r["path"], r["headers"], r["body"]] for r in sent]),
                  [GATEWAY_KEY, ADMIN_KEY, WRONG_KEY, run["temp_key"]])
    assert not found, found
    assert any(r["headers"].get("x-api-key") == ANTHROPIC_KEY for r in run["upstreams"][2].requests)


@pytest.mark.parametrize("config", [
    {"keys": [{"name": "pasted", "key_hash": GATEWAY_KEY}]},  # a plaintext key pasted where its hash goes
    {"admin_keys": [{"name": "pasted", "key_hash": ADMIN_KEY}]},
    {"providers": [{"id": "x", "base_url": f"http://u:{REDIS_PASSWORD}@127.0.0.1/v1", "api_key": PROVIDER_KEY}]},
    {"providers": [{"id": "x", "base_url": "http://127.0.0.1/v1", "api_key": PROVIDER_KEY, "bogus": 1}]},
    {"logs": {"sinks": [{"type": "postgres", "dsn": f"mysql://u:{PG_SINK_PASSWORD}@h/db"}]}},
    {"state": {"counters": {"backend": "redis", "url": f"redis://:{REDIS_PASSWORD}@h:notaport/0"}}},
])
def test_config_errors_name_no_secret(config: dict[str, Any], tmp_path: Path) -> None:
    """A config the gateway refuses is reported by field path, never by the secret value in it."""
    path = tmp_path / "llmrelay.yaml"
    path.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "check", str(path)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode != 0 and "$." in done.stdout + done.stderr, done
    assert not leaks(done.stdout + done.stderr)
