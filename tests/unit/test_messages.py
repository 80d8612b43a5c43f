"""Every field of undo's messages is checked before use: whatever a message holds, reading it
never raises, and what the checks let through is something the store can hold."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from undo.core.records import Begin, Commit
from undo.store import open_store
from undo.stream import messages

KEY = b"k" * 32
SIGNED = [messages.TAG_PREFIX, messages.DDL_PREFIX, messages.GUARD_PREFIX]
FIELDS = [
    "session_id", "pid", "backend_start", "user", "client_addr", "client_port", "xid",
    "application_name", "statement", "undo", "guard", "reason", "at", "ddl", "state",
    "command", "object_type", "object", "oid", "table", "problems", "rewrite",
]  # fmt: skip

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(),  # lone surrogates included: JSON's \ud800 escapes make them
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=3), children, max_size=5)
    ),
    max_leaves=12,
)


def sign(prefix: str, doc: object, key: bytes = KEY) -> bytes:
    """A message as undo's SQL signs it: HMAC(master key, prefix LF payload) in hex, payload."""
    payload = json.dumps(doc).encode()
    mac = hmac.new(key, prefix.encode() + b"\n" + payload, hashlib.sha256).hexdigest()
    return mac.encode() + payload


def legacy(session: object, body: object, key: bytes = KEY) -> bytes:
    """A message as undo signed it before: under the session's key, session JSON LF body."""
    head = json.dumps(session).encode()
    msg = head + b"\n" + json.dumps(body).encode()
    session_key = hmac.new(key, head, hashlib.sha256).digest()
    return hmac.new(session_key, msg, hashlib.sha256).hexdigest().encode() + msg


@settings(max_examples=300)  # deadline and health checks: the profile in tests/conftest.py
@given(st.sampled_from(SIGNED), st.binary(max_size=200))
def test_any_bytes_are_read_without_raising(prefix, content):
    signed = messages.read_signed(prefix, content, KEY, 7)
    assert signed.untrusted in ("malformed", "forged")


SESSION = {"pid": 0x9D7, "backend_start": 0x6B071524 * 10**6 + 5, "user": "u"}


def test_a_good_tag_is_trusted_and_its_fields_kept():
    tag = {**SESSION, "application_name": "cron", "xid": 2**32 + 7}
    signed = messages.read_signed("undo", sign("undo", tag), KEY, 7)
    assert signed.untrusted is None and signed.problem is None
    assert signed.fields["application_name"] == "cron"
    assert signed.session["session_id"] == "6b071524.9d7"
    assert signed.session["backend_start"] == "2026-11-25T17:04:36.000005Z"
    replayed = messages.read_signed("undo", sign("undo", {**tag, "xid": 8}), KEY, 7)
    assert replayed.untrusted == "replayed"
    forged = messages.read_signed("undo", sign("undo", tag, key=b"x"), KEY, 7)
    assert forged.untrusted == "forged" and forged.session["session_id"] == "6b071524.9d7"
    # signed as another kind of message: never this one
    other = messages.read_signed("undo", sign("undo.ddl", tag), KEY, 7)
    assert other.untrusted == "forged"


def test_a_tag_signed_the_way_before_is_forged():
    """Tags of the format before were signed under a key any code in the session could read:
    what they claim is kept, never trusted."""
    old = legacy({"session_id": "6b0.1", "pid": 1}, {"application_name": "cron", "xid": 7})
    signed = messages.read_signed("undo", old, KEY, 7)
    assert signed.untrusted == "forged" and signed.problem is None
    assert signed.session["session_id"] == "6b0.1" and signed.fields["application_name"] == "cron"


def test_a_field_of_the_wrong_type_is_malformed_even_when_signed():
    """A good HMAC says nothing of types: every field is checked."""
    signed = messages.read_signed(
        "undo", sign("undo", {**SESSION, "application_name": ["x"], "xid": 7}), KEY, 7
    )
    assert signed.untrusted == "malformed"
    assert signed.problem == "message.application_name: expected a string, got list"
    assert signed.fields == {} and signed.claimed_session == "6b071524.9d7"


@settings(max_examples=150)
@given(st.sampled_from(SIGNED), _json, _json, st.sampled_from(["good", "other", "legacy"]))
def test_what_passes_the_checks_the_store_can_hold(prefix, session, body, how):
    """Signed with the right key or not, or the way before, any JSON: either it is malformed,
    or the writer stores it (tag, DDL record or refusal) without an error."""
    if how == "legacy":
        content = legacy(session, body)
    else:
        doc = {**session, **body} if isinstance(session, dict) and isinstance(body, dict) else body
        content = sign(prefix, doc, KEY if how == "good" else b"other")
    signed = messages.read_signed(prefix, content, KEY, 7)
    with tempfile.TemporaryDirectory() as tmp:
        db = open_store(os.path.join(tmp, "s.db"), create=True)
        db.register_source("s", "1", "s")
        writer = db.writer()
        if signed.problem is not None:
            writer.add_malformed(10, prefix, signed.claimed_session, signed.problem, content)
        elif prefix == messages.GUARD_PREFIX:
            writer.add_refusal(10, signed.fields, signed.untrusted)
        writer.begin(Begin(7, 100, "2026-01-01T00:00:00.000000Z"))
        writer.add_truncate(1)  # a change, so that the transaction's row is written
        if prefix == messages.TAG_PREFIX:
            writer.set_tag(signed.fields, signed.untrusted)
        elif prefix == messages.DDL_PREFIX and signed.problem is None:
            writer.add_ddl(signed.fields, signed.untrusted)
        if signed.problem is not None:
            writer.add_malformed(11, prefix, signed.claimed_session, signed.problem, content)
        writer.commit(Commit(100, 101, "2026-01-01T00:00:00.000000Z"))
        writer.flush()
        db.close()
