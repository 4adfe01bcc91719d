"""LogRecord: one row per client request, in the field names of the spec's log schema (section 6.1)."""

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
    metadata: dict[str, str] | None = None
    properties: dict[str, Any] | None = None
    key_name: str | None = None  # organization_key__name
    environment: str | None = None
    ip_address: str | None = None
    # content: dropped when disable_log is set
    prompt_messages: list[Any] | None = None
    completion_message: Any = None
    completion_messages: list[Any] | None = None
    tools: list[Any] | None = None
    tool_calls: list[Any] | None = None
    full_request: dict[str, Any] | None = None
    # sampling params echoed for filtering
    temperature: float | None = None
    max_tokens: int | None = None


# Columns that are content: disable_log drops them (spec 3.6).
CONTENT_FIELDS = (
    "prompt_messages",
    "completion_message",
    "completion_messages",
    "tools",
    "tool_calls",
    "full_request",
)

encoder = msgspec.json.Encoder()
decoder = msgspec.json.Decoder(LogRecord)
