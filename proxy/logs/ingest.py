"""Ingested payloads (spec 2.3 and 8) -> LogRecords.

One normalizer serves every payload generation: the current `/api/request-logs/` schema, the
legacy `/create/` payloads (prompt_messages, generation_time, keywordsai_params), the trace
ingest's span arrays (respan-exporter-litellm) and LogRecords shipped by another llmrelay's HTTP
exporter. Aliases are folded into one name, usage shapes into the token columns, and cost is
computed from custom unit prices or the catalog when the payload has none.

Unknown fields are ignored (exporters send more than we store); a known field of the wrong type
is an IngestError naming it, so a payload is stored whole or not at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from proxy.call import KeyInfo, Prices, Usage, new_id
from proxy.logs.query import QueryError, parse_time
from proxy.logs.record import CONTENT_FIELDS, LogRecord, tokens_per_second
from proxy.logs.schema import iso

LOG_TYPES = frozenset({"chat", "text", "completion", "response", "embedding", "transcription", "speech", "workflow",
                       "agent", "task", "tool", "function", "generation", "handoff", "guardrail", "custom", "score",
                       "batch", "unknown", "reranker", "other", "count_tokens"})
LOG_TYPE_ALIASES = {"trace": "workflow", "step": "task", "llm": "generation", "model": "generation"}
LOG_METHODS = frozenset({"inference", "logging_api", "batch", "python_tracing", "ts_tracing", "tracing_integration"})
CHAT_TYPES = frozenset({"chat", "text", "completion", "generation", "response"})
IDENTIFIER_MAX = 254  # *_identifier values are cut to this many characters (spec 2.3)
SPAN_NAME_MAX = 255
MAX_BATCH = 10_000  # spans in one traces-ingest request


class IngestError(ValueError):
    """A payload that cannot be stored; the message names the field."""


def _str(value: Any, name: str, limit: int | None = None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise IngestError(f"{name}: expected a string, got {type(value).__name__}")
    text = value if isinstance(value, str) else str(value)
    return text[:limit] if limit else text


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise IngestError(f"{name}: expected a number, got a boolean")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise IngestError(f"{name}: expected a number, got {value!r}"[:200])


def _int(value: Any, name: str) -> int | None:
    number = _number(value, name)
    if number is None:
        return None
    if number != int(number) or number < 0:
        raise IngestError(f"{name}: expected a whole number of at least 0, got {value!r}")
    return int(number)


def _bool(value: Any, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise IngestError(f"{name}: expected true or false, got {value!r}"[:200])


def _dict(value: Any, name: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise IngestError(f"{name}: expected an object, got {type(value).__name__}")


def _list(value: Any, name: str) -> list[Any] | None:
    if value is None or isinstance(value, list):
        return value
    raise IngestError(f"{name}: expected an array, got {type(value).__name__}")


def _json_or_value(value: Any) -> Any:
    """`input`/`output` may be JSON text of the structure itself."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _time(value: Any, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return parse_time(value, name)
    except QueryError as exc:
        raise IngestError(str(exc)) from None


def _metadata(value: Any, name: str) -> dict[str, str] | None:
    data = _dict(value, name)
    if not data:
        return None
    # values are strings (spec 2.3); anything else is kept as its JSON text
    return {str(k): v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in data.items()}


def usage_of(payload: dict[str, Any]) -> Usage:
    """Token counts from `usage` (OpenAI or Anthropic shape), overridden by the flat fields."""
    raw = _dict(payload.get("usage"), "usage") or {}
    usage = Usage.from_openai(raw)
    prompt = usage.prompt_tokens
    completion = usage.completion_tokens
    cached = usage.cached_tokens
    created = usage.cache_creation_tokens or (_int(raw.get("cache_creation_prompt_tokens"), "usage.cache_creation_prompt_tokens") or 0)
    if not prompt and raw.get("input_tokens") is not None:  # Anthropic: input excludes cache reads and writes
        read = _int(raw.get("cache_read_input_tokens"), "usage.cache_read_input_tokens") or 0
        prompt = (_int(raw.get("input_tokens"), "usage.input_tokens") or 0) + read + created
        cached = cached or read
    if not completion and raw.get("output_tokens") is not None:
        completion = _int(raw.get("output_tokens"), "usage.output_tokens") or 0
    for name in ("prompt_tokens", "completion_tokens", "prompt_cache_hit_tokens", "prompt_cache_creation_tokens"):
        if payload.get(name) is not None:
            value = _int(payload[name], name) or 0
            if name == "prompt_tokens":
                prompt = value
            elif name == "completion_tokens":
                completion = value
            elif name == "prompt_cache_hit_tokens":
                cached = value
            else:
                created = value
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                 cache_creation_tokens=created)


def _flatten_params(payload: dict[str, Any]) -> dict[str, Any]:
    """Fields of the nested `respan_params` / `keywordsai_params` containers fill in what the top
    level does not set (the top level wins)."""
    merged = dict(payload)
    for container in ("respan_params", "keywordsai_params"):
        nested = payload.get(container)
        if nested is None:
            continue
        if not isinstance(nested, dict):
            raise IngestError(f"{container}: expected an object, got {type(nested).__name__}")
        for key, value in nested.items():
            merged.setdefault(key, value)
    return merged


def _messages_from(value: Any) -> list[Any] | None:
    value = _json_or_value(value)
    return value if isinstance(value, list) and all(isinstance(m, dict) for m in value) else None


def _tool_calls(record: LogRecord) -> list[Any] | None:
    """Tool calls from the completion message, or from a full_response's first choice."""
    message = record.completion_message
    if isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
        return message["tool_calls"] or None
    response = record.full_response
    if isinstance(response, dict):
        choices = response.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            msg = choices[0].get("message")
            if isinstance(msg, dict) and isinstance(msg.get("tool_calls"), list):
                return msg["tool_calls"] or None
    return None


PriceLookup = Callable[[str], Prices | None]


def to_record(payload: Any, key: KeyInfo | None, prices: PriceLookup, *, where: str = "",
              log_method: str = "logging_api", now: float | None = None) -> LogRecord:
    """One payload -> LogRecord. `where` prefixes field names in errors (e.g. '[3].' for a span)."""
    try:
        return _to_record(payload, key, prices, log_method, time.time() if now is None else now)
    except IngestError as exc:
        raise IngestError(f"{where}{exc}") from None


def _to_record(payload: Any, key: KeyInfo | None, prices: PriceLookup, log_method: str, now: float) -> LogRecord:
    if not isinstance(payload, dict):
        raise IngestError(f"expected a log object, got {type(payload).__name__}")
    p = _flatten_params(payload)
    log_type = _str(p.get("log_type"), "log_type") or "chat"
    log_type = LOG_TYPE_ALIASES.get(log_type, log_type)
    if log_type not in LOG_TYPES:
        raise IngestError(f"log_type: unknown type {log_type!r}; expected one of {', '.join(sorted(LOG_TYPES))}")
    method = _str(p.get("log_method"), "log_method")
    unique_id = _str(p.get("unique_id"), "unique_id", 255) or new_id()
    latency = _number(p.get("latency"), "latency")
    if latency is None:
        latency = _number(p.get("generation_time"), "generation_time")
    ttft = _number(p.get("time_to_first_token"), "time_to_first_token")
    if ttft is None:
        ttft = _number(p.get("ttft"), "ttft")
    end = _time(p.get("timestamp"), "timestamp") or now
    start = _time(p.get("start_time"), "start_time")
    if start is None:
        start = end - (latency or 0.0)
    if latency is None:
        latency = max(end - start, 0.0)
    usage = usage_of(p)
    customer_params = _dict(p.get("customer_params"), "customer_params")
    customer = p.get("customer_identifier")
    if customer is None and customer_params:
        customer = customer_params.get("customer_identifier")
    status_code = _int(p.get("status_code"), "status_code")
    error_message = _str(p.get("error_message"), "error_message") or ""
    status = _str(p.get("status"), "status")
    if status is not None and status not in ("success", "error"):
        raise IngestError(f"status: expected 'success' or 'error', got {status!r}")
    if status_code is None:
        status_code = 500 if status == "error" else 200
    if status is None:
        status = "error" if status_code >= 400 or error_message else "success"
    prompt = _dict(p.get("prompt"), "prompt") or {}
    response_format = p.get("response_format")
    if isinstance(response_format, str):
        response_format = {"type": response_format}
    thread = p.get("thread_identifier")
    if thread is None:
        thread = p.get("session_identifier")
    warnings = p.get("warnings")
    if warnings is not None and not isinstance(warnings, str | dict | list):
        raise IngestError("warnings: expected a string or an object")
    record = LogRecord(
        unique_id=unique_id,
        gateway_request_id=_str(p.get("gateway_request_id"), "gateway_request_id"),
        log_type=log_type,
        log_method=method if method in LOG_METHODS else log_method,
        start_time=start,
        timestamp=end,
        request_url_path=_str(p.get("request_url_path"), "request_url_path"),
        model=_str(p.get("model"), "model"),
        model_requested=_str(p.get("model_requested"), "model_requested"),
        provider_id=_str(p.get("provider_id"), "provider_id"),
        deployment_name=_str(p.get("deployment_name"), "deployment_name"),
        used_custom_credential=bool(_bool(p.get("used_custom_credential"), "used_custom_credential")),
        status_code=status_code,
        status=status,
        error_message=error_message,
        warnings=warnings,
        attempts=_list(p.get("attempts"), "attempts"),
        fallback=bool(_bool(p.get("fallback"), "fallback")),
        load_balance_group_id=_str(p.get("load_balance_group_id"), "load_balance_group_id"),
        stream=bool(_bool(p.get("stream"), "stream")),
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_request_tokens=usage.total_tokens,
        prompt_cache_hit_tokens=usage.cached_tokens,
        prompt_cache_creation_tokens=usage.cache_creation_tokens,
        latency=latency,
        time_to_first_token=ttft,
        routing_time=_number(p.get("routing_time"), "routing_time") or 0.0,
        tokens_per_second=_number(p.get("tokens_per_second"), "tokens_per_second"),
        cache_hit=bool(_bool(p.get("cache_hit"), "cache_hit")),
        customer_identifier=_str(customer, "customer_identifier", IDENTIFIER_MAX),
        customer_params=customer_params,
        customer_email=_str(p.get("customer_email") or (customer_params or {}).get("email"), "customer_email"),
        customer_name=_str(p.get("customer_name") or (customer_params or {}).get("name"), "customer_name"),
        thread_identifier=_str(thread, "thread_identifier", IDENTIFIER_MAX),
        custom_identifier=_str(p.get("custom_identifier"), "custom_identifier", IDENTIFIER_MAX),
        group_identifier=_str(p.get("group_identifier"), "group_identifier", IDENTIFIER_MAX),
        trace_group_identifier=_str(p.get("trace_group_identifier"), "trace_group_identifier", IDENTIFIER_MAX),
        evaluation_identifier=_str(p.get("evaluation_identifier"), "evaluation_identifier", IDENTIFIER_MAX),
        trace_unique_id=_str(p.get("trace_unique_id"), "trace_unique_id", 255),
        trace_name=_str(p.get("trace_name"), "trace_name", SPAN_NAME_MAX),
        span_unique_id=_str(p.get("span_unique_id"), "span_unique_id", 255),
        span_name=_str(p.get("span_name"), "span_name", SPAN_NAME_MAX),
        span_parent_id=_str(p.get("span_parent_id"), "span_parent_id", 255),
        span_workflow_name=_str(p.get("span_workflow_name"), "span_workflow_name", SPAN_NAME_MAX),
        span_path=_str(p.get("span_path"), "span_path"),
        span_handoffs=_list(p.get("span_handoffs"), "span_handoffs"),
        span_tools=_list(p.get("span_tools"), "span_tools"),
        prompt_id=_str(p.get("prompt_id") or prompt.get("prompt_id"), "prompt_id"),
        prompt_name=_str(p.get("prompt_name"), "prompt_name"),
        prompt_version_number=_int(p.get("prompt_version_number"), "prompt_version_number"),
        variables=_dict(p.get("variables") or prompt.get("variables"), "variables"),
        metadata=_metadata(p.get("metadata"), "metadata"),
        properties=_dict(p.get("properties"), "properties"),
        key_name=_str(p.get("key_name"), "key_name") or (key.name if key else None),
        environment=key.environment if key else _str(p.get("environment"), "environment"),
        ip_address=_str(p.get("ip_address"), "ip_address"),
        limit_info=_dict(p.get("limit_info"), "limit_info"),
        note=_str(p.get("note"), "note"),
        positive_feedback=_bool(p.get("positive_feedback"), "positive_feedback"),
        full_request=_dict(p.get("full_request"), "full_request"),
        full_response=p.get("full_response"),
        reasoning=_list(p.get("reasoning"), "reasoning"),
        ideal_output=_str(p.get("ideal_output"), "ideal_output"),
        completion_messages=_list(p.get("completion_messages"), "completion_messages"),
        tools=_list(p.get("tools"), "tools"),
        tool_calls=_list(p.get("tool_calls"), "tool_calls"),
        temperature=_number(p.get("temperature"), "temperature"),
        max_tokens=_int(p.get("max_tokens"), "max_tokens"),
        top_p=_number(p.get("top_p"), "top_p"),
        frequency_penalty=_number(p.get("frequency_penalty"), "frequency_penalty"),
        presence_penalty=_number(p.get("presence_penalty"), "presence_penalty"),
        n=_int(p.get("n"), "n"),
        stop=p.get("stop"),
        tool_choice=p.get("tool_choice"),
        response_format=response_format,
        reasoning_effort=_str(p.get("reasoning_effort"), "reasoning_effort"),
    )
    _content(record, p)
    _cost(record, p, usage, prices)
    if record.tokens_per_second is None:
        record.tokens_per_second = tokens_per_second(record.completion_tokens, record.latency,
                                                     record.time_to_first_token)
    if p.get("disable_log") is True:
        for name in CONTENT_FIELDS:
            setattr(record, name, None)
    return record


def _content(record: LogRecord, p: dict[str, Any]) -> None:
    """prompt_messages / completion_message for chat types (from `input`/`output` when only those
    came), `input`/`output` as given for the others."""
    messages = p.get("prompt_messages")
    if messages is None:
        messages = p.get("messages")
    record.prompt_messages = _list(messages, "prompt_messages")
    completion = _dict(p.get("completion_message"), "completion_message")
    given_input = _json_or_value(p.get("input"))
    given_output = _json_or_value(p.get("output"))
    if record.log_type in CHAT_TYPES:
        if record.prompt_messages is None:
            record.prompt_messages = _messages_from(given_input)
            if record.prompt_messages is None and isinstance(given_input, str):
                record.prompt_messages = [{"role": "user", "content": given_input}]
        if completion is None:
            if isinstance(given_output, dict):
                completion = given_output
            elif isinstance(given_output, str):
                completion = {"role": "assistant", "content": given_output}
            elif isinstance(given_output, list) and given_output and isinstance(given_output[0], dict):
                completion = given_output[0]
                if len(given_output) > 1 and record.completion_messages is None:
                    record.completion_messages = given_output
        record.completion_message = completion
        if record.prompt_messages is None and given_input is not None:
            record.input = given_input
        if record.completion_message is None and given_output is not None:
            record.output = given_output
    else:
        record.input = given_input
        record.output = given_output
        record.completion_message = completion
    if record.tools is None and record.full_request and isinstance(record.full_request.get("tools"), list):
        record.tools = record.full_request["tools"]
    if record.tool_calls is None:
        record.tool_calls = _tool_calls(record)


def _cost(record: LogRecord, p: dict[str, Any], usage: Usage, prices: PriceLookup) -> None:
    given = _number(p.get("cost"), "cost")
    if given is not None:
        record.cost = given
        return
    prompt_price = _number(p.get("prompt_unit_price"), "prompt_unit_price")
    completion_price = _number(p.get("completion_unit_price"), "completion_unit_price")
    if prompt_price is not None or completion_price is not None:
        record.cost = Prices(input=prompt_price or 0.0, output=completion_price or 0.0).cost(usage)
        return
    found = prices(record.model) if record.model else None
    if found is not None:
        record.cost = found.cost(usage)


def spans_of(body: Any) -> list[Any]:
    """A traces-ingest body: an array of spans, or {"data": [...]}."""
    if isinstance(body, dict) and "data" in body:
        body = body["data"]
    if not isinstance(body, list):
        raise IngestError("expected a JSON array of spans, or {\"data\": [...]}")
    if len(body) > MAX_BATCH:
        raise IngestError(f"at most {MAX_BATCH} spans per request, got {len(body)}")
    return body


def create_response(record: LogRecord) -> dict[str, Any]:
    """The CreateSpanResponse of spec 2.3."""
    return {"id": record.unique_id, "unique_id": record.unique_id, "organization_id": None,
            "customer_identifier": record.customer_identifier, "status": record.status, "cost": record.cost,
            "timestamp": iso(record.timestamp), "environment": record.environment, "latency": record.latency,
            "time_to_first_token": record.time_to_first_token,
            "prompt_cache_creation_tokens": record.prompt_cache_creation_tokens,
            "prompt_cache_hit_tokens": record.prompt_cache_hit_tokens, "message": "log successful"}
