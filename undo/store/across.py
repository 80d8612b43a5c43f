"""Listings over several sources of one store (#22). `sessions` and `activity` read them in
one query each (the store's store-wide reader: ``sources=``); `show` and `history` read each
source as the store reads one (:meth:`~undo.store.api.Store.use`) and merge the rows in the
listing's order. Every row carries its source's name; a session id or an xid is looked up
within each source, and one found in more than one asks which."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from undo.core.errors import BadInput, NotFound, NotRecorded, StoreUnreadable, UndoError
from undo.core.times import epoch, session_start
from undo.store.api import ActivityBucket, HistoryVersion, Normalise, SessionRow, Shown, Store

T = TypeVar("T")


def _gather(
    store: Store, names: Sequence[str], read: Callable[[], list[T]]
) -> tuple[list[T], list[UndoError]]:
    """Each source's rows; the errors of those whose read failed on what the user asked (a
    table it does not hold, a row it never changed)."""
    rows: list[T] = []
    errors: list[UndoError] = []
    for name in names:
        store.use(name)
        try:
            rows += read()
        except (BadInput, NotRecorded) as e:
            if len(names) == 1 or isinstance(e, StoreUnreadable):
                raise
            errors.append(e)
    return rows, errors


def _raise_if_none(found: bool, errors: list[UndoError]) -> None:
    """Nothing found anywhere: the first error of a source that held what was asked for (not
    an unknown table), else the first."""
    if found or not errors:
        return
    raise next((e for e in errors if not isinstance(e, NotFound)), errors[0])


def sessions(
    store: Store, names: Sequence[str], limit: int | None = None, offset: int = 0, **kw: Any
) -> list[SessionRow]:
    """`undo sessions` over these sources, newest first: several in one query (the store's
    store-wide reader; each source's read in turn and merged took 2,550 sessions of each
    for page 50 of the dashboard)."""
    if len(names) == 1:
        store.use(names[0])
        return store.sessions(limit=limit, offset=offset, **kw)
    return store.sessions(limit=limit, offset=offset, sources=names, **kw)


def show(
    store: Store, names: Sequence[str], session_id: str | None = None, xid: int | None = None
) -> Shown:
    """`undo show`: the session or transaction in the one source that has it."""
    found: list[Shown] = []
    errors: list[UndoError] = []
    for name in names:
        store.use(name)
        try:
            found.append(store.show(session_id=session_id, xid=xid))
        except NotFound as e:
            errors.append(e)
    if len(found) > 1:
        what = f"session {session_id}" if session_id is not None else f"xid {xid}"
        raise BadInput(
            f"{what} is in several sources ({', '.join(str(s.source) for s in found)}):"
            " name one with --source"
        )
    if not found and session_id is not None:
        for name in names:  # none kept: it may have written before a prune's cut
            store.use(name)
            why = pruned_session(store, session_id)
            if why is not None:
                raise NotRecorded(why)
    if not found:
        raise errors[0] if errors else NotFound("the audit store holds no source yet")
    return found[0]


def pruned_session(store: Store, session_id: str) -> str | None:
    """Why the source ``store`` acts for may hold no transaction of a session it once held:
    the id says the session began before the cut of `undo prune` (to the second: maybe before
    it), so whatever it committed before then is gone. None when it cannot be so (no prune, a
    later start, an id that is no session's start)."""
    cut = store.meta("pruned_before")
    began = session_start(session_id)
    if cut is None or began is None or began > int(epoch(cut)):
        return None
    return (
        f"the audit store holds no transaction of session {session_id}, which began before"
        f" {cut}, where the store's history was pruned (undo prune): whatever it committed"
        " before then is gone"
    )


def history(
    store: Store,
    names: Sequence[str],
    table: str,
    key: dict[str, str | None],
    normalise: Normalise,
) -> list[HistoryVersion]:
    """`undo history` over these sources: the row's versions in each, oldest first."""
    rows, errors = _gather(store, names, lambda: store.history(table, key, normalise))
    _raise_if_none(bool(rows), errors)
    if len(names) > 1:  # one source's are in its order already (commit LSN, then change)
        rows.sort(key=lambda r: r.commit_time)
    return rows


def activity(store: Store, names: Sequence[str], **kw: Any) -> list[ActivityBucket]:
    """`undo activity` over these sources, by bucket, then source (several: in one query)."""
    if len(names) == 1:
        store.use(names[0])
        return store.activity(**kw)
    rows = store.activity(sources=names, **kw)
    rows.sort(key=lambda r: (r.bucket, r.source or "", r.name or ""))
    return rows
