"""Run an undo: print the inverse as a psql script, or apply it in one transaction.

Both go through the same sequence (``_run``) built by the same builder (inverse.py): record the
undo in the source's ledger, stage each table's changes with COPY, collapse them, then one
statement per table and operation (undo inserts children first, then updates, then re-insert
parents first), then check the foreign keys the undo touched. The applier runs each statement
in a savepoint and compares the rows written with the rows expected; where they differ it
rolls the statement back, asks which rows conflict, leaves them out and runs it again
(``abort`` then rolls everything back and reports every conflict; ``skip`` commits the rest).
The printer writes the same statements, each followed by the same count check, so psql stops
at the first conflict and nothing is changed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import psycopg
from psycopg import sql
from psycopg.copy import QueuedLibpqWriter

from . import inverse, pg
from .config import Settings
from .errors import Refused
from .inverse import Step, TableUndo
from .plan import OP_NAMES, Plan, Target, changes, later_writer, load, select
from .store.schema import open_store

log = logging.getLogger(__name__)
COPY_CHUNK = 2000  # lines per write to the COPY stream
MAX_ATTEMPTS = 3  # a statement whose rows keep changing under it is given up after this
ALREADY_UNDONE = "UN001"  # SQLSTATE raised by undo.record_undo
Query = sql.SQL | sql.Composed
#: the undo transaction's work_mem: joins of the staged rows with the table fit in memory
#: (a session of a million rows: 64 batches spilled to disk at the default 4MB)
WORK_MEM = "128MB"


@dataclass(frozen=True)
class Conflict:
    table: str
    key: str
    detail: str

    def __str__(self) -> str:
        return f"{self.table} ({self.key}): {self.detail}"


@dataclass
class UndoReport:
    """What an undo did (or would do): rows per table and operation, what it refused."""

    applied: bool = False
    rows: Counter[tuple[str, str]] = field(default_factory=Counter)
    conflicts: list[Conflict] = field(default_factory=list)
    not_undoable: list[str] = field(default_factory=list)
    undo_xid: int | None = None
    untrusted_skipped: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        verb = "undone" if self.applied else "to undo"
        lines = [
            f"{n} {OP_NAMES[op]}(s) of {table} {verb}"
            for (table, op), n in sorted(self.rows.items())
        ]
        lines += [f"cannot undo: {x}" for x in self.not_undoable]
        lines += [f"conflict: {c}" for c in self.conflicts]
        if self.untrusted_skipped:
            lines.append(f"left out {self.untrusted_skipped} transaction(s) with an untrusted tag")
        return lines + self.notes


# -- the two runners ---------------------------------------------------------------------------


class _Runner:
    """What _run needs of a way to run the undo."""

    copies_directly = False  # whether copy_directly may be tried

    def statement(self, q: Query) -> None:
        raise NotImplementedError

    def choose(self, name: str, test: Query, if_true: Query, if_false: Query) -> None:
        """Run ``if_true`` or ``if_false`` as the one-value query ``test`` says."""
        raise NotImplementedError

    def copy_directly(self, u: TableUndo, rows: Iterable[str]) -> bool:
        """COPY old rows straight into the table; False (and nothing written) if one is in
        the way."""
        raise NotImplementedError

    def copy(self, q: Query, lines: Iterable[str]) -> int:
        """COPY the lines; the number of rows."""
        raise NotImplementedError

    def step(self, step: Step, undo: TableUndo) -> None:
        raise NotImplementedError

    def fk_check(self, label: str, q: Query) -> None:
        raise NotImplementedError


class _Applier(_Runner):
    copies_directly = True

    def __init__(self, conn: psycopg.Connection[Any], db: Any, report: UndoReport) -> None:
        self.conn = conn
        self.db = db
        self.report = report

    def statement(self, q: Query) -> None:
        self.conn.execute(q)  # never with parameters: identifiers are not scanned for %s

    def choose(self, name: str, test: Query, if_true: Query, if_false: Query) -> None:
        self.statement(if_true if self._one(test) else if_false)

    def copy(self, q: Query, lines: Iterable[str]) -> int:
        with self.conn.cursor() as cur:
            # a writer thread sends while this one reads the store and builds lines
            with cur.copy(q, writer=QueuedLibpqWriter(cur)) as cp:
                buf: list[str] = []
                for line in lines:
                    buf.append(line)
                    if len(buf) >= COPY_CHUNK:
                        cp.write("".join(buf))
                        buf.clear()
                if buf:
                    cp.write("".join(buf))
            return cur.rowcount

    def copy_directly(self, u: TableUndo, rows: Iterable[str]) -> bool:
        self.conn.execute("SAVEPOINT undo_copy")
        try:
            written = self.copy(u.copy_into_table(), rows)
        except psycopg.errors.IntegrityError:
            self.conn.execute("ROLLBACK TO SAVEPOINT undo_copy")
            return False
        self.conn.execute("RELEASE SAVEPOINT undo_copy")
        self.report.rows[u.t.version.qualified, "D"] += written
        return True

    def _one(self, q: Query) -> int:
        row = self.conn.execute(q).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def step(self, step: Step, undo: TableUndo) -> None:
        seen: set[int] = set()
        for _ in range(MAX_ATTEMPTS):
            expected = self._one(step.expected)
            if expected == 0:
                return
            self.conn.execute("SAVEPOINT undo_step")
            written = self.conn.execute(step.write).rowcount
            if written == expected:
                self.conn.execute("RELEASE SAVEPOINT undo_step")
                self.report.rows[step.table.version.qualified, step.kind] += written
                return
            self.conn.execute("ROLLBACK TO SAVEPOINT undo_step")
            found = self.conn.execute(step.diagnose).fetchall()
            for net_id, change_id, image, reason in found:
                if net_id not in seen:
                    seen.add(net_id)
                    self._conflict(step, int(change_id), image, reason)
            if found:
                self.conn.execute(
                    sql.SQL("DELETE FROM {} n WHERE n.id = ANY ({})").format(
                        undo.net, sql.Literal([int(r[0]) for r in found])
                    )
                )
        raise Refused(
            f"rows of {step.table.version.qualified} kept changing while the undo ran:"
            " nothing changed; run it again"
        )

    def _conflict(self, step: Step, change_id: int, image: str, reason: str) -> None:
        tv = step.table.version
        values = load(image)
        who = later_writer(self.db, tv, change_id, inverse.key_text(tv, values))
        self.report.conflicts.append(
            Conflict(tv.qualified, inverse.describe_image(tv, values), f"{reason}; {who}")
        )

    def fk_check(self, label: str, q: Query) -> None:
        row = self.conn.execute(q).fetchone()
        if row is not None:
            self.report.conflicts.append(
                Conflict(label, str(row[0]), "foreign key would be violated")
            )


class _Printer(_Runner):
    def __init__(self, out: TextIO, conn: psycopg.Connection[Any], report: UndoReport) -> None:
        self.out = out
        self.conn = conn
        self.report = report

    def statement(self, q: Query) -> None:
        self.out.write(q.as_string(self.conn) + ";\n")

    def choose(self, name: str, test: Query, if_true: Query, if_false: Query) -> None:
        self.out.write(f"{test.as_string(self.conn)} AS {name} \\gset\n\\if :{name}\n")
        self.statement(if_true)
        self.out.write("\\else\n")
        self.statement(if_false)
        self.out.write("\\endif\n")

    def copy(self, q: Query, lines: Iterable[str]) -> int:
        self.statement(q)
        n = 0
        for n, line in enumerate(lines, 1):  # noqa: B007 (n is the count)
            self.out.write(line)
        self.out.write("\\.\n")
        return n

    def step(self, step: Step, undo: TableUndo) -> None:
        tv = step.table.version
        idx = tv.key if tv.key is not None else range(min(len(tv.columns), 5))
        describe = sql.SQL(" || ', ' || ").join(
            sql.SQL("{} || coalesce(d.img::jsonb ->> {}, 'NULL')").format(
                sql.Literal(f"{tv.columns[i]}="), sql.Literal(i)
            )
            for i in idx
        )
        self.statement(
            sql.SQL(
                "WITH w AS ({write} RETURNING 1) SELECT CASE WHEN (SELECT count(*) FROM w)"
                " = ({expected}) THEN NULL ELSE pg_temp.undo_fail({label} || array_to_string(ARRAY("
                "SELECT d.reason || ' (' || {describe} || ')' FROM ({diagnose}) AS d(id, seq,"
                " img, reason) LIMIT 10), '; ')) END"
            ).format(
                write=step.write,
                expected=step.expected,
                label=sql.Literal(
                    f"undo conflict, nothing was changed: {tv.qualified}: {OP_NAMES[step.kind]}s"
                    " cannot be undone: "
                ),
                describe=describe,
                diagnose=step.diagnose,
            )
        )

    def fk_check(self, label: str, q: Query) -> None:
        self.statement(
            sql.SQL("SELECT pg_temp.undo_fail({} || v) FROM ({}) AS x(v)").format(
                sql.Literal(f"undo: foreign key would be violated: {label}: "), q
            )
        )


_FAIL_FUNCTION = (
    "CREATE FUNCTION pg_temp.undo_fail(message text) RETURNS void"
    " LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION '%', message; END $$"
)


# -- the sequence both run ---------------------------------------------------------------------


def _settings(
    fire_triggers: bool, lock_timeout: str, statement_timeout: str, target: Target
) -> list[sql.Composed]:
    pairs = [("lock_timeout", lock_timeout), ("statement_timeout", statement_timeout)]
    pairs += list(pg.PINNED_SETTINGS.items())
    pairs.append(("work_mem", WORK_MEM))
    if not fire_triggers:
        pairs.append(("session_replication_role", "replica"))
    # what the undo undoes, for its tag: after the transaction's start, so that undo.tag() takes
    # it for this transaction only (a value other code set for the session is not a claim)
    undoing = json.dumps(target.describe(), separators=(",", ":"))
    return [
        sql.SQL("SELECT set_config({}, {}, true)").format(sql.Literal(k), sql.Literal(v))
        for k, v in pairs
    ] + [
        sql.SQL(
            "SELECT set_config('undo.undoing', transaction_timestamp()::text || ' ' || {}, true)"
        ).format(sql.Literal(undoing))
    ]


def _ledger_call(plan: Plan) -> sql.Composed:
    """undo.record_undo(target, [[commit LSN, table OID, op, xid], ...])."""
    by_id = {t["id"]: t for t in plan.transactions}
    entries = sorted(
        {
            (
                pg.int_to_lsn(by_id[txn]["commit_lsn"]),
                plan.tables[rel].oid,
                op,
                by_id[txn]["xid"],
            )
            for (txn, rel, op) in plan.counts
        },
        key=lambda e: (pg.lsn_to_int(e[0]), e[1] or 0, e[2]),
    )
    return sql.SQL("SELECT undo.record_undo({}::jsonb, {}::jsonb)").format(
        sql.Literal(json.dumps(plan.target.describe())),
        sql.Literal(json.dumps([list(e) for e in entries], separators=(",", ":"))),
    )


#: progress(phase, done, total): "changes" read into COPY, then "statements" run
Progress = Callable[[str, int, int], None]


def _counted(
    lines: Iterator[str], progress: Progress | None, done: list[int], total: int
) -> Iterator[str]:
    """Report progress in COPY lines sent (one per change; two for an update of a key)."""
    for line in lines:
        yield line
        done[0] += 1
        if progress is not None and done[0] % 10_000 == 0:
            progress("changes", done[0], total)


def _stage(runner: _Runner, u: TableUndo, lines: Iterator[str]) -> None:
    """Stage a table's changes and make its net (the stage itself when no key repeats)."""
    runner.statement(u.create_stage())
    runner.copy(u.copy_stage(), lines)  # not analyzed: the plans are the same without (bench)
    chains = u.chains()
    if chains is None:
        runner.statement(u.collapse())
    else:
        runner.choose(u.chains_var, chains, u.collapse(), u.stage_as_net())


def _run(
    runner: _Runner,
    conn: psycopg.Connection[Any],
    db: Any,
    plan: Plan,
    tables: dict[int, inverse.LiveTable],
    fire_triggers: bool,
    progress: Progress | None,
    check_keys: bool = True,
) -> None:
    runner.statement(_ledger_call(plan))
    oids = {tables[r].version.oid: r for r in tables}
    order = [oids[o] for o in inverse.fk_order(conn, [o for o in oids if o is not None])]
    ops = plan.ops()
    row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()
    by_xmin = plan.by_xmin(int(row[0]) if row else 0)
    undos: dict[int, TableUndo] = {}
    staged: set[int] = set()
    done = [0]
    total = sum(plan.counts.values())

    def lines(rel: int, u: TableUndo, rows: bool = False) -> Iterator[str]:
        changed = changes(db, plan, rel, by_xmin)
        return _counted(u.rows(changed) if rows else u.lines(changed), progress, done, total)

    for n, rel in enumerate(order, 1):
        u = undos[rel] = TableUndo(tables[rel], n)
        if not (runner.copies_directly and _copyable(u, ops[rel], fire_triggers)):
            _stage(runner, u, lines(rel, u))
            staged.add(rel)
    writes = sum(len(undos[r].steps()) for r in staged) + len(order) - len(staged)
    written = 0

    def wrote() -> None:
        nonlocal written
        written += 1
        if progress is not None:
            progress("statements", written, writes)

    for kind, sequence in (("I", reversed(order)), ("U", order), ("D", order)):
        for rel in sequence:
            u = undos[rel]
            if rel in staged:
                if kind in u.steps():
                    runner.step(u.steps()[kind], u)
                    wrote()
            elif kind == "D":
                if not runner.copy_directly(u, lines(rel, u, rows=True)):
                    # a row is in the way: stage and go the whole way, which names the conflicts
                    # (a key deleted twice, with a write between, is a broken chain, not a 'D')
                    _stage(runner, u, lines(rel, u))
                    staged.add(rel)
                    for step in u.steps().values():
                        runner.step(step, u)
                wrote()
    if check_keys and not fire_triggers:
        for label, q in inverse.foreign_key_checks(
            conn,
            {
                u.t.version.oid: u
                for r, u in undos.items()
                if r in staged and u.t.version.oid is not None
            },
        ):
            runner.fk_check(label, q)


def _copyable(u: TableUndo, ops: set[str], fire_triggers: bool) -> bool:
    """Whether the table's undo can be a plain COPY of the deleted rows into it: it undoes
    deletes only; a unique index on the key would refuse a row whose key is back (or deleted
    twice), where the staged way then names the conflict; no foreign key of its own needs
    checking; and the rows go in as they would with INSERT (no user trigger or rule fires)."""
    t = u.t
    return (
        ops == {"D"}
        and not fire_triggers
        and not t.references
        and (t.unique_key or t.version.key is None)
        and bool(t.writable)
    )


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
    progress: Progress | None = None,
    inspect: Callable[[psycopg.Connection[Any]], None] | None = None,
) -> UndoReport:
    """Build the inverse of the target's changes; print it to ``out`` or apply it.

    Raises Refused (nothing changed, nothing printed) on conflicts with ``abort``, on changes
    already undone, or on changes that cannot be undone without ``skip``; with ``skip`` returns
    a report whose conflicts are not empty. With ``inspect`` (and ``apply``), the undo runs,
    ``inspect`` sees the database as it left it, and everything is rolled back.
    """
    db = open_store(settings.store)
    if target.tables:  # a partitioned table: its partitions, whose changes the stream carries
        with pg.connect(settings.dsn) as conn:
            target = dataclasses.replace(target, tables=pg.with_partitions(conn, target.tables))
    plan = select(db, target)
    picked = target.session is not None or target.app is not None  # trusted tags only
    report = UndoReport(untrusted_skipped=plan.untrusted if picked else 0)
    if target.after is not None and (plan.untrusted or plan.untagged):
        report.notes.append(
            f"includes {plan.untagged} untagged and {plan.untrusted} untrusted transaction(s)"
        )
    report.not_undoable = plan.not_undoable
    if report.not_undoable and on_conflict != "skip":
        raise Refused(
            "cannot undo: "
            + "; ".join(report.not_undoable[:5])
            + " (use --on-conflict skip to undo the rest)"
        )
    conn = pg.connect(settings.dsn, autocommit=False, application_name="undo")
    try:
        tables = {rel: inverse.live_table(conn, tv) for rel, tv in plan.tables.items()}
        settings_sql = _settings(fire_triggers, lock_timeout, statement_timeout, plan.target)
        if apply:
            _apply(
                conn,
                db,
                plan,
                tables,
                report,
                settings_sql,
                on_conflict,
                fire_triggers,
                lock_timeout,
                statement_timeout,
                progress,
                inspect,
            )
        else:
            assert out is not None
            # spooled, so that a failure half-way leaves nothing on ``out`` that psql could run
            with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
                _print(conn, db, plan, tables, report, settings_sql, spool, fire_triggers)
                spool.seek(0)
                shutil.copyfileobj(spool, out, 1 << 20)
    finally:
        conn.close()
    return report


def _apply(
    conn: psycopg.Connection[Any],
    db: Any,
    plan: Plan,
    tables: dict[int, inverse.LiveTable],
    report: UndoReport,
    settings_sql: list[sql.Composed],
    on_conflict: str,
    fire_triggers: bool,
    lock_timeout: str,
    statement_timeout: str,
    progress: Progress | None,
    inspect: Callable[[psycopg.Connection[Any]], None] | None,
) -> None:
    try:
        for q in settings_sql:
            conn.execute(q)
    except psycopg.errors.InsufficientPrivilege:
        conn.rollback()
        user = conn.info.user
        raise Refused(
            f"role {user} may not set session_replication_role, which keeps user triggers quiet"
            f" during the undo: run GRANT SET ON PARAMETER session_replication_role TO {user};"
            " (PostgreSQL 15+, as a superuser), or pass --fire-triggers"
        ) from None
    try:
        # what inspect reads is rolled back: rows whose parents other tables held may show
        _run(
            _Applier(conn, db, report),
            conn,
            db,
            plan,
            tables,
            fire_triggers,
            progress,
            check_keys=inspect is None,
        )
        if report.conflicts and on_conflict != "skip":
            conn.rollback()
            report.rows.clear()
            raise Refused(
                f"{len(report.conflicts)} conflict(s), nothing changed:\n  "
                + "\n  ".join(str(c) for c in report.conflicts)
            )
        if inspect is not None:
            inspect(conn)
            conn.rollback()
            return
        row = conn.execute("SELECT txid_current()").fetchone()
        report.undo_xid = int(row[0]) if row else None
        conn.commit()
    except BaseException as e:
        if not conn.closed:
            conn.rollback()
        if isinstance(e, psycopg.Error) and e.sqlstate == ALREADY_UNDONE:
            hint = (
                "; if that undo came after the time rewound to, run `undo capture` first so"
                " that the rewind takes it in"
                if plan.target.after is not None
                else ""
            )
            raise Refused((e.diag.message_primary or str(e)) + hint) from None
        if isinstance(e, psycopg.errors.UndefinedFunction) and "record_undo" in str(e):
            raise Refused(
                "the source database has no undo ledger yet: run `undo init` again to add it"
            ) from None
        if isinstance(e, psycopg.errors.UniqueViolation) and "ledger_live" in str(e):
            raise Refused(
                "another undo of these changes committed meanwhile: nothing changed"
            ) from None
        if isinstance(e, psycopg.errors.IntegrityError):
            raise Refused(
                f"the undo would break a constraint ({e.diag.message_primary}): nothing changed"
                ' (see "Undo" in the README for the orders undo cannot write in)'
            ) from None
        if isinstance(e, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
            raise Refused(
                f"gave up waiting ({e.diag.message_primary}; --lock-timeout {lock_timeout},"
                f" --statement-timeout {statement_timeout}): nothing changed; retry once the"
                " other transaction is done, or raise the timeouts"
            ) from None
        raise
    report.applied = True


def _print(
    conn: psycopg.Connection[Any],
    db: Any,
    plan: Plan,
    tables: dict[int, inverse.LiveTable],
    report: UndoReport,
    settings_sql: list[sql.Composed],
    out: TextIO,
    fire_triggers: bool,
) -> None:
    """Write the script. Everything that can refuse before the script runs (selection,
    un-undoable changes, tables changed since capture) has been checked by now, so a refusal
    never leaves a partial script on stdout; conflicts and an earlier undo stop it in psql."""
    out.write(
        f"-- undo of {json.dumps(plan.target.describe())}: "
        f"{len(plan.transactions)} transaction(s)\n"
        "-- run with: psql -v ON_ERROR_STOP=1 -f -\n"
        "\\set ON_ERROR_STOP on\n"
        "SET application_name = 'undo';\nBEGIN;\n"
    )
    printer = _Printer(out, conn, report)
    for q in settings_sql:
        printer.statement(q)
    printer.statement(sql.SQL(_FAIL_FUNCTION))
    _run(printer, conn, db, plan, tables, fire_triggers, None)
    out.write("COMMIT;\n")
    report.rows = plan.rows()
    conn.rollback()
