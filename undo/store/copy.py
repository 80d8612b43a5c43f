"""`undo store copy`: a whole store into an empty one, of either kind.

Each store kind exports its logical content from one consistent snapshot (:class:`Export`:
SQLite, one read transaction; PostgreSQL, one REPEATABLE READ transaction) and imports another's
(:func:`load_sqlite`, :func:`load_pg`) in one transaction of its own, so that a copy is whole
or nothing; :func:`copy_store` is the two together.

The logical content is the stores' tables by name, each a set of columns, with values as the
SQLite store holds them: times as the store's time text ('2026-01-19T10:25:31.000000Z'), JSON
(images, keys, column lists) as compact text, booleans as 0/1, bytes as bytes. A table is copied
in the columns both stores have; what one kind keeps and the other derives is given by the
export (a change's ``commit_time``, PostgreSQL's partition key, from its transaction) and
dropped by an import that has no column for it. Each source's keys (slot, decoder, position...)
are the content's ``meta`` (SQLite: source_meta; PostgreSQL: meta of sources but 0); the
store's own keys stay the target's.

Ids are kept where they can be: a change, a transaction, a table version keeps its id, so that
everything naming one (a transaction's change range, an undo's selection) names the same thing
in the copy, and capture into the copy goes on from the ids and the position the snapshot held.
A PostgreSQL store gives each source a span of ids (postgres/_schema.ID_SPAN) and an SQLite
store one sequence for all: sources whose ids interleave are numbered anew into spans of their
own on the way into PostgreSQL, in their order, references following (_id_plan).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from undo.core.errors import BadInput, Refused

#: tables in the order they are copied (what names a row comes before it); any other table the
#: two stores share comes after these
ORDER = (
    "sources",
    "meta",
    "relations",
    "transactions",
    "changes",
    "txn_changes",
    "statements",
    "activity",
    "gaps",
    "undos",
    "guard_refusals",
    "ddl",
    "malformed",
)
#: the store's structure, not its content: made by the target's own migrations and partitioning
_STRUCTURE = {"migrations", "change_partitions", "_sqlite_migrations"}
#: JSON as the stores write it (compact, not ASCII-escaped)
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
#: rows per progress line and per write
CHUNK = 50_000

#: (table, rows copied so far, rows it holds): told at the start and end of each table and
#: every CHUNK rows
Progress = Callable[[str, int, int], None]


class Export:
    """A store's content as of one snapshot, table by table (use as a context manager: the
    snapshot is held until it is left)."""

    engine: str
    #: table -> the columns the export gives (physical and derived), in the snapshot
    tables: dict[str, tuple[str, ...]]

    def __enter__(self) -> Export:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    def count(self, table: str) -> int:
        """The rows of a table in the snapshot."""
        raise NotImplementedError

    def rows(self, table: str, columns: Sequence[str]) -> Iterator[tuple[Any, ...]]:
        """A table's rows in the snapshot, these columns of each, in id order where it has ids."""
        raise NotImplementedError

    def sources(self) -> list[dict[str, Any]]:
        """The sources, each as a row of ``sources`` (at least id, name, system_identifier,
        database_name; id_base where the store keeps it)."""
        columns = self.tables["sources"]
        return [dict(zip(columns, r, strict=True)) for r in self.rows("sources", columns)]

    def first_ids(self) -> dict[int, int | None]:
        """Each source's smallest transaction id (None: it has none)."""
        raise NotImplementedError

    def commit_times(self) -> Iterator[str]:
        """The commit times of the transactions (to the minute at least), as time text."""
        raise NotImplementedError


# -- SQLite ----------------------------------------------------------------------------------
class SqliteExport(Export):
    """The content of an SQLite store, in one read transaction (WAL: capture goes on writing,
    this sees the file as it was at its first read)."""

    engine = "SQLite"

    def __init__(self, db: Any) -> None:
        self.conn = db.conn
        self.conn.execute("BEGIN")
        self.open = True
        try:
            names = [
                r[0]
                for r in self.conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                    " AND name NOT LIKE 'sqlite%' ORDER BY name"
                )
            ]
            self.tables = {
                n: tuple(r[1] for r in self.conn.execute("SELECT * FROM pragma_table_info(?)", [n]))
                for n in names
                if n not in _STRUCTURE
            }
            # each source's keys are in source_meta (meta is the store's own, which a target
            # keeps its own of): that is the content's meta
            self.tables["meta"] = self.tables.pop("source_meta")
            if "commit_time" not in self.tables.get("changes", ("commit_time",)):
                self.tables["changes"] += ("commit_time",)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.open:
            self.open = False
            with contextlib.suppress(Exception):
                self.conn.execute("ROLLBACK")

    def count(self, table: str) -> int:
        table = "source_meta" if table == "meta" else table
        return int(self.conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])  # noqa: S608 (a table name read from sqlite_master)

    def rows(self, table: str, columns: Sequence[str]) -> Iterator[tuple[Any, ...]]:
        exprs = []
        for c in columns:
            if table == "changes" and c == "commit_time":
                exprs.append("(SELECT t.commit_time FROM transactions t WHERE t.id = x.txn)")
            else:
                exprs.append('x."' + c.replace('"', '""') + '"')
        order = (
            "ORDER BY x.rowid"
            if table not in ("txn_changes", "statements", "pruned_counts")
            else ""
        )
        if table == "meta":
            table, order = "source_meta", ""
        query = f'SELECT {", ".join(exprs)} FROM "{table}" x {order}'  # noqa: S608 (names from the store's own schema)
        cur = self.conn.execute(query)
        while batch := cur.fetchmany(CHUNK):
            yield from batch

    def first_ids(self) -> dict[int, int | None]:
        found = dict(self.conn.execute("SELECT source, min(id) FROM transactions GROUP BY source"))
        return {s["id"]: found.get(s["id"]) for s in self.sources()}

    def commit_times(self) -> Iterator[str]:
        for (t,) in self.conn.execute(
            "SELECT DISTINCT substr(commit_time, 1, 16) FROM transactions"
        ):
            yield t + ":00.000000Z"  # by the minute: a partition is whole minutes


def sqlite_empty(db: Any) -> list[str]:
    """The tables of an SQLite store that hold rows (of those a copy writes; meta holds the
    store's own keys)."""
    names = [
        r[0]
        for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'"
        )
    ]
    return [
        n
        for n in names
        if n not in _STRUCTURE | {"meta"}
        and db.execute(f'SELECT EXISTS (SELECT 1 FROM "{n}")').fetchone()[0]  # noqa: S608
    ]


def load_sqlite(db: Any, export: Export, progress: Progress) -> dict[str, int]:
    """Write the export into an empty SQLite store, in one transaction; rows per table."""
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        held = sqlite_empty(db)
        if held:
            raise Refused(_not_empty(held))
        mine = {
            n: tuple(r[1] for r in conn.execute("SELECT * FROM pragma_table_info(?)", [n]))
            for (n,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'"
            ).fetchall()
            if n not in _STRUCTURE
        }
        mine["meta"] = mine.pop("source_meta")  # each source's keys: the content's meta
        _refuse_lost_tables(export, mine)
        copied: dict[str, int] = {}
        for table in _order(export, mine):
            columns = [c for c in export.tables[table] if c in mine[table]]
            total = export.count(table)
            progress(table, 0, total)
            into = "source_meta" if table == "meta" else table
            text = (
                f'INSERT INTO "{into}" ({", ".join(_quoted(c) for c in columns)})'  # noqa: S608
                f" VALUES ({', '.join('?' * len(columns))})"
            )
            n = 0
            batch: list[tuple[Any, ...]] = []
            for row in export.rows(table, columns):
                batch.append(row)
                if len(batch) >= CHUNK:
                    conn.executemany(text, batch)
                    n += len(batch)
                    batch.clear()
                    progress(table, n, total)
            if batch:
                conn.executemany(text, batch)
                n += len(batch)
            progress(table, n, total)
            copied[table] = n
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
        raise
    return copied


# -- PostgreSQL ------------------------------------------------------------------------------
class PgExport(Export):
    """The content of a PostgreSQL store in one REPEATABLE READ transaction: every table as of
    one snapshot, capture writing meanwhile or not."""

    engine = "PostgreSQL"

    def __init__(self, conn: Any) -> None:
        from undo.store.postgres._store import _JsonText, _TimeText

        self.conn = conn
        self.loaders = (_TimeText, _JsonText)
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        self.open = True
        try:
            self.tables = _pg_tables(conn)
        except BaseException:
            self.close()
            raise
        self._n = 0

    def close(self) -> None:
        if self.open:
            self.open = False
            with contextlib.suppress(Exception):
                self.conn.execute("ROLLBACK")

    def _where(self, table: str) -> Any:
        from psycopg import sql

        # meta of source 0 is the store's own (partition width): the target keeps its own
        return sql.SQL("WHERE source <> 0" if table == "meta" else "")

    def count(self, table: str) -> int:
        from psycopg import sql

        row = self.conn.execute(
            sql.SQL("SELECT count(*) FROM {} {}").format(
                sql.Identifier("undo_store", table), self._where(table)
            )
        ).fetchone()
        return int(row[0]) if row else 0

    def rows(self, table: str, columns: Sequence[str]) -> Iterator[tuple[Any, ...]]:
        from psycopg import sql

        self._n += 1
        cur = self.conn.cursor(name=f"undo_copy_{self._n}")
        cur.adapters.register_loader("timestamptz", self.loaders[0])
        cur.adapters.register_loader("jsonb", self.loaders[1])
        order = sql.SQL("ORDER BY id" if "id" in self.tables[table] else "")
        if table == "meta":
            order = sql.SQL("ORDER BY source, key")
        cur.execute(
            sql.SQL("SELECT {} FROM {} {} {}").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in columns),
                sql.Identifier("undo_store", table),
                self._where(table),
                order,
            )
        )
        try:
            while batch := cur.fetchmany(CHUNK):
                yield from (
                    tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in batch
                )
        finally:
            cur.close()

    def first_ids(self) -> dict[int, int | None]:
        found = dict(
            self.conn.execute(
                "SELECT s.id, min(t.id) FROM undo_store.sources s"
                " LEFT JOIN undo_store.transactions t ON t.source = s.id GROUP BY s.id"
            ).fetchall()
        )
        return {int(k): v for k, v in found.items()}

    def commit_times(self) -> Iterator[str]:
        from undo.core.times import iso

        for (t,) in self.conn.execute(
            "SELECT DISTINCT date_trunc('minute', commit_time) FROM undo_store.transactions"
        ):
            yield iso(t)


def _pg_tables(conn: Any) -> dict[str, tuple[str, ...]]:
    """The store's tables (partitioned ones as one: their partitions are its rows) and columns."""
    rows = conn.execute(
        "SELECT c.relname, a.attname FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
        " WHERE n.nspname = 'undo_store' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
        " ORDER BY c.relname, a.attnum"
    ).fetchall()
    tables: dict[str, tuple[str, ...]] = {}
    for name, column in rows:
        if name not in _STRUCTURE:
            tables[name] = (*tables.get(name, ()), column)
    return tables


def pg_held(conn: Any) -> list[str]:
    """The tables of a PostgreSQL store that hold rows (the store's own meta aside)."""
    from psycopg import sql

    held = []
    for table in _pg_tables(conn):
        row = conn.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {} {})").format(
                sql.Identifier("undo_store", table),
                sql.SQL("WHERE source <> 0" if table == "meta" else ""),
            )
        ).fetchone()
        if row and row[0]:
            held.append(table)
    return held


def load_pg(conn: Any, export: Export, progress: Progress) -> dict[str, int]:
    """Write the export into an empty PostgreSQL store with COPY, in one transaction (the
    partitions its changes need made first, each in its own); rows per table."""
    from psycopg import sql

    from undo.store.postgres import _schema

    held = pg_held(conn)
    if held:
        raise Refused(_not_empty(held))
    mine = _pg_tables(conn)
    _refuse_lost_tables(export, mine)
    unclaimed = [s["name"] for s in export.sources() if not s.get("system_identifier")]
    if unclaimed:
        # a PostgreSQL store knows a source by its identity only: it could not claim it later
        raise BadInput(
            f"the source {unclaimed[0]!r} came from a store made before sources were registered"
            " and no command has connected to its database since, so its identity is unknown:"
            " run `undo status` with its --dsn once (which records it), then copy"
        )
    bases, remap = _id_plan(export)
    # a time in each partition the changes need (the target's width), made before the copy's
    # transaction as capture makes them: each in its own, locking out no reader
    width = _schema.partition_seconds(conn)
    starts = {_epoch(t) // width * width for t in export.commit_times()}
    if starts:
        _schema.ensure_partitions(
            conn, *(datetime.fromtimestamp(s, UTC) for s in sorted(starts)), ahead=0
        )
    copied: dict[str, int] = {}
    with conn.transaction():
        # nothing else registers a source or writes meanwhile (init, capture take this lock)
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_schema._LOCK,))
        held = pg_held(conn)
        if held:
            raise Refused(_not_empty(held))
        for table in _order(export, mine):
            columns = [c for c in export.tables[table] if c in mine[table]]
            given = list(columns)
            if table == "sources" and "id_base" not in columns:
                columns.append("id_base")
            total = export.count(table)
            progress(table, 0, total)
            n = 0
            copy = sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier("undo_store", table),
                sql.SQL(", ").join(sql.Identifier(c) for c in columns),
            )
            renumber = _renumbering(table, given, remap)
            with conn.cursor() as cur, cur.copy(copy) as out:
                for row in export.rows(table, given):
                    if table == "sources" and len(columns) > len(given):
                        row = (*row, bases[row[given.index("id")]])
                    if renumber is not None:
                        row = renumber(row)
                    out.write_row(tuple(_pg_value(v) for v in row))
                    n += 1
                    if n % CHUNK == 0:
                        progress(table, n, total)
            progress(table, n, total)
            copied[table] = n
        _check_spans(conn)
        _reset_identities(conn)
    return copied


def _epoch(t: str) -> int:
    return int(datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp())


def _pg_value(v: Any) -> Any:
    """A value as PostgreSQL's text takes it: U+0000 (which SQLite keeps and text refuses)
    as the capture writer stores it (postgres/_writer._text)."""
    if type(v) is str and "\x00" in v:
        return v.replace("\x00", "\ufffd")
    return v


#: a transaction's old id -> its new id and how far its changes' ids move
Remap = dict[int, tuple[int, int]]


def _id_plan(export: Export) -> tuple[dict[int, int], Remap | None]:
    """Each source's span of ids in a PostgreSQL store, and the renumbering its transactions
    and changes need (None: none). A PostgreSQL store's spans are kept. Else (an SQLite store,
    whose sources share one sequence of ids) the ids are kept where each source's lie in a span
    no other's do (one source, always); otherwise each source's transactions and changes are
    numbered anew from the start of a span of its own, in their order, each transaction's
    changes still one range."""
    from undo.store.postgres._schema import ID_SPAN

    sources = export.sources()
    if sources and all(s.get("id_base") is not None for s in sources):
        return {s["id"]: int(s["id_base"]) for s in sources}, None
    first = export.first_ids()
    bases: dict[int, int] = {}
    for sid, low in sorted(first.items(), key=lambda kv: (kv[1] is None, kv[0])):
        base = (
            max([*bases.values(), -ID_SPAN]) + ID_SPAN
            if low is None
            else (int(low) - 1) // ID_SPAN * ID_SPAN
        )
        if base in bases.values():
            break  # two sources' ids in one span: renumbered
        bases[sid] = base
    else:
        return bases, None
    bases = {s["id"]: i * ID_SPAN for i, s in enumerate(sorted(sources, key=lambda s: s["id"]))}
    want = ["id", "source", "first_change", "last_change"]
    txns: dict[int, int] = dict.fromkeys(bases, 0)
    changes: dict[int, int] = dict.fromkeys(bases, 0)
    remap: Remap = {}
    for tid, sid, lo, hi in export.rows("transactions", want):
        txns[sid] += 1
        delta = 0
        if lo is not None:
            delta = bases[sid] + changes[sid] + 1 - lo
            changes[sid] += hi - lo + 1
        remap[tid] = (bases[sid] + txns[sid], delta)
    return bases, remap


def _renumbering(
    table: str, columns: Sequence[str], remap: Remap | None
) -> Callable[[tuple[Any, ...]], tuple[Any, ...]] | None:
    """What renumbers a table's rows by ``remap`` (None: nothing to)."""
    if remap is None:
        return None
    at = {c: i for i, c in enumerate(columns)}

    def txn(tid: Any) -> Any:
        return remap[tid][0] if tid in remap else tid

    def each(fix: Callable[[list[Any]], None]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
        def run(row: tuple[Any, ...]) -> tuple[Any, ...]:
            values = list(row)
            fix(values)
            return tuple(values)

        return run

    if table == "transactions":

        def fix(v: list[Any]) -> None:
            new, delta = remap[v[at["id"]]]
            v[at["id"]] = new
            for c in ("first_change", "last_change"):
                if c in at and v[at[c]] is not None:
                    v[at[c]] += delta

        return each(fix)
    if table == "changes":

        def fix_change(v: list[Any]) -> None:
            new, delta = remap[v[at["txn"]]]
            v[at["txn"]] = new
            v[at["id"]] += delta

        return each(fix_change)
    if table in ("txn_changes", "statements"):

        def fix_txn(v: list[Any]) -> None:
            v[at["txn"]] = txn(v[at["txn"]])

        return each(fix_txn)
    if table == "undos" and "selection" in at:

        def fix_selection(v: list[Any]) -> None:
            # the undone transactions' ids; anything else is kept as it came
            with contextlib.suppress(ValueError, TypeError):
                ids = json.loads(v[at["selection"]])
                if isinstance(ids, list):
                    v[at["selection"]] = _dumps(sorted(txn(i) for i in ids))

        return each(fix_selection)
    return None


def _check_spans(conn: Any) -> None:
    from undo.store.postgres._schema import ID_SPAN

    row = conn.execute(
        "SELECT s.name FROM undo_store.sources s JOIN undo_store.transactions t"
        " ON t.source = s.id WHERE t.id <= s.id_base OR t.id > s.id_base + %(span)s"
        " OR t.first_change <= s.id_base OR t.last_change > s.id_base + %(span)s LIMIT 1",
        {"span": ID_SPAN},
    ).fetchone()
    if row is not None:
        raise Refused(
            f"the ids of source {row[0]!r} do not fit one span of a PostgreSQL store: nothing"
            " was copied"
        )


def _reset_identities(conn: Any) -> None:
    """Identity columns go on after the ids copied."""
    from psycopg import sql

    for table, column in conn.execute(
        "SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'undo_store' AND a.attidentity <> '' AND NOT c.relispartition"
    ).fetchall():
        name = sql.Identifier("undo_store", table)
        conn.execute(
            sql.SQL(
                "SELECT setval(pg_get_serial_sequence({}, {}), max_id, true)"
                " FROM (SELECT max({}) AS max_id FROM {}) m WHERE max_id IS NOT NULL"
            ).format(
                sql.Literal(f"undo_store.{table}"),
                sql.Literal(column),
                sql.Identifier(column),
                name,
            )
        )


# -- shared ----------------------------------------------------------------------------------
def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _order(export: Export, mine: dict[str, tuple[str, ...]]) -> list[str]:
    shared = [t for t in export.tables if t in mine]
    return [t for t in ORDER if t in shared] + sorted(t for t in shared if t not in ORDER)


def _refuse_lost_tables(export: Export, mine: dict[str, tuple[str, ...]]) -> None:
    """A table of the export the target has no place for, holding anything, would be lost:
    refused, nothing written (a store of another undo version)."""
    for table in export.tables:
        if table in mine or export.count(table) == 0:
            continue
        raise Refused(
            f"the target store has no table {table!r} (made by another undo version?): nothing"
            " was copied"
        )


def _not_empty(held: list[str]) -> str:
    return (
        f"the target store is not empty (it holds {', '.join(held)}): copy into a new store,"
        " nothing was written"
    )


@dataclass(frozen=True)
class Copied:
    """What a copy wrote: rows per table, and each source's position (what capture goes on
    from), by source name."""

    rows: dict[str, int]
    positions: dict[str, str | None]


def copy_store(origin: str, target: str, progress: Progress) -> Copied:
    """Copy the store at ``origin`` into the store at ``target`` (made when there is none),
    which must hold nothing (Refused, exit 1, nothing written)."""
    from undo.store import is_postgres

    with contextlib.ExitStack() as stack:
        if is_postgres(origin):
            from undo.store.postgres import _schema as pg

            conn = stack.enter_context(pg.open_connection(origin))
            content: Export = stack.enter_context(PgExport(conn))
        else:
            from undo.store import _schema as lite

            db = lite.open_database(origin)
            stack.callback(db.conn.close)
            content = stack.enter_context(SqliteExport(db))
        if is_postgres(target):
            from undo.store.postgres import _schema as pg

            out = stack.enter_context(pg.open_connection(target, create=True))
            rows = load_pg(out, content, progress)
        else:
            from undo.store import _schema as lite

            tdb = lite.open_database(target, create=True)
            stack.callback(tdb.conn.close)
            rows = load_sqlite(tdb, content, progress)
        return Copied(rows, positions(content))


def positions(content: Export) -> dict[str, str | None]:
    """Each source's position (meta 'position') in the content, by source name."""
    names = {s["id"]: s["name"] for s in content.sources()}
    out: dict[str, str | None] = dict.fromkeys(names.values())
    for source, key, value in content.rows("meta", ("source", "key", "value")):
        if key == "position":
            out[names[source]] = value
    return out
