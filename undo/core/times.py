"""Times: the store's time text (UTC, microseconds, 'Z': it sorts as text), PostgreSQL's
timestamps, and times on the command line (ISO 8601 or a relative age: 90m, 4h, 2d)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from undo.core.errors import BadInput

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def pg_time_to_iso(micros: int) -> str:
    """Microseconds since 2000-01-01 UTC -> the store's time text.

    >>> pg_time_to_iso(0)
    '2000-01-01T00:00:00.000000Z'
    """
    return iso(PG_EPOCH + timedelta(microseconds=micros))


def epoch(text: str) -> float:
    """The store's time text -> Unix time.

    >>> epoch("1970-01-01T00:01:00.500000Z")
    60.5
    """
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def iso(ts: datetime) -> str:
    """The store's time text: UTC, microseconds, 'Z'; fixed width, so it sorts as text (the
    year too: strftime's %Y does not pad years before 1000 on Linux).

    >>> iso(datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC))
    '0999-01-02T03:04:05.000006Z'
    >>> epoch(iso(datetime(1, 1, 1, tzinfo=UTC))) == datetime(1, 1, 1, tzinfo=UTC).timestamp()
    True
    """
    t = ts.astimezone(UTC)
    return f"{t.year:04d}-{t:%m-%dT%H:%M:%S.%f}Z"


_AGE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, now: datetime | None = None) -> str:
    """A user's time -> the store's UTC text. Naive ISO times are taken as UTC.

    >>> parse_time("2026-01-19T10:25:00Z")
    '2026-01-19T10:25:00.000000Z'
    >>> parse_time("90m", now=datetime(2026, 1, 1, 12, tzinfo=UTC))
    '2026-01-01T10:30:00.000000Z'
    """
    text = text.strip()
    m = _AGE.match(text)
    if m:
        now = now or datetime.now(UTC)
        try:
            return iso(now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))}))
        except OverflowError:
            raise BadInput(
                f"age {text!r} reaches back before the year 1: use a smaller one"
            ) from None
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise BadInput(
            f"malformed time {text!r}: use ISO 8601 (2026-01-19T10:25:00Z) or an age (90m, 4h, 2d)"
        ) from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return iso(ts)


def parse_age(text: str, what: str, examples: str) -> int:
    """An age or a width (90s, 15m, 4h, 90d, 2w) -> seconds, more than 0; ``what`` names the
    option in the error, with ``examples``.

    >>> parse_age("90d", "--keep", "90d")
    7776000
    """
    m = _AGE.match(text.strip())
    if not m:
        raise BadInput(f"malformed {what} {text!r}: use {examples}")
    try:
        seconds = int(timedelta(**{_UNITS[m.group(2)]: int(m.group(1))}).total_seconds())
    except OverflowError:
        raise BadInput(f"{what} {text!r} is too large: use {examples}") from None
    if seconds <= 0:
        raise BadInput(f"{what} {text!r} is zero: use {examples}")
    return seconds


#: the widest bucket: wider, every write since 1970 falls in one labelled 1970-01-01
MAX_BUCKET = 366 * 86400


def parse_bucket(text: str) -> int:
    """A bucket width -> seconds: whole minutes (the store counts writes per minute), at most
    366 days.

    >>> parse_bucket("1m"), parse_bucket("1h")
    (60, 3600)
    """
    examples = "a width such as 1m, 15m, 1h or 1d"
    seconds = parse_age(text, "bucket", examples)
    if seconds % 60:
        raise BadInput(
            f"bucket {text!r} is not whole minutes (the store counts writes per minute):"
            f" use {examples}"
        )
    if seconds > MAX_BUCKET:
        raise BadInput(f"bucket {text!r} is wider than 366d: use {examples}")
    return seconds


#: PostgreSQL's %c: the backend's start time and its pid, each in lowercase hex
SESSION_ID = re.compile(r"([1-9a-f][0-9a-f]{0,7})\.[1-9a-f][0-9a-f]{0,7}")


def session_start(session_id: str) -> int | None:
    """When a session began, to the second, from its id (PostgreSQL's %c: the backend's start
    time and pid in hex); None for an id that is not one.

    As PostgreSQL writes it: two lowercase hex numbers of at most 32 bits without leading zeros,
    neither 0, nothing else (``int()`` took signs, spaces, ``0x`` and any tail).

    >>> session_start("6b071524.9d7"), session_start("nope")
    (1795626276, None)
    >>> [session_start(s) for s in ("6B071524.9D7", " 6b071524.9d7", "6b071524.9d7;x", "6b0.")]
    [None, None, None, None]
    >>> [session_start(s) for s in ("06b071524.9d7", "6b071524.09d7", "0.0", "6b071524.1ffffffff")]
    [None, None, None, None]
    """
    found = SESSION_ID.fullmatch(session_id)
    return int(found.group(1), 16) if found else None
