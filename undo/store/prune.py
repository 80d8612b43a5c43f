"""`undo prune`: delete history older than a time, whole sessions at a time, in batches."""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlite_utils import Database

from ..stream.protocol import epoch

BATCH = 500


@dataclass(frozen=True)
class PruneReport:
    transactions: int
    changes: int
    sessions: int
    kept_sessions: int
    bytes_before: int
    bytes_after: int


def _size(db: Database) -> int:
    row = db.execute("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")
    return int(row.fetchone()[0])


def prune(db: Database, before: str) -> PruneReport:
    """Delete transactions committed before ``before``; never half a session.

    A session with any transaction at or after ``before`` is kept whole. Untagged transactions
    are pruned one by one. The ledger of applied undos is kept. Space is reclaimed by VACUUM.
    """
    size = _size(db)
    kept = db.execute(
        "SELECT count(DISTINCT session_id) FROM transactions WHERE commit_time < ?"
        " AND session_id IN (SELECT session_id FROM transactions WHERE commit_time >= ?)",
        [before, before],
    ).fetchone()[0]
    victims = [
        r[0]
        for r in db.execute(
            "SELECT id FROM transactions t WHERE commit_time < ? AND (session_id IS NULL"
            " OR NOT EXISTS (SELECT 1 FROM transactions l WHERE l.session_id = t.session_id"
            "  AND l.commit_time >= ?)) ORDER BY id",
            [before, before],
        )
    ]
    sessions = db.execute(
        "SELECT count(DISTINCT session_id) FROM transactions WHERE id IN"
        " (SELECT value FROM json_each(?))",
        [json.dumps(victims)],
    ).fetchone()[0]
    changes = 0
    for i in range(0, len(victims), BATCH):
        chunk = json.dumps(victims[i : i + BATCH])
        with db.atomic():
            for first, last in db.execute(
                "SELECT first_change, last_change FROM transactions"
                " WHERE id IN (SELECT value FROM json_each(?))",
                [chunk],
            ).fetchall():
                cur = db.execute("DELETE FROM changes WHERE id BETWEEN ? AND ?", [first, last])
                changes += cur.rowcount
            db.execute(
                "DELETE FROM txn_changes WHERE txn IN (SELECT value FROM json_each(?))", [chunk]
            )
            db.execute(
                "DELETE FROM statements WHERE txn IN (SELECT value FROM json_each(?))", [chunk]
            )
            db.execute(
                "DELETE FROM transactions WHERE id IN (SELECT value FROM json_each(?))", [chunk]
            )
    minute = int(epoch(before))
    with db.atomic():
        # history before this is incomplete now: undo table --to refuses times before it
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('pruned_before', ?) ON CONFLICT (key)"
            " DO UPDATE SET value = max(value, excluded.value)",
            [before],
        )
        db.execute(
            "DELETE FROM activity WHERE minute + 60 <= ? AND (session_id = '' OR session_id NOT IN"
            " (SELECT session_id FROM transactions WHERE session_id IS NOT NULL))",
            [minute],
        )
    db.execute("VACUUM")
    return PruneReport(len(victims), changes, sessions, kept, size, _size(db))
