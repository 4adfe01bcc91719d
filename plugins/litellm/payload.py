"""One LiteLLM logging event -> one span for `/api/v1/traces/ingest`.

The span has the fields of the respan LiteLLM exporter (spec 8.1) plus what that exporter leaves
out: the answer (`completion_message`, `tool_calls`), usage, cost, time to first token, the
status code of a failure. Everything the caller put in `metadata={"respan_params": {...}}` is
mapped to the log's fields; keys this module does not know go into the log's `metadata`.

Pure functions of the event: no I/O, no LiteLLM import (cost is asked of a function passed in).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

CostOf = Callable[[Any], float | None]

ERROR_MESSAGE_MAX = 4000
DEFAULT_SPAN_NAME = "litellm.completion"
DEFAULT_WORKFLOW_NAME = "litellm"

# LiteLLM call_type -> log_type (spec 2.3); anything else is a chat completion
LOG_TYPES = {
    "embedding": "embedding", "aembedding": "embedding",
    "text_completion": "completion", "atext_completion": "completion",
    "responses": "response", "aresponses": "response",
    "transcription": "transcription", "atranscription": "transcription",
    "speech": "speech", "aspeech": "speech",
    "rerank": "reranker", "arerank": "reranker",
}
# respan_params keys sent under their own name (the receiver knows them)
PASSED = ("customer_email", "customer_name", "thread_identifier", "custom_identifier", "group_identifier",
          "trace_group_identifier", "evaluation_identifier", "session_identifier", "trace_name", "span_path",
          "prompt_id", "prompt_name", "prompt_version_number", "variables", "prompt", "properties",
          "positive_feedback", "note", "span_handoffs", "span_tools")
# respan_params keys under another name in the span: (span field, the names it may come as)
RENAMED = (("trace_unique_id", ("trace_unique_id", "trace_id")),
           ("span_unique_id", ("span_unique_id", "span_id")),
           ("span_parent_id", ("span_parent_id", "parent_span_id")),
           ("span_workflow_name", ("span_workflow_name", "workflow_name")),
           ("span_name", ("span_name",)))
HANDLED = frozenset({"customer_identifier", "customer_params", "metadata", "disable_log", *PASSED,
                     *(name for _, names in RENAMED for name in names)})
IDENTIFIERS = frozenset({"customer_identifier", "thread_identifier", "custom_identifier", "group_identifier",
                         "trace_group_identifier", "evaluation_identifier", "session_identifier", "trace_unique_id",
                         "span_unique_id", "span_parent_id", "span_workflow_name", "span_name", "trace_name",
                         "prompt_id", "prompt_name", "customer_email", "customer_name", "span_path", "note"})
OBJECTS = frozenset({"variables", "prompt", "properties"})
# request params echoed on the log (spec 2.3 "config echo")
ECHOED = ("temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty", "n", "stop",
          "response_format", "reasoning_effort")
CONTENT = ("prompt_messages", "completion_message", "completion_messages", "tool_calls", "tools", "input",
           "output")


def span_of(kwargs: Mapping[str, Any], response_obj: Any, start_time: Any, end_time: Any, *,
            failed: bool, cost_of: CostOf | None = None) -> dict[str, Any] | None:
    """The span for one event; None for an event that is not logged (a stream still running)."""
    stream = bool(kwargs.get("stream"))
    response = response_obj
    if stream and not failed:
        response = kwargs.get("complete_streaming_response") or kwargs.get("async_complete_streaming_response")
        if response is None:  # an intermediate stream event: the final one carries the whole answer
            return None
    litellm_params = kwargs.get("litellm_params") or {}
    metadata = litellm_params.get("metadata")
    metadata = metadata if isinstance(metadata, Mapping) else {}
    params = metadata.get("respan_params") or metadata.get("keywordsai_params") or {}
    if not isinstance(params, Mapping):
        params = {}
    call_id = kwargs.get("litellm_call_id") or litellm_params.get("litellm_call_id") or uuid.uuid4().hex
    start, end = _seconds(start_time), _seconds(end_time)
    log_type = LOG_TYPES.get(str(kwargs.get("call_type") or ""), "chat")
    span: dict[str, Any] = {
        "unique_id": str(call_id),
        "log_type": log_type,
        "model": kwargs.get("model") or litellm_params.get("model"),
        "provider_id": litellm_params.get("custom_llm_provider") or kwargs.get("custom_llm_provider"),
        "stream": stream,
    }
    if start is not None:
        span["start_time"] = _iso(start)
    if end is not None:
        span["timestamp"] = _iso(end)
    if start is not None and end is not None:
        span["latency"] = max(end - start, 0.0)
    first = _seconds(kwargs.get("completion_start_time"))
    if stream and not failed and first is not None and start is not None:
        span["time_to_first_token"] = max(first - start, 0.0)
    optional = kwargs.get("optional_params") or {}
    for name in ECHOED:
        if optional.get(name) is not None:
            span[name] = optional[name]
    if span.get("max_tokens") is None and optional.get("max_completion_tokens") is not None:
        span["max_tokens"] = optional["max_completion_tokens"]
    if log_type == "chat":
        span["prompt_messages"] = _plain(kwargs.get("messages"))
    elif kwargs.get("input") is not None:
        span["input"] = _plain(kwargs.get("input"))
    if optional.get("tools") is not None:
        span["tools"] = _plain(optional["tools"])
    if optional.get("tool_choice") is not None:
        span["tool_choice"] = _plain(optional["tool_choice"])
    if failed:
        _failure(span, kwargs, response_obj)
    else:
        span["status"] = "success"
        span["status_code"] = 200
        _answer(span, response, log_type)
        _cost(span, kwargs, response, cost_of)
    _params(span, params, call_id)
    if params.get("disable_log") is True:
        for name in CONTENT:
            span.pop(name, None)
        span["disable_log"] = True
    return {k: v for k, v in span.items() if v is not None}


def _failure(span: dict[str, Any], kwargs: Mapping[str, Any], response_obj: Any) -> None:
    exc = kwargs.get("exception")
    if exc is None and isinstance(response_obj, BaseException):
        exc = response_obj
    status = getattr(exc, "status_code", None)
    span["status"] = "error"
    span["status_code"] = status if isinstance(status, int) and not isinstance(status, bool) and status >= 400 else 500
    span["error_message"] = (str(exc) if exc is not None else "LiteLLM call failed")[:ERROR_MESSAGE_MAX]


def _answer(span: dict[str, Any], response: Any, log_type: str) -> None:
    """completion_message, tool_calls and usage from a ModelResponse (or its dict). Only the parts
    needed are converted: an embeddings response is mostly vectors, which are not logged."""
    if log_type in ("chat", "completion"):
        choices = _plain(_field(response, "choices")) or []
        messages = [_message(c) for c in choices if isinstance(c, dict)]
        messages = [m for m in messages if m is not None]
        if messages:
            span["completion_message"] = messages[0]
            if len(messages) > 1:
                span["completion_messages"] = messages
            calls = [tc for m in messages for tc in m.get("tool_calls") or []]
            if calls:
                span["tool_calls"] = calls
    elif log_type == "response" and _field(response, "output") is not None:
        span["output"] = _plain(_field(response, "output"))
    usage = _usage(_plain(_field(response, "usage")))
    if usage:
        span["usage"] = usage


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _message(choice: dict[str, Any]) -> dict[str, Any] | None:
    message = choice.get("message")
    if not isinstance(message, dict):  # a text completion's choice has `text`
        text = choice.get("text")
        return {"role": "assistant", "content": text} if isinstance(text, str) else None
    return {k: v for k, v in message.items() if v is not None and k != "provider_specific_fields"}


def _usage(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    details = raw.get("prompt_tokens_details") if isinstance(raw.get("prompt_tokens_details"), dict) else {}
    prompt = _count(raw.get("prompt_tokens")) or _count(raw.get("input_tokens"))
    completion = _count(raw.get("completion_tokens")) or _count(raw.get("output_tokens"))
    cached = _count(details.get("cached_tokens")) or _count(raw.get("cache_read_input_tokens"))
    created = _count(raw.get("cache_creation_input_tokens")) or _count(details.get("cache_creation_tokens"))
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": _count(raw.get("total_tokens")) or prompt + completion}
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if created:
        usage["cache_creation_input_tokens"] = created
    return usage


def _cost(span: dict[str, Any], kwargs: Mapping[str, Any], response: Any, cost_of: CostOf | None) -> None:
    """LiteLLM's price of the call. Left out when LiteLLM has none (or 0 for a call that used
    tokens: it does not know the model), so that the receiver prices it from its own catalog."""
    cost = kwargs.get("response_cost")
    if cost is None and "response_cost" not in kwargs and cost_of is not None and response is not None:
        try:
            cost = cost_of(response)
        except Exception:  # unknown model: no price
            cost = None
    if isinstance(cost, int | float) and not isinstance(cost, bool) and cost > 0:
        span["cost"] = float(cost)


def _params(span: dict[str, Any], params: Mapping[str, Any], call_id: Any) -> None:
    """respan_params -> span fields; unknown keys go to metadata (as the respan exporter does)."""
    customer_params = params.get("customer_params")
    customer = params.get("customer_identifier")
    if isinstance(customer_params, Mapping):
        span["customer_params"] = dict(customer_params)
        if customer is None:
            customer = customer_params.get("customer_identifier")
    span["customer_identifier"] = _identifier(customer)
    for name in PASSED:
        if params.get(name) is not None:
            span[name] = params[name]
    for field, names in RENAMED:
        value = next((params[n] for n in names if params.get(n) is not None), None)
        if value is not None:
            span[field] = value
    span.setdefault("span_name", DEFAULT_SPAN_NAME)
    span.setdefault("span_workflow_name", DEFAULT_WORKFLOW_NAME)
    trace = span.get("trace_unique_id")
    if trace is not None:
        span.setdefault("trace_name", span["span_workflow_name"])
    if span.get("span_unique_id") is None:
        root = trace is not None and span.get("span_parent_id") is None
        span["span_unique_id"] = trace if root else hashlib.md5(str(call_id).encode()).hexdigest()[:16]
    metadata: dict[str, Any] = {}
    given = params.get("metadata")
    extra = {k: v for k, v in params.items() if k not in HANDLED and v is not None}
    metadata.update(extra)
    if isinstance(given, Mapping):
        metadata.update(given)
    elif given is not None:
        metadata["metadata"] = given
    if metadata:
        span["metadata"] = metadata
    # The receiver refuses a wrongly typed field (and with it the batch): coerce what can be.
    for name in IDENTIFIERS:
        if name in span:
            span[name] = _identifier(span[name])
    for name in OBJECTS:
        if name in span and not isinstance(span[name], Mapping):
            metadata[name] = span.pop(name)
            span["metadata"] = metadata
    version = span.get("prompt_version_number")
    if version is not None and not (isinstance(version, int) and not isinstance(version, bool) and version >= 0):
        metadata["prompt_version_number"] = span.pop("prompt_version_number")
        span["metadata"] = metadata
    if not isinstance(span.get("positive_feedback", False), bool):
        metadata["positive_feedback"] = span.pop("positive_feedback")
        span["metadata"] = metadata


def _identifier(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return repr(value)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _plain(value: Any) -> Any:
    """JSON-ready data from LiteLLM's pydantic objects (messages, responses, tools)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        try:
            try:
                data = dump(warnings=False)  # LiteLLM's loosely typed fields make pydantic warn
            except TypeError:
                data = dump()
        except Exception:
            return str(value)
        return _plain(data)
    return str(value)


def _seconds(value: Any) -> float | None:
    """Unix seconds from LiteLLM's times (naive datetimes are local time, as datetime.now() gives)."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
