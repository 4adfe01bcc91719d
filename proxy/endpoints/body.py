"""Parsing a request body once."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import BadRequest


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
