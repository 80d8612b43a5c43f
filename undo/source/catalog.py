"""What capture asks the source's catalog about a relation it meets in the stream: its OID,
types, key, whether undo audits it, and what makes its capture incomplete now."""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from undo.core.records import Relation
from undo.source import pg

log = logging.getLogger(__name__)

_KEY_QUERY = """
SELECT i.indkey::int2[], i.indisprimary
  FROM pg_index i
 WHERE i.indrelid = %(oid)s AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
   AND i.indexprs IS NULL AND i.indimmediate
   AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = i.indrelid
                    AND a.attnum = ANY (i.indkey) AND NOT a.attnotnull)
 ORDER BY i.indisprimary DESC, i.indisreplident DESC, i.indnatts, i.indexrelid
 LIMIT 1
"""


class Catalog:
    """What capture asks the source's catalog about a relation it meets in the stream."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        row = conn.execute(
            "SELECT CASE WHEN to_regclass('undo.config') IS NOT NULL"
            " THEN (SELECT schemas FROM undo.config) END"
        ).fetchone()
        #: schemas whose every table is audited: a table of theirs not found was audited
        self.schemas: frozenset[str] = frozenset(row[0] or ()) if row else frozenset()
        self.has_problems: bool | None = None  # undo.table_problems is there (init of 0.3)

    def resolve(self, rel: Relation) -> tuple[bool, tuple[int, ...] | None, bool]:
        """Fill in oid and types; return (audited, key positions, old images incomplete)."""
        if rel.oid is None:
            row = self.conn.execute(
                "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relname = %s",
                (rel.schema, rel.name),
            ).fetchone()
            rel.oid = None if row is None else int(row[0])
        attrs = (
            self.conn.execute(
                "SELECT attnum, attname, attgenerated <> '', atttypid, atttypmod FROM pg_attribute"
                " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (rel.oid,),
            ).fetchall()
            if rel.oid is not None
            else []
        )
        if rel.types is None and rel.type_oids is not None and rel.type_mods is None:
            # wal2json sends type OIDs but no typmods: take them from the catalog where the
            # column still has that type (else the typmod is lost, and undo sees the change)
            live = {a[1]: (a[3], a[4]) for a in attrs}
            rel.type_mods = tuple(
                live[c][1] if c in live and live[c][0] == t else -1
                for c, t in zip(rel.columns, rel.type_oids, strict=True)
            )
        if rel.types is None and rel.type_oids is not None:
            # named as the capture role's own path shows them (public's citext as citext), as
            # ever; the connection's path is pinned, so that path is set for this statement
            # only, every name in which is schema-qualified and exactly typed
            with pg.operator_path(self.conn):
                rows = self.conn.execute(
                    "SELECT pg_catalog.format_type(u.t, u.m) FROM ROWS FROM"
                    " (pg_catalog.unnest(%s::pg_catalog.oid[]),"
                    " pg_catalog.unnest(%s::pg_catalog.int4[])) WITH ORDINALITY AS u(t, m, i)"
                    " ORDER BY u.i",
                    (
                        list(rel.type_oids),
                        [None if m == -1 else m for m in rel.type_mods or ()],
                    ),
                ).fetchall()
            rel.types = tuple(r[0] for r in rows)
        if rel.oid is None:
            return False, None, True
        root = self.conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid ="
            " c.relnamespace WHERE c.oid = pg_partition_root(%s::oid) AND c.oid <> %s::oid",
            (rel.oid, rel.oid),
        ).fetchone()
        rel.root = None if root is None else (root[0], root[1])
        audited = self.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM undo.audited WHERE relid = %s)", (rel.oid,)
        ).fetchone()
        attnames = {a[0]: a[1] for a in attrs}
        # Whether old images lack columns is a fact of the time the changes were written, not
        # of the catalog now: DDL committed since (ADD, DROP, RENAME, ALTER COLUMN TYPE) makes
        # the stream's column list differ from today's, with every old image whole.
        if rel.replident is not None:
            # pgoutput: the table's replica identity then (its Relation message); only FULL
            # sends old rows whole ('O'), the others key-only ('K') or none
            partial = rel.replident != "f"
        else:
            partial = bool(rel.columns) and not rel.whole and self._key_only(rel, attrs)
        key = None
        row = self.conn.execute(_KEY_QUERY, {"oid": rel.oid}).fetchone()
        if row is not None:
            cols = [attnames.get(n) for n in row[0]]
            if all(c in rel.columns for c in cols):
                key = tuple(rel.columns.index(c) for c in cols if c is not None)
            else:  # renamed since: the same columns, of the same types, in the same places
                for shape in (attrs, [a for a in attrs if not a[2]]):
                    if rel.type_oids == tuple(a[3] for a in shape):
                        at = {a[0]: i for i, a in enumerate(shape)}
                        key = tuple(at[n] for n in row[0]) if set(row[0]) <= set(at) else None
                        break
        return bool(audited and audited[0]), key, partial

    def _key_only(self, rel: Relation, attrs: list[Any]) -> bool:
        """Whether wal2json's old images of this column list may be key-only (the table's
        replica identity was DEFAULT or INDEX then). wal2json sends no replica identity: under
        FULL an old image has every column the table had then, under the others the columns of
        one unique index. A list that is the columns of a unique index of the table's, which
        has more columns, is taken for key-only; so is any while the table is not FULL now."""
        # each index's columns as one jsonb array: an array of text arrays must be rectangular
        # (a one-column key beside a three-column unique index was an error, capture's end)
        row = self.conn.execute(
            "SELECT c.relreplident = 'f', (SELECT pg_catalog.jsonb_agg((SELECT"
            "  pg_catalog.jsonb_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a"
            "  WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)))"
            "  FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique"
            "  AND i.indexprs IS NULL AND i.indpred IS NULL)"
            " FROM pg_class c WHERE c.oid = %s",
            (rel.oid,),
        ).fetchone()
        if row is None or not row[0]:
            return True
        names = set(rel.columns)
        indexes = row[1] or []
        return any(set(k) == names for k in indexes) and any(a[1] not in names for a in attrs)

    def problems(self, oids: list[int] | None) -> list[tuple[str, str]]:
        """What is wrong now with the audited tables of these OIDs (None: every audited table),
        one (table, problem) each: undo.table_problems, the definition init and status use."""
        if self.has_problems is None:
            row = self.conn.execute(
                "SELECT to_regprocedure('undo.table_problems(oid[])') IS NOT NULL"
            ).fetchone()
            self.has_problems = bool(row and row[0])
            if not self.has_problems:
                log.warning(
                    "the source was prepared by an earlier undo: run `undo init` again, so that"
                    " capture can check audited tables on each DDL record",
                )
        if not self.has_problems or oids == []:
            return []
        return [
            (str(r[0]), str(r[1]))
            for r in self.conn.execute(
                "SELECT p.table_name, p.problem FROM undo.table_problems(ARRAY("
                "SELECT relid FROM undo.audited WHERE %(oids)s::oid[] IS NULL"
                " OR relid = ANY (%(oids)s::oid[]))) p",
                {"oids": oids},
            ).fetchall()
        ]
