"""Log queries over a million rows, on SQLite and on PostgreSQL, through the real log stores.

    .venv/bin/python benchmarks/logs_query.py                  # 1,000,000 rows, about 5 minutes
    .venv/bin/python benchmarks/logs_query.py --rows 100000    # smaller and quicker
    .venv/bin/python benchmarks/logs_query.py --keep           # keep both databases ...
    .venv/bin/python benchmarks/logs_query.py --reuse          # ... and time them again without refilling

Fills a SQLite file and a throwaway PostgreSQL database (on --pg, default the shared server on
127.0.0.1:5432) with the same rows: 24 hours of chat logs, about 200 customers of very different
sizes, 10 models, errors, streams, cache hits, metadata on about a third of the rows. Tables and
indexes are the sinks' own (SQLiteSink's connect, PostgresSink.open); rows go in by bulk insert
(executemany, COPY), then PostgreSQL is VACUUM ANALYZEd as autovacuum would. SQLite gets no
ANALYZE: the gateway never runs one.

Each query runs through SQLiteLogStore / PostgresLogStore as the API would call it, once to warm
up and then --runs times; the table shows the median in ms. Plans (EXPLAIN QUERY PLAN, and
EXPLAIN ANALYZE for PostgreSQL) of every query go into the JSON with the timings:
benchmarks/results/logs_query.json. A what-if section then times the changes the plans suggest
(a capped list count, COUNT(DISTINCT) as a DISTINCT subquery, PostgreSQL's JIT) on the same data.

The machine is shared: the load average before and after is printed and saved with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.logs import sql  # noqa: E402
from proxy.logs.query import LogQuery, condition, parse_query  # noqa: E402
from proxy.logs.record import LogRecord  # noqa: E402
from proxy.logs.schema import COLUMNS, TABLE, row_of  # noqa: E402
from proxy.logs.sinks.postgres import PostgresSink  # noqa: E402
from proxy.logs.sinks.sqlite import connect  # noqa: E402
from proxy.logs.stores.postgres import PostgresLogStore  # noqa: E402
from proxy.logs.stores.sqlite import SQLiteLogStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DAY = 86400.0
DB_NAME = "llmrelay_bench_logs"
POSITION = {name: i for i, name in enumerate(COLUMNS)}

# model -> (provider, $ per 1M input tokens, $ per 1M output tokens, share of traffic)
MODELS = {
    "gpt-4o-mini": ("openai", 0.15, 0.6, 30),
    "gpt-4o": ("openai", 2.5, 10.0, 15),
    "gpt-4.1": ("openai", 2.0, 8.0, 8),
    "o3-mini": ("openai", 1.1, 4.4, 5),
    "claude-3-5-sonnet": ("anthropic", 3.0, 15.0, 12),
    "claude-3-5-haiku": ("anthropic", 0.8, 4.0, 10),
    "gemini-1.5-flash": ("gemini", 0.075, 0.3, 9),
    "gemini-1.5-pro": ("gemini", 1.25, 5.0, 4),
    "mistral-large": ("mistral", 2.0, 6.0, 4),
    "llama-3.1-70b": ("groq", 0.59, 0.79, 3),
}
TEAMS = ("search", "support", "billing", "growth", "infra", "mobile", "web", "data")
PROMPTS = ("Summarize this ticket for the on-call engineer.", "Translate the paragraph into French.",
           "Write a SQL query that counts orders per day.", "What is the capital of Australia?",
           "Explain the difference between TCP and UDP in two sentences.", "Draft a polite reminder email.")
ANSWERS = ("Here is a short summary of the ticket: the customer cannot log in since the last release.",
           "Voici le paragraphe traduit en français, avec les termes techniques conservés.",
           "SELECT date(created_at) AS day, COUNT(*) FROM orders GROUP BY day ORDER BY day;",
           "The capital of Australia is Canberra.", "TCP is connection-oriented and reliable; UDP is not.",
           "Hi Sam, just a friendly reminder about the invoice due on Friday. Thanks!")


# -- the rows ------------------------------------------------------------------------------------


def generate(rows: int, now: float, seed: int = 7) -> Any:
    """`rows` rows in COLUMNS order (JSON columns as text), oldest first, over the day before `now`."""
    rng = random.Random(seed)
    template = row_of(LogRecord(unique_id="", start_time=0.0, timestamp=0.0, request_url_path="/api/chat/completions",
                                log_method="inference"))
    models = list(MODELS)
    model_weights = [MODELS[m][3] for m in models]
    customers = [f"customer-{k:03d}" for k in range(200)]
    customer_weights = [1 / (k + 1) ** 0.9 for k in range(200)]  # a few big customers, a long tail
    keys = ["prod-backend", "prod-mobile", "staging", "batch-jobs", "analytics"]
    system = {"role": "system", "content": "You are a helpful assistant for an online store."}
    p = POSITION
    for i in range(rows):
        row = list(template)
        model = rng.choices(models, model_weights)[0]
        provider, price_in, price_out, _ = MODELS[model]
        latency = min(rng.lognormvariate(0.0, 0.6), 120.0)
        timestamp = now - DAY + (i + rng.random()) * DAY / rows
        prompt_tokens = int(min(rng.lognormvariate(6.0, 1.0), 100_000))
        completion_tokens = int(min(rng.lognormvariate(5.0, 0.8), 8_000))
        stream = rng.random() < 0.6
        cache_hit = rng.random() < 0.05
        failed = rng.random() < 0.03
        row[p["unique_id"]] = f"{rng.getrandbits(128):032x}"
        row[p["gateway_request_id"]] = row[p["unique_id"]]
        row[p["timestamp"]] = timestamp
        row[p["start_time"]] = timestamp - latency
        row[p["model"]] = row[p["model_requested"]] = model
        row[p["provider_id"]] = provider
        row[p["stream"]] = stream
        row[p["cache_hit"]] = cache_hit
        row[p["latency"]] = latency
        row[p["routing_time"]] = rng.uniform(0.0001, 0.002)
        if failed:
            row[p["status_code"]] = rng.choice((429, 500, 502, 400))
            row[p["status"]] = "error"
            row[p["error_message"]] = "upstream error"
        else:
            row[p["prompt_tokens"]] = prompt_tokens
            row[p["completion_tokens"]] = completion_tokens
            row[p["total_request_tokens"]] = prompt_tokens + completion_tokens
            row[p["cost"]] = 0.0 if cache_hit else round((prompt_tokens * price_in + completion_tokens * price_out)
                                                         / 1e6, 8)
            if stream:
                row[p["time_to_first_token"]] = latency * rng.uniform(0.1, 0.4)
            row[p["tokens_per_second"]] = completion_tokens / latency
            row[p["completion_message"]] = orjson.dumps({"role": "assistant", "content": rng.choice(ANSWERS)}).decode()
        if rng.random() < 0.9:
            row[p["customer_identifier"]] = rng.choices(customers, customer_weights)[0]
        if rng.random() < 0.4:
            row[p["thread_identifier"]] = f"thread-{rng.randrange(50_000)}"
        if rng.random() < 0.33:
            row[p["metadata"]] = orjson.dumps({"team": rng.choice(TEAMS), "feature": f"feature-{rng.randrange(20)}",
                                               "env": rng.choice(("prod", "staging"))}).decode()
        row[p["key_name"]] = rng.choice(keys)
        row[p["environment"]] = "test" if rng.random() < 0.05 else "production"
        row[p["prompt_messages"]] = orjson.dumps(
            [system, {"role": "user", "content": f"Request {i}: {rng.choice(PROMPTS)}"}]).decode()
        row[p["temperature"]] = rng.choice((None, 0.0, 0.7, 1.0))
        yield row


def chunks(rows: Any, size: int) -> Any:
    chunk: list[list[Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def fill_sqlite(path: Path, rows: int, now: float) -> float:
    started = time.perf_counter()
    conn = connect(str(path))  # the sink's table and indexes
    conn.execute("PRAGMA synchronous=OFF")
    insert = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    for chunk in chunks(generate(rows, now), 50_000):
        with conn:
            conn.executemany(insert, chunk)
    conn.close()
    return time.perf_counter() - started


async def fill_postgres(dsn: str, rows: int, now: float) -> float:
    started = time.perf_counter()
    sink = PostgresSink(dsn)
    await sink.open()  # the sink's table and indexes
    await sink.close()
    conn = await asyncpg.connect(dsn)
    try:
        for chunk in chunks(generate(rows, now), 50_000):
            await conn.copy_records_to_table(TABLE, records=chunk, columns=COLUMNS)
        await conn.execute(f"VACUUM ANALYZE {TABLE}")
    finally:
        await conn.close()
    return time.perf_counter() - started


# -- the queries ---------------------------------------------------------------------------------


def cases(now: float, top_customer: str) -> list[tuple[str, str, Callable[[], tuple[Any, ...]]]]:
    """(name, store method, () -> args): what the API runs for each."""
    day = {"start_time": str(now - DAY), "end_time": str(now)}

    def q(params: dict[str, str] | None = None, body: dict[str, Any] | None = None) -> LogQuery:
        return parse_query({**day, **(params or {})}, body, now=now)

    def users() -> LogQuery:
        query = q()
        query.all_of.append(condition("customer_identifier", "isnull", [False], where="customer_identifier"))
        return query

    return [
        ("list: default (24 h, -timestamp)", "list", lambda: (q(),)),
        ("list: customer", "list", lambda: (q({"customer_identifier": top_customer}),)),
        ("list: small customer", "list", lambda: (q({"customer_identifier": "customer-150"}),)),
        ("list: metadata__team", "list", lambda: (q({"metadata__team": "billing"}),)),
        ("list: cost range", "list", lambda: (q(body={"filters": {"cost": [
            {"operator": "gte", "value": 0.01}, {"operator": "lt", "value": 0.02}]}}),)),
        ("list: cost OR failed", "list", lambda: (q(body={"operator": "OR", "filters": {
            "cost": {"operator": "gte", "value": 0.05}, "status_code": {"operator": "gte", "value": 500}}}),)),
        ("list: page 100", "list", lambda: (q({"page": "100"}),)),
        ("summary (24 h)", "summary", lambda: (q(),)),
        ("users: top 50 by cost + count", "users", lambda: (users(),)),
        ("percentiles (24 h)", "percentiles", lambda: (q(),)),
        ("dashboard series (15 min buckets)", "series", lambda: (q(),)),
    ]


async def call(store: Any, method: str, args: tuple[Any, ...]) -> Any:
    if method == "users":  # GET /api/users/: a page of groups and their count
        query = args[0]
        groups = await store.groups(query, "customer_identifier", limit=50, order="total_cost DESC, grp ASC")
        return groups, await store.count_groups(query, "customer_identifier")
    if method == "series":  # GET /api/dashboard/stats/: one point per bucket
        return await store.groups(args[0], sql.bucket_expr(store.dialect, 900), limit=1000, order="grp ASC")
    return await getattr(store, method)(*args)


def statements(method: str, query: LogQuery, dialect: sql.Dialect) -> list[tuple[str, list[Any]]]:
    """The SQL a store method runs, for EXPLAIN."""
    if method == "list":
        page, count, args = sql.list_sql(query, dialect)
        return [(page, args), (count, args[:-2])]
    if method == "summary":
        return [sql.summary_sql(query, dialect)]
    if method == "percentiles":
        return [sql.percentiles_sql(query, dialect)]
    if method == "users":
        return [sql.grouped_sql(query, dialect, "customer_identifier", limit=50, order="total_cost DESC, grp ASC"),
                sql.count_groups_sql(query, dialect, "customer_identifier")]
    return [sql.grouped_sql(query, dialect, sql.bucket_expr(dialect, 900), limit=1000, order="grp ASC")]


async def timings(store: Any, method: str, make: Callable[[], tuple[Any, ...]], runs: int) -> dict[str, Any]:
    result = await call(store, method, make())  # warm-up (and the pages' caches)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await call(store, method, make())
        times.append((time.perf_counter() - started) * 1000)
    count = result[0] if method == "list" else result.get("number_of_requests") if method == "summary" else None
    return {"median_ms": round(statistics.median(times), 1), "runs_ms": [round(t, 1) for t in times], "count": count}


def explain_sqlite(path: Path, method: str, query: LogQuery) -> list[str]:
    conn = sqlite3.connect(str(path))
    try:
        plans = []
        for statement, args in statements(method, query, sql.SQLITE):
            rows = conn.execute(f"EXPLAIN QUERY PLAN {statement}", args).fetchall()
            plans.append("\n".join(row[-1] for row in rows))
        return plans
    finally:
        conn.close()


async def explain_postgres(dsn: str, method: str, query: LogQuery) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        plans = []
        for statement, args in statements(method, query, sql.POSTGRES):
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", *args)
            plans.append("\n".join(r[0] for r in rows))
        return plans
    finally:
        await conn.close()


# -- what-ifs: the changes the results suggest, timed on the same databases ----------------------


def _capped(count: str, cap: int) -> str:
    """A count that stops at cap + 1 matches (the API would say "more than cap")."""
    return count.replace(f"SELECT COUNT(*) FROM {TABLE}", f"SELECT COUNT(*) FROM (SELECT 1 FROM {TABLE}", 1) + \
        f" LIMIT {cap + 1}) AS matches"


def _distinct(count: str) -> str:
    """COUNT(DISTINCT x) as a count of a DISTINCT subquery, which PostgreSQL can hash and parallelize."""
    head = f"SELECT COUNT(DISTINCT customer_identifier) FROM {TABLE}"
    return count.replace(head, f"SELECT COUNT(*) FROM (SELECT DISTINCT customer_identifier FROM {TABLE}", 1) + \
        ") AS groups"


def experiments(now: float) -> list[tuple[str, str, list[Any], str, list[Any], dict[str, str]]]:
    """(name, current SQL, args, alternative SQL, args, PostgreSQL session settings for the
    alternative) per dialect."""
    day = {"start_time": str(now - DAY), "end_time": str(now)}
    out = []
    for dialect in (sql.SQLITE, sql.POSTGRES):
        users = parse_query(day, None, now=now)
        users.all_of.append(condition("customer_identifier", "isnull", [False], where="customer_identifier"))
        count, args = sql.count_groups_sql(users, dialect, "customer_identifier")
        out.append((dialect.name, "users count: COUNT(DISTINCT) -> COUNT(*) of SELECT DISTINCT", count, args,
                    _distinct(count), args, {}))
        for label, params in (("default", {}), ("metadata__team", {"metadata__team": "billing"})):
            _, count, args = sql.list_sql(parse_query({**day, **params}, None, now=now), dialect)
            out.append((dialect.name, f"list count ({label}): exact -> capped at 10,000", count, args[:-2],
                        _capped(count, 10_000), args[:-2], {}))
        if dialect is sql.POSTGRES:
            statement, args = sql.summary_sql(parse_query(day, None, now=now), dialect)
            out.append((dialect.name, "summary: jit on -> off", statement, args, statement, args, {"jit": "off"}))
            statement, args = sql.percentiles_sql(parse_query(day, None, now=now), dialect)
            out.append((dialect.name, "percentiles: jit on -> off", statement, args, statement, args, {"jit": "off"}))
    return out


async def run_experiments(sqlite_path: Path, dsn: str, now: float, runs: int) -> list[dict[str, Any]]:
    lite = sqlite3.connect(str(sqlite_path))
    results = []
    try:
        for engine, name, before, before_args, after, after_args, settings in experiments(now):
            if engine == "sqlite":  # blocking is fine here: nothing else runs
                timings = (_time_sqlite(lite, before, before_args, runs), _time_sqlite(lite, after, after_args, runs))
            else:
                timings = (await _time_postgres(dsn, before, before_args, runs, {}),
                           await _time_postgres(dsn, after, after_args, runs, settings))
            results.append({"engine": engine, "change": name, "before_ms": timings[0], "after_ms": timings[1]})
            print(f"  {engine}: {name}: {timings[0]} -> {timings[1]} ms", flush=True)
    finally:
        lite.close()
    return results


def _time_sqlite(conn: sqlite3.Connection, statement: str, args: list[Any], runs: int) -> float:
    conn.execute(statement, args).fetchall()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        conn.execute(statement, args).fetchall()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


async def _time_postgres(dsn: str, statement: str, args: list[Any], runs: int, settings: dict[str, str]) -> float:
    # the default session of the server (jit included), unless the experiment changes it
    conn = await asyncpg.connect(dsn, server_settings={"jit": "on", **settings})
    try:
        await conn.fetch(statement, *args)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            await conn.fetch(statement, *args)
            times.append((time.perf_counter() - started) * 1000)
        return round(statistics.median(times), 1)
    finally:
        await conn.close()


# -- the run -------------------------------------------------------------------------------------


async def postgres_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT COUNT(*) FROM {TABLE}"))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


async def admin(pg: str, statement: str) -> None:
    conn = await asyncpg.connect(pg)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test",
                        help="a database on the server to use; the benchmark creates its own beside it")
    parser.add_argument("--sqlite", type=Path, default=Path(tempfile.gettempdir()) / "llmrelay-bench-logs.db")
    parser.add_argument("--keep", action="store_true", help="keep both databases")
    parser.add_argument("--reuse", action="store_true", help="time kept databases again (no refill)")
    parser.add_argument("--out", type=Path, default=RESULTS / "logs_query.json")
    parser.add_argument("--no-experiments", action="store_true", help="skip the what-if section")
    args = parser.parse_args()

    server = args.pg.rsplit("/", 1)[0]
    dsn = f"{server}/{DB_NAME}"
    fill: dict[str, float] = {}
    if args.reuse and args.sqlite.exists() and await postgres_rows(dsn) == args.rows:
        conn = sqlite3.connect(str(args.sqlite))
        now = conn.execute(f"SELECT MAX(timestamp) FROM {TABLE}").fetchone()[0] + 1.0
        conn.close()
    else:
        now = time.time()
        for path in (args.sqlite, Path(f"{args.sqlite}-wal"), Path(f"{args.sqlite}-shm")):
            path.unlink(missing_ok=True)
        print(f"filling SQLite ({args.sqlite}) with {args.rows:,} rows ...", flush=True)
        fill["sqlite_s"] = round(fill_sqlite(args.sqlite, args.rows, now), 1)
        print(f"  {fill['sqlite_s']} s\nfilling PostgreSQL ({DB_NAME}) with {args.rows:,} rows ...", flush=True)
        await admin(args.pg, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        await admin(args.pg, f"CREATE DATABASE {DB_NAME}")
        fill["postgres_s"] = round(await fill_postgres(dsn, args.rows, now), 1)
        print(f"  {fill['postgres_s']} s (with VACUUM ANALYZE)", flush=True)

    conn = sqlite3.connect(str(args.sqlite))
    top_customer = conn.execute(f"SELECT customer_identifier FROM {TABLE} WHERE customer_identifier IS NOT NULL "
                                f"GROUP BY 1 ORDER BY COUNT(*) DESC LIMIT 1").fetchone()[0]
    conn.close()
    stores = {"sqlite": SQLiteLogStore(args.sqlite), "postgres": PostgresLogStore(dsn)}
    for store in stores.values():
        await store.open()
    results: list[dict[str, Any]] = []
    what_ifs: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    try:
        for name, method, make in cases(now, top_customer):
            entry: dict[str, Any] = {"query": name}
            for engine, store in stores.items():
                entry[engine] = await timings(store, method, make, args.runs)
            query = make()[0]
            entry["sqlite"]["plan"] = explain_sqlite(args.sqlite, method, query)
            entry["postgres"]["plan"] = await explain_postgres(dsn, method, query)
            results.append(entry)
            print(f"  {name}: sqlite {entry['sqlite']['median_ms']} ms, postgres {entry['postgres']['median_ms']} ms",
                  flush=True)
        if not args.no_experiments:
            print("what-ifs:", flush=True)
            what_ifs = await run_experiments(args.sqlite, dsn, now, args.runs)
    finally:
        for store in stores.values():
            await store.close()
        if not args.keep:
            await admin(args.pg, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
            args.sqlite.unlink(missing_ok=True)

    load = (load_before, os.getloadavg()[0])
    print()
    print(f"{args.rows:,} rows over 24 h; median of {args.runs} runs, ms (matches: rows the list's count found); "
          f"load average {load[0]:.1f} before, {load[1]:.1f} after on {os.cpu_count()} CPUs")
    print()
    print("| query | SQLite ms | PostgreSQL ms | matches |")
    print("|---|---:|---:|---:|")
    for r in results:
        count = r["postgres"]["count"]
        print(f"| {r['query']} | {r['sqlite']['median_ms']} | {r['postgres']['median_ms']} | "
              f"{'' if count is None else f'{count:,}'} |")
    if what_ifs:
        print()
        print("| what if | engine | now ms | then ms |")
        print("|---|---|---:|---:|")
        for w in what_ifs:
            print(f"| {w['change']} | {w['engine']} | {w['before_ms']} | {w['after_ms']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "rows": args.rows, "runs": args.runs,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "sqlite": sqlite3.sqlite_version},
        "load_average": load, "fill_seconds": fill, "results": results, "what_ifs": what_ifs}, indent=1))
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    asyncio.run(main())
