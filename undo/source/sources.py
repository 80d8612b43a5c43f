"""Which source of the store a command acts for (#22), and that --dsn is that source.

A store holds many source databases, each registered by `undo init` under a name, with the
server's system identifier and the database's name, which tell databases apart (two servers
may each have a database ``shop``; a restored copy keeps the name and gets a new identifier).
A command that acts on one source chooses it: ``--source``, else the source the ``--dsn``
database is registered as, else the store's only source; none of these deciding is BadInput
naming the sources. Then the ``--dsn`` database must be that source: an undo of one source's
changes is never applied to another database.
"""

from __future__ import annotations

from typing import Any

import psycopg

from undo.core.config import Settings
from undo.core.errors import BadInput
from undo.store import open_store, shown
from undo.store.api import Source, Store


def identity(conn: psycopg.Connection[Any]) -> tuple[str, str]:
    """(the server's system identifier, the database's name) of a source connection."""
    row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
    return (str(row[0]) if row else "", str(conn.info.dbname))


def _names(known: list[Source]) -> str:
    return ", ".join(s.name for s in known) or "none"


def choose(
    store: Store,
    settings: Settings,
    ident: tuple[str, str] | None,
    conn: psycopg.Connection[Any] | None = None,
) -> Source:
    """The source a command acts for, which the store then acts for (``ident``: the --dsn
    database's identity, None when it did not answer), checked against ``ident`` (``conn``:
    the --dsn connection, which alone lets a source made before sources be claimed)."""
    known = store.sources()
    wanted = settings.source
    found: Source | None
    if wanted is not None:
        found = next((s for s in known if s.name == wanted), None)
        if found is None:
            raise BadInput(
                f"no source {wanted!r} in the audit store {shown(settings.store)} (its sources:"
                f" {_names(known)}): `undo init --source {wanted}` registers one"
            )
    else:
        found = next(
            (s for s in known if ident and (s.system_identifier, s.database_name) == ident), None
        )
        if found is None and len(known) == 1:
            found = known[0]
        if found is None:
            if not known:
                raise BadInput(
                    f"the audit store {shown(settings.store)} has no source yet: run `undo init`"
                )
            raise BadInput(
                f"which source? the audit store {shown(settings.store)} holds {_names(known)},"
                + (
                    f" and --dsn (database {ident[1]}) is none of them"
                    if ident
                    else " and --dsn did not say which"
                )
                + ": name one with --source"
            )
    if ident is not None:
        found = verify(store, settings, found, ident, conn)
    store.use(found.name)
    return found


def verify(
    store: Store,
    settings: Settings,
    src: Source,
    ident: tuple[str, str],
    conn: psycopg.Connection[Any] | None = None,
) -> Source:
    """``src`` when the --dsn database (``ident``) is it; a source of a store made before
    sources is claimed by the first database a command connects to for it (``conn``) that
    its slot lives in. Else BadInput: a database on a new server (the identifier changed) says
    how to register it again."""
    sysid, dbname = ident
    if not src.claimed:
        _claimable(store, settings, src, dbname, conn)
        name = store.register_source(None, sysid, dbname)
        return next(s for s in store.sources() if s.name == name)
    if (src.system_identifier, src.database_name) == ident:
        return src
    if src.database_name == dbname:
        raise BadInput(
            f"the source {src.name!r} is database {dbname} of the server with system identifier"
            f" {src.system_identifier}, and --dsn's server has {sysid}: a new server (pg_upgrade,"
            " a restore into a new cluster?) or another one. If it is the same database, register"
            f" it again: `undo init --source {src.name} --reregister` (capture then goes on from"
            " its slot's position there; what the old server committed after the store's"
            " position is a gap)"
        )
    raise BadInput(
        f"--dsn is database {dbname} (server {sysid}), not the source {src.name!r} (database"
        f" {src.database_name} of server {src.system_identifier}): point --dsn at the source,"
        " or name the database's own source with --source"
    )


def bind(store: Store, settings: Settings, conn: psycopg.Connection[Any]) -> Source:
    """:func:`choose` for a command connected to the source."""
    return choose(store, settings, identity(conn), conn)


def _claimable(
    store: Store,
    settings: Settings,
    src: Source,
    dbname: str,
    conn: psycopg.Connection[Any] | None,
) -> None:
    """An unclaimed source (a store made before sources) has no identity to check --dsn
    against, only its slot: the --dsn database claims it only when that slot lives there (a
    copy made with CREATE DATABASE ... TEMPLATE, or any other database, never does). Else
    BadInput naming the slot and its database."""
    store.use(src.name)
    slot = store.meta("slot")
    home: str | None = None
    if slot is not None and conn is not None:
        row = conn.execute(
            "SELECT database FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        home = None if row is None else row[0]
        if home == dbname:
            return
    where = f"database {home}" if home else "on no database of --dsn's server"
    raise BadInput(
        f"the audit store {shown(settings.store)} was made before sources: its source"
        f" {src.name!r} is claimed only by the database of its slot {slot or '(none recorded)'}"
        f" ({where}), and --dsn is database {dbname}: give the --dsn of that slot's database"
        + ("" if home else " (if the slot is gone, `undo init` there makes it again and claims it)")
    )


def selected(store: Store, settings: Settings) -> list[str]:
    """The sources a listing covers: those --source names (each must be the store's), else
    every source."""
    known = store.sources()
    if not settings.sources:
        return [s.name for s in known]
    names = {s.name for s in known}
    for n in settings.sources:
        if n not in names:
            raise BadInput(
                f"no source {n!r} in the audit store {shown(settings.store)} (its sources:"
                f" {_names(known)})"
            )
    return list(dict.fromkeys(settings.sources))


def open_for(settings: Settings, conn: psycopg.Connection[Any] | None = None) -> Store:
    """The store, acting for the source the command acts on (:func:`choose`), checked against
    the --dsn database (``conn``; else a connection of its own)."""
    from undo.source import pg

    db = open_store(settings.store)
    try:
        if conn is not None:
            bind(db, settings, conn)
        else:
            with pg.connect(settings.dsn) as own:
                bind(db, settings, own)
    except BaseException:
        db.close()
        raise
    return db
