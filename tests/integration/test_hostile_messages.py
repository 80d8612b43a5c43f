"""No message a role emits can stop capture: each is checked, kept as malformed, and passed by.

`pg_logical_emit_message` has no privilege check: any role that can connect can put any bytes
under undo's prefixes into the stream. Played by a real LOGIN role with no privilege on `undo`,
against a real server, with both decoders.
"""

from __future__ import annotations

import json
import os

import psycopg
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import erase_own_tag
from undo.source.pg import session_id

PREFIXES = ["undo", "undo.ddl", "undo.guard", "undo.ledger"]
ZEROS = "0" * 64


def _nobody(source):
    """A role that may connect and write the app's table, and nothing of undo's."""
    role = f"nobody_{source.dbname}"
    source.sql(f"CREATE ROLE {role} LOGIN; GRANT ALL ON t TO {role}")
    params = dict(psycopg.conninfo.conninfo_to_dict(source.dsn), user=role)
    return psycopg.connect(**params, autocommit=True)


def _emit(conn, transactional, prefix, content, then_write=None):
    """Emit one message (text or bytes) and, in the same transaction, write a row."""
    with conn.transaction():
        if then_write is not None:
            # no real tag: the message is the tag
            erase_own_tag(conn)
        conn.execute("SELECT pg_logical_emit_message(%s, %s, %s)", (transactional, prefix, content))
        if then_write is not None:
            conn.execute("INSERT INTO t VALUES (%s)", (then_write,))


def _stored_ids(source):
    return sorted(
        int(json.loads(r[0])[0])
        for r in source.store_rows("SELECT new FROM changes WHERE op = 'I'")
    )


def test_messages_of_any_shape_never_stop_capture(source):
    """Each message the probe sent stopped every later `undo capture` on main (6e4cc57): a
    list where a name goes (sqlite3.ProgrammingError), an object for an id, bytes that are not
    UTF-8 in a wal2json document (UnicodeDecodeError). Now each is kept as malformed, the
    writes around it are stored, and capture goes on."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY)")
    source.init()
    genuine = source.connect(application_name="web")
    victim = session_id(genuine)
    session = json.dumps({"session_id": victim, "pid": 1})
    c = _nobody(source)
    genuine.execute("INSERT INTO t VALUES (1)")
    # the probe's own strings, exactly
    c.execute(
        "SELECT pg_logical_emit_message(false,'undo.guard', repeat('0',64)"
        """||'{"session_id":"s"}'||chr(10)||'{"guard":[1]}')"""
    )
    _emit(c, True, "undo.ddl", ZEROS + session + '\n{"ddl":5}', then_write=2)
    _emit(c, True, "undo.ddl", '{"ddl":5}', then_write=3)
    _emit(c, True, "undo", ZEROS + session + '\n{"application_name":["x"]}', then_write=4)
    _emit(c, True, "undo", ZEROS + '{"session_id":{"a":1}}\n{}', then_write=5)
    # fields out of range, lone surrogates, a boolean for an integer, a deep document
    _emit(c, True, "undo", ZEROS + session + '\n{"xid":99999999999999999999}', then_write=6)
    _emit(c, True, "undo", ZEROS + session + '\n{"statement":"\\ud800"}', then_write=7)
    _emit(c, True, "undo", ZEROS + '{"session_id":"a","pid":true}\n{}', then_write=8)
    _emit(c, True, "undo", ZEROS + session + "\n" + "[" * 5000 + "]" * 5000, then_write=9)
    c.execute(  # a guard's refusal dated and shaped wrong
        "SELECT pg_logical_emit_message(false, 'undo.guard', %s)",
        (ZEROS + session + '\n{"guard":"g","at":"tomorrow"}',),
    )
    # bytes that are not UTF-8, under every prefix, both kinds
    for prefix in PREFIXES:
        for transactional in (True, False):
            _emit(c, transactional, prefix, b"\xff\xfe\xc3(" + bytes(range(1, 32)))
    # the wrong kind: a non-transactional tag, a transactional refusal
    c.execute("SELECT pg_logical_emit_message(false, 'undo', %s)", (ZEROS + session + "\n{}",))
    _emit(c, True, "undo.guard", ZEROS + session + '\n{"guard":"g"}', then_write=10)
    genuine.execute("INSERT INTO t VALUES (11)")
    report = source.capture()
    assert _stored_ids(source) == list(range(1, 12))
    assert report.changes == 11
    # capture goes on: a later run stores what follows
    genuine.execute("INSERT INTO t VALUES (12)")
    source.capture()
    assert _stored_ids(source)[-1] == 12

    kept = source.store_rows("SELECT prefix, session_id, problem FROM malformed ORDER BY lsn")
    assert ("undo.guard", "s", "message.guard: expected a string, got list") in kept
    assert ("undo", victim, "message.application_name: expected a string, got list") in kept
    assert ("undo", None, "session.session_id: expected a string, got dict") in kept
    status = json.loads(source.undo_cli("status", "--json").stdout)
    assert status["malformed_messages"]["undo.guard"] >= 3
    assert sum(status["malformed_messages"].values()) == len(kept)
    # the writes under a malformed tag are untrusted, never the session they claim
    tags = source.store_rows(
        "SELECT DISTINCT t.tag, t.tag_reason FROM transactions t JOIN changes c ON c.txn = t.id"
        " WHERE json_extract(c.new, '$[0]') IN ('4', '5', '6', '7', '8', '9')"
    )
    assert tags == [("untrusted", "malformed")]
    shown = json.loads(source.undo_cli("show", "session", victim, "--json").stdout)
    assert [t["xid"] for t in shown["transactions"]]  # the genuine session is still shown
    assert {m["prefix"] for m in shown["malformed"]} >= {"undo"}
    assert all(t["tag"] == "trusted" for t in shown["transactions"])
    # and nothing of it reached the refusals or the DDL record
    assert source.store_rows("SELECT count(*) FROM guard_refusals") == [(0,)]
    assert source.store_rows("SELECT DISTINCT command, tag FROM ddl") == [
        ("(a DDL record undo did not make)", "untrusted")
    ]
    genuine.close()
    c.close()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "session_id",
                    "pid",
                    "xid",
                    "application_name",
                    "statement",
                    "guard",
                    "at",
                    "ddl",
                    "state",
                    "entries",
                    "target",
                    "command",
                    "object",
                    "oid",
                    "undo",
                ]
            )
            | st.text(max_size=5),
            children,
            max_size=4,
        )
    ),
    max_leaves=8,
)


@st.composite
def _contents(draw):
    """Arbitrary bytes, arbitrary JSON, and the envelope of a signed message around arbitrary
    JSON (what gets past the first checks)."""
    kind = draw(st.sampled_from(["bytes", "json", "signed"]))
    if kind == "bytes":
        return draw(st.binary(max_size=80).filter(lambda b: b"\0" not in b))
    doc = json.dumps(draw(_json))
    if kind == "json":
        return doc.encode()
    head = json.dumps(draw(st.one_of(_json, st.fixed_dictionaries({"session_id": _json}))))
    return (ZEROS + head + "\n" + doc).encode()


@settings(max_examples=12)  # deadline and health checks: the profile in tests/conftest.py
@given(st.lists(st.tuples(st.sampled_from(PREFIXES), st.booleans(), _contents()), max_size=5))
def test_arbitrary_messages_under_every_prefix_leave_capture_going(source, messages):
    """Arbitrary bytes and JSON under every prefix, transactional or not, each next to a real
    write: capture returns normally and stores every real write, nothing more."""
    if not os.path.exists(source.store):  # the fixture is the same for every example
        source.sql("CREATE TABLE t (id int PRIMARY KEY)")
        source.init()
    (before,) = source.sql("SELECT count(*) FROM t")[0]
    with source.connect() as c:
        for i, (prefix, transactional, content) in enumerate(messages):
            _emit(c, transactional, prefix, content)
            c.execute("INSERT INTO t VALUES (%s)", (before + i + 1,))
    source.capture()
    assert _stored_ids(source) == list(range(1, before + len(messages) + 1))
