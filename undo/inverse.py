"""The inverse of a table's changes, set-based: one builder for the printed script and --apply.

For each captured table version the selected changes are staged with COPY into a temporary
table, one row per image (old image: side 0, new image: side 1), oldest first. PostgreSQL then
collapses each row's chain (first old image, last new image) into a net table, and the undo is
one statement per table and operation:

- keyed tables (primary key, or a unique not-null index recorded at capture): net rows per key;
  a key-changing update counts as a delete of the old key and an insert of the new one, so no
  two net rows touch the same key.
- keyless tables: rows are interchangeable, so the net is a multiset: per distinct image, how
  many more (delete that many) or fewer (insert that many) the selection left.

Every statement addresses exactly the relation captured (``ONLY``; rows named by key, or by
``ctid`` inside that one relation) and folds its conflict check into the write: a row is
touched only if it is as the undone change left it (every column's output text equal to the
stored image), and the count of rows written is compared with the count expected. Values go
in as stored text through each column's input function (COPY into columns of the column's own
base type); nothing is pasted: identifiers and values are composed with psycopg.sql, and no
query that holds an identifier is ever sent with parameters (so a ``%`` in a name is just a
character).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _token
from typing import Any

import psycopg
from psycopg import sql

from . import names
from .errors import Refused
from .plan import StoredChange, TableVersion, load

Value = str | None
#: jsonb_build_array is variadic, and a function takes at most 100 arguments
_MAX_ARGS = 100


@dataclass(frozen=True)
class LiveTable:
    """A recorded table version checked against the live catalog."""

    version: TableVersion
    ident: sql.Identifier
    partitioned: bool  # relkind 'p': a foreign key to it covers its partitions
    writable: tuple[int, ...]  # positions written back (generated columns left out)
    identity_always: frozenset[int]  # GENERATED ALWAYS AS IDENTITY positions
    stage_types: tuple[sql.Composable, ...]  # per position: base type (and collation)
    types: tuple[str, ...]  # per position: format_type of the live column


_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attidentity, a.attgenerated,
       (WITH RECURSIVE d(t, m) AS (
            SELECT a.atttypid, a.atttypmod
            UNION ALL
            SELECT y.typbasetype, y.typtypmod FROM pg_type y JOIN d ON y.oid = d.t
             WHERE y.typtype = 'd')
        SELECT format_type(d.t, d.m) FROM d JOIN pg_type y ON y.oid = d.t
         WHERE y.typtype <> 'd'),
       cn.nspname, co.collname, a.attcollation <> ty.typcollation AND a.attcollation <> 0
  FROM pg_attribute a
  JOIN pg_type ty ON ty.oid = a.atttypid
  LEFT JOIN pg_collation co ON co.oid = a.attcollation
  LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
 WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
"""


def live_table(conn: psycopg.Connection[Any], tv: TableVersion) -> LiveTable:
    """Refuse a table dropped, re-created, renamed or altered since capture."""
    row = None
    if tv.oid is not None:
        row = conn.execute(
            "SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE c.oid = %s",
            (tv.oid,),
        ).fetchone()
    if row is None or (row[0], row[1]) != (tv.schema, tv.name):
        raise Refused(
            f"table {tv.qualified} is not the table captured (OID {tv.oid}): it was dropped,"
            " re-created or renamed since; undo will not write to it"
        )
    attrs = conn.execute(_COLUMNS, (tv.oid,)).fetchall()
    live = {a[0]: a for a in attrs}
    recorded = dict(zip(tv.columns, tv.types, strict=True))
    plain = [a[0] for a in attrs if a[3] == ""]
    mismatched = [c for c in tv.columns if c not in live or live[c][1] != recorded[c]] + [
        c for c in plain if c not in recorded
    ]
    if mismatched:
        raise Refused(
            f"the columns of {tv.qualified} changed since capture ({', '.join(mismatched)}):"
            " undo will not write to it"
        )
    stage: list[sql.Composable] = []
    for c in tv.columns:
        _, _, _, _, base, coll_schema, coll_name, own_collation = live[c]
        t: sql.Composable = sql.SQL(base)  # format_type's own, quoted text
        if own_collation:
            t = sql.SQL("{} COLLATE {}").format(t, sql.Identifier(coll_schema, coll_name))
        stage.append(t)
    return LiveTable(
        version=tv,
        ident=sql.Identifier(tv.schema, tv.name),
        partitioned=row[2] == "p",
        writable=tuple(i for i, c in enumerate(tv.columns) if live[c][3] == ""),
        identity_always=frozenset(i for i, c in enumerate(tv.columns) if live[c][2] == "a"),
        stage_types=tuple(stage),
        types=tuple(live[c][1] for c in tv.columns),
    )


# -- COPY text ---------------------------------------------------------------------------------

_DIAGNOSE_POST = (
    "SELECT n.id, n.post_seq, n.post_img::text, CASE WHEN n.broken"
    " THEN 'another transaction changed the row between the undone changes'"
    " WHEN EXISTS (SELECT 1 FROM ONLY {t} t WHERE {kj}) THEN 'the row was changed since'"
    " ELSE 'the row is gone' END"
    " FROM {net} n WHERE {cond} AND NOT EXISTS (SELECT 1 FROM ONLY {t} t WHERE {m})"
)

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_value(v: Value) -> str:
    """A value in COPY text format; most values need no escape, and `in` is cheap."""
    if v is None:
        return "\\N"
    if "\\" in v or "\t" in v or "\n" in v or "\r" in v:
        return v.translate(_COPY_ESCAPES)
    return v


def merged_new(old: list[Value], new: list[Value], unchanged: Iterable[int]) -> list[Value]:
    """The row as an update left it: TOASTed values it left unchanged come from the old image.

    >>> merged_new(["1", "big"], ["2", None], [1])
    ['2', 'big']
    """
    out = list(new)
    for i in unchanged:
        out[i] = old[i]
    return out


def image_text(values: Sequence[Value]) -> str:
    """An image as the store writes it: a JSON array of text forms (capture's own tokens).

    >>> image_text(["a\\tb", None])
    '["a\\\\tb",null]'
    """
    return "[" + ",".join("null" if v is None else _token(v) for v in values) + "]"


# -- the builder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One write of the undo: a statement, what it must write, and how to find what it could
    not (conflicts). ``write`` returns one row per row written; ``diagnose`` returns
    (net id, change id, image text, reason) per conflicting net row, as seen before the write."""

    table: LiveTable
    kind: str  # 'I' (undo of inserts: delete), 'U', 'D' (undo of deletes: re-insert)
    write: sql.Composed
    expected: sql.Composed
    diagnose: sql.Composed


class TableUndo:
    """Staging, collapse and inverse statements for one table version (number ``n`` names its
    temporary tables: pg_temp.undo_s<n> for the images, pg_temp.undo_n<n> for the net)."""

    def __init__(self, table: LiveTable, n: int) -> None:
        self.t = table
        tv = table.version
        self.keyed = tv.key is not None
        self.key = tv.key or ()
        self.stage = sql.Identifier("pg_temp", f"undo_s{n}")
        self.net = sql.Identifier("pg_temp", f"undo_n{n}")
        self.changed: set[int] = set()  # positions some update of the selection changed
        self.ops: set[str] = set()
        self._set_names: dict[str, sql.Composable] = {}  # the SET list's pieces (_assignments)

    # staging ----------------------------------------------------------------------------------
    def create_stage(self) -> sql.Composed:
        cols: list[sql.Composable] = [sql.SQL("seq bigint"), sql.SQL("side smallint")]
        cols += [
            sql.SQL("{} {}").format(sql.Identifier(f"k{i}"), self.t.stage_types[i])
            for i in self.key
        ]
        cols.append(sql.SQL("img jsonb"))
        cols += [
            sql.SQL("{} {}").format(sql.Identifier(f"c{i}"), self.t.stage_types[i])
            for i in self.t.writable
        ]
        return sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DROP").format(
            self.stage, sql.SQL(", ").join(cols)
        )

    def copy_stage(self) -> sql.Composed:
        return sql.SQL("COPY {} FROM STDIN").format(self.stage)

    def lines(self, changes: Iterable[StoredChange]) -> Iterator[str]:
        """COPY text for the changes, oldest first: one line per image."""
        key, writable = self.key, self.t.writable
        nulls = "\t".join(["\\N"] * len(writable))
        changed, ops = self.changed, self.ops
        for ch in changes:
            ops.add(ch.op)
            old = new = None
            if ch.old is not None:
                old = load(ch.old)
                if "\\" in ch.old:
                    values = [_copy_value(old[i]) for i in writable]
                    keys = [_copy_value(old[i]) for i in key]
                    img = ch.old.replace("\\", "\\\\")
                else:  # JSON escapes every character COPY must: none is in these values
                    values = ["\\N" if old[i] is None else old[i] for i in writable]
                    keys = [old[i] for i in key]
                    img = ch.old
                yield "\t".join([str(ch.id), "0", *keys, img, *values]) + "\n"
            if ch.new is not None:
                new = load(ch.new)
                text = ch.new
                if ch.unchanged and old is not None:
                    new = merged_new(old, new, load(ch.unchanged))
                    text = image_text(new)
                keys = [_copy_value(new[i]) for i in key]
                img = text if "\\" not in text else text.replace("\\", "\\\\")
                yield "\t".join([str(ch.id), "1", *keys, img, nulls]) + "\n"
            if old is not None and new is not None:
                changed.update(i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b)

    def analyze(self) -> sql.Composed:
        return sql.SQL("ANALYZE {}").format(self.stage)

    # collapse ---------------------------------------------------------------------------------
    def _cols(self, alias: str) -> sql.Composable:
        """The staged typed columns, as alias.c<i> (a placeholder column for a table with no
        writable one)."""
        cols = [
            sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(f"c{i}"))
            for i in self.t.writable
        ]
        return sql.SQL(", ").join(cols) if cols else sql.SQL("NULL AS c_none")

    def build_net(self) -> sql.Composed:
        """The net change per row.

        Keyed: per key, the first old image and the last new image. The chain must be whole:
        each old image the one the selection's previous change of that key left, and no key
        inserted or deleted twice in a row. Where it is not, another transaction changed the row
        between two undone changes; undone newest first, the older change would meet that
        write, so the key is a conflict: ``broken``, and no statement touches it.

        Keyless: per distinct image, how many copies the selection added or removed."""
        if not self.keyed:
            return sql.SQL(
                "CREATE TEMP TABLE {net} ON COMMIT DROP AS"
                " SELECT row_number() OVER () AS id, g.img, g.delta, g.seq, {o_cs}"
                " FROM (SELECT img, sum(CASE WHEN side = 1 THEN 1 ELSE -1 END) AS delta,"
                " max(seq) AS seq FROM {stage} GROUP BY img) g"
                " LEFT JOIN (SELECT DISTINCT ON (img) * FROM {stage} WHERE side = 0"
                " ORDER BY img) o ON o.img = g.img WHERE g.delta <> 0"
            ).format(net=self.net, stage=self.stage, o_cs=self._cols("o"))
        ks = sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in self.key)
        # g: per key its first and last change (a hash aggregate over narrow columns); only keys
        # changed more than once need the chain check (a window over their rows alone); pre and
        # post images are then found by (change, side, key): one row each at most.
        return sql.SQL(
            "CREATE TEMP TABLE {net} ON COMMIT DROP AS"
            " WITH g AS (SELECT {ks}, min(seq) AS f, max(seq) AS l FROM {stage} GROUP BY {ks}),"
            " c AS (SELECT {ks}, bool_or(gap) AS broken, (array_agg(img))[1] AS img"
            " FROM (SELECT s.*, CASE WHEN lag(s.side) OVER w IS NULL THEN false"
            " WHEN s.side = 0 THEN lag(s.side) OVER w <> 1 OR lag(s.img) OVER w <> s.img"
            " ELSE lag(s.side) OVER w = 1 END AS gap"
            " FROM {stage} s JOIN g USING ({ks}) WHERE g.f <> g.l"
            " WINDOW w AS (PARTITION BY {s_ks} ORDER BY s.seq, s.side)) x GROUP BY {ks})"
            " SELECT row_number() OVER () AS id, {g_ks}, a.seq AS pre_seq,"
            " a.seq IS NOT NULL AS has_pre, a.img AS pre_img, {a_cs}, g.l AS post_seq,"
            " b.seq IS NOT NULL OR coalesce(c.broken, false) AS has_post,"
            " coalesce(b.img, c.img) AS post_img, coalesce(c.broken, false) AS broken"
            " FROM g LEFT JOIN {stage} a ON a.seq = g.f AND a.side = 0 AND {ga}"
            " LEFT JOIN {stage} b ON b.seq = g.l AND b.side = 1 AND {gb}"
            " LEFT JOIN c ON {gc}"
            " WHERE coalesce(c.broken, false) OR ((a.seq IS NOT NULL OR b.seq IS NOT NULL)"
            " AND NOT (a.seq IS NOT NULL AND b.seq IS NOT NULL AND a.img = b.img))"
        ).format(
            net=self.net,
            stage=self.stage,
            ks=ks,
            s_ks=sql.SQL(", ").join(
                sql.SQL("s.{}").format(sql.Identifier(f"k{i}")) for i in self.key
            ),
            g_ks=sql.SQL(", ").join(
                sql.SQL("g.{0} AS {0}").format(sql.Identifier(f"k{i}")) for i in self.key
            ),
            a_cs=self._cols("a"),
            ga=self._key_join("g", "a"),
            gb=self._key_join("g", "b"),
            gc=self._key_join("g", "c"),
        )

    # pieces of statements ---------------------------------------------------------------------
    def _key_join(self, left: str, right: str) -> sql.Composed:
        return sql.SQL(" AND ").join(
            sql.SQL("{}.{} = {}.{}").format(
                sql.Identifier(left),
                sql.Identifier(self.t.version.columns[i] if left == "t" else f"k{i}"),
                sql.Identifier(right),
                sql.Identifier(f"k{i}"),
            )
            for i in self.key
        )

    def fingerprint(self, alias: str) -> sql.Composed:
        """The live row as a jsonb array of its columns' output texts (NULL as null): equal to
        a stored image exactly when every column prints as captured. concat() calls the output
        function, unlike ::text (boolean 'true', char(n) without padding, inet with a mask)."""
        cols = [
            sql.SQL("CASE WHEN {0}.{1} IS NULL THEN NULL ELSE concat({0}.{1}) END").format(
                sql.Identifier(alias), sql.Identifier(c)
            )
            for c in self.t.version.columns
        ]
        parts: list[sql.Composable] = [
            sql.SQL("jsonb_build_array({})").format(sql.SQL(", ").join(cols[i : i + _MAX_ARGS]))
            for i in range(0, len(cols), _MAX_ARGS)
        ] or [sql.SQL("'[]'::jsonb")]
        return sql.SQL(" || ").join(parts)

    def _args(self, cond: str) -> dict[str, sql.Composable]:
        """Every piece a statement template may name; each template is formatted once."""
        w = self.t.writable
        kj = self._key_join("t", "n") if self.keyed else sql.SQL("false")
        fp = self.fingerprint("t")
        return {
            **self._set_names,
            "t": self.t.ident,
            "net": self.net,
            "cond": sql.SQL(cond),
            "kj": kj,
            "fp": fp,
            "m": sql.SQL("NOT n.broken AND {} AND {} = n.post_img").format(kj, fp),
            "cols": sql.SQL(", ").join(sql.Identifier(self.t.version.columns[i]) for i in w),
            "vals": sql.SQL(", ").join(sql.SQL("n.{}").format(sql.Identifier(f"c{i}")) for i in w),
            "over": sql.SQL(" OVERRIDING SYSTEM VALUE")
            if self.t.identity_always & set(w)
            else sql.SQL(""),
        }

    def _step(self, kind: str, cond: str, write: str, expected: str, diagnose: str) -> Step:
        a = self._args(cond)
        return Step(
            self.t,
            kind,
            sql.SQL(write).format(**a),
            sql.SQL(expected).format(**a),
            sql.SQL(diagnose).format(**a),
        )

    # the steps --------------------------------------------------------------------------------
    def steps(self) -> dict[str, Step]:
        """The inverse statements by kind: 'I' deletes what the selection inserted, 'U' sets
        back what it updated, 'D' re-inserts what it deleted."""
        if not self.keyed:
            return self._keyless_steps()
        return {
            "I": self._step(
                "I",
                "n.has_post AND NOT n.has_pre",
                "DELETE FROM ONLY {t} t USING {net} n WHERE {cond} AND {m} RETURNING 1",
                "SELECT count(*) FROM {net} n WHERE {cond}",
                _DIAGNOSE_POST,
            ),
            "U": self._step(
                "U",
                "n.has_pre AND n.has_post",
                "UPDATE ONLY {t} t SET "  # noqa: S608 (a template: placeholders only)
                + self._assignments()
                + " FROM {net} n WHERE {cond} AND {m} RETURNING 1",
                "SELECT count(*) FROM {net} n WHERE {cond}",
                _DIAGNOSE_POST,
            ),
            "D": self._step(
                "D",
                "n.has_pre AND NOT n.has_post",
                "INSERT INTO {t} ({cols}){over} SELECT {vals} FROM {net} n WHERE {cond}"
                " AND NOT EXISTS (SELECT 1 FROM ONLY {t} t WHERE {kj}) RETURNING 1",
                "SELECT count(*) FROM {net} n WHERE {cond}",
                "SELECT n.id, n.pre_seq, n.pre_img::text, 'a row with this key exists again'"
                " FROM {net} n WHERE {cond} AND EXISTS (SELECT 1 FROM ONLY {t} t WHERE {kj})",
            ),
        }

    def _assignments(self) -> str:
        """SET list (a template) of an update's undo: every writable, non-key column that some
        change of the selection changed (all of them where a delete and an insert of one key
        merged into an update)."""
        positions = set(self.t.writable) - set(self.key) - self.t.identity_always
        if not ({"I", "D"} <= self.ops):
            positions &= self.changed
        if not positions:  # nothing but generated columns changed: a harmless assignment
            positions = {self.key[0]}
        self._set_names = {
            f"s{i}": sql.SQL("{} = n.{}").format(
                sql.Identifier(self.t.version.columns[i]),
                sql.Identifier(f"k{i}" if i in self.key else f"c{i}"),
            )
            for i in sorted(positions)
        }
        return ", ".join("{" + k + "}" for k in self._set_names)

    def _keyless_steps(self) -> dict[str, Step]:
        return {
            "I": self._step(
                "I",
                "n.delta > 0",
                "DELETE FROM ONLY {t} t USING (SELECT x.tid FROM (SELECT t.ctid AS tid,"
                " n.delta, row_number() OVER (PARTITION BY n.id ORDER BY t.ctid) AS rn"
                " FROM ONLY {t} t JOIN {net} n ON {cond} AND {fp} = n.img) x"
                " WHERE x.rn <= x.delta) d WHERE t.ctid = d.tid RETURNING 1",
                "SELECT coalesce(sum(n.delta), 0) FROM {net} n WHERE {cond}",
                "SELECT n.id, n.seq, n.img::text, 'fewer identical rows are left than the"
                " undone changes made' FROM {net} n LEFT JOIN (SELECT {fp} AS img,"
                " count(*) AS found FROM ONLY {t} t GROUP BY 1) x ON x.img = n.img"
                " WHERE {cond} AND coalesce(x.found, 0) < n.delta",
            ),
            "D": self._step(
                "D",
                "n.delta < 0",
                "INSERT INTO {t} ({cols}){over} SELECT {vals} FROM {net} n"
                " CROSS JOIN LATERAL generate_series(1, -n.delta) WHERE {cond} RETURNING 1",
                "SELECT coalesce(-sum(n.delta), 0) FROM {net} n WHERE {cond}",
                "SELECT n.id, n.seq, n.img::text, '' FROM {net} n WHERE false",
            ),
        }

    # foreign keys ------------------------------------------------------------------------------
    def written(self) -> str:
        """Net rows whose old image the undo writes back."""
        return "n.has_pre" if self.keyed else "n.delta < 0"

    def removed(self) -> tuple[str, str]:
        """Net rows whose new image the undo takes away, and the column holding that image."""
        return ("n.has_post", "post_img") if self.keyed else ("n.delta > 0", "img")


def foreign_key_checks(
    conn: psycopg.Connection[Any], undos: dict[int, TableUndo]
) -> list[tuple[str, sql.Composed]]:
    """Per foreign key touching the undone tables, a query over the staged rows only that
    returns a violating value, if any. Needed because with session_replication_role = replica
    PostgreSQL does not check them; the rows the undo wrote must have their parents, and the
    rows it took away must not be referenced any more."""
    oids = list(undos)
    rows = conn.execute(
        "SELECT c.conname, c.conrelid, c.confrelid, cc.relkind, pc.relkind,"
        " (SELECT array_agg(a.attname ORDER BY k.i) FROM unnest(c.conkey) WITH ORDINALITY k(n, i)"
        "   JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n),"
        " (SELECT array_agg(a.attname ORDER BY k.i) FROM unnest(c.confkey) WITH ORDINALITY k(n, i)"
        "   JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n),"
        " (SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.i)"
        "   FROM unnest(c.confkey) WITH ORDINALITY k(n, i)"
        "   JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n),"
        " cn.nspname, cc.relname, pn.nspname, pc.relname"
        " FROM pg_constraint c JOIN pg_class cc ON cc.oid = c.conrelid"
        " JOIN pg_namespace cn ON cn.oid = cc.relnamespace"
        " JOIN pg_class pc ON pc.oid = c.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace"
        " WHERE c.contype = 'f' AND (c.conrelid = ANY (%s) OR c.confrelid = ANY (%s))",
        (oids, oids),
    ).fetchall()
    checks = []
    for name, child, parent, ckind, pkind, ccols, pcols, ptypes, cs, ct, ps, pt in rows:
        # as PostgreSQL's own checks do: ONLY, except for a partitioned table
        c_from = sql.SQL("{}{}").format(
            sql.SQL("") if ckind == "p" else sql.SQL("ONLY "), sql.Identifier(cs, ct)
        )
        p_from = sql.SQL("{}{}").format(
            sql.SQL("") if pkind == "p" else sql.SQL("ONLY "), sql.Identifier(ps, pt)
        )
        label = f"{names.quote(cs, ct)} -> {names.quote(ps, pt)} ({name})"
        cu = undos.get(child)
        if cu is not None and all(c in cu.t.version.columns for c in ccols):
            pos = [cu.t.version.columns.index(c) for c in ccols]
            if all(p in cu.t.writable for p in pos):
                vals = [sql.SQL("n.{}").format(sql.Identifier(f"c{p}")) for p in pos]
                checks.append(
                    (
                        label,
                        sql.SQL(
                            "SELECT concat_ws(', ', {vals}) FROM {net} n WHERE {cond} AND {nn}"
                            " AND NOT EXISTS (SELECT 1 FROM {p} p WHERE {match}) LIMIT 1"
                        ).format(
                            vals=sql.SQL(", ").join(vals),
                            net=cu.net,
                            cond=sql.SQL(cu.written()),
                            nn=sql.SQL(" AND ").join(
                                sql.SQL("{} IS NOT NULL").format(v) for v in vals
                            ),
                            p=p_from,
                            match=sql.SQL(" AND ").join(
                                sql.SQL("p.{} = {}").format(sql.Identifier(c), v)
                                for c, v in zip(pcols, vals, strict=True)
                            ),
                        ),
                    )
                )
        pu = undos.get(parent)
        if pu is not None and all(c in pu.t.version.columns for c in pcols):
            cond, img = pu.removed()
            vals = [
                sql.SQL("(n.{} ->> {})::{}").format(
                    sql.Identifier(img), sql.Literal(pu.t.version.columns.index(c)), sql.SQL(t)
                )
                for c, t in zip(pcols, ptypes, strict=True)
            ]
            checks.append(
                (
                    label,
                    sql.SQL(
                        "SELECT concat_ws(', ', {vals}) FROM {net} n WHERE {cond}"
                        " AND NOT EXISTS (SELECT 1 FROM {p} p WHERE {pmatch})"
                        " AND EXISTS (SELECT 1 FROM {c} c WHERE {cmatch}) LIMIT 1"
                    ).format(
                        vals=sql.SQL(", ").join(vals),
                        net=pu.net,
                        cond=sql.SQL(cond),
                        p=p_from,
                        pmatch=sql.SQL(" AND ").join(
                            sql.SQL("p.{} = {}").format(sql.Identifier(c), v)
                            for c, v in zip(pcols, vals, strict=True)
                        ),
                        c=c_from,
                        cmatch=sql.SQL(" AND ").join(
                            sql.SQL("c.{} = {}").format(sql.Identifier(c), v)
                            for c, v in zip(ccols, vals, strict=True)
                        ),
                    ),
                )
            )
    return checks


def fk_order(conn: psycopg.Connection[Any], oids: Sequence[int]) -> list[int]:
    """The tables, parents before children (foreign keys among them; cycles broken anywhere)."""
    edges = conn.execute(
        "SELECT conrelid, confrelid FROM pg_constraint WHERE contype = 'f'"
        " AND conrelid = ANY (%s) AND confrelid = ANY (%s) AND conrelid <> confrelid",
        (list(oids), list(oids)),
    ).fetchall()
    parents: dict[int, set[int]] = {o: set() for o in oids}
    for child, parent in edges:
        parents[child].add(parent)
    out: list[int] = []
    seen: set[int] = set()

    def visit(o: int) -> None:
        if o in seen:
            return
        seen.add(o)
        for p in sorted(parents[o]):
            visit(p)
        out.append(o)

    for o in oids:
        visit(o)
    return out


def describe_image(tv: TableVersion, image: Sequence[Value]) -> str:
    """The row a conflict is about: its key (or, keyless, its first columns) as col=value.

    >>> tv = TableVersion(1, 1, "s", "t", ("id", "v"), ("int", "text"), (0,), False)
    >>> describe_image(tv, ["7", None])
    'id=7'
    """
    idx = tv.key if tv.key is not None else range(len(tv.columns))
    return ", ".join(f"{tv.columns[i]}={'NULL' if image[i] is None else image[i]}" for i in idx)[
        :200
    ]


def key_text(tv: TableVersion, image: Sequence[Value]) -> str | None:
    """The key as capture stores it in changes.key, to find later writers."""
    if tv.key is None:
        return None
    return image_text([image[i] for i in tv.key])
