"""Run an undo: print the inverse as a psql script, or apply it in one transaction.

Both walk the same stream of stored changes, newest first, through the same builders
(inverse.py). Runs of deleted rows go back with COPY; updates and inserts are reverted one
row at a time after a row lock and a check that the row is as the undone change left it.
``--apply`` collects every conflict (abort: roll back, report all; skip: undo the rest);
the script stops at the first, so psql rolls it back where --apply would refuse.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import psycopg
from psycopg import sql

from . import inverse, pg
from .config import Settings
from .errors import Refused
from .inverse import LiveTable, Value
from .plan import Plan, StoredChange, Target, changes, check_not_undone, later_writer, select
from .store.schema import open_store
from .stream.protocol import iso

log = logging.getLogger(__name__)
COPY_CHUNK = 10_000
OP_NAMES = {"I": "insert", "U": "update", "D": "delete", "T": "truncate"}


@dataclass(frozen=True)
class Conflict:
    table: str
    key: str
    detail: str

    def __str__(self) -> str:
        return f"{self.table} ({self.key}): {self.detail}"


@dataclass
class UndoReport:
    """What an undo did (or would do): rows per table and operation undone, what it refused."""

    applied: bool = False
    rows: Counter[tuple[str, str]] = field(default_factory=Counter)
    conflicts: list[Conflict] = field(default_factory=list)
    not_undoable: list[str] = field(default_factory=list)
    undo_xid: int | None = None
    untrusted_skipped: int = 0

    def summary(self) -> list[str]:
        lines = [
            f"{n} {OP_NAMES[op]}(s) of {table} undone"
            for (table, op), n in sorted(self.rows.items())
        ]
        lines += [f"cannot undo: {x}" for x in self.not_undoable]
        lines += [f"conflict: {c}" for c in self.conflicts]
        if self.untrusted_skipped:
            lines.append(f"left out {self.untrusted_skipped} transaction(s) with an untrusted tag")
        return lines


class _Walker:
    """Shared walk over the changes; subclasses apply or print each step."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        db: Any,
        report: UndoReport,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.conn = conn
        self.db = db
        self.report = report
        self.tables: dict[int, LiveTable] = {}
        self.touched: set[int] = set()
        self.progress = progress
        self.done = 0

    def settle(self) -> None:
        """Wait for statements in flight before using the connection (see _Applier)."""

    def live(self, ch: StoredChange) -> LiveTable:
        t = self.tables.get(ch.table.id)
        if t is None:
            self.settle()
            t = inverse.live_table(self.conn, ch.table)
            self.tables[ch.table.id] = t
        if ch.table.oid is not None:
            self.touched.add(ch.table.oid)
        return t

    def walk(self, plan: Plan) -> None:
        run: list[StoredChange] = []
        for ch in changes(self.db, plan):
            if ch.op == "T" or (ch.op in "UD" and ch.old_text is None):
                continue  # reported before the walk
            if run and (ch.op != "D" or ch.table.id != run[0].table.id or len(run) >= COPY_CHUNK):
                self._flush(run)
                run = []
            if ch.op == "D":
                run.append(ch)
                continue
            t = self.live(ch)
            self.settle()
            if ch.op == "U":
                self.revert_update(t, ch)
            else:
                self.remove_insert(t, ch)
            self._count()
        if run:
            self._flush(run)
        self.settle()
        self.finish()

    def finish(self) -> None:
        """The walk is over (see _Applier)."""

    def _flush(self, run: list[StoredChange]) -> None:
        t = self.live(run[0])
        self.reinsert(t, run)
        self._count(len(run))

    def _count(self, n: int = 1) -> None:
        before = self.done
        self.done += n
        if self.progress is not None and self.done // 1000 != before // 1000:
            self.progress(self.done)

    def conflict(self, ch: StoredChange, image: list[Value] | None, detail: str) -> None:
        key = inverse.key_values(ch.table, image)
        who = later_writer(self.db, ch, key)
        self.report.conflicts.append(
            Conflict(ch.table.qualified, inverse.describe_key(ch.table, image), f"{detail}; {who}")
        )

    def reinsert(self, t: LiveTable, run: list[StoredChange]) -> None:
        raise NotImplementedError

    def revert_update(self, t: LiveTable, ch: StoredChange) -> None:
        raise NotImplementedError

    def remove_insert(self, t: LiveTable, ch: StoredChange) -> None:
        raise NotImplementedError


class _Params:
    """A lit() that turns each value into a placeholder and keeps the parameters."""

    def __init__(self) -> None:
        self.values: list[Value] = []

    def __call__(self, v: Value) -> sql.Composable:
        self.values.append(v)
        return sql.Placeholder()


class _Applier(_Walker):
    """Applies on the connection. Runs of re-inserted rows are COPYed by a worker thread, one
    savepoint per chunk, so the server parses one chunk while the next is read from the store
    (psycopg releases the GIL on network I/O). Any other statement first settles the chunks in
    flight; a chunk that hits a row that exists again is redone one row at a time."""

    IN_FLIGHT = 2

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="undo-copy")
        self.inflight: deque[tuple[Future[None], LiveTable, list[StoredChange]]] = deque()
        self.running = 0  # COPY chunks running in the worker (one at most)
        self.pipeline: Any = None  # psycopg Pipeline while updates and deletes are queued
        self.pipeline_cm: Any = None

    def _exists(self, t: LiveTable, image: list[Value]) -> bool:
        p = _Params()
        q = inverse.select_for_update(t, image, p)
        return self.conn.execute(q, p.values).fetchone() is not None

    def _copy(self, t: LiveTable, texts: list[str]) -> None:
        self.running += 1
        try:
            with (
                self.conn.transaction(),
                self.conn.cursor().copy(inverse.copy_statement(t)) as cp,
            ):
                for i in range(0, len(texts), 2000):  # stream, so the server parses meanwhile
                    cp.write(inverse.copy_lines(t, texts[i : i + 2000]))
        finally:
            self.running -= 1

    def _pipelined(self) -> None:
        """Updates and deletes are queued in pipeline mode: the next row's SELECT ... FOR
        UPDATE goes out with them, one round trip per row instead of two. COPY cannot run in
        pipeline mode, so a run of re-inserts leaves it first."""
        if self.pipeline is None:
            self.pipeline_cm = self.conn.pipeline()
            self.pipeline = self.pipeline_cm.__enter__()

    def finish(self) -> None:
        if self.pipeline is not None:
            self.pipeline = None
            self.pipeline_cm.__exit__(None, None, None)

    def reinsert(self, t: LiveTable, run: list[StoredChange]) -> None:
        self.finish()
        texts = [ch.old_text for ch in run if ch.old_text is not None]
        self.inflight.append((self.copier.submit(self._copy, t, texts), t, run))
        while len(self.inflight) > self.IN_FLIGHT:
            self._settle_one()

    def _settle_one(self) -> None:
        future, t, run = self.inflight.popleft()
        try:
            future.result()
            self.report.rows[(t.version.qualified, "D")] += len(run)
        except psycopg.errors.IntegrityError:
            for later, _, _ in self.inflight:
                later.exception()  # the connection must be idle before we use it here
            self._reinsert_one_by_one(t, run)

    def settle(self) -> None:
        while self.inflight:
            self._settle_one()

    def busy(self) -> bool:
        """Whether the worker is running a COPY (settled or not)."""
        return self.running > 0

    def close(self) -> None:
        for future, _, _ in self.inflight:
            future.exception()
        self.copier.shutdown()
        if self.pipeline is not None:  # leaving after an error: the caller rolls back
            self.pipeline = None
            with contextlib.suppress(psycopg.Error):
                self.pipeline_cm.__exit__(None, None, None)

    def _reinsert_one_by_one(self, t: LiveTable, run: list[StoredChange]) -> None:
        """Some row of the run exists again: find which, one row at a time."""
        for ch in run:
            assert ch.old is not None
            if t.version.key is not None and self._exists(t, ch.old):
                self.conflict(ch, ch.old, "a row with this key exists again")
                continue
            p = _Params()
            self.conn.execute(inverse.insert(t, ch.old, p), p.values)
            self.report.rows[(ch.table.qualified, "D")] += 1

    def _locked_row(self, t: LiveTable, ch: StoredChange) -> tuple[Any, list[Value]] | None:
        post = inverse.post_image(ch)
        p = _Params()
        cur = self.conn.execute(inverse.select_for_update(t, post, p), p.values)
        if self.pipeline is not None:
            self.pipeline.sync()  # send what is queued with this SELECT, wait for all of it
        res = cur.pgresult  # raw text: values are compared as stored, never converted
        if res is None or res.ntuples == 0:
            self.conflict(ch, post, "the row is gone")
            return None
        raw = [res.get_value(0, j) for j in range(res.nfields)]
        row = [None if v is None else v.decode() for v in raw]
        if row[1:] != post:
            changed = [
                c for c, a, b in zip(t.version.columns, row[1:], post, strict=True) if a != b
            ]
            self.conflict(ch, post, f"the row was changed ({', '.join(changed)})")
            return None
        return row[0], post

    def revert_update(self, t: LiveTable, ch: StoredChange) -> None:
        self._pipelined()
        found = self._locked_row(t, ch)
        if found is None:
            return
        p = _Params()
        sets = inverse.revert_assignments(t, ch, p)
        if sets is not None:
            q = sql.SQL("UPDATE {} SET {} WHERE ctid = {}").format(t.ident, sets, sql.Placeholder())
            self.conn.execute(q, [*p.values, found[0]])
        self.report.rows[(ch.table.qualified, "U")] += 1

    def remove_insert(self, t: LiveTable, ch: StoredChange) -> None:
        self._pipelined()
        found = self._locked_row(t, ch)
        if found is None:
            return
        self.conn.execute(sql.SQL("DELETE FROM {} WHERE ctid = %s").format(t.ident), [found[0]])
        self.report.rows[(ch.table.qualified, "I")] += 1


class _Printer(_Walker):
    def __init__(self, out: TextIO, *args: Any) -> None:
        super().__init__(*args)
        self.out = out

    def lit(self, v: Value) -> sql.Composable:
        return sql.Literal(v)

    def emit(self, q: sql.Composable) -> None:
        self.out.write(q.as_string(self.conn) + ";\n")

    def check(self, cte: sql.Composable, message: str) -> None:
        self.emit(
            sql.SQL("WITH {} SELECT pg_temp.undo_check(count(*) = 1, {}) FROM done").format(
                cte, sql.Literal(message)
            )
        )

    def reinsert(self, t: LiveTable, run: list[StoredChange]) -> None:
        self.emit(inverse.copy_statement(t))
        self.out.write(inverse.copy_lines(t, [ch.old_text for ch in run if ch.old_text]))
        self.out.write("\\.\n")
        self.report.rows[(t.version.qualified, "D")] += len(run)

    def _hit(self, t: LiveTable, ch: StoredChange) -> sql.Composed:
        post = inverse.post_image(ch)
        cols = sql.SQL(" AND ").join(
            inverse.same_output(t.version.columns[i], post[i], self.lit) for i in range(len(post))
        )
        return sql.SQL("hit AS (SELECT ctid FROM {} WHERE {} AND {} LIMIT 1 FOR UPDATE)").format(
            t.ident, inverse.locate(t, post, self.lit), cols
        )

    def _message(self, ch: StoredChange) -> str:
        return (
            f"undo conflict: {ch.table.qualified} "
            f"({inverse.describe_key(ch.table, inverse.post_image(ch))}) changed since xid "
            f"{ch.xid}"
        )

    def revert_update(self, t: LiveTable, ch: StoredChange) -> None:
        sets = inverse.revert_assignments(t, ch, self.lit) or sql.SQL("{} = {}").format(
            sql.Identifier(t.version.columns[0]), sql.Identifier(t.version.columns[0])
        )
        cte = sql.SQL(
            "{}, done AS (UPDATE {} AS x SET {} FROM hit WHERE x.ctid = hit.ctid RETURNING 1)"
        ).format(self._hit(t, ch), t.ident, sets)
        self.check(cte, self._message(ch))
        self.report.rows[(ch.table.qualified, "U")] += 1

    def remove_insert(self, t: LiveTable, ch: StoredChange) -> None:
        cte = sql.SQL(
            "{}, done AS (DELETE FROM {} AS x USING hit WHERE x.ctid = hit.ctid RETURNING 1)"
        ).format(self._hit(t, ch), t.ident)
        self.check(cte, self._message(ch))
        self.report.rows[(ch.table.qualified, "I")] += 1


_CHECK_FUNCTION = (
    "CREATE FUNCTION pg_temp.undo_check(ok boolean, message text) RETURNS void"
    " LANGUAGE plpgsql AS $$ BEGIN IF NOT ok THEN RAISE EXCEPTION '%', message; END IF; END $$"
)


def _unundoable(db: Any, plan: Plan) -> list[str]:
    out: list[str] = []
    tables = set(plan.target.tables)
    for txn in plan.transactions:
        if not (txn["truncates"] or txn["updates"] or txn["deletes"]):
            continue
        rows = db.execute(
            "SELECT DISTINCT r.schema_name || '.' || r.table_name, c.op FROM changes c"
            " JOIN relations r ON r.id = c.relation WHERE c.id BETWEEN ? AND ?"
            " AND (c.op = 'T' OR (c.op IN ('U', 'D') AND c.old IS NULL))",
            [txn["first_change"], txn["last_change"]],
        ).fetchall()
        xid = txn["xid"]
        for table, op in rows:
            if tables and table not in tables:
                continue
            why = (
                "TRUNCATE cannot be undone from the change stream"
                if op == "T"
                else "no full old row (the table lacked REPLICA IDENTITY FULL)"
            )
            out.append(f"{table} in xid {xid}: {why}")
    return out


def undo(
    settings: Settings,
    target: Target,
    *,
    apply: bool = False,
    on_conflict: str = "abort",
    fire_triggers: bool = False,
    lock_timeout: str = "5s",
    statement_timeout: str = "0",
    out: TextIO | None = None,
    progress: Callable[[int], None] | None = None,
) -> UndoReport:
    """Build the inverse of the target's changes; print it to ``out`` or apply it.

    Raises Refused (nothing changed) on conflicts with ``abort`` or on changes that cannot be
    undone without ``skip``; with ``skip`` returns a report whose conflicts are not empty.
    """
    db = open_store(settings.store)
    plan = select(db, target)
    report = UndoReport(untrusted_skipped=plan.untrusted if target.xids == () else 0)
    report.not_undoable = _unundoable(db, plan)
    if report.not_undoable and on_conflict != "skip":
        raise Refused(
            "cannot undo: "
            + "; ".join(report.not_undoable[:5])
            + " (use --on-conflict skip to undo the rest)"
        )
    if apply:
        check_not_undone(db, plan)
    conn = pg.connect(settings.dsn, autocommit=False, application_name="undo")
    try:
        if apply:
            report = _apply(
                conn,
                db,
                plan,
                report,
                on_conflict,
                fire_triggers,
                lock_timeout,
                statement_timeout,
                progress,
            )
        else:
            assert out is not None
            _print(conn, db, plan, report, out, fire_triggers, lock_timeout, statement_timeout)
    finally:
        conn.close()
    return report


def _settings(
    fire_triggers: bool, lock_timeout: str, statement_timeout: str, target: Target
) -> list[tuple[str, str]]:
    out = [("lock_timeout", lock_timeout), ("statement_timeout", statement_timeout)]
    out += [(k, v) for k, v in pg.PINNED_SETTINGS.items()]
    out.append(("undo.undoing", json.dumps(target.describe(), separators=(",", ":"))))
    if not fire_triggers:
        out.append(("session_replication_role", "replica"))
    return out


def _apply(
    conn: psycopg.Connection[Any],
    db: Any,
    plan: Plan,
    report: UndoReport,
    on_conflict: str,
    fire_triggers: bool,
    lock_timeout: str,
    statement_timeout: str,
    progress: Callable[[int], None] | None,
) -> UndoReport:
    try:
        for name, value in _settings(fire_triggers, lock_timeout, statement_timeout, plan.target):
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
    except psycopg.errors.InsufficientPrivilege:
        conn.rollback()
        user = conn.info.user
        raise Refused(
            f"role {user} may not set session_replication_role, which keeps user triggers quiet"
            f" during the undo: run GRANT SET ON PARAMETER session_replication_role TO {user};"
            " (PostgreSQL 15+, as a superuser), or pass --fire-triggers"
        ) from None
    walker = _Applier(conn, db, report, progress)
    try:
        walker.walk(plan)
        if not fire_triggers:
            for name, q in inverse.foreign_key_checks(conn, walker.touched):
                row = conn.execute(q).fetchone()
                if row is not None:
                    report.conflicts.append(
                        Conflict(name, str(row[0]), "foreign key would be violated")
                    )
        if report.conflicts and on_conflict != "skip":
            conn.rollback()
            raise Refused(
                f"{len(report.conflicts)} conflict(s), nothing changed:\n  "
                + "\n  ".join(str(c) for c in report.conflicts)
            )
        row = conn.execute("SELECT txid_current()").fetchone()
        report.undo_xid = int(row[0]) if row else None
        conn.commit()
    except BaseException as e:
        # Ctrl-C or an error while a COPY chunk may still run (or wait on a lock) in the worker:
        # cancel it on the server, or waiting for it below would wait for that lock.
        if walker.busy() and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.cancel_safe(timeout=10)
        walker.close()
        if not conn.closed:
            conn.rollback()
        if isinstance(e, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
            raise Refused(
                f"gave up waiting ({e.diag.message_primary}; --lock-timeout {lock_timeout},"
                f" --statement-timeout {statement_timeout}): nothing changed; retry once the"
                " other transaction is done, or raise the timeouts"
            ) from None
        raise
    walker.close()
    report.applied = True
    with db.atomic():
        db.execute(
            "INSERT INTO undos (applied_at, target, selection, undo_xid) VALUES (?, ?, ?, ?)",
            [
                iso(datetime.now(UTC)),
                json.dumps(plan.target.describe()),
                json.dumps(plan.txn_ids),
                report.undo_xid,
            ],
        )
    return report


def _print(
    conn: psycopg.Connection[Any],
    db: Any,
    plan: Plan,
    report: UndoReport,
    out: TextIO,
    fire_triggers: bool,
    lock_timeout: str,
    statement_timeout: str,
) -> None:
    out.write(
        f"-- undo of {json.dumps(plan.target.describe())}: "
        f"{len(plan.transactions)} transaction(s)\n"
    )
    out.write("-- run with: psql -v ON_ERROR_STOP=1 -f -\n")
    out.write("SET application_name = 'undo';\nBEGIN;\n")
    for name, value in _settings(fire_triggers, lock_timeout, statement_timeout, plan.target):
        out.write(
            sql.SQL("SELECT set_config({}, {}, true);\n")
            .format(sql.Literal(name), sql.Literal(value))
            .as_string(conn)
        )
    out.write(_CHECK_FUNCTION + ";\n")
    walker = _Printer(out, conn, db, report, None)
    walker.walk(plan)
    if not fire_triggers:
        for name, q in inverse.foreign_key_checks(conn, walker.touched):
            out.write(
                sql.SQL("SELECT pg_temp.undo_check(NOT EXISTS ({}), {});\n")
                .format(q, sql.Literal(f"undo: foreign key would be violated: {name}"))
                .as_string(conn)
            )
    out.write("COMMIT;\n")
    conn.rollback()
