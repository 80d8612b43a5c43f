"""`undo status`: the store's view joined with the slot's and the tables' on the source."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import psycopg

from undo.core import wal
from undo.core.config import Settings
from undo.core.errors import StoreCorrupt
from undo.core.times import epoch, iso
from undo.source import health, pg, sources
from undo.source.install import statements_mode, unprepared, unpublishable
from undo.store import is_corrupt, open_store
from undo.store.api import Store

PEEK_ROWS = 10_000


def lag(
    conn: psycopg.Connection[Any],
    db: Store,
    settings: Settings,
    active: bool,
    peek: bool = True,
) -> dict[str, Any]:
    """How far the store is behind the source.

    lag_bytes: the server's current WAL position minus the store's position. lag_seconds: the
    age of the oldest commit not yet stored, 0 when there is none. While a capture holds the
    slot, from what it last reported (each batch it commits; ``lag_reported_at``), or, while it
    writes a batch, from the commit time of the batch's first transaction, which it records
    when it starts writing it (a long transaction is behind for as long as it is written);
    otherwise by
    peeking at the slot's first pending transaction, which decodes that transaction without
    consuming it (None where the slot cannot be peeked: missing, just taken, no privilege;
    or not ``peek``: another database's slot, never taken even for a moment)."""
    out: dict[str, Any] = {"lag_bytes": None, "lag_seconds": None}
    out["lag_bytes"] = pg.wal_after(conn, int(db.meta("position") or 0))
    if active:
        report = json.loads(db.meta("capture_lag") or "null")
        if report is not None:
            pending = report.get("pending_since")
            out["lag_seconds"] = (
                report["lag_seconds"]
                if pending is None
                else round(max(0.0, time.time() - epoch(pending)), 3)
            )
            out["lag_reported_at"] = iso(datetime.fromtimestamp(report["at"], UTC))
        return out
    if not peek:
        return out
    decoder = db.meta("decoder") or "pgoutput"
    # The first pending transaction that changes a row: a decoder also sends transactions that
    # change nothing audited (wal2json every one, pgoutput on 14 the empty ones), which capture
    # reads past without storing. Up to PEEK_ROWS rows are decoded (whole transactions).
    if decoder == "pgoutput":
        # a Begin is 'B', the final LSN, then the commit time in microseconds since 2000-01-01
        query = (
            "WITH p AS MATERIALIZED (SELECT lsn, xid, data"
            " FROM pg_logical_slot_peek_binary_changes(%s, NULL, %s, 'proto_version', '1',"
            " 'publication_names', %s))"
            " SELECT extract(epoch FROM now()) - (946684800 + ('x' || encode("
            "substr(b.data, 10, 8), 'hex'))::bit(64)::bigint / 1e6) FROM p b"
            " WHERE get_byte(b.data, 0) = 66 AND EXISTS (SELECT FROM p c WHERE c.xid = b.xid"
            " AND get_byte(c.data, 0) IN (73, 85, 68, 84)) ORDER BY b.lsn LIMIT 1"
        )
        params: tuple[Any, ...] = (
            settings.slot,
            PEEK_ROWS,
            db.meta("publication") or settings.slot,
        )
    else:
        query = (
            "WITH p AS MATERIALIZED (SELECT lsn, xid, data::json AS d"
            " FROM pg_logical_slot_peek_changes(%s, NULL, %s, 'format-version', '2',"
            " 'include-timestamp', '1'))"
            " SELECT extract(epoch FROM now() - (b.d ->> 'timestamp')::timestamptz) FROM p b"
            " WHERE b.d ->> 'action' = 'B' AND EXISTS (SELECT FROM p c WHERE c.xid = b.xid"
            " AND c.d ->> 'action' IN ('I', 'U', 'D', 'T')) ORDER BY b.lsn LIMIT 1"
        )
        params = (settings.slot, PEEK_ROWS)
    try:
        with conn.transaction():
            row = conn.execute(query, params).fetchone()
    except psycopg.Error:
        return out
    out["lag_seconds"] = 0.0 if row is None else round(max(0.0, float(row[0])), 3)
    return out


def _slot_row(conn: psycopg.Connection[Any], slot: str) -> tuple[Any, ...] | None:
    """The slot of that name (health.judge reads it): confirmed_flush_lsn, wal_status,
    active_pid, WAL held, its database, whether that is this one, its plugin."""
    return conn.execute(
        "SELECT confirmed_flush_lsn::text, wal_status, active_pid,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,"
        " coalesce(database, '') AS database, database = current_database() AS ours, plugin"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()


def status(settings: Settings) -> dict[str, Any]:
    with pg.connect(settings.dsn) as conn, sources.open_for(settings, conn) as db:
        return _status(settings, conn, db)


def _status(settings: Settings, conn: psycopg.Connection[Any], db: Store) -> dict[str, Any]:
    stored = db.status()
    # `undo status --json`: what the store says of itself, then what the source says
    result: dict[str, Any] = stored.to_json()
    result["store_position"] = wal.int_to_lsn(stored.store_position)
    result["store_bytes"] = db.size()
    # slot names are per cluster: a slot of this name may be another database's, and
    # then it is not this database's slot (slot: null), but status says whose it is
    slot = _slot_row(conn, settings.slot)
    ours = slot is not None and bool(slot[5])
    result["slot"] = (
        None
        if slot is None or not ours
        else {
            "name": settings.slot,
            "confirmed_flush_lsn": slot[0],
            "wal_status": slot[1],
            "active_pid": slot[2],
            # who that walsender serves: another capture names its own pid and host
            "held_by": None if slot[2] is None else health.slot_holder(conn, slot[2])[0],
            "wal_held_bytes": slot[3],
        }
    )
    result["slot_database"] = None if slot is None else slot[4]
    result.update(
        lag(
            conn,
            db,
            settings,
            active=ours and slot is not None and slot[2] is not None,
            peek=ours,
        )
    )
    installed = conn.execute("SELECT to_regclass('undo.config')").fetchone() != (None,)
    schemas: list[str] = []
    if installed:
        row = conn.execute("SELECT schemas FROM undo.config").fetchone()
        schemas = list(row[0]) if row else []
    result["unprepared_tables"] = unprepared(conn, schemas) if installed else []
    result["unpublishable_tables"] = [
        {"table": t, "reason": why} for t, why in unpublishable(conn, schemas)
    ]
    # undo init --statements: each, first (None: not installed, or before the mode)
    result["statements"] = statements_mode(conn)
    # what `undo check` says is wrong, with its fixes (lag judged by check alone: status
    # shows it, the threshold is the caller's)
    found = health.judge(conn, db, settings, slot, result, None, stored.gaps, deep=False)
    result["problems"] = [p.as_dict() for p in found.problems]
    return result


#: undo check's default --max-lag, in seconds (the alert rules' 5 minutes)
MAX_LAG_SECONDS = 300.0


def check(settings: Settings, max_lag: float = MAX_LAG_SECONDS) -> dict[str, Any]:
    """`undo check`: what this store audits, what is wrong with each fix (health.judge), and
    notes; the store checked by its own check too (SQLite's quick_check). ``ok`` when nothing
    is wrong."""
    try:
        db = open_store(settings.store)
    except StoreCorrupt as e:  # not even its schema can be read
        return {
            "ok": False,
            "audits": {"store": settings.store},
            "problems": [health.corrupt(settings.store, str(e)).as_dict()],
            "notes": [],
        }
    measured: dict[str, Any] = {}
    try:
        with pg.connect(settings.dsn) as conn:
            sources.bind(db, settings, conn)
            gaps = db.status().gaps
            slot = _slot_row(conn, settings.slot)
            ours = slot is not None and bool(slot[5])
            measured = lag(
                conn,
                db,
                settings,
                active=ours and slot is not None and slot[2] is not None,
                peek=ours,
            )
            found = health.judge(conn, db, settings, slot, measured, max_lag, gaps, deep=True)
    except Exception as e:
        if not is_corrupt(e, settings.store):
            raise
        # a store too broken to read what the other checks need: what the store says of it
        found = health.Health(
            {"store": settings.store},
            [health.corrupt(settings.store, f"{db.engine}: {e}")]
            + [
                health.corrupt(settings.store, f"{db.engine}'s quick_check: {x}")
                for x in db.quick_check()
            ],
            [],
        )
    finally:
        db.close()
    return {
        "ok": not found.problems,
        "audits": found.audits,
        "lag_seconds": measured.get("lag_seconds"),
        "lag_bytes": measured.get("lag_bytes"),
        "problems": [p.as_dict() for p in found.problems],
        "notes": found.notes,
    }
