"""The store's reads: sessions, show, status. Plain SQL with ``?`` parameters, one text for both
stores: SQLite runs it as it is, a PostgreSQL store through its runner (postgres/_store.py),
which adapts the placeholders and scopes the tables to one source. The few constructs the two
engines spell differently are named fragments (:data:`SQLITE`), each store giving its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypedDict

from undo.core import names
from undo.core.errors import BadInput, NotFound, NotRecorded, UndoError
from undo.core.images import OP_NAMES, shown_images
from undo.core.times import epoch
from undo.core.wal import lsn_to_int
from undo.store._writer import ACTIVITY_SESSION_SQL
from undo.store.api import (
    ActivityBucket,
    DdlCommand,
    GuardRefusal,
    HistoryVersion,
    MalformedMessage,
    Normalise,
    RowChange,
    SessionRow,
    Shown,
    ShownClaims,
    ShownTotals,
    ShownTransaction,
    StatusGap,
    StoreStatus,
    TableOpRows,
    Transaction,
    Undone,
    activity_session,
    ledger_entry,
    split_claims,
)

_TRANSACTION_FIELDS = tuple(f.name for f in fields(Transaction))


class Database(Protocol):
    """What the reads run on: the SQLite store's sqlite_utils Database, or a PostgreSQL store's
    runner. ``fragments`` (optional; SQLite's when absent): the store's spelling of
    :data:`SQLITE`'s constructs."""

    def execute(self, sql: str, parameters: Any = ...) -> Any: ...


#: the constructs the engines spell differently, as SQLite spells them: the elements of a JSON
#: array given as one parameter, as integers (``ids_of_json``) or as text (``texts_of_json``)
SQLITE = {
    "ids_of_json": "SELECT value FROM json_each(?)",
    "texts_of_json": "SELECT value FROM json_each(?)",
    # more that ties a change ``c`` to its transaction ``t`` (on PostgreSQL, the partition)
    "of_its_transaction": "",
}


def fragment(db: Database, name: str) -> str:
    """The store's spelling of one of :data:`SQLITE`'s constructs."""
    return str(getattr(db, "fragments", SQLITE)[name])


def _transactions(db: Database, query: str, params: Sequence[object]) -> list[Transaction]:
    """The transactions a query of the transactions table finds (SELECT *), by column name."""
    cur = db.execute(query, params)
    names = [d[0] for d in cur.description]
    return [
        Transaction(*(dict(zip(names, row, strict=True))[f] for f in _TRANSACTION_FIELDS))
        for row in cur.fetchall()
    ]


def recorded_tables(db: Database) -> list[tuple[str, str]]:
    """(schema, table) of every table the store holds changes or versions of."""
    return [
        (r[0], r[1])
        for r in db.execute(
            "SELECT DISTINCT schema_name, table_name FROM relations ORDER BY 1, 2"
        ).fetchall()
    ]


def resolve_table(db: Database, text: str, roots: bool = False) -> tuple[str, str]:
    """A table name as the user typed it -> (schema, table) among the tables the store holds
    (with ``roots``, partitioned tables whose partitions it holds too)."""
    known = [(r[0], r[1]) for r in db.execute("SELECT schema_name, table_name FROM relations")]
    if roots:
        known += [
            (r[0], r[1])
            for r in db.execute(
                "SELECT DISTINCT root_schema, root_table FROM relations"
                " WHERE root_schema IS NOT NULL"
            )
        ]
    return names.resolve(text, known)


#: session ids in one IN list (SQLite takes up to 32,766 parameters)
_IDS_AT_ONCE = 500


def sessions(
    db: Database,
    since: str | None = None,
    until: str | None = None,
    app: str | None = None,
    user: str | None = None,
    tables: list[str] | None = None,
    limit: int | None = None,
    offset: int = 0,
    undone_filter: bool | None = None,
    sources: Mapping[int, str | None] | None = None,
) -> list[SessionRow]:
    """One row per source, session and tag that wrote, newest first (a forged tag claiming a
    session is its own row, never merged into the real one); filters apply to its
    transactions; ``undone_filter`` keeps only sessions some undo undid (True) or none did
    (False). ``guard_refusals`` counts the session's writes a guard refused; a session whose
    every write was refused is a row too (no transactions). ``sources``: the name each row
    carries, by its source's id (the reader's sources: one, or several read at once).

    With several sources, a table named in ``tables`` is resolved in each (as each source's
    own listing would): a source that holds none of that name is left out, and when none holds
    it, the error is that of the listing of one.

    Tables touched come from the activity aggregates, not from scanning the changes.
    """

    def filters(time: str, alias: str) -> tuple[str, list[object]]:
        where = ["1 = 1"]
        params: list[object] = []
        for cond, value in (
            (f"{alias}.{time} >= ?", since or None),
            (f"{alias}.{time} < ?", until or None),
            (f"{alias}.application_name = ?", app),
            (f"{alias}.user_name = ?", user),
        ):
            if value is not None:
                where.append(cond)
                params.append(value)
        return " AND ".join(where), params

    where, params = filters("commit_time", "t")
    if tables:
        where, params = _with_tables(db, tables, where, params)
    # writes a guard refused count under the session that tried (no table: not with --table)
    g_where, g_params = filters("refused_at", "g")
    if tables:
        g_where = "1 = 0"
        g_params = []
    query = (
        "SELECT session_id, max(application_name) AS application_name,"  # noqa: S608
        " max(user_name) AS user, max(client_addr) AS client_addr,"
        " min(at) AS first_change_at, max(at) AS last_change_at,"
        " sum(txn) AS transactions, sum(inserts) AS inserts, sum(updates) AS updates,"
        " sum(deletes) AS deletes, sum(1 - txn) AS guard_refusals, tag, tag_reason, source"
        " FROM (SELECT t.session_id, t.application_name, t.user_name, t.client_addr,"
        " t.commit_time AS at, 1 AS txn, t.inserts, t.updates, t.deletes, t.tag, t.tag_reason,"
        " t.source FROM transactions t WHERE " + where + " UNION ALL"
        " SELECT g.session_id, g.application_name, g.user_name, g.client_addr, g.refused_at,"
        " 0, 0, 0, 0, g.tag, g.tag_reason, g.source FROM guard_refusals g WHERE " + g_where + ")"
        " AS u GROUP BY source, session_id, tag, tag_reason"
        # sources read at once come in the order of their listings merged (newest first; a
        # tie in the order the sources were registered)
        " ORDER BY last_change_at DESC, source"
    )
    params += g_params
    if limit is not None:
        query += " LIMIT ? OFFSET ?"
        params += [limit, offset]
    # session_id ... guard_refusals, tag, tag_reason: SessionRow's fields before tables; source
    found = db.execute(query, params).fetchall()
    touched: dict[tuple[int, str], set[str]] = {}
    ids = [(r[13], activity_session(r[0], r[11])) for r in found]
    # each session's (id, relation) pairs, the relations' sources and names apart: a name and
    # a join per pair made the query of all 10,000 sessions' tables 140 ms of its 500
    relations = {
        rel: (src, name)
        for rel, src, name in (
            db.execute(
                "SELECT id, source, qualified_name(schema_name, table_name) FROM relations"
            ).fetchall()
            if found
            else ()
        )
    }
    tables_of = "SELECT DISTINCT session_id, relation FROM activity"
    unfiltered = not (since or until or app or user or tables)
    if unfiltered and len(ids) > _IDS_AT_ONCE:  # most sessions of the sources: all their tables
        # in one query (a query a chunk of ids took 8 ms each, 170 ms of all 10,000 sessions'
        # 350 on a PostgreSQL store)
        chunks = [(set(ids), db.execute(tables_of).fetchall())]
    else:
        chunks = []
        for i in range(0, len(ids), _IDS_AT_ONCE):
            chunk = set(ids[i : i + _IDS_AT_ONCE])
            wanted_ids = sorted({sid for _, sid in chunk})
            chunks.append(
                (
                    chunk,
                    db.execute(
                        tables_of + f" WHERE session_id IN ({','.join('?' * len(wanted_ids))})",
                        wanted_ids,
                    ).fetchall(),
                )
            )
    for wanted, pairs in chunks:
        for sid, rel in pairs:
            src, table = relations[rel]
            if (src, sid) in wanted:  # not the same session id in another source
                touched.setdefault((src, sid), set()).add(table)
    undone = undone_by_source(db)
    rows = [
        SessionRow(
            *(
                *r[:13],
                tuple(sorted(touched.get((r[13], activity_session(r[0], r[11])), []))),  # tables
                undone.get((r[13], r[0], r[11])),
                (sources or {}).get(r[13]),
            )
        )
        for r in found
    ]
    if undone_filter is not None:
        rows = [r for r in rows if (r.undone is not None) == undone_filter]
    return rows


def _with_tables(
    db: Database, tables: list[str], where: str, params: list[object]
) -> tuple[str, list[object]]:
    """``where`` of the transactions ``t`` kept to the sessions that changed each of these
    tables (a partitioned table's name covers its partitions, whose changes the store holds),
    each name resolved among the tables of each source the reader holds; a source holding
    none of that name is left out, and none holding it is the error of the first that held
    something else (an ambiguous name), else the first."""
    known: dict[int, list[tuple[str, str]]] = {}
    roots: dict[int, list[tuple[str, str]]] = {}
    for src, schema, table, root_schema, root_table in db.execute(
        "SELECT source, schema_name, table_name, root_schema, root_table FROM relations"
        " ORDER BY source"
    ):
        known.setdefault(src, []).append((schema, table))
        if root_schema is not None:
            roots.setdefault(src, []).append((root_schema, root_table))
    if not known:  # a store with no tables: the error of one source's listing
        names.resolve(tables[0], [])
    held: list[str] = []
    held_params: list[object] = []
    errors: list[UndoError] = []
    for src in known:
        try:
            wanted = [names.resolve(n, known[src] + roots.get(src, [])) for n in tables]
        except (BadInput, NotRecorded) as e:
            errors.append(e)
            continue
        conds = ["t.source = ?"]
        held_params.append(src)
        for schema, table in wanted:
            conds.append(
                f"{ACTIVITY_SESSION_SQL} IN (SELECT a.session_id FROM activity a"  # noqa: S608 (a constant)
                " JOIN relations r ON r.id = a.relation WHERE r.source = ? AND"
                " ((r.schema_name = ? AND r.table_name = ?)"
                " OR (r.root_schema = ? AND r.root_table = ?)))"
            )
            held_params += [src, schema, table, schema, table]
        held.append("(" + " AND ".join(conds) + ")")
    if not held:
        raise next((e for e in errors if not isinstance(e, NotFound)), errors[0])
    return where + " AND (" + " OR ".join(held) + ")", [*params, *held_params]


def _ledger_entries(text: str | None) -> list[list[str]]:
    """A mirror's entries that are entries: whatever a row holds, reading it never fails."""
    try:
        entries = json.loads(text or "[]")
    except (ValueError, RecursionError):
        return []
    if not isinstance(entries, list):
        return []
    return [e for e in map(ledger_entry, entries) if e is not None]


class LiveUndo(TypedDict):
    """An undo no later undo has undone: when, its xid, and what it undid as (commit LSN,
    schema, table, op) pieces."""

    applied_at: str
    undo_xid: int
    pieces: set[tuple[int, str, str, str]]


def live_undos(db: Database) -> list[LiveUndo]:
    """The undos the store knows of that no later undo has undone, newest first (of the
    reader's one source: see _live_undos)."""
    return _live_undos(
        db.execute(
            "SELECT applied_at, undo_xid, entries FROM undos WHERE tag = 'trusted' ORDER BY id DESC"
        ).fetchall()
    )


def _live_undos(rows: Sequence[Sequence[Any]]) -> list[LiveUndo]:
    """Of one source's trusted undos, (applied_at, undo_xid, entries) newest first, those no
    later undo has undone, newest first, with what they undid as (commit LSN, schema, table,
    op) pieces. Trusted mirrors only (signed by undo.record_undo in its own transaction): a
    forged one undoes nothing."""
    undos = [(applied_at, undo_xid, _ledger_entries(e)) for applied_at, undo_xid, e in rows]
    undone_xids = {int(e[4]) for _, _, entries in undos for e in entries}
    return [
        {
            "applied_at": applied_at,
            "undo_xid": undo_xid,
            "pieces": {(lsn_to_int(e[0]), e[1], e[2], e[3]) for e in entries},
        }
        for applied_at, undo_xid, entries in undos
        if undo_xid not in undone_xids
    ]


def undone_sessions(db: Database) -> dict[tuple[str | None, str], Undone]:
    """(session id, tag) -> what undid it: the latest undo that undid any of its changes, and
    whether every change of it is undone (``all``). Of the reader's one source."""
    return {(sid, tag): u for (_, sid, tag), u in undone_by_source(db).items()}


def undone_by_source(db: Database) -> dict[tuple[int, str | None, str], Undone]:
    """undone_sessions of each source the reader holds: (source id, session id, tag) -> what
    undid it, each source's undos matched with its own transactions only (two sources' LSNs
    may meet)."""
    by_source: dict[int, list[Any]] = {}
    for src, *row in db.execute(
        "SELECT source, applied_at, undo_xid, entries FROM undos WHERE tag = 'trusted'"
        " ORDER BY id DESC",
    ).fetchall():
        by_source.setdefault(src, []).append(row)
    out: dict[tuple[int, str | None, str], Undone] = {}
    for src, rows in by_source.items():
        undos = _live_undos(rows)
        covered = {p for u in undos for p in u["pieces"]}
        lsns = sorted({p[0] for p in covered})
        for i in range(0, len(lsns), 500):
            chunk = lsns[i : i + 500]
            for sid, tag in db.execute(
                "SELECT DISTINCT session_id, tag FROM transactions"  # noqa: S608
                f" WHERE source = ? AND commit_lsn IN ({','.join('?' * len(chunk))})",
                [src, *chunk],
            ).fetchall():
                pieces = {
                    (lsn, schema, table, op)
                    for lsn, schema, table, op in db.execute(
                        "SELECT t.commit_lsn, r.schema_name, r.table_name, x.op"  # noqa: S608
                        " FROM transactions t JOIN txn_changes x ON x.txn = t.id"
                        " JOIN relations r ON r.id = x.relation WHERE t.source = ? AND "
                        + ("t.session_id IS NULL" if sid is None else "t.session_id = ?")
                        + " AND t.tag = ? AND x.op <> 'T'",
                        [src, tag] if sid is None else [src, sid, tag],
                    )
                }
                latest = next(u for u in undos if u["pieces"] & pieces)
                out[src, sid, tag] = Undone(
                    latest["applied_at"], latest["undo_xid"], pieces <= covered
                )
    return out


def transactions_of_session(db: Database, session_id: str) -> list[Transaction]:
    rows = _transactions(
        db,
        "SELECT * FROM transactions WHERE session_id = ? ORDER BY commit_lsn",
        [session_id],
    )
    if not rows:
        raise NotFound(f"unknown session {session_id!r}: list sessions with `undo sessions`")
    return rows


def transactions_by_xid(db: Database, xids: list[int]) -> list[Transaction]:
    rows: list[Transaction] = []
    for xid in xids:
        found = _transactions(
            db, "SELECT * FROM transactions WHERE xid = ? ORDER BY commit_lsn", [xid]
        )
        if not found:
            raise NotFound(f"unknown xid {xid}: no captured transaction has it")
        rows += found
    return sorted(rows, key=lambda r: r.commit_lsn)


#: a change ``c``'s statement, in a query that has its transaction as ``t``: the statement that
#: made it (statements, m013), or the transaction's first
STATEMENT_OF_CHANGE = (
    "coalesce((SELECT s.statement FROM statements s WHERE s.txn = c.txn AND s.first_ord <= c.ord"
    " ORDER BY s.first_ord DESC LIMIT 1), t.statement) AS statement"
)


def changes_page(db: Database, txn_ids: list[int], limit: int, offset: int) -> list[RowChange]:
    """One page of a set of transactions' changes, in commit order (by id).

    Each transaction's changes are one range of ids, so the page is found from the
    transactions' ranges and read by ``id BETWEEN``: the same few index probes wherever the
    session sits in the store. (A join of the transactions with the changes ordered by id and
    cut by LIMIT/OFFSET let PostgreSQL walk the changes' primary key from the store's first
    change: 1.4-3.9 s for a session in the middle of 5,000,000 changes, bench/serve.)"""
    if not txn_ids or limit <= 0:
        return []
    ranges = db.execute(
        "SELECT first_change, last_change FROM transactions"  # noqa: S608
        " WHERE id IN (" + fragment(db, "ids_of_json") + ") AND first_change IS NOT NULL"
        " ORDER BY first_change",
        [json.dumps(txn_ids)],
    ).fetchall()
    pieces: list[tuple[int, int]] = []
    skip, want = offset, limit
    for first, last in ranges:
        held = int(last) - int(first) + 1  # ids are never reused: a range holds no other's
        if skip >= held:
            skip -= held
            continue
        lo = int(first) + skip
        hi = min(int(last), lo + want - 1)
        skip, want = 0, want - (hi - lo + 1)
        pieces.append((lo, hi))
        if want == 0:
            break
    out: list[RowChange] = []
    for lo, hi in pieces:
        out += [
            _change(*r)
            for r in db.execute(
                "SELECT c.txn, c.ord, c.op, c.key, c.old, c.new, c.unchanged, r.schema_name,"
                " r.table_name, r.columns, r.key_columns, " + STATEMENT_OF_CHANGE + " FROM"
                " changes c JOIN relations r ON r.id = +c.relation JOIN transactions t"
                " ON t.id = c.txn WHERE c.id BETWEEN ? AND ? ORDER BY c.id",
                [lo, hi],
            ).fetchall()
        ]
    return out


def _change(
    txn: int,
    ord: int,
    op: str,
    key: str | None,
    old_text: str | None,
    new_text: str | None,
    unchanged: str | None,
    schema_name: str,
    table_name: str,
    columns: str,
    key_columns: str | None,
    statement: str | None,
) -> RowChange:
    """A change as the columns c.txn ... r.key_columns, statement of the queries above read it."""
    cols = json.loads(columns)
    old, new = shown_images(cols, old_text, new_text, unchanged)
    return RowChange(
        txn=txn,
        ord=ord,
        table=names.quote(schema_name, table_name),
        op=OP_NAMES[op],
        key=tuple(json.loads(key)) if key else None,
        key_columns=tuple(cols[i] for i in json.loads(key_columns)) if key_columns else None,
        statement=statement,
        old=old,
        new=new,
    )


def changes_of(db: Database, txn_ids: list[int]) -> list[RowChange]:
    """The row changes of these transactions, with their table, old and new values by name.

    A TOASTed value an update left unchanged is shown in ``new`` as the old value it kept.
    """
    out: list[RowChange] = []
    for txn in txn_ids:
        out += [
            _change(*r)
            for r in db.execute(
                "SELECT c.txn, c.ord, c.op, c.key, c.old, c.new, c.unchanged, r.schema_name,"
                " r.table_name, r.columns, r.key_columns, " + STATEMENT_OF_CHANGE + " FROM"
                " changes c JOIN relations r ON r.id = +c.relation JOIN transactions t ON t.id = ?"
                " WHERE c.id BETWEEN t.first_change AND t.last_change"
                + fragment(db, "of_its_transaction")
                + " ORDER BY c.id",
                [txn],
            ).fetchall()
        ]
    return out


def guard_refusals(db: Database, session_id: str | None = None) -> list[GuardRefusal]:
    """Writes a guard refused, oldest first (of one session, if given); of several sources,
    each source's in turn."""
    rows = db.execute(
        "SELECT refused_at, guard, reason, session_id, application_name, user_name AS user,"
        " client_addr, statement, tag, tag_reason FROM guard_refusals"
        " WHERE CAST(? AS TEXT) IS NULL OR session_id = ? ORDER BY source, lsn",
        [session_id, session_id],
    ).fetchall()
    return [GuardRefusal(*r) for r in rows]


#: the malformed messages `show` lists (any role can emit thousands claiming a session): the
#: first ones; `malformed_count` says how many there are
MALFORMED_SHOWN = 100


def malformed_of(
    db: Database, session_id: str | None = None, xid: int | None = None
) -> tuple[list[MalformedMessage], int]:
    """Messages with undo's prefixes that claimed this session (or came in this transaction)
    and were not what undo's SQL writes: kept, never used (stream/messages.py). The first
    MALFORMED_SHOWN of them, and how many there are."""
    where = (
        "(CAST(? AS TEXT) IS NOT NULL AND session_id = ?)"
        " OR (CAST(? AS BIGINT) IS NOT NULL AND xid = ?)"
    )
    params = [session_id, session_id, xid, xid]
    (count,) = db.execute(f"SELECT count(*) FROM malformed WHERE {where}", params).fetchone()  # noqa: S608
    rows = db.execute(
        "SELECT received_at, lsn, prefix, xid, session_id, problem, size FROM malformed"  # noqa: S608
        f" WHERE {where} ORDER BY lsn LIMIT ?",
        [*params, MALFORMED_SHOWN],
    ).fetchall()
    return [MalformedMessage(*r) for r in rows], int(count)


def ddl_of(db: Database, session_id: str | None = None, xid: int | None = None) -> list[DdlCommand]:
    """DDL a session (or a transaction) ran on audited schemas, in order."""
    rows = db.execute(
        "SELECT commit_time, xid, command, object_type, object, statement, tag, tag_reason"
        " FROM ddl WHERE (CAST(? AS TEXT) IS NOT NULL AND session_id = ?)"
        " OR (CAST(? AS BIGINT) IS NOT NULL AND xid = ?)"
        " ORDER BY id",
        [session_id, session_id, xid, xid],
    ).fetchall()
    return [DdlCommand(*r) for r in rows]


def show(db: Database, session_id: str | None = None, xid: int | None = None) -> Shown:
    refusals = guard_refusals(db, session_id) if session_id is not None else []
    ddl = ddl_of(db, session_id, xid)
    malformed, malformed_count = malformed_of(db, session_id, xid)
    try:
        txns = (
            transactions_of_session(db, session_id)
            if session_id is not None
            else transactions_by_xid(db, [xid or 0])
        )
    except NotFound:
        if not refusals and not ddl and not malformed:
            raise
        txns = []
    changes = changes_of(db, [t.id for t in txns])
    by_txn: dict[int, list[RowChange]] = {}
    for c in changes:
        by_txn.setdefault(c.txn, []).append(c)
    sid = session_id if session_id is not None or not txns else txns[0].session_id
    undone = undone_sessions(db)
    # a session is its trusted transactions; those that only claim it are listed apart
    own, claims = split_claims(txns) if session_id is not None else (txns, [])

    def listed(ts: list[Transaction]) -> tuple[ShownTransaction, ...]:
        return tuple(
            ShownTransaction(
                xid=t.xid,
                commit_time=t.commit_time,
                application_name=t.application_name,
                user=t.user_name,
                statement=t.statement,
                tag=t.tag,
                tag_reason=t.tag_reason,
                changes=tuple(by_txn.get(t.id, [])),
            )
            for t in ts
        )

    mine, others = listed(own), listed(claims)
    return Shown(
        session_id=sid,
        undone=undone.get((sid, "trusted"))
        if session_id is not None
        else (undone.get((sid, txns[0].tag)) if txns else None),
        totals=totals(mine),
        transactions=mine,
        untrusted=ShownClaims(
            undone=undone.get((sid, "untrusted")) if claims else None,
            totals=totals(others),
            transactions=others,
        ),
        guard_refusals=tuple(refusals),
        ddl=tuple(ddl),
        malformed=tuple(malformed),
        malformed_count=malformed_count,
    )


def totals(txns: Sequence[ShownTransaction]) -> ShownTotals:
    """Transactions, row changes, and rows per table and operation of ``show``'s transactions."""
    counts: dict[tuple[str, str], int] = {}
    for t in txns:
        for c in t.changes:
            counts[c.table, c.op] = counts.get((c.table, c.op), 0) + 1
    return ShownTotals(
        transactions=len(txns),
        changes=sum(counts.values()),
        rows=tuple(TableOpRows(t, op, n) for (t, op), n in sorted(counts.items())),
    )


def status(db: Database) -> StoreStatus:
    """What the store says of the reader's rows (its source's)."""
    return statuses(db, {None: None})[0]


def statuses(db: Database, sources: Mapping[int | None, str | None]) -> list[StoreStatus]:
    """What the store says of each of these sources (ids among the reader's sources, or None:
    every row the reader holds), with the name each status carries, in their order: one
    query each over them all."""

    def rows(query: str) -> dict[int, list[Any]]:
        found: dict[int, list[Any]] = {}
        for src, *row in db.execute(query).fetchall():
            found.setdefault(src, []).append(row)
        return found

    def of(found: dict[int, list[Any]], src: int | None) -> list[Any]:
        return [r for i, rs in found.items() for r in rs] if src is None else found.get(src, [])

    counts = rows(
        "SELECT source, count(*), coalesce(sum(inserts + updates + deletes + truncates), 0)"
        " FROM transactions GROUP BY 1"
    )
    meta = rows("SELECT source, key, value FROM meta")
    gaps = rows(
        'SELECT source, kind, table_name AS "table", session_id, from_lsn, to_lsn,'
        " detected_at AS at, reason, detected_at, id FROM gaps ORDER BY id",
    )
    untrusted = rows(
        "SELECT source, tag_reason, sum(inserts + updates + deletes + truncates)"
        " FROM transactions WHERE tag <> 'trusted' GROUP BY 1, 2 ORDER BY 2"
    )
    malformed = rows("SELECT source, prefix, count(*) FROM malformed GROUP BY 1, 2 ORDER BY 2")
    out = []
    for src, name in sources.items():
        # the store's own keys (SQLite's meta, no source), then the source's
        own_meta = dict(meta.get(None, [])) | dict(of(meta, src))  # type: ignore[call-overload]
        last = db.execute(
            "SELECT commit_time, end_lsn FROM transactions"  # noqa: S608 (a constant)
            + ("" if src is None else " WHERE source = ?")
            + " ORDER BY id DESC LIMIT 1",
            [] if src is None else [src],
        ).fetchone()
        summed: dict[str, dict[Any, int]] = {"untrusted": {}, "malformed": {}}
        for part, found in (("untrusted", untrusted), ("malformed", malformed)):
            for label, n in of(found, src):
                summed[part][label] = summed[part].get(label, 0) + n
        n_txns = sum(r[0] for r in of(counts, src))
        n_changes = sum(r[1] for r in of(counts, src))
        out.append(
            StoreStatus(
                decoder=own_meta.get("decoder"),
                slot=own_meta.get("slot"),
                store_position=int(own_meta.get("position") or 0),
                last_commit_time=last[0] if last else None,
                transactions=n_txns,
                changes=n_changes,
                # writes on audited tables without a trusted tag, by reason (forged, replayed,
                # malformed, missing): never counted under the session they claim
                untrusted_writes=summed["untrusted"],
                # messages with undo's prefixes that were not what undo's SQL writes, by prefix
                malformed_messages=summed["malformed"],
                gaps=tuple(StatusGap(*g[:-1]) for g in sorted(of(gaps, src), key=lambda g: g[-1])),
                source=name,
            )
        )
    return out


def history(
    db: Database,
    table: str,
    key: dict[str, str | None],
    normalise: Normalise,
) -> list[HistoryVersion]:
    """Every recorded version of one row, oldest first, with who changed it. A table with a key
    is asked by its whole key; a keyless one by any of its columns, and every change whose old
    or new row holds all the values given is shown. Values are compared in their type's text
    form (``normalise``: undo.source.keyforms). A partitioned table's name covers its
    partitions (the roots capture recorded): a row moved between them, a delete in one and an
    insert in another in one transaction, is one update (``moved_from``)."""
    schema, name = resolve_table(db, table, roots=True)
    rels = db.execute(
        "SELECT id, schema_name, table_name, columns, types, key_columns FROM relations"
        " WHERE (schema_name = ? AND table_name = ?) OR (root_schema = ? AND root_table = ?)",
        [schema, name, schema, name],
    ).fetchall()
    out: list[tuple[tuple[int, int], HistoryVersion]] = []  # (commit_lsn, ord), version
    usable = False
    for rel_id, rel_schema, rel_table, rel_columns, rel_types, rel_key_columns in rels:
        cols = json.loads(rel_columns)
        types = dict(zip(cols, json.loads(rel_types), strict=False))
        leaf = names.quote(rel_schema, rel_table)
        if not set(key) <= set(cols):
            continue
        wanted = {
            c: None if v is None else normalise(c, types.get(c, ""), v) for c, v in key.items()
        }
        if rel_key_columns is None:
            where, params = "c.relation = ?", [rel_id]
        else:
            key_cols = [cols[i] for i in json.loads(rel_key_columns)]
            if set(key_cols) != set(key):
                continue
            key_json = json.dumps(
                [wanted[c] for c in key_cols], ensure_ascii=False, separators=(",", ":")
            )
            where, params = "c.relation = ? AND c.key = ?", [rel_id, key_json]
        usable = True
        for (
            op,
            old_text,
            new_text,
            unchanged,
            xid,
            commit_time,
            session_id,
            application_name,
            user_name,
            statement,
            undo_of,
            tag,
            commit_lsn,
            ord_,
        ) in db.execute(
            "SELECT c.op, c.old, c.new, c.unchanged, t.xid, t.commit_time, t.session_id,"  # noqa: S608
            " t.application_name, t.user_name, " + STATEMENT_OF_CHANGE + ", t.undo_of, t.tag,"
            " t.commit_lsn, c.ord FROM changes c JOIN transactions t ON t.id = c.txn WHERE "
            + where,
            params,
        ):
            old, new = shown_images(cols, old_text, new_text, unchanged)
            if rel_key_columns is None and not any(
                image is not None and all(image.get(c) == v for c, v in wanted.items())
                for image in (old, new)
            ):
                continue
            out.append(
                (
                    (commit_lsn, ord_),
                    HistoryVersion(
                        op=OP_NAMES[op],
                        command=None,
                        table=leaf,
                        moved_from=None,
                        xid=xid,
                        commit_time=commit_time,
                        session_id=session_id,
                        application_name=application_name,
                        user=user_name,
                        tag=tag,
                        statement=statement,
                        undo_of=json.loads(undo_of) if undo_of else None,
                        old=old,
                        new=new,
                    ),
                )
            )
    if not usable:
        keys = sorted(
            {
                ", ".join(json.loads(r[3])[i] for i in json.loads(r[5]))
                for r in rels
                if r[5] is not None
            }
        )
        raise BadInput(
            f"give the key of {names.quote(schema, name)} as COLUMN=VALUE for each key column"
            + (
                f": {' or '.join(keys)}"
                if keys
                else " (for a table without a key: any of its columns)"
            )
        )
    if not out:
        shown = ", ".join(f"{c}={'NULL' if v is None else v}" for c, v in key.items())
        raise NotRecorded(f"no recorded change of {names.quote(schema, name)} with {shown}")
    out = _moves(sorted(out, key=lambda r: r[0]))
    tables = sorted({names.quote(schema, name)} | {v.table for _, v in out})
    for (
        commit_lsn,
        commit_time,
        xid,
        session_id,
        application_name,
        user_name,
        statement,
        command,
        tag,
        obj,
    ) in db.execute(  # the tables' DDL, in order with the row's versions
        "SELECT commit_lsn, commit_time, xid, session_id, application_name, user_name, statement,"  # noqa: S608 (constant fragments)
        " command, tag, object FROM ddl WHERE object_type = 'table'"
        " AND object IN (" + fragment(db, "texts_of_json") + ") AND commit_lsn >= ?",
        [json.dumps(tables), min(order[0] for order, _ in out)],
    ):
        out.append(
            (
                (commit_lsn, 2**62),  # after the row changes of its transaction
                HistoryVersion(
                    op="ddl",
                    command=command,
                    table=obj,
                    moved_from=None,
                    xid=xid,
                    commit_time=commit_time,
                    session_id=session_id,
                    application_name=application_name,
                    user=user_name,
                    tag=tag,
                    statement=statement,
                    undo_of=None,
                    old=None,
                    new=None,
                ),
            )
        )
    out.sort(key=lambda r: r[0])
    return [v for _, v in out]


def _moves(
    rows: list[tuple[tuple[int, int], HistoryVersion]],
) -> list[tuple[tuple[int, int], HistoryVersion]]:
    """A delete in one partition followed, in the same transaction, by an insert of the row in
    another is how PostgreSQL moves a row (an update of its partition key): one update."""
    out: list[tuple[tuple[int, int], HistoryVersion]] = []
    for order, r in rows:
        prev = out[-1] if out else None
        if (
            prev is not None
            and (prev[1].op, r.op) == ("delete", "insert")
            and prev[0][0] == order[0]
            and prev[1].table != r.table
        ):
            moved = replace(
                prev[1], op="update", table=r.table, moved_from=prev[1].table, new=r.new
            )
            out[-1] = (prev[0], moved)
            continue
        out.append((order, r))
    return out


def activity(
    db: Database,
    by: str = "app",
    since: str | None = None,
    bucket_seconds: int = 60,
    sources: Mapping[int, str | None] | None = None,
) -> list[ActivityBucket]:
    """Inserts, updates and deletes per bucket and per app, session or table, and source
    (``sources``: the name each row carries, by its source's id), in that order.

    Reads the per-minute aggregates capture keeps, never the changes.
    """
    group = {
        "app": "a.application_name",
        "session": "a.session_id",
        "table": "qualified_name(r.schema_name, r.table_name)",
    }.get(by)
    if group is None:
        raise BadInput(f"--by takes app, session or table, not {by!r}")
    since_minute = 0
    if since:
        since_minute = int(epoch(since))
    query = (
        f"SELECT a.minute / ? * ? AS bucket, {group} AS name, r.source,"  # noqa: S608
        " sum(a.inserts) AS inserts,"
        " sum(a.updates) AS updates, sum(a.deletes) AS deletes,"
        " sum(a.truncates) AS truncates"
        " FROM activity a JOIN relations r ON r.id = a.relation"
        " WHERE a.minute >= ? GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    )
    return [
        ActivityBucket(
            datetime.fromtimestamp(bucket, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            by,
            name or None,
            inserts,
            updates,
            deletes,
            truncates,
            (sources or {}).get(src),
        )
        for bucket, name, src, inserts, updates, deletes, truncates in db.execute(
            query, [bucket_seconds, bucket_seconds, since_minute]
        ).fetchall()
    ]
