"""The slot capture reads: whether it can continue the store's trail, and the key that checks
what undo's SQL signs in it.

A slot consumed or advanced elsewhere, dropped and re-created, or invalidated is a gap in the
audit trail: recorded, and refused unless the operator accepts it.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from undo.core import wal
from undo.core.errors import NotReady, SlotGap, SlotInUse, TryAgain
from undo.source.health import slot_holder
from undo.store.api import Store

#: how long capture waits for a slot another process holds for a moment (a peek by status)
SLOT_BUSY_SECONDS = 5.0


def _slot_state(conn: psycopg.Connection[Any], slot: str) -> tuple[Any, ...] | None:
    return conn.execute(
        "SELECT confirmed_flush_lsn::text, wal_status, active_pid"
        " FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()",
        (slot,),
    ).fetchone()


def check_slot(
    conn: psycopg.Connection[Any], db: Store, slot: str, position: int, accept_gap: bool
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
        db.record_gap(position, None, f"slot {slot} missing")
        raise SlotGap(
            f"replication slot {slot!r} does not exist: changes since {wal.int_to_lsn(position)}"
            " are lost to the audit trail; run `undo init` to create a new slot (recorded as a gap)"
        )
    confirmed, wal_status, active_pid = state
    if wal_status == "lost":
        db.record_gap(position, None, f"slot {slot} invalidated (wal_status lost)")
        raise SlotGap(
            f"replication slot {slot!r} was invalidated (max_slot_wal_keep_size): changes since"
            f" {wal.int_to_lsn(position)} are lost; run `undo init` to create a new slot"
        )
    if active_pid is not None:
        who, gone = slot_holder(conn, active_pid)
        if gone:  # a capture of this machine that is no more: the server lets go in a while
            raise TryAgain(
                f"replication slot {slot!r} is still held for {who}, which has exited: the"
                " server lets it go within wal_sender_timeout; try again then"
            )
        raise SlotInUse(
            f"replication slot {slot!r} is in use by another process: {who}; stop it first"
        )
    confirmed_lsn = wal.lsn_to_int(confirmed) if confirmed else 0
    if confirmed_lsn > position:
        if accept_gap:
            db.record_gap(position, confirmed_lsn, f"slot {slot} ahead of the store (accepted)")
            return confirmed_lsn
        db.record_gap(position, confirmed_lsn, f"slot {slot} ahead of the store")
        raise SlotGap(
            f"replication slot {slot!r} is at {confirmed}, ahead of the store at"
            f" {wal.int_to_lsn(position)}: it was consumed, advanced or re-created elsewhere, and"
            " the changes between are lost; run `undo capture --accept-gap` to go on from the slot"
        )
    return position


def read_key(conn: psycopg.Connection[Any]) -> bytes:
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
