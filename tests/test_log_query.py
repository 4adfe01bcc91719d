"""Units of the log plane: the query parser, the SQL compiler on a real SQLite database, payload
normalization, and the LogQueue's put_and_wait."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.call import KeyInfo, Prices
from proxy.logs import sql
from proxy.logs.ingest import IngestError, to_record, usage_of
from proxy.logs.query import LogQuery, QueryError, parse_query, parse_time
from proxy.logs.queue import LogQueue
from proxy.logs.record import LogRecord
from proxy.logs.sinks.sqlite import SQLiteSink
from proxy.logs.stores.sqlite import SQLiteLogStore
from proxy.metrics import Metrics


def no_prices(model: str) -> Prices | None:
    return None


def test_parse_time_forms() -> None:
    assert parse_time("2026-01-01T00:00:00Z", "t") == 1767225600.0
    assert parse_time("2026-01-01T01:00:00+01:00", "t") == 1767225600.0
    assert parse_time("2026-01-01 00:00:00", "t") == 1767225600.0  # naive is UTC
    assert parse_time("1767225600.5", "t") == 1767225600.5
    assert parse_time(1767225600, "t") == 1767225600.0
    for bad in ("tomorrow", True, None, [1]):
        with pytest.raises(QueryError, match="^t:"):
            parse_time(bad, "t")


def test_default_window_and_explicit_ranges() -> None:
    q = parse_query({}, {}, now=1000.0)
    assert (q.start, q.end) == (1000.0 - 3600, 1000.0)
    q = parse_query({}, {}, default_window=None)
    assert (q.start, q.end) == (None, None)
    with pytest.raises(QueryError, match="start_time: is after end_time"):
        parse_query({"start_time": "200", "end_time": "100"}, {})


def test_sql_injection_through_names_is_impossible() -> None:
    with pytest.raises(QueryError, match="unknown filter field"):
        parse_query({}, {"filters": {"model; DROP TABLE request_logs": {"operator": "", "value": ["x"]}}})
    with pytest.raises(QueryError, match="metadata key"):
        parse_query({}, {"filters": {'metadata__a"b': {"operator": "", "value": ["x"]}}})
    with pytest.raises(QueryError, match="sort_by"):
        parse_query({"sort_by": "cost; DROP TABLE request_logs"}, {})


def test_compiled_sql_uses_numbered_parameters_per_dialect() -> None:
    q = parse_query({"tier": "gold"}, {"filters": {"model": {"operator": "startswith", "value": ["gpt"]}}},
                    default_window=None)
    page, count, args = sql.list_sql(q, sql.POSTGRES)
    assert "$1" in page and "?" not in page and args[-2:] == [50, 0]
    assert "(metadata ->> $" in page
    page, _, _ = sql.list_sql(q, sql.SQLITE)
    assert "json_extract(metadata, ?" in page and "$1" not in page


def test_percentiles_interpolate_inside_buckets() -> None:
    n = len(sql.PERCENTILE_EDGES)
    # 100 latencies all within (0.1, 0.2]; no TTFTs
    cumulative = [0, 0] + [100] * (n - 2)
    row = [100, 0, *cumulative, *([0] * n)]
    result = sql.percentiles_of(row)
    assert result["latency"]["p50"] == pytest.approx(0.15)
    assert result["latency"]["p99"] == pytest.approx(0.199)
    assert result["time_to_first_token"] == {"p50": None, "p90": None, "p99": None}
    assert result["counts"] == {"latency": 100, "time_to_first_token": 0}


def test_usage_shapes() -> None:
    assert usage_of({"usage": {"prompt_tokens": 5, "completion_tokens": 2}}).total_tokens == 7
    anthropic = usage_of({"usage": {"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 10,
                                    "cache_creation_input_tokens": 3}})
    assert (anthropic.prompt_tokens, anthropic.cached_tokens, anthropic.cache_creation_tokens) == (18, 10, 3)
    flat = usage_of({"usage": {"prompt_tokens": 5}, "prompt_tokens": 9, "completion_tokens": 1})
    assert (flat.prompt_tokens, flat.completion_tokens) == (9, 1)  # the flat fields win
    with pytest.raises(IngestError, match="usage.input_tokens"):
        usage_of({"usage": {"input_tokens": -1}})


def test_ingest_normalization_edges() -> None:
    key = KeyInfo(name="k", environment="test")
    record = to_record({"customer_identifier": 12345, "span_name": "s" * 400, "log_type": "model",
                        "output": "plain text", "input": "plain prompt"}, key, no_prices, now=100.0)
    assert record.customer_identifier == "12345" and len(record.span_name or "") == 255
    assert record.log_type == "generation"
    assert record.prompt_messages == [{"role": "user", "content": "plain prompt"}]
    assert record.completion_message == {"role": "assistant", "content": "plain text"}
    assert record.timestamp == 100.0 and record.start_time == 100.0 and record.environment == "test"
    custom = to_record({"log_type": "tool", "input": {"q": 1}, "output": [1, 2]}, None, no_prices)
    assert custom.input == {"q": 1} and custom.output == [1, 2] and custom.prompt_messages is None
    with pytest.raises(IngestError, match=r"^\[2\]\.status:"):
        to_record({"status": "meh"}, None, no_prices, where="[2].")
    priced = to_record({"model": "x", "prompt_tokens": 2_000_000}, None, lambda m: Prices(input=1.0))
    assert priced.cost == 2.0


def test_sqlite_store_purges_in_batches_and_keeps_pinned(tmp_path: Path) -> None:
    async def main() -> None:
        sink = SQLiteSink(tmp_path / "logs.db")
        await sink.open()
        records = [LogRecord(unique_id=f"r{i}", start_time=float(i), timestamp=float(i), is_pinned=i == 3,
                             prompt_messages=[{"role": "user", "content": "x"}]) for i in range(10)]
        await sink.write(records)
        store = SQLiteLogStore(tmp_path / "logs.db")
        await store.open()
        blurred, deleted = await store.purge(content_before=8.0, delete_before=5.0, batch=2)
        assert (blurred, deleted) == (3, 4)  # r0..r4 deleted but the pinned r3; then r5..r7 blurred
        count, rows = await store.list(LogQuery(sort_column="timestamp", descending=False, page_size=100))
        by_id = {r["unique_id"]: r for r in rows}
        assert sorted(by_id) == ["r3", "r5", "r6", "r7", "r8", "r9"] and count == 6
        assert by_id["r3"]["prompt_messages"] and not by_id["r3"]["blurred"]
        assert all(by_id[i]["blurred"] and by_id[i]["prompt_messages"] is None for i in ("r5", "r6", "r7"))
        assert by_id["r8"]["prompt_messages"] and not by_id["r8"]["blurred"]
        await store.close()
        await sink.close()

    asyncio.run(main())


def test_put_and_wait_returns_after_the_write(tmp_path: Path) -> None:
    async def main() -> None:
        written: list[str] = []

        class SlowSink:
            name = "slow"

            async def open(self) -> None: ...

            async def write(self, records: list[LogRecord]) -> None:
                await asyncio.sleep(0.05)
                written.extend(r.unique_id for r in records)

            async def close(self) -> None: ...

        queue = LogQueue([SlowSink()], tmp_path / "spool", Metrics(), flush_interval=5.0)
        await queue.start()
        await queue.put_and_wait([LogRecord(unique_id="a", start_time=0, timestamp=0)])
        assert written == ["a"]  # not sitting out the 5 s flush interval, and written when it returns
        queue.put(LogRecord(unique_id="b", start_time=0, timestamp=0))
        await queue.put_and_wait([LogRecord(unique_id="c", start_time=0, timestamp=0)])
        assert written == ["a", "b", "c"]
        await queue.stop()

    asyncio.run(asyncio.wait_for(main(), 4))


@pytest.mark.parametrize(("params", "body", "index"), [
    ({}, {}, "request_logs_timestamp"),
    ({}, {"filters": {"customer_identifier": {"operator": "", "value": ["c"]}}}, "request_logs_customer_time"),
    ({}, {"filters": {"model": {"operator": "", "value": ["m"]}}}, "request_logs_model_time"),
    ({}, {"filters": {"trace_unique_id": {"operator": "", "value": ["t"]}}}, "request_logs_trace"),
])
def test_list_queries_use_an_index(tmp_path: Path, params: dict[str, str], body: dict, index: str) -> None:
    from proxy.logs.sinks.sqlite import connect

    conn = connect(str(tmp_path / "logs.db"))
    page, count, args = sql.list_sql(parse_query(params, body, now=1000.0), sql.SQLITE)
    for statement, values in ((page, args), (count, args[:-2])):
        plan = " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", values))
        assert index in plan and "SCAN request_logs" not in plan.replace(f"USING INDEX {index}", ""), plan
    conn.close()
