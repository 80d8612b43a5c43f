"""The SQLite store's reads, run as they are on a PostgreSQL store, for one source.

The listings and an undo's reads are one set of queries (undo/store/_queries.py and
sqlite.py), written in SQLite's SQL. Rather than a second set to keep equal, a PostgreSQL
store runs the same text through :class:`Dialect`, which
- scopes every table to one source: temporary views of that source's rows under the SQLite
  store's table names (the session's own; ``pg_temp`` is searched first), over ``undo_store``;
- rewrites the few constructs the two dialects spell differently (placeholders, ``IS ?``,
  ``json_each``), listed in ``_REWRITES``;
- reads values as the SQLite store gives them: times as the store's time text, JSON as text.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.adapt import Loader

from undo.core.times import iso
from undo.store.postgres._schema import ID_SPAN, id_base

#: (SQLite, PostgreSQL), applied in order to each query's text
_REWRITES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"%"), "%%"),
    # a JSON array parameter's elements, compared as text
    (
        re.compile(r"([\w.]+) IN \(SELECT value FROM json_each\(\?\)\)"),
        r"\1::text IN (SELECT jsonb_array_elements_text(%s::jsonb))",
    ),
    (re.compile(r"\? IS (NOT )?NULL"), r"%s::text IS \1NULL"),
    (re.compile(r"WHERE 0\)"), "WHERE false)"),  # SQLite's false
    # PostgreSQL before 16 names every subquery in FROM (sessions' union)
    (
        re.compile(r"\) GROUP BY session_id, tag, tag_reason"),
        ") AS u GROUP BY session_id, tag, tag_reason",
    ),
    (re.compile(r" IS \?"), " IS NOT DISTINCT FROM %s"),
    (re.compile(r"\?"), "%s"),
]


def translate(query: str) -> str:
    """A query of the SQLite store as PostgreSQL takes it.

    >>> translate("SELECT a FROM t WHERE s IS ? AND n LIKE '5%' LIMIT ?")
    "SELECT a FROM t WHERE s IS NOT DISTINCT FROM %s AND n LIKE '5%%' LIMIT %s"
    >>> translate("WHERE id IN (SELECT value FROM json_each(?))")
    'WHERE id::text IN (SELECT jsonb_array_elements_text(%s::jsonb))'
    """
    for pattern, repl in _REWRITES:
        query = pattern.sub(repl, query)
    return query


class _TimeText(Loader):
    """timestamptz -> the store's time text ('2026-01-19T10:25:31.000000Z')."""

    def load(self, data: Any) -> str:
        return iso(datetime.fromisoformat(bytes(data).decode()))


class _JsonText(Loader):
    """jsonb -> its text, as the SQLite store holds JSON."""

    def load(self, data: Any) -> str:
        return bytes(data).decode()


#: the SQLite store's tables, as views of one source's rows (``{s}``: its id, ``{lo}``..``{hi}``:
#: its span of transaction and change ids)
_SCOPED = {
    "meta": "SELECT key, value FROM undo_store.meta WHERE source = {s}",
    "relations": "SELECT * FROM undo_store.relations WHERE source = {s}",
    "transactions": "SELECT * FROM undo_store.transactions WHERE source = {s}",
    "changes": "SELECT * FROM undo_store.changes WHERE id > {lo} AND id <= {hi}",
    "txn_changes": "SELECT * FROM undo_store.txn_changes WHERE txn > {lo} AND txn <= {hi}",
    "statements": "SELECT * FROM undo_store.statements WHERE txn > {lo} AND txn <= {hi}",
    "activity": "SELECT a.* FROM undo_store.activity a WHERE a.relation IN"
    " (SELECT id FROM undo_store.relations WHERE source = {s})",
    "gaps": "SELECT * FROM undo_store.gaps WHERE source = {s}",
    "undos": "SELECT * FROM undo_store.undos WHERE source = {s}",
    "guard_refusals": "SELECT * FROM undo_store.guard_refusals WHERE source = {s}",
    "ddl": "SELECT * FROM undo_store.ddl WHERE source = {s}",
    "malformed": "SELECT * FROM undo_store.malformed WHERE source = {s}",
}


class Dialect:
    """What the SQLite store's reads call (``execute``, ``conn``), on a PostgreSQL store's
    connection, scoped to one source."""

    def __init__(self, conn: psycopg.Connection[Any], source: int) -> None:
        self.conn = conn
        self.source = source
        conn.adapters.register_loader("timestamptz", _TimeText)
        conn.adapters.register_loader("jsonb", _JsonText)
        conn.execute("SET search_path = pg_catalog, undo_store")
        lo = id_base(conn, source)
        values = {"s": sql.Literal(source), "lo": sql.Literal(lo), "hi": sql.Literal(lo + ID_SPAN)}
        for name, text in _SCOPED.items():
            conn.execute(
                sql.SQL("CREATE OR REPLACE TEMP VIEW {} AS ").format(sql.Identifier(name))
                + sql.SQL(text).format(**values)  # constant text
            )

    def execute(self, query: str, params: Any = ()) -> psycopg.Cursor[Any]:
        return self.conn.execute(translate(query).encode(), list(params) or None)
