"""undo's own logical messages, read as hostile input: every field checked before it is used.

Any role that can connect can emit a logical message with any prefix and any bytes
(``pg_logical_emit_message`` has no privilege check). So a message is read from its bytes, its
envelope parsed, and every field it carries checked for type and range here, before anything of
it reaches the store. A message that fails is never used: capture keeps it as malformed (its
LSN, prefix, session and what was wrong, in the store's ``malformed`` table) and goes on. Only a
frame the replication protocol cannot parse stops capture: that is the server's stream, not a
role's message.

A signed message (a tag, a DDL record, a guard's refusal) is ``HMAC || session JSON || "\\n" ||
message JSON``: the HMAC-SHA256 (hex) is under the session's key, HMAC-SHA256(master key,
session JSON), which ``undo.session_tag()`` gives a session for its own session part only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from undo.core.wal import is_xid_of
from undo.store.writer import ledger_entry

TAG_PREFIX = "undo"
MARK_PREFIX = "undo.mark"  # capture --once: its own non-transactional mark
DDL_PREFIX = "undo.ddl"  # undo.on_ddl(): DDL on audited schemas, in its transaction
GUARD_PREFIX = "undo.guard"  # undo.tag(): a write a guard refused (non-transactional)
LEDGER_PREFIX = "undo.ledger"  # undo.record_undo: an undo's ledger entries, mirrored in undos
#: the prefixes capture reads (wal2json is asked for these only; pgoutput sends every message)
PREFIXES = (TAG_PREFIX, MARK_PREFIX, LEDGER_PREFIX, GUARD_PREFIX, DDL_PREFIX)
#: which of undo's messages are transactional: one of the other kind is not undo's
TRANSACTIONAL = {TAG_PREFIX: True, DDL_PREFIX: True, LEDGER_PREFIX: True, GUARD_PREFIX: False}


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
#: the session part of every signed message: facts undo.session_tag() read from the server
SESSION = record(
    {
        "session_id": text,
        "pid": integer,
        "backend_start": text,
        "user": text,
        "client_addr": text,
        "client_port": integer,
    }
)
_COMMON = {"application_name": text, "xid": integer, "statement": text}
TAG = record({**_COMMON, "undo": any_json})
GUARD = record({**_COMMON, "guard": required_text, "reason": text, "at": utc_time})
_DDL_BODY = {
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
#: a DDL record: its commands and the tables' states are in ``signed`` (JSON text), which undo's
#: master key signs in ``mac`` (undo.emit_ddl): a session's own key signs the envelope only.
#: What a record says outside ``signed`` is kept (checked) to show an untrusted one, never used.
DDL = record({**_COMMON, "signed": text, "mac": text, **_DDL_BODY})
DDL_BODY = record(_DDL_BODY)


#: the message part's fields, by prefix
BODIES: dict[str, Check] = {TAG_PREFIX: TAG, GUARD_PREFIX: GUARD, DDL_PREFIX: DDL}


@dataclass(frozen=True)
class Signed:
    """A signed message after its checks. ``fields``: its message part (the fields of its kind,
    checked), with ``session`` its session part; both empty when it is malformed.
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


def _claimed(head: bytes) -> str | None:
    try:
        session = json.loads(head)
        return text(session.get("session_id"), "session_id") if type(session) is dict else None
    except (ValueError, RecursionError):
        return None


def read_signed(
    prefix: str,
    content: bytes,
    key: bytes | None,
    xid: int | None,
    session_keys: dict[bytes, bytes] | None = None,
) -> Signed:
    """Parse, check and verify a signed message of ``prefix``.

    Its HMAC must be good under the key of the session part it carries (else 'forged'), and
    the 64-bit xid inside must be the transaction's own (else 'replayed'; ``xid`` None: a
    message outside any transaction, nothing to bind). ``session_keys`` caches derived keys.
    """
    mac, msg = content[:64], content[64:]
    head, sep, rest = msg.partition(b"\n")
    try:
        if not sep:
            raise Malformed("no newline between the session part and the message part")
        try:
            session_doc, body_doc = json.loads(head), json.loads(rest)
        except (ValueError, RecursionError):
            raise Malformed("not JSON") from None
        body = BODIES[prefix](body_doc, "message")
        body["session"] = SESSION(session_doc, "session")
    except Malformed as e:
        return Signed(untrusted="malformed", problem=str(e), claimed_session=_claimed(head))
    if key is None:
        return Signed(body, "forged")
    keys = session_keys if session_keys is not None else {}
    session_key = keys.get(head)
    if session_key is None:
        session_key = hmac.new(key, head, hashlib.sha256).digest()
        if len(keys) > 10_000:
            keys.clear()
        keys[head] = session_key
    good = hmac.new(session_key, msg, hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(good, mac):
        return Signed(body, "forged")
    if xid is None:
        return Signed(body)
    if not is_xid_of(body.get("xid"), xid):
        return Signed(body, "replayed")
    return Signed(body)


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


def read_ddl_body(fields: dict[str, Any], key: bytes) -> dict[str, Any] | None:
    """The commands and states of a DDL record whose envelope verified, if undo's master key
    signed them (HMAC-SHA256 over ``xid || "\\n" || signed``, made by undo.emit_ddl, which runs
    as undo's owner), checked like every field; None when unsigned, forged or malformed."""
    signed, mac = fields.get("signed"), fields.get("mac")
    if signed is None or mac is None:
        return None
    good = hmac.new(key, f"{fields.get('xid')}\n{signed}".encode(), hashlib.sha256)
    if not hmac.compare_digest(good.hexdigest(), mac):
        return None
    try:
        return DDL_BODY(json.loads(signed), "signed")  # type: ignore[no-any-return]
    except (ValueError, RecursionError):  # Malformed is a ValueError
        return None
