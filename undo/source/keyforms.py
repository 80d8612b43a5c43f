"""A value as a user types it -> the text form the store holds for its column's type.

The store holds each value as its type's output function prints it, under capture's pinned
settings (DateStyle=ISO, TimeZone=UTC, ...). `history` compares what the user gives after
putting it in that form: through the source when it can reach one (the type's own input and
output functions), else with :func:`offline`, which knows the common types (README, Commands:
``history``) and leaves any other value as given.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import psycopg
from psycopg import sql

from undo.core.errors import BadInput

#: (column, type as format_type prints it, value as typed) -> the value's text form
Normalise = Callable[[str, str, str], str]

_INTEGERS = ("smallint", "integer", "bigint")
_INTEGER = re.compile(r"\s*([+-]?\d+)\s*")
_NUMERIC_TYPE = re.compile(r"numeric(?:\((\d+)(?:,(-?\d+))?\))?")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_CHAR_TYPE = re.compile(r"character\((\d+)\)")
_TIMESTAMP_TYPE = re.compile(r"timestamp(?:\((\d)\))? with(out)? time zone")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def offline(column: str, type_name: str, value: str) -> str:
    """The output form of ``value`` for the common types, without a database.

    >>> offline("id", "bigint", " +0150 ")
    '150'
    >>> offline("a", "numeric(10,2)", "7.5"), offline("a", "numeric", "1.50e1")
    ('7.50', '15.0')
    >>> offline("t", "timestamp with time zone", "2026-10-20T02:00+02:00")
    '2026-10-20 00:00:00+00'
    >>> offline("t", "timestamp without time zone", "2026-10-20 08:30:00.250")
    '2026-10-20 08:30:00.25'
    >>> offline("d", "date", "20261020"), offline("b", "boolean", "Yes")
    ('2026-10-20', 't')
    >>> offline("u", "uuid", "{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}")
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'
    >>> offline("c", "character(4)", "ab"), offline("p", "point", "(1, 2)")
    ('ab  ', '(1, 2)')
    """
    try:
        out = _offline(type_name, value)
    except (ValueError, ArithmeticError):
        return value  # not a form this knows: compared as given
    return value if out is None else out


def _offline(type_name: str, value: str) -> str | None:
    v = value.strip()
    if type_name in _INTEGERS:
        m = _INTEGER.fullmatch(value)
        return str(int(m.group(1))) if m else None
    if m := _NUMERIC_TYPE.fullmatch(type_name):
        return _numeric(v, None if m.group(1) is None else int(m.group(2) or 0))
    if m := _CHAR_TYPE.fullmatch(type_name):
        n = int(m.group(1))
        if len(value) <= n:
            return value.ljust(n)
        return value[:n] if not value[n:].strip(" ") else None  # char(n) drops spaces past n
    if type_name == "boolean":
        b = v.lower()
        if b and any(w.startswith(b) for w in _TRUE) and not any(w.startswith(b) for w in _FALSE):
            return "t"
        if b and any(w.startswith(b) for w in _FALSE) and not any(w.startswith(b) for w in _TRUE):
            return "f"
        return None
    if type_name == "uuid":
        return str(uuid.UUID(v))
    if type_name == "date":
        if v.lower() in ("infinity", "+infinity", "-infinity"):
            return v.lower().lstrip("+")
        try:
            return date.fromisoformat(v).isoformat()
        except ValueError:
            return datetime.fromisoformat(v).date().isoformat()
    if m := _TIMESTAMP_TYPE.fullmatch(type_name):
        if v.lower() in ("infinity", "+infinity", "-infinity"):
            return v.lower().lstrip("+")
        return _timestamp(datetime.fromisoformat(v), m.group(1), zoned=m.group(2) is None)
    return None


def _numeric(v: str, scale: int | None) -> str | None:
    low = v.lower()
    if low == "nan":
        return "NaN"
    if low in ("infinity", "+infinity", "inf", "+inf", "-infinity", "-inf"):
        return "-Infinity" if low[0] == "-" else "Infinity"
    if not _NUMBER.fullmatch(v):
        return None
    d = Decimal(v)  # its exponent is the scale numeric keeps (1.50e1: 15.0; 1.5e2: 150)
    if scale is not None:
        d = d.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)  # away from zero
    if d.is_zero():
        d = d.copy_abs()  # numeric has no negative zero
    return f"{d:f}"


def _timestamp(t: datetime, precision: str | None, zoned: bool) -> str:
    if zoned:
        t = (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC)
    t = t.replace(tzinfo=None)  # a timestamp without time zone ignores a zone given
    if precision is not None and t.microsecond:
        unit = 10 ** (6 - int(precision))
        t += timedelta(microseconds=(t.microsecond + unit // 2) // unit * unit - t.microsecond)
    text = t.strftime("%Y-%m-%d %H:%M:%S")
    if t.microsecond:
        text += f".{t.microsecond:06d}".rstrip("0")
    return text + ("+00" if zoned else "")


def through_source(conn: psycopg.Connection[Any]) -> Normalise:
    """What the source's type reads the value as, printed by its output function (concat, as
    the undo compares rows; capture's settings pinned on ``conn``). A type the source does
    not know falls back on :func:`offline`; a value its type refuses is bad input."""
    cache: dict[tuple[str, str], str] = {}
    known: dict[str, bool] = {}

    def normalise(column: str, type_name: str, value: str) -> str:
        if type_name not in known:
            try:
                row = conn.execute(
                    "SELECT pg_catalog.to_regtype(%s::pg_catalog.text) IS NOT NULL", (type_name,)
                ).fetchone()
                known[type_name] = bool(row and row[0])
            except psycopg.Error:
                known[type_name] = False
        if not known[type_name]:
            return offline(column, type_name, value)
        if (type_name, value) not in cache:
            # to_regtype read type_name as one type name; the value goes in as a literal: no
            # parameters in a statement holding a name (README: Undo, Values). concat named with
            # its schema: the type's name is read on the operator's search_path (as recorded),
            # where another role's exact-type concat would run as the operator
            # (docs/security.md)
            try:
                row = conn.execute(
                    sql.SQL("SELECT pg_catalog.concat(CAST({} AS {}))").format(
                        sql.Literal(value), sql.SQL(type_name)
                    )
                ).fetchone()
            except psycopg.Error as e:
                if e.sqlstate and e.sqlstate.startswith("22"):  # data exception
                    raise BadInput(f"{column}={value}: {e.diag.message_primary}") from None
                raise
            cache[type_name, value] = str(row[0]) if row else value
        return cache[type_name, value]

    return normalise
