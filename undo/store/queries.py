"""The read side of the store: sessions, show, status. Plain SQL with parameters."""

from __future__ import annotations

import json
from typing import Any

from sqlite_utils import Database

from ..errors import NotFound


def _rows(db: Database, query: str, params: Any = ()) -> list[dict[str, Any]]:
    cur = db.execute(query, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def sessions(
    db: Database,
    since: str | None = None,
    until: str | None = None,
    app: str | None = None,
    user: str | None = None,
    tables: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per session that wrote, newest first; filters apply to its transactions."""
    where = ["1 = 1"]
    params: list[Any] = []
    if since:
        where.append("t.commit_time >= ?")
        params.append(since)
    if until:
        where.append("t.commit_time < ?")
        params.append(until)
    if app is not None:
        where.append("t.application_name = ?")
        params.append(app)
    if user is not None:
        where.append("t.user_name = ?")
        params.append(user)
    for name in tables or []:
        schema, _, table = name.rpartition(".")
        where.append(
            "EXISTS (SELECT 1 FROM changes c JOIN relations r ON r.id = c.relation"
            " WHERE c.txn = t.id AND r.schema_name = ? AND r.table_name = ?)"
        )
        params += [schema or "public", table]
    query = (
        "SELECT t.session_id, max(t.application_name) AS application_name,"  # noqa: S608
        " max(t.user_name) AS user, max(t.client_addr) AS client_addr,"
        " min(t.commit_time) AS first_change_at, max(t.commit_time) AS last_change_at,"
        " count(*) AS transactions, sum(t.inserts) AS inserts, sum(t.updates) AS updates,"
        " sum(t.deletes) AS deletes, min(t.tag) AS tag,"
        " (SELECT json_group_array(DISTINCT r.schema_name || '.' || r.table_name)"
        "    FROM changes c JOIN relations r ON r.id = c.relation"
        "    JOIN transactions t2 ON t2.id = c.txn"
        "   WHERE t2.session_id IS t.session_id) AS tables"
        " FROM transactions t WHERE "
        + " AND ".join(where)
        + " GROUP BY t.session_id ORDER BY last_change_at DESC"
    )
    rows = _rows(db, query, params)
    for r in rows:
        r["tables"] = sorted(json.loads(r["tables"] or "[]"))
    return rows


def transactions_of_session(db: Database, session_id: str) -> list[dict[str, Any]]:
    rows = _rows(
        db,
        "SELECT * FROM transactions WHERE session_id = ? ORDER BY commit_lsn",
        [session_id],
    )
    if not rows:
        raise NotFound(f"unknown session {session_id!r}: list sessions with `undo sessions`")
    return rows


def transactions_by_xid(db: Database, xids: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for xid in xids:
        found = _rows(db, "SELECT * FROM transactions WHERE xid = ? ORDER BY commit_lsn", [xid])
        if not found:
            raise NotFound(f"unknown xid {xid}: no captured transaction has it")
        rows += found
    return sorted(rows, key=lambda r: r["commit_lsn"])


def changes_of(db: Database, txn_ids: list[int]) -> list[dict[str, Any]]:
    """The row changes of these transactions, with their table, old and new values by name."""
    out: list[dict[str, Any]] = []
    for txn in txn_ids:
        for r in _rows(
            db,
            "SELECT c.txn, c.ord, c.op, c.key, c.old, c.new, c.unchanged, r.oid,"
            " r.schema_name, r.table_name, r.columns, r.types"
            " FROM changes c JOIN relations r ON r.id = c.relation"
            " WHERE c.txn = ? ORDER BY c.ord",
            [txn],
        ):
            cols = json.loads(r["columns"])
            old = json.loads(r["old"]) if r["old"] else None
            new = json.loads(r["new"]) if r["new"] else None
            unchanged = set(json.loads(r["unchanged"])) if r["unchanged"] else set()
            out.append(
                {
                    "txn": r["txn"],
                    "ord": r["ord"],
                    "table": f"{r['schema_name']}.{r['table_name']}",
                    "op": {"I": "insert", "U": "update", "D": "delete", "T": "truncate"}[r["op"]],
                    "key": json.loads(r["key"]) if r["key"] else None,
                    "old": None if old is None else dict(zip(cols, old, strict=False)),
                    "new": None
                    if new is None
                    else {
                        c: ("(unchanged)" if i in unchanged else v)
                        for i, (c, v) in enumerate(zip(cols, new, strict=False))
                    },
                }
            )
    return out


def show(db: Database, session_id: str | None = None, xid: int | None = None) -> dict[str, Any]:
    txns = (
        transactions_of_session(db, session_id)
        if session_id is not None
        else transactions_by_xid(db, [xid or 0])
    )
    changes = changes_of(db, [t["id"] for t in txns])
    by_txn: dict[int, list[dict[str, Any]]] = {}
    for c in changes:
        by_txn.setdefault(c.pop("txn"), []).append(c)
    return {
        "session_id": session_id if session_id is not None else txns[0]["session_id"],
        "transactions": [
            {
                "xid": t["xid"],
                "commit_time": t["commit_time"],
                "application_name": t["application_name"],
                "user": t["user_name"],
                "statement": t["statement"],
                "tag": t["tag"],
                "changes": by_txn.get(t["id"], []),
            }
            for t in txns
        ],
    }


def status(db: Database) -> dict[str, Any]:
    last = db.execute(
        "SELECT commit_time, end_lsn FROM transactions ORDER BY id DESC LIMIT 1"
    ).fetchone()
    gaps = _rows(db, "SELECT detected_at, from_lsn, to_lsn, reason FROM gaps ORDER BY id")
    counts = db.execute(
        "SELECT count(*), coalesce(sum(inserts + updates + deletes + truncates), 0)"
        " FROM transactions"
    ).fetchone()
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    return {
        "decoder": meta.get("decoder"),
        "slot": meta.get("slot"),
        "store_position": int(meta.get("position") or 0),
        "last_commit_time": last[0] if last else None,
        "transactions": counts[0],
        "changes": counts[1],
        "gaps": gaps,
    }
