"""Pure builders of the inverse of stored changes: SQL composed with psycopg.sql, never pasted.

A value goes to PostgreSQL as an untyped literal or parameter, so the column's own input
function parses the exact text capture stored. Rows are found by their key (primary key or a
unique not-null index recorded at capture), else by the text of every column, one physical row
at a time; the text form also serves types without an equality operator (json, xml, point).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from .errors import Refused
from .plan import StoredChange, TableVersion, _scan

Value = str | None
Lit = Callable[[Value], sql.Composable]


@dataclass(frozen=True)
class LiveTable:
    """A recorded table version checked against the live catalog."""

    ident: sql.Identifier
    version: TableVersion
    writable: tuple[int, ...]  # positions written back (generated columns left out)
    identity_always: bool


def live_table(conn: psycopg.Connection[Any], tv: TableVersion) -> LiveTable:
    """Refuse a table dropped, re-created, renamed or altered since capture."""
    row = None
    if tv.oid is not None:
        row = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE c.oid = %s",
            (tv.oid,),
        ).fetchone()
    if row is None or (row[0], row[1]) != (tv.schema, tv.name):
        raise Refused(
            f"table {tv.qualified} is not the table captured (OID {tv.oid}): it was dropped,"
            " re-created or renamed since; undo will not write to it"
        )
    attrs = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod), attidentity, attgenerated"
        " FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum",
        (tv.oid,),
    ).fetchall()
    live = {name: (typ, ident, gen) for name, typ, ident, gen in attrs}
    recorded = dict(zip(tv.columns, tv.types, strict=True))
    plain = [name for name, _, _, gen in attrs if gen == ""]
    mismatched = [c for c in tv.columns if c not in live or live[c][0] != recorded[c]] + [
        c for c in plain if c not in recorded
    ]
    if mismatched:
        raise Refused(
            f"the columns of {tv.qualified} changed since capture ({', '.join(mismatched)}):"
            " undo will not write to it"
        )
    writable = tuple(i for i, c in enumerate(tv.columns) if live[c][2] == "")
    always = any(live[tv.columns[i]][1] == "a" for i in writable)
    return LiveTable(sql.Identifier(tv.schema, tv.name), tv, writable, always)


def post_image(ch: StoredChange) -> list[Value]:
    """The row as the change left it (unchanged TOAST values taken from the old image)."""
    if ch.op == "I":
        assert ch.new is not None
        return ch.new
    assert ch.new is not None and ch.old is not None
    return [ch.old[i] if i in ch.unchanged else v for i, v in enumerate(ch.new)]


def locate(t: LiveTable, image: Sequence[Value], lit: Lit) -> sql.Composed:
    """WHERE clause finding the row that holds ``image``."""
    tv = t.version
    if tv.key is not None:
        parts = [
            sql.SQL("{} = {}").format(sql.Identifier(tv.columns[i]), lit(image[i]))
            if image[i] is not None
            else sql.SQL("{} IS NULL").format(sql.Identifier(tv.columns[i]))
            for i in tv.key
        ]
    else:
        parts = [same_output(tv.columns[i], image[i], lit) for i in range(len(tv.columns))]
    return sql.SQL(" AND ").join(parts)


def same_output(column: str, value: Value, lit: Lit) -> sql.Composed:
    """The column prints as ``value`` (its output function, as capture stored it).

    concat() calls the output function, unlike ::text, which for boolean gives 'true' and for
    char(n) drops the padding; it also serves types without an equality operator.
    """
    if value is None:
        return sql.SQL("{} IS NULL").format(sql.Identifier(column))
    return sql.SQL("({0} IS NOT NULL AND concat({0}) = {1})").format(
        sql.Identifier(column), lit(value)
    )


def select_for_update(t: LiveTable, image: Sequence[Value], lit: Lit) -> sql.Composed:
    """Lock the row holding ``image``; its columns come back in text format, as stored."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in t.version.columns)
    return sql.SQL("SELECT ctid, {} FROM {} WHERE {} LIMIT 1 FOR UPDATE").format(
        cols, t.ident, locate(t, image, lit)
    )


def insert(t: LiveTable, row: Sequence[Value], lit: Lit) -> sql.Composed:
    cols = [sql.Identifier(t.version.columns[i]) for i in t.writable]
    return sql.SQL("INSERT INTO {} ({}){} VALUES ({})").format(
        t.ident,
        sql.SQL(", ").join(cols),
        sql.SQL(" OVERRIDING SYSTEM VALUE") if t.identity_always else sql.SQL(""),
        sql.SQL(", ").join(lit(row[i]) for i in t.writable),
    )


def revert_assignments(t: LiveTable, ch: StoredChange, lit: Lit) -> sql.Composed | None:
    """SET list putting back the old values of the columns the update changed."""
    assert ch.old is not None and ch.new is not None
    sets = [
        sql.SQL("{} = {}").format(sql.Identifier(t.version.columns[i]), lit(ch.old[i]))
        for i in t.writable
        if i not in ch.unchanged and ch.old[i] != ch.new[i]
    ]
    return sql.SQL(", ").join(sets) if sets else None


def copy_statement(t: LiveTable) -> sql.Composed:
    cols = sql.SQL(", ").join(sql.Identifier(t.version.columns[i]) for i in t.writable)
    return sql.SQL("COPY {} ({}) FROM STDIN").format(t.ident, cols)


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_lines(t: LiveTable, texts: Sequence[str]) -> str:
    r"""Stored images (JSON arrays) -> COPY text lines, without building a value at a time.

    JSON escapes every backslash, tab, newline and carriage return, so an image whose text has
    no backslash holds none of the characters COPY must escape, and its values join as they are.

    >>> from .plan import TableVersion
    >>> tv = TableVersion(1, 1, "s", "t", ("a", "b"), ("text", "text"), None, False)
    >>> t = LiveTable(sql.Identifier("t"), tv, (0, 1), False)
    >>> copy_lines(t, ['["x",null]', '["a\\tb","c"]'])
    'x\t\\N\na\\tb\tc\n'
    """
    scan = _scan
    everything = len(t.writable) == len(t.version.columns)
    out = []
    for text in texts:
        values = scan(text, 0)[0]
        if not everything:
            values = [values[i] for i in t.writable]
        if "\\" in text:
            out.append("\t".join([_copy_escape(v) for v in values]))
        elif None in values:
            out.append("\t".join(["\\N" if v is None else v for v in values]))
        else:
            out.append("\t".join(values))
    out.append("")
    return "\n".join(out)


def _copy_escape(v: Value) -> str:
    """A value in COPY text format; most values need no escape, and `in` is cheap."""
    if v is None:
        return "\\N"
    if "\\" in v or "\t" in v or "\n" in v or "\r" in v:
        return v.translate(_COPY_ESCAPES)
    return v


def describe_key(tv: TableVersion, image: Sequence[Value] | None) -> str:
    if image is None:
        return "(no image)"
    idx = tv.key if tv.key is not None else range(len(tv.columns))
    return ", ".join(f"{tv.columns[i]}={image[i]}" for i in idx)[:200]


def key_values(tv: TableVersion, image: Sequence[Value] | None) -> list[Value] | None:
    if image is None or tv.key is None:
        return None
    return [image[i] for i in tv.key]


def foreign_key_checks(
    conn: psycopg.Connection[Any], oids: set[int]
) -> list[tuple[str, sql.Composed]]:
    """One query per foreign key touching these tables, returning a violating row if any.

    Needed because with session_replication_role = replica PostgreSQL does not check them.
    """
    rows = conn.execute(
        "SELECT c.conname, cn.nspname, cc.relname, pn.nspname, pc.relname,"
        " (SELECT array_agg(a.attname ORDER BY k.i) FROM unnest(c.conkey) WITH ORDINALITY k(n, i)"
        "   JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n),"
        " (SELECT array_agg(a.attname ORDER BY k.i) FROM unnest(c.confkey) WITH ORDINALITY k(n, i)"
        "   JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n)"
        " FROM pg_constraint c"
        " JOIN pg_class cc ON cc.oid = c.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace"
        " JOIN pg_class pc ON pc.oid = c.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace"
        " WHERE c.contype = 'f' AND (c.conrelid = ANY (%s) OR c.confrelid = ANY (%s))"
        " AND cc.relkind = 'r'",
        (list(oids), list(oids)),
    ).fetchall()
    checks = []
    for name, cs, ct, ps, pt, ccols, pcols in rows:
        not_null = sql.SQL(" AND ").join(
            sql.SQL("c.{} IS NOT NULL").format(sql.Identifier(c)) for c in ccols
        )
        match = sql.SQL(" AND ").join(
            sql.SQL("p.{} = c.{}").format(sql.Identifier(p), sql.Identifier(c))
            for p, c in zip(pcols, ccols, strict=True)
        )
        q = sql.SQL(
            "SELECT {} FROM {} c WHERE {} AND NOT EXISTS (SELECT 1 FROM {} p WHERE {}) LIMIT 1"
        ).format(
            sql.SQL(" || ', ' || ").join(
                sql.SQL("c.{}::text").format(sql.Identifier(c)) for c in ccols
            ),
            sql.Identifier(cs, ct),
            not_null,
            sql.Identifier(ps, pt),
            match,
        )
        checks.append((f"{cs}.{ct} -> {ps}.{pt} ({name})", q))
    return checks
