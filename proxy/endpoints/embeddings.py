"""POST /api/embeddings (and its /api/v1 and /v1 spellings): OpenAI Embeddings through the pipeline.

A plain ASGI app like the chat endpoint: the body is parsed once, the gateway params are split
off exactly as for chat, and the Call (endpoint "embeddings") runs the whole pipeline (auth,
routing with fallbacks, credentials, fallback). Providers that serve embeddings: the OpenAI-
compatible ones, Azure and demo; dispatch answers 400 for the others. The reply is never a stream.
"""

from __future__ import annotations

from typing import Any

from proxy.call import Call
from proxy.endpoints.base import Endpoint
from proxy.endpoints.body import parse_object, split_gateway_params
from proxy.errors import BadRequest, ValidationFailed

PATHS = ("/api/embeddings", "/api/v1/embeddings", "/v1/embeddings")
ENCODING_FORMATS = ("float", "base64")



def valid_input(value: Any) -> bool:
    """str | list[str] | list[int] | list[list[int]], never empty."""
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(v, str) for v in value):
        return True
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return True
    return all(
        isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v) for v in value
    )


def read_call(call: Call, raw: bytes) -> None:
    """Fill the Call from the raw body: parse once, split off gateway params, check the fields."""
    body = parse_object(raw)
    split_gateway_params(call, body)
    call.stream = False
    call.client_wants_usage = False
    if not call.model:
        raise BadRequest("Invalid request format: `model` is required")
    if "input" not in body:
        raise BadRequest("Invalid request format: `input` is required")
    if not valid_input(body["input"]):
        raise ValidationFailed(
            "input", "Expected a string, an array of strings, an array of tokens or an array of token arrays (not empty)"
        )
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ENCODING_FORMATS:
        raise ValidationFailed("encoding_format", f"Expected one of {list(ENCODING_FORMATS)}, got {encoding!r}")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1):
        raise ValidationFailed("dimensions", "Expected a positive integer")


class Embeddings(Endpoint):
    """The ASGI app behind PATHS (answers are never streamed)."""

    endpoint = "embeddings"

    def read_call(self, call: Call, raw: bytes) -> None:
        read_call(call, raw)
