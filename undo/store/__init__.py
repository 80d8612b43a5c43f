"""The audit store: the only code that speaks to one. Everyone else opens a store with
:func:`open_store` and calls the methods of :class:`~undo.store.api.Store` (api.py); the SQLite
file is sqlite.py (its schema _schema.py, writer _writer.py, listings _queries.py, pruning
_prune.py), a PostgreSQL database postgres/ (a ``postgresql://`` URI or a conninfo string: its
schema postgres/_schema.py, writer postgres/_writer.py, the store postgres/_store.py; the
listings are _queries.py's, the same text).
"""

from __future__ import annotations

import os

from undo.core.errors import StoreCorrupt, StoreFault
from undo.store.api import Store


def is_postgres(location: str) -> bool:
    """Whether ``location`` names a PostgreSQL store (a URI or a conninfo), not a file."""
    from undo.store.postgres._schema import is_location

    return is_location(location)


def shown(location: str) -> str:
    """The store as messages and listings may name it: a PostgreSQL store's password masked.

    >>> shown("postgresql://u:secret@db/audit"), shown("undo.db")
    ('dbname=audit host=db password=*** user=u', 'undo.db')
    """
    if is_postgres(location):
        from undo.core.config import masked_dsn

        return masked_dsn(location)
    return location


def open_store(location: str, create: bool = False, source: str | None = None) -> Store:
    """The store at ``location`` (a path: an SQLite file; a ``postgresql://`` URI or a libpq
    conninfo: the schema undo_store of that database), made if ``create``; StoreUnreadable when
    there is none, or it is not an undo store. ``source``: the source it acts for (default: the
    store's only one; with several and none named, reads cover every source and what acts on
    one source asks for a name)."""
    if is_postgres(location):
        from undo.store.postgres._store import PgStore

        return PgStore(location, create, source)
    from undo.store.sqlite import SqliteStore

    return SqliteStore(location, create, source)


def exists(location: str) -> bool:
    """Whether a store is there (`undo init` makes one). A PostgreSQL store is asked (an
    unreachable one is StoreUnreadable)."""
    if is_postgres(location):
        from undo.store.postgres._schema import holds_store

        return holds_store(location)
    return os.path.exists(location)


def store_fault(e: BaseException, location: str) -> StoreFault | None:
    """What an error the store raised means for the person running undo, as one line with the
    fix (StoreBusy: a retry later may do); None for an exception that is not the store's, or
    not about the store itself (a bug, a constraint). By result code, never by message."""
    if is_postgres(location):
        from undo.store.postgres._schema import store_fault as pg_fault

        return pg_fault(e, location)
    from undo.store import _schema

    return _schema.store_fault(e, location)


def is_corrupt(e: BaseException, location: str) -> bool:
    """The store says it is malformed."""
    return isinstance(store_fault(e, location), StoreCorrupt)


def recovery(location: str) -> str:
    """How to get back what can still be read of a corrupt store (after moving it aside)."""
    if is_postgres(location):
        return "restore the store database from its backup (pg_restore, a base backup and WAL)"
    from undo.store.sqlite import recovery

    return recovery(location)
