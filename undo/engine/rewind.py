"""`undo table`: put tables back as they were at a time, or show them as they were then.

A rewind is an undo whose selection is every captured change to the tables committed after the
time, whoever made it (untagged and untrusted transactions included, and counted): the same
engine, guarantees and ledger as `undo session`. ``as_of`` runs that rewind in a transaction,
reads the rows, and rolls it all back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from undo.core import names
from undo.core.config import Settings
from undo.core.errors import BadInput, NotFound, NothingToUndo, Refused
from undo.engine.apply import UndoReport, refuse_read_code, undo
from undo.engine.plan import Target
from undo.source import pg, sources
from undo.store.api import Store


def earliest(db: Store) -> str | None:
    """The earliest time a rewind can reach: where the store's history starts (the slot made
    by init; for stores made before that was recorded, their first commit), or the time
    history was pruned before, whichever is later."""
    return max(filter(None, (db.history_start(), db.meta("pruned_before"))), default=None)


def check_reachable(db: Store, time: str, tables: tuple[str, ...] = ()) -> None:
    """Refuse a time before the store's history, or one a gap in the audit trail follows (a
    gap of the stream, or of one of ``tables``, qualified: DDL that capture could not see
    through, whether or not the store holds any change of the table)."""
    first = earliest(db)
    if first is not None and time < first:
        raise Refused(
            f"{time} is before the audit store's history: the earliest time it can rewind to"
            f" is {first}"
        )
    before = db.position_at(time)
    # names compared as (schema, table): gaps name tables the way PostgreSQL quotes them
    wanted = {names.parse(t) for t in tables}
    for gap in db.gaps_after(time, before):
        if gap.kind == "stream" or (gap.table is not None and names.parse(gap.table) in wanted):
            where = "the audit trail" if gap.kind == "stream" else gap.table
            raise Refused(
                f"{where} has a gap after {time} ({gap.reason}; since {gap.detected_at}):"
                " changes in it are unknown, so the tables cannot be rewound past it"
            )


def _audited(conn: psycopg.Connection[Any], tables: Sequence[str]) -> list[tuple[int, str, str]]:
    """(OID, schema, name) of tables of the source that undo audits, named as in SQL. The names
    are read as the operator's SQL reads them (their search_path), safely (pg.resolve_tables);
    then the path is pinned for everything else on ``conn`` (docs/security.md)."""
    oids = pg.resolve_tables(conn, tables)
    pg.pin_path(conn)
    out = []
    for table, oid in zip(tables, oids, strict=True):
        found = conn.execute(
            "SELECT c.oid, n.nspname, c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s::oid",
            (oid,),
        ).fetchone()
        if found is None:
            raise NotFound(f"no table {table} in the source database")
        audited = conn.execute(
            "SELECT to_regclass('undo.audited') IS NOT NULL"
            " AND EXISTS (SELECT FROM undo.audited WHERE relid = %s::oid)",
            (found[0],),
        ).fetchone()
        if not (audited and audited[0]):
            raise Refused(
                f"{names.quote(found[1], found[2])} is not audited by undo: its past is not"
                " recorded"
            )
        out.append((found[0], found[1], found[2]))
    return out


def _recorded(settings: Settings, time: str, tables: tuple[str, ...]) -> tuple[str, ...]:
    """Those of the tables the store holds any change of, once the store's history reaches
    back to ``time`` with no gap after it (check_reachable)."""
    with sources.open_for(settings) as db:
        check_reachable(db, time, tables)
        out = []
        for t in tables:
            with contextlib.suppress(NotFound):
                db.resolve_table(t)
                out.append(t)
    return tuple(out)


def rewind(settings: Settings, tables: tuple[str, ...], to: str, **options: Any) -> UndoReport:
    """Undo every captured change to ``tables`` (a partitioned one: its partitions) committed
    after ``to``; ``options`` as for ``undo`` (apply, on_conflict, out, ...). An audited table
    the store has no change of is as it was."""
    with pg.connect(settings.dsn) as conn:
        covered = pg.with_partitions(
            conn, [names.quote(s, n) for _, s, n in _audited(conn, tables)]
        )
    recorded = _recorded(settings, to, covered)
    if not recorded:
        return UndoReport(
            notes=[f"no change to {', '.join(covered)} is recorded: nothing to rewind"]
        )
    try:
        return undo(settings, Target(tables=recorded, after=to), **options)
    except NothingToUndo as e:
        return UndoReport(notes=[f"{e}: nothing to rewind"])


def as_of(
    settings: Settings, table: str, time: str, where: str | None = None, **options: Any
) -> tuple[list[str], list[dict[str, str | None]]]:
    """The rows of ``table`` as they were at ``time`` (filtered by the SQL condition ``where``,
    evaluated on those rows), as (columns, rows of text values). Changes nothing: the rewind
    runs in a transaction that is rolled back, so it takes the same row locks an undo does for
    as long as it runs (``lock_timeout`` bounds the wait for them). Foreign keys are not
    checked: a row shows as it was even where its parent, in a table not rewound, is gone."""
    with pg.connect(settings.dsn) as conn:
        ((oid, schema, name),) = _audited(conn, [table])
        query = _rows_query(conn, oid, schema, name, where)
        covered = pg.with_partitions(conn, [names.quote(schema, name)])
    recorded = _recorded(settings, time, covered)
    out: dict[str, Any] = {}

    def read(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET LOCAL transaction_read_only = on")  # the condition cannot write
        try:
            # binary results need the extended query protocol (PQsendQueryParams), whose Parse
            # takes one statement: a condition with "; COMMIT; ..." in it is refused whole, so
            # it can neither end this transaction nor run anything after it
            cur = conn.cursor().execute(query, binary=True)
        except psycopg.Error as e:
            # the condition, or what the read runs without one (a row security policy's
            # function that writes, in this read-only transaction)
            what = f"--where {where!r}" if where else f"reading {names.quote(schema, name)}"
            raise BadInput(f"{what}: {e.diag.message_primary or e}") from None
        out["columns"] = [d.name for d in cur.description or []]
        out["rows"] = cur.fetchall()

    rewound = False
    if recorded:
        with contextlib.suppress(NothingToUndo):  # no change since: read the rows as they are
            undo(settings, Target(tables=recorded, after=time), apply=True, inspect=read, **options)
            rewound = True
    if not rewound:
        with pg.connect(settings.dsn, autocommit=False) as conn:
            pg.pin_path(conn)  # as in the undo's transaction: first, for the condition too
            # what the read runs (a row security policy's function) is judged as a rewind's
            refuse_read_code(conn, names.quote(schema, name), options.get("trust_owners", ()))
            read(conn)
            conn.rollback()
    return out["columns"], [dict(zip(out["columns"], r, strict=True)) for r in out["rows"]]


def _rows_query(
    conn: psycopg.Connection[Any], oid: int, schema: str, name: str, where: str | None
) -> sql.Composed:
    """Every column as its output text (as the store keeps values), ordered by the primary key
    (else by every column's text: some types have no order)."""
    cols = [
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
            (oid,),
        )
    ]
    key = [
        r[0]
        for r in conn.execute(
            "SELECT a.attname FROM pg_index i CROSS JOIN unnest(i.indkey) WITH ORDINALITY k(n, o)"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n"
            " WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.o",
            (oid,),
        )
    ]
    partitioned = conn.execute("SELECT relkind = 'p' FROM pg_class WHERE oid = %s", (oid,))
    only = sql.SQL("") if (partitioned.fetchone() or (False,))[0] else sql.SQL("ONLY ")
    return sql.SQL("SELECT {} FROM {}{} t WHERE {} ORDER BY {}").format(
        sql.SQL(", ").join(
            sql.SQL(
                "CASE WHEN t.{0} IS NULL THEN NULL ELSE pg_catalog.concat(t.{0}) END AS {0}"
            ).format(sql.Identifier(c))
            for c in cols
        ),
        only,
        sql.Identifier(schema, name),
        sql.SQL(where) if where else sql.SQL("true"),  # the user's own SQL, by design
        sql.SQL(", ").join(
            [sql.SQL("t.{}").format(sql.Identifier(c)) for c in key]
            or [sql.Composed([sql.Literal(i)]) for i in range(1, len(cols) + 1)]  # the texts
        ),
    )
