"""Capture's writer into a PostgreSQL store: StoreWriter's methods and invariants, with COPY.

Invariant (as StoreWriter's): the source's position in ``meta`` is written in the same store
transaction as the changes it covers, and capture confirms only a position ``flush`` returned.

What differs is where the round trips go. A batch (up to BATCH_SECONDS / BATCH_CHANGES of
capture) is one store transaction, opened on the server only when something must be written:
changes, transactions, their per-table counts and statements are staged here and sent with one
COPY each when the batch is flushed, so that a source transaction costs no round trip of its
own. A transaction that grows past SPILL_CHANGES is written as it goes, after a SAVEPOINT, so
that its abort leaves nothing of it (StoreWriter takes a savepoint for every transaction; here
only such a one pays for it). Rare records (DDL, gaps, undo mirrors, malformed messages, guard
refusals, a new table version) are written at once in the batch's transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg

from undo.core.images import key_of_tokens
from undo.core.records import Begin, Change, Commit, Relation
from undo.core.times import epoch, iso
from undo.core.wal import lsn_to_int
from undo.store import _writer as sqlite_writer
from undo.store._writer import KEPT_BYTES, NULL, _full_xid, _minute
from undo.store.api import activity_session
from undo.store.postgres import _schema

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_FIELDS = 9  # values per staged change, as StoreWriter's (the C stage appends these)
#: a transaction still open with this many changes staged is written as it goes (bounded memory)
SPILL_CHANGES = 20_000
#: how often flush looks whether partitions ahead must be made
PARTITION_CHECK_SECONDS = 60.0
_COPY_CHANGES = (
    "COPY undo_store.changes (id, txn, ord, relation, op, key, old, new, unchanged, commit_time)"
    " FROM STDIN (FORMAT text, NULL '')"  # '' is StoreWriter's staged NULL, never a value
)
_COPY_TRANSACTIONS = (
    "COPY undo_store.transactions (id, source, xid, commit_lsn, end_lsn, commit_time,"
    " session_id, application_name, user_name, client_addr, client_port, backend_pid,"
    " backend_start, statement, tag, undo_of, inserts, updates, deletes, truncates,"
    " first_change, last_change, full_xid, tag_reason) FROM STDIN"
)
_INT64 = 1 << 63


def _text(v: Any) -> str | None:
    """A string from a message as PostgreSQL's text takes it: any role can emit a message
    holding U+0000, which text refuses (SQLite keeps it); never anything but a string or None.

    >>> _text("a\\x00b"), _text(3), _text(None)
    ('a\\ufffdb', None, None)
    """
    if type(v) is not str:
        return None
    return v.replace("\x00", "\ufffd") if "\x00" in v else v


def _time(v: Any) -> str:
    """A time a message claims, as the store's time text; now when it is not one."""
    if type(v) is str:
        try:
            t = datetime.fromisoformat(v.replace("Z", "+00:00"))
            return iso(t if t.tzinfo else t.replace(tzinfo=UTC))
        except ValueError:
            pass
    return iso(datetime.now(UTC))


def _int(v: Any) -> int | None:
    """An integer from a message, None when it is none a bigint holds."""
    return v if type(v) is int and -_INT64 <= v < _INT64 else None


class _Txn(sqlite_writer._Txn):
    __slots__ = ("commit_time", "gaps", "oids", "saved", "start")

    def __init__(self, txn_id: int, xid: int, first_change: int, commit_lsn: int, at: str) -> None:
        super().__init__(txn_id, xid, first_change, commit_lsn)
        self.commit_time = at
        self.start = 0  # where its changes start in the writer's rows
        self.saved = False  # a SAVEPOINT taken: part of it was written before its commit
        self.gaps: list[tuple[str, str]] = []  # (table, reason) met while it was read
        self.oids: list[tuple[int, int | None]] = []  # relation_oid corrections


class PgStoreWriter:
    """Batches source transactions into PostgreSQL transactions of the store, for one source."""

    def __init__(self, conn: psycopg.Connection[Any], source: int) -> None:
        self.conn = conn
        self.db = conn
        self.source = source
        base = _schema.id_base(conn, source)
        self.id_limit = base + _schema.ID_SPAN
        self.position = int(_schema.get_meta(conn, source, "position") or 0)
        self.next_txn = self._max_id("transactions", base) + 1
        self.next_change = self._max_id("changes", base) + 1
        self.rows: list[Any] = []  # staged changes, _FIELDS values each (the C stage's list)
        #: (index in rows, commit time) where each transaction's staged changes start
        self.segments: list[tuple[int, str]] = []
        self.txn_rows: list[tuple[Any, ...]] = []
        self.count_rows: list[tuple[Any, ...]] = []
        self.statement_rows: list[tuple[Any, ...]] = []
        self.batch_open = False
        self.in_server = False  # the batch's transaction begun on the server
        self.batch_started = 0.0
        self.batch_changes = 0
        self.batch_position = self.position
        self.txn: _Txn | None = None
        self.oldest_unstored: str | None = None
        self.pending_since: str | None = None
        self.activity: dict[tuple[int, str, str, int], list[int]] = {}
        self.covered: list[tuple[str, str]] = []
        self.partitions_checked = 0.0
        self._ensure_partitions(datetime.now(UTC))

    def _max_id(self, table: str, base: int) -> int:
        from psycopg import sql

        row = self.conn.execute(
            sql.SQL("SELECT max(id) FROM {} WHERE id > %s AND id <= %s").format(
                sql.Identifier(_schema.SCHEMA, table)
            ),
            (base, self.id_limit),
        ).fetchone()
        return base if row is None or row[0] is None else int(row[0])

    # -- partitions --------------------------------------------------------------------------
    def _ensure_partitions(self, *times: datetime) -> None:
        parts = _schema.ensure_partitions(self.conn, *times)
        self.covered = [(iso(lo), iso(hi)) for lo, hi in parts]
        self.partitions_checked = time.monotonic()

    def _is_covered(self, commit_time: str) -> bool:
        return any(lo <= commit_time < hi for lo, hi in self.covered)  # the times sort as text

    # -- relations ---------------------------------------------------------------------------
    def relation_id(self, rel: Relation, key: tuple[int, ...] | None, partial: bool) -> int:
        """The store's id for this table version, inserting it the first time it is seen."""
        values = (
            self.source,
            rel.oid,
            rel.schema,
            rel.name,
            _dumps(list(rel.columns)),
            _dumps(list(rel.types or ())),
            None if key is None else _dumps(list(key)),
            bool(partial),
            *(rel.root or (None, None)),
        )
        row = self.conn.execute(
            "SELECT id FROM undo_store.relations WHERE source = %s"
            " AND oid IS NOT DISTINCT FROM %s AND schema_name = %s AND table_name = %s"
            " AND columns = %s::jsonb AND types = %s::jsonb"
            " AND key_columns IS NOT DISTINCT FROM %s::jsonb AND partial = %s"
            " AND root_schema IS NOT DISTINCT FROM %s AND root_table IS NOT DISTINCT FROM %s"
            " ORDER BY id LIMIT 1",
            values,
        ).fetchone()
        if row is not None:
            return int(row[0])
        self._open_batch()
        self._begin_server()
        (rid,) = self.conn.execute(
            "INSERT INTO undo_store.relations (source, oid, schema_name, table_name, columns,"
            " types, key_columns, partial, root_schema, root_table)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            values,
        ).fetchone() or (0,)
        return int(rid)

    # -- transactions ------------------------------------------------------------------------
    def _open_batch(self) -> None:
        if not self.batch_open:
            self.batch_open = True
            self.batch_started = time.monotonic()
            self.batch_changes = 0

    def _begin_server(self) -> None:
        if not self.in_server:
            self.conn.execute("BEGIN")
            self.in_server = True

    def already_stored(self, begin: Begin) -> bool:
        return begin.commit_lsn < self.position

    def begin(self, begin: Begin) -> None:
        if not self._is_covered(begin.commit_time):
            # a partition is made outside any batch (it waits for nobody's transaction)
            if self.batch_open:
                self.flush()
            self._ensure_partitions(datetime.fromisoformat(begin.commit_time))
        if self.pending_since is None and self.oldest_unstored is None:
            self._mark_pending(begin.commit_time)
        self._open_batch()
        txn = self.txn = _Txn(
            self.next_txn, begin.xid, self.next_change, begin.commit_lsn, begin.commit_time
        )
        txn.start = len(self.rows)
        self.segments.append((txn.start, begin.commit_time))

    def _mark_pending(self, commit_time: str) -> None:
        if self.batch_open:
            self.flush()
        self.pending_since = commit_time
        _schema.set_meta(
            self.conn,
            self.source,
            "capture_lag",
            json.dumps({"at": time.time(), "lag_seconds": None, "pending_since": commit_time}),
        )

    def add(self, ch: Change, rel_id: int, key_positions: tuple[int, ...] | None) -> None:
        """Stage one change, as StoreWriter.add does (the C stage appends the same values)."""
        txn = self.txn
        assert txn is not None
        src = ch.old if ch.op == "D" else ch.new
        key = NULL if key_positions is None or src is None else key_of_tokens(src, key_positions)
        txn.ord += 1
        txn.counts[rel_id, ch.op] += 1
        if ch.old is None and ch.op != "I":
            txn.without_old[rel_id, ch.op] += 1
        rows = self.rows
        rows += (
            self.next_change,
            txn.id,
            txn.ord,
            rel_id,
            ch.op,
            key,
            NULL if ch.old is None else "[" + ",".join(ch.old) + "]",
            NULL if ch.new is None else "[" + ",".join(ch.new) + "]",
            NULL if ch.unchanged is None else _dumps(ch.unchanged),
        )
        self.next_change += 1
        if len(rows) - txn.start >= SPILL_CHANGES * _FIELDS:
            self._spill()

    def add_staged(self) -> None:
        """Count one change the C stage appended to ``rows``."""
        txn = self.txn
        assert txn is not None
        txn.ord += 1
        self.next_change += 1
        if len(self.rows) - txn.start >= SPILL_CHANGES * _FIELDS:
            self._spill()

    def add_truncate(self, rel_id: int) -> None:
        txn = self.txn
        assert txn is not None
        txn.ord += 1
        txn.counts[rel_id, "T"] += 1
        self.rows += (self.next_change, txn.id, txn.ord, rel_id, "T", NULL, NULL, NULL, NULL)
        self.next_change += 1

    @property
    def txn_xid(self) -> int:
        assert self.txn is not None
        return self.txn.xid

    set_tag = sqlite_writer.StoreWriter.set_tag
    add_statement = sqlite_writer.StoreWriter.add_statement
    add_ddl = sqlite_writer.StoreWriter.add_ddl
    set_ledger = sqlite_writer.StoreWriter.set_ledger

    @property
    def unstored_since(self) -> str | None:
        """The commit time of the oldest transaction not yet stored that this writer has seen."""
        times = [t for t in (self.pending_since, self.oldest_unstored) if t is not None]
        return min(times, key=epoch) if times else None

    def _spill(self) -> None:
        """Write what is staged of a transaction that grew large, after a savepoint."""
        txn = self.txn
        assert txn is not None
        self._begin_server()
        if not txn.saved:
            self._copy_changes(txn.start)  # the transactions before it: not in the savepoint
            self.conn.execute("SAVEPOINT txn")
            txn.saved = True
        self._copy_changes(len(self.rows))
        self.segments.append((0, txn.commit_time))
        txn.start = 0

    def _copy_changes(self, end: int) -> None:
        """COPY the staged changes before ``end`` (a transaction's start, or all of them) and
        drop them from the stage. One format operation per transaction's run of rows: the
        values are ints, op letters and JSON text (control characters escaped), so COPY's text
        format needs only its backslashes doubled."""
        rows, segments = self.rows, self.segments
        if end:
            with self.conn.cursor().copy(_COPY_CHANGES) as cp:
                bounds = [s[0] for s in segments[1:]] + [len(rows)]
                for (start, at), stop in zip(segments, bounds, strict=True):
                    stop = min(stop, end)
                    if stop <= start:
                        continue
                    line = "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t" + at + "\n"
                    text = (line * ((stop - start) // _FIELDS)) % tuple(rows[start:stop])
                    cp.write(text.replace("\\", "\\\\"))
            del rows[:end]
        self.segments = [(s - end, at) for s, at in segments if s >= end]

    def commit(self, commit: Commit) -> bool:
        """Stage the transaction row. Returns False (and keeps nothing) if it had no change."""
        txn = self.txn
        assert txn is not None
        self.txn = None
        if self.oldest_unstored is None:
            self.oldest_unstored = commit.commit_time
        if txn.ledger or txn.ddl or txn.malformed or txn.gaps or txn.oids:
            self._rare(txn, commit)
        if txn.saved:
            self.conn.execute("RELEASE txn")
        if txn.ord == 0:
            if self.segments and self.segments[-1][0] == len(self.rows):
                self.segments.pop()
            self.batch_position = max(self.batch_position, commit.end_lsn)
            return False
        tag: dict[str, Any] = txn.tag or {}
        trusted = txn.trusted
        tag_kind = "none" if trusted is None else ("trusted" if trusted else "untrusted")
        session: dict[str, Any] = tag.get("session") or {}
        per_table: dict[int, dict[str, int]] = {}
        totals = {"I": 0, "U": 0, "D": 0, "T": 0}
        for (rel_id, op), n in txn.counts.items():
            per_table.setdefault(rel_id, {"I": 0, "U": 0, "D": 0, "T": 0})[op] += n
            totals[op] += n
        session_id = _text(session.get("session_id"))
        app = _text(tag.get("application_name"))
        self.txn_rows.append(
            (
                txn.id,
                self.source,
                txn.xid,
                commit.commit_lsn,
                commit.end_lsn,
                txn.commit_time,  # the Begin's: its changes' partition key (the Commit's too)
                session_id,
                app,
                _text(session.get("user")),
                _text(session.get("client_addr")),
                _int(session.get("client_port")),
                _int(session.get("pid")),
                _text(session.get("backend_start")),
                _text(tag.get("statement")),
                tag_kind,
                None if tag.get("undo") is None else _text(_dumps(tag["undo"])),
                totals["I"],
                totals["U"],
                totals["D"],
                totals["T"],
                txn.first_change,
                self.next_change - 1,
                _int(_full_xid(tag, txn.xid)) if trusted else None,
                "missing" if trusted is None else txn.reason,
            )
        )
        if trusted and txn.statements:
            current = tag.get("statement")
            for ord_, statement in txn.statements:
                if ord_ > txn.ord:
                    break
                if statement != current:
                    self.statement_rows.append((txn.id, ord_, _text(statement)))
                    current = statement
        self.count_rows += [
            (txn.id, rel_id, op, n, txn.without_old.get((rel_id, op), 0))
            for (rel_id, op), n in txn.counts.items()
        ]
        if sqlite_writer.AGGREGATES:
            minute = _minute(commit.commit_time)
            sid = activity_session(session_id, tag_kind)
            for i, (rel_id, c) in enumerate(per_table.items()):
                acc = self.activity.get((minute, app or "", sid, rel_id))
                if acc is None:
                    acc = self.activity[minute, app or "", sid, rel_id] = [0, 0, 0, 0, 0]
                acc[0] += c["I"]
                acc[1] += c["U"]
                acc[2] += c["D"]
                acc[3] += c["T"]
                acc[4] += i == 0
        self.next_txn += 1
        self.batch_changes += txn.ord
        self.batch_position = max(self.batch_position, commit.end_lsn)
        return True

    def abort(self) -> None:
        """Forget the transaction in progress (the server sends it again)."""
        txn = self.txn
        if txn is not None:
            if txn.saved:
                self.conn.execute("ROLLBACK TO txn")
                self.conn.execute("RELEASE txn")
            del self.rows[txn.start :]
            self.segments = [s for s in self.segments if s[0] < txn.start]
            self.txn = None

    def advance(self, lsn: int) -> None:
        if self.txn is None and lsn > self.batch_position:
            self._open_batch()
            self.batch_position = lsn

    def _push(self) -> None:
        """Write what is staged of complete transactions into the batch's transaction."""
        self._begin_server()
        self._copy_changes(len(self.rows) if self.txn is None else self.txn.start)
        cur = self.conn.cursor()
        if self.txn_rows:
            with cur.copy(_COPY_TRANSACTIONS) as cp:
                for row in self.txn_rows:
                    cp.write_row(row)
            self.txn_rows.clear()
        if self.count_rows:
            with cur.copy(
                "COPY undo_store.txn_changes (txn, relation, op, n, without_old) FROM STDIN"
            ) as cp:
                for row in self.count_rows:
                    cp.write_row(row)
            self.count_rows.clear()
        if self.statement_rows:
            with cur.copy(
                "COPY undo_store.statements (txn, first_ord, statement) FROM STDIN"
            ) as cp:
                for row in self.statement_rows:
                    cp.write_row(row)
            self.statement_rows.clear()

    def flush(self) -> int:
        """Commit the batch with its position; return the position now durable."""
        assert self.txn is None, "flush inside a source transaction"
        if self.batch_open:
            self._push()
            if self.activity:
                self.conn.cursor().executemany(
                    "INSERT INTO undo_store.activity (minute, application_name, session_id,"
                    " relation, inserts, updates, deletes, truncates, transactions)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (minute, application_name, session_id, relation) DO UPDATE SET"
                    " inserts = activity.inserts + excluded.inserts,"
                    " updates = activity.updates + excluded.updates,"
                    " deletes = activity.deletes + excluded.deletes,"
                    " truncates = activity.truncates + excluded.truncates,"
                    " transactions = activity.transactions + excluded.transactions",
                    [(*k, *v) for k, v in self.activity.items()],
                )
                self.activity.clear()
            if self.batch_position != self.position:
                _schema.set_meta(self.conn, self.source, "position", str(self.batch_position))
            now = time.time()
            oldest = self.unstored_since
            lag = 0.0 if oldest is None else now - epoch(oldest)
            _schema.set_meta(
                self.conn,
                self.source,
                "capture_lag",
                json.dumps({"at": now, "lag_seconds": round(max(0.0, lag), 3)}),
            )
            self.oldest_unstored = self.pending_since = None
            self.conn.execute("COMMIT")
            self.in_server = False
            self.batch_open = False
            self.position = self.batch_position
        if time.monotonic() - self.partitions_checked > PARTITION_CHECK_SECONDS:
            self._ensure_partitions(datetime.now(UTC))
        return self.position

    # -- rare records, written at once in the batch's transaction ----------------------------
    def _rare(self, txn: _Txn, commit: Commit) -> None:
        self._push()  # the undo mirror looks up transactions staged before it
        for rel_id, oid in txn.oids:
            self._relation_oid(rel_id, oid)
        for table, reason in txn.gaps:
            lsn = txn.commit_lsn
            self._table_gap(table, reason, iso(datetime.now(UTC)), lsn, lsn, None, txn.xid)
        if txn.ledger:
            self._write_ledger(txn, commit)
        if txn.ddl:
            self._write_ddl(txn, commit)
        for m in txn.malformed:
            self._write_malformed(txn.xid, commit.commit_time, *m)

    def _write_ddl(self, txn: _Txn, commit: Commit) -> None:
        for doc, why, problems in txn.ddl:
            session: dict[str, Any] = doc.get("session") or {}
            who = (
                self.source,
                commit.commit_lsn,
                commit.commit_time,
                txn.xid,
                _text(session.get("session_id")),
                _text(doc.get("application_name")),
                _text(session.get("user")),
                _text(doc.get("statement")),
            )
            tag = ("trusted" if why is None else "untrusted", why)
            commands = doc.get("ddl") or []
            if why is not None and not commands:
                commands = [{"command": "(a DDL record undo did not make)"}]
            for cmd in commands:
                if isinstance(cmd, dict):
                    self.conn.execute(
                        "INSERT INTO undo_store.ddl (source, commit_lsn, commit_time, xid,"
                        " session_id, application_name, user_name, statement, command,"
                        " object_type, object, tag, tag_reason)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (
                            *who,
                            _text(cmd.get("command")) or "",
                            _text(cmd.get("object_type")),
                            _text(cmd.get("object")),
                            *tag,
                        ),
                    )
            if why is None:
                for state in doc.get("state") or []:
                    if isinstance(state, dict):
                        self._table_state(state, txn, commit, _text(session.get("session_id")))
            for table, problem in problems:
                self._open_gap(table, problem, txn, commit, None)

    def _table_state(
        self, state: dict[str, Any], txn: _Txn, commit: Commit, session_id: str | None
    ) -> None:
        table, problems = _text(state.get("table")), state.get("problems") or []
        if not state.get("rewrite"):
            self.conn.execute(
                "UPDATE undo_store.gaps SET to_lsn = %s WHERE source = %s AND kind = 'table'"
                " AND table_name = %s AND to_lsn IS NULL AND reason <> ALL(%s)",
                (
                    commit.commit_lsn,
                    self.source,
                    table,
                    [_text(p) for p in problems if isinstance(p, str)],
                ),
            )
        for problem in problems:
            self._open_gap(table, problem, txn, commit, session_id, bool(state.get("rewrite")))

    def _open_gap(
        self,
        table: str | None,
        problem: Any,
        txn: _Txn,
        commit: Commit,
        session_id: str | None,
        point: bool = False,
    ) -> None:
        problem = _text(problem) or ""
        if not self.conn.execute(
            "SELECT 1 FROM undo_store.gaps WHERE source = %s AND kind = 'table'"
            " AND table_name = %s AND reason = %s AND to_lsn IS NULL",
            (self.source, table, problem),
        ).fetchone():
            at, lsn = commit.commit_time, commit.commit_lsn
            self._table_gap(table, problem, at, lsn, lsn if point else None, session_id, txn.xid)

    def _table_gap(
        self,
        table: str | None,
        reason: str,
        at: str,
        from_lsn: int,
        to_lsn: int | None,
        session_id: str | None,
        xid: int,
    ) -> None:
        self.conn.execute(
            "INSERT INTO undo_store.gaps (source, detected_at, from_lsn, to_lsn, reason, kind,"
            " table_name, session_id, xid) VALUES (%s, %s, %s, %s, %s, 'table', %s, %s, %s)",
            (self.source, at, from_lsn, to_lsn, _text(reason), _text(table), session_id, xid),
        )

    def _write_ledger(self, txn: _Txn, commit: Commit) -> None:
        for doc, content, why in txn.ledger:
            entries = doc["entries"] if doc is not None else []
            lsns = sorted({lsn_to_int(e[0]) for e in entries})
            ids = [
                r[0]
                for r in self.conn.execute(
                    "SELECT id FROM undo_store.transactions WHERE source = %s"
                    " AND commit_lsn = ANY(%s)",
                    (self.source, lsns),
                )
            ]
            self.conn.execute(
                "INSERT INTO undo_store.undos (source, applied_at, target, selection, undo_xid,"
                " entries, tag, tag_reason, message) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    self.source,
                    commit.commit_time,
                    _text(doc["target"]) if doc is not None else "null",
                    _dumps(sorted(ids)),
                    txn.xid,
                    _text(_dumps(entries)) if doc is not None else None,
                    "trusted" if why is None else "untrusted",
                    why,
                    None if why is None else _text(content.decode("utf-8", "replace")),
                ),
            )

    def add_malformed(
        self, lsn: int, prefix: str, session_id: str | None, problem: str, content: bytes
    ) -> None:
        if self.txn is not None:
            self.txn.malformed.append((lsn, prefix, session_id, problem, content))
        else:
            self._open_batch()
            self._begin_server()
            self._write_malformed(
                None, iso(datetime.now(UTC)), lsn, prefix, session_id, problem, content
            )

    def _write_malformed(
        self,
        xid: int | None,
        at: str,
        lsn: int,
        prefix: str,
        session_id: str | None,
        problem: str,
        content: bytes,
    ) -> None:
        self.conn.execute(
            "INSERT INTO undo_store.malformed (source, lsn, prefix, received_at, xid,"
            " session_id, problem, size, content) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (source, lsn, prefix) DO NOTHING",
            (
                self.source,
                lsn,
                _text(prefix),
                at,
                xid,
                _text(session_id),
                _text(problem),
                len(content),
                content[:KEPT_BYTES],
            ),
        )

    def relation_oid(self, rel_id: int, oid: int | None) -> None:
        """Correct the OID a table version was recorded under: with the transaction that
        taught it (kept or lost with it, as StoreWriter's savepoint does)."""
        if self.txn is not None:
            self.txn.oids.append((rel_id, oid))
        else:
            self._open_batch()
            self._begin_server()
            self._relation_oid(rel_id, oid)

    def _relation_oid(self, rel_id: int, oid: int | None) -> None:
        self.conn.execute("UPDATE undo_store.relations SET oid = %s WHERE id = %s", (oid, rel_id))

    def add_gap(self, table: str, reason: str) -> None:
        txn = self.txn
        assert txn is not None
        txn.gaps.append((table, reason))

    def add_refusal(self, lsn: int, tag: dict[str, Any], untrusted: str | None) -> None:
        self._open_batch()
        self._begin_server()
        session: dict[str, Any] = tag.get("session") or {}
        nonce = _text(tag.get("nonce"))
        if untrusted is None and (
            nonce is None
            or self.conn.execute(
                "SELECT 1 FROM undo_store.guard_refusals WHERE source = %s AND nonce = %s"
                " AND tag = 'trusted' AND lsn <> %s",
                (self.source, nonce, lsn),
            ).fetchone()
        ):
            untrusted = "replayed"
        self.conn.execute(
            "INSERT INTO undo_store.guard_refusals (source, lsn, refused_at, guard, reason,"
            " session_id, application_name, user_name, client_addr, backend_pid, statement,"
            " tag, tag_reason, nonce)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (source, lsn) DO NOTHING",
            (
                self.source,
                lsn,
                _time(tag.get("at")),
                _text(tag.get("guard")),
                _text(tag.get("reason")),
                _text(session.get("session_id")),
                _text(tag.get("application_name")),
                _text(session.get("user")),
                _text(session.get("client_addr")),
                _int(session.get("pid")),
                _text(tag.get("statement")),
                "trusted" if untrusted is None else "untrusted",
                untrusted,
                nonce,
            ),
        )


def record_gap(
    conn: psycopg.Connection[Any],
    source: int,
    from_lsn: int | None,
    to_lsn: int | None,
    reason: str,
) -> None:
    """Record a stretch of the source's history that the audit trail does not hold."""
    conn.execute(
        "INSERT INTO undo_store.gaps (source, detected_at, from_lsn, to_lsn, reason)"
        " VALUES (%s, now(), %s, %s, %s)",
        (source, from_lsn, to_lsn, reason),
    )


__all__: Sequence[str] = ("PgStoreWriter", "record_gap")
