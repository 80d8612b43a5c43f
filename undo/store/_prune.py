"""`undo prune` and `undo capture --keep`: delete history older than a time, whole sessions at
a time, in batches."""

from __future__ import annotations

import json

from sqlite_utils import Database

from undo.core.times import epoch
from undo.store._schema import incremental_vacuum
from undo.store.api import PruneReport, StepReport

BATCH = 500
#: capture --keep: a step deletes whole transactions of at most about this many changes in all
#: (one bigger transaction alone), and hands back at most VACUUM_PAGES free pages
STEP_CHANGES = 20_000
VACUUM_PAGES = 2_560  # 20 MB of 8 KB pages


def _size(db: Database) -> int:
    row = db.execute("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")
    return int(row.fetchone()[0])


def _victims(db: Database, before: str, limit: int = -1) -> list[tuple[int, int, int]]:
    """(id, first change, last change) of the transactions to prune, oldest first: committed
    before ``before``, untagged or of a session with none at or after it (never half a
    session). A transaction without changes has the empty range (0, -1)."""
    return [
        (r[0], 0, -1) if r[1] is None else (r[0], r[1], r[2])
        for r in db.execute(
            "SELECT id, first_change, last_change FROM transactions t WHERE commit_time < ?"
            " AND (session_id IS NULL OR NOT EXISTS (SELECT 1 FROM transactions l"
            "  WHERE l.session_id = t.session_id AND l.commit_time >= ?))"
            " ORDER BY commit_time, id LIMIT ?",  # by transactions_time: old ones only
            [before, before, limit],
        )
    ]


def _delete(db: Database, before: str, victims: list[tuple[int, int, int]]) -> int:
    """Delete these transactions and their changes in one SQLite transaction, and say that
    history before ``before`` is incomplete now; the number of changes deleted."""
    changes = 0
    ids = json.dumps([v[0] for v in victims])
    with db.atomic():
        for _, first, last in victims:
            cur = db.execute("DELETE FROM changes WHERE id BETWEEN ? AND ?", [first, last])
            changes += cur.rowcount
        db.execute("DELETE FROM txn_changes WHERE txn IN (SELECT value FROM json_each(?))", [ids])
        db.execute("DELETE FROM statements WHERE txn IN (SELECT value FROM json_each(?))", [ids])
        db.execute("DELETE FROM transactions WHERE id IN (SELECT value FROM json_each(?))", [ids])
        # undo table --to refuses times before it
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('pruned_before', ?) ON CONFLICT (key)"
            " DO UPDATE SET value = max(value, excluded.value)",
            [before],
        )
    return changes


def _forget_activity(db: Database, before: str) -> None:
    """Activity of the minutes before ``before`` whose sessions are gone from the store."""
    with db.atomic():
        # by the minute (activity_key's first column) and the session index: a step of capture
        # --keep reads the old minutes only, not every session of the store
        db.execute(
            "DELETE FROM activity WHERE minute <= ? - 60 AND (session_id = '' OR NOT EXISTS"
            " (SELECT 1 FROM transactions t WHERE t.session_id = activity.session_id))",
            [int(epoch(before))],
        )


def prune(db: Database, before: str) -> PruneReport:
    """Delete transactions committed before ``before``; never half a session.

    A session with any transaction at or after ``before`` is kept whole. Untagged transactions
    are pruned one by one. The ledger of applied undos is kept. Space is reclaimed by VACUUM,
    which also turns on incremental vacuum in a store made before it (capture --keep).
    """
    size = _size(db)
    kept = db.execute(
        "SELECT count(DISTINCT session_id) FROM transactions WHERE commit_time < ?"
        " AND session_id IN (SELECT session_id FROM transactions WHERE commit_time >= ?)",
        [before, before],
    ).fetchone()[0]
    victims = _victims(db, before)
    sessions = db.execute(
        "SELECT count(DISTINCT session_id) FROM transactions WHERE id IN"
        " (SELECT value FROM json_each(?))",
        [json.dumps([v[0] for v in victims])],
    ).fetchone()[0]
    changes = 0
    for i in range(0, len(victims), BATCH):
        changes += _delete(db, before, victims[i : i + BATCH])
    if not victims:  # nothing deleted: history before it is as complete as it was, but say so
        with db.atomic():
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('pruned_before', ?) ON CONFLICT (key)"
                " DO UPDATE SET value = max(value, excluded.value)",
                [before],
            )
    _forget_activity(db, before)
    if not incremental_vacuum(db):
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect with the VACUUM
    db.execute("VACUUM")
    return PruneReport(len(victims), changes, sessions, kept, size, _size(db))


def prune_step(
    db: Database, before: str, max_changes: int = STEP_CHANGES, vacuum_pages: int = VACUUM_PAGES
) -> StepReport:
    """One small step of pruning, for capture --keep: delete the oldest whole transactions
    committed before ``before`` (as :func:`prune` chooses them) of at most about
    ``max_changes`` changes in all, in one SQLite transaction; then hand up to ``vacuum_pages``
    free pages back to the file system where the store has incremental vacuum. Never a full
    VACUUM, which would hold the store for as long as it takes to copy it."""
    victims: list[tuple[int, int, int]] = []
    total = 0
    candidates = _victims(db, before, 1000)
    for v in candidates:
        size = v[2] - v[1] + 1
        if victims and total + size > max_changes:
            break
        victims.append(v)
        total += size
    changes = _delete(db, before, victims) if victims else 0
    freed = 0
    if incremental_vacuum(db):
        free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
        if free:
            # stepped to its end by executescript: Python's execute steps a statement with no
            # result columns once, and this pragma frees one page per step
            db.conn.executescript(f"PRAGMA incremental_vacuum({min(free, vacuum_pages):d});")
            freed = free - int(db.execute("PRAGMA freelist_count").fetchone()[0])
    more = len(victims) < len(candidates) or len(candidates) == 1000
    if not more and victims:
        _forget_activity(db, before)
    return StepReport(len(victims), changes, more, freed)
