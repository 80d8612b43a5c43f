"""`undo prune` and `undo capture --keep` on a PostgreSQL store: drop the partitions of changes
wholly before the cut; never rewrite a row of changes.

The rule is the SQLite store's (undo/store/_prune.py): everything recorded before the cut goes,
per transaction; a session the cut went through keeps only its later transactions; the undo
ledger, guard refusals, open table gaps and table versions are kept, and what went is added to
pruned_counts so that /metrics' counters never go down. What differs is where the cut falls:
the start of the partition that holds the time asked (the time itself when none does), and
never past the start of the partition that holds a source's newest stored transaction, into
which capture, however far behind, may still write. A prune covers every source of the store
(the cut is a time).

Order, so that an interrupted prune leaves nothing a listing shows half: the transactions before
the cut and their small rows go first (one store transaction; a step of --keep: some), then the
rest recorded before it, then each partition: ``DETACH PARTITION ... CONCURRENTLY`` (which waits for
the readers and writers that may see it, but blocks none of them), then ``DROP TABLE``. A
detach left pending (interrupted, or --keep's lock timeout) is finished by the next prune.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import errors, sql

from undo.core.times import iso
from undo.store._prune import session_prefix
from undo.store.api import PruneReport, StepReport
from undo.store.postgres._schema import SCHEMA, iter_sources, partitions

#: transactions deleted per step of --keep (`undo prune` deletes them in one statement)
STEP = 5_000
#: a step of capture --keep waits this long at most for the readers of a partition it detaches
STEP_LOCK_TIMEOUT = "2s"
#: times `undo prune` counts and deletes the activity before the cut when a row it counted is
#: written meanwhile (then: the store was busy, exit 2)
_ATTEMPTS = 3
#: one prune at a time in a store (a session lock: DETACH ... CONCURRENTLY is no transaction)
_PRUNE_LOCK = 0x756E646F70  # 'undop'


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def stored_up_to(conn: psycopg.Connection[Any], source: int) -> datetime | None:
    """The commit time of the source's newest stored transaction (capture stores in commit
    order: what it has still to store, however far behind, commits at or after it); for a
    source with none, when init made its slot."""
    row = conn.execute(
        "SELECT max(commit_time) FROM undo_store.transactions WHERE source = %s", (source,)
    ).fetchone()
    if row and row[0] is not None:
        return row[0]  # type: ignore[no-any-return]
    began = conn.execute(
        "SELECT value FROM undo_store.meta WHERE source = %s AND key = 'history_from'", (source,)
    ).fetchone()
    return _time(began[0]) if began and began[0] else None


def cut_of(conn: psycopg.Connection[Any], before: datetime) -> datetime:
    """Where a prune before ``before`` cuts: the start of the partition holding it (itself
    when none does), and no later than the start of the partition holding any source's newest
    stored transaction (:func:`stored_up_to`): its capture, however far behind, writes into
    that partition or later ones."""
    parts = partitions(conn)

    def start(t: datetime) -> datetime:
        return next((lo for lo, hi in parts if lo <= t < hi), t)

    cut = start(before)
    for sid, _ in list(iter_sources(conn)):
        stored = stored_up_to(conn, sid)
        if stored is not None:
            cut = min(cut, start(stored))
    return cut


def _finish_pending(conn: psycopg.Connection[Any]) -> list[str]:
    """Partitions a detach left pending (DETACH ... FINALIZE finishes it); their names."""
    names = [
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'undo_store.changes'::regclass AND i.inhdetachpending"
        )
    ]
    for name in names:
        conn.execute(
            sql.SQL("ALTER TABLE undo_store.changes DETACH PARTITION {} FINALIZE").format(
                sql.Identifier(SCHEMA, name)
            )
        )
        _drop(conn, name)
    return names


def _drop(conn: psycopg.Connection[Any], name: str) -> None:
    with conn.transaction():
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(SCHEMA, name)))
        conn.execute("DELETE FROM undo_store.change_partitions WHERE name = %s", (name,))


def _detach_and_drop(conn: psycopg.Connection[Any], name: str) -> None:
    """Take a partition out of changes without blocking its readers or capture, then drop it."""
    attached = conn.execute(
        "SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE i.inhparent = 'undo_store.changes'::regclass AND n.nspname = %s"
        " AND c.relname = %s",
        (SCHEMA, name),
    ).fetchone()
    if attached:
        conn.execute(
            sql.SQL("ALTER TABLE undo_store.changes DETACH PARTITION {} CONCURRENTLY").format(
                sql.Identifier(SCHEMA, name)
            )
        )
    _drop(conn, name)


def _old_partitions(conn: psycopg.Connection[Any], cut: datetime) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT name FROM undo_store.change_partitions WHERE upper <= %s ORDER BY lower",
            (cut,),
        )
    ]


def _delete_transactions(
    conn: psycopg.Connection[Any], cut: datetime, limit: int | None
) -> tuple[int, int, int]:
    """Delete the oldest transactions committed before the cut (``limit`` of them at most;
    None: all), with their per-table counts and statements, in one store transaction; their
    untrusted row changes go to pruned_counts. Their changes are in partitions wholly before
    the cut, dropped after. (transactions, changes, sessions)."""
    if limit is None:
        return _delete_all_transactions(conn, cut)
    with conn.transaction():
        row = conn.execute(
            "WITH gone AS (DELETE FROM undo_store.transactions WHERE id IN (SELECT id"
            "  FROM undo_store.transactions WHERE commit_time < %(cut)s ORDER BY commit_time"
            "  LIMIT %(limit)s)"
            "  RETURNING id, source, session_id, tag, tag_reason,"
            "  inserts + updates + deletes + truncates AS n,"
            "  coalesce(last_change - first_change + 1, 0) AS changes),"
            " counts AS (DELETE FROM undo_store.txn_changes x USING gone"
            "  WHERE x.txn = gone.id),"
            " stmts AS (DELETE FROM undo_store.statements s USING gone WHERE s.txn = gone.id),"
            " untrusted AS (INSERT INTO undo_store.pruned_counts (source, kind, label, n)"
            "  SELECT source, 'untrusted', coalesce(tag_reason, ''), sum(n) FROM gone"
            "  WHERE tag <> 'trusted' GROUP BY 1, 3"
            "  ON CONFLICT (source, kind, application_name, relation, label)"
            "  DO UPDATE SET n = pruned_counts.n + excluded.n)"
            " SELECT (SELECT count(*) FROM gone), (SELECT coalesce(sum(changes), 0) FROM gone),"
            " (SELECT count(*) FROM (SELECT DISTINCT source, session_id FROM gone"
            "  WHERE session_id IS NOT NULL) s)",
            {"cut": cut, "limit": limit},
        ).fetchone()
    return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)


def _repeatable_read(conn: psycopg.Connection[Any]) -> None:
    """The store transaction just begun sees one snapshot: what its counts add up is what its
    deletes take (a row written meanwhile is neither, and kept for a later prune)."""
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")


def _delete_all_transactions(conn: psycopg.Connection[Any], cut: datetime) -> tuple[int, int, int]:
    """`undo prune`'s delete of every transaction before the cut: counted first, then deleted
    by the cut itself, each table by one plain statement (bench/prune, 100,000 transactions:
    0.29 s, where one statement deleting the transactions by their ids and the rest through
    the ids it returned took 0.45 s)."""
    where = {"cut": cut}
    with conn.transaction():
        _repeatable_read(conn)
        row = conn.execute(
            "SELECT count(*), coalesce(sum(coalesce(last_change - first_change + 1, 0)), 0),"
            " count(DISTINCT (source, session_id)) FILTER (WHERE session_id IS NOT NULL)"
            " FROM undo_store.transactions WHERE commit_time < %(cut)s",
            where,
        ).fetchone()
        if not row or not row[0]:
            return 0, 0, 0
        conn.execute(
            "INSERT INTO undo_store.pruned_counts (source, kind, label, n)"
            " SELECT source, 'untrusted', coalesce(tag_reason, ''),"
            " sum(inserts + updates + deletes + truncates) FROM undo_store.transactions"
            " WHERE commit_time < %(cut)s AND tag <> 'trusted' GROUP BY 1, 3"
            " ON CONFLICT (source, kind, application_name, relation, label)"
            " DO UPDATE SET n = pruned_counts.n + excluded.n",
            where,
        )
        for small in ("txn_changes", "statements"):
            conn.execute(
                sql.SQL(
                    "DELETE FROM {} x USING undo_store.transactions t"
                    " WHERE x.txn = t.id AND t.commit_time < %(cut)s"
                ).format(sql.Identifier(SCHEMA, small)),
                where,
            )
        conn.execute("DELETE FROM undo_store.transactions WHERE commit_time < %(cut)s", where)
    return int(row[0]), int(row[1]), int(row[2])


def _through(conn: psycopg.Connection[Any], cut: datetime) -> int:
    """Sessions that began before the cut and go on after it (those an undo refuses:
    engine/plan.py): a session's id begins with its start time in hex (PostgreSQL's %c), so
    the ids of sessions that began before the cut sort before the cut's."""
    row = conn.execute(
        "SELECT count(*) FROM (SELECT DISTINCT source, session_id FROM undo_store.transactions"
        " WHERE session_id < %s AND commit_time >= %s) s",
        (session_prefix(cut), cut),
    ).fetchone()
    return int(row[0]) if row else 0


def _forget_before(conn: psycopg.Connection[Any], cut: datetime) -> None:
    """The rest recorded before the cut, as on SQLite: activity of the minutes wholly before
    it and malformed messages (both counted into pruned_counts), DDL records, closed gaps; and
    every source's pruned_before moved to the cut (rewinds refuse times before it)."""
    last = int(cut.timestamp()) - 60
    with conn.transaction():
        _repeatable_read(conn)
        # counted, then deleted: one snapshot, so the same rows (a DELETE ... RETURNING every
        # row into the sums cost half as much again)
        conn.execute(
            "INSERT INTO undo_store.pruned_counts (source, kind, application_name, relation,"
            " inserts, updates, deletes, truncates, n) SELECT r.source, 'activity',"
            " g.application_name, g.relation, sum(g.inserts), sum(g.updates), sum(g.deletes),"
            " sum(g.truncates), sum(g.transactions) FROM undo_store.activity g"
            " JOIN undo_store.relations r ON r.id = g.relation WHERE g.minute <= %s"
            " GROUP BY 1, 3, 4"
            " ON CONFLICT (source, kind, application_name, relation, label) DO UPDATE SET"
            " inserts = pruned_counts.inserts + excluded.inserts,"
            " updates = pruned_counts.updates + excluded.updates,"
            " deletes = pruned_counts.deletes + excluded.deletes,"
            " truncates = pruned_counts.truncates + excluded.truncates,"
            " n = pruned_counts.n + excluded.n",
            (last,),
        )
        conn.execute("DELETE FROM undo_store.activity WHERE minute <= %s", (last,))
        conn.execute(
            "WITH gone AS (DELETE FROM undo_store.malformed WHERE received_at < %s"
            " RETURNING source, prefix)"
            " INSERT INTO undo_store.pruned_counts (source, kind, label, n)"
            " SELECT source, 'malformed', prefix, count(*) FROM gone GROUP BY 1, 3"
            " ON CONFLICT (source, kind, application_name, relation, label)"
            " DO UPDATE SET n = pruned_counts.n + excluded.n",
            (cut,),
        )
        conn.execute("DELETE FROM undo_store.ddl WHERE commit_time < %s", (cut,))
        conn.execute(
            "DELETE FROM undo_store.gaps WHERE detected_at < %s"
            " AND NOT (kind = 'table' AND to_lsn IS NULL)",
            (cut,),
        )
        conn.execute(
            "INSERT INTO undo_store.meta (source, key, value)"
            " SELECT id, 'pruned_before', %(cut)s FROM undo_store.sources"
            " ON CONFLICT (source, key) DO UPDATE SET value = greatest(meta.value, excluded.value)",
            {"cut": iso(cut)},
        )


def _lock(conn: psycopg.Connection[Any], wait: bool) -> bool:
    if wait:
        conn.execute("SELECT pg_advisory_lock(%s)", (_PRUNE_LOCK,))
        return True
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_PRUNE_LOCK,)).fetchone()
    return bool(row and row[0])


def _unlock(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (_PRUNE_LOCK,))


def prune(conn: psycopg.Connection[Any], before: str, size: Any) -> PruneReport:
    """Prune every source of the store before ``before`` (see the module); ``size()``: the
    store's bytes."""
    _lock(conn, wait=True)
    try:
        _finish_pending(conn)
        bytes_before = size()
        cut = cut_of(conn, _time(before))
        through = _through(conn, cut)
        transactions, changes, sessions = _delete_transactions(conn, cut, None)
        for attempt in range(_ATTEMPTS):
            try:
                _forget_before(conn, cut)
                break
            except errors.SerializationFailure:  # a row it counted was written meanwhile
                if attempt == _ATTEMPTS - 1:
                    raise
        for name in _old_partitions(conn, cut):
            _detach_and_drop(conn, name)
        return PruneReport(transactions, changes, sessions, through, bytes_before, size(), iso(cut))
    finally:
        _unlock(conn)


def prune_step(conn: psycopg.Connection[Any], before: str) -> StepReport:
    """One small step, for capture --keep (its connection, no batch open): delete up to STEP
    of the oldest transactions before the cut; when none is left, the rest recorded before it
    and one partition wholly before it, waiting at most STEP_LOCK_TIMEOUT for its readers (a
    detach that times out is left pending and finished by a later step). Another prune
    running: nothing this time."""
    if not _lock(conn, wait=False):
        return StepReport(0, 0, False, 0)
    try:
        cut = cut_of(conn, _time(before))
        t, c, _ = _delete_transactions(conn, cut, STEP)
        if t == STEP:
            return StepReport(t, c, True, 0)
        try:
            _forget_before(conn, cut)
        except errors.SerializationFailure:
            return StepReport(t, c, True, 0)  # a row it counted was written meanwhile: again
        old = _old_partitions(conn, cut)
        conn.execute("SELECT set_config('lock_timeout', %s, false)", (STEP_LOCK_TIMEOUT,))
        try:
            if not _finish_pending(conn) and old:
                _detach_and_drop(conn, old[0])
                old = old[1:]
        except errors.LockNotAvailable:
            return StepReport(t, c, True, 0)
        finally:
            conn.execute("RESET lock_timeout")
        return StepReport(t, c, bool(old), 0)
    finally:
        _unlock(conn)
