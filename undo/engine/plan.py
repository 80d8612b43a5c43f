"""What an undo will revert: the selected transactions, their tables and changes.

Reads the store only. The changes themselves are streamed one table at a time, oldest first
(``changes``), so a session of millions of rows does not need memory in proportion; collapsing
each row's chain happens in PostgreSQL (inverse.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from undo.core import names
from undo.core.errors import BadInput, NotFound, NothingToUndo, Refused
from undo.core.images import OP_NAMES, OPS
from undo.core.times import epoch, session_start
from undo.store import across
from undo.store.api import Store, StoredChange, TableVersion, Transaction


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
    transactions: list[Transaction]
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
            t.id: t.xid
            for t in self.transactions
            if t.full_xid is not None and 0 < next_xid - t.full_xid < 2**31
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


def select(db: Store, target: Target) -> Plan:
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
    # none kept: refused all the same when the prune may have taken them all (a session whose
    # id says it began before the cut; an application's range that starts before it)
    refusals += _pruned(db, target, wholly=not whole)
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
        missing = set(target.xids) - {r.xid for r in rows}
        if missing:
            raise NotFound(f"unknown xid(s) {', '.join(map(str, sorted(missing)))}")
    untrusted = [r for r in rows if r.tag == "untrusted"]
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
        untagged=sum(1 for r in rows if r.tag == "none"),
    )
    _inventory(db, plan, wanted)
    plan.not_undoable += refusals
    if not plan.counts and not plan.not_undoable:
        raise NotFound("the selection holds no change to undo (check --table and --only)")
    return plan


def _picked(target: Target, rows: list[Transaction]) -> list[Transaction]:
    """`undo session` and `undo app` take trusted transactions only."""
    if target.session is not None or target.app is not None:
        return [r for r in rows if r.tag == "trusted"]
    return rows


def _transactions(
    db: Store, target: Target, wanted: set[tuple[str, str]] | None, filtered: bool
) -> list[Transaction]:
    """The target's transactions, newest first; ``filtered``: narrowed by the tables and
    times asked (an app's times are its selection, always applied)."""
    timed = filtered or target.app is not None
    return db.transactions(
        tables=wanted,
        after=target.after,
        session_id=target.session,
        xids=target.xids,
        app=target.app,
        since=target.since if timed else None,
        until=target.until if timed else None,
    )


def _refusals(
    db: Store, transactions: list[Transaction], wanted: set[tuple[str, str]] | None
) -> list[str]:
    """What cannot be undone from the change stream in these transactions (of the ``wanted``
    tables only, for a rewind): a TRUNCATE, updates and deletes without a full old row."""
    cache: dict[int, TableVersion] = {}
    out = []
    for txn in transactions:
        for x in db.txn_changes(txn.id, refusable=True):
            rel_id, op, no_old = x.relation, x.op, x.without_old
            tv = table_version(db, cache, rel_id)
            if wanted is not None and (tv.schema, tv.name) not in wanted:
                continue
            if op == "T":  # a truncate empties the table whatever --only says
                out.append(
                    f"{tv.qualified} in xid {txn.xid}: TRUNCATE cannot be undone from the"
                    " change stream"
                )
            else:
                out.append(
                    f"{tv.qualified} in xid {txn.xid}: {no_old} {OP_NAMES[op]}(s) without a"
                    " full old row (the table lacked REPLICA IDENTITY FULL)"
                )
    return out


def _blind_spots(db: Store, target: Target, wanted: set[tuple[str, str]] | None) -> list[str]:
    """What the selected session (or transactions) did by DDL that capture could not see
    (gaps of kind 'table': a rewrite, an unlogged table, the tag trigger off, ...)."""
    if target.session is None and not target.xids:
        return []
    return [
        f"{g.table} in xid {g.xid}: {g.reason} (DDL of this"
        f" {'session' if target.session else 'xid'}: what capture did not see cannot be undone)"
        for g in db.table_gaps(target.session, target.xids)
        if wanted is None
        or (g.table is not None and names.parse(g.table) in wanted)  # as (schema, table)
    ]


def _pruned(db: Store, target: Target, wholly: bool = False) -> list[str]:
    """A session that began before the cut of `undo prune`, or an application's time range
    that starts before it: what it committed before the cut is gone from the store, so undoing
    what is left would not undo what it did (--on-conflict skip undoes exactly what is left).
    ``wholly``: the store holds none of its transactions (all pruned, or never any): a session
    id that is no session's start stays unknown."""
    cut = db.meta("pruned_before")
    if cut is None:
        return []
    if target.session is not None:
        if wholly:  # nothing kept: it may have written before the cut, or never
            why = across.pruned_session(db, target.session)
            return [] if why is None else [why]
        began = session_start(target.session)
        if began is None or began <= int(epoch(cut)):  # to the second: may be before it
            return [
                f"session {target.session} began before {cut}, where the audit store's history"
                " was pruned (undo prune): what it committed before then is gone, only its later"
                " transactions are kept"
            ]
    if target.app is not None and (target.since is None or target.since < cut):
        return [
            f"application {target.app!r} since {target.since}: the audit store's history before"
            f" {cut} was pruned (undo prune): only what was committed after it is kept"
        ]
    return []


def _resolve_tables(db: Store, tables: tuple[str, ...]) -> set[tuple[str, str]] | None:
    return {db.resolve_table(t) for t in tables} if tables else None


def _inventory(db: Store, plan: Plan, wanted: set[tuple[str, str]] | None) -> None:
    """Count the selected changes per transaction, table version and operation (what cannot
    be undone among them is left out: ``_refusals`` names it)."""
    cache: dict[int, TableVersion] = {}
    for txn in plan.transactions:
        for x in db.txn_changes(txn.id):
            rel_id, op, n, no_old = x.relation, x.op, x.n, x.without_old
            tv = table_version(db, cache, rel_id)
            if wanted is not None and (tv.schema, tv.name) not in wanted:
                continue
            if op == "T" or op not in plan.target.only or (op in "UD" and no_old):
                continue
            plan.tables[rel_id] = tv
            plan.counts[txn.id, rel_id, op] += n


def table_version(db: Store, cache: dict[int, TableVersion], rel_id: int) -> TableVersion:
    tv = cache.get(rel_id)
    if tv is None:
        tv = cache[rel_id] = db.table_version(rel_id)
    return tv


def changes(
    db: Store, plan: Plan, rel_id: int, by_xmin: dict[int, int] | None = None
) -> Iterator[StoredChange]:
    """The selected changes of one table version, oldest first across the whole selection;
    those of the transactions in ``by_xmin`` (see ``Plan.by_xmin``) carry their xid."""
    wanted = plan.target.only
    by_xmin = by_xmin or {}
    for txn in reversed(plan.transactions):
        if not any(plan.counts.get((txn.id, rel_id, op)) for op in wanted):
            continue
        assert txn.first_change is not None and txn.last_change is not None
        for change in db.changes(txn.first_change, txn.last_change, rel_id, by_xmin.get(txn.id)):
            if change.op in wanted:
                yield change


def later_writer(
    db: Store, tv: TableVersion, change_id: int, key: str | None, image: str | None = None
) -> str:
    """Who changed this row after the undone change, as far as the store knows (a keyless
    row: who wrote an identical one, ``image``)."""
    if tv.oid is None or (key is None and image is None):
        return "changed since by a session the store cannot name"
    who = db.later_writer(tv.oid, change_id, key, image)
    if who is None and key is None:
        return "changed since by a session the store cannot name"
    if who is None:
        return "changed since (not in the audit store yet: run `undo capture`)"
    return f"changed since by session {who.session_id} ({who.application_name}) in xid {who.xid}"
