"""The audit store: the only code that speaks to one. Everyone else opens a store with
:func:`open_store` and calls the methods of :class:`~undo.store.api.Store` (api.py); the SQLite
file is sqlite.py (its schema _schema.py, writer _writer.py, listings _queries.py, pruning
_prune.py).
"""

from __future__ import annotations

import os

from undo.core.errors import StoreCorrupt, StoreFault
from undo.store.api import Store


def open_store(location: str, create: bool = False) -> Store:
    """The store at ``location`` (a path: an SQLite file), made if ``create``; StoreUnreadable
    when there is none, or it is not an undo store."""
    from undo.store.sqlite import SqliteStore

    return SqliteStore(location, create)


def exists(location: str) -> bool:
    """Whether a store is there (`undo init` makes one)."""
    return os.path.exists(location)


def store_fault(e: BaseException, location: str) -> StoreFault | None:
    """What an error the store raised means for the person running undo, as one line with the
    fix (StoreBusy: a retry later may do); None for an exception that is not the store's, or
    not about the store itself (a bug, a constraint). By result code, never by message."""
    from undo.store import _schema

    return _schema.store_fault(e, location)


def is_corrupt(e: BaseException, location: str) -> bool:
    """The store says it is malformed."""
    return isinstance(store_fault(e, location), StoreCorrupt)


def recovery(location: str) -> str:
    """How to get back what can still be read of a corrupt store (after moving it aside)."""
    from undo.store.sqlite import recovery

    return recovery(location)
