"""The log query language of spec 6.3, parsed into a LogQuery that every store compiles to SQL.

Body: `{"filters": {"<field>": {"operator": "<op>", "value": [...]}}, "operator": "AND"|"OR"}`; a
field may also take a list of such conditions (`cost >= 1 AND cost < 5`). URL quick filters:
`?field=value`, or `?field[value]=X&field[operator]=gt&field[connector]=OR`; an unknown key is a
metadata key. Every error is a QueryError naming the field or parameter that was wrong.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec

from proxy.logs.schema import KINDS

OPERATORS = frozenset({"", "eq", "iexact", "lt", "lte", "gt", "gte", "contains", "icontains", "startswith",
                       "endswith", "in", "isnull", "not", "neq"})
# filter or sort name -> column
ALIASES = {"total_tokens": "total_request_tokens", "all_tokens": "total_request_tokens",
           "messages": "prompt_messages", "organization_key__name": "key_name", "id": "unique_id",
           "session_identifier": "thread_identifier", "cached": "cache_hit"}
# names that are not columns but conditions on one
DERIVED = frozenset({"failed", "is_root_span", "is_test"})
SORTABLE = frozenset({"timestamp", "start_time", "cost", "time_to_first_token", "latency", "prompt_tokens",
                      "completion_tokens", "total_request_tokens", "tokens_per_second", "routing_time",
                      "status_code", "model", "customer_identifier"})
SORT_ALIASES = {"id": "timestamp", **{k: v for k, v in ALIASES.items() if k != "id"}}
# query parameters that are not quick filters
RESERVED = frozenset({"start_time", "end_time", "sort_by", "page", "page_size", "include_fields",
                      "fetch_filters", "all_envs", "is_test", "environment", "operator", "format"})
TIME_COLUMNS = frozenset({"timestamp", "start_time"})
DEFAULT_WINDOW = 3600.0  # seconds: the list's default time range ends now and starts an hour ago
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_METADATA_KEY = re.compile(r"^[^\"\\]{1,200}$")


class QueryError(ValueError):
    """Bad query input; the message names the field."""


class Condition(msgspec.Struct, frozen=True):
    column: str  # a LogRecord column, or "metadata" with `key`
    operator: str
    values: tuple[Any, ...]
    key: str | None = None  # metadata__<key>


class LogQuery(msgspec.Struct, kw_only=True):
    conditions: list[Condition] = msgspec.field(default_factory=list)
    connector: str = "AND"  # how `conditions` combine
    all_of: list[Condition] = msgspec.field(default_factory=list)  # always ANDed (URL filters, ranges)
    any_of: list[Condition] = msgspec.field(default_factory=list)  # URL filters with connector OR
    start: float | None = None  # unix seconds, on `timestamp`
    end: float | None = None
    sort_column: str = "timestamp"
    descending: bool = True
    page: int = 1
    page_size: int = DEFAULT_PAGE_SIZE
    include: frozenset[str] | None = None


def parse_time(value: Any, name: str) -> float:
    """Unix seconds from a number, a numeric string or an ISO-8601 / RFC 3339 time (naive is UTC)."""
    if isinstance(value, bool):
        raise QueryError(f"{name}: expected an ISO-8601 time or unix seconds, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T", 1))
        except ValueError:
            raise QueryError(f"{name}: expected an ISO-8601 time or unix seconds, got {value!r}") from None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    raise QueryError(f"{name}: expected an ISO-8601 time or unix seconds, got {value!r}")


def _int_param(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise QueryError(f"{name}: expected an integer, got {value!r}") from None
    if not low <= number <= high:
        raise QueryError(f"{name}: must be between {low} and {high}, got {number}")
    return number


def _coerce(column: str, value: Any, name: str) -> Any:
    """A filter value in its column's type (URL values all arrive as strings)."""
    if column in TIME_COLUMNS:
        return parse_time(value, name)
    kind = KINDS.get(column, "TEXT")
    if kind == "BOOL":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise QueryError(f"{name}: expected true or false, got {value!r}")
    if kind in ("INTEGER", "REAL"):
        if isinstance(value, bool):
            raise QueryError(f"{name}: expected a number, got {value!r}")
        try:
            number = float(value) if kind == "REAL" or "." in str(value) else int(value)
        except (TypeError, ValueError):
            raise QueryError(f"{name}: expected a number, got {value!r}") from None
        return number
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise QueryError(f"{name}: expected a string, got {value!r}")


def condition(field: str, operator: Any, value: Any, *, where: str) -> Condition:
    """One condition on a filter field; `where` names it in errors (e.g. 'filters.cost')."""
    if not isinstance(operator, str) or operator not in OPERATORS:
        raise QueryError(f"{where}.operator: unknown operator {operator!r}; expected one of "
                         f"{', '.join(repr(o) for o in sorted(OPERATORS))}")
    operator = {"eq": "", "neq": "not"}.get(operator, operator)
    values = tuple(value) if isinstance(value, list) else (value,)
    if not values and operator != "isnull":
        raise QueryError(f"{where}.value: needs at least one value")
    if operator in ("lt", "lte", "gt", "gte") and len(values) != 1:
        raise QueryError(f"{where}.value: operator {operator!r} takes exactly one value")
    if field.startswith("metadata__"):
        key = field.removeprefix("metadata__")
        if not _METADATA_KEY.match(key):
            raise QueryError(f"{where}: a metadata key is 1 to 200 characters without quotes or backslashes")
        if operator == "isnull":
            return Condition("metadata", "isnull", (_truthy(values, where),), key)
        return Condition("metadata", operator, tuple(_coerce("metadata", v, f"{where}.value") for v in values), key)
    if field in DERIVED:
        flag = _truthy(values, where) if operator in ("", "isnull", "not") else None
        if flag is None:
            raise QueryError(f"{where}.operator: {field} takes only equality")
        if operator == "not":
            flag = not flag
        if field == "failed":
            return Condition("status", "" if flag else "not", ("error",))
        if field == "is_test":
            return Condition("environment", "" if flag else "not", ("test",))
        return Condition("span_parent_id", "isnull", (flag,))  # is_root_span
    column = ALIASES.get(field, field)
    if column not in KINDS:
        raise QueryError(f"{where}: unknown filter field {field!r}")
    if operator == "isnull":
        return Condition(column, "isnull", (_truthy(values, where),))
    if KINDS[column] == "JSON" and operator not in ("contains", "icontains", "isnull"):
        raise QueryError(f"{where}.operator: {field} holds JSON; use contains, icontains or isnull")
    return Condition(column, operator, tuple(_coerce(column, v, f"{where}.value") for v in values))


def _truthy(values: tuple[Any, ...], where: str) -> bool:
    value = values[0] if values else True
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise QueryError(f"{where}.value: expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


def _body_conditions(filters: Any) -> list[Condition]:
    if filters is None:
        return []
    if not isinstance(filters, dict):
        raise QueryError("filters: expected an object of field -> {operator, value}")
    out: list[Condition] = []
    for field, spec in filters.items():
        specs = spec if isinstance(spec, list) else [spec]
        for i, one in enumerate(specs):
            where = f"filters.{field}" + (f"[{i}]" if isinstance(spec, list) else "")
            if not isinstance(one, dict):
                raise QueryError(f"{where}: expected an object with 'operator' and 'value'")
            unknown = set(one) - {"operator", "value", "display_name", "connector"}
            if unknown:
                raise QueryError(f"{where}: unknown key {sorted(unknown)[0]!r}")
            if "value" not in one and one.get("operator") != "isnull":
                raise QueryError(f"{where}.value: required")
            out.append(condition(field, one.get("operator", ""), one.get("value", []), where=where))
    return out


def _url_conditions(params: Mapping[str, str]) -> tuple[list[Condition], list[Condition]]:
    """Quick filters: (ANDed, ORed). `field[value]`, `field[operator]`, `field[connector]`."""
    grouped: dict[str, dict[str, str]] = {}
    for name, value in params.items():
        field, _, part = name.partition("[")
        if field in RESERVED and not part:
            continue
        part = part.rstrip("]") or "value"
        if part not in ("value", "operator", "connector"):
            raise QueryError(f"{name}: expected {field}[value], {field}[operator] or {field}[connector]")
        grouped.setdefault(field, {})[part] = value
    all_of: list[Condition] = []
    any_of: list[Condition] = []
    for field, parts in grouped.items():
        if "value" not in parts and parts.get("operator") != "isnull":
            raise QueryError(f"{field}[value]: required with {field}[operator]")
        known = field in KINDS or field in ALIASES or field in DERIVED or field.startswith("metadata__")
        name = field if known else f"metadata__{field}"
        one = condition(name, parts.get("operator", ""), parts.get("value", "true"), where=field)
        connector = parts.get("connector", "AND").upper()
        if connector not in ("AND", "OR"):
            raise QueryError(f"{field}[connector]: expected AND or OR, got {parts['connector']!r}")
        (any_of if connector == "OR" else all_of).append(one)
    return all_of, any_of


def parse_query(params: Mapping[str, str], body: Mapping[str, Any] | None = None, *,
                default_window: float | None = DEFAULT_WINDOW, now: float | None = None) -> LogQuery:
    """A LogQuery from a request's query parameters and (for POST) its JSON body. Body values win
    over query parameters of the same name; `default_window` None means no default time range."""
    body = body or {}
    merged: dict[str, Any] = {**params, **{k: v for k, v in body.items() if k not in ("filters", "operator")}}
    unknown_body = set(body) - RESERVED - {"filters", "operator"}
    if unknown_body:
        raise QueryError(f"{sorted(unknown_body)[0]}: unknown field; filters go in 'filters'")
    now = time.time() if now is None else now
    query = LogQuery()
    query.end = parse_time(merged["end_time"], "end_time") if merged.get("end_time") not in (None, "") else (
        now if default_window is not None else None)
    if merged.get("start_time") not in (None, ""):
        query.start = parse_time(merged["start_time"], "start_time")
    elif default_window is not None:
        query.start = (query.end or now) - default_window
    if query.start is not None and query.end is not None and query.start > query.end:
        raise QueryError("start_time: is after end_time")
    operator = body.get("operator", params.get("operator", "AND"))
    if not isinstance(operator, str) or operator.upper() not in ("AND", "OR"):
        raise QueryError(f"operator: expected AND or OR, got {operator!r}")
    query.connector = operator.upper()
    query.conditions = _body_conditions(body.get("filters"))
    query.all_of, query.any_of = _url_conditions(params)
    if merged.get("environment") not in (None, ""):
        query.all_of.append(condition("environment", "", str(merged["environment"]), where="environment"))
    if merged.get("is_test") not in (None, ""):
        query.all_of.append(condition("is_test", "", str(merged["is_test"]), where="is_test"))
    sort_by = merged.get("sort_by") or "-id"
    if not isinstance(sort_by, str):
        raise QueryError(f"sort_by: expected a field name, got {sort_by!r}")
    query.descending = sort_by.startswith("-")
    name = sort_by.lstrip("-+")
    column = SORT_ALIASES.get(name, name)
    if column not in SORTABLE:
        raise QueryError(f"sort_by: cannot sort by {name!r}; sortable: {', '.join(sorted(SORTABLE | {'id'}))}")
    query.sort_column = column
    query.page = _int_param(merged.get("page", 1), "page", 1, 10_000_000)
    query.page_size = _int_param(merged.get("page_size", DEFAULT_PAGE_SIZE), "page_size", 1, MAX_PAGE_SIZE)
    include = merged.get("include_fields")
    if include:
        names = include if isinstance(include, list) else str(include).split(",")
        query.include = frozenset(n.strip() for n in names if str(n).strip()) | {"unique_id", "id"}
    return query
