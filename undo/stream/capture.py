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
from typing import Any

import psycopg
from psycopg import pq, sql

from .. import names, pg
from ..config import Settings
from ..errors import DatabaseUnreachable, NotReady, SlotGap, UndoError
from ..store.schema import get_meta, open_store
from ..store.writer import StoreWriter, record_gap
from . import messages, pgoutput, wal2json
from .messages import (
    DDL_PREFIX,
    LEDGER_PREFIX,
    MARK_PREFIX,
    STMT_PREFIX,
    TAG_PREFIX,
    TRANSACTIONAL,
)
from .protocol import epoch, parse_keepalive, status_update
from .records import Begin, Change, Commit, Message, Relation, Truncate

log = logging.getLogger(__name__)

BATCH_CHANGES = 50_000
BATCH_SECONDS = 1.0
STATUS_SECONDS = 10.0
REPORT_SECONDS = 30.0  # a progress line in the log while capture works
SLOT_BUSY_SECONDS = 5.0
STOP_CHECK_EVERY = 4096


@dataclass(frozen=True)
class CaptureReport:
    transactions: int
    changes: int
    position: int


class ConnectionLost(Exception):
    pass


def _fields(**kw: Any) -> dict[str, Any]:
    """Structured fields of a log line (--log-format json shows them)."""
    return {"fields": kw}


_KEY_QUERY = """
SELECT i.indkey::int2[], i.indisprimary
  FROM pg_index i
 WHERE i.indrelid = %(oid)s AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
   AND i.indexprs IS NULL AND i.indimmediate
   AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = i.indrelid
                    AND a.attnum = ANY (i.indkey) AND NOT a.attnotnull)
 ORDER BY i.indisprimary DESC, i.indisreplident DESC, i.indnatts, i.indexrelid
 LIMIT 1
"""


class Catalog:
    """What capture asks the source's catalog about a relation it meets in the stream."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        row = conn.execute(
            "SELECT CASE WHEN to_regclass('undo.config') IS NOT NULL"
            " THEN (SELECT schemas FROM undo.config) END"
        ).fetchone()
        #: schemas whose every table is audited: a table of theirs not found was audited
        self.schemas: frozenset[str] = frozenset(row[0] or ()) if row else frozenset()

    def resolve(self, rel: Relation) -> tuple[bool, tuple[int, ...] | None, bool]:
        """Fill in oid and types; return (audited, key positions, old images incomplete)."""
        if rel.oid is None:
            row = self.conn.execute(
                "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relname = %s",
                (rel.schema, rel.name),
            ).fetchone()
            rel.oid = None if row is None else int(row[0])
        attrs = (
            self.conn.execute(
                "SELECT attnum, attname, attgenerated <> '', atttypid, atttypmod FROM pg_attribute"
                " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (rel.oid,),
            ).fetchall()
            if rel.oid is not None
            else []
        )
        if rel.types is None and rel.type_oids is not None and rel.type_mods is None:
            # wal2json sends type OIDs but no typmods: take them from the catalog where the
            # column still has that type (else the typmod is lost, and undo sees the change)
            live = {a[1]: (a[3], a[4]) for a in attrs}
            rel.type_mods = tuple(
                live[c][1] if c in live and live[c][0] == t else -1
                for c, t in zip(rel.columns, rel.type_oids, strict=True)
            )
        if rel.types is None and rel.type_oids is not None:
            rows = self.conn.execute(
                "SELECT format_type(t, NULLIF(m, -1)) FROM unnest(%s::oid[], %s::int[])"
                " WITH ORDINALITY AS u(t, m, i) ORDER BY i",
                (list(rel.type_oids), list(rel.type_mods or ())),
            ).fetchall()
            rel.types = tuple(r[0] for r in rows)
        if rel.oid is None:
            return False, None, True
        audited = self.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM undo.audited WHERE relid = %s)", (rel.oid,)
        ).fetchone()
        attnames = {a[0]: a[1] for a in attrs}
        complete = (
            tuple(a[1] for a in attrs),
            tuple(a[1] for a in attrs if not a[2]),
        )
        # wal2json sends stored generated columns, pgoutput (15) does not: both are complete.
        partial = bool(rel.columns) and rel.columns not in complete
        if not attrs and rel.replident is not None:
            # the table is gone since: pgoutput says what its replica identity was then
            partial = rel.replident != "f"
        key = None
        row = self.conn.execute(_KEY_QUERY, {"oid": rel.oid}).fetchone()
        if row is not None:
            cols = [attnames.get(n) for n in row[0]]
            if all(c in rel.columns for c in cols):
                key = tuple(rel.columns.index(c) for c in cols if c is not None)
        return bool(audited and audited[0]), key, partial


def _slot_state(conn: psycopg.Connection[Any], slot: str) -> tuple[Any, ...] | None:
    return conn.execute(
        "SELECT confirmed_flush_lsn::text, wal_status, active_pid"
        " FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()",
        (slot,),
    ).fetchone()


def check_slot(
    conn: psycopg.Connection[Any], db: Any, slot: str, position: int, accept_gap: bool
) -> int:
    """Refuse a slot that cannot continue the store's trail; return the start position.

    A slot another process holds for a moment (`undo status` or a /metrics scrape peeking at
    it) is waited for, up to SLOT_BUSY_SECONDS."""
    state = _slot_state(conn, slot)
    deadline = time.monotonic() + SLOT_BUSY_SECONDS
    while state is not None and state[2] is not None and time.monotonic() < deadline:
        time.sleep(0.2)
        state = _slot_state(conn, slot)
    if state is None:
        record_gap(db, position, None, f"slot {slot} missing")
        raise SlotGap(
            f"replication slot {slot!r} does not exist: changes since {pg.int_to_lsn(position)}"
            " are lost to the audit trail; run `undo init` to create a new slot (recorded as a gap)"
        )
    confirmed, wal_status, active_pid = state
    if wal_status == "lost":
        record_gap(db, position, None, f"slot {slot} invalidated (wal_status lost)")
        raise SlotGap(
            f"replication slot {slot!r} was invalidated (max_slot_wal_keep_size): changes since"
            f" {pg.int_to_lsn(position)} are lost; run `undo init` to create a new slot"
        )
    if active_pid is not None:
        raise SlotGap(
            f"replication slot {slot!r} is in use by another process (pid {active_pid}):"
            " stop the other consumer first"
        )
    confirmed_lsn = pg.lsn_to_int(confirmed) if confirmed else 0
    if confirmed_lsn > position:
        if accept_gap:
            record_gap(db, position, confirmed_lsn, f"slot {slot} ahead of the store (accepted)")
            return confirmed_lsn
        record_gap(db, position, confirmed_lsn, f"slot {slot} ahead of the store")
        raise SlotGap(
            f"replication slot {slot!r} is at {confirmed}, ahead of the store at"
            f" {pg.int_to_lsn(position)}: it was consumed, advanced or re-created elsewhere, and"
            " the changes between are lost; run `undo capture --accept-gap` to go on from the slot"
        )
    return position


def _read_key(conn: psycopg.Connection[Any]) -> bytes:
    try:
        row = conn.execute("SELECT key FROM undo.secret").fetchone()
    except psycopg.errors.InsufficientPrivilege:
        raise NotReady(
            f"role {conn.info.user} may not read undo.secret, so tags cannot be verified:"
            f" run GRANT SELECT ON undo.secret TO {conn.info.user}; (as the role that ran init)"
        ) from None
    except psycopg.errors.UndefinedTable:
        raise NotReady("the source database is not prepared: run `undo init`") from None
    if row is None:
        raise NotReady("undo.secret is empty: run `undo init` again")
    return bytes(row[0])


class _Session:
    """One replication connection's worth of capture."""

    def __init__(
        self,
        settings: Settings,
        writer: StoreWriter,
        decoder_name: str,
        options: list[tuple[str, str]],
        key: bytes,
        catalog: Catalog,
        on_progress: Callable[[int, int], None] | None,
    ) -> None:
        self.settings = settings
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
        self.last_report, self.reported_changes = now, self.changes
        lag_bytes = max(0, self.wal_end - self.writer.position)
        oldest = self.writer.oldest_unstored
        lag_seconds = round(max(0.0, time.time() - epoch(oldest)), 1) if oldest else 0.0
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
            writer.set_ledger(rec.content)
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
        elif signed.problem is not None:
            return  # a DDL record or a refusal that says nothing usable
        elif rec.prefix == DDL_PREFIX:
            writer.add_ddl(signed.fields, signed.untrusted)
            if signed.untrusted is None and self.decoder.name == "wal2json":
                self._dropped(signed.fields)
        else:  # GUARD_PREFIX
            writer.add_refusal(rec.lsn, signed.fields, signed.untrusted)

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
            sql.Identifier(self.settings.slot), sql.SQL(pg.int_to_lsn(start)), opts
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
                ready, _, _ = select.select([sock], [], [], 0.5)
                if ready:
                    pgconn.consume_input()
                continue
            if n < 0:
                raise ConnectionLost(pgconn.get_error_message())
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
            rec = decode(bytes(data[25:]))
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
) -> CaptureReport:
    """Stream committed changes from the slot into the store.

    ``once``: stop after storing everything committed before the call. Otherwise run until
    ``should_stop()`` says so. Reconnects with backoff when the server goes away.
    """
    db = open_store(settings.store)
    decoder = get_meta(db, "decoder") or "pgoutput"
    slot = get_meta(db, "slot")
    if slot is not None and slot != settings.slot:
        raise UndoError(
            f"the store belongs to slot {slot!r}, not {settings.slot!r}: use --slot {slot}"
        )
    if decoder == "pgoutput":
        options = pgoutput.plugin_options(get_meta(db, "publication") or settings.slot)
    else:
        options = wal2json.plugin_options(get_meta(db, "numbers_as_strings") == "1")
        options.append(("add-msg-prefixes", ",".join(messages.PREFIXES)))
    writer = StoreWriter(db)
    transactions = changes = 0
    attempt = 0
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
                    key = _read_key(conn)
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
                        settings, writer, decoder, options, key, Catalog(conn), on_progress
                    )
                    rconn = pg.connect(settings.dsn, replication="database")
                    behind = pg.wal_after(conn, writer.position)
                    if attempt:
                        log.info("reconnected after %d attempt(s)", attempt, extra=_fields())
                    log.info(
                        "capturing slot %s (%s) from %s; %s bytes of WAL to read",
                        settings.slot,
                        decoder,
                        pg.int_to_lsn(writer.position),
                        f"{behind:,}",
                        extra=_fields(
                            slot=settings.slot,
                            decoder=decoder,
                            position=pg.int_to_lsn(writer.position),
                            lag_bytes=behind,
                        ),
                    )
                    attempt = 0
                    connected = True
                    try:
                        session.run(rconn, writer.position, mark, should_stop)
                    finally:
                        transactions += session.transactions
                        changes += session.changes
                        rconn.pgconn.finish()
                        rconn.close()
                    return CaptureReport(transactions, changes, writer.position)
            except (ConnectionLost, psycopg.OperationalError, DatabaseUnreachable) as e:
                if isinstance(e, DatabaseUnreachable) and not connected:
                    raise
                writer.abort()
                if writer.batch_open:
                    writer.flush()
                attempt += 1
                if should_stop() or (max_attempts is not None and attempt > max_attempts):
                    first = str(e).strip().splitlines()[0] if str(e).strip() else "closed"
                    raise DatabaseUnreachable(
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
        db.conn.close()  # an open batch is rolled back: its position was never confirmed
