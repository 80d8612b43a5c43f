"""`undo status`: the store's view joined with the slot's and the tables' on the source."""

from __future__ import annotations

import os
from typing import Any

from . import pg
from .config import Settings
from .store import queries
from .store.schema import open_store
from .stream.protocol import epoch
from .tagging import unpublishable


def status(settings: Settings) -> dict[str, Any]:
    db = open_store(settings.store)
    result = queries.status(db)
    result["store_position"] = pg.int_to_lsn(result["store_position"])
    result["store_bytes"] = sum(
        os.path.getsize(p) for p in (settings.store, settings.store + "-wal") if os.path.exists(p)
    )
    with pg.connect(settings.dsn) as conn:
        slot = conn.execute(
            "SELECT confirmed_flush_lsn::text, wal_status, active_pid,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (settings.slot,),
        ).fetchone()
        result["slot"] = (
            None
            if slot is None
            else {
                "name": settings.slot,
                "confirmed_flush_lsn": slot[0],
                "wal_status": slot[1],
                "active_pid": slot[2],
                "wal_held_bytes": slot[3],
            }
        )
        # the server's clock, not ours: commit times are the server's
        now = conn.execute("SELECT extract(epoch FROM now())::float8").fetchone()
        result["lag_seconds"] = None
        if result["last_commit_time"] and now:
            result["lag_seconds"] = round(now[0] - epoch(result["last_commit_time"]), 3)
        installed = conn.execute("SELECT to_regclass('undo.config')").fetchone() != (None,)
        schemas: list[str] = []
        if installed:
            row = conn.execute("SELECT schemas FROM undo.config").fetchone()
            schemas = list(row[0]) if row else []
        result["unprepared_tables"] = [
            r[0]
            for r in conn.execute(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p'"
                " AND n.nspname = ANY (%s)"
                " AND (c.relreplident <> 'f' OR NOT EXISTS (SELECT 1 FROM pg_trigger t"
                "   WHERE t.tgrelid = c.oid AND t.tgname = 'undo_tag' AND t.tgenabled = 'A'))"
                " ORDER BY 1",
                (schemas,),
            ).fetchall()
        ]
        result["unpublishable_tables"] = [
            {"table": t, "reason": why} for t, why in unpublishable(conn, schemas)
        ]
    return result
