"""Input limits (README "Input limits"): body size (also chunked, without Content-Length), header size
(granian's), items per array, JSON nesting depth. Each is a clear 4xx naming the limit, never a 500."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import orjson
import pytest

from proxy.endpoints.body import MAX_ITEMS, MAX_JSON_DEPTH
from tests.conftest import KEY, GatewayProcess

AUTH = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
LIMIT = 64 * 1024  # base_config's server.max_body_bytes
MESSAGES = [{"role": "user", "content": "hi"}]


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


def chat(gateway: GatewayProcess, body: object, **kwargs: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(f"{gateway.url}/api/chat/completions", content=content, headers={**AUTH, **kwargs.pop("headers", {})},
                      timeout=10, **kwargs)


@pytest.fixture(scope="module")
def gw(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    yield gateway


def test_body_over_the_limit_with_content_length(gw: GatewayProcess) -> None:
    r = chat(gw, {"model": "gpt-test", "messages": [{"role": "user", "content": "x" * LIMIT}]})
    assert r.status_code == 413
    assert r.json()["detail"].startswith("Request body of ") and f"limit of {LIMIT} bytes" in r.json()["detail"]


def test_chunked_body_over_the_limit(gw: GatewayProcess) -> None:
    """No Content-Length: the limit applies to the bytes as they arrive."""
    body = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "x" * (2 * LIMIT)}]})

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 4096):
            yield body[i:i + 4096]

    r = httpx.post(f"{gw.url}/api/chat/completions", content=chunks(), headers=AUTH, timeout=10)
    assert r.status_code == 413
    assert r.json() == {"detail": f"Request body is over the limit of {LIMIT} bytes"}


def test_chunked_body_under_the_limit(gw: GatewayProcess) -> None:
    body = orjson.dumps({"model": "gpt-test", "messages": MESSAGES})
    r = httpx.post(f"{gw.url}/api/chat/completions", content=iter([body[:10], body[10:]]), headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text


def test_too_many_messages(gw: GatewayProcess) -> None:
    r = chat(gw, {"model": "gpt-test", "messages": [{}] * (MAX_ITEMS + 1)})
    assert r.status_code == 422
    assert r.json()["errors"] == {"messages": [f"At most {MAX_ITEMS} items (the gateway's limit), got {MAX_ITEMS + 1}"]}


def test_too_many_embedding_inputs(gw: GatewayProcess) -> None:
    r = httpx.post(f"{gw.url}/api/embeddings", content=orjson.dumps({"model": "gpt-test", "input": [1] * (MAX_ITEMS + 1)}),
                   headers=AUTH, timeout=10)
    assert r.status_code == 422 and list(r.json()["errors"]) == ["input"]


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 2000])
def test_json_nesting_over_the_limit(gw: GatewayProcess, depth: int) -> None:
    """300: orjson reads it but cannot write it back (it stops at 254 levels), which was a 500; 2000:
    orjson refuses to read it (over 1024 levels), which was a 400 saying only 'not valid JSON'."""
    body = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "metadata": {"deep": %s}}' % (
        b"[" * depth + b"]" * depth)
    r = chat(gw, body)
    assert r.status_code == 400, r.text
    assert r.json() == {"detail": f"Invalid request format: the JSON nests deeper than {MAX_JSON_DEPTH} levels "
                                  "(the gateway's limit)"}


def test_json_nesting_at_the_limit_is_served(gw: GatewayProcess) -> None:
    r = chat(gw, {"model": "gpt-test", "messages": MESSAGES, "tools_extra": nested(MAX_JSON_DEPTH - 2)})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw", [False, True])
def test_params_header_nesting_over_the_limit(gw: GatewayProcess, raw: bool) -> None:
    """metadata values are written back as JSON text: 300 levels in X-Data-Respan-Params was a 500."""
    value = b'{"metadata": {"deep": %s}}' % (b"[" * 300 + b"]" * 300)
    header = value.decode() if raw else base64.b64encode(value).decode()
    r = chat(gw, {"model": "gpt-test", "messages": MESSAGES}, headers={"x-data-respan-params": header})
    assert r.status_code == 422, r.text
    assert list(r.json()["errors"]) == ["X-Data-Respan-Params"]
    assert "deeper than 128 levels" in r.json()["errors"]["X-Data-Respan-Params"][0]


def test_header_limits(gw: GatewayProcess) -> None:
    """granian (HTTP/1.1, hyper) refuses headers past its 417,792-byte buffer (1 MB here) or over 100 lines with 431 and closes the
    connection, before the gateway sees the request."""
    body = {"model": "gpt-test", "messages": MESSAGES}
    assert chat(gw, body, headers={"x-big": "a" * 300_000}).status_code == 200
    r = chat(gw, body, headers={"x-big": "a" * 1_000_000})
    assert r.status_code == 431 and r.headers["connection"] == "close"
    assert chat(gw, body, headers={f"x-h{i}": "v" for i in range(80)}).status_code == 200
    assert chat(gw, body, headers={f"x-h{i}": "v" for i in range(120)}).status_code == 431
