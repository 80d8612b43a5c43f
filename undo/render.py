"""Rendering for the terminal: aligned tables and JSON. No decisions here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as an aligned text table.

    >>> print(table([{"a": 1, "b": "xy"}], ["a", "b"]))
    a  b
    -  --
    1  xy
    """
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list | tuple):
        return ",".join(str(x) for x in v)
    s = str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def undone(entry: dict[str, Any] | None) -> str | None:
    """What undid a session, in a few words.

    >>> undone({"undone_at": "2026-01-19T10:30:00Z", "undo_xid": 812, "all": False})
    'part, by xid 812 at 2026-01-19T10:30:00Z'
    """
    if entry is None:
        return None
    how = "all" if entry["all"] else "part"
    return f"{how}, by xid {entry['undo_xid']} at {entry['undone_at']}"
