"""`undo prune` and `undo capture --keep` on an SQLite store: delete history committed before a
time, a transaction at a time, in batches.

The rule, the same on both stores (a PostgreSQL store's is postgres/_prune.py): a prune cuts
history at one time, the cut (here ``before`` itself; on PostgreSQL the start of the partition
that holds it; never in the future, nor past a source's newest stored transaction:
:func:`cut_of`). Everything
recorded before the cut goes, per transaction: its changes, counts and statements, the DDL
records, malformed messages, closed gaps and the minutes of activity wholly before it. A session
the cut went through keeps only its later transactions (an undo of it refuses, engine/plan.py).
Kept: the ledger of applied undos, guard refusals (their nonces tell a replayed refusal), open
table gaps, table versions, and the totals of what went (pruned_counts), so that /metrics'
counters never go down.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlite_utils import Database

from undo.core.times import epoch, iso
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


def _victims(db: Database, cut: str, limit: int = -1) -> list[tuple[int, int, int]]:
    """(id, first change, last change) of the transactions committed before the cut, oldest
    first. A transaction without changes has the empty range (0, -1)."""
    return [
        (r[0], 0, -1) if r[1] is None else (r[0], r[1], r[2])
        for r in db.execute(
            "SELECT id, first_change, last_change FROM transactions WHERE commit_time < ?"
            " ORDER BY commit_time, id LIMIT ?",  # by transactions_time: old ones only
            [cut, limit],
        )
    ]


def cut_of(db: Database, before: str) -> str:
    """Where a prune before ``before`` cuts: there, but never in the future (an undo of a
    session that began before the cut refuses), nor past any source's newest stored
    transaction (for a source with none, when init made its slot): capture, however far
    behind, stores in commit order, so what it has still to store commits at or after that and
    a session of it that began after must not look pruned. A PostgreSQL store's cut falls on a
    partition boundary at or before those (postgres/_prune.py)."""
    stored = [
        r[0]
        for r in db.execute(
            "SELECT coalesce((SELECT max(t.commit_time) FROM transactions t"
            " WHERE t.source = s.id), (SELECT m.value FROM source_meta m"
            " WHERE m.source = s.id AND m.key = 'history_from')) FROM sources s"
        )
        if r[0] is not None
    ]
    return min([before, iso(datetime.now(UTC)), *map(str, stored)])


def _mark(db: Database, cut: str) -> None:
    """History before the cut is incomplete now: undo table --to refuses times before it."""
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('pruned_before', ?) ON CONFLICT (key)"
        " DO UPDATE SET value = max(value, excluded.value)",
        [cut],
    )


def _delete(db: Database, cut: str, victims: list[tuple[int, int, int]]) -> int:
    """Delete these transactions and their changes in one SQLite transaction, their untrusted
    row changes added to pruned_counts; the number of changes deleted."""
    changes = 0
    ids = json.dumps([v[0] for v in victims])
    with db.atomic():
        db.execute(
            "INSERT INTO pruned_counts (source, kind, label, n) SELECT source, 'untrusted',"
            " coalesce(tag_reason, ''), sum(inserts + updates + deletes + truncates)"
            " FROM transactions WHERE tag <> 'trusted' AND id IN (SELECT value FROM json_each(?))"
            " GROUP BY 1, 3 ON CONFLICT (source, kind, application_name, relation, label)"
            " DO UPDATE SET n = n + excluded.n",
            [ids],
        )
        for _, first, last in victims:
            cur = db.execute("DELETE FROM changes WHERE id BETWEEN ? AND ?", [first, last])
            changes += cur.rowcount
        db.execute("DELETE FROM txn_changes WHERE txn IN (SELECT value FROM json_each(?))", [ids])
        db.execute("DELETE FROM statements WHERE txn IN (SELECT value FROM json_each(?))", [ids])
        db.execute("DELETE FROM transactions WHERE id IN (SELECT value FROM json_each(?))", [ids])
        _mark(db, cut)
    return changes


def _forget_before(db: Database, cut: str) -> None:
    """The rest of what was recorded before the cut: the minutes of activity wholly before it
    (their counts added to pruned_counts), DDL records, malformed messages (counted too), and
    the gaps closed before it (an open table gap still refuses undos of that table)."""
    with db.atomic():
        last = int(epoch(cut)) - 60  # by the minute (activity_key's first column)
        db.execute(
            "INSERT INTO pruned_counts (source, kind, application_name, relation, inserts,"
            " updates, deletes, truncates, n) SELECT r.source, 'activity', a.application_name,"
            " a.relation, sum(a.inserts), sum(a.updates), sum(a.deletes), sum(a.truncates),"
            " sum(a.transactions) FROM activity a JOIN relations r ON r.id = a.relation"
            " WHERE a.minute <= ? GROUP BY r.source, a.application_name, a.relation"
            " ON CONFLICT (source, kind, application_name, relation, label) DO UPDATE SET"
            " inserts = inserts + excluded.inserts, updates = updates + excluded.updates,"
            " deletes = deletes + excluded.deletes, truncates = truncates + excluded.truncates,"
            " n = n + excluded.n",
            [last],
        )
        db.execute("DELETE FROM activity WHERE minute <= ?", [last])
        db.execute(
            "INSERT INTO pruned_counts (source, kind, label, n) SELECT source, 'malformed',"
            " prefix, count(*) FROM malformed WHERE received_at < ? GROUP BY source, prefix"
            " ON CONFLICT (source, kind, application_name, relation, label)"
            " DO UPDATE SET n = n + excluded.n",
            [cut],
        )
        db.execute("DELETE FROM malformed WHERE received_at < ?", [cut])
        db.execute("DELETE FROM ddl WHERE commit_time < ?", [cut])
        db.execute(
            "DELETE FROM gaps WHERE detected_at < ? AND NOT (kind = 'table' AND to_lsn IS NULL)",
            [cut],
        )
        _mark(db, cut)


def session_prefix(cut: datetime) -> str:
    """What the id of every session that began before ``cut`` (or in its second) sorts before:
    a session's id begins with its backend's start time in whole seconds, 8 hex digits until
    2106 (PostgreSQL's %c).

    >>> session_prefix(datetime(2026, 12, 5, tzinfo=UTC)) > "6b071524.9d7"
    True
    """
    return format(int(cut.timestamp()) + 1, "x")


def _through(db: Database, cut: str) -> int:
    """Sessions that began before the cut and go on after it: those an undo refuses
    (engine/plan.py), which keep their later transactions only."""
    return int(
        db.execute(
            "SELECT count(DISTINCT session_id) FROM transactions WHERE session_id < ?"
            " AND commit_time >= ?",
            [session_prefix(datetime.fromtimestamp(epoch(cut), UTC)), cut],
        ).fetchone()[0]
    )


def prune(db: Database, before: str) -> PruneReport:
    """Delete what was recorded before the cut (``before``, or earlier: :func:`cut_of`), a
    transaction at a time: a session that goes on after it keeps its later transactions only.
    The ledger of applied undos is kept. Space is reclaimed by VACUUM, which also turns on
    incremental vacuum in a store made before it (capture --keep)."""
    size = _size(db)
    before = cut_of(db, before)
    through = _through(db, before)
    victims = _victims(db, before)
    sessions = db.execute(
        "SELECT count(DISTINCT session_id) FROM transactions WHERE id IN"
        " (SELECT value FROM json_each(?))",
        [json.dumps([v[0] for v in victims])],
    ).fetchone()[0]
    changes = 0
    for i in range(0, len(victims), BATCH):
        changes += _delete(db, before, victims[i : i + BATCH])
    _forget_before(db, before)
    if not incremental_vacuum(db):
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect with the VACUUM
    db.execute("VACUUM")
    return PruneReport(len(victims), changes, sessions, through, size, _size(db), before)


def prune_step(
    db: Database, before: str, max_changes: int = STEP_CHANGES, vacuum_pages: int = VACUUM_PAGES
) -> StepReport:
    """One small step of pruning, for capture --keep: delete the oldest transactions committed
    before ``before`` of at most about ``max_changes`` changes in all, in one SQLite
    transaction; then hand up to ``vacuum_pages`` free pages back to the file system where the
    store has incremental vacuum. Never a full VACUUM, which would hold the store for as long
    as it takes to copy it."""
    before = cut_of(db, before)
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
    if not more:
        _forget_before(db, before)
    return StepReport(len(victims), changes, more, freed)
