"""The audit store in a PostgreSQL database: the :class:`~undo.store.api.Store` of a conninfo.

It holds many sources; a PgStore acts for one of them at a time (``source``: a name; else the
store's only source; :meth:`PgStore.use` chooses another). Capture writes with PgStoreWriter
(_writer.py). The reads are the store's one set of queries (undo/store/_queries.py and the
SQL of sqlite.py), run by :class:`Runner`, which
- scopes every table to the source: temporary views of its rows under the table names the
  queries use (the session's own; ``pg_temp`` is searched first), over ``undo_store``;
- adapts the placeholders (``?`` -> ``%s``), in one place, and gives PostgreSQL's spelling of
  the few constructs that differ (:data:`FRAGMENTS`);
- reads values as the SQLite store gives them: times as the store's time text, JSON as text.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.adapt import Loader

from undo.core.config import masked_dsn
from undo.core.errors import BadInput
from undo.core.times import iso
from undo.store.api import PruneReport, Source, StepReport, StoredChange
from undo.store.postgres import _prune, _schema
from undo.store.postgres._writer import PgStoreWriter
from undo.store.sqlite import SqliteStore, unknown_source

#: PostgreSQL's spelling of the constructs _queries.SQLITE names
FRAGMENTS = {
    "ids_of_json": "SELECT CAST(value AS bigint) FROM jsonb_array_elements_text(CAST(? AS jsonb))"
    " AS j(value)",
    "texts_of_json": "SELECT value FROM jsonb_array_elements_text(CAST(? AS jsonb)) AS j(value)",
    # the transaction's partition only: by id range alone a transaction's changes took 20-80 ms
    # a query, 0.3-0.5 ms so (`show` of a session on a 5,000,000-change store)
    "of_its_transaction": " AND c.commit_time = t.commit_time",
}


#: timestamptz's text on the store's connections (TimeZone UTC, DateStyle ISO: _schema.OPTIONS)
#: for a year of four digits: the date, the time, the microseconds without trailing zeros
_UTC_TEXT = re.compile(rb"(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d)(?:\.(\d{1,6}))?\+00")


class _TimeText(Loader):
    """timestamptz -> the store's time text ('2026-01-19T10:25:31.000000Z')."""

    def load(self, data: Any) -> str:
        # by its pieces: parsing into a datetime and formatting it again was 70 ms of the
        # 20,000 times of a listing of every session (bench/serve, 10,000 sessions)
        if found := _UTC_TEXT.fullmatch(data):
            day, time, micro = found.groups()
            return f"{day.decode()}T{time.decode()}.{(micro or b'').decode():0<6}Z"
        return iso(datetime.fromisoformat(bytes(data).decode()))


#: JSON text as the SQLite store holds it (undo.store._writer): compact, not ASCII-escaped
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


#: jsonb's text of a flat array of strings and nulls (an image, a key): elements separated by
#: ", ", strings escaped as json.dumps(ensure_ascii=False) escapes them (" \ \b \f \n \r \t,
#: other control characters \u00xx in lower case, the rest as it is; no NUL and no lone
#: surrogate in jsonb). Bytes of UTF-8: a quote or a backslash is never part of a longer
#: character.
_STRING = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_ELEMENT = re.compile(rb"(?:" + _STRING + rb"|null)", re.DOTALL)
_FLAT = re.compile(
    rb"\[(?:" + _ELEMENT.pattern + rb"(?:, " + _ELEMENT.pattern + rb")*+)?\]", re.DOTALL
)


def _py_json_text(data: Any) -> str:
    """jsonb's text -> the SQLite store's: the reference of undo._speedups.compact_flat_array
    for a flat array, and the path of any other text."""
    text = bytes(data)
    if _FLAT.fullmatch(text):
        # its elements, each found where the one before ended (after ", "), joined by ","
        # (json.loads + dumps: 36% of an undo from a PostgreSQL store, 3x this)
        return (b"[%b]" % b",".join(_ELEMENT.findall(text))).decode()
    return _dumps(json.loads(text))


#: the C compacting of a flat array (None: not built, or UNDO_PURE_PYTHON set)
_compact: Callable[[Any], str | None] | None = None
if not os.environ.get("UNDO_PURE_PYTHON"):
    with contextlib.suppress(ImportError):
        from undo._speedups import compact_flat_array as _compact


def json_text(data: Any) -> str:
    """jsonb's text -> the text the SQLite store holds (what _JsonText loads; the migration of
    images to text, _schema._m004_rest, makes old rows so)."""
    # an image in C (the regular expressions were 40% of an undo's own time, bench/undo)
    if _compact is not None and (text := _compact(data)) is not None:
        return text
    return _py_json_text(data)


class _JsonText(Loader):
    """jsonb -> its text as the SQLite store holds it. Not jsonb's own text (``["a", "b"]``):
    an undo compares images it composes (a TOASTed value an update kept) with stored ones as
    text, and a key given on the command line is compared with stored keys as text. A change's
    images and key are stored as that text (_schema._M004) and read as they are."""

    def load(self, data: Any) -> str:
        return json_text(data)


#: the tables the queries name, as views of one source's rows, or of several sources' for the
#: store-wide listings (``{s}``: their ids; ``{ids}``, ``{txns}``: their spans of change and
#: transaction ids)
_SCOPED = {
    "meta": "SELECT source, key, value FROM undo_store.meta WHERE source IN ({s})",
    "relations": "SELECT * FROM undo_store.relations WHERE source IN ({s})",
    "transactions": "SELECT * FROM undo_store.transactions WHERE source IN ({s})",
    "changes": "SELECT * FROM undo_store.changes WHERE {ids}",
    "txn_changes": "SELECT * FROM undo_store.txn_changes WHERE {txns}",
    "statements": "SELECT * FROM undo_store.statements WHERE {txns}",
    "activity": "SELECT a.* FROM undo_store.activity a WHERE a.relation IN"
    " (SELECT id FROM undo_store.relations WHERE source IN ({s}))",
    "gaps": "SELECT * FROM undo_store.gaps WHERE source IN ({s})",
    "undos": "SELECT * FROM undo_store.undos WHERE source IN ({s})",
    "guard_refusals": "SELECT * FROM undo_store.guard_refusals WHERE source IN ({s})",
    "ddl": "SELECT * FROM undo_store.ddl WHERE source IN ({s})",
    "malformed": "SELECT * FROM undo_store.malformed WHERE source IN ({s})",
    "pruned_counts": "SELECT * FROM undo_store.pruned_counts WHERE source IN ({s})",
}


class Runner:
    """What the store's reads call (``execute``, ``fragments``), on a PostgreSQL store's
    connection, scoped to one source, or to several (the store-wide listings)."""

    fragments = FRAGMENTS

    def __init__(self, conn: psycopg.Connection[Any], sources: tuple[int, ...]) -> None:
        self.conn = conn
        self.sources = sources
        conn.execute("SET search_path = pg_catalog, undo_store")
        # a listing's queries are small and indexed: starting parallel workers cost more than
        # they saved (`undo show` of a session on a 5,000,000-change store: each transaction's
        # query 160-200 ms with a worker, 45-85 without, bench/serve on 2 busy cores)
        conn.execute("SET max_parallel_workers_per_gather = 0")

        def spans(column: str) -> sql.Composable:
            return sql.SQL(" OR ").join(
                sql.SQL("({col} > {lo} AND {col} <= {hi})").format(
                    col=sql.Identifier(column),
                    lo=sql.Literal(lo),
                    hi=sql.Literal(lo + _schema.ID_SPAN),
                )
                for lo in (_schema.id_base(conn, s) for s in sources)
            )

        values = {
            "s": sql.SQL(", ").join(map(sql.Literal, sources)) if sources else sql.SQL("NULL"),
            "ids": spans("id") if sources else sql.SQL("false"),
            "txns": spans("txn") if sources else sql.SQL("false"),
        }
        # the views in one transaction that waits for no WAL flush: each its own transaction,
        # a catalog change each, was a commit waiting for the store's fsync, a dozen a reader
        # (each dashboard request, each listing), up to 200 ms on a busy store; nothing is
        # lost if that commit is: the views are this session's only
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")
            for name, text in _SCOPED.items():
                conn.execute(
                    sql.SQL("CREATE OR REPLACE TEMP VIEW {} AS ").format(sql.Identifier(name))
                    + sql.SQL(text).format(**values)  # constant text
                )

    def _cursor(self) -> psycopg.Cursor[Any]:
        # the loaders on this cursor only: the writer reads times as datetimes
        cur = self.conn.cursor()
        cur.adapters.register_loader("timestamptz", _TimeText)
        cur.adapters.register_loader("jsonb", _JsonText)
        return cur

    def stream(
        self, query: str, parameters: Sequence[Any], unsorted: bool = False
    ) -> Iterator[Any]:
        """A query's rows as they arrive, :data:`_CHUNK` at a time, not the whole result before
        the first: for a caller that runs nothing else on this connection until the last row
        (psycopg refuses it meanwhile); one closed early cancels its query. ``unsorted``: its
        ORDER BY is read from an index, never sorted (one more round trip before and after)."""
        text = query.replace("%", "%%").replace("?", "%s")
        rows = self._cursor().stream(text.encode(), list(parameters), size=_CHUNK)
        return _without_sort(self.conn, rows) if unsorted else rows

    def execute(self, query: str, parameters: Any = ()) -> psycopg.Cursor[Any]:
        cur = self._cursor()
        params = list(parameters or ())
        # the one adaptation every query takes: the store's SQL holds '?' only as placeholders
        text = query.replace("%", "%%").replace("?", "%s") if params else query
        return cur.execute(text.encode(), params or None)


#: rows a stream takes at a time (chunked rows need libpq 17; before, one at a time)
_CHUNK = 1000 if psycopg.pq.version() >= 170000 else 1


def _without_sort(conn: psycopg.Connection[Any], rows: Iterator[Any]) -> Iterator[Any]:
    """``rows`` planned with no sort: the planner's estimate is no guide to a range of changes
    (no statistics yet, or a table rare in the store but not in the range), and a sort of a
    bulk statement's changes spilled to disk before the first row (300,000: 0.42 s, against
    0.12 s for the whole read in id order)."""
    conn.execute("SET enable_sort = off")
    try:
        yield from rows
    finally:
        with contextlib.suppress(psycopg.OperationalError):  # a lost connection: its error
            conn.execute("RESET enable_sort")


#: a transaction's range of changes from which a table's are read in id order, never sorted
_SORT_BELOW = 10_000


class PgStore(SqliteStore):
    """The store in the schema undo_store of the database at ``location``, for one source.

    The SQL reads of SqliteStore are the same text here, run by :class:`Runner` (``self.db``);
    what the engine does otherwise (size, checks, writing, pruning, meta) is its own."""

    engine = "PostgreSQL"

    def __init__(self, location: str, create: bool = False, source: str | None = None) -> None:
        self.location = location
        self.conn = _schema.open_connection(location, create)
        _schema.OPEN.add(self)
        self.source_id: int | None = None
        self.source_name: str | None = None
        self._runner: Runner | None = None
        try:
            self._choose(source)
        except BaseException:
            self.conn.close()
            raise

    def _where(self) -> str:
        return masked_dsn(self.location)

    def sources(self) -> list[Source]:
        return [
            Source(int(r[0]), r[1], r[2], r[3])
            for r in self.conn.execute(
                "SELECT id, name, system_identifier, database_name FROM undo_store.sources"
                " ORDER BY id"
            )
        ]

    def use(self, name: str) -> Source:
        known = self.sources()
        found = next((s for s in known if s.name == name), None)
        if found is None:
            raise unknown_source(name, known, masked_dsn(self.location))
        self.source_id, self.source_name = found.id, found.name
        return found

    @property
    def db(self) -> Any:
        """The reads' runner, made on first use."""
        return self._scoped((self.source,))

    def _scoped(self, ids: tuple[int, ...]) -> Any:
        """The runner of these sources' rows (one source's, or several for the store-wide
        listings), its views made again when they change."""
        if self._runner is None or self._runner.sources != ids:
            self._runner = Runner(self.conn, ids)
        return self._runner

    def changes(
        self, first: int, last: int, rel_id: int, xid: int | None
    ) -> Iterator[StoredChange]:
        # streamed, not fetched whole before the first is used (peak RSS 113-153 MB against
        # SQLite's 45-49 for 300,000 changes, bench/undo): the engine reads nothing else from
        # the store until the last (they go into a COPY or the script, undo.engine.apply).
        # `relation = ?`, not SQLite's `+relation` (which keeps SQLite off its index on
        # relation): this store has no such index, and the planner took `+relation = ?` for
        # 0.5% of the range, so it sorted a bulk statement's changes after a bitmap scan; a
        # large range is read in id order whatever the estimate (a small one's sort is cheap,
        # and a session of many small transactions pays no more round trips)
        return map(
            StoredChange._make,
            self.db.stream(
                "SELECT id, op, old, new, unchanged, ? FROM changes"
                " WHERE id BETWEEN ? AND ? AND relation = ? ORDER BY id",
                [xid, first, last, rel_id],
                unsorted=last - first >= _SORT_BELOW,
            ),
        )

    def register_source(
        self, name: str | None, system_identifier: str, database: str, reregister: bool = False
    ) -> str:
        got = _schema.register_source(
            self.conn, name, system_identifier, database, reregister, masked_dsn(self.location)
        )
        return self.use(next(s.name for s in self.sources() if s.id == got)).name

    @property
    def source(self) -> int:
        if self.source_id is None:
            known = self.sources()
            where = masked_dsn(self.location)
            if self.source_name is not None:
                raise unknown_source(self.source_name, known, where)
            if not known:
                raise BadInput(f"the audit store {where} has no source yet: run `undo init`")
            raise BadInput(
                f"the audit store {where} holds several sources"
                f" ({', '.join(s.name for s in known)}): name one with --source"
            )
        return self.source_id

    # -- the store itself ------------------------------------------------------------------
    def close(self) -> None:
        if self.conn.broken:  # so that the error it raised is named as the store's
            _schema.LOST.add(self.location)
        with contextlib.suppress(psycopg.Error):
            self.conn.close()

    def __del__(self) -> None:
        # callers drop a store as they drop an SQLite one, which closes with its object
        if getattr(self, "conn", None) is not None:
            self.close()

    def atomic(self) -> contextlib.AbstractContextManager[Any]:
        return self.conn.transaction()

    def size(self) -> int:
        row = self.conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'undo_store' AND c.relkind IN ('r', 'm')"
        ).fetchone()
        return int(row[0]) if row else 0

    def quick_check(self) -> list[str]:
        return []  # PostgreSQL checks its own pages (data checksums, amcheck)

    def returns_space(self) -> bool:
        return True

    def notes(self) -> list[str]:
        return []

    def probe_write(self) -> None:
        with contextlib.suppress(_Probe), self.conn.transaction():
            self.conn.execute(
                "UPDATE undo_store.meta SET value = value WHERE source = %s AND key = 'slot'",
                (self.source,),
            )
            raise _Probe

    def writer(self) -> PgStoreWriter:  # type: ignore[override]
        return PgStoreWriter(self.conn, self.source)

    def prune(self, before: str) -> PruneReport:
        """Every source's history before the cut (postgres/_prune.py: partitions dropped)."""
        return _prune.prune(self.conn, before, self.size)

    def prune_step(self, before: str) -> StepReport:
        return _prune.prune_step(self.conn, before)

    # -- metadata, gaps --------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        if self.source_id is None:
            return None
        return _schema.get_meta(self.conn, self.source_id, key)

    def set_meta(self, values: Mapping[str, str | None]) -> None:
        with self.conn.transaction():
            for k, v in values.items():
                _schema.set_meta(self.conn, self.source, k, v)

    def record_gap(self, from_lsn: int | None, to_lsn: int | None, reason: str) -> None:
        self.conn.execute(
            "INSERT INTO undo_store.gaps (source, detected_at, from_lsn, to_lsn, reason)"
            " VALUES (%s, %s, %s, %s, %s)",
            (self.source, datetime.now(UTC), from_lsn, to_lsn, reason),
        )


class _Probe(Exception):
    """Rolls back the write that shows the store can be written."""
