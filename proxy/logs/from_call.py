"""Turn a finished Call into its LogRecord."""

from __future__ import annotations

import time
from typing import Any

import orjson

from proxy.call import Call
from proxy.logs.record import LogRecord, tokens_per_second
from proxy.sse_gemini import prompt_messages as gemini_prompt_messages

# Call.endpoint -> log_type (spec 2.3)
LOG_TYPES = {"chat": "chat", "embeddings": "embedding", "anthropic.messages": "chat",
             "anthropic.count_tokens": "count_tokens", "responses": "response",
             "gemini.generateContent": "chat", "gemini.streamGenerateContent": "chat",
             "gemini.countTokens": "count_tokens", "gemini.embedContent": "embedding",
             "gemini.batchEmbedContents": "embedding"}


def record_for(call: Call) -> LogRecord:
    params = call.params
    latency = call.elapsed()
    usage = call.usage
    target = call.target
    metadata = params.metadata
    if params.extra:  # unknown respan_params keys land in metadata, as the exporters expect
        # stored as strings the way `metadata` values are (JSON text, never a Python repr)
        extra = {str(k): v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in params.extra.items()}
        metadata = {**extra, **(metadata or {})}
    record = LogRecord(
        unique_id=call.id,
        gateway_request_id=call.request_id,
        log_type=LOG_TYPES.get(call.endpoint, "unknown"),  # the path is in request_url_path
        start_time=call.started_at,
        timestamp=time.time(),
        request_url_path=call.path,
        model=call.response_model or (target.model if target else None) or call.model or None,
        model_requested=call.model or None,
        provider_id=target.provider if target else None,
        deployment_name=target.deployment if target else None,
        used_custom_credential=bool(target and target.custom_credential),
        status_code=call.status_code,
        status="success" if call.status_code < 400 and not call.error else "error",
        error_message=call.error or "",
        stream=call.stream,
        warnings=call.warnings or None,
        attempts=call.attempts if len(call.attempts) > 1 else None,
        fallback=len({(a.provider, a.model) for a in call.attempts}) > 1,
        load_balance_group_id=target.group_id if target else None,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_request_tokens=usage.total_tokens,
        prompt_cache_hit_tokens=usage.cached_tokens,
        prompt_cache_creation_tokens=usage.cache_creation_tokens,
        cost=call.cost,
        latency=latency,
        time_to_first_token=call.ttft,
        routing_time=call.routing_time,
        tokens_per_second=tokens_per_second(usage.completion_tokens, latency, call.ttft),
        customer_identifier=params.customer(),
        customer_params=params.customer_params,
        thread_identifier=params.thread_identifier,
        custom_identifier=params.custom_identifier,
        group_identifier=params.group_identifier,
        trace_unique_id=params.trace_unique_id,
        span_name=params.span_name,
        span_parent_id=params.span_parent_id,
        span_workflow_name=params.span_workflow_name,
        metadata=metadata,
        properties=params.properties,
        key_name=call.key.name if call.key else None,
        environment=call.key.environment if call.key else None,
        ip_address=call.client_ip,
        cache_hit=call.cache_hit,
        limit_info=call.state.get("limit_info"),
        temperature=_number(call.body.get("temperature")),
        max_tokens=_int(call.body.get("max_tokens") or call.body.get("max_completion_tokens")
                        or call.body.get("max_output_tokens")),
    )
    prompt = call.state.get("prompt")
    if prompt is not None:  # set by the prompts stage
        record.prompt_id = prompt.get("prompt_id")
        record.prompt_name = prompt.get("prompt_name")
        record.prompt_version_number = prompt.get("prompt_version_number")
        if not params.disable_log:
            record.variables = prompt.get("variables")
    body = call.body
    if len(body) > 3:  # sampling params echoed for filtering (spec 2.3 "config echo"), when sent
        record.top_p = _number(body.get("top_p"))
        record.frequency_penalty = _number(body.get("frequency_penalty"))
        record.presence_penalty = _number(body.get("presence_penalty"))
        record.n = _int(body.get("n"))
        record.stop = body.get("stop")
        record.tool_choice = body.get("tool_choice")
        record.response_format = body.get("response_format")
        effort = body.get("reasoning_effort")
        record.reasoning_effort = effort if isinstance(effort, str) else None
    if not params.disable_log and record.log_type == "embedding":
        # The prompt is the `input`, logged in full_request (the provider params: model, input,
        # encoding_format, dimensions, user); there are no messages. The vectors are never
        # stored: account_body keeps only the usage of an embeddings answer.
        record.full_request = dict(call.body)
    elif not params.disable_log:
        body = call.body
        record.prompt_messages = body.get("messages") if isinstance(body.get("messages"), list) else None
        if call.endpoint == "responses":  # the prompt is `input` (a string, or a list of items)
            record.prompt_messages = _responses_prompt(body)
        if call.client_format == "anthropic" and record.prompt_messages is not None and body.get("system"):
            record.prompt_messages = [{"role": "system", "content": body["system"]}, *record.prompt_messages]
        elif call.client_format == "gemini":
            record.prompt_messages = gemini_prompt_messages(body)
        record.tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        completion: Any = call.completion
        if isinstance(completion, list):
            if len(completion) == 1:
                record.completion_message = completion[0]
            elif completion:
                record.completion_message = completion[0]
                record.completion_messages = completion
            calls = [tc for m in completion if isinstance(m, dict) for tc in (m.get("tool_calls") or [])]
            record.tool_calls = calls or None
    return record


def _responses_prompt(body: dict[str, Any]) -> list[Any] | None:
    value = body.get("input")
    items: list[Any] = [{"role": "user", "content": value}] if isinstance(value, str) else (
        list(value) if isinstance(value, list) else [])
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        items.insert(0, {"role": "system", "content": body["instructions"]})
    return items or None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
