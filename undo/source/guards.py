"""`undo guard`: application names (glob patterns) that may not write to audited tables.

The guards live in the source (``undo.guards``, 003_guard.sql); the tagging trigger checks them
once per writing transaction and fails it with SQLSTATE 25006, recording the attempt in the
stream, which capture stores in ``guard_refusals``. Only the owner of ``undo.guards`` (the role
that ran ``undo init``) may add or remove one.
"""

from __future__ import annotations

from typing import Any

import psycopg

from undo.core.config import Settings
from undo.core.errors import BadInput, NotFound, NotReady, Refused
from undo.source import pg, sources
from undo.store import exists, open_store, shown


def _connect(settings: Settings) -> psycopg.Connection[Any]:
    conn = pg.connect(settings.dsn)
    if conn.execute("SELECT to_regclass('undo.guards')").fetchone() == (None,):
        conn.close()
        raise NotReady("the source database has no guards yet: run `undo init` (again) first")
    return conn


def _check_source(settings: Settings, conn: psycopg.Connection[Any]) -> None:
    """The guards changed are the --dsn database's: as every command acting on one source,
    --dsn must be the source chosen (--source, else its own, else the store's only one;
    sources.bind), never another database (BadInput). No store yet: nothing to check
    against, unless --source names one."""
    if exists(settings.store):
        with open_store(settings.store) as db:
            sources.bind(db, settings, conn)
    elif settings.source is not None:
        raise BadInput(
            f"--source {settings.source}: no audit store {shown(settings.store)} to find it in"
            " (give --store, or leave --source out)"
        )


def _owner_only(conn: psycopg.Connection[Any]) -> Refused:
    row = conn.execute(
        "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'undo.guards'::regclass"
    ).fetchone()
    return Refused(
        f"role {conn.info.user} may not change guards: only {row[0] if row else 'its owner'},"
        " the role that ran `undo init`, may"
    )


def add(settings: Settings, pattern: str, reason: str | None) -> bool:
    """Declare applications matching ``pattern`` read-only; False if it was there already
    (its reason is then updated)."""
    if not pattern.strip():
        raise BadInput("a guard needs a pattern, such as usage-metrics*")
    with _connect(settings) as conn:
        _check_source(settings, conn)
        blocks_undo = conn.execute("SELECT 'undo' LIKE undo.glob_like(%s)", (pattern,)).fetchone()
        if blocks_undo and blocks_undo[0]:
            raise BadInput(
                f"guard {pattern!r} would match undo's own application_name (undo), and stop"
                " every undo: choose a narrower pattern"
            )
        try:
            row = conn.execute(
                "INSERT INTO undo.guards AS g (pattern, reason) VALUES (%s, %s)"
                " ON CONFLICT (pattern) DO UPDATE SET reason = excluded.reason"
                " RETURNING xmax = 0",
                (pattern, reason),
            ).fetchone()
        except psycopg.errors.InsufficientPrivilege:
            raise _owner_only(conn) from None
    return bool(row and row[0])


def remove(settings: Settings, pattern: str) -> None:
    with _connect(settings) as conn:
        _check_source(settings, conn)
        try:
            cur = conn.execute("DELETE FROM undo.guards WHERE pattern = %s", (pattern,))
        except psycopg.errors.InsufficientPrivilege:
            raise _owner_only(conn) from None
        if cur.rowcount == 0:
            raise NotFound(f"no guard {pattern!r}: see `undo guard list`")


def list_guards(settings: Settings) -> list[dict[str, Any]]:
    """The guards, with how many writes each refused as far as the store knows (None: no
    store here)."""
    with _connect(settings) as conn:
        cur = conn.execute(
            "SELECT pattern, reason, to_char(created_at AT TIME ZONE 'UTC',"
            ' \'YYYY-MM-DD"T"HH24:MI:SS"Z"\'), created_by FROM undo.guards ORDER BY pattern'
        )
        found = cur.fetchall()
        counts: dict[str | None, int] | None = None
        source: str | None = None
        if exists(settings.store):
            db = open_store(settings.store)
            try:
                # the guards are the --dsn database's: its source's refusals
                source = sources.bind(db, settings, conn).name
                counts = db.guard_refusal_counts()
            finally:
                db.close()
    rows: list[dict[str, Any]] = [
        {"source": source, "pattern": p, "reason": r, "created_at": at, "created_by": by}
        for p, r, at, by in found
    ]
    for r in rows:
        r["refusals"] = None if counts is None else counts.get(r["pattern"], 0)
    return rows
