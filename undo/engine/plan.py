"""What an undo will revert: the selected transactions, their tables and changes.

Reads the store only. The changes themselves are streamed one table at a time, oldest first
(``changes``), so a session of millions of rows does not need memory in proportion; collapsing
each row's chain happens in PostgreSQL (inverse.py).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlite_utils import Database

from undo.core import names
from undo.core.errors import BadInput, NotFound, NothingToUndo, Refused
from undo.core.images import OP_NAMES, OPS
from undo.store.queries import resolve_table


@dataclass(frozen=True)
class TableVersion:
    """A table as capture recorded it: the store's relations row."""

    id: int
    oid: int | None
    schema: str
    name: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    key: tuple[int, ...] | None
    partial: bool

    @property
    def qualified(self) -> str:
        return names.quote(self.schema, self.name)


@dataclass(frozen=True)
class Target:
    """What the user asked to undo."""

    session: str | None = None
    xids: tuple[int, ...] = ()
    app: str | None = None
    since: str | None = None
    until: str | None = None
    only: frozenset[str] = frozenset(OPS.values())
    tables: tuple[str, ...] = ()
    #: a rewind (undo table --to): every change committed after this time, whoever made it
    after: str | None = None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.after is not None:
            d["to"] = self.after
        if self.session is not None:
            d["session"] = self.session
        if self.xids:
            d["xids"] = list(self.xids)
        if self.app is not None:
            d["app"] = self.app
        for k in ("since", "until"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.only != frozenset(OPS.values()):
            d["only"] = sorted(self.only)
        if self.tables:
            d["tables"] = list(self.tables)
        return d


@dataclass
class Plan:
    """The selection: transactions (newest first), the table versions they touched that pass the
    filters, and how many changes of each (table version, operation) each transaction holds."""

    target: Target
    transactions: list[dict[str, Any]]
    untrusted: int = 0
    untagged: int = 0
    tables: dict[int, TableVersion] = field(default_factory=dict)
    #: (transaction id, relation id, op) -> number of changes selected
    counts: Counter[tuple[int, int, str]] = field(default_factory=Counter)
    not_undoable: list[str] = field(default_factory=list)

    def by_xmin(self, next_xid: int) -> dict[int, int]:
        """The transactions (id -> 32-bit xid) whose row versions undo may know by their xmin:
        a row still carrying the xid of the transaction that last wrote it in the selection is
        as that transaction left it, so it needs no comparison of values. Only where every
        change the transaction made to a selected table is selected (no --only: the last
        change selected is its last), and its 64-bit xid is known and fewer than 2^31
        transactions old (``next_xid``, the server's next one; a 32-bit xid comes back after
        2^32)."""
        if self.target.only != frozenset(OPS.values()):
            return {}
        return {
            t["id"]: t["xid"]
            for t in self.transactions
            if t.get("full_xid") is not None and 0 < next_xid - t["full_xid"] < 2**31
        }

    def ops(self) -> dict[int, set[str]]:
        """The operations selected per relation id."""
        out: dict[int, set[str]] = {rel: set() for rel in self.tables}
        for _, rel, op in self.counts:
            out[rel].add(op)
        return out

    def rows(self) -> Counter[tuple[str, str]]:
        """Changes to undo per (table, op)."""
        out: Counter[tuple[str, str]] = Counter()
        for (_, rel, op), n in self.counts.items():
            out[self.tables[rel].qualified, op] += n
        return out


def parse_only(text: str | None) -> frozenset[str]:
    if not text:
        return frozenset(OPS.values())
    out = set()
    for part in text.split(","):
        part = part.strip().lower()
        if part not in OPS:
            raise BadInput(f"--only takes delete, update, insert (comma-separated), not {part!r}")
        out.add(OPS[part])
    return frozenset(out)


def select(db: Database, target: Target) -> Plan:
    """Find the transactions, tables and changes to undo; refuse an empty selection.

    Table filters are resolved against the store first (unknown or ambiguous: bad input). What
    cannot be undone (TRUNCATE, changes without a full old row, DDL capture could not see) is
    found on the selection before its filters (--table, --only, and --since/--until of a
    session or of transactions), so no filter can hide it. A rewind's tables and time are its
    selection, not filters.
    """
    wanted = _resolve_tables(db, target.tables)
    rows = _transactions(db, target, wanted, filtered=True)
    rewind = target.after is not None
    narrowed = not rewind and (
        wanted is not None
        or target.only != frozenset(OPS.values())
        or (target.app is None and bool(target.since or target.until))
    )
    whole = _transactions(db, target, None, filtered=False) if narrowed else rows
    blind = _blind_spots(db, target, wanted if rewind else None)
    refusals = _refusals(db, _picked(target, whole), wanted if rewind else None) + blind
    if not rows and refusals:
        raise Refused("cannot undo: " + "; ".join(refusals))
    if not rows:
        if target.session is not None:
            raise NotFound(
                f"unknown session {target.session!r}: list sessions with `undo sessions`"
            )
        if target.xids:
            raise NotFound(
                f"unknown xid(s) {', '.join(map(str, target.xids))}: see `undo sessions`"
            )
        if target.after is not None:
            raise NothingToUndo(
                f"no change to {', '.join(target.tables)} was captured after {target.after}"
            )
        raise NotFound(f"no transaction of application {target.app!r} in that time range")
    if target.xids:
        missing = set(target.xids) - {r["xid"] for r in rows}
        if missing:
            raise NotFound(f"unknown xid(s) {', '.join(map(str, sorted(missing)))}")
    untrusted = [r for r in rows if r["tag"] == "untrusted"]
    rows = _picked(target, rows)
    if not rows:
        raise Refused(
            "every matching transaction carries an untrusted tag (forged or unsigned): "
            "undo them by xid with `undo xact` if you are sure"
        )
    plan = Plan(
        target,
        rows,
        untrusted=len(untrusted),
        untagged=sum(1 for r in rows if r["tag"] == "none"),
    )
    _inventory(db, plan, wanted)
    plan.not_undoable += refusals
    if not plan.counts and not plan.not_undoable:
        raise NotFound("the selection holds no change to undo (check --table and --only)")
    return plan


def _picked(target: Target, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`undo session` and `undo app` take trusted transactions only."""
    if target.session is not None or target.app is not None:
        return [r for r in rows if r["tag"] == "trusted"]
    return rows


def _transactions(
    db: Database, target: Target, wanted: set[tuple[str, str]] | None, filtered: bool
) -> list[dict[str, Any]]:
    """The target's transactions, newest first; ``filtered``: narrowed by the tables and
    times asked (an app's times are its selection, always applied)."""
    where: list[str] = ["1 = 1"]
    params: list[Any] = []
    if wanted is not None:  # only transactions that changed one of the tables
        where.append(  # placeholders only
            "id IN (SELECT x.txn FROM txn_changes x JOIN relations r ON r.id = x.relation"  # noqa: S608
            " WHERE "
            + " OR ".join(["(r.schema_name = ? AND r.table_name = ?)"] * len(wanted))
            + ")"
        )
        params += [part for pair in sorted(wanted) for part in pair]
    if target.after:
        where.append("commit_time > ?")
        params.append(target.after)
    if target.session is not None:
        where.append("session_id = ?")
        params.append(target.session)
    if target.xids:
        where.append(f"xid IN ({','.join('?' * len(target.xids))})")
        params += list(target.xids)
    if target.app is not None:
        where.append("application_name = ?")
        params.append(target.app)
    if filtered or target.app is not None:
        if target.since:
            where.append("commit_time >= ?")
            params.append(target.since)
        if target.until:
            where.append("commit_time < ?")
            params.append(target.until)
    cur = db.execute(
        "SELECT * FROM transactions WHERE " + " AND ".join(where) + " ORDER BY commit_lsn DESC",  # noqa: S608
        params,
    )
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def _refusals(
    db: Database, transactions: list[dict[str, Any]], wanted: set[tuple[str, str]] | None
) -> list[str]:
    """What cannot be undone from the change stream in these transactions (of the ``wanted``
    tables only, for a rewind): a TRUNCATE, updates and deletes without a full old row."""
    cache: dict[int, TableVersion] = {}
    out = []
    for txn in transactions:
        for rel_id, op, no_old in db.execute(
            "SELECT relation, op, without_old FROM txn_changes WHERE txn = ?"
            " AND (op = 'T' OR (op IN ('U', 'D') AND without_old > 0)) ORDER BY relation, op",
            [txn["id"]],
        ):
            tv = table_version(db, cache, rel_id)
            if wanted is not None and (tv.schema, tv.name) not in wanted:
                continue
            if op == "T":  # a truncate empties the table whatever --only says
                out.append(
                    f"{tv.qualified} in xid {txn['xid']}: TRUNCATE cannot be undone from the"
                    " change stream"
                )
            else:
                out.append(
                    f"{tv.qualified} in xid {txn['xid']}: {no_old} {OP_NAMES[op]}(s) without a"
                    " full old row (the table lacked REPLICA IDENTITY FULL)"
                )
    return out


def _blind_spots(db: Database, target: Target, wanted: set[tuple[str, str]] | None) -> list[str]:
    """What the selected session (or transactions) did by DDL that capture could not see
    (gaps of kind 'table': a rewrite, an unlogged table, the tag trigger off, ...)."""
    params: list[Any]
    if target.session is not None:
        cond, params = "session_id = ?", [target.session]
    elif target.xids:
        cond, params = f"xid IN ({','.join('?' * len(target.xids))})", list(target.xids)
    else:
        return []
    return [
        f"{table} in xid {xid}: {reason} (DDL of this {'session' if target.session else 'xid'}"
        ": what capture did not see cannot be undone)"
        for table, xid, reason in db.execute(
            "SELECT table_name, xid, reason FROM gaps WHERE kind = 'table' AND "  # noqa: S608
            + cond
            + " ORDER BY id",
            params,
        )
        if wanted is None or names.parse(table) in wanted  # as (schema, table): quoting varies
    ]


def _resolve_tables(db: Database, tables: tuple[str, ...]) -> set[tuple[str, str]] | None:
    return {resolve_table(db, t) for t in tables} if tables else None


def _inventory(db: Database, plan: Plan, wanted: set[tuple[str, str]] | None) -> None:
    """Count the selected changes per transaction, table version and operation (what cannot
    be undone among them is left out: ``_refusals`` names it)."""
    cache: dict[int, TableVersion] = {}
    for txn in plan.transactions:
        for rel_id, op, n, no_old in db.execute(
            "SELECT relation, op, n, without_old FROM txn_changes WHERE txn = ?", [txn["id"]]
        ):
            tv = table_version(db, cache, rel_id)
            if wanted is not None and (tv.schema, tv.name) not in wanted:
                continue
            if op == "T" or op not in plan.target.only or (op in "UD" and no_old):
                continue
            plan.tables[rel_id] = tv
            plan.counts[txn["id"], rel_id, op] += n


def table_version(db: Database, cache: dict[int, TableVersion], rel_id: int) -> TableVersion:
    tv = cache.get(rel_id)
    if tv is None:
        r = db.execute(
            "SELECT id, oid, schema_name, table_name, columns, types, key_columns, partial"
            " FROM relations WHERE id = ?",
            [rel_id],
        ).fetchone()
        tv = TableVersion(
            r[0],
            r[1],
            r[2],
            r[3],
            tuple(json.loads(r[4])),
            tuple(json.loads(r[5])),
            None if r[6] is None else tuple(json.loads(r[6])),
            bool(r[7]),
        )
        cache[rel_id] = tv
    return tv


class StoredChange(NamedTuple):
    """One change as the store holds it: images are JSON arrays of text forms (a tuple: a
    session's worth of them is made in a tight loop)."""

    id: int
    op: str
    old: str | None
    new: str | None
    unchanged: str | None
    xid: int | None = None  # the transaction's xid, where a row version it wrote is known by it


def changes(
    db: Database, plan: Plan, rel_id: int, by_xmin: dict[int, int] | None = None
) -> Iterator[StoredChange]:
    """The selected changes of one table version, oldest first across the whole selection;
    those of the transactions in ``by_xmin`` (see ``Plan.by_xmin``) carry their xid."""
    wanted = plan.target.only
    by_xmin = by_xmin or {}
    make = StoredChange._make
    for txn in reversed(plan.transactions):
        if not any(plan.counts.get((txn["id"], rel_id, op)) for op in wanted):
            continue
        xid = by_xmin.get(txn["id"])
        # +relation: scan the transaction's id range; the index on relation would read the
        # table's changes of all time and sort them
        for row in db.execute(
            "SELECT id, op, old, new, unchanged, ? FROM changes"
            " WHERE id BETWEEN ? AND ? AND +relation = ? ORDER BY id",
            [xid, txn["first_change"], txn["last_change"], rel_id],
        ):
            if row[1] in wanted:
                yield make(row)


def later_writer(
    db: Database, tv: TableVersion, change_id: int, key: str | None, image: str | None = None
) -> str:
    """Who changed this row after the undone change, as far as the store knows (a keyless
    row: who wrote an identical one, ``image``)."""
    if tv.oid is None or (key is None and image is None):
        return "changed since by a session the store cannot name"
    # a keyless row: a later change that wrote or removed an identical one
    found = "c.key = ?" if key is not None else "c.key IS NULL AND (c.new = ? OR c.old = ?)"
    row = db.execute(
        "SELECT t.session_id, t.xid, t.application_name FROM changes c"  # noqa: S608
        " JOIN transactions t ON t.id = c.txn"
        " WHERE c.relation IN (SELECT id FROM relations WHERE oid = ?) AND "
        + found
        + " AND c.id > ? ORDER BY c.id DESC LIMIT 1",
        [tv.oid, *([key] if key is not None else [image, image]), change_id],
    ).fetchone()
    if row is None and key is None:
        return "changed since by a session the store cannot name"
    if row is None:
        return "changed since (not in the audit store yet: run `undo capture`)"
    return f"changed since by session {row[0]} ({row[2]}) in xid {row[1]}"
