"""Pieces the provider adapters share: the timed upstream POST, reading a JSON-object answer, a
small bounded cache, and the walk over OpenAI message content parts that the translators
(anthropic.py, bedrock.py) build their own blocks from. What a block looks like stays in each
adapter's module."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import orjson

from proxy.call import Call, Target
from proxy.errors import BadRequest
from proxy.settings import Provider, Timeouts
from proxy.upstream import UpstreamClient, UpstreamResponse

K = TypeVar("K")
V = TypeVar("V")
Bad = Callable[[str], BadRequest]  # an adapter's "Invalid request for a ... model: <message>"


class _Adapter(Protocol):
    config: Provider
    timeouts: Timeouts
    upstream: UpstreamClient


async def post_upstream(adapter: _Adapter, call: Call, target: Target, url: str, headers: dict[str, str],
                        body: bytes, *, stream: bool | None = None) -> tuple[UpstreamResponse, bytes | None]:
    """POST `body` upstream with the call's timeouts (`stream` defaults to `call.stream`).

    Returns (response, None) for a stream that opened (status < 400), else (response, the whole
    body). The time until then - the answer's headers for a stream, its body otherwise - is added
    to `call.upstream_time`, also when the request fails."""
    if stream is None:
        stream = call.stream
    read_timeout = call.params.timeout or target.timeout or (
        adapter.timeouts.stream_idle if stream else adapter.timeouts.read
    )
    started = time.perf_counter()
    try:
        response = await adapter.upstream.post(
            target.provider,
            url,
            headers,
            body,
            connect_timeout=adapter.timeouts.connect,
            read_timeout=read_timeout,
            stream=stream,
            max_connections=adapter.config.max_connections,
            egress=target.egress,
        )
        if stream and response.status < 400:
            return response, None
        return response, await response.read()
    finally:
        call.upstream_time += time.perf_counter() - started


def json_object(raw: bytes) -> dict[str, Any] | None:
    """The JSON object `raw` holds, else None (not JSON, or JSON but not an object)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def bounded_get(cache: dict[K, V], key: K, make: Callable[[K], V], limit: int) -> V:
    """`cache[key]`, made by `make(key)` on a miss; a full cache (`limit` entries) is emptied first."""
    value = cache.get(key)
    if value is None:
        value = make(key)
        if len(cache) >= limit:
            cache.clear()
        cache[key] = value
    return value


# -- OpenAI content parts ----------------------------------------------------------------


def content_parts(content: Any, where: str, bad: Bad) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(index, location, part) for each part of an OpenAI message `content`: None gives none, a
    string one text part, a list its parts (a bare string part as a text part). A part that is not
    an object, or a text part whose text is not a string, is a 400 (`bad`)."""
    if content is None:
        return
    if isinstance(content, str):
        yield 0, f"{where}.content", {"type": "text", "text": content}
        return
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or an array of content parts")
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, dict):
            raise bad(f"{at} must be an object")
        if part.get("type") == "text" and not isinstance(part.get("text"), str):
            raise bad(f"{at}.text must be a string")
        yield i, at, part


def image_url(part: dict[str, Any], where: str, bad: Bad) -> str:
    """The URL of an `image_url` part (an object with `url`, or the URL itself)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise bad(f"{where}: image_url.url is required")
    return url


def file_data(part: dict[str, Any], where: str, bad: Bad) -> tuple[dict[str, Any], str]:
    """(the `file` object, its `file_data` data URL) of a `file` part; other files are a 400."""
    file = part.get("file")
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str) or not data.startswith("data:"):
        raise bad(f"{where}: only files given inline as file.file_data (a base64 data URL) can be sent")
    assert isinstance(file, dict)
    return file, data


def tool_function(call: Any, where: str, bad: Bad) -> tuple[dict[str, Any], str]:
    """(function, name) of an assistant `tool_calls` entry."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise bad(f"{where} must be an object with a function")
    function = call["function"]
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise bad(f"{where}.function.name is required")
    return function, name


def tool_call_id(call: dict[str, Any], where: str, bad: Bad) -> str:
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise bad(f"{where}.id is required")
    return call_id


def tool_arguments(function: dict[str, Any], where: str, bad: Bad) -> dict[str, Any]:
    """A tool call's `arguments` as an object: absent or "" is {}, a JSON string must hold an object."""
    arguments = function.get("arguments")
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, dict):
        raise bad(f"{where}.function.arguments must be a JSON object")
    return value


def chunk_event(chunk_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> bytes:
    """One `data:` event of a chat.completion.chunk with a single choice (index 0)."""
    data = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(data) + b"\n\n"
