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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import psycopg
from psycopg import sql
from psycopg.copy import QueuedLibpqWriter

from undo.core import images, names, wal
from undo.core.config import Settings
from undo.core.errors import Refused
from undo.core.images import OP_NAMES, load
from undo.engine import inverse
from undo.engine.inverse import Step, TableUndo
from undo.engine.plan import Plan, Target, changes, later_writer, select
from undo.source import pg, sources
from undo.store.api import Store

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
    #: rows written per (table, op undone): by --apply as counted, by a preview the changes
    rows: Counter[tuple[str, str]] = field(default_factory=Counter)
    conflicts: list[Conflict] = field(default_factory=list)
    not_undoable: list[str] = field(default_factory=list)
    undo_xid: int | None = None
    untrusted_skipped: int = 0
    notes: list[str] = field(default_factory=list)
    #: changes selected per (table, op): what a preview and its result both count
    changes: Counter[tuple[str, str]] = field(default_factory=Counter)

    def summary(self) -> list[str]:
        """Changes per table and operation, counted the same way in a preview and in its
        result; then, where they differ, the rows --apply wrote, and why they differ."""
        verb = "to undo" if not self.applied else "selected" if self.conflicts else "undone"
        counted = self.changes or self.rows
        lines = [
            f"{n} {OP_NAMES[op]}(s) of {table} {verb}" for (table, op), n in sorted(counted.items())
        ]
        if self.applied and self.changes and self.rows != self.changes:
            lines.append("rows written: " + written(self.rows))
            lines.append(ROWS_MOVE)
        elif not self.applied and rows_may_move(self.changes):
            lines.append(ROWS_MOVE + " (the script's last NOTICE counts the rows it wrote)")
        lines += [f"cannot undo: {x}" for x in self.not_undoable]
        lines += [f"conflict: {c}" for c in self.conflicts]
        if self.untrusted_skipped:
            lines.append(f"left out {self.untrusted_skipped} transaction(s) with an untrusted tag")
        return lines + self.notes


#: why the rows an undo writes are not its changes, one for one
ROWS_MOVE = (
    "rows written count each row once, as the selection left it: a key change is a delete and"
    " an insert; repeated updates of a row collapse into one"
)
#: what undoing an operation does to a row
WRITES = {"D": "inserted back", "U": "set back", "I": "deleted"}


def written(rows: Counter[tuple[str, str]]) -> str:
    """Rows written per table, in a few words.

    >>> written(Counter({("public.t", "D"): 326, ("public.t", "I"): 10, ("public.u", "U"): 2}))
    'public.t: 326 inserted back, 10 deleted; public.u: 2 set back'
    """
    tables: dict[str, list[str]] = {}
    for (table, op), n in sorted(rows.items(), key=lambda x: (x[0][0], "DUI".index(x[0][1]))):
        tables.setdefault(table, []).append(f"{n} {WRITES[op]}")
    return "; ".join(f"{t}: {', '.join(parts)}" for t, parts in tables.items())


def rows_may_move(changes: Counter[tuple[str, str]]) -> bool:
    """Whether the rows written may not be the changes one for one: a table with an update
    (it may change the key, or a row twice) or with more than one operation (a row inserted
    then deleted, ...).

    >>> rows_may_move(Counter({("t", "D"): 9})), rows_may_move(Counter({("t", "U"): 1}))
    (False, True)
    """
    ops: dict[str, set[str]] = {}
    for table, op in changes:
        ops.setdefault(table, set()).add(op)
    return any("U" in o or len(o) > 1 for o in ops.values())


# -- the two runners ---------------------------------------------------------------------------


@dataclass
class _Writes:
    """The write phase: the tables in foreign-key order, their undos, which are staged (the
    others go back by one COPY straight into the table), and how to stage one more."""

    conn: psycopg.Connection[Any]
    order: list[int]
    undos: dict[int, TableUndo]
    staged: set[int]
    stage: Callable[[int], None]
    copy_rows: Callable[[int], Iterator[str]]
    xids: Callable[[int], list[int]]
    check_keys: bool
    progress: Progress | None
    #: the tables whose conflicts are looked for (the print check: those it staged); None: all
    checked: set[int] | None = None

    def steps(self) -> Iterator[tuple[TableUndo, Step | None]]:
        """Undo inserts children first, then updates, then re-insert parents first; None: the
        table's COPY straight into it."""
        for kind, sequence in (("I", reversed(self.order)), ("U", self.order), ("D", self.order)):
            for rel in sequence:
                u = self.undos[rel]
                if rel in self.staged:
                    if kind in u.steps():
                        yield u, u.steps()[kind]
                elif kind == "D":
                    yield u, None

    def count(self) -> int:
        return sum(len(self.undos[r].steps()) if r in self.staged else 1 for r in self.order)

    def by_oid(self, checked: bool = False) -> dict[int, TableUndo]:
        return {
            u.t.version.oid: u
            for r, u in self.undos.items()
            if r in self.staged
            and u.t.version.oid is not None
            and (not checked or self.checked is None or r in self.checked)
        }


#: a conflict over a value wal2json before 2.6 could not carry (NaN, ±Infinity: stored as null)
_LOST_TO_DECODER = (
    "the table holds NaN or Infinity in {} where the audit store has NULL, and is as the undone"
    " change left it otherwise: wal2json before 2.6 sends NaN and ±Infinity of float and"
    " numeric columns as null (docs/design.md, Decoders), so undo cannot match the row; not a later"
    " change. Undo the rest with --on-conflict skip"
)


def _diagnose(w: _Writes, db: Store, report: UndoReport) -> dict[int, list[int]]:
    """Find the conflicts on the live rows as they are, with nothing of the undo written:
    each statement's, then the rows that depend on them (or that nothing would hold to)
    through foreign keys, until none is left. Takes them out of the nets (into the skip tables),
    reports them, and returns the net ids left out per table number."""
    conn = w.conn
    staged = [
        w.undos[r] for r in w.order if r in w.staged and (w.checked is None or r in w.checked)
    ]
    for u in staged:
        conn.execute(u.create_skip())
    out: dict[int, list[int]] = {}

    # wal2json before 2.6 (no numbers_as_strings) stored NaN and ±Infinity as null
    nan_lost = db.meta("decoder") == "wal2json" and db.meta("numbers_as_strings") != "1"

    def leave_out(
        u: TableUndo, found: list[tuple[Any, ...]], name_writer: bool, kind: str | None = None
    ) -> None:
        ids = sorted({int(r[0]) for r in found})
        conn.execute(u.leave_out(ids))
        out.setdefault(u.n, []).extend(ids)
        tv = u.t.version
        for _, change_id, image, reason in found:
            values = load(image)
            detail = reason
            # a re-insert's conflict is a row in the way, not a value the decoder lost
            lost = (
                inverse.lost_to_decoder(conn, u.t, values)
                if nan_lost and kind in ("I", "U")
                else []
            )
            if lost:
                detail = _LOST_TO_DECODER.format(", ".join(lost))
            elif name_writer:
                key = images.key_text(values, tv.key)
                who = later_writer(db, tv, int(change_id), key, image)
                detail = f"{reason}; {who}"
            report.conflicts.append(
                Conflict(tv.qualified, inverse.describe_image(tv, values), detail)
            )

    for u in staged:
        for step in u.steps().values():
            if not _count(conn, step.expected):
                continue
            found = conn.execute(step.diagnose).fetchall()
            if found:
                leave_out(u, found, True, step.kind)
    if not w.check_keys:
        return out
    rules = inverse.foreign_key_skips(conn, w.by_oid(checked=True))
    while True:
        more = False
        for u, q in rules:
            found = conn.execute(q).fetchall()
            if found:
                more = True
                leave_out(u, found, False)
        if not more:
            return out


def _count(conn: psycopg.Connection[Any], q: Query) -> int:
    row = conn.execute(q).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


class _Runner:
    """What _run needs of a way to run the undo."""

    copies_directly = False  # whether a table may go back by a COPY straight into it
    checked: set[int] | None = None  # see _Writes.checked

    def begin(self, rel: int) -> None:
        """The statements that follow stage this table."""

    def statement(self, q: Query) -> None:
        """A statement of the undo (the ledger's call, settings)."""
        raise NotImplementedError

    def stage(self, q: Query) -> None:
        """A statement that stages (temporary tables only)."""
        raise NotImplementedError

    def ledger(self, q: Query) -> None:
        """Record the undo in the source's ledger (undo.record_undo), the first write."""
        raise NotImplementedError

    def guard(self, q: Query, says: str) -> None:
        """The check for user code that would run as the role undoing (_user_code_guard),
        before the tables are written; ``says`` what it refuses, for the script's reader."""
        raise NotImplementedError

    def choose(self, name: str, test: Query, if_true: Query, if_false: Query) -> None:
        """Stage with ``if_true`` or ``if_false`` as the one-value query ``test`` says."""
        raise NotImplementedError

    def copy(self, q: Query, lines: Iterable[str]) -> int:
        """COPY the lines into a stage; the number of rows."""
        raise NotImplementedError

    def write(self, w: _Writes) -> None:
        """The writes, each checked by its count, and the foreign-key checks."""
        raise NotImplementedError


class _Applier(_Runner):
    """Runs the writes in a savepoint, each compared with the count it must write. Where one
    differs, or a table's COPY meets a row in the way, or (``skip``) a foreign key would break,
    everything written is rolled back, the conflicts are found on the rows as they are and
    taken out (with what depends on them), and the writes run again."""

    copies_directly = True

    def __init__(
        self, conn: psycopg.Connection[Any], db: Store, report: UndoReport, on_conflict: str
    ) -> None:
        self.conn = conn
        self.db = db
        self.report = report
        self.on_conflict = on_conflict

    def statement(self, q: Query) -> None:
        self.conn.execute(q)  # never with parameters: identifiers are not scanned for %s

    def guard(self, q: Query, says: str) -> None:
        self.statement(q)  # its refusal (USER_CODE) and lock timeouts: _apply's

    def ledger(self, q: Query) -> None:
        # known by SQLSTATE and by the statement that raised it, never by message text
        try:
            self.statement(q)
        except psycopg.errors.InsufficientPrivilege:
            raise Refused(not_operator(self.conn)) from None
        except (psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName):
            raise Refused(
                "the source database has no undo ledger yet: run `undo init` again to add it"
            ) from None

    stage = statement

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

    def _copy_directly(self, u: TableUndo, rows: Iterable[str], xids: list[int]) -> bool:
        """COPY the old rows straight into the table; False (nothing written) if a row is in
        the way (a keyless table: if a row of it was written since the transactions ``xids``)."""
        if not u.keyed and self._one(u.young_rows(xids)):
            return False  # maybe an identical row: the staged way counts them
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
        return _count(self.conn, q)

    def _write_once(self, w: _Writes) -> int | str | None:
        """Every write once: None if each wrote what it must; else the table to stage (its
        COPY met a row), or "mismatch"."""
        total = w.count()
        for done, (u, step) in enumerate(w.steps(), 1):
            if w.progress is not None:  # as a statement starts: the phase shows while it runs
                w.progress("writing", done - 1, total)
            if step is None:
                if not self._copy_directly(u, w.copy_rows(u.t.version.id), w.xids(u.t.version.id)):
                    return u.t.version.id
            else:
                expected = self._one(step.expected)
                if expected:
                    written = self.conn.execute(step.write).rowcount
                    if written != expected:
                        return "mismatch"
                    self.report.rows[step.table.version.qualified, step.kind] += written
            if w.progress is not None:
                w.progress("writing", done, total)
        return None

    def write(self, w: _Writes) -> None:
        attempts = 0
        while True:
            self.conn.execute("SAVEPOINT undo_writes")
            outcome = self._write_once(w)
            broken: list[Conflict] = []
            if outcome is None and w.check_keys:
                checks = inverse.foreign_key_checks(self.conn, w.by_oid())
                for i, (label, q) in enumerate(checks):
                    if w.progress is not None:
                        w.progress("checking", i, len(checks))
                    row = self.conn.execute(q).fetchone()
                    if row is not None:
                        broken.append(Conflict(label, str(row[0]), "foreign key would be violated"))
                if broken and self.on_conflict != "skip":
                    self.report.conflicts += broken  # refused: every one of them listed
                    outcome = None
                elif broken:
                    outcome = "keys"
            if outcome is None:
                self.conn.execute("RELEASE SAVEPOINT undo_writes")
                return
            self.conn.execute("ROLLBACK TO SAVEPOINT undo_writes")
            self.conn.execute("RELEASE SAVEPOINT undo_writes")
            self.report.rows.clear()
            if isinstance(outcome, int):
                w.stage(outcome)  # it goes the staged way, which names the conflicts
            else:
                attempts += 1
                if attempts >= MAX_ATTEMPTS:
                    raise Refused(
                        "rows kept changing while the undo ran: nothing changed; run it again"
                    )
            left_out = _diagnose(w, self.db, self.report)
            if not left_out and outcome == "keys":
                raise Refused(
                    "the undo would break a foreign key, nothing changed: "
                    + "; ".join(f"{c.table} ({c.key})" for c in broken)
                )
            if left_out and self.on_conflict != "skip":
                return  # every conflict is listed; the caller rolls back


class _Printer(_Runner):
    """Writes the script. The tables in ``checked`` (those a look at their rows' xmins did not
    clear, ``_cleared``) are staged on undo's own connection too, as they are printed, and their
    conflicts looked for on the live rows (reads only, no row locks): ``abort`` refuses before
    anything is printed, ``skip`` prints a script that leaves them out. The script keeps every
    count check, for what changes between the check and psql. Under psql it prints nothing but
    its errors and its last NOTICE: QUIET hides command tags, and each query's one row goes
    into a psql variable (\\gset)."""

    def __init__(
        self,
        out: TextIO,
        conn: psycopg.Connection[Any],
        db: Store,
        report: UndoReport,
        on_conflict: str,
        checked: set[int],
    ) -> None:
        self.out = out
        self.conn = conn
        self.db = db
        self.report = report
        self.on_conflict = on_conflict
        self.checked: set[int] = checked
        self.check = False  # the table being staged is checked
        #: (table, kind, the psql variable holding the rows its statement wrote)
        self.counted: list[tuple[str, str, str]] = []

    def begin(self, rel: int) -> None:
        self.check = rel in self.checked

    def statement(self, q: Query) -> None:
        self.out.write(q.as_string(self.conn) + ";\n")

    def kept(self, q: Query) -> None:
        """A query of one row, kept in psql variables named as its columns, not printed."""
        self.out.write(q.as_string(self.conn) + " \\gset\n")

    def ledger(self, q: Query) -> None:
        # psql would say only "permission denied for function record_undo": say who to grant,
        # in one line (terse: no CONTEXT line), before anything is written
        self.out.write("\\set undo_verbosity :VERBOSITY\n\\set VERBOSITY terse\n")
        self.statement(
            sql.SQL(
                "DO $undo$ BEGIN IF to_regprocedure('undo.record_undo(jsonb,jsonb)') IS NOT NULL"
                " AND NOT has_function_privilege('undo.record_undo(jsonb,jsonb)', 'EXECUTE')"
                " THEN RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege', MESSAGE ="
                " format({}, current_user, quote_ident(current_user)); END IF; END $undo$"
            ).format(sql.Literal(_NOT_OPERATOR.format(role="%s", ident="%s")))
        )
        self.out.write("\\set VERBOSITY :undo_verbosity\n")
        self.kept(sql.SQL("{} AS undo_recorded").format(q))

    def guard(self, q: Query, says: str) -> None:
        # terse: the refusal's lines only, no CONTEXT line
        self.out.write(says + "\\set undo_verbosity :VERBOSITY\n\\set VERBOSITY terse\n")
        self.statement(q)
        self.out.write("\\set VERBOSITY :undo_verbosity\n")

    def stage(self, q: Query) -> None:
        self.statement(q)
        if self.check:
            self.conn.execute(q)

    def choose(self, name: str, test: Query, if_true: Query, if_false: Query) -> None:
        self.out.write(f"{test.as_string(self.conn)} AS {name} \\gset\n\\if :{name}\n")
        self.statement(if_true)
        self.out.write("\\else\n")
        self.statement(if_false)
        self.out.write("\\endif\n")
        if self.check:
            row = self.conn.execute(test).fetchone()
            self.conn.execute(if_true if row and row[0] else if_false)

    def copy(self, q: Query, lines: Iterable[str]) -> int:
        self.statement(q)
        n = 0
        if not self.check:
            for n, line in enumerate(lines, 1):  # noqa: B007 (n is the count)
                self.out.write(line)
            self.out.write("\\.\n")
            return n
        # the same lines, staged here for the check while they are printed
        with self.conn.cursor() as cur, cur.copy(q, writer=QueuedLibpqWriter(cur)) as cp:
            buf: list[str] = []
            for line in lines:
                buf.append(line)
                if len(buf) >= COPY_CHUNK:
                    chunk = "".join(buf)
                    self.out.write(chunk)
                    cp.write(chunk)
                    n += len(buf)
                    buf.clear()
            if buf:
                chunk = "".join(buf)
                self.out.write(chunk)
                cp.write(chunk)
                n += len(buf)
        self.out.write("\\.\n")
        return n

    def write(self, w: _Writes) -> None:
        if self.checked:
            left_out = _diagnose(w, self.db, self.report)
            if self.report.conflicts and self.on_conflict != "skip":
                raise Refused(
                    f"{len(self.report.conflicts)} conflict(s), nothing printed:\n  "
                    + "\n  ".join(str(c) for c in self.report.conflicts)
                )
            for u in (w.undos[r] for r in w.order):
                if left_out.get(u.n):
                    self.statement(u.leave_out(left_out[u.n], keep=False))
        for _, step in w.steps():
            assert step is not None  # the script stages every table
            self.step(step)
            if step.table.version.id in self.checked:
                self.report.rows[step.table.version.qualified, step.kind] += _count(
                    self.conn, step.expected
                )
        if w.check_keys:
            for label, q in inverse.foreign_key_checks(self.conn, w.by_oid()):
                self.fk_check(label, q)

    def step(self, step: Step) -> None:
        tv = step.table.version
        idx = tv.key if tv.key is not None else range(min(len(tv.columns), 5))
        describe = sql.SQL(" || ', ' || ").join(
            sql.SQL("{} || coalesce(d.img::jsonb ->> {}, 'NULL')").format(
                sql.Literal(f"{tv.columns[i]}="), sql.Literal(i)
            )
            for i in idx
        )
        var = f"undo_rows_{len(self.counted) + 1}"
        self.counted.append((tv.qualified, step.kind, var))
        self.kept(
            sql.SQL(
                "WITH w AS ({write} RETURNING 1) SELECT (SELECT count(*) FROM w) AS {var},"
                " CASE WHEN (SELECT count(*) FROM w)"
                " = ({expected}) THEN NULL ELSE pg_temp.undo_fail({label} || array_to_string(ARRAY("
                "SELECT d.reason || ' (' || {describe} || ')' FROM ({diagnose}) AS d(id, seq,"
                " img, reason) LIMIT 10), '; ')) END AS undo_ok"
            ).format(
                var=sql.Identifier(var),
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
        self.kept(
            sql.SQL("SELECT count(pg_temp.undo_fail({} || v)) AS undo_fk FROM ({}) AS x(v)").format(
                sql.Literal(f"undo: foreign key would be violated: {label}: "), q
            )
        )

    def notice(self, plan: Plan) -> None:
        """Keep (before COMMIT) the NOTICE the script ends with: its xid, the changes it
        undid and the rows each statement wrote, from the variables the steps set."""
        parts: list[sql.Composable] = [
            sql.Literal("undo: committed in xid "),
            sql.SQL("txid_current()::text"),
            sql.Literal(": undid " + _changes_text(plan.rows()) + "; rows written: "),
        ]
        tables: dict[str, list[tuple[str, str]]] = {}
        for table, kind, var in self.counted:
            tables.setdefault(table, []).append((kind, var))
        for i, (table, steps) in enumerate(tables.items()):
            parts.append(sql.Literal(("; " if i else "") + f"{table}: "))
            for j, (kind, var) in enumerate(sorted(steps, key=lambda k: "DUI".index(k[0]))):
                # :'var' is psql's: the variable's value as a literal
                parts += [sql.SQL(":'" + var + "'"), sql.Literal(f" {WRITES[kind]}")]
                if j < len(steps) - 1:
                    parts.append(sql.Literal(", "))
        if rows_may_move(plan.rows()):
            parts.append(sql.Literal(f" ({ROWS_MOVE})"))
        self.kept(
            sql.SQL(
                "SELECT format('BEGIN RAISE NOTICE ''%%'', %L; END', {}) AS undo_notice"
            ).format(sql.SQL(" || ").join(parts))
        )


_NOT_OPERATOR = (
    "role {role} may not record undos in the ledger: run GRANT " + pg.OPERATOR_ROLE + " TO {ident};"
    " (as the role that ran undo init, or a superuser)"
)


def not_operator(conn: psycopg.Connection[Any]) -> str:
    """What to tell a role that may not call undo.record_undo (its transaction is rolled back),
    in the words the printed script uses."""
    conn.rollback()
    pg.pin_path(conn)
    row = conn.execute(
        "SELECT current_user, pg_catalog.quote_ident(current_user::pg_catalog.text)"
    ).fetchone()
    role, ident = row if row else (conn.info.user, conn.info.user)
    return _NOT_OPERATOR.format(role=role, ident=ident)


_FAIL_FUNCTION = (
    "CREATE FUNCTION pg_temp.undo_fail(message text) RETURNS boolean"
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
    # SET LOCAL, which is set_config(k, v, true) with no result row for psql to print
    return [
        sql.SQL("SET LOCAL {} = {}").format(sql.Identifier(*k.split(".")), sql.Literal(v))
        for k, v in pairs
    ]


#: SQLSTATE of the refusal of user code that replica mode does not keep quiet (the script's)
USER_CODE = "UN002"

#: What on the tables an undo writes (and the partitions under them) would run code other than
#: undo's as the role undoing, one line each saying what to do:
#: - with {triggers}: triggers (but undo's own tag: its name, undo.tag(), no WHEN) and rules
#:   that fire under session_replication_role = replica, ENABLE ALWAYS ('A') or ENABLE REPLICA
#:   ('R'). Foreign-key triggers are internal (tgisinternal), not a table owner's code.
#: - always: a function (or an operator's function) owned by neither a superuser, nor the role
#:   undoing (current_user), nor a role of {trusted} (--trust-owner), that PostgreSQL evaluates
#:   as the role writing a row: in a constraint of the table (CHECK, exclusion), a column's
#:   generation expression, the default of a column the undo does not write ({cols}: the
#:   columns it names when it inserts, those of the captured table, not one added since), an
#:   index's expressions or predicate, a row security
#:   policy (where it applies to the role undoing: see check_enable_rls), or a column's type and
#:   the types inside it (domains over domains, arrays, composite types' attributes, ranges):
#:   their constraints (a domain's CHECK) and their own functions (a domain's default). The
#:   calls are the objects' recorded dependencies (pg_depend on pg_proc, and on pg_operator for
#:   its oprcode), which is how PostgreSQL itself knows what an expression calls.
_USER_CODE = """
WITH RECURSIVE w(rel) AS (
    SELECT DISTINCT x.rel FROM pg_catalog.unnest({rels}::pg_catalog.regclass[]) r(rel)
     CROSS JOIN LATERAL (SELECT r.rel::oid UNION SELECT p.relid::oid
                           FROM pg_catalog.pg_partition_tree(r.rel) p) x(rel)),
types(rel, col, typ) AS (
    SELECT a.attrelid, a.attname, a.atttypid
      FROM w JOIN pg_catalog.pg_attribute a ON a.attrelid = w.rel
     WHERE a.attnum > 0 AND NOT a.attisdropped
    UNION
    SELECT t.rel, t.col, x.typ
      FROM types t JOIN pg_catalog.pg_type ty ON ty.oid = t.typ
     CROSS JOIN LATERAL (
           SELECT ty.typbasetype WHERE ty.typtype = 'd'
           UNION ALL SELECT ty.typelem WHERE ty.typelem <> 0
           UNION ALL SELECT a.atttypid FROM pg_catalog.pg_attribute a
                      WHERE ty.typtype = 'c' AND a.attrelid = ty.typrelid AND a.attnum > 0
                        AND NOT a.attisdropped
           UNION ALL SELECT rg.rngsubtype FROM pg_catalog.pg_range rg WHERE rg.rngtypid = ty.oid
           UNION ALL SELECT rg.rngtypid FROM pg_catalog.pg_range rg
                      WHERE rg.rngmultitypid = ty.oid) x(typ)),
cols(rel, col) AS (
    SELECT x.rel, c.col
      FROM pg_catalog.jsonb_each({cols}::pg_catalog.jsonb) j(tab, names)
     CROSS JOIN LATERAL (SELECT j.tab::pg_catalog.regclass::oid UNION SELECT p.relid::oid
                           FROM pg_catalog.pg_partition_tree(j.tab::pg_catalog.regclass) p) x(rel)
     CROSS JOIN LATERAL pg_catalog.jsonb_array_elements_text(j.names) c(col)),
rls(rel) AS (
    SELECT w.rel FROM w JOIN pg_catalog.pg_class c ON c.oid = w.rel
     WHERE c.relrowsecurity
       AND NOT (SELECT ro.rolsuper OR ro.rolbypassrls FROM pg_catalog.pg_roles ro
                 WHERE ro.rolname = current_user)
       AND (c.relforcerowsecurity
            OR NOT pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE'))),
code(rel, what, name, classid, objid, author) AS (
    SELECT co.conrelid,
           CASE co.contype WHEN 'c' THEN 'check constraint' WHEN 'x' THEN 'exclusion constraint'
                ELSE 'constraint' END,
           pg_catalog.quote_ident(co.conname), 'pg_catalog.pg_constraint'::pg_catalog.regclass,
           co.oid, tc.relowner
      FROM w JOIN pg_catalog.pg_constraint co ON co.conrelid = w.rel
      JOIN pg_catalog.pg_class tc ON tc.oid = w.rel
    UNION ALL
    SELECT ad.adrelid,
           CASE a.attgenerated WHEN '' THEN 'default of column' ELSE 'generated column' END,
           pg_catalog.quote_ident(a.attname), 'pg_catalog.pg_attrdef'::pg_catalog.regclass, ad.oid,
           tc.relowner
      FROM w JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = w.rel
      JOIN pg_catalog.pg_class tc ON tc.oid = w.rel
      JOIN pg_catalog.pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
     WHERE a.attgenerated <> ''
        OR NOT EXISTS (SELECT FROM cols k WHERE k.rel = ad.adrelid AND k.col = a.attname)
    UNION ALL
    SELECT i.indrelid, 'index', pg_catalog.quote_ident(ic.relname),
           'pg_catalog.pg_class'::pg_catalog.regclass, i.indexrelid, ic.relowner
      FROM w JOIN pg_catalog.pg_index i ON i.indrelid = w.rel
      JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
    UNION ALL
    SELECT p.polrelid, 'policy', pg_catalog.quote_ident(p.polname),
           'pg_catalog.pg_policy'::pg_catalog.regclass, p.oid, tc.relowner
      FROM rls JOIN pg_catalog.pg_policy p ON p.polrelid = rls.rel
      JOIN pg_catalog.pg_class tc ON tc.oid = rls.rel
     WHERE 0::oid = ANY (p.polroles)
        OR EXISTS (SELECT FROM pg_catalog.unnest(p.polroles) pr(role)
                    WHERE pg_catalog.pg_has_role(current_user, pr.role, 'MEMBER'))
    UNION ALL
    SELECT t.rel,
           pg_catalog.format('column %I''s type %s, constraint', t.col,
                             t.typ::pg_catalog.regtype),
           pg_catalog.quote_ident(co.conname), 'pg_catalog.pg_constraint'::pg_catalog.regclass,
           co.oid, ty.typowner
      FROM types t JOIN pg_catalog.pg_constraint co ON co.contypid = t.typ
      JOIN pg_catalog.pg_type ty ON ty.oid = t.typ
    UNION ALL
    SELECT t.rel, pg_catalog.format('column %I''s type', t.col),
           t.typ::pg_catalog.regtype::pg_catalog.text,
           'pg_catalog.pg_type'::pg_catalog.regclass, t.typ, ty.typowner
      FROM types t JOIN pg_catalog.pg_type ty ON ty.oid = t.typ),
reach(rel, what, name, classid, objid, author) AS (
    -- what an expression reads runs as the role undoing too: a view's functions, and the
    -- policies of a table it reads (the view's or table's owner wrote them)
    SELECT code.rel, code.what, code.name, code.classid, code.objid, code.author FROM code
    UNION
    SELECT r.rel, r.what, r.name, x.classid, x.objid, x.author
      FROM reach r
      JOIN pg_catalog.pg_depend d
        ON d.classid = r.classid AND d.objid = r.objid
       AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
      JOIN pg_catalog.pg_class v ON v.oid = d.refobjid AND NOT v.oid IN (SELECT w.rel FROM w)
     CROSS JOIN LATERAL (
           SELECT 'pg_catalog.pg_rewrite'::pg_catalog.regclass, rw.oid, v.relowner
             FROM pg_catalog.pg_rewrite rw WHERE rw.ev_class = v.oid AND v.relkind = 'v'
           UNION ALL
           SELECT 'pg_catalog.pg_policy'::pg_catalog.regclass, p.oid, v.relowner
             FROM pg_catalog.pg_policy p
            WHERE p.polrelid = v.oid AND v.relrowsecurity
              AND NOT (SELECT ro.rolsuper OR ro.rolbypassrls FROM pg_catalog.pg_roles ro
                        WHERE ro.rolname = current_user)
              AND (v.relforcerowsecurity
                   OR NOT pg_catalog.pg_has_role(current_user, v.relowner, 'USAGE')))
           x(classid, objid, author)),
-- functions that run SQL given as text, or set what later statements resolve (search_path,
-- role): whoever wrote the call decides what runs, as the role undoing
runs(fn) AS (
    SELECT p.oid FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n
        ON n.oid = p.pronamespace
     WHERE (n.nspname = 'pg_catalog'
            AND (p.proname IN ('set_config', 'ts_stat', 'cursor_to_xml', 'cursor_to_xmlschema')
                 OR (p.proname = 'ts_rewrite' AND p.pronargs = 2)
                 OR p.proname ~ '^(query|table|schema|database)_to_xml'))
        -- extensions' (dblink; tablefunc, a trusted one any role with CREATE may install)
        OR p.proname ~ '^(dblink|crosstab|connectby)'),
calls(rel, what, name, fn, op, author) AS (
    SELECT code.rel, code.what, code.name, COALESCE(o.oprcode::oid, d.refobjid), o.oid,
           code.author
      FROM reach code JOIN pg_catalog.pg_depend d ON d.classid = code.classid
                                                 AND d.objid = code.objid
      LEFT JOIN pg_catalog.pg_operator o
             ON d.refclassid = 'pg_catalog.pg_operator'::pg_catalog.regclass
            AND o.oid = d.refobjid
     WHERE d.refclassid IN ('pg_catalog.pg_proc'::pg_catalog.regclass,
                            'pg_catalog.pg_operator'::pg_catalog.regclass)
    UNION
    -- pg_depend records no dependency on pg_catalog's own functions (pinned): the calls of an
    -- expression, from its node tree (a function's, an operator's, an aggregate's, a window's)
    SELECT code.rel, code.what, code.name, m.id[1]::pg_catalog.oid, NULL::pg_catalog.oid,
           code.author
      FROM reach code
     CROSS JOIN LATERAL (
           SELECT co.conbin FROM pg_catalog.pg_constraint co
            WHERE code.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass
              AND co.oid = code.objid
           UNION ALL
           SELECT ad.adbin FROM pg_catalog.pg_attrdef ad
            WHERE code.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass
              AND ad.oid = code.objid
           UNION ALL
           SELECT t.tree FROM pg_catalog.pg_index i,
                  LATERAL (VALUES (i.indexprs), (i.indpred)) t(tree)
            WHERE code.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
              AND i.indexrelid = code.objid
           UNION ALL
           SELECT t.tree FROM pg_catalog.pg_policy p,
                  LATERAL (VALUES (p.polqual), (p.polwithcheck)) t(tree)
            WHERE code.classid = 'pg_catalog.pg_policy'::pg_catalog.regclass
              AND p.oid = code.objid
           UNION ALL
           SELECT t.tree FROM pg_catalog.pg_rewrite rw,
                  LATERAL (VALUES (rw.ev_action), (rw.ev_qual)) t(tree)
            WHERE code.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
              AND rw.oid = code.objid) e(tree)
     CROSS JOIN LATERAL pg_catalog.regexp_matches(e.tree::pg_catalog.text,
           ':(?:funcid|opfuncid|aggfnoid|winfnoid) ([0-9]+)', 'g') m(id)),
found(tab, what, name, line) AS (
    SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), 'trigger', tg.tgname::text,
           pg_catalog.format('%I.%I: trigger %I (ENABLE %s) runs %I.%I(%s), owned by %I,'
                  ' as the role undoing: review it, then ALTER TABLE %I.%I DISABLE TRIGGER %I;'
                  ' or undo with --fire-triggers to let user triggers fire',
                  n.nspname, c.relname, tg.tgname,
                  CASE tg.tgenabled WHEN 'A' THEN 'ALWAYS' ELSE 'REPLICA' END,
                  pn.nspname, pr.proname, pg_catalog.pg_get_function_identity_arguments(pr.oid),
                  pg_catalog.pg_get_userbyid(pr.proowner), n.nspname, c.relname, tg.tgname)
      FROM w JOIN pg_class c ON c.oid = w.rel JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_trigger tg ON tg.tgrelid = w.rel
      JOIN pg_proc pr ON pr.oid = tg.tgfoid JOIN pg_namespace pn ON pn.oid = pr.pronamespace
     WHERE {triggers} AND NOT tg.tgisinternal AND tg.tgenabled IN ('A', 'R')
       AND NOT (tg.tgname = 'undo_tag' AND tg.tgfoid = pg_catalog.to_regprocedure('undo.tag()')
                AND tg.tgqual IS NULL)
    UNION ALL
    SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), 'rule', rw.rulename::text,
           pg_catalog.format('%I.%I: rule %I (ENABLE %s), owned by %I (the table''s owner),'
                  ' rewrites what the undo writes, as the role undoing: review it, then ALTER TABLE'
                  ' %I.%I DISABLE RULE %I; or undo with --fire-triggers to let user triggers'
                  ' and rules fire',
                  n.nspname, c.relname, rw.rulename,
                  CASE rw.ev_enabled WHEN 'A' THEN 'ALWAYS' ELSE 'REPLICA' END,
                  pg_catalog.pg_get_userbyid(c.relowner), n.nspname, c.relname, rw.rulename)
      FROM w JOIN pg_class c ON c.oid = w.rel JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_rewrite rw ON rw.ev_class = w.rel
     WHERE {triggers} AND rw.ev_enabled IN ('A', 'R')
    UNION ALL
    SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), k.what, k.name || ' ' || k.fn::text,
           pg_catalog.format('%I.%I: %s %s calls %I.%I(%s)%s, owned by %I, as the role undoing:'
                  ' review it, then undo with --trust-owner %I',
                  n.nspname, c.relname, k.what, k.name,
                  pn.nspname, pr.proname, pg_catalog.pg_get_function_identity_arguments(pr.oid),
                  CASE WHEN k.op IS NOT NULL
                       THEN pg_catalog.format(' (operator %s)', k.op::pg_catalog.regoperator)
                       ELSE '' END,
                  ro.rolname, ro.rolname)
      FROM calls k JOIN pg_class c ON c.oid = k.rel JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_proc pr ON pr.oid = k.fn JOIN pg_namespace pn ON pn.oid = pr.pronamespace
      JOIN pg_roles ro ON ro.oid = pr.proowner
     WHERE NOT ro.rolsuper AND ro.rolname <> current_user
       AND NOT ro.rolname = ANY ({trusted}::pg_catalog.text[])
    UNION ALL
    SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), k.what, k.name || ' ' || k.fn::text,
           pg_catalog.format('%I.%I: %s %s calls %I.%I(%s), %s, written by %I, as the role'
                  ' undoing: review it, then undo with --trust-owner %I',
                  n.nspname, c.relname, k.what, k.name,
                  pn.nspname, pr.proname, pg_catalog.pg_get_function_identity_arguments(pr.oid),
                  CASE WHEN pr.oid IN (SELECT runs.fn FROM runs)
                       THEN 'which runs SQL given as text or sets what later statements run'
                       ELSE 'which its writer may not run' END,
                  au.rolname, au.rolname)
      FROM calls k JOIN pg_class c ON c.oid = k.rel JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_proc pr ON pr.oid = k.fn JOIN pg_namespace pn ON pn.oid = pr.pronamespace
      JOIN pg_roles ro ON ro.oid = pr.proowner
      JOIN pg_roles au ON au.oid = k.author
     WHERE (ro.rolsuper OR ro.rolname = current_user
            OR ro.rolname = ANY ({trusted}::pg_catalog.text[]))
       AND (pr.oid IN (SELECT runs.fn FROM runs)
            OR NOT pg_catalog.has_function_privilege(au.oid, pr.oid, 'EXECUTE'))
       AND NOT au.rolsuper AND au.rolname <> current_user
       AND NOT au.rolname = ANY ({trusted}::pg_catalog.text[]))
SELECT DISTINCT pg_catalog.regexp_replace(line, '[[:cntrl:]]', '?', 'g'), tab, what, name
  FROM found ORDER BY tab, what, name
"""

#: the first line of the refusal; then one line per object
_USER_CODE_HEAD = (
    "refused, nothing changed: user code on the tables the undo writes would run as the role"
    " undoing (triggers and rules ENABLE ALWAYS or ENABLE REPLICA fire even under"
    " session_replication_role = replica; constraints, defaults, indexes, policies and domains"
    " run their functions whenever a row is written):"
)


def _written(tables: dict[int, inverse.LiveTable]) -> sql.Composed:
    """The tables the undo writes, as an array of regclass text (resolved where it runs)."""
    idents = sorted({(t.version.schema, t.version.name) for t in tables.values()})
    return sql.SQL("ARRAY[{}]").format(
        sql.SQL(", ").join(sql.Literal(names.quote(s, n)) for s, n in idents)
    )


def _written_columns(tables: dict[int, inverse.LiveTable]) -> sql.Literal:
    """The columns the undo names in every insert into each table it writes, as a JSON object
    (its name as in _written: [column, ...]): their defaults are never evaluated."""
    cols: dict[str, set[str]] = {}
    for t in tables.values():
        name = names.quote(t.version.schema, t.version.name)
        mine = {t.version.columns[i] for i in t.writable}
        cols[name] = cols[name] & mine if name in cols else mine
    return sql.Literal(json.dumps({k: sorted(v) for k, v in sorted(cols.items())}))


def _user_code_query(
    tables: dict[int, inverse.LiveTable], triggers: bool, trusted: Sequence[str]
) -> sql.Composed:
    """_USER_CODE for the tables, with or without the triggers and rules (--fire-triggers),
    trusting the functions of the roles named (--trust-owner)."""
    return _code_query(_written(tables), _written_columns(tables), triggers, trusted)


#: before _USER_CODE, in the undo's transaction: its estimates (a recursive walk, node trees
#: matched) are far above jit_above_cost, and compiling it took 2.3 s of every undo for a query
#: of a few milliseconds
_NO_JIT = "SET LOCAL jit = off"


def _code_query(
    rels: sql.Composable, cols: sql.Composable, triggers: bool, trusted: Sequence[str]
) -> sql.Composed:
    """_USER_CODE for these tables (an array of their names) and the columns each insert
    names (a JSON object)."""
    return sql.SQL(_USER_CODE.strip()).format(
        rels=rels,
        cols=cols,
        triggers=sql.Literal(triggers),
        trusted=sql.SQL("ARRAY[{}]::pg_catalog.text[]").format(
            sql.SQL(", ").join(sql.Literal(r) for r in sorted(set(trusted)))
        ),
    )


def user_code(
    conn: psycopg.Connection[Any],
    tables: dict[int, inverse.LiveTable],
    triggers: bool = True,
    trusted: Sequence[str] = (),
) -> list[str]:
    """One line per trigger or rule that would fire during the undo despite
    session_replication_role = replica (unless not ``triggers``), and per table owner's
    function the undo's writes would run, on the tables it writes (see _USER_CODE)."""
    conn.execute(_NO_JIT)
    return [str(r[0]) for r in conn.execute(_user_code_query(tables, triggers, trusted))]


def refuse_read_code(conn: psycopg.Connection[Any], table: str, trusted: Sequence[str]) -> None:
    """Refuse (as an undo would) a read of ``table`` (its quoted name) that would run a table
    owner's function as the role reading: what _USER_CODE finds there, no column left to a
    default, triggers aside (`undo table --as-of` of a table with no change since)."""
    every = [
        str(r[0])
        for r in conn.execute(
            "SELECT a.attname FROM pg_catalog.pg_attribute a"
            " WHERE a.attrelid = pg_catalog.to_regclass(%s) AND a.attnum > 0"
            " AND NOT a.attisdropped",
            (table,),
        )
    ]
    rels = sql.SQL("ARRAY[{}]").format(sql.Literal(table))
    query = _code_query(rels, sql.Literal(json.dumps({table: every})), False, trusted)
    conn.execute(_NO_JIT)
    _refuse_user_code([str(r[0]) for r in conn.execute(query)])


def _refuse_user_code(lines: list[str]) -> None:
    if lines:
        raise Refused("\n  ".join([_USER_CODE_HEAD, *lines]))


def _user_code_guard(
    conn: psycopg.Connection[Any],
    tables: dict[int, inverse.LiveTable],
    triggers: bool,
    trusted: Sequence[str],
) -> sql.Composed:
    """A DO block that takes ROW EXCLUSIVE on the tables the undo writes (CREATE TRIGGER,
    ENABLE ALWAYS, CREATE RULE, ADD CONSTRAINT, CREATE INDEX, CREATE POLICY wait for it until
    the undo commits), then raises USER_CODE if user code on them would run as the role undoing
    (_USER_CODE). The script runs it before it writes (the tables may have changed since it was
    printed); --apply runs the same."""
    body = sql.SQL(
        "DECLARE r regclass; found text; BEGIN SET LOCAL jit = off;"
        " FOR r IN SELECT DISTINCT x.rel FROM pg_catalog.unnest({rels}::regclass[]) t(rel)"
        " CROSS JOIN LATERAL (SELECT t.rel UNION SELECT p.relid"
        " FROM pg_catalog.pg_partition_tree(t.rel) p) x(rel) ORDER BY 1 LOOP"
        " EXECUTE pg_catalog.format('LOCK TABLE ONLY %s IN ROW EXCLUSIVE MODE', r); END LOOP;"
        " SELECT pg_catalog.string_agg(line, E'\\n  ') INTO found FROM ({query}) q(line);"
        " IF found IS NOT NULL THEN RAISE EXCEPTION USING ERRCODE = {code},"
        " MESSAGE = {head} || E'\\n  ' || found; END IF; END"
    ).format(
        rels=_written(tables),
        query=_user_code_query(tables, triggers, trusted),
        code=sql.Literal(USER_CODE),
        head=sql.Literal(_USER_CODE_HEAD),
    )
    text = body.as_string(conn)
    tag = "$undo$"
    while tag in text:  # a name holding the quote's tag cannot end the body
        tag = tag[:-1] + "_$"
    return sql.SQL("DO ") + sql.SQL(tag + text + tag)


def _guard_says(fire_triggers: bool) -> str:
    """What the guard refuses, as SQL comments for the script's reader."""
    triggers = (
        "--   a trigger or rule ENABLE ALWAYS/REPLICA (it fires even under\n"
        "--   session_replication_role = replica), or\n"
    )
    return (
        "-- refuse, before writing, if user code on the tables would run as you:\n"
        + ("" if fire_triggers else triggers)
        + "--   a function of a role other than you or a superuser (or --trust-owner) that a\n"
        "--   constraint, default, generated column, index, policy or domain calls\n"
    )


def _undoing(target: Target) -> sql.Composed:
    """What the undo undoes, for its tag: stamped with the transaction's start, so that
    undo.tag() takes it for this transaction only (a value other code set for the session is
    no claim). One row, which the printed script keeps in a psql variable."""
    return sql.SQL(
        "SELECT set_config('undo.undoing', transaction_timestamp()::text || ' ' || {}, true)"
        " AS undo_undoing"
    ).format(sql.Literal(json.dumps(target.describe(), separators=(",", ":"))))


def _ledger_call(plan: Plan) -> sql.Composed:
    """undo.record_undo(target, [[commit LSN, table OID, op, xid], ...])."""
    by_id = {t.id: t for t in plan.transactions}
    entries = sorted(
        {
            (
                wal.int_to_lsn(by_id[txn].commit_lsn),
                plan.tables[rel].oid,
                op,
                by_id[txn].xid,
            )
            for (txn, rel, op) in plan.counts
        },
        key=lambda e: (wal.lsn_to_int(e[0]), e[1] or 0, e[2]),
    )
    return sql.SQL("SELECT undo.record_undo({}::jsonb, {}::jsonb)").format(
        sql.Literal(json.dumps(plan.target.describe())),
        sql.Literal(json.dumps([list(e) for e in entries], separators=(",", ":"))),
    )


#: progress(phase, done, total), phase by phase, each reported as it starts (done 0) and as
#: it moves: "staging" (changes sent by COPY to be staged), "writing" (statements run, the
#: conflict check folded in), "checking" (foreign-key checks run), "committing" (0, then 1 of 1)
Progress = Callable[[str, int, int], None]
PHASES = ("staging", "writing", "checking", "committing")


def _counted(
    lines: Iterator[str], progress: Progress | None, done: list[int], total: int
) -> Iterator[str]:
    """Report staging progress in COPY lines sent (one per change; two for an update of a
    key: at most ``total``), and once the table's lines are all sent."""
    for line in lines:
        yield line
        done[0] += 1
        if progress is not None and done[0] % 10_000 == 0:
            progress("staging", min(done[0], total), total)
    if progress is not None:
        progress("staging", min(done[0], total), total)


def _stage(runner: _Runner, u: TableUndo, lines: Iterator[str]) -> None:
    """Stage a table's changes and make its net (the stage itself when no key repeats)."""
    runner.stage(u.create_stage())
    runner.copy(u.copy_stage(), lines)  # not analyzed: the plans are the same without (bench)
    chains = u.chains()
    if chains is None:
        runner.stage(u.collapse())
    else:
        runner.choose(u.chains_var, chains, u.collapse(), u.stage_as_net())


def _run(
    runner: _Runner,
    conn: psycopg.Connection[Any],
    db: Store,
    plan: Plan,
    tables: dict[int, inverse.LiveTable],
    fire_triggers: bool,
    guard: Query,
    progress: Progress | None,
    check_keys: bool = True,
) -> None:
    runner.ledger(_ledger_call(plan))
    # after the ledger (a role that may not undo is told so first), before anything is
    # staged or written
    runner.guard(guard, _guard_says(fire_triggers))
    oids = {tables[r].version.oid: r for r in tables}
    order = [oids[o] for o in inverse.fk_order(conn, [o for o in oids if o is not None])]
    ops = plan.ops()
    row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()
    by_xmin = plan.by_xmin(int(row[0]) if row else 0)
    # a keyless table's stage carries every xid: rows written since are known by their xmin
    every_xid = {t.id: t.xid for t in plan.transactions}
    undos: dict[int, TableUndo] = {}
    staged: set[int] = set()
    # COPY into a table is refused where row security applies to the role writing (0A000):
    # those tables are staged and inserted, as the printed script does
    secured = {
        oids[r[0]]
        for r in conn.execute(
            "SELECT c.oid FROM pg_catalog.pg_class c WHERE c.oid = ANY (%s) AND c.relrowsecurity"
            " AND NOT (SELECT ro.rolsuper OR ro.rolbypassrls FROM pg_catalog.pg_roles ro"
            " WHERE ro.rolname = current_user) AND (c.relforcerowsecurity"
            " OR NOT pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE'))",
            ([o for o in oids if o is not None],),
        )
    }
    done = [0]
    total = sum(plan.counts.values())

    def lines(rel: int, u: TableUndo, rows: bool = False) -> Iterator[str]:
        changed = changes(db, plan, rel, by_xmin if u.keyed else every_xid)
        return _counted(u.rows(changed) if rows else u.lines(changed), progress, done, total)

    def stage(rel: int) -> None:
        runner.begin(rel)
        _stage(runner, undos[rel], lines(rel, undos[rel]))
        staged.add(rel)

    if progress is not None:
        progress("staging", 0, total)
    for n, rel in enumerate(order, 1):
        u = undos[rel] = TableUndo(tables[rel], n)
        if not (
            runner.copies_directly and rel not in secured and _copyable(u, ops[rel], fire_triggers)
        ):
            stage(rel)
    runner.write(
        _Writes(
            conn=conn,
            order=order,
            undos=undos,
            staged=staged,
            stage=stage,
            copy_rows=lambda rel: lines(rel, undos[rel], rows=True),
            xids=lambda rel: [t.xid for t in plan.transactions if (t.id, rel, "D") in plan.counts],
            check_keys=check_keys and not fire_triggers,
            progress=progress,
            checked=runner.checked,
        )
    )


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
    trust_owners: Sequence[str] = (),
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
    with sources.open_for(settings) as db:  # closed however it ends (a caller keeps errors)
        return _undo(
            db,
            settings,
            target,
            apply=apply,
            on_conflict=on_conflict,
            fire_triggers=fire_triggers,
            trust_owners=trust_owners,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
            out=out,
            progress=progress,
            inspect=inspect,
        )


def _undo(
    db: Store,
    settings: Settings,
    target: Target,
    *,
    apply: bool,
    on_conflict: str,
    fire_triggers: bool,
    trust_owners: Sequence[str],
    lock_timeout: str,
    statement_timeout: str,
    out: TextIO | None,
    progress: Progress | None,
    inspect: Callable[[psycopg.Connection[Any]], None] | None,
) -> UndoReport:
    if target.tables:  # a partitioned table: its partitions, whose changes the stream carries
        with pg.connect(settings.dsn) as conn:
            target = dataclasses.replace(target, tables=pg.with_partitions(conn, target.tables))
    plan = select(db, target)
    picked = target.session is not None or target.app is not None  # trusted tags only
    report = UndoReport(untrusted_skipped=plan.untrusted if picked else 0, changes=plan.rows())
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
    conn = pg.connect(
        settings.dsn,
        autocommit=False,
        application_name="undo",
        options=pg.PINNED_PATH_OPTIONS,
    )
    try:
        pg.pin_path(conn)  # first: nothing of undo's runs on another schema's functions
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
                trust_owners,
                lock_timeout,
                statement_timeout,
                progress,
                inspect,
            )
        else:
            assert out is not None
            # spooled, so that a failure half-way leaves nothing on ``out`` that psql could run
            # newline="": read back as written (a \r in a name stays a \r)
            with tempfile.TemporaryFile("w+", encoding="utf-8", newline="") as spool:
                _print(
                    conn,
                    db,
                    plan,
                    tables,
                    report,
                    settings_sql,
                    spool,
                    fire_triggers,
                    trust_owners,
                    on_conflict,
                    _settings(True, lock_timeout, statement_timeout, plan.target),
                )
                spool.seek(0)
                shutil.copyfileobj(spool, out, 1 << 20)
    finally:
        conn.close()
    return report


def _apply(
    conn: psycopg.Connection[Any],
    db: Store,
    plan: Plan,
    tables: dict[int, inverse.LiveTable],
    report: UndoReport,
    settings_sql: list[sql.Composed],
    on_conflict: str,
    fire_triggers: bool,
    trust_owners: Sequence[str],
    lock_timeout: str,
    statement_timeout: str,
    progress: Progress | None,
    inspect: Callable[[psycopg.Connection[Any]], None] | None,
) -> None:
    try:
        for q in settings_sql:
            conn.execute(q)
        conn.execute(_undoing(plan.target))
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
            _Applier(conn, db, report, on_conflict),
            conn,
            db,
            plan,
            tables,
            fire_triggers,
            # before anything is written, under locks held to the commit
            _user_code_guard(conn, tables, not fire_triggers, trust_owners),
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
        if progress is not None:
            progress("committing", 0, 1)
        conn.commit()
        if progress is not None:
            progress("committing", 1, 1)
    except BaseException as e:
        if not conn.closed:
            conn.rollback()
        if isinstance(e, psycopg.Error) and e.sqlstate == USER_CODE:
            raise Refused(e.diag.message_primary or _USER_CODE_HEAD) from None
        if isinstance(e, psycopg.Error) and e.sqlstate == ALREADY_UNDONE:
            hint = (
                "; if that undo came after the time rewound to, run `undo capture` first so"
                " that the rewind takes it in"
                if plan.target.after is not None
                else ""
            )
            raise Refused((e.diag.message_primary or str(e)) + hint) from None
        if (
            isinstance(e, psycopg.errors.UniqueViolation)
            and e.diag.constraint_name == "ledger_live"
        ):
            raise Refused(
                "another undo of these changes committed meanwhile: nothing changed"
            ) from None
        if isinstance(e, psycopg.errors.IntegrityError):
            raise Refused(
                f"the undo would break a constraint ({e.diag.message_primary}): nothing changed"
                ' (see docs/design.md, "The undo engine", for the orders undo cannot write in)'
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
    db: Store,
    plan: Plan,
    tables: dict[int, inverse.LiveTable],
    report: UndoReport,
    settings_sql: list[sql.Composed],
    out: TextIO,
    fire_triggers: bool,
    trust_owners: Sequence[str],
    on_conflict: str,
    check_settings: list[sql.Composed],
) -> None:
    """Write the script. Everything that can refuse before the script runs (selection,
    un-undoable changes, tables changed since capture, and conflicts on the live rows as they
    are now: the same rows are staged here and checked, reading only) is checked by the time the
    script is whole, so a refusal never leaves a partial script on stdout; what changes between
    this check and psql, and an earlier undo, stop it in psql. Nothing here is committed.
    It opens with what it does in words (SQL comments), runs quietly, and ends with a NOTICE
    saying what it did."""
    out.write(
        "".join(
            f"-- {_comment(line)}\n" if line else "--\n"
            for line in _header(plan, report, fire_triggers)
        )
    )
    for q in check_settings:  # the script's own, without the replication role (reads only)
        conn.execute(q)
    _refuse_user_code(user_code(conn, tables, not fire_triggers, trust_owners))
    out.write(
        "\\set ON_ERROR_STOP on\n"
        "\\set undo_quiet :QUIET\n"
        "\\set QUIET on\n"
        "SET application_name = 'undo';\nBEGIN;\n"
        # first in the transaction: no other schema's function or operator stands in for
        # pg_catalog's in anything the script runs (docs/security.md)
        f"{pg.PIN_PATH};\n"
    )
    checked = set(tables) - _cleared(conn, plan, tables)
    printer = _Printer(out, conn, db, report, on_conflict, checked)
    for q in settings_sql:
        printer.statement(q)
    printer.kept(_undoing(plan.target))
    printer.statement(sql.SQL(_FAIL_FUNCTION))
    try:
        guard = _user_code_guard(conn, tables, not fire_triggers, trust_owners)
        _run(printer, conn, db, plan, tables, fire_triggers, guard, None)
        printer.notice(plan)
    finally:
        conn.rollback()
    out.write("COMMIT;\nDO :'undo_notice';\n\\set QUIET :undo_quiet\n")
    for (table, op), n in plan.rows().items():  # the tables not staged for the check
        if not any(tables[r].version.qualified == table for r in checked):
            report.rows[table, op] = n


def _cleared(
    conn: psycopg.Connection[Any], plan: Plan, tables: dict[int, inverse.LiveTable]
) -> set[int]:
    """The tables whose undo a look at their rows' xmins clears of conflicts, without staging
    anything: one scan each. Every row the undone transactions left must still carry their xid
    (as many rows as their inserts and updates: a row changed since, gone, or written twice by
    them is missing from the count), and where rows go back, no row may have been written since
    by another transaction (a key back, an identical keyless row). Only where every transaction
    is known by its xid (``Plan.by_xmin``: no --only), the key has a unique index, and no
    foreign key touches the table (those are checked over the staged rows)."""
    row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()
    by_xmin = plan.by_xmin(int(row[0]) if row else 0)
    ops = plan.ops()
    out = set()
    for rel, lt in tables.items():
        txns = [
            t.id for t in plan.transactions if any((t.id, rel, o) in plan.counts for o in "IUD")
        ]
        if (lt.version.key is not None and not lt.unique_key) or not all(
            t in by_xmin for t in txns
        ):
            continue
        keys = conn.execute(
            "SELECT EXISTS (SELECT FROM pg_constraint WHERE contype = 'f'"
            " AND (conrelid = %s OR confrelid = %s))",
            (lt.version.oid, lt.version.oid),
        ).fetchone()
        if keys is None or keys[0]:
            continue
        xids = sql.Literal("{" + ",".join(str(by_xmin[t]) for t in sorted(txns)) + "}")
        ours, young = conn.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE t.xmin = ANY ({xids}::xid[])),"
                " coalesce(bool_or({since} AND NOT t.xmin = ANY ({xids}::xid[])), false)"
                " FROM ONLY {t} t"
            ).format(
                xids=xids,
                since=sql.SQL(inverse.WRITTEN_SINCE).format(
                    since=sql.SQL("(SELECT max(age(x)) FROM unnest({}::xid[]) x)").format(xids)
                ),
                t=lt.ident,
            )
        ).fetchone() or (0, True)
        left = sum(plan.counts.get((t, rel, o), 0) for t in txns for o in "IU")
        if ours == left and not (young and "D" in ops[rel]):
            out.add(rel)
    return out


def _changes_text(rows: Counter[tuple[str, str]]) -> str:
    """Changes per table in a few words.

    >>> _changes_text(Counter({("public.t", "D"): 316, ("public.t", "U"): 1156}))
    '316 delete(s), 1156 update(s) of public.t'
    """
    tables: dict[str, list[str]] = {}
    for (table, op), n in sorted(rows.items()):
        tables.setdefault(table, []).append(f"{n} {OP_NAMES[op]}(s)")
    return "; ".join(f"{', '.join(parts)} of {t}" for t, parts in tables.items())


def _header(plan: Plan, report: UndoReport, fire_triggers: bool) -> list[str]:
    """What the script does, for a reviewer: tables, operations, counts, what it checks."""
    rows = plan.rows()
    does = {"D": "inserts the rows back", "U": "sets the old values back", "I": "deletes the rows"}
    lines = [
        f"undo of {json.dumps(plan.target.describe())}: {len(plan.transactions)} transaction(s),"
        f" {sum(rows.values())} change(s)",
        "review it, then run it with: psql -v ON_ERROR_STOP=1 -f -",
        "",
        "what it undoes (changes selected from the audit store):",
    ]
    tables: dict[str, list[str]] = {}
    for (table, op), n in sorted(rows.items()):
        tables.setdefault(table, []).append(f"{n} {OP_NAMES[op]}(s): {does[op]}")
    lines += [f"  {t}: {'; '.join(parts)}" for t, parts in tables.items()]
    if rows_may_move(rows):
        lines.append(f"  ({ROWS_MOVE})")
    if report.not_undoable:
        lines.append("left out (--on-conflict skip), as it cannot be undone:")
        lines += [f"  {x}" for x in report.not_undoable]
    lines += [
        "",
        "what it checks, in one transaction (the first failure rolls everything back):",
        "  - none of these changes is undone already (undo.record_undo refuses them, and",
        "    records this undo in the ledger undo.ledger)",
        "  - each row is as the undone change left it: a row changed since is a conflict,",
        "    which stops the script with the rows named, nothing changed",
        "  - the foreign keys of the rows it writes back and of those it takes away"
        + (
            " (checked by PostgreSQL: --fire-triggers, user triggers fire)"
            if fire_triggers
            else " (user triggers stay quiet: session_replication_role = replica)"
        ),
        "",
        "then: settings, the changes staged by COPY (their data inline), one statement per",
        "table and operation; it runs quietly (\\set QUIET on) and ends with a NOTICE saying",
        "what it did (rows written per table).",
        "",
    ]
    return lines


def _comment(text: str) -> str:
    """Text for an SQL comment: whatever a name or a statement holds, nothing in it can end
    the comment (psql ends one at a newline or a carriage return) or hide a character.

    >>> _comment('t"\\nDROP TABLE x; --\\r\\u2028ü')
    't"\\\\u000aDROP TABLE x; --\\\\u000d\\\\u2028ü'
    """
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)
