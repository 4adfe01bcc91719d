"""The PostgreSQL log sink and log store, against real PostgreSQL.

Sink and store tests use a fresh database on the shared server (127.0.0.1:5432), dropped at the
end, with one schema per test that changes data (the DSN's search_path picks it). Query results
are checked against the SQLite store, the reference, on the same records. The outage tests run
their own private cluster (tests/pg_instance.py), so that killing it harms nobody.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from proxy.keys import hash_key
from proxy.logs import sql
from proxy.logs.query import LogQuery, parse_query
from proxy.logs.queue import LogQueue
from proxy.logs.record import LogRecord, decoder
from proxy.logs.schema import COLUMNS, INDEXES, PURGED, TABLE
from proxy.logs.sinks import make_sink
from proxy.logs.sinks.postgres import PostgresSink
from proxy.logs.sinks.sqlite import SQLiteSink
from proxy.logs.stores import make_store
from proxy.logs.stores.postgres import PostgresLogStore
from proxy.logs.stores.sqlite import SQLiteLogStore
from proxy.metrics import Metrics
from proxy.settings import LogSink
from tests.conftest import KEY, GatewayProcess
from tests.mock_upstream import free_port
from tests.pg_instance import PgInstance, pg_instance

SHARED = "postgresql://postgres@127.0.0.1:5432/test"
ADMIN = "sk-admin-postgres-logs"
NOW = time.time()
BASE = NOW - 1200.0  # the dataset's first row; the default one-hour window holds all of it
DAY = 86400.0


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def fetch(dsn: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def pg_db() -> Iterator[str]:
    """A fresh database on the shared server for this module: its DSN."""
    name = f"llmrelay_test_{uuid.uuid4().hex[:12]}"
    run(fetch(SHARED, f'CREATE DATABASE "{name}"'))
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    run(fetch(SHARED, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def schema_dsn(pg_db: str) -> str:
    """A DSN on a new, empty schema of the module's database (the tables go there)."""
    schema = f"s_{uuid.uuid4().hex[:12]}"
    run(fetch(pg_db, f"CREATE SCHEMA {schema}"))
    return f"{pg_db}?search_path={schema}"


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PgInstance]:
    yield from pg_instance()


def record(i: int, **fields: Any) -> LogRecord:
    values: dict[str, Any] = {
        "unique_id": f"log-{i:03d}",
        "start_time": BASE + (i // 2) * 10 - 0.5,
        "timestamp": BASE + (i // 2) * 10,  # pairs share a timestamp: unique_id breaks the tie
        "model": ["gpt-4o", "gpt-4o-mini", "claude-3", "gemini-pro"][i % 4],
        "customer_identifier": f"cust-{i % 7}" if i % 10 else None,
        "status_code": 500 if i % 9 == 0 else 200,
        "status": "error" if i % 9 == 0 else "success",
        "error_message": "boom" if i % 9 == 0 else "",
        "cost": round(0.001 * i, 6),
        "prompt_tokens": 10 * i,
        "completion_tokens": i,
        "total_request_tokens": 11 * i,
        "latency": 0.04 + i * 0.09,
        "time_to_first_token": None if i % 5 == 0 else 0.01 * i,
        "metadata": {"team": ["red", "blue", "green"][i % 3], "idx": str(i)} if i % 4 else None,
        "environment": "test" if i % 6 == 0 else "production",
        "cache_hit": i % 8 == 0,
        "stream": i % 2 == 0,
        "span_parent_id": "parent" if i % 3 == 0 else None,
        "thread_identifier": f"thread-{i % 5}",
        "key_name": "tests",
        "prompt_messages": [{"role": "user", "content": f"Question {i} about Paris"}],
        "completion_message": {"role": "assistant", "content": "Answer"},
        "customer_params": {"tier": "gold", "n": i},
    }
    values.update(fields)
    return LogRecord(**values)


DATASET = [record(i) for i in range(60)]


class Stores:
    """The same records in PostgreSQL and in SQLite, with a store on each."""

    def __init__(self, dsn: str, sqlite_path: Path) -> None:
        self.pg = PostgresLogStore(dsn)
        self.lite = SQLiteLogStore(sqlite_path)

    async def both(self, method: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return (await alone(self.pg, method, *args, **kwargs), await alone(self.lite, method, *args, **kwargs))


async def alone(store: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    await store.open()
    try:
        return await getattr(store, method)(*args, **kwargs)
    finally:
        await store.close()


async def fill(records: list[LogRecord], dsn: str, sqlite_path: Path | None = None) -> None:
    sinks: list[Any] = [PostgresSink(dsn)]
    if sqlite_path is not None:
        sinks.append(SQLiteSink(sqlite_path))
    for sink in sinks:
        await sink.open()
        try:
            await sink.write(records)
        finally:
            await sink.close()


@pytest.fixture(scope="module")
def stores(pg_db: str, tmp_path_factory: pytest.TempPathFactory) -> Stores:
    """DATASET in the module database's public schema and in a SQLite file. Read only."""
    path = tmp_path_factory.mktemp("pglogs") / "logs.db"
    run(fill(DATASET, pg_db, path))
    return Stores(pg_db, path)


def q(params: dict[str, str] | None = None, body: dict[str, Any] | None = None) -> LogQuery:
    return parse_query(params or {}, body, now=NOW)


def same(a: Any, b: Any) -> bool:
    """Equal, floats within rounding (sums and averages may differ in the last bits)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool | type(None)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) and isinstance(b, bool) == isinstance(a, bool)
    return a == b


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["unique_id"] for r in rows]


# -- the sink ----------------------------------------------------------------------------------


def test_sink_creates_the_table_and_stores_every_field(schema_dsn: str) -> None:
    run(fill(DATASET[:10], schema_dsn))
    types = {r["column_name"]: r["data_type"] for r in run(fetch(
        schema_dsn, "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = $1", TABLE))}
    assert set(types) == set(COLUMNS)
    assert (types["unique_id"], types["status_code"], types["cost"], types["stream"], types["metadata"]) == (
        "text", "bigint", "double precision", "boolean", "jsonb")
    indexes = {r[0] for r in run(fetch(schema_dsn, "SELECT indexname FROM pg_indexes WHERE "
                                                   "schemaname = current_schema() AND tablename = $1", TABLE))}
    assert {f"{TABLE}_{name}" for name in INDEXES} <= indexes
    rows = run(fetch(schema_dsn, f"SELECT unique_id, metadata ->> 'team' AS team, prompt_messages -> 0 ->> 'content' "
                                 f"AS content, cache_hit, time_to_first_token FROM {TABLE} ORDER BY unique_id"))
    assert [r["unique_id"] for r in rows] == [f"log-{i:03d}" for i in range(10)]
    assert rows[1]["team"] == "blue" and rows[4]["team"] is None  # record 4 has no metadata
    assert rows[3]["content"] == "Question 3 about Paris"  # JSON columns are jsonb, not strings
    assert rows[8]["cache_hit"] is True and rows[5]["time_to_first_token"] is None


def test_replayed_and_duplicate_records_are_stored_once(schema_dsn: str) -> None:
    async def main() -> None:
        sink = PostgresSink(schema_dsn)
        await sink.open()
        try:
            await sink.write(DATASET[:20])
            await sink.write(DATASET[:20])  # a replay of a batch whose outcome was unknown
            await sink.write(DATASET[10:30] + DATASET[25:30])  # overlapping, and duplicates inside a batch
        finally:
            await sink.close()

    run(main())
    row = run(fetch(schema_dsn, f"SELECT COUNT(*), COUNT(DISTINCT unique_id) FROM {TABLE}"))[0]
    assert tuple(row) == (30, 30)


def test_make_sink_builds_the_postgres_sink(schema_dsn: str) -> None:
    sink = make_sink(LogSink(type="postgres", dsn=schema_dsn, pool_size=2))
    assert isinstance(sink, PostgresSink) and sink.name == "postgres"
    store = make_store([LogSink(type="sqlite", path="x.db"), LogSink(type="postgres", dsn=schema_dsn)])
    assert isinstance(store, PostgresLogStore)


def test_an_older_table_gains_the_new_columns_and_indexes(schema_dsn: str) -> None:
    # a table as an older gateway made it: fewer columns, one index
    run(fetch(schema_dsn, f"CREATE TABLE {TABLE} (unique_id text PRIMARY KEY, timestamp double precision, "
                          f"start_time double precision, model text, metadata jsonb)"))
    run(fetch(schema_dsn, f"INSERT INTO {TABLE} VALUES ('old-1', $1, $1, 'old-model', '{{\"a\": \"1\"}}')", NOW - 60))
    run(fill(DATASET[:5], schema_dsn))
    columns = {r[0] for r in run(fetch(schema_dsn, "SELECT column_name FROM information_schema.columns WHERE "
                                                   "table_schema = current_schema() AND table_name = $1", TABLE))}
    assert columns == set(COLUMNS)
    indexes = {r[0] for r in run(fetch(schema_dsn, "SELECT indexname FROM pg_indexes WHERE "
                                                   "schemaname = current_schema() AND tablename = $1", TABLE))}
    assert {f"{TABLE}_{name}" for name in INDEXES} <= indexes

    async def read() -> tuple[dict[str, Any] | None, int]:
        store = PostgresLogStore(schema_dsn)
        await store.open()
        try:
            count, _ = await store.list(q())
            return await store.get("old-1"), count
        finally:
            await store.close()

    old, count = run(read())
    assert count == 6
    assert old is not None and old["model"] == "old-model" and old["metadata"] == {"a": "1"}
    assert old["is_pinned"] is False and old["blurred"] is False  # the new flags' default


def test_workers_starting_together_migrate_once(schema_dsn: str) -> None:
    async def main() -> None:
        sinks = [PostgresSink(schema_dsn, pool_size=1) for _ in range(8)]
        try:
            await asyncio.gather(*(s.open() for s in sinks))
            await asyncio.gather(*(s.write(DATASET[i * 5:(i + 1) * 5]) for i, s in enumerate(sinks)))
        finally:
            await asyncio.gather(*(s.close() for s in sinks))

    run(main())
    assert run(fetch(schema_dsn, f"SELECT COUNT(*) FROM {TABLE}"))[0][0] == 40


def test_values_postgresql_cannot_hold_do_not_block_the_batch(schema_dsn: str, tmp_path: Path) -> None:
    batch = [
        record(1, note="a\x00b", prompt_messages=[{"role": "user", "content": "x\x00y \\u0000 kept"}]),
        record(2, prompt_tokens=2 ** 63),  # beyond bigint: refused for good, to the dead-letter file
        record(3),
    ]
    metrics = Metrics()

    async def main() -> None:
        queue = LogQueue([PostgresSink(schema_dsn)], tmp_path / "spool", metrics, flush_interval=0.01)
        await queue.start()
        await queue.put_and_wait(batch)
        await queue.stop()

    run(main())
    rows = run(fetch(schema_dsn, f"SELECT unique_id, note, prompt_messages -> 0 ->> 'content' AS content "
                                 f"FROM {TABLE} ORDER BY unique_id"))
    assert [r["unique_id"] for r in rows] == ["log-001", "log-003"]
    assert rows[0]["note"] == "ab" and rows[0]["content"] == "xy \\u0000 kept"
    rejected = (tmp_path / "spool" / "postgres.rejected.jsonl").read_text().splitlines()
    assert [decoder.decode(line).prompt_tokens for line in rejected] == [2 ** 63]  # kept whole, not lost
    assert 'llmrelay_log_records_rejected_total{sink="postgres"} 1.0' in metrics.render()[0].decode()


def test_open_fails_while_the_database_is_down_and_works_once_it_is_back(private_pg: PgInstance) -> None:
    async def main() -> None:
        sink = PostgresSink(private_pg.dsn, pool_size=2)
        private_pg.stop()
        try:
            for _ in range(3):  # the queue calls open again at every replay
                with pytest.raises(OSError):
                    await sink.open()
            with pytest.raises(RuntimeError):
                await sink.write(DATASET[:1])
        finally:
            private_pg.start()
        await sink.open()
        try:
            await sink.write(DATASET[:10])
            private_pg.stop()  # a kill while open: the write raises (and the queue spools)...
            with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                await sink.write(DATASET[10:20])
            private_pg.start()
            await sink.write(DATASET[10:20])  # ...and the pool reconnects for the next one
        finally:
            await sink.close()
        assert (await fetch(private_pg.dsn, f"SELECT COUNT(*) FROM {TABLE}"))[0][0] == 20
        await fetch(private_pg.dsn, f"DROP TABLE {TABLE}")

    run(main())


def test_store_open_does_not_need_the_database() -> None:
    async def main() -> None:
        store = PostgresLogStore(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
        await store.open()  # nothing listens there
        try:
            with pytest.raises(OSError):
                await store.list(q())
        finally:
            await store.close()

    run(main())


# -- the store, against the SQLite store on the same records ------------------------------------

QUERIES: list[tuple[dict[str, str], dict[str, Any] | None, int | None]] = [
    # (URL params, body, expected count when the number is checked by hand)
    ({}, None, 60),
    ({"model": "gpt-4o"}, None, 15),
    ({}, {"filters": {"model": {"operator": "iexact", "value": "GPT-4O"}}}, 15),
    ({}, {"filters": {"cost": {"operator": "lt", "value": 0.01}}}, 10),
    ({}, {"filters": {"cost": {"operator": "lte", "value": 0.01}}}, 11),
    ({}, {"filters": {"prompt_tokens": {"operator": "gt", "value": 500}}}, 9),
    ({}, {"filters": {"latency": {"operator": "gte", "value": 5.0}}}, None),
    ({}, {"filters": {"cost": [{"operator": "gte", "value": 0.01}, {"operator": "lt", "value": 0.03}]}}, 20),
    ({}, {"filters": {"customer_identifier": {"operator": "contains", "value": "st-1"}}}, None),
    ({}, {"filters": {"customer_identifier": {"operator": "icontains", "value": "CUST-2"}}}, None),
    ({}, {"filters": {"customer_identifier": {"operator": "startswith", "value": "cust-3"}}}, None),
    ({}, {"filters": {"customer_identifier": {"operator": "endswith", "value": "-4"}}}, None),
    ({}, {"filters": {"model": {"operator": "in", "value": ["gpt-4o", "claude-3"]}}}, 30),
    ({}, {"filters": {"customer_identifier": {"operator": "isnull", "value": True}}}, 6),
    ({}, {"filters": {"customer_identifier": {"operator": "isnull", "value": False}}}, 54),
    ({}, {"filters": {"model": {"operator": "not", "value": ["gpt-4o", "gemini-pro"]}}}, 30),
    ({}, {"filters": {"model": {"operator": "neq", "value": "gpt-4o"}}}, 45),
    ({}, {"filters": {"metadata__team": {"operator": "", "value": "red"}}}, None),
    ({}, {"filters": {"metadata__team": {"operator": "in", "value": ["red", "blue"]}}}, None),
    ({}, {"filters": {"metadata__idx": {"operator": "startswith", "value": "1"}}}, None),
    ({}, {"filters": {"metadata__team": {"operator": "isnull", "value": True}}}, 15),
    ({"team": "green"}, None, None),  # an unknown URL key is a metadata key
    ({}, {"filters": {"cost": {"operator": "gte", "value": 0.05}, "model": {"operator": "", "value": "claude-3"}},
          "operator": "OR"}, None),
    ({"cost[value]": "0.05", "cost[operator]": "gte", "cost[connector]": "OR", "model[value]": "claude-3",
      "model[connector]": "OR"}, None, None),
    ({}, {"filters": {"prompt_messages": {"operator": "contains", "value": "Question 1"}}}, 11),
    ({}, {"filters": {"status_code": {"operator": "contains", "value": "50"}}}, 7),  # text operator on a number
    ({"failed": "true"}, None, 7),
    ({"is_test": "true"}, None, 10),
    ({}, {"filters": {"cache_hit": {"operator": "", "value": True}}}, 8),
    ({}, {"filters": {"is_root_span": {"operator": "", "value": True}}}, 40),
    ({"environment": "production", "model": "gpt-4o-mini"}, None, None),
    ({"start_time": str(BASE + 100), "end_time": str(BASE + 200)}, None, 22),
    ({"sort_by": "cost"}, None, 60),
    ({"sort_by": "-latency"}, None, 60),
    ({"sort_by": "model"}, None, 60),
    ({"sort_by": "-prompt_tokens", "page_size": "7", "page": "3"}, None, 60),
    ({"sort_by": "customer_identifier", "customer_identifier[operator]": "isnull",
      "customer_identifier[value]": "false"}, None, 54),
]


@pytest.mark.parametrize(("params", "body", "expected"), QUERIES)
def test_list_matches_the_sqlite_store(stores: Stores, params: dict[str, str], body: dict[str, Any] | None,
                                       expected: int | None) -> None:
    query = q({"page_size": "1000", **params}, body)
    (pg_count, pg_rows), (lite_count, lite_rows) = run(stores.both("list", query))
    assert pg_count == lite_count
    if expected is not None:
        assert pg_count == expected
    assert ids(pg_rows) == ids(lite_rows)
    assert pg_rows == lite_rows  # every column decoded alike: JSON, flags, numbers


def test_pages_cover_every_row_once(stores: Stores) -> None:
    async def main() -> list[str]:
        await stores.pg.open()
        try:
            seen: list[str] = []
            for page in range(1, 10):
                count, rows = await stores.pg.list(q({"page_size": "7", "page": str(page)}))
                assert count == 60
                seen += ids(rows)
            return seen
        finally:
            await stores.pg.close()

    seen = run(main())
    # newest first; records 2k and 2k+1 share a timestamp and unique_id breaks the tie (descending)
    assert seen == [f"log-{i:03d}" for i in reversed(range(60))]


def test_get_returns_the_decoded_row(stores: Stores) -> None:
    pg_row, lite_row = run(stores.both("get", "log-007"))
    assert pg_row == lite_row
    assert pg_row["metadata"] == {"team": "blue", "idx": "7"} and pg_row["stream"] is False
    assert pg_row["prompt_messages"] == [{"role": "user", "content": "Question 7 about Paris"}]
    assert run(stores.both("get", "missing")) == (None, None)


def test_summary_groups_and_percentiles_match_the_sqlite_store(stores: Stores) -> None:
    query = q()
    pg, lite = run(stores.both("summary", query))
    assert same(pg, lite), (pg, lite)
    assert pg["number_of_requests"] == 60 and pg["error_count"] == 7 and pg["cache_hits"] == 8

    pg, lite = run(stores.both("groups", query, "customer_identifier", limit=100))
    assert same(pg, lite), (pg, lite)
    assert len(pg) == 8  # seven customers and the rows without one
    pg, lite = run(stores.both("groups", query, "customer_identifier", limit=3, offset=2,
                               order="number_of_requests DESC, grp ASC"))
    assert same(pg, lite) and len(pg) == 3

    pg = run(alone(stores.pg, "groups", query, sql.bucket_expr(sql.POSTGRES, 60), by="model", order="grp ASC"))
    lite = run(alone(stores.lite, "groups", query, sql.bucket_expr(sql.SQLITE, 60), by="model", order="grp ASC"))
    key = lambda g: (float(g["group"]), g["by"])  # noqa: E731
    assert len(pg) > 10 and same(sorted(pg, key=key), sorted(lite, key=key))
    assert sum(g["number_of_requests"] for g in pg) == 60

    assert run(stores.both("count_groups", query, "customer_identifier")) == (7, 7)
    assert run(stores.both("count_groups", q({"model": "claude-3"}), "customer_identifier")) == (7, 7)

    pg, lite = run(stores.both("percentiles", query))
    assert pg == lite
    assert pg["latency"]["p50"] is not None and pg["time_to_first_token"]["p99"] is not None


def test_update_merges_metadata_and_applies_nothing_when_an_id_is_missing(schema_dsn: str) -> None:
    run(fill(DATASET[:10], schema_dsn))

    async def main() -> None:
        store = PostgresLogStore(schema_dsn)
        await store.open()
        try:
            assert await store.update([
                ("log-001", {"metadata": {"team": None, "new": "x"}, "note": "look", "is_pinned": True}),
                ("log-002", {"positive_feedback": False}),
                ("log-001", {"metadata": {"later": "y"}}),  # the same row twice: merged in order
            ]) == []
            one = await store.get("log-001")
            assert one is not None
            assert one["metadata"] == {"idx": "1", "new": "x", "later": "y"}
            assert (one["note"], one["is_pinned"]) == ("look", True)
            two = await store.get("log-002")
            assert two is not None and two["positive_feedback"] is False

            missing = await store.update([("log-003", {"note": "never"}), ("nope", {"note": "x"})])
            assert missing == ["nope"]
            three = await store.get("log-003")
            assert three is not None and three["note"] is None

            assert await store.update([("log-004", {"metadata": {"k": "v\x00w"}, "note": "a\x00b"})]) == []
            four = await store.get("log-004")
            assert four is not None and four["metadata"] == {"k": "vw"} and four["note"] == "ab"
        finally:
            await store.close()

    run(main())


def test_concurrent_metadata_updates_are_not_lost(schema_dsn: str) -> None:
    run(fill(DATASET[:2], schema_dsn))

    async def main() -> dict[str, Any]:
        stores = [PostgresLogStore(schema_dsn, pool_size=2) for _ in range(4)]
        for store in stores:
            await store.open()
        try:
            await asyncio.gather(*(stores[i % 4].update([("log-001", {"metadata": {f"k{i}": str(i)}})])
                                   for i in range(40)))
            row = await stores[0].get("log-001")
            assert row is not None
            return row["metadata"]
        finally:
            for store in stores:
                await store.close()

    metadata = run(main())
    assert metadata == {"team": "blue", "idx": "1", **{f"k{i}": str(i) for i in range(40)}}


def test_purge_blurs_and_deletes_in_batches_and_keeps_pinned_rows(schema_dsn: str) -> None:
    records = []
    for i in range(30):
        age = (4 if i < 10 else 2 if i < 20 else 0) * DAY  # ten very old, ten old, ten new
        records.append(record(i, timestamp=NOW - age - i, start_time=NOW - age - i - 1, is_pinned=i % 5 == 0))
    run(fill(records, schema_dsn))

    async def purge() -> tuple[tuple[int, int], tuple[int, int], list[dict[str, Any]]]:
        store = PostgresLogStore(schema_dsn)
        await store.open()
        try:
            first = await store.purge(content_before=NOW - DAY, delete_before=NOW - 3 * DAY, batch=3)
            again = await store.purge(content_before=NOW - DAY, delete_before=NOW - 3 * DAY)
            _, rows = await store.list(q({"start_time": "0", "page_size": "100"}))
            return first, again, rows
        finally:
            await store.close()

    first, again, rows = run(purge())
    assert first == (8, 8)  # (blurred: old unpinned rows, deleted: very old unpinned rows)
    assert again == (0, 0)
    by_id = {r["unique_id"]: r for r in rows}
    assert sorted(by_id) == sorted(r.unique_id for r in records if r.timestamp > NOW - 3 * DAY or r.is_pinned)
    for r in records:
        row = by_id.get(r.unique_id)
        if row is None:
            continue
        blurred = NOW - 3 * DAY < r.timestamp < NOW - DAY and not r.is_pinned
        assert row["blurred"] is blurred
        assert all(row[name] is None for name in PURGED) if blurred else row["prompt_messages"] is not None


# -- end to end: gateways logging to PostgreSQL -------------------------------------------------


def postgres_logs(dsn: str, workdir: Path, *, sqlite: bool = False) -> dict[str, Any]:
    sinks: list[dict[str, Any]] = [{"type": "postgres", "dsn": dsn}]
    if sqlite:
        sinks.append({"type": "sqlite", "path": str(workdir / "logs.db")})
    return {"logs": {"spool_dir": str(workdir / "spool"), "flush_interval": 0.05, "sinks": sinks},
            "admin_keys": [{"name": "ops", "key_hash": hash_key(ADMIN)}]}


def chat(client: httpx.Client, gateway: GatewayProcess, **extra: Any) -> str:
    r = client.post(f"{gateway.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}], **extra})
    assert r.status_code == 200, r.text
    return r.headers["x-respan-log-id"]


def admin_get(gateway: GatewayProcess, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{gateway.url}{path}", params=params, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)


def test_gateway_logs_to_postgres_and_the_api_reads_from_it(start_gateway: Any, schema_dsn: str,
                                                              tmp_path: Path) -> None:
    gw = start_gateway(**postgres_logs(schema_dsn, tmp_path, sqlite=True))
    with httpx.Client(timeout=10) as client:
        log_ids = [chat(client, gw, customer_identifier="pg-cust", metadata={"run": "e2e"}) for _ in range(5)]
        ingested = client.post(f"{gw.url}/api/request-logs/", headers={"Authorization": f"Bearer {KEY}"},
                               json={"model": "ingested-model", "customer_identifier": "pg-cust",
                                     "prompt_messages": [{"role": "user", "content": "hi"}],
                                     "completion_message": {"role": "assistant", "content": "hello"},
                                     "metadata": {"run": "e2e"}, "cost": 0.5})
    assert ingested.status_code == 201, ingested.text
    log_ids.append(ingested.json()["unique_id"])

    stored = {r["unique_id"]: r for r in run(fetch(schema_dsn, f"SELECT unique_id, model, metadata ->> 'run' AS run "
                                                               f"FROM {TABLE}"))}
    deadline = time.monotonic() + 10
    while len(stored) < 6 and time.monotonic() < deadline:  # chat logs are written a moment after the answer
        time.sleep(0.1)
        stored = {r["unique_id"]: r for r in run(fetch(schema_dsn, f"SELECT unique_id, model, metadata ->> 'run' "
                                                                   f"AS run FROM {TABLE}"))}
    assert set(stored) == set(log_ids)
    assert stored[log_ids[-1]]["model"] == "ingested-model" and {r["run"] for r in stored.values()} == {"e2e"}

    # a row only PostgreSQL has: the API's answers come from there, not from the SQLite sink
    run(fill([record(900, unique_id="only-in-postgres", timestamp=time.time(), customer_identifier="pg-cust",
                     metadata={"run": "e2e"})], schema_dsn))
    listing = admin_get(gw, "/api/request-logs/list/", metadata__run="e2e", page_size=50)
    assert listing.status_code == 200, listing.text
    assert listing.json()["count"] == 7
    assert {r["unique_id"] for r in listing.json()["results"]} == {*log_ids, "only-in-postgres"}

    detail = admin_get(gw, f"/api/request-logs/{log_ids[0]}/")
    assert detail.status_code == 200 and detail.json()["model_requested"] == "gpt-test"
    patched = httpx.patch(f"{gw.url}/api/request-logs/{log_ids[0]}/", headers={"Authorization": f"Bearer {ADMIN}"},
                          json={"metadata": {"reviewed": "yes"}, "is_pinned": True})
    assert patched.status_code == 200, patched.text
    assert patched.json()["metadata"] == {"run": "e2e", "reviewed": "yes"} and patched.json()["is_pinned"] is True

    users = admin_get(gw, "/api/users/")
    assert users.status_code == 200, users.text
    assert [u["customer_identifier"] for u in users.json()["results"]] == ["pg-cust"]
    assert admin_get(gw, "/api/users/pg-cust/").status_code == 200
    stats = admin_get(gw, "/api/dashboard/stats/")
    assert stats.status_code == 200, stats.text
    assert stats.json()["summary"]["number_of_requests"] == 7
    summary = httpx.post(f"{gw.url}/api/request-logs/summary/", headers={"Authorization": f"Bearer {ADMIN}"},
                         json={"filters": {"customer_identifier": {"operator": "", "value": "pg-cust"}}})
    assert summary.status_code == 200 and summary.json()["number_of_requests"] == 7


def test_a_gateway_whose_database_is_down_serves_requests_and_answers_503(start_gateway: Any, tmp_path: Path) -> None:
    gw = start_gateway(**postgres_logs(f"postgresql://postgres:hunter2-secret@127.0.0.1:{free_port()}/none", tmp_path))
    with httpx.Client(timeout=10) as client:
        chat(client, gw)
    listing = admin_get(gw, "/api/request-logs/list/")
    assert listing.status_code == 503
    assert "hunter2" not in listing.text
    gw.stop()
    assert "hunter2" not in gw.output.read_text()


def test_every_record_reaches_postgres_exactly_once_across_a_kill(start_gateway: Any, private_pg: PgInstance,
                                                                   tmp_path: Path) -> None:
    """Load from a few threads; PostgreSQL is killed in the middle, the load goes on, it comes back:
    every request's record ends up in PostgreSQL once."""
    total, threads = 480, 4
    run(fetch(private_pg.dsn, f"DROP TABLE IF EXISTS {TABLE}"))  # the gateway creates it
    gw = start_gateway(**postgres_logs(private_pg.dsn, tmp_path))
    log_ids: list[str] = []
    errors: list[str] = []
    issued = [0]
    lock = threading.Lock()

    def load() -> None:
        with httpx.Client(timeout=20) as client:
            while True:
                with lock:
                    if issued[0] >= total:
                        return
                    issued[0] += 1
                try:
                    log_id = chat(client, gw)
                except Exception as e:
                    with lock:
                        errors.append(repr(e))
                    continue
                with lock:
                    log_ids.append(log_id)
                time.sleep(0.004)  # a steady load, so the outage falls in the middle of it

    def done() -> int:
        with lock:
            return len(log_ids)

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 60
        while done() < count and time.monotonic() < deadline:
            time.sleep(0.01)

    workers = [threading.Thread(target=load) for _ in range(threads)]
    for w in workers:
        w.start()
    try:
        wait_for(total // 4)
        private_pg.stop("immediate")
        during = done()
        wait_for(total * 2 // 3)
        sent_while_down = done() - during
        private_pg.start()
    finally:
        for w in workers:
            w.join(60)
    assert not errors, errors[:3]
    assert len(log_ids) == total and len(set(log_ids)) == total
    assert sent_while_down > 50

    rows: tuple[int, int] = (0, 0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            rows = tuple(run(fetch(private_pg.dsn, f"SELECT COUNT(*), COUNT(DISTINCT unique_id) FROM {TABLE}"))[0])
        except (OSError, asyncpg.PostgresError):
            rows = (0, 0)
        if rows[0] >= total:
            break
        time.sleep(0.5)
    assert rows == (total, total), f"{rows[0]} of {total} records in PostgreSQL"
    stored = {r[0] for r in run(fetch(private_pg.dsn, f"SELECT unique_id FROM {TABLE}"))}
    assert stored == set(log_ids)
    metrics = httpx.get(f"{gw.url}/metrics").text
    replayed = [line for line in metrics.splitlines() if line.startswith("llmrelay_log_records_replayed_total")]
    assert replayed and float(replayed[0].split()[-1]) > 0, "the outage's records should have come from the spool"
