"""Rendering for the terminal: aligned tables and JSON. No decisions here."""

from __future__ import annotations

import json
import logging
import time
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


def value(v: str | None, limit: int = 120) -> str:
    """A stored value as psql would show it: NULL for null, long ones shortened.

    >>> value(None), value("x" * 130)[-20:]
    ('NULL', '... (130 characters)')
    """
    if v is None:
        return "NULL"
    return v if len(v) <= limit else f"{v[:limit]}... ({len(v)} characters)"


def pairs(values: dict[str, str | None]) -> str:
    """Values as col=value.

    >>> pairs({"id": "7", "email": None})
    'id=7, email=NULL'
    """
    return ", ".join(f"{k}={value(v)}" for k, v in values.items())


def key(columns: Sequence[str] | None, values: Sequence[str | None] | None) -> str:
    """A row's key as col=value, or a note for a keyless table.

    >>> key(["id"], ["7"]), key(None, None)
    ('id=7', '(no key)')
    """
    if not columns or values is None:
        return "(no key)"
    return pairs(dict(zip(columns, values, strict=False)))


def fields(doc: dict[str, Any]) -> str:
    """A document as aligned `name  value` lines, as psql's expanded display: nested objects
    as dotted names, lists one item per line, null as NULL.

    >>> print(fields({"slot": {"name": "undo", "active_pid": None}, "gaps": []}))
    slot.name        undo
    slot.active_pid  NULL
    gaps             (none)
    """
    flat: list[tuple[str, str]] = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        elif isinstance(v, list):
            if not v:
                flat.append((prefix, "(none)"))
            for i, x in enumerate(v):
                name = prefix if i == 0 else ""
                if isinstance(x, dict):
                    flat.append((name, pairs({k: _text(y) for k, y in x.items()})))
                else:
                    flat.append((name, _text(x) or "NULL"))
        else:
            flat.append((prefix, "NULL" if v is None else str(v)))

    walk("", doc)
    width = max((len(k) for k, _ in flat), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in flat)


def _text(v: Any) -> str | None:
    return None if v is None else str(v)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, message and the line's structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        return json.dumps(doc, ensure_ascii=False, default=str)
