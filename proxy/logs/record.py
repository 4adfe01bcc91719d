"""LogRecord: one row per client request or ingested span, in the field names of the spec's log
schema (sections 2.3 and 6.1). Gateway logs and ingested logs share it, and every sink stores it."""

from __future__ import annotations

from typing import Any

import msgspec


class LogRecord(msgspec.Struct, kw_only=True):
    unique_id: str
    gateway_request_id: str | None = None
    log_type: str = "chat"
    log_method: str = "inference"
    start_time: float  # unix seconds
    timestamp: float  # unix seconds, end of the request
    request_url_path: str | None = None
    model: str | None = None  # model that served (or "respan/cache" on a cache hit)
    model_requested: str | None = None
    provider_id: str | None = None
    deployment_name: str | None = None
    used_custom_credential: bool = False
    status_code: int = 200
    status: str = "success"  # success | error
    error_message: str = ""
    warnings: Any = None
    attempts: list[Any] | None = None  # every try when more than one: model, provider, deployment, status, error
    fallback: bool = False  # a candidate other than the first one was tried
    load_balance_group_id: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_request_tokens: int = 0
    prompt_cache_hit_tokens: int = 0
    prompt_cache_creation_tokens: int = 0
    cost: float = 0.0
    latency: float = 0.0  # seconds, whole request
    time_to_first_token: float | None = None  # seconds
    routing_time: float = 0.0  # seconds
    tokens_per_second: float | None = None
    cache_hit: bool = False
    customer_identifier: str | None = None
    customer_params: dict[str, Any] | None = None
    thread_identifier: str | None = None
    custom_identifier: str | None = None
    group_identifier: str | None = None
    trace_unique_id: str | None = None
    span_name: str | None = None
    span_parent_id: str | None = None
    span_workflow_name: str | None = None
    span_unique_id: str | None = None
    trace_name: str | None = None
    trace_group_identifier: str | None = None
    span_path: str | None = None
    span_handoffs: list[Any] | None = None
    span_tools: list[Any] | None = None
    evaluation_identifier: str | None = None
    prompt_id: str | None = None
    prompt_name: str | None = None
    prompt_version_number: int | None = None
    variables: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    properties: dict[str, Any] | None = None
    customer_email: str | None = None
    customer_name: str | None = None
    key_name: str | None = None  # organization_key__name
    environment: str | None = None
    ip_address: str | None = None
    limit_info: dict[str, Any] | None = None  # the limit policies that applied, as checked
    # set after the fact (PATCH) and by retention
    note: str | None = None
    positive_feedback: bool | None = None
    is_pinned: bool = False  # exempt from retention
    blurred: bool = False  # retention purged the content fields
    # content: dropped when disable_log is set
    prompt_messages: list[Any] | None = None
    completion_message: Any = None
    completion_messages: list[Any] | None = None
    tools: list[Any] | None = None
    tool_calls: list[Any] | None = None
    full_request: dict[str, Any] | None = None
    full_response: Any = None
    reasoning: list[Any] | None = None
    input: Any = None  # non-chat log types: the universal input (chat keeps prompt_messages)
    output: Any = None  # non-chat log types: the universal output (chat keeps completion_message)
    ideal_output: str | None = None
    # sampling params echoed for filtering
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    n: int | None = None
    stop: Any = None
    tool_choice: Any = None
    response_format: Any = None
    reasoning_effort: str | None = None


# Columns that are content: disable_log drops them (spec 3.6).
CONTENT_FIELDS = (
    "prompt_messages",
    "completion_message",
    "completion_messages",
    "tools",
    "tool_calls",
    "full_request",
    "full_response",
    "reasoning",
    "input",
    "output",
    "ideal_output",
    "variables",
)

def tokens_per_second(completion_tokens: int, latency: float, ttft: float | None) -> float | None:
    """Completion tokens over the generation time (the latency after the first token)."""
    if not completion_tokens:
        return None
    generation = latency - (ttft or 0.0)
    return round(completion_tokens / generation, 3) if generation > 0 else None


encoder = msgspec.json.Encoder()
decoder = msgspec.json.Decoder(LogRecord)
