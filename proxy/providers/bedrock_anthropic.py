"""Claude on Amazon Bedrock for the native Anthropic passthrough (`/api/anthropic/v1/messages` and
`.../count_tokens`, client_format "anthropic"): the bodies of Bedrock's InvokeModel,
InvokeModelWithResponseStream and CountTokens for Anthropic models, and their answers turned into
Anthropic's own. bedrock.BedrockConverse resolves the region, signs (SigV4) and sends; this module
knows only the shapes.

- Messages: `POST /model/{modelId}/invoke` (streams: `/invoke-with-response-stream`) with the
  client's Messages body minus `model` and `stream`, plus `"anthropic_version":
  "bedrock-2023-05-31"` (or the provider's `api_version` when it starts with `bedrock-`) and the
  client's `anthropic-beta` header (comma separated; `metadata.extra_headers` may replace it) as
  `"anthropic_beta": [...]`: Bedrock takes both in the body, not as headers (AWS user guide,
  "Anthropic Claude Messages API", request and response). The answer is an Anthropic Message:
  its bytes go back unchanged.
- A stream comes in AWS event-stream framing: each `chunk` event's payload is
  `{"bytes": "<base64 of one Anthropic stream event (JSON)>"}`. Each event goes out as
  `event: <type>\\ndata: <the decoded JSON bytes>\\n\\n` (re-serialized only if those bytes held a
  line break, which would end an SSE data line). An exception message (throttlingException,
  serviceUnavailableException, ...) or an error message ends the stream with an Anthropic
  `event: error` of the matching type. Broken framing, a chunk that is not base64, or a body that
  ends before message_stop raises UpstreamStreamError (the relay then adds the error event).
- count_tokens: CountTokens, `POST /model/{modelId}/count-tokens` with
  `{"input": {"invokeModel": {"body": "<base64 of the invoke body>"}}}` (AWS API reference:
  CountTokens, CountTokensInput, InvokeModelTokensRequest). That body must be a valid InvokeModel
  body, so `max_tokens` is added when the client (following Anthropic's count_tokens) sent none:
  4096, or the thinking budget + 4096. CountTokens takes foundation-model ids: a cross-Region
  inference profile (`us.anthropic.claude-...`) is counted on its base model (`anthropic.claude-...`),
  whose tokenizer is the same. The answer `{"inputTokens": N}` becomes `{"input_tokens": N}`.
- Errors: Bedrock's `{"message"}` + `x-amzn-errortype` -> `{"type":"error","error":{type,message}}`
  with Bedrock's status. The type follows the AWS error (ThrottlingException -> rate_limit_error,
  ServiceUnavailableException -> overloaded_error, ModelTimeoutException -> timeout_error, ...),
  else the status (as for Anthropic: 400 invalid_request_error, 403 permission_error, ...).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy.call import Call
from proxy.providers.anthropic import DEFAULT_MAX_TOKENS, STATUS_ERROR_TYPE
from proxy.providers.common import json_object
from proxy.providers.eventstream import EventStreamError, EventStreamReader, read_event_stream
from proxy.sse_anthropic import anthropic_error_event
from proxy.upstream import UpstreamResponse, UpstreamStreamError

ANTHROPIC_VERSION = "bedrock-2023-05-31"
NOT_FORWARDED = frozenset({"model", "stream"})
CLIENT_ONLY_HEADERS = frozenset({"anthropic-version", "anthropic-beta"})  # Bedrock takes them in the body
# a cross-Region inference profile id: a geography prefix before the foundation model id
PROFILE_PREFIX = re.compile(r"^(?:us|us-gov|eu|apac|jp|au|ca|global)\.(?=anthropic\.)")
EVENT_NAME = re.compile(r"[A-Za-z0-9_.-]+")

# AWS error type (HTTP `x-amzn-errortype`, or a stream's `:exception-type`), lower-cased -> Anthropic's
ERROR_TYPES = {
    "throttlingexception": "rate_limit_error",
    "servicequotaexceededexception": "rate_limit_error",
    "serviceunavailableexception": "overloaded_error",
    "modelnotreadyexception": "overloaded_error",
    "modeltimeoutexception": "timeout_error",
    "modelerrorexception": "api_error",
    "modelstreamerrorexception": "api_error",
    "internalserverexception": "api_error",
    "validationexception": "invalid_request_error",
    "accessdeniedexception": "permission_error",
    "resourcenotfoundexception": "not_found_error",
}


def is_anthropic_model(model: str) -> bool:
    """A Bedrock model id (or inference profile) of a Claude model; an ARN is taken on trust."""
    lower = model.lower()
    return "anthropic" in lower or "claude" in lower or lower.startswith("arn:")


def count_tokens_model(model: str) -> str:
    """The model id CountTokens takes: a cross-Region inference profile's foundation model."""
    return PROFILE_PREFIX.sub("", model, count=1)


# -- request ------------------------------------------------------------------------------


def betas(call: Call) -> list[str]:
    """The beta names of the client's `anthropic-beta` header (or of `metadata.extra_headers`)."""
    value = call.headers.get("anthropic-beta")
    for name, extra in (call.params.extra_headers or {}).items():
        if name.lower() == "anthropic-beta":
            value = extra
    return [name for name in (part.strip() for part in (value or "").split(",")) if name]


def upstream_headers(call: Call) -> dict[str, str]:
    """`metadata.extra_headers` for Bedrock (signed with the rest), without Anthropic's own headers."""
    extra = call.params.extra_headers
    if not extra:
        return {}
    return {name.lower(): value for name, value in extra.items() if name.lower() not in CLIENT_ONLY_HEADERS}


def invoke_body(call: Call, version: str) -> dict[str, Any]:
    """The InvokeModel body of an Anthropic Messages (or count_tokens) request."""
    body = {key: value for key, value in call.body.items() if key not in NOT_FORWARDED}
    body["anthropic_version"] = version
    names = betas(call)
    if names:
        given = body.get("anthropic_beta")
        given = [n for n in given if isinstance(n, str)] if isinstance(given, list) else []
        body["anthropic_beta"] = list(dict.fromkeys(given + names))
    if call.endpoint == "anthropic.count_tokens" and body.get("max_tokens") is None:
        thinking = body.get("thinking")
        budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
        body["max_tokens"] = DEFAULT_MAX_TOKENS + (budget if isinstance(budget, int) and budget > 0 else 0)
    return body


def count_tokens_body(invoke: dict[str, Any]) -> bytes:
    encoded = base64.b64encode(orjson.dumps(invoke)).decode()
    return orjson.dumps({"input": {"invokeModel": {"body": encoded}}})


# -- answers ------------------------------------------------------------------------------


def count_tokens_answer(raw: bytes) -> bytes | None:
    """CountTokens' `{"inputTokens": N}` -> Anthropic's `{"input_tokens": N}`; None when not that shape."""
    data = json_object(raw)
    tokens = data.get("inputTokens") if data is not None else None
    if not isinstance(tokens, int) or isinstance(tokens, bool):
        return None
    return orjson.dumps({"input_tokens": tokens})


def error_type(status: int, aws_type: str | None) -> str:
    kind = ERROR_TYPES.get((aws_type or "").split(":", 1)[0].strip().lower())
    return kind or STATUS_ERROR_TYPE.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, aws_type: str | None) -> bytes:
    """A Bedrock error (its message and `x-amzn-errortype`) in Anthropic's error shape."""
    return orjson.dumps({"type": "error", "error": {"type": error_type(status, aws_type), "message": message}})


class StreamEvents(EventStreamReader):
    """Bedrock event-stream messages in, Anthropic SSE bytes out (`feed`). `done`: message_stop
    went out; `failed`: an exception ended the stream with an error event."""

    __slots__ = ()

    def _failure(self, kind: str, message: str) -> bytes:
        return anthropic_error_event(message or kind, error_type(502, kind))

    def _event(self, out: list[bytes], event_type: Any, payload: bytes) -> None:
        if event_type != "chunk":
            return
        data = json_object(payload) if payload else None
        encoded = data.get("bytes") if data is not None else None
        if not isinstance(encoded, str):
            return  # no event in it (Bedrock sends none such)
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise EventStreamError("a chunk's bytes are not base64") from None
        event = json_object(raw)
        name = event.get("type") if event is not None else None
        if not isinstance(name, str) or not EVENT_NAME.fullmatch(name):
            return  # not an Anthropic stream event: nothing a client could read
        if b"\n" in raw or b"\r" in raw:
            raw = orjson.dumps(event)  # a line break would end the SSE data line
        out.append(b"event: " + name.encode() + b"\ndata: " + raw + b"\n\n")
        if name == "message_stop":
            self.done = True
        elif name == "error":
            self.failed = True


async def relay_stream(response: UpstreamResponse, provider: str) -> AsyncIterator[bytes]:
    """The Anthropic SSE stream of an invoke-with-response-stream answer. Closing it closes the
    upstream response at once; broken framing, or a body that ends before message_stop (and
    without an exception), raises UpstreamStreamError."""
    events = StreamEvents()
    async with contextlib.aclosing(read_event_stream(response, events, provider)) as reads:
        async for out in reads:
            yield out
    if not (events.done or events.failed):
        raise UpstreamStreamError(f"provider '{provider}' ended the stream before the message was complete")
