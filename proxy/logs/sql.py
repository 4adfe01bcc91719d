"""LogQuery -> SQL, for SQLite and PostgreSQL.

Values always go in as numbered parameters (`?N` for SQLite, `$N` for PostgreSQL, both of which
allow a number to be used twice); column names come only from the LogRecord schema.
"""

from __future__ import annotations

from typing import Any

from proxy.logs.query import Condition, LogQuery
from proxy.logs.schema import KINDS, TABLE

# Latency and TTFT histogram edges (seconds) for percentiles computed in one aggregate pass.
PERCENTILE_EDGES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
                    60.0, 120.0, 300.0)


class Dialect:
    name = "sqlite"

    def param(self, n: int) -> str:
        return f"?{n}"

    def json_key(self, column: str, key_param: str) -> str:
        return f"json_extract({column}, {key_param})"

    def key_value(self, key: str) -> str:
        return f'$."{key}"'

    def as_text(self, column: str) -> str:
        return column

    def bool_value(self, value: bool) -> Any:
        return int(value)


class PostgresDialect(Dialect):
    name = "postgres"

    def param(self, n: int) -> str:
        return f"${n}"

    def json_key(self, column: str, key_param: str) -> str:
        return f"({column} ->> {key_param})"

    def key_value(self, key: str) -> str:
        return key

    def as_text(self, column: str) -> str:
        # text operators (contains, iexact, ...) on a number, flag or JSON column: PostgreSQL
        # has no implicit cast to text, unlike SQLite
        return column if KINDS.get(column) == "TEXT" else f"({column})::text"

    def bool_value(self, value: bool) -> Any:
        return value


SQLITE = Dialect()
POSTGRES = PostgresDialect()


class Compiler:
    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.args: list[Any] = []

    def add(self, value: Any) -> str:
        self.args.append(value)
        return self.dialect.param(len(self.args))

    def _value(self, column: str, value: Any) -> Any:
        return self.dialect.bool_value(value) if KINDS.get(column) == "BOOL" else value

    def condition(self, c: Condition) -> str:
        d = self.dialect
        if c.column == "metadata" and c.key is not None:
            column = d.json_key("metadata", self.add(d.key_value(c.key)))
        else:
            column = c.column
        op = c.operator
        if op == "isnull":
            return f"{column} IS NULL" if c.values[0] else f"{column} IS NOT NULL"
        if op in ("", "in"):
            if len(c.values) == 1:
                return f"{column} = {self.add(self._value(c.column, c.values[0]))}"
            return f"{column} IN ({', '.join(self.add(self._value(c.column, v)) for v in c.values)})"
        if op == "not":
            listed = ", ".join(self.add(self._value(c.column, v)) for v in c.values)
            return f"({column} IS NULL OR {column} NOT IN ({listed}))"
        if op in ("lt", "lte", "gt", "gte"):
            symbol = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">="}[op]
            value = c.values[0]
            param = self.add(self._value(c.column, value))
            if isinstance(value, float) and KINDS.get(c.column) == "INTEGER" and self.dialect.name == "postgres":
                param += "::double precision"  # else asyncpg truncates it to the column's bigint
            return f"{column} {symbol} {param}"
        text = d.as_text(column) if column == c.column else column
        parts = []
        for v in c.values:
            p = self.add(str(v))
            if op == "iexact":
                parts.append(f"lower({text}) = lower({p})")
            elif op == "contains":
                parts.append(f"{self._instr(text, p)} > 0")
            elif op == "icontains":
                parts.append(f"{self._instr(f'lower({text})', f'lower({p})')} > 0")
            elif op == "startswith":
                parts.append(f"substr({text}, 1, length({p})) = {p}")
            elif op == "endswith":
                parts.append(f"substr({text}, length({text}) - length({p}) + 1) = {p}")
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def _instr(self, haystack: str, needle: str) -> str:
        return f"strpos({haystack}, {needle})" if self.dialect.name == "postgres" else f"instr({haystack}, {needle})"

    def where(self, query: LogQuery, *, time_column: str = "timestamp") -> str:
        clauses: list[str] = []
        if query.start is not None:
            clauses.append(f"{time_column} >= {self.add(query.start)}")
        if query.end is not None:
            clauses.append(f"{time_column} <= {self.add(query.end)}")
        if query.conditions:
            joined = f" {query.connector} ".join(self.condition(c) for c in query.conditions)
            clauses.append(f"({joined})")
        clauses += [self.condition(c) for c in query.all_of]
        if query.any_of:
            clauses.append("(" + " OR ".join(self.condition(c) for c in query.any_of) + ")")
        return ("WHERE " + " AND ".join(clauses)) if clauses else ""


def order_by(query: LogQuery) -> str:
    direction = "DESC" if query.descending else "ASC"
    # unique_id breaks ties, so that pages never repeat or skip a row
    return f"ORDER BY {query.sort_column} {direction}, unique_id {direction}"


def list_sql(query: LogQuery, dialect: Dialect, columns: str = "*") -> tuple[str, str, list[Any]]:
    """(page SQL, count SQL, args) for the list endpoint."""
    c = Compiler(dialect)
    where = c.where(query)
    limit = c.add(query.page_size)
    offset = c.add((query.page - 1) * query.page_size)
    page = f"SELECT {columns} FROM {TABLE} {where} {order_by(query)} LIMIT {limit} OFFSET {offset}"
    count = f"SELECT COUNT(*) FROM {TABLE} {where}"
    return page, count, c.args


SUMMARY = (
    ("number_of_requests", "COUNT(*)"),
    ("total_cost", "COALESCE(SUM(cost), 0)"),
    ("total_tokens", "COALESCE(SUM(total_request_tokens), 0)"),
    ("total_prompt_tokens", "COALESCE(SUM(prompt_tokens), 0)"),
    ("total_completion_tokens", "COALESCE(SUM(completion_tokens), 0)"),
    ("avg_latency", "AVG(latency)"),
    ("avg_tps", "AVG(tokens_per_second)"),
    ("avg_ttft", "AVG(time_to_first_token)"),
    ("error_count", "COALESCE(SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END), 0)"),
    ("cache_hits", "COALESCE(SUM(CASE WHEN cache_hit THEN 1 ELSE 0 END), 0)"),
)
SUMMARY_COLUMNS = tuple(name for name, _ in SUMMARY)
_SUMMARY_SELECT = ", ".join(f"{expr} AS {name}" for name, expr in SUMMARY)


def summary_sql(query: LogQuery, dialect: Dialect) -> tuple[str, list[Any]]:
    c = Compiler(dialect)
    return f"SELECT {_SUMMARY_SELECT} FROM {TABLE} {c.where(query)}", c.args


def summary_of(row: tuple[Any, ...] | list[Any]) -> dict[str, Any]:
    out = dict(zip(SUMMARY_COLUMNS, row, strict=True))
    for name in ("total_cost", "avg_latency", "avg_tps", "avg_ttft"):
        if out[name] is not None:
            out[name] = float(out[name])
    for name in ("number_of_requests", "total_tokens", "total_prompt_tokens", "total_completion_tokens",
                 "error_count", "cache_hits"):
        out[name] = int(out[name] or 0)
    out["scores"] = {}
    return out


def grouped_sql(query: LogQuery, dialect: Dialect, group: str, *, by: str | None = None, limit: int,
                offset: int = 0, order: str = "total_cost DESC") -> tuple[str, list[Any]]:
    """Summary columns per value of `group` (and of `by`, when given): SQL expressions from code
    (a column, or bucket_expr), never from the client. Columns: grp, grp2, the summary, first/last seen."""
    c = Compiler(dialect)
    where = c.where(query)
    second = by or "NULL"
    groups = "grp, grp2" if by else "grp"
    sql = (f"SELECT {group} AS grp, {second} AS grp2, {_SUMMARY_SELECT}, MIN(timestamp) AS first_seen, "
           f"MAX(timestamp) AS last_seen FROM {TABLE} {where} GROUP BY {groups} ORDER BY {order} "
           f"LIMIT {c.add(limit)} OFFSET {c.add(offset)}")
    return sql, c.args


GROUP_COLUMNS = ("grp", "grp2", *SUMMARY_COLUMNS, "first_seen", "last_seen")


def group_of(row: tuple[Any, ...] | list[Any]) -> dict[str, Any]:
    out = summary_of(row[2:2 + len(SUMMARY_COLUMNS)])
    out["group"] = row[0]
    out["by"] = row[1]
    out["first_seen"] = row[-2]
    out["last_seen"] = row[-1]
    return out


def count_groups_sql(query: LogQuery, dialect: Dialect, group: str) -> tuple[str, list[Any]]:
    c = Compiler(dialect)
    # DISTINCT in a subquery: PostgreSQL hashes it (COUNT(DISTINCT) sorts), about twice as fast
    return (f"SELECT COUNT(*) FROM (SELECT DISTINCT {group} AS grp FROM {TABLE} {c.where(query)}) AS g "
            "WHERE grp IS NOT NULL", c.args)


def bucket_expr(dialect: Dialect, seconds: int) -> str:
    """The start of a row's time bucket, in unix seconds."""
    if dialect.name == "postgres":
        return f"(floor(timestamp / {int(seconds)}) * {int(seconds)})"
    return f"(CAST(timestamp / {int(seconds)} AS INTEGER) * {int(seconds)})"


def percentiles_sql(query: LogQuery, dialect: Dialect) -> tuple[str, list[Any]]:
    """Cumulative counts of latency and TTFT at each PERCENTILE_EDGE, in one pass."""
    c = Compiler(dialect)
    where = c.where(query)
    parts = ["COUNT(latency)", "COUNT(time_to_first_token)"]
    for column in ("latency", "time_to_first_token"):
        parts += [f"COALESCE(SUM(CASE WHEN {column} <= {edge!r} THEN 1 ELSE 0 END), 0)" for edge in PERCENTILE_EDGES]
    return f"SELECT {', '.join(parts)} FROM {TABLE} {where}", c.args


def percentiles_of(row: tuple[Any, ...] | list[Any], quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[str, Any]:
    """{"latency": {"p50": s, ...}, "time_to_first_token": {...}, "counts": {column: n}} by linear
    interpolation in the buckets."""
    n = len(PERCENTILE_EDGES)
    out: dict[str, Any] = {"counts": {"latency": int(row[0] or 0), "time_to_first_token": int(row[1] or 0)}}
    for i, column in enumerate(("latency", "time_to_first_token")):
        total = int(row[i] or 0)
        cumulative = [int(v or 0) for v in row[2 + i * n: 2 + (i + 1) * n]]
        values: dict[str, float | None] = {}
        for q in quantiles:
            values[f"p{round(q * 100):d}"] = _interpolate(cumulative, total, q) if total else None
        out[column] = values
    return out


def _interpolate(cumulative: list[int], total: int, q: float) -> float:
    rank = q * total
    previous_edge, previous_count = 0.0, 0
    for edge, count in zip(PERCENTILE_EDGES, cumulative, strict=True):
        if count >= rank:
            inside = count - previous_count
            fraction = (rank - previous_count) / inside if inside else 1.0
            return round(previous_edge + (edge - previous_edge) * fraction, 4)
        previous_edge, previous_count = edge, count
    return PERCENTILE_EDGES[-1]  # beyond the last edge: reported as the last edge
