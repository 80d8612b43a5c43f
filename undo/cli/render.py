"""Rendering for the terminal: aligned tables, psql's expanded display, CSV and JSON. No
decisions here."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, replace
from typing import Any

from undo.cli import json_line
from undo.core import words
from undo.store.api import HistoryVersion, Image, JsonDoc, Shown, ShownTransaction, Undone


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
    s = _SPACES.sub(" ", str(v))
    return s if len(s) <= 60 else s[:57] + "..."


_SPACES = re.compile(r"\s*[\r\n\t\v\f]\s*")  # a statement's lines, in one cell: one line
_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.\d+Z")


def second(v: Any) -> Any:
    """A store time to the second, for a table (JSON and CSV keep it whole).

    >>> second("2026-01-19T10:25:31.123456Z"), second(None), second(7)
    ('2026-01-19T10:25:31Z', None, 7)
    """
    if isinstance(v, str):
        m = _TIME.fullmatch(v)
        if m:
            return m.group(1) + "Z"
    return v


def count(n: int, word: str = "row") -> str:
    """psql's footer.

    >>> count(0), count(1), count(2, "version")
    ('(0 rows)', '(1 row)', '(2 versions)')
    """
    return f"({n} {word}{'' if n == 1 else 's'})"


def expanded(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as psql's expanded display (``\\x``): one record per row, one field a line.

    >>> print(expanded([{"a": 1, "bb": "xy"}], ["a", "bb"]))
    -[ RECORD 1 ]
    a  | 1
    bb | xy
    >>> expanded([], ["a"])
    '(0 rows)'
    """
    if not rows:
        return count(0)
    name_width = max(len(c) for c in columns)
    cells = [[_field(r.get(c)) for c in columns] for r in rows]
    value_width = max((len(v) for row in cells for v in row), default=0)
    lines: list[str] = []
    for i, row in enumerate(cells, 1):
        label = f"-[ RECORD {i} ]"
        if len(label) < name_width + 1:
            label = label.ljust(name_width + 1, "-") + "+"
            label = label.ljust(name_width + 3 + value_width, "-")
        lines.append(label)
        lines += [
            f"{c.ljust(name_width)} | {v}".rstrip() for c, v in zip(columns, row, strict=True)
        ]
    return "\n".join(lines)


def _field(v: Any) -> str:
    """A value in a record: whole (a record has the width), on one line."""
    if v is None:
        return ""
    if isinstance(v, list | tuple):
        return ",".join(str(x) for x in v)
    if isinstance(v, dict):
        return pairs({k: _text(x) for k, x in v.items()})
    return _SPACES.sub(" ", str(v))


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as CSV with a header, as psql --csv: NULL empty, times whole, lists and objects
    as JSON.

    >>> print(to_csv([{"a": None, "b": ["x", "y"], "c": 'say "hi" now'}], ["a", "b", "c"]), end="")
    a,b,c
    ,"[""x"", ""y""]","say ""hi"" now"
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_csv_cell(r.get(c)) for c in columns])
    return buf.getvalue()


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list | tuple | dict):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


def listing(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    fmt: str,
    expand: bool = False,
    more: bool = False,
) -> str:
    """A listing in the format asked: ``table`` (aligned, times to the second, psql's
    ``(N rows)``; ``expand``: records), ``csv`` or ``json`` (everything, times whole).
    ``more``: the listing was cut at --limit."""
    if fmt == "json":
        return to_json(list(rows))
    if fmt == "csv":
        return to_csv(rows, columns).rstrip("\n")
    shown = [{k: second(v) for k, v in r.items()} for r in rows]
    text = expanded(shown, columns) if expand else table(shown, columns)
    footer = "" if expand else count(len(rows))  # psql: records need no count; none: (0 rows)
    if more:
        footer += (" " if footer else "") + "(more with a higher --limit)"
    return text + ("\n" + footer if footer else "")


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
        return json_line(
            record.levelname.lower(),
            record.getMessage(),
            record.created,
            **getattr(record, "fields", {}),
        )


# -- undo show ---------------------------------------------------------------------------


def images(old: Image | None, new: Image | None, indent: str) -> Iterator[str]:
    """Old and new values as col=value (NULL for null; long values shortened: --json has them
    whole); for an update, the new row shows only what changed."""
    if old is not None:
        yield (f"{indent}old: {pairs(old)}")
    if new is not None:
        if old is not None:
            new = {k: v for k, v in new.items() if old.get(k) != v}
        yield (f"{indent}new: {pairs(new) if new else '(no value changed)'}")


def show(
    result: Shown, limit: int | None, expand: bool = False, sourced: bool = False
) -> Iterator[str]:
    """`undo show`: the summary, then every transaction and its statement, then the row
    changes (at most ``limit``), as the dashboard's session page: what ran is never cut by
    the limit, which cuts the changes only. ``expand``: transactions and changes as records.
    ``sourced``: the store holds several sources; the session's is named."""
    txns, totals = result.transactions, result.totals
    yield (
        f"session {result.session_id}: {totals.transactions} transaction(s),"
        f" {totals.changes} change(s)"
    )
    if sourced:
        yield f"source: {result.source}"
    if result.undone:
        yield (f"undone: {undone(result.undone)}")
    for d in result.ddl:
        yield (
            f"DDL {d.command} {d.object or ''}  xid {d.xid}  {second(d.commit_time)}"
            f"  statement: {d.statement or ''}"
            + ("" if d.tag == "trusted" else f"  tag {d.tag} ({d.tag_reason})")
        )
    for g in result.guard_refusals:
        yield (
            f"refused by guard {g.guard} at {second(g.refused_at)}"
            + (f" ({g.reason})" if g.reason else "")
            + f": {g.statement or ''}"
            + ("" if g.tag == "trusted" else f"  tag {g.tag} ({g.tag_reason})")
        )
    malformed = result.malformed
    for m in malformed[:10]:
        yield (
            f"malformed {m.prefix} message at {second(m.received_at)}  xid {m.xid or ''}:"
            f" {m.problem} (kept in the store's malformed table, never used)"
        )
    more = result.malformed_count - min(len(malformed), 10)
    if more > 0:
        yield f"({more} more malformed message(s): the store's malformed table has them all)"
    if totals.rows:
        yield ("\n" + table([asdict(r) for r in totals.rows], ["table", "operation", "rows"]))
    shown = [0]  # changes printed, by both lists: at most ``limit`` in all
    yield from _statements(txns, expand)
    yield from _transactions(txns, shown, limit, expand)
    claims = result.untrusted
    total = totals.changes + claims.totals.changes
    if claims.transactions:  # listed apart: not the session's, not in its totals
        c = claims.totals
        yield (
            f"\nuntrusted: {c.transactions} transaction(s), {c.changes} change(s), claim"
            " this session with a tag that does not verify (not counted above; `undo session`"
            " leaves them out)"
        )
        if claims.undone:
            yield (f"undone: {undone(claims.undone)}")
        if c.rows:
            yield (table([asdict(r) for r in c.rows], ["table", "operation", "rows"]))
        yield from _statements(claims.transactions, expand)
        yield from _transactions(claims.transactions, shown, limit, expand)
    if shown[0] < total:
        yield (f"\n({total - shown[0]} more change(s): --limit N or --all to see them)")


def undone(entry: Undone | None) -> str | None:
    """What undid a session, in a few words, its time to the second (None: nothing did)."""
    if entry is None:
        return None
    return words.undone({**entry.to_json(), "undone_at": second(entry.undone_at)})


def ops(changes: Iterable[str]) -> str:
    """A transaction's changes by operation (each change's op), in a few words.

    >>> ops(["delete", "update", "delete"])
    '2 delete(s), 1 update(s)'
    """
    counts: dict[str, int] = {}
    for op in changes:
        counts[op] = counts.get(op, 0) + 1
    return ", ".join(f"{n} {op}(s)" for op, n in counts.items()) or "no row change"


_STATEMENT_FIELDS = [
    "xid",
    "commit_time",
    "application_name",
    "user",
    "tag",
    "changes",
    "statement",
]


def _statements(txns: Sequence[ShownTransaction], expand: bool) -> Iterator[str]:
    """Every transaction, what it changed, and its statement (whole; its lines indented)."""
    if not txns:
        return
    yield "\nstatements:"
    if expand:
        yield expanded(
            [
                {
                    "xid": t.xid,
                    "commit_time": second(t.commit_time),
                    "application_name": t.application_name,
                    "user": t.user,
                    "tag": words.tag(t.tag, t.tag_reason),
                    "changes": ops(c.op for c in t.changes),
                    "statement": t.statement,
                }
                for t in txns
            ],
            _STATEMENT_FIELDS,
        )
        return
    for t in txns:
        yield (
            f"xid {t.xid}  {second(t.commit_time)}  {t.application_name or ''}"
            f"  {t.user or ''}  tag {words.tag(t.tag, t.tag_reason)}"
            f"  {ops(c.op for c in t.changes)}"
        )
        # the transaction's first statement, then each later one that changed rows
        said = [t.statement]
        for c in t.changes:
            if c.statement is not None and c.statement not in said:
                said.append(c.statement)
        for statement in said:
            first, *rest = (statement or "").splitlines() or [""]
            yield f"  statement: {first}"
            for line in rest:
                yield f"             {line}"


def _transactions(
    txns: Sequence[ShownTransaction], shown: list[int], limit: int | None, expand: bool
) -> Iterator[str]:
    """Each transaction's changes, until ``shown[0]`` changes printed reach ``limit``."""
    started = False
    for t in txns:
        if limit is not None and shown[0] >= limit:
            break
        if not t.changes:
            continue
        if not started:
            yield "\nchanges:"
            started = True
        if not expand:
            yield (f"xid {t.xid}  {second(t.commit_time)}")
        records = []
        statement = t.statement
        for c in t.changes:
            if limit is not None and shown[0] >= limit:
                break
            shown[0] += 1
            if not expand and c.statement != statement:
                statement = c.statement  # a later statement's changes
                yield f"  statement: {(statement or '').splitlines()[0] if statement else ''}"
            if expand:
                records.append(
                    {
                        "xid": t.xid,
                        "op": c.op,
                        "table": c.table,
                        "key": key(c.key_columns, c.key),
                        "old": None if c.old is None else pairs(c.old),
                        "new": None if c.new is None else pairs(_changed(c.old, c.new)),
                    }
                )
                continue
            yield (f"  {c.op:8} {c.table}  {key(c.key_columns, c.key)}")
            yield from images(c.old, c.new, "    ")
        if records:
            yield _numbered(records, shown[0] - len(records))


def _numbered(records: list[dict[str, Any]], before: int) -> str:
    """Change records numbered across transactions (RECORD n counts every change shown)."""
    text = expanded(records, ["xid", "op", "table", "key", "old", "new"])
    return re.sub(
        r"^-\[ RECORD (\d+) \]",
        lambda m: f"-[ RECORD {int(m.group(1)) + before} ]",
        text,
        flags=re.MULTILINE,
    )


def _changed(old: Image | None, new: Image | None) -> Image:
    """An update's new row as far as it changed (the whole row otherwise)."""
    if old is None or new is None:
        return dict(new or {})
    return {k: v for k, v in new.items() if old.get(k) != v}


_SHOW_CSV = [
    "xid",
    "commit_time",
    "application_name",
    "user",
    "tag",
    "tag_reason",
    "statement",
    "table",
    "op",
    "key",
    "old",
    "new",
]


def show_csv(result: Shown, limit: int | None) -> str:
    """`undo show --format csv`: one row per change (at most ``limit``), with its transaction
    (the session's, then those that claim it untrusted); key and images as JSON objects."""
    rows: list[dict[str, Any]] = []
    for t in result.transactions + result.untrusted.transactions:
        for c in t.changes:
            if limit is not None and len(rows) >= limit:
                break
            k = None if c.key is None else dict(zip(c.key_columns or [], c.key, strict=False))
            rows.append(
                {
                    "xid": t.xid,
                    "commit_time": t.commit_time,
                    "application_name": t.application_name,
                    "user": t.user,
                    "tag": t.tag,
                    "tag_reason": t.tag_reason,
                    "statement": t.statement,
                    "table": c.table,
                    "op": c.op,
                    "key": k,
                    "old": c.old,
                    "new": c.new,
                }
            )
    return to_csv(rows, _SHOW_CSV).rstrip("\n")


def show_json(result: Shown, limit: int | None) -> str:
    """`undo show --json`: everything, or with --limit every transaction with its changes cut
    at ``limit`` in all (``changes_left_out`` says how many were)."""
    if limit is None:
        return to_json(result.to_json())
    left = [limit]
    cut = 0

    def take(txns: Sequence[ShownTransaction]) -> tuple[ShownTransaction, ...]:
        nonlocal cut
        out = []
        for t in txns:
            kept = t.changes[: left[0]]
            left[0] -= len(kept)
            cut += len(t.changes) - len(kept)
            out.append(replace(t, changes=kept))
        return tuple(out)

    mine = take(result.transactions)
    claims = take(result.untrusted.transactions)
    shown = replace(
        result, transactions=mine, untrusted=replace(result.untrusted, transactions=claims)
    )
    return to_json({**shown.to_json(), "changes_left_out": cut})


# -- undo history ------------------------------------------------------------------------

HISTORY_FIELDS = [
    "commit_time",
    "op",
    "table",
    "moved_from",
    "xid",
    "session_id",
    "application_name",
    "user",
    "tag",
    "statement",
    "undo_of",
    "old",
    "new",
]


def history_record(r: HistoryVersion) -> JsonDoc:
    """A version as a record (csv, -x), a DDL's command as its op."""
    return {**r.to_json(), "op": (r.command or "ddl") if r.op == "ddl" else r.op}


def history(rows: list[HistoryVersion], more: bool, sourced: bool = False) -> Iterator[str]:
    """`undo history`: each version on a line (time, op, xid, session, application, user,
    tag), then its statement (or what undo it was) and its values. ``sourced``: the store
    holds several sources; each line names its version's."""
    for r in rows:
        who = (
            (f"source {r.source}  " if sourced else "")
            + f"xid {r.xid}  session {r.session_id or '(untagged)'}"
            f"  {r.application_name or ''}  {r.user or ''}  tag {r.tag}"
        )
        if r.op == "ddl":
            yield f"{second(r.commit_time)}  {r.command}  {who}"
            yield f"  statement: {r.statement}"
            continue
        yield f"{second(r.commit_time)}  {r.op:6}  {who}"
        if r.moved_from is not None:
            yield f"  moved from {r.moved_from} to {r.table}"
        elif len({x.table for x in rows}) > 1:
            yield f"  in {r.table}"
        if r.undo_of is not None:  # its statement is only the undo's first one
            yield f"  undo of: {json.dumps(r.undo_of, ensure_ascii=False)}"
        else:
            yield f"  statement: {r.statement}"
        yield from images(r.old, r.new, "  ")
    yield count(len(rows)) + (" (more with a higher --limit)" if more else "")


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
