"""undo's own logical messages, read as hostile input: every field checked before it is used.

Any role that can connect can emit a logical message with any prefix and any bytes
(``pg_logical_emit_message`` has no privilege check). So a message is read from its bytes, its
envelope parsed, and every field it carries checked for type and range here, before anything of
it reaches the store. A message that fails is never used: capture keeps it as malformed (its
LSN, prefix, session and what was wrong, in the store's ``malformed`` table) and goes on. Only a
frame the replication protocol cannot parse stops capture: that is the server's stream, not a
role's message.

A signed message (a tag, a DDL record, a guard's refusal; the ledger's, later) is
``hex(HMAC) || payload``: the payload one JSON object, the HMAC-SHA256 under the master key
(``undo.secret``) over the prefix, a newline and the payload, so that a message of one kind never
passes as another. Only undo's own code, running as undo's owner, signs: from facts the server
gives (the session part: pid, backend start, user, client), never from a setting the session
can write. A transactional message is bound to its transaction by the 64-bit xid inside (else
'replayed'); a refusal, outside any transaction, by a nonce the store keeps once.
``verified`` and ``bound`` are the two checks, for any signed prefix.

A marker (prefix ``undo.stmt``) is not signed: the text of a later statement of a transaction,
so that each change carries the statement that made it; capture keeps markers only in a
transaction whose tag it trusts.

Messages signed before this format (``HMAC || session JSON || "\n" || message JSON``, under a
per-session key any code in that session could read) are read as their claims and never
trusted: 'forged'.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from undo.core.times import iso
from undo.store.api import ledger_entry

TAG_PREFIX = "undo"
MARK_PREFIX = "undo.mark"  # capture --once: its own non-transactional mark
DDL_PREFIX = "undo.ddl"  # undo.on_ddl(): DDL on audited schemas, in its transaction
GUARD_PREFIX = "undo.guard"  # undo.tag(): a write a guard refused (non-transactional)
LEDGER_PREFIX = "undo.ledger"  # undo.record_undo: an undo's ledger entries, mirrored in undos
STMT_PREFIX = "undo.stmt"  # undo.tag(): a later statement of a tagged transaction (its text)
#: the prefixes capture reads (wal2json is asked for these only; pgoutput sends every message)
PREFIXES = (TAG_PREFIX, MARK_PREFIX, LEDGER_PREFIX, GUARD_PREFIX, DDL_PREFIX, STMT_PREFIX)
#: which of undo's messages are transactional: one of the other kind is not undo's
TRANSACTIONAL = {
    TAG_PREFIX: True,
    DDL_PREFIX: True,
    LEDGER_PREFIX: True,
    GUARD_PREFIX: False,
    STMT_PREFIX: True,
}


class Malformed(ValueError):
    """A message that is not what undo's own SQL writes; the text says what is wrong."""


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


# -- field checks: each returns the value, or raises Malformed naming the field --------------
Check = Callable[[Any, str], Any]


def text(value: Any, name: str) -> str | None:
    """A string the store can hold (UTF-8: JSON's \\ud800 escapes make lone surrogates), or
    null."""
    if value is None:
        return None
    if type(value) is not str:
        raise Malformed(f"{name}: expected a string, got {type(value).__name__}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise Malformed(f"{name}: not valid Unicode text") from None
    return value


def required_text(value: Any, name: str) -> str:
    if value is None:
        raise Malformed(f"{name}: missing")
    return text(value, name)  # type: ignore[return-value]  # not None, checked above


def integer(value: Any, name: str) -> int | None:
    """A 64-bit signed integer (what SQLite and bigint hold), or null. Not a boolean."""
    if value is None:
        return None
    if type(value) is not int:
        raise Malformed(f"{name}: expected an integer, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise Malformed(f"{name}: {value} is out of the 64-bit range")
    return value


def oid(value: Any, name: str) -> int | None:
    """An object id: jsonb writes an ``oid`` as a string of digits."""
    if type(value) is str and value.isascii() and value.isdigit() and len(value) <= 10:
        value = int(value)
    checked = integer(value, name)
    if checked is not None and not 0 <= checked < 2**32:
        raise Malformed(f"{name}: {checked} is not an object id")
    return checked


def flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if type(value) is not bool:
        raise Malformed(f"{name}: expected true or false, got {type(value).__name__}")
    return value


_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")


def utc_time(value: Any, name: str) -> str | None:
    """A time as undo's SQL writes it: 2026-01-19T10:25:31.000000Z."""
    checked = text(value, name)
    if checked is not None and not _TIME.fullmatch(checked):
        raise Malformed(f"{name}: not a UTC time like 2026-01-19T10:25:31.000000Z")
    return checked


def any_json(value: Any, name: str) -> Any:
    """Any JSON value the store can hold as text (no lone surrogates inside)."""
    try:
        _dumps(value).encode()
    except (UnicodeEncodeError, ValueError, RecursionError):
        raise Malformed(f"{name}: not valid Unicode text") from None
    return value


def list_of(check: Check) -> Check:
    def checked(value: Any, name: str) -> list[Any]:
        if value is None:
            return []
        if type(value) is not list:
            raise Malformed(f"{name}: expected a list, got {type(value).__name__}")
        return [check(v, f"{name}[{i}]") for i, v in enumerate(value)]

    return checked


def record(fields: dict[str, Check]) -> Check:
    """An object with these fields (each checked; others dropped)."""

    def checked(value: Any, name: str) -> dict[str, Any]:
        if type(value) is not dict:
            raise Malformed(f"{name}: expected an object, got {type(value).__name__}")
        return {k: check(value.get(k), f"{name}.{k}") for k, check in fields.items()}

    return checked


# -- what each message holds ------------------------------------------------------------------
#: the session part of every signed message, facts undo's SQL reads from the server: pid,
#: backend start (µs since 1970), the session's login role, client address and port
SESSION_FIELDS: dict[str, Check] = {
    "pid": integer,
    "backend_start": integer,
    "user": text,
    "client_addr": text,
    "client_port": integer,
}
_COMMON = {"application_name": text, "xid": integer, "statement": text}
_DDL = {
    "ddl": list_of(
        record({"command": required_text, "object_type": text, "object": text, "oid": oid})
    ),
    "state": list_of(
        record(
            {
                "table": required_text,
                "oid": oid,
                "problems": list_of(required_text),
                "rewrite": flag,
            }
        )
    ),
}
_GUARD = {"guard": required_text, "reason": text, "at": utc_time}
#: the payload's fields (besides the session part), by prefix
BODIES: dict[str, Check] = {
    TAG_PREFIX: record({**SESSION_FIELDS, **_COMMON, "undo": any_json}),
    GUARD_PREFIX: record({**SESSION_FIELDS, **_COMMON, **_GUARD, "nonce": text}),
    DDL_PREFIX: record({**SESSION_FIELDS, **_COMMON, **_DDL}),
}
#: the format before (claims only, never trusted): session JSON, newline, message JSON
LEGACY_SESSION = record(
    {
        "session_id": text,
        "pid": integer,
        "backend_start": text,
        "user": text,
        "client_addr": text,
        "client_port": integer,
    }
)
LEGACY_BODIES: dict[str, Check] = {
    TAG_PREFIX: record({**_COMMON, "undo": any_json}),
    GUARD_PREFIX: record({**_COMMON, **_GUARD}),
    DDL_PREFIX: record({**_COMMON, **_DDL}),
}


@dataclass(frozen=True)
class Signed:
    """A signed message after its checks. ``fields``: its fields of its kind, checked, with
    ``session`` its session part (``session_id`` derived); both empty when it is malformed.
    ``untrusted``: None when verified, else 'forged', 'replayed' or 'malformed'; ``problem``:
    what was wrong with a malformed one."""

    fields: dict[str, Any] = field(default_factory=dict)
    untrusted: str | None = None
    problem: str | None = None
    #: the session id a malformed message claims, where one could be read (for the record)
    claimed_session: str | None = None

    @property
    def session(self) -> dict[str, Any]:
        return self.fields.get("session") or {}


def session_id(pid: int | None, backend_start: int | None) -> str | None:
    """The %c of log_line_prefix: hex seconds of the backend's start, '.', hex pid.

    >>> session_id(0x9d7, 0x6b071524 * 10**6 + 999_999)
    '6b071524.9d7'
    """
    if pid is None or backend_start is None or pid < 0 or backend_start < 0:
        return None
    return f"{backend_start // 10**6:x}.{pid:x}"


def start_time(backend_start: int | None) -> str | None:
    """µs since 1970 as the store writes times.

    >>> start_time(1_700_000_000_123_456)
    '2023-11-14T22:13:20.123456Z'
    """
    if backend_start is None:
        return None
    try:
        at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=backend_start)
    except OverflowError:
        return None
    return iso(at)


def verified(prefix: str, content: bytes, key: bytes | None) -> bytes | None:
    """The payload of ``content`` if its HMAC is good: HMAC-SHA256(``key``, prefix || LF ||
    payload), in hex, before the payload. None if not (or no key)."""
    if key is None:
        return None
    mac, payload = content[:64], content[64:]
    good = hmac.new(key, prefix.encode() + b"\n" + payload, hashlib.sha256).hexdigest()
    return payload if hmac.compare_digest(good.encode(), mac) else None


def bound(full_xid: Any, xid: int | None) -> bool:
    """Whether a message's 64-bit xid is the transaction's (the stream gives its low 32 bits;
    ``xid`` None: a message outside any transaction, nothing to bind)."""
    if xid is None:
        return True
    return type(full_xid) is int and full_xid % 2**32 == xid


def _parse(prefix: str, payload: bytes) -> dict[str, Any]:
    """The payload's fields, checked, with its session part apart (raises Malformed)."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise Malformed("not JSON") from None
    body: dict[str, Any] = BODIES[prefix](doc, "message")
    session = {k: body.pop(k) for k in SESSION_FIELDS}
    session["session_id"] = session_id(session["pid"], session["backend_start"])
    session["backend_start"] = start_time(session["backend_start"])
    body["session"] = session
    return body


def _parse_legacy(prefix: str, payload: bytes) -> dict[str, Any]:
    """A message of the format before: session JSON, newline, message JSON (raises
    Malformed)."""
    head, sep, rest = payload.partition(b"\n")
    if not sep:
        raise Malformed("no newline between the session part and the message part")
    try:
        session_doc, body_doc = json.loads(head), json.loads(rest)
    except (ValueError, RecursionError):
        raise Malformed("not JSON") from None
    body: dict[str, Any] = LEGACY_BODIES[prefix](body_doc, "message")
    body["session"] = LEGACY_SESSION(session_doc, "session")
    return body


def _claimed(payload: bytes) -> str | None:
    """The session id a message that failed its checks claims, if one can be read."""
    try:
        doc = json.loads(payload.partition(b"\n")[0])
    except (ValueError, RecursionError):
        return None
    if type(doc) is not dict:
        return None
    try:
        if "session_id" in doc:
            return text(doc["session_id"], "session_id")
        return session_id(integer(doc.get("pid"), "pid"), integer(doc.get("backend_start"), "s"))
    except Malformed:
        return None


def read_signed(prefix: str, content: bytes, key: bytes | None, xid: int | None) -> Signed:
    """Parse, check and verify a signed message of ``prefix``.

    Its HMAC must be good under the master key (else 'forged': what it claims is kept, checked,
    never trusted), and its xid the transaction's own (else 'replayed'; ``xid`` None: a message
    outside any transaction). A message whose fields fail their checks is 'malformed'.
    """
    good = verified(prefix, content, key)
    payload = content[64:]
    try:
        if good is not None:
            body = _parse(prefix, payload)
        else:
            try:
                body = _parse(prefix, payload)
            except Malformed:
                if not payload.lstrip().startswith(b"{") or b"\n" not in payload:
                    raise
                body = _parse_legacy(prefix, payload)  # signed before this format
            return Signed(body, "forged")
    except Malformed as e:
        return Signed(untrusted="malformed", problem=str(e), claimed_session=_claimed(payload))
    if not bound(body.get("xid"), xid):
        return Signed(body, "replayed")
    return Signed(body)


def read_statement(content: bytes) -> str:
    """A marker's statement (raises Malformed)."""
    try:
        return content.decode()
    except UnicodeDecodeError:
        raise Malformed("the statement is not UTF-8") from None


def problem_of_kind(prefix: str, transactional: bool) -> str | None:
    """What is wrong with a message of undo's prefix sent as the other kind (None: nothing)."""
    expected = TRANSACTIONAL.get(prefix)
    if expected is None or expected == transactional:
        return None
    kind = "transactional" if expected else "non-transactional"
    return f"undo's {prefix} messages are {kind}"


def read_ledger(
    content: bytes, key: bytes | None, xid: int
) -> tuple[dict[str, Any] | None, str | None]:
    """Parse and check a ledger mirror (undo.record_undo): (``{"target": its JSON text,
    "entries": [...], "xid": ...}``, None) when trusted; else (what could be read of it, or
    None, and why not: 'malformed', 'forged' or 'replayed').

    The message is ``hex(HMAC) || JSON``, the HMAC-SHA256 under HMAC-SHA256(master key,
    'ledger'); the JSON's ``xid`` (the undo's full 64-bit xid) must be this transaction's.
    Any content, however made, gives an answer: bytes first, then JSON, then each field's type.
    """
    mac, msg = content[:64], content[64:]
    try:
        doc = json.loads(msg.decode("utf-8"))
        if not isinstance(doc, dict):
            return None, "malformed"
        target = json.dumps(doc.get("target"), ensure_ascii=False, separators=(",", ":"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; nested too deep
        return None, "malformed"
    full, entries = doc.get("xid"), doc.get("entries")
    if entries is None:
        entries = []
    if not isinstance(entries, list) or not (isinstance(full, int) and not isinstance(full, bool)):
        return None, "malformed"
    checked = [ledger_entry(e) for e in entries]
    if any(e is None for e in checked):
        return None, "malformed"
    found = {"target": target, "entries": checked, "xid": full}
    if key is None:
        return found, "forged"
    ledger_key = hmac.new(key, b"ledger", hashlib.sha256).digest()
    good = hmac.new(ledger_key, msg, hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(good, mac):
        return found, "forged"
    if full % 2**32 != xid:
        return found, "replayed"
    return found, None
