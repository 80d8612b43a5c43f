"""What an undo will revert: the selected transactions and their changes, newest first.

Reads the store only. Changes are streamed (one transaction at a time, newest first), so a
session of millions of rows does not need memory in proportion.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlite_utils import Database

from .errors import BadInput, NotFound, Refused

OPS = {"delete": "D", "update": "U", "insert": "I"}


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
        return f"{self.schema}.{self.name}"


class StoredChange:
    """One change read back from the store. Images are parsed on first use: a run of deleted
    rows goes back through COPY straight from the stored text (inverse.copy_lines)."""

    __slots__ = (
        "_new",
        "_old",
        "new_text",
        "old_text",
        "op",
        "ord",
        "table",
        "txn",
        "unchanged",
        "xid",
    )

    def __init__(
        self,
        txn: int,
        xid: int,
        ord: int,
        table: TableVersion,
        op: str,
        old_text: str | None,
        new_text: str | None,
        unchanged: frozenset[int],
    ) -> None:
        self.txn = txn
        self.xid = xid
        self.ord = ord
        self.table = table
        self.op = op
        self.old_text = old_text
        self.new_text = new_text
        self.unchanged = unchanged
        self._old: list[str | None] | None = None
        self._new: list[str | None] | None = None

    @property
    def old(self) -> list[str | None] | None:
        if self._old is None and self.old_text is not None:
            self._old = _load(self.old_text)
        return self._old

    @property
    def new(self) -> list[str | None] | None:
        if self._new is None and self.new_text is not None:
            self._new = _load(self.new_text)
        return self._new


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

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
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
    target: Target
    transactions: list[dict[str, Any]]
    untrusted: int = 0

    @property
    def txn_ids(self) -> list[int]:
        return [t["id"] for t in self.transactions]


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
    """Find the transactions to undo; refuse an empty selection."""
    where: list[str] = ["1 = 1"]
    params: list[Any] = []
    if target.session is not None:
        where.append("session_id = ?")
        params.append(target.session)
    if target.xids:
        where.append(f"xid IN ({','.join('?' * len(target.xids))})")
        params += list(target.xids)
    if target.app is not None:
        where.append("application_name = ?")
        params.append(target.app)
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
    names = [d[0] for d in cur.description]
    rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    if not rows:
        if target.session is not None:
            raise NotFound(
                f"unknown session {target.session!r}: list sessions with `undo sessions`"
            )
        if target.xids:
            raise NotFound(
                f"unknown xid(s) {', '.join(map(str, target.xids))}: see `undo sessions`"
            )
        raise NotFound(f"no transaction of application {target.app!r} in that time range")
    if target.xids:
        missing = set(target.xids) - {r["xid"] for r in rows}
        if missing:
            raise NotFound(f"unknown xid(s) {', '.join(map(str, sorted(missing)))}")
    untrusted = [r for r in rows if r["tag"] == "untrusted"]
    if target.session is not None or target.app is not None:
        rows = [r for r in rows if r["tag"] == "trusted"]
    plan = Plan(target, rows, untrusted=len(untrusted))
    if not rows:
        raise Refused(
            "every matching transaction carries an untrusted tag (forged or unsigned): "
            "undo them by xid with `undo xact` if you are sure"
        )
    return plan


def check_not_undone(db: Database, plan: Plan) -> None:
    """Refuse to undo a transaction twice, unless the earlier undo was itself undone."""
    selected = set(plan.txn_ids)
    ledger = db.execute(
        "SELECT id, applied_at, selection, undo_xid FROM undos ORDER BY id"
    ).fetchall()
    undone_txns: dict[int, set[int]] = {}
    for entry_id, _, selection, _ in ledger:
        undone_txns[entry_id] = set(json.loads(selection))
    for entry_id, applied_at, selection, undo_xid in ledger:
        overlap = selected & set(json.loads(selection))
        if not overlap:
            continue
        undo_txn_ids = {
            r[0]
            for r in db.execute(
                "SELECT id FROM transactions WHERE xid = ? AND undo_of IS NOT NULL", [undo_xid]
            )
        }
        reverted = any(
            undo_txn_ids & txns for other, txns in undone_txns.items() if other > entry_id
        )
        if not reverted:
            xids = sorted(t["xid"] for t in plan.transactions if t["id"] in overlap)
            raise Refused(
                f"already undone at {applied_at} (undo xid {undo_xid}): transaction(s) "
                f"{', '.join(map(str, xids[:10]))}; undo that undo first (undo xact {undo_xid})"
            )


def _table(db: Database, cache: dict[int, TableVersion], rel_id: int) -> TableVersion:
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


# The C scanner behind json.loads, without its Python wrapper (whitespace regexes): the store's
# arrays have no surrounding whitespace, and this halves the cost of reading a change.
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _load(text: str) -> Any:
    return _scan(text, 0)[0]


def changes(db: Database, plan: Plan) -> Iterator[StoredChange]:
    """The selected changes, newest first across the whole selection, lazily."""
    cache: dict[int, TableVersion] = {}
    empty: frozenset[int] = frozenset()
    tables = {(t.rpartition(".")[0] or "public", t.rpartition(".")[2]) for t in plan.target.tables}
    for txn in plan.transactions:
        cur = db.execute(
            "SELECT ord, relation, op, old, new, unchanged FROM changes"
            " WHERE id BETWEEN ? AND ? ORDER BY id DESC",
            [txn["first_change"], txn["last_change"]],
        )
        for ord_, rel_id, op, old, new, unchanged in cur:
            tv = _table(db, cache, rel_id)
            if tables and (tv.schema, tv.name) not in tables:
                continue
            if op != "T" and op not in plan.target.only:
                continue
            yield StoredChange(
                txn["id"],
                txn["xid"],
                ord_,
                tv,
                op,
                old,
                new,
                frozenset(_load(unchanged)) if unchanged else empty,
            )


def later_writer(db: Database, ch: StoredChange, key: list[str | None] | None) -> str:
    """Who changed this row after the undone change, as far as the store knows."""
    if key is None or ch.table.oid is None:
        return "changed since by a session the store cannot name"
    row = db.execute(
        "SELECT t.session_id, t.xid, t.application_name FROM changes c"
        " JOIN transactions t ON t.id = c.txn"
        " WHERE c.relation IN (SELECT id FROM relations WHERE oid = ?) AND c.key = ?"
        " AND t.commit_lsn > (SELECT commit_lsn FROM transactions WHERE id = ?)"
        " ORDER BY t.commit_lsn DESC LIMIT 1",
        [ch.table.oid, json.dumps(key, ensure_ascii=False, separators=(",", ":")), ch.txn],
    ).fetchone()
    if row is None:
        return "changed since (not in the audit store yet: run `undo capture`)"
    return f"changed since by session {row[0]} ({row[2]}) in xid {row[1]}"
