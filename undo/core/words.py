"""How undo says things in a few words, the same in the terminal and on the dashboard."""

from __future__ import annotations

from typing import Any


def undone(entry: dict[str, Any] | None) -> str | None:
    """What undid a session, in a few words.

    >>> undone({"undone_at": "2026-01-19T10:30:00Z", "undo_xid": 812, "all": False})
    'part, by xid 812 at 2026-01-19T10:30:00Z'
    """
    if entry is None:
        return None
    how = "all" if entry["all"] else "part"
    return f"{how}, by xid {entry['undo_xid']} at {entry['undone_at']}"


def tag(tag: str, reason: str | None) -> str:
    """A transaction's tag and why it is not trusted.

    >>> tag("untrusted", "forged")
    'untrusted (forged)'
    """
    return f"{tag} ({reason})" if reason else tag
