"""The log table's columns, derived from LogRecord, and the conversions every store shares:
a LogRecord to a row, and a stored row to the API's JSON shape (spec 6.1)."""

from __future__ import annotations

import types
from datetime import UTC, datetime
from typing import Any, Union, get_args, get_origin

import msgspec
import orjson

from proxy.logs.record import CONTENT_FIELDS, LogRecord

TABLE = "request_logs"
# Index name -> columns. Every query has a time range and most sort by time, so the filters
# used most are indexed together with the timestamp.
INDEXES = {
    "timestamp": ("timestamp",),
    "customer_time": ("customer_identifier", "timestamp"),
    "model_time": ("model", "timestamp"),
    "status_time": ("status_code", "timestamp"),
    "thread_time": ("thread_identifier", "timestamp"),
    "trace": ("trace_unique_id",),
    "custom": ("custom_identifier",),
}

_SCALARS = {str: "TEXT", int: "INTEGER", float: "REAL", bool: "BOOL"}


def _column_kind(tp: Any) -> str:
    """'TEXT' | 'INTEGER' | 'REAL' | 'BOOL' | 'JSON' for one LogRecord field type."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            tp = args[0]
    return _SCALARS.get(tp, "JSON")


FIELDS = msgspec.structs.fields(LogRecord)
COLUMNS = tuple(f.name for f in FIELDS)
KINDS = {f.name: _column_kind(f.type) for f in FIELDS}
JSON_COLUMNS = tuple(name for name in COLUMNS if KINDS[name] == "JSON")
BOOL_COLUMNS = tuple(name for name in COLUMNS if KINDS[name] == "BOOL")
JSON_POSITIONS = tuple(i for i, name in enumerate(COLUMNS) if KINDS[name] == "JSON")
PURGED = CONTENT_FIELDS  # what retention clears (and disable_log never stores)


def dumps(value: Any) -> str:
    # `default` covers msgspec Structs that end up inside Any-typed fields.
    return orjson.dumps(value, default=msgspec.to_builtins).decode()


def row_of(record: LogRecord) -> list[Any]:
    """Column values in COLUMNS order; JSON columns as JSON text."""
    row = list(msgspec.structs.astuple(record))
    for i in JSON_POSITIONS:
        if row[i] is not None:
            row[i] = dumps(row[i])
    return row


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row (JSON columns as text, bools maybe as 0/1) as plain Python values."""
    for name in JSON_COLUMNS:
        value = row.get(name)
        if isinstance(value, str):
            row[name] = orjson.loads(value)
    for name in BOOL_COLUMNS:
        value = row.get(name)
        if value is not None:
            row[name] = bool(value)
    return row


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


CHAT_TYPES = frozenset({"chat", "text", "completion", "generation", "response"})


def api_view(row: dict[str, Any], include: frozenset[str] | None = None) -> dict[str, Any]:
    """A decoded row in the list/detail API's shape: ISO times, the spec's derived and alias
    fields (`id`, `input`/`output`, `failed`, `is_test`, `organization_key__name`, ...)."""
    out = dict(row)
    out["id"] = row["unique_id"]
    out["timestamp"] = iso(row.get("timestamp"))
    out["start_time"] = iso(row.get("start_time"))
    if row.get("log_type") in CHAT_TYPES:
        if out.get("input") is None and row.get("prompt_messages") is not None:
            out["input"] = row["prompt_messages"]
        if out.get("output") is None and row.get("completion_message") is not None:
            out["output"] = row["completion_message"]
    out["failed"] = row.get("status") == "error"
    out["is_test"] = row.get("environment") == "test"
    out["organization_key__name"] = row.get("key_name")
    out["total_tokens"] = row.get("total_request_tokens")
    out["session_identifier"] = row.get("trace_group_identifier") or row.get("thread_identifier")
    out["cached"] = bool(row.get("cache_hit"))
    out["has_tool_calls"] = bool(row.get("tool_calls"))
    out["has_warnings"] = bool(row.get("warnings"))
    if include:
        out = {k: v for k, v in out.items() if k in include}
    return out
