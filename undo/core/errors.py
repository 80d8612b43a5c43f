"""The UndoError tree: every failure a user can meet, each with its exit code.

Exit codes follow SPEC.md: 1 for refused or partly done, 2 for bad usage or bad input; and
75 (EX_TEMPFAIL) for a fault that goes away by itself (capture lost its source), 130 for Ctrl-C.
"""

from __future__ import annotations


class UndoError(Exception):
    """Base of every error undo reports to a user as one line."""

    exit_code = 1


class BadInput(UndoError):
    """Malformed input: a time, a key, a filter."""

    exit_code = 2


class NotFound(BadInput):
    """Unknown session, xid or table."""


class DatabaseUnreachable(BadInput):
    """The source database cannot be reached."""


class StoreUnreadable(BadInput):
    """The audit store is missing or is not an undo store."""


class StoreFault(StoreUnreadable):
    """The audit store cannot be used as it is: its disk is full, it is read-only, SQLite
    reports an I/O error; a person must put that right."""


class StoreBusy(StoreFault):
    """Another process held the audit store for longer than undo waits: a retry later may do."""


class StoreCorrupt(StoreFault):
    """SQLite reports the store malformed (SQLITE_CORRUPT, SQLITE_NOTADB)."""


class TryAgain(UndoError):
    """A fault that a retry later puts right: capture lost the source database (or never
    reached it) and gave up. EX_TEMPFAIL, so a service manager restarts it."""

    exit_code = 75


class Interrupted(UndoError):
    """Ctrl-C (SIGINT) before the command finished."""

    exit_code = 130


class NotReady(UndoError):
    """The source database is not ready: wal_level, version, decoder, privileges."""


class SlotGap(UndoError):
    """The slot and the store disagree: changes were lost between them."""


class SlotInUse(SlotGap):
    """Another process holds the slot: a second consumer."""


class Refused(UndoError):
    """The undo was refused: conflicts, un-undoable changes, a failed check."""


class NotRecorded(UndoError):
    """A well-formed question the store holds no answer to: a row with no recorded change."""


class NothingToUndo(NotFound):
    """A rewind to a time after which the store holds no change of those tables."""
