"""Rendering for the terminal: aligned tables and JSON. No decisions here."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from undo.core import words


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


# -- undo show ---------------------------------------------------------------------------


def images(change: dict[str, Any], indent: str) -> Iterator[str]:
    """Old and new values as col=value (NULL for null; long values shortened: --json has them
    whole); for an update, the new row shows only what changed."""
    old, new = change["old"], change["new"]
    if old is not None:
        yield (f"{indent}old: {pairs(old)}")
    if new is not None:
        if old is not None:
            new = {k: v for k, v in new.items() if old.get(k) != v}
        yield (f"{indent}new: {pairs(new) if new else '(no value changed)'}")


def show(result: dict[str, Any], limit: int | None) -> Iterator[str]:
    """`undo show`: the summary, then each transaction and its changes (at most ``limit``)."""
    txns, totals = result["transactions"], result["totals"]
    yield (
        f"session {result['session_id']}: {totals['transactions']} transaction(s),"
        f" {totals['changes']} change(s)"
    )
    if result.get("undone"):
        yield (f"undone: {words.undone(result['undone'])}")
    for d in result.get("ddl") or []:
        yield (
            f"DDL {d['command']} {d['object'] or ''}  xid {d['xid']}  {d['commit_time']}"
            f"  statement: {d['statement'] or ''}"
            + ("" if d["tag"] == "trusted" else f"  tag {d['tag']} ({d['tag_reason']})")
        )
    for g in result.get("guard_refusals") or []:
        yield (
            f"refused by guard {g['guard']} at {g['refused_at']}"
            + (f" ({g['reason']})" if g["reason"] else "")
            + f": {g['statement'] or ''}"
            + ("" if g["tag"] == "trusted" else f"  tag {g['tag']} ({g['tag_reason']})")
        )
    for m in result.get("malformed") or []:
        yield (
            f"malformed {m['prefix']} message at {m['received_at']}  xid {m['xid'] or ''}:"
            f" {m['problem']} (kept in the store's malformed table, never used)"
        )
    if totals["rows"]:
        yield ("\n" + table(totals["rows"], ["table", "operation", "rows"]))
    shown = [0]  # changes printed, by both lists: at most ``limit`` in all
    yield from _transactions(txns, shown, limit)
    claims = result["untrusted"]
    total = totals["changes"] + claims["totals"]["changes"]
    if claims["transactions"]:  # listed apart: not the session's, not in its totals
        c = claims["totals"]
        yield (
            f"\nuntrusted: {c['transactions']} transaction(s), {c['changes']} change(s), claim"
            " this session with a tag that does not verify (not counted above; `undo session`"
            " leaves them out)"
        )
        if claims.get("undone"):
            yield (f"undone: {words.undone(claims['undone'])}")
        if c["rows"]:
            yield (table(c["rows"], ["table", "operation", "rows"]))
        yield from _transactions(claims["transactions"], shown, limit)
    if shown[0] < total:
        yield (f"\n({total - shown[0]} more change(s): --limit N or --all to see them)")


def _transactions(txns: list[dict[str, Any]], shown: list[int], limit: int | None) -> Iterator[str]:
    """Each transaction and its changes, until ``shown[0]`` changes printed reach ``limit``."""
    for t in txns:
        if limit is not None and shown[0] >= limit:
            break
        yield (
            f"\nxid {t['xid']}  {t['commit_time']}  {t['application_name'] or ''}"
            f"  {t['user'] or ''}  tag {t['tag']}"
            + (f" ({t['tag_reason']})" if t.get("tag_reason") else "")
        )
        yield (f"  statement: {t['statement'] or ''}")
        for c in t["changes"]:
            if limit is not None and shown[0] >= limit:
                break
            shown[0] += 1
            yield (f"  {c['op']:8} {c['table']}  {key(c['key_columns'], c['key'])}")
            yield from images(c, "    ")


def check(result: dict[str, Any]) -> str:
    """`undo check`: what the store audits, then each problem and its fix, then notes.

    >>> print(check({"ok": False, "audits": {"database": "shop", "schemas": ["public"],
    ...     "tables": ["public.t"], "slot": "undo", "slot_database": "shop",
    ...     "decoder": "pgoutput", "publication": "undo", "store": "undo.db"},
    ...     "problems": [{"check": "table", "subject": "public.t", "problem": "no trigger",
    ...     "fix": "`undo init`"}], "notes": ["no capture holds slot undo now"]}))
    store     undo.db
    audits    database shop, schemas public, 1 table(s)
    through   slot undo (database shop), decoder pgoutput, publication undo
    PROBLEM   public.t: no trigger
      fix:    `undo init`
    note:     no capture holds slot undo now
    1 problem(s)
    """
    a = result["audits"]
    lines = [f"store     {a['store']}"]
    if "database" in a:
        whose = f"database {a['slot_database']}" if a.get("slot_database") else "missing"
        lines.append(
            f"audits    database {a['database']}, schemas"
            f" {', '.join(a.get('schemas') or []) or '(none)'}, {len(a.get('tables') or [])}"
            " table(s)"
        )
        lines.append(
            f"through   slot {a.get('slot')} ({whose}), decoder {a.get('decoder')},"
            f" publication {a.get('publication') or '(none: wal2json)'}"
        )
    for p in result["problems"]:
        lines.append(f"PROBLEM   {p['subject']}: {p['problem']}")
        lines.append(f"  fix:    {p['fix']}")
    lines += [f"note:     {n}" for n in result["notes"]]
    n = len(result["problems"])
    lines.append(f"{n} problem(s)" if n else "ok: nothing wrong")
    return "\n".join(lines)
