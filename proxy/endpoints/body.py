"""Reading and parsing a request body once, within the configured size limit."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from proxy.errors import BadRequest, PayloadTooLarge


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {declared} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise BadRequest("Invalid request format: the body is empty; expected a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Invalid request format: the body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"Invalid request format: expected a JSON object, got {type(data).__name__}")
    return data
