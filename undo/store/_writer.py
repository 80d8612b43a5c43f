"""Writes captured transactions into the store, in batches, idempotently.

Invariant: ``position`` (meta 'position') is the LSN up to which everything committed on the
source is in the store, and it is written in the same SQLite transaction as the changes it
covers. Capture confirms to the server only a position this writer has committed. Each source
transaction sits in a savepoint, so a stop in the middle of one leaves no part of it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlite_utils import Database

from undo.core.images import key_of_tokens
from undo.core.records import Begin, Change, Commit, Relation
from undo.core.times import epoch, iso
from undo.core.wal import is_xid_of, lsn_to_int
from undo.store._schema import get_source_meta
from undo.store.api import activity_session

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
#: Keep the activity aggregates. Only bench/serve turns this off, to measure what they cost.
AGGREGATES = True

#: how much of a malformed message the store keeps (its size is kept whole)
KEPT_BYTES = 4096
_FIELDS = 9  # values per row of changes, staged flat: one list, not a tuple per change
#: key, old, new and unchanged are staged as '' for NULL (never a value: they are JSON arrays).
#: Python's sqlite3 binds None through the adapter protocol, two failed attribute lookups per
#: value: a 250-row INSERT took 0.3 µs a row more with the two NULLs an insert or delete has.
NULL = ""
_ROW = "(?, ?, ?, ?, ?, nullif(?, ''), nullif(?, ''), nullif(?, ''), nullif(?, ''))"
_INSERT_CHANGES = (
    "INSERT INTO changes (id, txn, ord, relation, op, key, old, new, unchanged) VALUES "  # noqa: S608
    + _ROW  # constant text
)
#: Changes per multi-row INSERT. One statement of 250 rows costs SQLite about 0.6 µs a row less
#: than executemany of the same rows (2.5 -> 1.9 µs, staging included, measured on its own;
#: bench/capture: +8% changes/s): one step instead of a reset, a bind and a step per row.
#: Larger chunks gave no more.
_CHUNK = 250
_INSERT_CHUNK = _INSERT_CHANGES + (", " + _ROW) * (_CHUNK - 1)


def _minute(iso_time: str) -> int:
    """'2026-01-19T10:25:31.000000Z' -> Unix time of 10:25:00 UTC.

    >>> _minute("1970-01-01T00:01:59.999999Z")
    60
    """
    return int(epoch(iso_time)) // 60 * 60


class _Txn:
    """The source transaction being written."""

    __slots__ = (
        "commit_lsn",
        "counts",
        "ddl",
        "first_change",
        "id",
        "ledger",
        "malformed",
        "ord",
        "reason",
        "statements",
        "tag",
        "trusted",
        "without_old",
        "xid",
    )

    def __init__(self, txn_id: int, xid: int, first_change: int, commit_lsn: int = 0) -> None:
        self.id = txn_id
        self.commit_lsn = commit_lsn
        self.first_change = first_change
        self.xid = xid
        self.ord = 0
        self.counts: defaultdict[tuple[int, str], int] = defaultdict(int)
        #: updates and deletes that came without a full old row (no REPLICA IDENTITY FULL)
        self.without_old: defaultdict[tuple[int, str], int] = defaultdict(int)
        self.tag: dict[str, Any] | None = None
        self.trusted: bool | None = None
        self.reason: str | None = None  # why the tag is not trusted
        #: undo.ledger messages (undo.record_undo's signed mirror): (what could be read of it,
        #: the message, why untrusted or None)
        self.ledger: list[tuple[dict[str, Any] | None, bytes, str | None]] = []
        #: DDL messages (undo.on_ddl): (message, why untrusted or None, what the catalog says
        #: is wrong with the audited tables when capture read it: (table, problem))
        self.ddl: list[tuple[dict[str, Any], str | None, list[tuple[str, str]]]] = []
        #: undo's messages in it that were not what undo's SQL writes: (lsn, prefix, session
        #: id claimed, what was wrong, content)
        self.malformed: list[tuple[int, str, str | None, str, bytes]] = []
        #: the statements of its changes, in order: [ord of the first change it made, text]
        #: (markers and trusted tags; kept only if the transaction's tag is trusted)
        self.statements: list[list[Any]] = []


class StoreWriter:
    """Batches source transactions into SQLite transactions."""

    def __init__(self, db: Database, source: int, lock: Callable[[], None] | None = None) -> None:
        self.db = db
        self.source = source
        #: called before the first write (the store's one-writer lock), then forgotten
        self.lock = lock
        self.conn: sqlite3.Connection = db.conn
        # A batch dirties more pages than SQLite's default 2 MB cache holds; spilling them to
        # the WAL mid-transaction made each insert cost 40% more on random keys (bench/capture).
        self.conn.execute("PRAGMA cache_size = -65536")
        self.position = int(get_source_meta(db, source, "position") or 0)
        self.next_txn = (
            self.conn.execute("SELECT max(id) FROM transactions").fetchone()[0] or 0
        ) + 1
        self.next_change = (self.conn.execute("SELECT max(id) FROM changes").fetchone()[0] or 0) + 1
        self.rows: list[Any] = []  # staged changes, _FIELDS values each
        self.batch_open = False
        self.batch_started = 0.0
        self.batch_changes = 0
        self.batch_position = self.position
        self.txn: _Txn | None = None
        #: commit time of the batch's first transaction: the oldest commit not yet stored
        self.oldest_unstored: str | None = None
        #: the same, known from its Begin and committed to meta at once (``_mark_pending``), so
        #: that `status` sees a transaction that takes seconds to write before its batch commits
        self.pending_since: str | None = None
        # per (minute, application, session, relation): inserts, updates, deletes, truncates,
        # transactions of the batch, written with it (one upsert per key, not per transaction)
        self.activity: dict[tuple[int, str, str, int], list[int]] = {}

    # -- relations ---------------------------------------------------------------------------
    def relation_id(self, rel: Relation, key: tuple[int, ...] | None, partial: bool) -> int:
        """The store's id for this table version, inserting it the first time it is seen."""
        values = (
            rel.oid,
            rel.schema,
            rel.name,
            _dumps(list(rel.columns)),
            _dumps(list(rel.types or ())),
            None if key is None else _dumps(list(key)),
            int(partial),
            *(rel.root or (None, None)),
        )
        row = self.conn.execute(
            "SELECT id FROM relations WHERE oid IS ? AND schema_name = ? AND table_name = ?"
            " AND columns = ? AND types = ? AND key_columns IS ? AND partial = ?"
            " AND root_schema IS ? AND root_table IS ? AND source = ?",
            (*values, self.source),
        ).fetchone()
        if row is not None:
            return int(row[0])
        self._open_batch()
        cur = self.conn.execute(
            "INSERT INTO relations (oid, schema_name, table_name, columns, types, key_columns,"
            " partial, root_schema, root_table, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*values, self.source),
        )
        return int(cur.lastrowid or 0)

    # -- transactions ------------------------------------------------------------------------
    def _open_batch(self) -> None:
        if self.lock is not None:
            self.lock()
            self.lock = None
        if not self.batch_open:
            self.conn.execute("BEGIN")
            self.batch_open = True
            self.batch_started = time.monotonic()
            self.batch_changes = 0

    def already_stored(self, begin: Begin) -> bool:
        """A transaction whose commit record lies before the stored position is in the store."""
        return begin.commit_lsn < self.position

    def begin(self, begin: Begin) -> None:
        if self.pending_since is None and self.oldest_unstored is None:
            self._mark_pending(begin.commit_time)
        self._open_batch()
        self.conn.execute("SAVEPOINT txn")
        self.txn = _Txn(self.next_txn, begin.xid, self.next_change, begin.commit_lsn)

    def _mark_pending(self, commit_time: str) -> None:
        """Say in meta 'capture_lag', in a commit of its own before the batch opens, since when
        a commit waits to be stored: the first transaction of a batch is being written. One
        small write per batch (never per change); a batch open without a transaction (a
        position moved on) is committed first, as flush would."""
        if self.batch_open:
            self.flush()
        if self.lock is not None:
            self.lock()
            self.lock = None
        self.pending_since = commit_time
        self.conn.execute(
            "INSERT INTO source_meta (source, key, value) VALUES (?, 'capture_lag', ?)"
            " ON CONFLICT (source, key) DO UPDATE SET value = excluded.value",
            (
                self.source,
                json.dumps({"at": time.time(), "lag_seconds": None, "pending_since": commit_time}),
            ),
        )

    def add(self, ch: Change, rel_id: int, key_positions: tuple[int, ...] | None) -> None:
        """Stage one change; images are JSON tokens (records.py), joined here, not re-encoded.
        Its key: the new row's values at ``key_positions``, the old row's for a delete.

        Capture's hot path without the C module (whose stage does the same): keep it to nine
        values on one list and two counters.
        """
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
            NULL if ch.old is None else "[" + ",".join(ch.old) + "]",  # tokens: no re-encoding
            NULL if ch.new is None else "[" + ",".join(ch.new) + "]",
            NULL if ch.unchanged is None else _dumps(ch.unchanged),
        )
        self.next_change += 1
        if len(rows) >= _CHUNK * _FIELDS:
            self._write_rows()

    def add_staged(self) -> None:
        """Count one change the C stage appended to ``rows`` (the values ``add`` would have:
        change id ``next_change``, ord ``txn.ord + 1``)."""
        txn = self.txn
        assert txn is not None
        txn.ord += 1
        self.next_change += 1
        if len(self.rows) >= _CHUNK * _FIELDS:
            self._write_rows()

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

    def set_tag(self, tag: dict[str, Any], untrusted: str | None) -> None:
        """Attach the tag (``untrusted``: why it is not trusted); a trusted tag is never
        replaced by an untrusted one."""
        txn = self.txn
        assert txn is not None
        if txn.tag is None or not txn.trusted:
            txn.tag, txn.trusted, txn.reason = tag, untrusted is None, untrusted
        if untrusted is None:  # a statement of its own, like a marker
            self.add_statement(tag.get("statement"))

    def add_statement(self, statement: str | None) -> None:
        """The statement of the transaction's changes from here on (a marker, undo.stmt)."""
        txn = self.txn
        assert txn is not None
        marks = txn.statements
        if marks and marks[-1][0] == txn.ord + 1:  # the one before made no change
            marks[-1][1] = statement
        else:
            marks.append([txn.ord + 1, statement])

    def _write_statements(self, txn: _Txn, first: str | None) -> None:
        """Where the statement of a trusted transaction's changes is not its first one
        (``first``, in transactions.statement): one row from each change that starts another."""
        rows, current = [], first
        for ord_, statement in txn.statements:
            if ord_ > txn.ord:
                break  # no change after it
            if statement != current:
                rows.append((txn.id, ord_, statement))
                current = statement
        if rows:
            self.conn.executemany(
                "INSERT INTO statements (txn, first_ord, statement) VALUES (?, ?, ?)", rows
            )

    def add_ddl(
        self, doc: dict[str, Any], untrusted: str | None, problems: Sequence[tuple[str, str]] = ()
    ) -> None:
        """DDL the transaction ran on audited schemas (undo.on_ddl's message), and the problems
        the source's catalog showed when capture read it (each opens a gap, whatever the
        message says)."""
        txn = self.txn
        assert txn is not None
        txn.ddl.append((doc, untrusted, list(problems)))

    def _write_ddl(self, txn: _Txn, commit: Commit) -> None:
        """The transaction's DDL, and the gaps it opened or closed: a table capture is
        incomplete for (undo.table_problems: unlogged, replica identity not full, tag trigger
        not undo's, a table under it not audited) is an open gap until DDL leaves it without
        that problem; a rewrite is a gap of its own. A trusted record's states open and close
        gaps; the catalog's problems open them (never close: they are seen when capture reads
        the record, maybe long after it)."""
        for doc, why, problems in txn.ddl:
            session: dict[str, Any] = doc.get("session") or {}
            who = (
                commit.commit_lsn,
                commit.commit_time,
                txn.xid,
                session.get("session_id"),
                doc.get("application_name"),
                session.get("user"),
                doc.get("statement"),
            )
            tag = ("trusted" if why is None else "untrusted", why)
            commands = doc.get("ddl") or []
            if why is not None and not commands:  # kept all the same: someone sent it
                commands = [{"command": "(a DDL record undo did not make)"}]
            for cmd in commands:
                if isinstance(cmd, dict):
                    self.conn.execute(
                        "INSERT INTO ddl (commit_lsn, commit_time, xid, session_id,"
                        " application_name, user_name, statement, command, object_type, object,"
                        " tag, tag_reason, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            *who,
                            cmd.get("command") or "",
                            cmd.get("object_type"),
                            cmd.get("object"),
                            *tag,
                            self.source,
                        ),
                    )
            if why is None:  # only a trusted record's state: a forged one must not close gaps
                for state in doc.get("state") or []:
                    if isinstance(state, dict):
                        self._table_state(state, txn, commit, session.get("session_id"))
            for table, problem in problems:
                self._open_gap(table, problem, txn, commit, None)

    def _table_state(
        self, state: dict[str, Any], txn: _Txn, commit: Commit, session_id: str | None
    ) -> None:
        """One table's state after the DDL: its problems open gaps (one per problem, unless
        open already; a rewrite's closes at once); an open gap whose problem it no longer has
        is closed."""
        table, problems = state.get("table"), state.get("problems") or []
        if not state.get("rewrite"):
            self.conn.execute(
                "UPDATE gaps SET to_lsn = ? WHERE kind = 'table' AND table_name = ?"
                " AND to_lsn IS NULL AND reason NOT IN (SELECT value FROM json_each(?))"
                " AND source = ?",
                (
                    commit.commit_lsn,
                    table,
                    _dumps([p for p in problems if isinstance(p, str)]),
                    self.source,
                ),
            )
        for problem in problems:
            self._open_gap(table, problem, txn, commit, session_id, bool(state.get("rewrite")))

    def _open_gap(
        self,
        table: str | None,
        problem: str,
        txn: _Txn,
        commit: Commit,
        session_id: str | None,
        point: bool = False,
    ) -> None:
        """A gap of the table for this problem from this transaction on, unless one is open
        (``point``: one at this transaction only)."""
        if not self.conn.execute(
            "SELECT 1 FROM gaps WHERE kind = 'table' AND table_name = ? AND reason = ?"
            " AND to_lsn IS NULL AND source = ?",
            (table, problem, self.source),
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
        """A gap of one table in the audit trail (to_lsn None: still open)."""
        self.conn.execute(
            "INSERT INTO gaps (detected_at, from_lsn, to_lsn, reason, kind, table_name,"
            " session_id, xid, source) VALUES (?, ?, ?, ?, 'table', ?, ?, ?, ?)",
            (at, from_lsn, to_lsn, reason, table, session_id, xid, self.source),
        )

    def set_ledger(self, doc: dict[str, Any] | None, content: bytes, untrusted: str | None) -> None:
        """The transaction is an undo: its entries in the source's ledger (undo.record_undo),
        ``doc`` as checked by capture (None: malformed); ``untrusted``: why it is not trusted.
        Every message is kept: one forged into an undo's transaction (a table owner's trigger
        under --fire-triggers) does not replace the real one."""
        txn = self.txn
        assert txn is not None
        txn.ledger.append((doc, content, untrusted))

    def add_malformed(
        self, lsn: int, prefix: str, session_id: str | None, problem: str, content: bytes
    ) -> None:
        """One of undo's messages that is not what undo's SQL writes (messages.py): kept, never
        used. In a transaction it is kept or lost with it; outside one it is stored with the
        batch, and the same row again when the server sends it again (its LSN)."""
        if self.txn is not None:
            self.txn.malformed.append((lsn, prefix, session_id, problem, content))
        else:
            self._open_batch()
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
            "INSERT INTO malformed (lsn, prefix, received_at, xid, session_id, problem, size,"
            " content, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (source, lsn, prefix) DO NOTHING",
            (
                lsn,
                prefix,
                at,
                xid,
                session_id,
                problem,
                len(content),
                content[:KEPT_BYTES],
                self.source,
            ),
        )

    def relation_oid(self, rel_id: int, oid: int | None) -> None:
        """Correct the OID a table version was recorded under (capture learned it later)."""
        self.conn.execute("UPDATE relations SET oid = ? WHERE id = ?", (oid, rel_id))

    def add_gap(self, table: str, reason: str) -> None:
        """A gap of one table at the transaction being written (kept or lost with it)."""
        txn = self.txn
        assert txn is not None
        lsn = txn.commit_lsn
        self._table_gap(table, reason, iso(datetime.now(UTC)), lsn, lsn, None, txn.xid)

    def add_refusal(self, lsn: int, tag: dict[str, Any], untrusted: str | None) -> None:
        """A write a guard refused (a non-transactional message, outside any transaction):
        stored with the batch; sent again after a restart, it is the same row (its LSN). A
        trusted refusal's nonce is stored once: the same refusal emitted again (another LSN)
        is stored untrusted, 'replayed'."""
        self._open_batch()
        session: dict[str, Any] = tag.get("session") or {}
        nonce = tag.get("nonce")
        if untrusted is None and (
            nonce is None
            or self.conn.execute(
                "SELECT 1 FROM guard_refusals WHERE nonce = ? AND tag = 'trusted' AND lsn <> ?"
                " AND source = ?",
                (nonce, lsn, self.source),
            ).fetchone()
        ):
            untrusted = "replayed"
        self.conn.execute(
            "INSERT INTO guard_refusals (lsn, refused_at, guard, reason, session_id,"
            " application_name, user_name, client_addr, backend_pid, statement, tag, tag_reason,"
            " nonce, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (source, lsn) DO NOTHING",
            (
                lsn,
                tag.get("at") or iso(datetime.now(UTC)),
                tag.get("guard"),
                tag.get("reason"),
                session.get("session_id"),
                tag.get("application_name"),
                session.get("user"),
                session.get("client_addr"),
                session.get("pid"),
                tag.get("statement"),
                "trusted" if untrusted is None else "untrusted",
                untrusted,
                nonce,
                self.source,
            ),
        )

    def _write_ledger(self, txn: _Txn, commit: Commit) -> None:
        """Mirror an undo's ledger entries in undos: what it undid, by store transaction. An
        untrusted mirror is a row too (tag 'untrusted', the reason, the message as received);
        readers count trusted rows only."""
        for doc, content, why in txn.ledger:
            entries = doc["entries"] if doc is not None else []
            lsns = sorted({lsn_to_int(e[0]) for e in entries})
            ids = []
            for i in range(0, len(lsns), 500):
                chunk = lsns[i : i + 500]
                ids += [
                    r[0]
                    for r in self.conn.execute(
                        "SELECT id FROM transactions WHERE source = ? AND commit_lsn IN"  # noqa: S608
                        f" ({','.join('?' * len(chunk))})",
                        [self.source, *chunk],
                    )
                ]
            self.conn.execute(
                "INSERT INTO undos (applied_at, target, selection, undo_xid, entries, tag,"
                " tag_reason, message, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    commit.commit_time,
                    doc["target"] if doc is not None else "null",
                    _dumps(sorted(ids)),
                    txn.xid,
                    _dumps(entries) if doc is not None else None,
                    "trusted" if why is None else "untrusted",
                    why,
                    None if why is None else content.decode("utf-8", "replace"),
                    self.source,
                ),
            )

    def _write_rows(self) -> None:
        rows = self.rows
        step = _CHUNK * _FIELDS
        full = len(rows) - len(rows) % step
        for i in range(0, full, step):
            self.conn.execute(_INSERT_CHUNK, rows[i : i + step])
        if full < len(rows):  # the rest of a transaction, or a TRUNCATE past a whole chunk
            self.conn.executemany(_INSERT_CHANGES, zip(*[iter(rows[full:])] * _FIELDS, strict=True))
        self.batch_changes += len(rows) // _FIELDS
        rows.clear()

    def commit(self, commit: Commit) -> bool:
        """Write the transaction row. Returns False (and keeps nothing) if it had no change."""
        txn = self.txn
        assert txn is not None
        self.txn = None
        self._write_rows()
        if self.oldest_unstored is None:
            self.oldest_unstored = commit.commit_time
        if txn.ledger:
            self._write_ledger(txn, commit)
        if txn.ddl:
            self._write_ddl(txn, commit)
        for m in txn.malformed:
            self._write_malformed(txn.xid, commit.commit_time, *m)
        if txn.ord == 0:
            self.conn.execute("RELEASE txn")
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
        self.conn.execute(
            "INSERT INTO transactions (id, xid, commit_lsn, end_lsn, commit_time, session_id,"
            " application_name, user_name, client_addr, client_port, backend_pid, backend_start,"
            " statement, tag, undo_of, inserts, updates, deletes, truncates, first_change,"
            " last_change, full_xid, tag_reason, source)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                txn.id,
                txn.xid,
                commit.commit_lsn,
                commit.end_lsn,
                commit.commit_time,
                session.get("session_id"),
                tag.get("application_name"),
                session.get("user"),
                session.get("client_addr"),
                session.get("client_port"),
                session.get("pid"),
                session.get("backend_start"),
                tag.get("statement"),
                tag_kind,
                None if tag.get("undo") is None else _dumps(tag["undo"]),
                totals["I"],
                totals["U"],
                totals["D"],
                totals["T"],
                txn.first_change,
                self.next_change - 1,
                _full_xid(tag, txn.xid) if trusted else None,
                # writes on audited tables with no tag at all: erased (undo.tagged set by hand)
                "missing" if trusted is None else txn.reason,
                self.source,
            ),
        )
        if trusted and txn.statements:
            self._write_statements(txn, tag.get("statement"))
        self.conn.executemany(
            "INSERT INTO txn_changes (txn, relation, op, n, without_old) VALUES (?, ?, ?, ?, ?)",
            [
                (txn.id, rel_id, op, n, txn.without_old.get((rel_id, op), 0))
                for (rel_id, op), n in txn.counts.items()
            ],
        )
        if AGGREGATES:
            minute = _minute(commit.commit_time)
            app = tag.get("application_name") or ""
            sid = activity_session(session.get("session_id"), tag_kind)
            for i, (rel_id, c) in enumerate(per_table.items()):
                acc = self.activity.get((minute, app, sid, rel_id))
                if acc is None:
                    acc = self.activity[minute, app, sid, rel_id] = [0, 0, 0, 0, 0]
                acc[0] += c["I"]
                acc[1] += c["U"]
                acc[2] += c["D"]
                acc[3] += c["T"]
                acc[4] += i == 0
        self.conn.execute("RELEASE txn")
        self.next_txn += 1
        self.batch_position = max(self.batch_position, commit.end_lsn)
        return True

    def abort(self) -> None:
        """Forget the transaction in progress (the server sends it again)."""
        if self.txn is not None:
            self.rows.clear()
            self.conn.execute("ROLLBACK TO txn")
            self.conn.execute("RELEASE txn")
            self.txn = None

    def advance(self, lsn: int) -> None:
        """Move the position without a transaction (idle stream, heartbeat)."""
        if self.txn is None and lsn > self.batch_position:
            self._open_batch()
            self.batch_position = lsn

    def _write_activity(self) -> None:
        """Add the batch's per-minute counts to the aggregates, in the batch's transaction."""
        if self.activity:
            self.conn.executemany(
                "INSERT INTO activity (minute, application_name, session_id, relation, inserts,"
                " updates, deletes, truncates, transactions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (minute, application_name, session_id, relation) DO UPDATE SET"
                " inserts = inserts + excluded.inserts, updates = updates + excluded.updates,"
                " deletes = deletes + excluded.deletes, truncates = truncates + excluded.truncates,"
                " transactions = transactions + excluded.transactions",
                [(*k, *v) for k, v in self.activity.items()],
            )
            self.activity.clear()

    @property
    def unstored_since(self) -> str | None:
        """The commit time of the oldest transaction not yet stored that this writer has seen
        (its Begin, or its commit in the open batch), or None."""
        times = [t for t in (self.pending_since, self.oldest_unstored) if t is not None]
        return min(times, key=epoch) if times else None

    def flush(self) -> int:
        """Commit the batch with its position; return the position now durable."""
        assert self.txn is None, "flush inside a source transaction"
        if self.batch_open:
            self._write_rows()
            self._write_activity()
            if self.batch_position != self.position:
                self.conn.execute(
                    "INSERT INTO source_meta (source, key, value) VALUES (?, 'position', ?)"
                    " ON CONFLICT (source, key) DO UPDATE SET value = excluded.value",
                    (self.source, str(self.batch_position)),
                )
            # what `status` shows while this capture holds the slot: how old the oldest commit
            # not yet stored was, until this batch stored it (0: it had nothing waiting)
            now = time.time()
            oldest = self.unstored_since
            lag = 0.0 if oldest is None else now - epoch(oldest)
            self.conn.execute(
                "INSERT INTO source_meta (source, key, value) VALUES (?, 'capture_lag', ?)"
                " ON CONFLICT (source, key) DO UPDATE SET value = excluded.value",
                (self.source, json.dumps({"at": now, "lag_seconds": round(max(0.0, lag), 3)})),
            )
            self.oldest_unstored = self.pending_since = None
            self.conn.execute("COMMIT")
            self.batch_open = False
            self.position = self.batch_position
        return self.position


#: how activity files a transaction's session (api.activity_session), for a transactions row ``t``
ACTIVITY_SESSION_SQL = (
    "(CASE t.tag WHEN 'trusted' THEN coalesce(t.session_id, '')"
    " WHEN 'untrusted' THEN 'untrusted:' || coalesce(t.session_id, '') ELSE '' END)"
)


def _full_xid(tag: dict[str, Any], xid: int) -> int | None:
    """The tag's 64-bit xid, if it is this transaction's (its low 32 bits are the xid the
    stream gave)."""
    full = tag.get("xid")
    return full if is_xid_of(full, xid) else None
