"""Gateway params: split from the provider params and merged from their three channels.

Precedence (spec 1.2): top-level body fields > `respan_params` (> legacy `keywordsai_params`)
> the `X-Data-Respan-Params` header (base64 JSON, or raw JSON) > `X-Respan-Customer-Identifier`.
The merge is per key: a key given on a higher channel replaces the whole value from a lower one.
Gateway params are never forwarded upstream.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

import msgspec
import orjson

from proxy.egress import header_reason

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
IDENTIFIER_MAX = 254  # spec 3.7 conflict (120 vs 254): we keep 254 characters and truncate beyond


class ParamsError(Exception):
    """A gateway param with the wrong type or value: 422 naming the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Params(msgspec.Struct, kw_only=True, omit_defaults=True):
    pass


class LoadBalanceModel(Params, forbid_unknown_fields=True):
    model: str
    weight: Positive
    credentials: dict[str, Any] | None = None


class LoadBalanceGroup(Params, forbid_unknown_fields=True):
    group_id: str
    models: list[LoadBalanceModel] | None = None


class RetryParams(Params, forbid_unknown_fields=True):
    retry_enabled: bool = True
    num_retries: PositiveInt = 3
    retry_after: Positive = 0.2


class CacheOptions(Params):
    """None: not sent, so the cache stage's configured default applies (option by option)."""

    cache_by_customer: bool | None = None
    is_cached_by_model: bool | None = None
    omit_log: bool | None = None
    omit_logs: bool | None = None  # spelling seen in the docs; either one works


class GatewayParams(Params):
    """Every gateway param of spec section 3. Later stages act on them; the core only carries them."""

    # routing (3.1)
    models: list[str] | None = None
    exclude_models: list[str] | None = None
    exclude_providers: list[str] | None = None
    load_balance_group: LoadBalanceGroup | None = None
    load_balance_models: list[LoadBalanceModel] | None = None
    loadbalance_models: list[LoadBalanceModel] | None = None
    fallback_models: list[str] | None = None
    disable_fallback: bool = False
    model_name_map: dict[str, str] | None = None
    retries: Annotated[int, msgspec.Meta(ge=0)] | None = None
    weight: Positive | None = None
    span_name: str | None = None
    # credentials (3.2)
    credential_override: dict[str, dict[str, Any]] | None = None
    customer_credentials: dict[str, Any] | list[dict[str, Any]] | None = None
    customer_api_keys: dict[str, str] | None = None
    # retries (3.3)
    retry_params: RetryParams | None = None
    # cache (3.4)
    cache_enabled: bool | None = None
    cache_ttl: Annotated[float, msgspec.Meta(gt=0)] | None = None
    cache_options: CacheOptions | None = None
    # prompts (3.5)
    prompt: dict[str, Any] | None = None
    variables: dict[str, Any] | None = None
    # observability and tagging (3.6, 3.7)
    customer_identifier: str | int | None = None
    customer_params: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    properties: dict[str, Any] | None = None
    custom_identifier: str | None = None
    thread_identifier: str | None = None
    group_identifier: str | None = None
    trace_unique_id: str | None = None
    span_parent_id: str | None = None
    span_workflow_name: str | None = None
    trace_group_identifier: str | None = None
    positive_feedback: bool | None = None
    disable_log: bool = False
    request_breakdown: bool = False
    eval_params: dict[str, Any] | None = None
    posthog_integration: dict[str, Any] | None = None
    # request handling
    timeout: Positive | None = None  # seconds for the upstream call
    extra_headers: dict[str, str] | None = None
    field_name: str | None = None
    delimiter: str | None = None
    # respan_params keys we do not know: kept (the log's metadata takes them), never forwarded
    extra: dict[str, Any] | None = None

    def customer(self) -> str | None:
        """The customer id: top-level `customer_identifier`, else `customer_params.customer_identifier`."""
        value = self.customer_identifier
        if value is None and self.customer_params:
            value = self.customer_params.get("customer_identifier")
        if value is None:
            return None
        return str(value)[:IDENTIFIER_MAX]


GATEWAY_KEYS: frozenset[str] = frozenset(GatewayParams.__struct_fields__) - {"extra"}
CONTAINER_KEYS = ("respan_params", "keywordsai_params")
EMPTY = GatewayParams()


def decode_header(value: str, header: str = "X-Data-Respan-Params") -> dict[str, Any]:
    """Base64-encoded JSON (the documented form) or raw JSON (the batch docs' form)."""
    text = value.strip()
    data: Any = None
    if not text.startswith("{"):
        try:
            data = orjson.loads(base64.b64decode(text + "=" * (-len(text) % 4), validate=False))
        except (binascii.Error, orjson.JSONDecodeError, ValueError):
            data = None
    if data is None:
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise ParamsError(header, "expected base64-encoded JSON or a raw JSON object") from None
    if not isinstance(data, dict):
        raise ParamsError(header, f"expected a JSON object, got {type(data).__name__}")
    return data


def split_params(
    body: dict[str, Any],
    header_params: str | None = None,
    customer_header: str | None = None,
) -> GatewayParams:
    """Remove every gateway param from `body` (in place) and return them merged and validated."""
    merged: dict[str, Any] = {}
    if customer_header:
        merged["customer_identifier"] = customer_header
    if header_params:
        merged.update(decode_header(header_params))
    for container in reversed(CONTAINER_KEYS):  # keywordsai_params first, so respan_params wins
        nested = body.pop(container, None)
        if nested is None:
            continue
        if not isinstance(nested, dict):
            raise ParamsError(container, f"expected an object, got {type(nested).__name__}")
        merged.update(nested)
    top = [k for k in body if k in GATEWAY_KEYS]
    for k in top:
        merged[k] = body.pop(k)
    if not merged:
        return EMPTY
    return to_params(merged)


def to_params(merged: dict[str, Any]) -> GatewayParams:
    extra = {k: merged.pop(k) for k in [k for k in merged if k not in GATEWAY_KEYS]}
    for k in CONTAINER_KEYS:
        extra.pop(k, None)
    try:
        params = msgspec.convert(merged, GatewayParams)
    except msgspec.ValidationError as exc:
        message = str(exc)
        field = "respan_params"
        if " - at `$." in message:
            message, _, where = message.rpartition(" - at `$.")
            field = where.rstrip("`")
        raise ParamsError(field, message) from None
    if extra:
        params.extra = extra
    if params.metadata:  # spec 3.6: metadata values are stored as strings
        params.metadata = {str(k): v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in params.metadata.items()}
    if params.extra_headers:
        for name, value in params.extra_headers.items():
            reason = header_reason(name, value)
            if reason is not None:
                shown = "".join(c if " " < c < "\x7f" else "?" for c in name)[:100]
                raise ParamsError(f"extra_headers.{shown}", reason)
    return params
