"""The capture loop: read the slot, group by transaction, store, then confirm.

Invariant: the position sent to the server (standby status update) is never ahead of what the
store has committed (``StoreWriter.flush`` returns it). On start, capture asks the server for
the store's own position, so transactions the server re-sends (PostgreSQL before 17 can move
``confirmed_flush`` back on a clean restart) are skipped, and checks that the slot is not ahead
of the store: a slot consumed or advanced elsewhere, dropped and re-created, or invalidated is a
gap in the audit trail, recorded and refused.
"""

from __future__ import annotations

import gc
import logging
import secrets
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import pq, sql

from undo.core import names, wal
from undo.core.config import Settings
from undo.core.errors import (
    BadInput,
    DatabaseUnreachable,
    SlotInUse,
    StoreBusy,
    StoreCorrupt,
    TryAgain,
    UndoError,
)
from undo.core.records import Begin, Change, Commit, Message, Relation, Truncate
from undo.core.times import epoch, iso
from undo.source import pg, sources
from undo.source.catalog import Catalog
from undo.source.health import capture_application_name
from undo.store import open_store, recovery, store_fault
from undo.store.api import Source, Store, Writer
from undo.stream import messages, pgoutput, wal2json
from undo.stream._protocol import parse_keepalive, status_update
from undo.stream.messages import (
    DDL_PREFIX,
    LEDGER_PREFIX,
    MARK_PREFIX,
    STMT_PREFIX,
    TAG_PREFIX,
    TRANSACTIONAL,
)
from undo.stream.slot import check_slot, read_key

log = logging.getLogger(__name__)

BATCH_CHANGES = 50_000
BATCH_SECONDS = 1.0
STATUS_SECONDS = 10.0
REPORT_SECONDS = 30.0  # a progress line in the log while capture works (none while idle)
STOP_CHECK_EVERY = 4096
#: capture --keep: a step of pruning this often while there is more to prune, else this often
PRUNE_BUSY_SECONDS = 1.0
PRUNE_IDLE_SECONDS = 60.0


@dataclass(frozen=True)
class CaptureReport:
    transactions: int
    changes: int
    position: int


def _stream_end(pgconn: Any, n: int) -> str:
    """Why the stream ended: the walsender's ERROR comes as the result after the copy (n -1:
    libpq's own message is empty then, "no error details available"), a lost connection as
    libpq's error (n -2)."""
    if n == -1:
        res = pgconn.get_result()
        text = res.error_message.decode(errors="replace").strip() if res is not None else ""
        if text:
            return text.splitlines()[0]
    return pgconn.get_error_message() or "the server ended the stream"


class ConnectionLost(Exception):
    pass


class Retention:
    """capture --keep: history older than ``seconds`` pruned by capture itself, one small step
    (Store.prune_step) at a time between batches, so the stream is never held up long;
    free pages handed back by incremental vacuum where the store has it."""

    def __init__(self, db: Store, seconds: int) -> None:
        self.db = db
        self.seconds = seconds
        self.next_at = 0.0
        self.pruned = [0, 0]  # transactions, changes (this round, for the log)
        if not db.returns_space():
            log.warning(
                "this store was made before incremental vacuum: --keep deletes old history and"
                " its space is used again, but the file does not shrink; to turn it on, stop"
                " capture once and run `undo prune --before AGE` (its VACUUM does)",
                extra=_fields(incremental_vacuum=False),
            )

    def step(self) -> None:
        """A step if one is due; the caller has no batch open."""
        now = time.monotonic()
        if now < self.next_at:
            return
        before = iso(datetime.now(UTC) - timedelta(seconds=self.seconds))
        r = self.db.prune_step(before)
        self.pruned[0] += r.transactions
        self.pruned[1] += r.changes
        if not r.more and self.pruned[0]:
            # the real cut: a PostgreSQL store's is a partition boundary at or before ``before``
            cut = self.db.meta("pruned_before") or before
            log.info(
                "pruned %s transaction(s), %s change(s) committed before %s (--keep)",
                f"{self.pruned[0]:,}",
                f"{self.pruned[1]:,}",
                cut,
                extra=_fields(
                    pruned_transactions=self.pruned[0], pruned_changes=self.pruned[1], before=cut
                ),
            )
            self.pruned = [0, 0]
        self.next_at = time.monotonic() + (PRUNE_BUSY_SECONDS if r.more else PRUNE_IDLE_SECONDS)


def _fields(**kw: Any) -> dict[str, Any]:
    """Structured fields of a log line (--log-format json shows them)."""
    return {"fields": kw}


class _Session:
    """One replication connection's worth of capture."""

    def __init__(
        self,
        settings: Settings,
        writer: Writer,
        decoder_name: str,
        options: list[tuple[str, str]],
        key: bytes,
        catalog: Catalog,
        on_progress: Callable[[int, int], None] | None,
        retention: Retention | None = None,
    ) -> None:
        self.settings = settings
        self.retention = retention
        self.writer = writer
        self.decoder: Any = (
            pgoutput.PgOutputDecoder() if decoder_name == "pgoutput" else wal2json.Wal2JsonDecoder()
        )
        self.options = options
        self.key = key
        self.catalog = catalog
        self.skipping = False
        self.transactions = 0
        self.changes = 0
        self.last_status = 0.0
        self.on_progress = on_progress
        self.wal_end = 0  # the server's WAL end, from its last keepalive
        self.last_report = time.monotonic()
        self.reported_changes = 0
        self.ddl_checked = 0  # the transaction whose forged DDL record had the catalog checked

    def _relation(self, rel: Relation) -> int | None:
        """Store id of the relation's version, or None if it is not audited (skip it)."""
        sid = rel.store_id
        if sid is None:
            audited, key, partial = self.catalog.resolve(rel)
            if rel.oid is None and rel.schema in self.catalog.schemas:
                # wal2json names a table: one renamed or dropped since these changes were
                # written is not found, and its changes cannot be stored. Never silently.
                self.writer.add_gap(
                    names.quote(rel.schema, rel.name),
                    f"changes to {names.quote(rel.schema, rel.name)} from here on could not be"
                    " matched to a table: it was renamed or dropped before capture read them"
                    " (wal2json sends table names, not OIDs; pgoutput does not lose them)",
                )
            rel.key = key
            sid = self.writer.relation_id(rel, key, partial) if audited else -1
            rel.store_id = sid
            rel.partial = partial
            # from now on its changes may be staged in C, or dropped there when not audited
            if sid == -1:
                self.decoder.resolved[self.decoder.resolved_key(rel)] = (None, None)
            elif not partial:
                self.decoder.resolved[self.decoder.resolved_key(rel)] = (sid, key)
        return None if sid == -1 else sid

    def _send_status(self, pgconn: pq.abc.PGconn, position: int, reply: bool = False) -> None:
        pgconn.put_copy_data(status_update(position, reply))
        pgconn.flush()
        self.last_status = time.monotonic()

    def _report(self) -> None:
        """One line every REPORT_SECONDS while capture runs: its rate and how far behind it is."""
        now = time.monotonic()
        if now - self.last_report < REPORT_SECONDS:
            return
        rate = (self.changes - self.reported_changes) / (now - self.last_report)
        lag_bytes = max(0, self.wal_end - self.writer.position)
        oldest = self.writer.unstored_since
        lag_seconds = round(max(0.0, time.time() - epoch(oldest)), 1) if oldest else 0.0
        self.last_report, self.reported_changes = now, self.changes
        if not rate and not lag_seconds:
            return  # idle and caught up: nothing to say (a line of 0/s every 30 s said nothing)
        log.info(
            "%s changes stored (%s/s), lag %s bytes, %s s",
            f"{self.changes:,}",
            f"{rate:,.0f}",
            f"{lag_bytes:,}",
            lag_seconds,
            extra=_fields(
                changes=self.changes,
                changes_per_second=round(rate),
                lag_bytes=lag_bytes,
                lag_seconds=lag_seconds,
            ),
        )

    def _dropped(self, ddl: dict[str, Any]) -> None:
        """wal2json names tables: a table looked up by name before its DROP came through the
        stream may have been found as another table made since under that name. Its changes
        before the DROP are the dropped table's (whose OID the DDL message carries): say so in
        the store, so that undo refuses to write them into the other one; and look the name
        up again for what follows."""
        for cmd in ddl.get("ddl") or []:
            if not (isinstance(cmd, dict) and cmd.get("command") == "DROP TABLE"):
                continue
            try:
                dropped, (schema, name) = cmd["oid"], names.parse(cmd["object"] or "")
            except UndoError:  # not a name PostgreSQL prints: nothing of ours to forget
                continue
            for rel in self.decoder.relations.values():
                if (rel.schema, rel.name) != (schema, name) or rel.oid is None:
                    continue
                if rel.oid != dropped and rel.store_id not in (None, -1):
                    self.writer.relation_oid(rel.store_id, dropped)
                rel.oid = rel.store_id = None
                self.decoder.resolved.pop(self.decoder.resolved_key(rel), None)

    def _message(self, rec: Message, in_txn: bool) -> None:
        """One of undo's own messages: checked (messages.py), used, or kept as malformed."""
        writer = self.writer
        problem = messages.problem_of_kind(rec.prefix, rec.transactional)
        if problem is None and rec.transactional != in_txn:
            problem = "a transactional message outside a transaction"
        if problem is not None:
            writer.add_malformed(rec.lsn, rec.prefix, None, problem, rec.content)
            return
        if rec.prefix == LEDGER_PREFIX:
            doc, why = messages.read_ledger(rec.content, self.key, writer.txn_xid)
            if doc is None:
                writer.add_malformed(
                    rec.lsn, rec.prefix, None, "not a ledger mirror undo's SQL writes", rec.content
                )
            writer.set_ledger(doc, rec.content, why)
            return
        if rec.prefix == STMT_PREFIX:
            try:
                writer.add_statement(messages.read_statement(rec.content))
            except messages.Malformed as e:
                writer.add_malformed(rec.lsn, rec.prefix, None, str(e), rec.content)
            return
        xid = writer.txn_xid if in_txn else None
        signed = messages.read_signed(rec.prefix, rec.content, self.key, xid)
        if signed.problem is not None:
            writer.add_malformed(
                rec.lsn, rec.prefix, signed.claimed_session, signed.problem, rec.content
            )
        if rec.prefix == TAG_PREFIX:
            writer.set_tag(signed.fields, signed.untrusted)
        elif rec.prefix == DDL_PREFIX:  # malformed too: the catalog is asked all the same
            ddl, why, problems = self._ddl(signed.fields, signed.untrusted)
            writer.add_ddl(ddl, why, problems)
            if why is None and self.decoder.name == "wal2json":
                self._dropped(ddl)
            if why is None:  # a table put under an audited one: resolved again
                self._forget_relations()
        elif signed.problem is None:  # GUARD_PREFIX: a refusal that says something usable
            writer.add_refusal(rec.lsn, signed.fields, signed.untrusted)

    def _ddl(
        self, doc: dict[str, Any], why: str | None
    ) -> tuple[dict[str, Any], str | None, list[tuple[str, str]]]:
        """An undo.ddl record as the writer takes it: its commands and states only where undo's
        key signed it (undo.on_ddl, as undo's owner), else it is untrusted; and, whatever it
        says, the problems the source's catalog shows now for the audited tables it names (for
        a record undo did not make: every audited table, once per transaction)."""
        if why is not None:
            txn = self.writer.txn
            if txn is None or self.ddl_checked == txn.id:
                return doc, why or "forged", []
            self.ddl_checked = txn.id
            return doc, why or "forged", self.catalog.problems(None)
        commands, states = doc["ddl"], doc["state"]
        stated = [s["oid"] for s in states]
        named = {c["oid"] for c in commands + states if c["oid"] and c["oid"] not in stated}
        return doc, None, self.catalog.problems(sorted(named))

    def _forget_relations(self) -> None:
        for rel in self.decoder.relations.values():
            rel.store_id = None
        self.decoder.resolved.clear()

    def run(
        self,
        rconn: psycopg.Connection[Any],
        start: int,
        mark: bytes | None,
        should_stop: Callable[[], bool],
    ) -> bool:
        """Stream until stopped (False) or until the mark message is seen (True)."""
        pgconn = rconn.pgconn
        opts = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in self.options
        )
        cmd = sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
            sql.Identifier(self.settings.slot), sql.SQL(wal.int_to_lsn(start)), opts
        )
        pgconn.send_query(cmd.as_bytes(None))
        res = pgconn.get_result()
        if res is None or res.status != pq.ExecStatus.COPY_BOTH:
            msg = res.error_message.decode(errors="replace").strip() if res else "no answer"
            if res is not None and res.error_field(pq.DiagnosticField.SQLSTATE) == b"55006":
                raise ConnectionLost(msg)  # taken since check_slot (a peek): try again
            raise UndoError(f"START_REPLICATION failed: {msg}")
        writer = self.writer
        decode = self.decoder.decode
        # most changes are staged in C straight from the frame (undo/_speedups.c)
        stage = self.decoder.stage
        resolved = self.decoder.resolved
        rows = writer.rows
        txn = None  # the writer's transaction while one is being stored, not skipped
        in_txn = False
        found_mark = False
        sock = pgconn.socket
        countdown = STOP_CHECK_EVERY
        stopping = False
        while True:
            if found_mark or stopping or (not in_txn and should_stop()):
                if in_txn:
                    writer.abort()
                    self._forget_relations()
                self._send_status(pgconn, writer.flush())
                return found_mark
            n, data = pgconn.get_copy_data(1)
            if n == 0:
                self._report()
                if not in_txn and writer.batch_open:
                    self._send_status(pgconn, writer.flush())
                if time.monotonic() - self.last_status > STATUS_SECONDS and not in_txn:
                    self._send_status(pgconn, writer.flush())
                if self.retention is not None and not in_txn and not writer.batch_open:
                    self.retention.step()
                ready, _, _ = select.select([sock], [], [], 0.5)
                if ready:
                    pgconn.consume_input()
                continue
            if n < 0:
                raise ConnectionLost(_stream_end(pgconn, n))
            kind = data[0]
            if kind == 0x6B:  # 'k' keepalive
                wal_end, reply = parse_keepalive(bytes(data))
                self.wal_end = max(self.wal_end, wal_end)
                if not in_txn:
                    writer.advance(wal_end)
                    self._send_status(pgconn, writer.flush())
                elif reply:
                    self._send_status(pgconn, writer.position)
                continue
            if kind != 0x77:  # 'w': XLogData, the payload after a 25-byte header
                continue
            countdown -= 1
            if not countdown:
                countdown = STOP_CHECK_EVERY
                if should_stop():  # inside a long transaction: give it up, it is re-sent
                    stopping = True
                    continue
            if txn is not None:
                staged = stage(
                    data, resolved, rows, txn.counts, writer.next_change, txn.id, txn.ord + 1
                )
                if staged == 1:
                    writer.add_staged()
                    self.changes += 1
                    continue
                if staged:  # a table not audited
                    continue
            try:
                rec = decode(bytes(data[25:]))
            except ValueError as e:
                # the server's stream, not a role's message: nothing of it is stored or
                # confirmed, and capture does not go on past it
                raise UndoError(
                    f"capture stopped: a malformed {self.decoder.name} message at"
                    f" {wal.int_to_lsn(int.from_bytes(data[1:9], 'big'))} ({e}); nothing from"
                    " it on is stored or confirmed"
                ) from None
            if rec is None:
                continue
            if type(rec) is Change:
                if self.skipping:
                    continue
                rel = rec.rel
                sid = rel.store_id if rel.store_id is not None else self._relation(rel)
                if sid is None or sid == -1:
                    continue
                if rel.partial and rec.op != "I":
                    rec.old = None
                writer.add(rec, sid, rel.key)
                self.changes += 1
            elif type(rec) is Begin:
                in_txn = True
                self.skipping = writer.already_stored(rec)
                if not self.skipping:
                    writer.begin(rec)
                    txn = writer.txn
            elif type(rec) is Commit:
                in_txn = False
                txn = None
                if self.skipping:
                    self.skipping = False
                    continue
                if writer.commit(rec):
                    self.transactions += 1
                    if self.on_progress:
                        self.on_progress(self.transactions, self.changes)
                self.wal_end = max(self.wal_end, rec.end_lsn)
                self._report()
                if (
                    writer.batch_changes >= BATCH_CHANGES
                    or time.monotonic() - writer.batch_started > BATCH_SECONDS
                ):
                    self._send_status(pgconn, writer.flush())
                    if self.retention is not None:  # a stream never idle prunes too
                        self.retention.step()
            elif type(rec) is Message:
                if rec.prefix == MARK_PREFIX:
                    if mark is not None and not in_txn and rec.content == mark:
                        writer.advance(rec.lsn)
                        found_mark = True
                elif rec.prefix in TRANSACTIONAL and not (in_txn and self.skipping):
                    self._message(rec, in_txn)
            elif type(rec) is Truncate:
                if self.skipping:
                    continue
                for rel in rec.rels:
                    sid = self._relation(rel)
                    if sid is not None:
                        writer.add_truncate(sid)
                        self.changes += 1


def capture(
    settings: Settings,
    once: bool = False,
    accept_gap: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: Callable[[int, int], None] | None = None,
    max_attempts: int | None = None,
    keep: int | None = None,
) -> CaptureReport:
    """Stream committed changes from the slot into the store.

    ``once``: stop after storing everything committed before the call. Otherwise run until
    ``should_stop()`` says so. Reconnects with backoff when the server goes away. ``keep``:
    prune history older than that many seconds as it goes (Retention).

    A store SQLite reports malformed stops it at once (at start, PRAGMA quick_check): nothing
    more is confirmed, so the slot keeps every change the store may not hold. Faults are
    UndoErrors whose exit code says who puts them right: TryAgain (75: the source went away,
    a restart does it), the others (1, 2: a person).
    """
    db = open_store(settings.store)
    try:
        try:
            with pg.connect(settings.dsn) as conn:
                bound = sources.bind(db, settings, conn)
        except DatabaseUnreachable as e:
            # at start, as the loop says it: a service manager tries again (exit 75)
            raise TryAgain(str(e)) from None
        return _capture(
            bound, settings, db, once, accept_gap, should_stop, on_progress, max_attempts, keep
        )
    except Exception as e:
        fault = store_fault(e, settings.store)
        if fault is None:
            raise
        if isinstance(fault, StoreBusy):
            raise TryAgain(f"capture stopped: {fault}") from None
        position = get_meta_safely(db)
        raise type(fault)(
            f"capture stopped: {fault}; nothing after {position} was confirmed to the server,"
            " so the slot keeps those changes"
        ) from None
    finally:
        db.close()  # an open batch is rolled back: its position was never confirmed


def get_meta_safely(db: Store) -> str:
    """The store's position for a message about a store that failed, if it can be read."""
    try:
        return wal.int_to_lsn(int(db.meta("position") or 0))
    except Exception:  # whatever the failed store raises now: the message is about the first
        return "the last position it confirmed"


def _capture(
    bound: Source,
    settings: Settings,
    db: Store,
    once: bool,
    accept_gap: bool,
    should_stop: Callable[[], bool],
    on_progress: Callable[[int, int], None] | None,
    max_attempts: int | None,
    keep: int | None,
) -> CaptureReport:
    decoder = db.meta("decoder") or "pgoutput"
    slot = db.meta("slot")
    if slot is not None and slot != settings.slot:
        raise BadInput(
            f"the store belongs to slot {slot!r}, not {settings.slot!r}: use --slot {slot}"
        )
    problems = db.quick_check()
    if problems:
        raise StoreCorrupt(
            f"the audit store {settings.store} is corrupt ({db.engine}'s quick_check:"
            f" {'; '.join(problems[:3])}):"
            " capture confirms nothing from it; move it aside, and either restore a copy or"
            f" {recovery(settings.store)}; then `undo check`"
        )
    # a store it cannot write (read-only file or mount) is found before anything is streamed
    db.probe_write()
    if decoder == "pgoutput":
        options = pgoutput.plugin_options(db.meta("publication") or settings.slot)
    else:
        options = wal2json.plugin_options(db.meta("numbers_as_strings") == "1")
        options.append(("add-msg-prefixes", ",".join(messages.PREFIXES)))
    writer = db.writer()
    retention = Retention(db, keep) if keep else None
    transactions = changes = 0
    attempt = 0
    began = writer.position  # where the attempts since the last progress began
    connected = False
    if once and max_attempts is None:
        max_attempts = 5
    # Capture allocates millions of short-lived tuples and lists, none of them cyclic: the
    # default collector thresholds spent about 3% of capture on needless young collections.
    thresholds = gc.get_threshold()
    gc.set_threshold(200_000, 100, 100)
    try:
        while True:
            try:
                with pg.connect(settings.dsn) as conn:
                    # a --dsn that names another database after a restart (DNS, a failover
                    # to the wrong server) is never written into this source's history
                    sources.verify(db, settings, bound, sources.identity(conn), conn)
                    key = read_key(conn)
                    start = check_slot(conn, db, settings.slot, writer.position, accept_gap)
                    accept_gap = False
                    if start > writer.position:
                        writer.advance(start)
                        writer.flush()
                    mark = None
                    if once:
                        mark = secrets.token_hex(8).encode()
                        conn.execute(
                            "SELECT pg_logical_emit_message(false, %s, %s)",
                            (MARK_PREFIX, mark.decode()),
                        )
                    session = _Session(
                        settings,
                        writer,
                        decoder,
                        options,
                        key,
                        Catalog(conn),
                        on_progress,
                        retention,
                    )
                    rconn = pg.connect(
                        settings.dsn,
                        replication="database",
                        application_name=capture_application_name(),
                    )
                    behind = pg.wal_after(conn, writer.position)
                    if attempt:
                        log.info("reconnected after %d attempt(s)", attempt, extra=_fields())
                    log.info(
                        "capturing slot %s (%s) from %s; %s bytes of WAL to read",
                        settings.slot,
                        decoder,
                        wal.int_to_lsn(writer.position),
                        f"{behind:,}",
                        extra=_fields(
                            slot=settings.slot,
                            decoder=decoder,
                            position=wal.int_to_lsn(writer.position),
                            lag_bytes=behind,
                        ),
                    )
                    connected = True
                    try:
                        session.run(rconn, writer.position, mark, should_stop)
                    finally:
                        transactions += session.transactions
                        changes += session.changes
                        rconn.pgconn.finish()
                        rconn.close()
                    return CaptureReport(transactions, changes, writer.position)
            except (
                ConnectionLost,
                psycopg.OperationalError,
                DatabaseUnreachable,
                SlotInUse,
                TryAgain,
            ) as e:
                if store_fault(e, settings.store) is not None:
                    raise  # the store's (its disk full, its server gone), not the source's
                if isinstance(e, DatabaseUnreachable) and not connected:
                    # at start: a server down for a moment looks like a wrong host or port to
                    # libpq (no SQLSTATE): a service manager tries again (exit 75)
                    raise TryAgain(str(e)) from None
                if isinstance(e, SlotInUse | TryAgain) and not connected:
                    raise
                # once connected, the slot held after a loss is most likely still held by
                # the walsender of this capture's lost connection: tried again like a loss
                writer.abort()
                if writer.batch_open:
                    writer.flush()
                # attempts count while nothing is stored: a stream the server ends at the same
                # change each time (an ERROR in the walsender) is given up, not retried for ever
                if writer.position > began:
                    attempt, began = 0, writer.position
                attempt += 1
                if should_stop() or (max_attempts is not None and attempt > max_attempts):
                    first = str(e).strip().splitlines()[0] if str(e).strip() else "closed"
                    raise TryAgain(
                        f"lost the source database ({first}) after {attempt - 1} reconnect(s):"
                        " check that it is up, then run `undo capture` again"
                    ) from None
                delay = min(30.0, 0.5 * 2**attempt)
                reason = str(e).strip().splitlines()[0] if str(e).strip() else "closed"
                log.warning(
                    "connection lost (%s); reconnecting in %.1fs (attempt %d)",
                    reason,
                    delay,
                    attempt,
                    extra=_fields(reason=reason, delay_seconds=delay, attempt=attempt),
                )
                end = time.monotonic() + delay
                while time.monotonic() < end and not should_stop():
                    time.sleep(0.1)
    finally:
        gc.set_threshold(*thresholds)
