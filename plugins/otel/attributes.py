"""Span attributes from a finished Call: GenAI semantic conventions, plus `llmrelay.*`.

Plain functions of the Call (no OpenTelemetry import). Only attributes that say something are
set: false flags and absent values are left out, since each one costs CPU twice (the SDK's checks
on the event loop, the OTLP encoding on the export thread). Never a URL, a key or a header.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson

from proxy.call import Attempt, Call, Target

# Call.endpoint -> gen_ai.operation.name; other endpoints keep their own name
OPERATIONS = {
    "chat": "chat",
    "responses": "chat",
    "anthropic.messages": "chat",
    "embeddings": "embeddings",
    "gemini.embedContent": "embeddings",
    "gemini.batchEmbedContents": "embeddings",
    "gemini.generateContent": "generate_content",
    "gemini.streamGenerateContent": "generate_content",
}
MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
CONTENT_FIELDS = ("messages", "input", "contents")  # where the request's content is, per format
MAX_DESCRIPTION = 200  # characters of an error message in a span status
MAX_HOSTS = 1024  # base URLs whose host is remembered


def operation_of(call: Call) -> str:
    return OPERATIONS.get(call.endpoint, call.endpoint)


def server_attributes(call: Call, operation: str, model: str, attempts: int, capture_content: bool) -> dict[str, Any]:
    """The request's span: what was asked, who served, usage, cost and the gateway's facts."""
    target = call.target
    status = call.status_code
    attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "llmrelay.log_id": call.id}
    if call.endpoint != operation:
        attrs["llmrelay.endpoint"] = call.endpoint
    if model:
        attrs["gen_ai.request.model"] = model
    if status:
        attrs["http.response.status_code"] = status
    if status >= 400 or (status == 0 and call.error is not None):
        attrs["error.type"] = str(status) if status else "error"
    if target is not None:
        attrs["gen_ai.provider.name"] = attrs["gen_ai.system"] = target.provider
        add_usage(attrs, call)
        attrs["llmrelay.cost"] = call.cost
    if call.response_model:
        attrs["gen_ai.response.model"] = call.response_model
    body = call.body
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        attrs["gen_ai.request.temperature"] = temperature
    top_p = body.get("top_p")
    if isinstance(top_p, int | float) and not isinstance(top_p, bool):
        attrs["gen_ai.request.top_p"] = top_p
    for name in MAX_TOKEN_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            attrs["gen_ai.request.max_tokens"] = value
            break
    if call.stream:
        attrs["llmrelay.stream"] = True
    if call.cache_hit:
        attrs["llmrelay.cache_hit"] = True
    if attempts > 1:
        attrs["llmrelay.fallback"] = True
        attrs["llmrelay.attempts"] = attempts
    customer = call.params.customer()
    if customer is not None:
        attrs["llmrelay.customer"] = customer
    if call.ttft is not None:
        attrs["llmrelay.ttft"] = call.ttft
    if capture_content and not call.params.disable_log:
        content = next((body[f] for f in CONTENT_FIELDS if body.get(f) is not None), None)
        if content is not None:
            attrs["gen_ai.input.messages"] = orjson.dumps(content).decode()
        if call.completion is not None:
            attrs["gen_ai.output.messages"] = orjson.dumps(call.completion, default=str).decode()
    return attrs


def attempt_attributes(call: Call, operation: str, attempt: Attempt, target: Target | None, hosts: Hosts,
                       served: bool) -> dict[str, Any]:
    """One upstream attempt's span; `served`: the attempt whose answer the client got."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": attempt.model,
        "gen_ai.provider.name": attempt.provider,
        "gen_ai.system": attempt.provider,
        "llmrelay.attempt.status": attempt.status,
    }
    if attempt.deployment and attempt.deployment != attempt.provider:
        attrs["llmrelay.deployment"] = attempt.deployment
    if target is not None and target.base_url:
        host, port = hosts.get(target.base_url)
        if host:
            attrs["server.address"] = host
        if port:
            attrs["server.port"] = port
    if failed(attempt):
        attrs["error.type"] = str(attempt.status) if attempt.status else "error"
    if served:
        if call.response_model:
            attrs["gen_ai.response.model"] = call.response_model
        add_usage(attrs, call)
    return attrs


def add_usage(attrs: dict[str, Any], call: Call) -> None:
    usage = call.usage
    attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
    attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
    if usage.cached_tokens:
        attrs["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
    if usage.cache_creation_tokens:
        attrs["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_creation_tokens


def failed(attempt: Attempt) -> bool:
    return attempt.status >= 400 or attempt.error is not None


def describe(error: str | None) -> str | None:
    """An error message for a span status, shortened."""
    return error[:MAX_DESCRIPTION] if error else None


def targets_of(call: Call) -> dict[tuple[str, str, str | None], Target]:
    """The Targets an attempt can have tried, by (provider, upstream model, deployment)."""
    found = {(t.provider, t.model, t.deployment): t for t in call.plan}
    target = call.target
    if target is not None:
        found[(target.provider, target.model, target.deployment)] = target
    return found


class Hosts:
    """The upstream's host and port from a base URL (never its user info, path or query), remembered."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[str | None, int | None]] = {}

    def get(self, base_url: str) -> tuple[str | None, int | None]:
        known = self._known.get(base_url)
        if known is not None:
            return known
        try:
            parts = urlsplit(base_url)
            known = (parts.hostname, parts.port)
        except ValueError:
            known = (None, None)
        if len(self._known) < MAX_HOSTS:
            self._known[base_url] = known
        return known
