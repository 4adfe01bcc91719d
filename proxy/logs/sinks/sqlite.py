"""SQLite sink: the embedded default. One row per LogRecord in table `request_logs`."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from itertools import compress
from operator import is_not
from pathlib import Path
from typing import Any

from proxy.logs.record import LogRecord
from proxy.logs.schema import COLUMNS, INDEXES, KINDS, TABLE, decode_row, row_of
from proxy.logs.sinks.threaded import ThreadedSink

_SQL_TYPES = {"TEXT": "TEXT", "INTEGER": "INTEGER", "REAL": "REAL", "BOOL": "INTEGER", "JSON": "TEXT"}
_NONES = (None,) * len(COLUMNS)
STATEMENT_ROWS = (512, 128, 32, 8, 1)


@functools.lru_cache(maxsize=256)
def _insert(present: tuple[bool, ...], rows: int) -> str:
    """One INSERT of `rows` rows, naming only the columns marked in `present`.

    A row's NULL columns are left out rather than bound: a log record fills about a third of
    its 84 columns, and binding the NULLs made an insert cost about 33 us instead of 6.
    A multi-row statement is one sqlite3_step, so the writer thread gives up and takes back
    the GIL once per statement instead of once per row: under load, executemany's per-row
    GIL hand-offs with the event loop thread cost more than the inserts themselves.
    """
    columns = ", ".join(compress(COLUMNS, present))
    placeholders = "(" + ", ".join("?" * sum(present)) + ")"
    return f"INSERT OR IGNORE INTO {TABLE} ({columns}) VALUES {', '.join([placeholders] * rows)}"


def _column_def(name: str) -> str:
    sql_type = _SQL_TYPES[KINDS[name]]
    return f"{name} {sql_type} PRIMARY KEY" if name == "unique_id" else f"{name} {sql_type}"


def connect(path: str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection to the log database, with the table, its new columns and indexes in place."""
    # timeout = busy wait: several gateway workers may share one database file.
    conn = sqlite3.connect(path, timeout=10.0, check_same_thread=check_same_thread)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        with conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} ({', '.join(map(_column_def, COLUMNS))})")
            # A table made by an older LogRecord gains the new columns.
            existing = {row[1] for row in conn.execute(f"PRAGMA table_info({TABLE})")}
            for name in COLUMNS:
                if name not in existing:
                    conn.execute(f"ALTER TABLE {TABLE} ADD COLUMN {_column_def(name)}")
            for name, columns in INDEXES.items():
                conn.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_{name} ON {TABLE} ({', '.join(columns)})")
    except BaseException:
        conn.close()
        raise
    return conn


class SQLiteSink(ThreadedSink):
    """Writes batches with INSERT OR IGNORE on unique_id, so a replayed record lands once.

    All sqlite work runs on one dedicated thread, which owns the connection.
    """

    name = "sqlite"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None

    def _open(self) -> None:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = connect(str(self.path))

    def _write(self, records: list[LogRecord]) -> None:
        if self._conn is None:
            raise RuntimeError(f"sqlite log sink {self.path} is not open")
        # Records with the same NULL columns go in together (almost always one group).
        groups: dict[tuple[bool, ...], list[list[Any]]] = {}
        for record in records:
            row = row_of(record)  # bools go in as 0/1
            present = tuple(map(is_not, row, _NONES))
            groups.setdefault(present, []).append(list(compress(row, present)))
        variables = self._conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        with self._conn:
            for present, rows in groups.items():
                most = max(1, variables // max(1, sum(present)))
                start = 0
                while start < len(rows):
                    # a few fixed statement sizes, so the prepared statements stay cached
                    size = next(n for n in STATEMENT_ROWS if n <= min(most, len(rows) - start))
                    params = [value for row in rows[start : start + size] for value in row]
                    self._conn.execute(_insert(present, size), params)
                    start += size

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def read_records(path: str | Path, where: str = "", args: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows of `request_logs` as dicts, JSON columns decoded and bools restored.

    `where` is either a bare condition ("model = ?") or a clause starting with
    WHERE / ORDER / LIMIT. Blocking: for tests and tools, not for the event loop.
    """
    clause = where.strip()
    if clause and not clause.upper().startswith(("WHERE", "ORDER", "LIMIT")):
        clause = f"WHERE {clause}"
    conn = sqlite3.connect(str(path), timeout=10.0)
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(f"SELECT * FROM {TABLE} {clause}", tuple(args)).fetchall()
    finally:
        conn.close()
    return [decode_row(dict(row)) for row in rows]
