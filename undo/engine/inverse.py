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

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _token
from operator import itemgetter
from typing import Any, cast

import psycopg
from psycopg import sql

from undo.core import names
from undo.core.errors import Refused
from undo.core.images import Value, image_text, load, merged_new
from undo.store.api import StoredChange, TableVersion

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
    types: tuple[str, ...]  # per position: format_type of the live column (pinned path)
    #: per position: the equality the column's values are compared with (``equality``)
    eq: tuple[sql.Composable, ...]
    unique_key: bool  # a unique index (or primary key) the key's columns satisfy, checked at once
    references: bool  # the table has foreign keys of its own (it is the child of one)


_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attidentity, a.attgenerated,
       (WITH RECURSIVE d(t, m) AS (
            SELECT a.atttypid, a.atttypmod
            UNION ALL
            SELECT y.typbasetype, y.typtypmod FROM pg_type y JOIN d ON y.oid = d.t
             WHERE y.typtype = 'd')
        SELECT format_type(d.t, d.m) FROM d JOIN pg_type y ON y.oid = d.t
         WHERE y.typtype <> 'd'),
       cn.nspname, co.collname, a.attcollation <> ty.typcollation AND a.attcollation <> 0,
       quote_ident(tn.nspname) || '.',
       (WITH RECURSIVE d(t) AS (
            SELECT a.atttypid
            UNION ALL
            SELECT y.typbasetype FROM pg_type y JOIN d ON y.oid = d.t WHERE y.typtype = 'd')
        SELECT ARRAY[en.nspname::text, o.oprname::text]
          FROM d JOIN pg_type y ON y.oid = d.t AND y.typtype <> 'd'
          JOIN pg_opclass oc ON oc.opcintype = d.t AND oc.opcdefault
          JOIN pg_am am ON am.oid = oc.opcmethod AND am.amname IN ('btree', 'hash')
          JOIN pg_amop ao ON ao.amopfamily = oc.opcfamily AND ao.amoplefttype = d.t
           AND ao.amoprighttype = d.t
           AND ao.amopstrategy = CASE am.amname WHEN 'btree' THEN 3 ELSE 1 END
          JOIN pg_operator o ON o.oid = ao.amopopr
          JOIN pg_namespace en ON en.oid = o.oprnamespace
         ORDER BY am.amname = 'btree' DESC, o.oid LIMIT 1)
  FROM pg_attribute a
  JOIN pg_type ty ON ty.oid = a.atttypid
  JOIN pg_namespace tn ON tn.oid = ty.typnamespace
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
    mismatched = [c for c in tv.columns if c not in live or not _same_type(live[c], recorded[c])]
    mismatched += [c for c in plain if c not in recorded]
    if mismatched:
        raise Refused(
            f"the columns of {tv.qualified} changed since capture ({', '.join(mismatched)}):"
            " undo will not write to it"
        )
    stage: list[sql.Composable] = []
    for c in tv.columns:
        _, _, _, _, base, coll_schema, coll_name, own_collation, _, _ = live[c]
        t: sql.Composable = sql.SQL(base)  # format_type's own, quoted text
        if own_collation:
            t = sql.SQL("{} COLLATE {}").format(t, sql.Identifier(coll_schema, coll_name))
        stage.append(t)
    unique_key, references = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = %(t)s AND i.indisunique"
        " AND i.indisvalid AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL"
        " AND (SELECT array_agg(a.attname) FROM pg_attribute a WHERE a.attrelid = %(t)s"
        " AND a.attnum = ANY (i.indkey)) <@ %(key)s::name[]),"
        " EXISTS (SELECT FROM pg_constraint WHERE conrelid = %(t)s AND contype = 'f')",
        {"t": tv.oid, "key": [tv.columns[i] for i in tv.key or ()]},
    ).fetchone() or (False, False)
    return LiveTable(
        version=tv,
        ident=sql.Identifier(tv.schema, tv.name),
        partitioned=row[2] == "p",
        writable=tuple(i for i, c in enumerate(tv.columns) if live[c][3] == ""),
        identity_always=frozenset(i for i, c in enumerate(tv.columns) if live[c][2] == "a"),
        stage_types=tuple(stage),
        types=tuple(live[c][1] for c in tv.columns),
        eq=tuple(equality(*live[c][9]) if live[c][9] else CATALOG_EQ for c in tv.columns),
        unique_key=bool(unique_key),
        references=bool(references),
    )


def _same_type(live: tuple[Any, ...], recorded: str) -> bool:
    """Whether a live column's type is the one recorded at capture. format_type qualifies a type
    its search_path does not show: capture's path (usually "$user", public) shows citext in
    public as ``citext``, undo's pinned path (pg_catalog, pg_temp) as ``public.citext``; the
    name recorded is either."""
    name, prefix = str(live[1]), str(live[8])
    return recorded == name or (prefix != "pg_catalog." and recorded == name.removeprefix(prefix))


#: what an operator's name is made of (PostgreSQL allows nothing else in one)
_OPERATOR_CHARS = frozenset("+-*/<>=~!@#%^&|`?")


def equality(schema: str, name: str) -> sql.Composable:
    """An operator named with its schema, ``OPERATOR(schema.name)``: under the pinned
    search_path an unqualified ``=`` finds pg_catalog's only, which for a type of an extension
    (citext) would be text's, by its implicit cast: case-sensitive, so no longer exact. Named
    so, it resolves among that schema's operators of the name, where the column's own (an exact
    match for its type) wins."""
    if not name or not set(name) <= _OPERATOR_CHARS:
        raise Refused(f"the equality operator {schema}.{name} is not one undo can name")
    return sql.SQL("OPERATOR({}.{})").format(sql.Identifier(schema), sql.SQL(name))


#: pg_catalog's equality: for a type with no default operator class of its own (an enum, a
#: composite, an array, varchar: pg_catalog's polymorphic or binary-compatible one, which calls
#: the type's own where it has one)
CATALOG_EQ = equality("pg_catalog", "=")


# -- COPY text ---------------------------------------------------------------------------------

_DIAGNOSE_POST = (
    "SELECT n.id, n.post_seq, n.post_img::text, CASE WHEN n.broken"
    " THEN 'another transaction changed the row between the undone changes'"
    " WHEN EXISTS (SELECT 1 FROM ONLY {t} t WHERE {kj}) THEN 'the row was changed since'"
    " ELSE 'the row is gone' END"
    " FROM {net} n WHERE {cond} AND NOT EXISTS (SELECT 1 FROM ONLY {t} t WHERE {m})"
)

#: a row version written after the undone transactions (``since``: the smallest age of their
#: xids): a younger xmin, not this transaction's own (age 0; undo's transaction has an xid
#: before it first asks, so ages stay put)
WRITTEN_SINCE = "age(t.xmin) < {since} AND age(t.xmin) <> 0"

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_value(v: Value) -> str:
    """A value in COPY text format; most values need no escape, and `in` is cheap."""
    if v is None:
        return "\\N"
    if "\\" in v or "\t" in v or "\n" in v or "\r" in v:
        return v.translate(_COPY_ESCAPES)
    return v


def _copy_fields(values: list[Value], text: str) -> list[str]:
    """An image's values as COPY fields, given the image's JSON text: the store's encoder
    writes a backslash, tab, newline and CR in a value as \\\\, \\t, \\n and \\r, so
    without those in the text no value holds a character COPY must escape (a \\" for a quote,
    common in JSON columns, needs none)."""
    if "\\\\" in text or "\\t" in text or "\\n" in text or "\\r" in text:
        return [_copy_value(v) for v in values]
    if None in values:
        return ["\\N" if v is None else v for v in values]
    return cast(list[str], values)  # no None in it


def _copy_image(text: str) -> str:
    """An image's JSON text as one COPY field."""
    return text if "\\" not in text else text.replace("\\", "\\\\")


# -- the builder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One write of the undo: a statement, what it must write, and how to find what it could
    not (conflicts). ``write`` has no RETURNING (the applier counts rows by the command's row
    count, the script adds RETURNING to count them); ``diagnose`` returns
    (net id, change id, image text, reason) per conflicting net row, as seen before the write."""

    table: LiveTable
    kind: str  # 'I' (undo of inserts: delete), 'U', 'D' (undo of deletes: re-insert)
    write: sql.Composed
    expected: sql.Composed
    diagnose: sql.Composed


class TableUndo:
    """Staging, collapse and inverse statements for one table version (number ``n`` names its
    temporary tables: pg_temp.undo_s<n> for the staged changes, pg_temp.undo_n<n> for the net).

    The stage holds one row per change and key: id (line number), the change's id (seq), its
    transaction's xid where a row version it wrote is known by its xmin (``Plan.by_xmin``), the
    key (typed), the old image (text, as stored), the old values (typed, for writing back) and
    the new image (text). An update that changes the key is two rows: the old key losing its
    row and the new key gaining one. When no key appears twice, which is what one bulk statement
    leaves, the stage is the net already (a view over it); otherwise each key's chain is
    collapsed (``collapse``)."""

    def __init__(self, table: LiveTable, n: int) -> None:
        self.t = table
        self.n = n
        tv = table.version
        self.keyed = tv.key is not None
        self.key = tv.key or ()
        self.stage = sql.Identifier("pg_temp", f"undo_s{n}")
        self.net = sql.Identifier("pg_temp", f"undo_n{n}")
        self.skip = sql.Identifier("pg_temp", f"undo_x{n}")  # net rows left out (conflicts)
        self.chains_var = f"undo_chains_{n}"  # the printed script's psql variable
        self.changed: set[int] = set()  # positions some update of the selection changed
        self.ops: set[str] = set()
        self.key_moved = False  # some update changed the key
        self._set_names: dict[str, sql.Composable] = {}  # the SET list's pieces (_assignments)
        self._steps: dict[str, Step] | None = None

    # staging ----------------------------------------------------------------------------------
    def create_stage(self) -> sql.Composed:
        cols: list[sql.Composable] = [sql.SQL("id bigint, seq bigint, xid xid")]
        cols += [
            sql.SQL("{} {}").format(sql.Identifier(f"k{i}"), self.t.stage_types[i])
            for i in self.key
        ]
        cols.append(sql.SQL("pre_img text"))
        cols += [
            sql.SQL("{} {}").format(sql.Identifier(f"c{i}"), self.t.stage_types[i])
            for i in self.t.writable
        ]
        cols.append(sql.SQL("post_img text"))
        return sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DROP").format(
            self.stage, sql.SQL(", ").join(cols)
        )

    def copy_stage(self) -> sql.Composed:
        return sql.SQL("COPY {} FROM STDIN").format(self.stage)

    def lines(self, changes: Iterable[StoredChange]) -> Iterator[str]:
        """COPY text for the changes, oldest first: one line per change (two for an update
        that changes the key). Tight: it runs once per change of the selection."""
        key, writable = self.key, self.t.writable
        keys_of = self._fields_of(key)
        values_of = self._fields_of(writable)
        no_values = "\t\\N" * len(writable)
        same_key = itemgetter(*key) if key else (lambda _: ())
        changed, ops = self.changed, self.ops
        # non-key columns not yet seen changed (a changed key makes two lines instead)
        unknown = [i for i in writable if i not in changed and i not in key]
        pick = itemgetter(*unknown) if unknown else None
        # a key that is the image's first value is kept when the new image's text starts with
        # the old key's token: once every column is known changed, the new image needs no parse
        fast = key == (0,)
        n = 0
        for seq, op, old_text, new_text, unchanged, txn_xid in changes:
            ops.add(op)
            old = new = None
            xid = "\\N" if txn_xid is None else txn_xid
            if old_text is not None:
                old = load(old_text)
                f = _copy_fields(old, old_text)
                keys, pre, values = keys_of(f), _copy_image(old_text), values_of(f)
            if new_text is None:
                post = "\\N"
            elif (
                fast
                and pick is None
                and not unchanged
                and old is not None
                and old[0] is not None
                and new_text.startswith(head := "[" + _token(old[0]))
                and new_text[len(head)] in ",]"
            ):
                post = _copy_image(new_text)  # the key is kept; every column known changed
            else:
                new = load(new_text)
                if unchanged and old is not None:
                    new = merged_new(old, new, load(unchanged))
                    new_text = image_text(new)
                post = _copy_image(new_text)
                if old is None or same_key(old) != same_key(new):
                    if old is not None:  # the key changed: the old key loses its row
                        self.key_moved = True
                        n += 1
                        yield f"{n}\t{seq}\t{xid}{keys}\t{pre}{values}\t\\N\n"
                    keys, pre, values = keys_of(_copy_fields(new, new_text)), "\\N", no_values
                elif pick is not None and pick(old) != pick(new):
                    changed.update(i for i in unknown if old[i] != new[i])
                    unknown = [i for i in unknown if i not in changed]
                    pick = itemgetter(*unknown) if unknown else None
            n += 1
            yield f"{n}\t{seq}\t{xid}{keys}\t{pre}{values}\t{post}\n"

    @staticmethod
    def _fields_of(positions: Sequence[int]) -> Callable[[list[str]], str]:
        """Tab-led COPY fields at these positions of an image's fields."""
        if not positions:
            return lambda f: ""
        if len(positions) == 1:
            (p,) = positions
            return lambda f: "\t" + f[p]
        get = itemgetter(*positions)
        return lambda f: "\t" + "\t".join(get(f))

    def copy_into_table(self) -> sql.Composed:
        """COPY of old rows straight into the table (``rows``): the fast way to undo deletes."""
        return sql.SQL("COPY {} ({}) FROM STDIN").format(
            self.t.ident,
            sql.SQL(", ").join(sql.Identifier(self.t.version.columns[i]) for i in self.t.writable),
        )

    def rows(self, changes: Iterable[StoredChange]) -> Iterator[str]:
        """COPY text of the old rows the changes (deletes) took away."""
        values_of = self._fields_of(self.t.writable)
        for ch in changes:
            assert ch.old is not None
            yield values_of(_copy_fields(load(ch.old), ch.old))[1:] + "\n"

    # the net ----------------------------------------------------------------------------------
    def _cols(self, alias: str | None) -> sql.Composable:
        """The staged typed columns, each after a comma: ", alias.c<i>"."""
        return sql.SQL("").join(
            sql.SQL(", {}").format(sql.Identifier(*filter(None, (alias, f"c{i}"))))
            for i in self.t.writable
        )

    def _keys(self, alias: str) -> sql.Composable:
        return sql.SQL(", ").join(
            sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(f"k{i}"))
            for i in self.key
        )

    def chains(self) -> sql.Composed | None:
        """Whether some key is changed more than once (true: ``collapse``, false:
        ``stage_as_net``);
        None for a keyless table, whose net is always a multiset (``collapse``)."""
        if not self.keyed:
            return None
        return sql.SQL("SELECT EXISTS (SELECT FROM {} s GROUP BY {} HAVING count(*) > 1)").format(
            self.stage, self._keys("s")
        )

    def stage_as_net(self) -> sql.Composed:
        """The net when every key is changed once: the stage itself, seen as net rows."""
        return sql.SQL(
            "CREATE TEMP VIEW {net} AS SELECT s.id, {ks}, s.seq AS pre_seq,"
            " s.pre_img IS NOT NULL AS has_pre, s.pre_img{cs}, s.seq AS post_seq,"
            " s.post_img IS NOT NULL AS has_post, s.post_img, s.xid AS post_xid,"
            " false AS broken FROM {stage} s"
            " WHERE s.pre_img IS DISTINCT FROM s.post_img"
        ).format(net=self.net, stage=self.stage, ks=self._keys("s"), cs=self._cols("s"))

    def collapse(self) -> sql.Composed:
        """The net change per row.

        Keyed: per key, the first old image and the last new image. The chain must be whole:
        each old image the one the selection's previous change of that key left (absent after
        a delete), else another transaction changed the row between two undone changes; undone
        newest first, the older change would meet that write, so the key is a conflict:
        ``broken``, and no statement touches it.

        Keyless: per distinct image, how many copies the selection added (delta > 0) or
        removed (delta < 0), and ``since``: the age of the newest undone transaction that
        changed such a row (the stage carries every transaction's xid for a keyless table), so
        that a row written after it is known by its xmin. Ids are the image's first line and
        side, the same wherever the script runs."""
        if not self.keyed:
            return sql.SQL(
                "CREATE TEMP TABLE {net} ON COMMIT DROP AS"
                " SELECT g.id, g.img, g.delta, g.seq, g.since{o_cs}"
                " FROM (SELECT img, sum(d) AS delta, max(seq) AS seq, min(line) AS id,"
                " min(age(xid)) AS since FROM ("
                " SELECT pre_img AS img, -1 AS d, seq, 2 * id AS line, xid FROM {stage}"
                " WHERE pre_img IS NOT NULL"
                " UNION ALL"
                " SELECT post_img, 1, seq, 2 * id + 1, xid FROM {stage}"
                " WHERE post_img IS NOT NULL) i GROUP BY img) g"
                " LEFT JOIN (SELECT DISTINCT ON (pre_img) * FROM {stage}"
                " WHERE pre_img IS NOT NULL ORDER BY pre_img) o ON o.pre_img = g.img"
                " WHERE g.delta <> 0"
            ).format(net=self.net, stage=self.stage, o_cs=self._cols("o"))
        return sql.SQL(
            "CREATE TEMP TABLE {net} ON COMMIT DROP AS"
            " SELECT id, {ks}, pre_seq, has_pre, pre_img{cs}, post_seq,"
            " post_img IS NOT NULL OR broken AS has_post,"
            " CASE WHEN broken THEN any_img ELSE post_img END AS post_img, post_xid, broken"
            " FROM (SELECT y.*, bool_or(gap) OVER (PARTITION BY {ks}) AS broken FROM ("
            " SELECT s.id, {s_ks}, s.seq AS pre_seq, s.pre_img IS NOT NULL AS has_pre,"
            " s.pre_img{s_cs}, last_value(s.seq) OVER whole AS post_seq,"
            " last_value(s.post_img) OVER whole AS post_img,"
            " last_value(s.xid) OVER whole AS post_xid, row_number() OVER w AS rn,"
            " coalesce(s.post_img, s.pre_img) AS any_img,"
            " row_number() OVER w > 1 AND lag(s.post_img) OVER w IS DISTINCT FROM s.pre_img"
            " AS gap FROM {stage} s WINDOW w AS (PARTITION BY {s_ks} ORDER BY s.seq),"
            " whole AS (w ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) y) x"
            " WHERE rn = 1 AND (broken OR pre_img IS DISTINCT FROM post_img)"
        ).format(
            net=self.net,
            stage=self.stage,
            ks=sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in self.key),
            s_ks=self._keys("s"),
            cs=self._cols(None),
            s_cs=self._cols("s"),
        )

    # pieces of statements ---------------------------------------------------------------------
    def _key_join(self, left: str, right: str) -> sql.Composed:
        return sql.SQL(" AND ").join(
            sql.SQL("{}.{} {} {}.{}").format(
                sql.Identifier(left),
                sql.Identifier(self.t.version.columns[i] if left == "t" else f"k{i}"),
                self.t.eq[i],
                sql.Identifier(right),
                sql.Identifier(f"k{i}"),
            )
            for i in self.key
        )

    def fingerprint(self, alias: str) -> sql.Composed:
        """The live row as a jsonb array of its columns' output texts (NULL as null): equal to
        a stored image exactly when every column prints as captured. concat() calls the output
        function, unlike ::text (boolean 'true', char(n) without padding, inet with a mask)."""
        return _fingerprint(alias, self.t.version.columns)

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
            "since": sql.SQL(WRITTEN_SINCE.format(since="n.since")),
            # the row as the undone change left it: still the version its transaction wrote
            # (xmin), or else equal to the image, column by column
            "m": sql.SQL(
                "NOT n.broken AND {} AND (t.xmin = n.post_xid OR {} = n.post_img::jsonb)"
            ).format(kj, fp),
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
        back what it updated, 'D' re-inserts what it deleted. Built once staging is done (the
        SET list depends on what the staged updates changed)."""
        if self._steps is None:
            if self.keyed:  # only kinds some net row can be (a broken chain is 'I' or 'U')
                ops = self.ops | ({"I", "D"} if self.key_moved else set())
                kinds = {"I": "I" in ops, "U": bool({"U", "D"} & ops), "D": "D" in ops}
                self._steps = {k: s for k, s in self._build_steps().items() if kinds[k]}
            else:
                self._steps = self._keyless_steps()
        return self._steps

    def _build_steps(self) -> dict[str, Step]:
        return {
            "I": self._step(
                "I",
                "n.has_post AND NOT n.has_pre",
                "DELETE FROM ONLY {t} t USING {net} n WHERE {cond} AND {m}",
                "SELECT count(*) FROM {net} n WHERE {cond}",
                _DIAGNOSE_POST,
            ),
            "U": self._step(
                "U",
                "n.has_pre AND n.has_post",
                "UPDATE ONLY {t} t SET "  # noqa: S608 (a template: placeholders only)
                + self._assignments()
                + " FROM {net} n WHERE {cond} AND {m}",
                "SELECT count(*) FROM {net} n WHERE {cond}",
                _DIAGNOSE_POST,
            ),
            "D": self._step(
                "D",
                "n.has_pre AND NOT n.has_post",
                "INSERT INTO {t} ({cols}){over} SELECT {vals} FROM {net} n WHERE {cond}"
                " AND NOT EXISTS (SELECT 1 FROM ONLY {t} t WHERE {kj})",
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
        itself = False
        if not positions:  # nothing but generated columns changed: a harmless assignment,
            # never of a GENERATED ALWAYS identity column, which PostgreSQL refuses to assign
            # when it parses the statement, whatever rows match (the printed script runs it)
            keys = [i for i in self.key if i not in self.t.identity_always]
            others = sorted(set(self.t.writable) - self.t.identity_always)
            if keys or not others:
                positions = {keys[0] if keys else self.key[0]}
            else:
                positions, itself = {others[0]}, True
        self._set_names = {
            f"s{i}": sql.SQL("{} = {}.{}").format(
                sql.Identifier(self.t.version.columns[i]),
                sql.Identifier("t" if itself else "n"),
                sql.Identifier(
                    self.t.version.columns[i] if itself else f"k{i}" if i in self.key else f"c{i}"
                ),
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
                " FROM ONLY {t} t JOIN {net} n ON {cond} AND {fp} = n.img::jsonb) x"
                " WHERE x.rn <= x.delta) d WHERE t.ctid = d.tid",
                "SELECT coalesce(sum(n.delta), 0) FROM {net} n WHERE {cond}",
                "SELECT n.id, n.seq, n.img::text, 'fewer identical rows are left than the"
                " undone changes made' FROM {net} n LEFT JOIN (SELECT {fp} AS img,"
                " count(*) AS found FROM ONLY {t} t GROUP BY 1) x ON x.img = n.img::jsonb"
                " WHERE {cond} AND coalesce(x.found, 0) < n.delta",
            ),
            # the table must hold as many identical rows as the undone changes left: one
            # written since the newest of them (a younger xmin; not this transaction's own,
            # age 0) makes the image a conflict, never a second copy
            "D": self._step(
                "D",
                "n.delta < 0",
                "INSERT INTO {t} ({cols}){over} SELECT {vals} FROM {net} n"
                " CROSS JOIN LATERAL generate_series(1, -n.delta) WHERE {cond}"
                " AND NOT EXISTS (SELECT 1 FROM ONLY {t} t WHERE {since} AND {fp} = n.img::jsonb"
                # the same bound for every row, so only young rows are fingerprinted
                " AND age(t.xmin) < (SELECT max(x.since) FROM {net} x WHERE x.delta < 0))",
                "SELECT coalesce(-sum(n.delta), 0) FROM {net} n WHERE {cond}",
                "SELECT n.id, n.seq, n.img::text, 'an identical row was written since' FROM {net} n"
                " WHERE {cond} AND EXISTS (SELECT 1 FROM ONLY {t} t WHERE {since}"
                " AND {fp} = n.img::jsonb)",
            ),
        }

    def young_rows(self, xids: Iterable[int]) -> sql.Composed:
        """Whether the table holds a row version written after these transactions (before a
        keyless table's deletes go straight back by COPY, which checks nothing)."""
        return sql.SQL("SELECT EXISTS (SELECT FROM ONLY {t} t WHERE {since})").format(
            t=self.t.ident,
            since=sql.SQL(WRITTEN_SINCE).format(
                since=sql.SQL("(SELECT min(age(x)) FROM unnest({}::xid[]) x)").format(
                    sql.Literal("{" + ",".join(str(x) for x in sorted(set(xids))) + "}")
                )
            ),
        )

    # conflicts left out ------------------------------------------------------------------------
    def create_skip(self) -> sql.Composed:
        return sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {} ON COMMIT DROP AS SELECT * FROM {} WHERE false"
        ).format(self.skip, self.net)

    def leave_out(self, ids: Sequence[int], keep: bool = True) -> sql.Composed:
        """Take these net rows out of the undo (into the skip table, where ``keep``: the
        foreign-key rules look for them there)."""
        gone = sql.SQL("DELETE FROM {} n WHERE n.id = ANY ({})").format(
            self.net, sql.Literal(sorted(ids))
        )
        if not keep:
            return gone
        return sql.SQL("WITH d AS ({} RETURNING n.*) INSERT INTO {} SELECT * FROM d").format(
            gone, self.skip
        )

    # foreign keys ------------------------------------------------------------------------------
    def written(self) -> str:
        """Net rows whose old image the undo writes back."""
        return "n.has_pre" if self.keyed else "n.delta < 0"

    def removed(self) -> tuple[str, str]:
        """Net rows whose new image the undo takes away, and the column holding that image."""
        return ("n.has_post", "post_img") if self.keyed else ("n.delta > 0", "img")


@dataclass(frozen=True)
class _ForeignKey:
    """A foreign key touching the undone tables, with the undos of its two ends (None: the
    table is not staged, or lacks a column of the key)."""

    label: str
    c_from: sql.Composed  # the referencing table, as PostgreSQL's own checks read it
    p_from: sql.Composed
    ccols: list[str]
    pcols: list[str]
    ptypes: list[str]
    #: per column, the equalities PostgreSQL's own checks of the key use (OPERATOR(s.x)):
    #: referenced = referencing, referenced = referenced (conpfeqop, conppeqop)
    pf: list[sql.Composable]
    pp: list[sql.Composable]
    child: TableUndo | None
    parent: TableUndo | None

    def child_values(self, alias: str = "n") -> list[sql.Composable]:
        """The key's values in the child's staged old row (typed columns)."""
        assert self.child is not None
        cols = self.child.t.version.columns
        return [
            sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(f"c{cols.index(c)}"))
            for c in self.ccols
        ]

    def parent_values(self, alias: str, img: str) -> list[sql.Composable]:
        """The referenced values in one of the parent's staged images, typed as the parent's."""
        assert self.parent is not None
        cols = self.parent.t.version.columns
        return [
            sql.SQL("({}.{}::jsonb ->> {})::{}").format(
                sql.Identifier(alias), sql.Identifier(img), sql.Literal(cols.index(c)), sql.SQL(t)
            )
            for c, t in zip(self.pcols, self.ptypes, strict=True)
        ]


def _equal(
    left: Sequence[sql.Composable],
    right: Sequence[sql.Composable],
    ops: Sequence[sql.Composable],
) -> sql.Composed:
    """left = right, column by column, each by its own equality (``ops``: OPERATOR(s.x))."""
    return sql.SQL(" AND ").join(
        sql.SQL("{} {} {}").format(a, op, b) for a, b, op in zip(left, right, ops, strict=True)
    )


def _columns(alias: str, cols: Sequence[str]) -> list[sql.Composable]:
    return [sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(c)) for c in cols]


def _foreign_keys(
    conn: psycopg.Connection[Any], undos: dict[int, TableUndo]
) -> Iterator[_ForeignKey]:
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
        " cn.nspname, cc.relname, pn.nspname, pc.relname,"
        " (SELECT array_agg(ARRAY[n.nspname::text, o.oprname::text] ORDER BY k.i)"
        "   FROM unnest(c.conpfeqop) WITH ORDINALITY k(op, i) JOIN pg_operator o ON o.oid = k.op"
        "   JOIN pg_namespace n ON n.oid = o.oprnamespace),"
        " (SELECT array_agg(ARRAY[n.nspname::text, o.oprname::text] ORDER BY k.i)"
        "   FROM unnest(c.conppeqop) WITH ORDINALITY k(op, i) JOIN pg_operator o ON o.oid = k.op"
        "   JOIN pg_namespace n ON n.oid = o.oprnamespace)"
        " FROM pg_constraint c JOIN pg_class cc ON cc.oid = c.conrelid"
        " JOIN pg_namespace cn ON cn.oid = cc.relnamespace"
        " JOIN pg_class pc ON pc.oid = c.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace"
        " WHERE c.contype = 'f' AND (c.conrelid = ANY (%s) OR c.confrelid = ANY (%s))"
        " ORDER BY c.oid",
        (oids, oids),
    ).fetchall()
    for name, child, parent, ckind, pkind, ccols, pcols, ptypes, cs, ct, ps, pt, pf, pp in rows:
        cu = undos.get(child)
        if cu is not None and not all(
            c in cu.t.version.columns and cu.t.version.columns.index(c) in cu.t.writable
            for c in ccols
        ):
            cu = None
        pu = undos.get(parent)
        if pu is not None and not all(c in pu.t.version.columns for c in pcols):
            pu = None
        yield _ForeignKey(
            label=f"{names.quote(cs, ct)} -> {names.quote(ps, pt)} ({name})",
            # as PostgreSQL's own checks do: ONLY, except for a partitioned table
            c_from=sql.SQL("{}{}").format(
                sql.SQL("") if ckind == "p" else sql.SQL("ONLY "), sql.Identifier(cs, ct)
            ),
            p_from=sql.SQL("{}{}").format(
                sql.SQL("") if pkind == "p" else sql.SQL("ONLY "), sql.Identifier(ps, pt)
            ),
            ccols=list(ccols),
            pcols=list(pcols),
            ptypes=list(ptypes),
            pf=[equality(*op) for op in pf],
            pp=[equality(*op) for op in pp],
            child=cu,
            parent=pu,
        )


def foreign_key_checks(
    conn: psycopg.Connection[Any], undos: dict[int, TableUndo]
) -> list[tuple[str, sql.Composed]]:
    """Per foreign key touching the undone tables, a query over the staged rows only that
    returns a violating value, if any. Needed because with session_replication_role = replica
    PostgreSQL does not check them; the rows the undo wrote must have their parents, and the
    rows it took away must not be referenced any more."""
    checks = []
    for fk in _foreign_keys(conn, undos):
        cu, pu = fk.child, fk.parent
        if cu is not None:
            vals = fk.child_values()
            checks.append(
                (
                    fk.label,
                    sql.SQL(
                        "SELECT concat_ws(', ', {vals}) FROM {net} n WHERE {cond} AND {nn}"
                        " AND NOT EXISTS (SELECT 1 FROM {p} p WHERE {match}) LIMIT 1"
                    ).format(
                        vals=sql.SQL(", ").join(vals),
                        net=cu.net,
                        cond=sql.SQL(cu.written()),
                        nn=sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(v) for v in vals),
                        p=fk.p_from,
                        match=_equal(_columns("p", fk.pcols), vals, fk.pf),
                    ),
                )
            )
        if pu is not None:
            cond, img = pu.removed()
            vals = fk.parent_values("n", img)
            checks.append(
                (
                    fk.label,
                    sql.SQL(
                        "SELECT concat_ws(', ', {vals}) FROM {net} n WHERE {cond}"
                        " AND NOT EXISTS (SELECT 1 FROM {p} p WHERE {pmatch})"
                        " AND EXISTS (SELECT 1 FROM {c} c WHERE {cmatch}) LIMIT 1"
                    ).format(
                        vals=sql.SQL(", ").join(vals),
                        net=pu.net,
                        cond=sql.SQL(cond),
                        p=fk.p_from,
                        pmatch=_equal(_columns("p", fk.pcols), vals, fk.pp),
                        c=fk.c_from,
                        cmatch=_equal(vals, _columns("c", fk.ccols), fk.pf),
                    ),
                )
            )
    return checks


def foreign_key_skips(
    conn: psycopg.Connection[Any], undos: dict[int, TableUndo]
) -> list[tuple[TableUndo, sql.Composed]]:
    """The foreign-key checks on the rows as they are, before anything is written, and what
    depends on a row left out: per foreign key, queries returning (net id, change id, image,
    reason) of net rows to leave out, run until none returns a row (``skip`` never leaves a
    row the foreign key no longer holds to, and never re-parents one). Over the nets (rows
    left out are in each table's skip table):

    - a row put back whose parent row this undo would restore is left out with that parent
      (whose key may exist again, another row: the child would join it);
    - a row put back whose parent would be missing (neither there and kept, nor restored);
    - a parent row taken away (its referenced values gone) that a child row still references
      after the undo (one not taken away, or one put back) is left out: it stays."""
    out: list[tuple[TableUndo, sql.Composed]] = []
    for fk in _foreign_keys(conn, undos):
        cu, pu = fk.child, fk.parent
        if cu is not None:
            v = fk.child_values()
            seq, img = ("pre_seq", "pre_img") if cu.keyed else ("seq", "img")
            restored: sql.Composable = sql.SQL("false")
            skipped: sql.Composable = sql.SQL("false")
            removed: sql.Composable = sql.SQL("false")
            if pu is not None:
                p_img = "pre_img" if pu.keyed else "img"
                provides = sql.SQL("{} AND {}").format(
                    sql.SQL(pu.written().replace("n.", "x.")),
                    _equal(fk.parent_values("x", p_img), v, fk.pf),
                )
                kept = (
                    sql.SQL("x.has_post AND {}").format(
                        _equal(fk.parent_values("x", "post_img"), v, fk.pf)
                    )
                    if pu.keyed
                    else sql.SQL("false")
                )
                restored = sql.SQL("EXISTS (SELECT 1 FROM {} x WHERE {})").format(pu.net, provides)
                skipped = sql.SQL("EXISTS (SELECT 1 FROM {} x WHERE {} AND NOT ({}))").format(
                    pu.skip, provides, kept
                )
                r_cond, r_img = pu.removed()
                removed = sql.SQL(
                    "EXISTS (SELECT 1 FROM {} x WHERE {} AND {} AND NOT ({}))"
                ).format(
                    pu.net,
                    sql.SQL(r_cond.replace("n.", "x.")),
                    _equal(fk.parent_values("x", r_img), v, fk.pf),
                    sql.SQL("x.has_pre AND {}").format(
                        _equal(fk.parent_values("x", "pre_img"), v, fk.pf)
                    )
                    if pu.keyed
                    else sql.SQL("false"),
                )
            out.append(
                (
                    cu,
                    sql.SQL(
                        "SELECT n.id, n.{seq}, n.{img}::text, CASE WHEN {skipped}"
                        " THEN {left} ELSE {missing} END || concat_ws(', ', {vals}) || ')'"
                        " FROM {net} n WHERE {cond} AND {nn} AND ({skipped} OR NOT ({restored}"
                        " OR (EXISTS (SELECT 1 FROM {p} p WHERE {match}) AND NOT {removed})))"
                    ).format(
                        seq=sql.Identifier(seq),
                        img=sql.Identifier(img),
                        skipped=skipped,
                        left=sql.Literal(
                            f"left out with the row it references, which is left out: {fk.label} ("
                        ),
                        missing=sql.Literal(
                            f"foreign key would be violated, the row it references is gone:"
                            f" {fk.label} ("
                        ),
                        vals=sql.SQL(", ").join(v),
                        net=cu.net,
                        cond=sql.SQL(cu.written()),
                        nn=sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(x) for x in v),
                        restored=restored,
                        p=fk.p_from,
                        match=_equal(_columns("p", fk.pcols), v, fk.pf),
                        removed=removed,
                    ),
                )
            )
        if pu is not None:
            r_cond, r_img = pu.removed()
            w = fk.parent_values("n", r_img)
            seq = "post_seq" if pu.keyed else "seq"
            # the child rows the undo takes away or changes, so they no longer reference w
            gone: sql.Composable
            if cu is None:
                gone = sql.SQL("false")
            elif cu.keyed:
                gone = sql.SQL(
                    "EXISTS (SELECT 1 FROM {net} y WHERE y.has_post AND {kj}"
                    " AND NOT (y.has_pre AND {same}))"
                ).format(
                    net=cu.net,
                    kj=_equal(
                        _columns("c", [cu.t.version.columns[i] for i in cu.key]),
                        _columns("y", [f"k{i}" for i in cu.key]),
                        [cu.t.eq[i] for i in cu.key],
                    ),
                    same=_equal(w, fk.child_values("y"), fk.pf),
                )
            else:
                gone = sql.SQL(
                    "EXISTS (SELECT 1 FROM {net} y WHERE y.delta > 0 AND {fp} = y.img::jsonb)"
                ).format(net=cu.net, fp=cu.fingerprint("c"))
            back = (
                sql.SQL("EXISTS (SELECT 1 FROM {net} y WHERE {cond} AND {match})").format(
                    net=cu.net,
                    cond=sql.SQL(cu.written().replace("n.", "y.")),
                    match=_equal(w, fk.child_values("y"), fk.pf),
                )
                if cu is not None
                else sql.SQL("false")
            )
            out.append(
                (
                    pu,
                    sql.SQL(
                        "SELECT n.id, n.{seq}, n.{img}::text,"
                        " {still} || concat_ws(', ', {w}) || ')'"
                        " FROM {net} n WHERE {cond} AND NOT ({same})"
                        " AND NOT EXISTS (SELECT 1 FROM {net} x WHERE {written} AND {provides})"
                        " AND (EXISTS (SELECT 1 FROM {c} c WHERE {cmatch} AND NOT {gone})"
                        " OR {back})"
                    ).format(
                        seq=sql.Identifier(seq),
                        img=sql.Identifier(r_img),
                        still=sql.Literal(
                            f"still referenced, the foreign key would be violated: {fk.label} ("
                        ),
                        w=sql.SQL(", ").join(w),
                        net=pu.net,
                        cond=sql.SQL(r_cond),
                        same=sql.SQL("n.has_pre AND {}").format(
                            _equal(fk.parent_values("n", "pre_img"), w, fk.pp)
                        )
                        if pu.keyed
                        else sql.SQL("false"),
                        written=sql.SQL(pu.written().replace("n.", "x.")),
                        provides=_equal(
                            fk.parent_values("x", "pre_img" if pu.keyed else "img"), w, fk.pp
                        ),
                        c=fk.c_from,
                        cmatch=_equal(w, _columns("c", fk.ccols), fk.pf),
                        gone=gone,
                        back=back,
                    ),
                )
            )
    return out


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


def _fingerprint(alias: str, columns: Sequence[str]) -> sql.Composed:
    """These columns of a live row as a jsonb array of their output texts (TableUndo's)."""
    cols = [
        sql.SQL("CASE WHEN {0}.{1} IS NULL THEN NULL ELSE pg_catalog.concat({0}.{1}) END").format(
            sql.Identifier(alias), sql.Identifier(c)
        )
        for c in columns
    ]
    parts: list[sql.Composable] = [
        sql.SQL("pg_catalog.jsonb_build_array({})").format(
            sql.SQL(", ").join(cols[i : i + _MAX_ARGS])
        )
        for i in range(0, len(cols), _MAX_ARGS)
    ] or [sql.SQL("'[]'::pg_catalog.jsonb")]
    return sql.SQL(" || ").join(parts)


def _float_or_numeric(type_name: str) -> bool:
    """A type whose NaN and ±Infinity wal2json before 2.6 sends as null (format_type's name)."""
    return type_name in ("real", "double precision", "numeric") or type_name.startswith("numeric(")


def lost_to_decoder(
    conn: psycopg.Connection[Any], t: LiveTable, image: Sequence[Value]
) -> list[str]:
    """The columns of a conflicting image that a decoder without NaN lost: the image holds NULL
    in a float or numeric column, and the table has a row equal to the image in every other
    column that holds NaN or ±Infinity there. Empty when there is no such row."""
    tv = t.version
    lost = [i for i, v in enumerate(image) if v is None and _float_or_numeric(tv.types[i])]
    if not lost:
        return []
    rest = [i for i in range(len(tv.columns)) if i not in lost]

    def special(i: int) -> sql.Composed:
        return sql.SQL("pg_catalog.concat(t.{}) IN ('NaN', 'Infinity', '-Infinity')").format(
            sql.Identifier(tv.columns[i])
        )

    row = conn.execute(
        sql.SQL("SELECT {} FROM ONLY {} t WHERE {} = {}::jsonb AND {}").format(
            sql.SQL(", ").join(sql.SQL("bool_or({})").format(special(i)) for i in lost),
            t.ident,
            _fingerprint("t", [tv.columns[i] for i in rest]),
            sql.Literal(image_text([image[i] for i in rest])),
            sql.SQL(" AND ").join(
                sql.SQL("(t.{} IS NULL OR {})").format(sql.Identifier(tv.columns[i]), special(i))
                for i in lost
            ),
        )
    ).fetchone()
    return [tv.columns[i] for i, hit in zip(lost, row or (), strict=False) if hit]


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
