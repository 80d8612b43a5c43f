"""A malformed frame from the server is refused alike by capture's C path and by its Python
reference (the fallback without a compiler): a truncated tuple, a length past the end, a short
message are a ValueError on both, never a shorter value or a message taken as it is.

Capture feeds a frame to the decoder's ``stage`` (C) first and decodes it in Python when that
leaves it; ``feed`` below does the same, with the C module or without it."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from undo import _speedups as speedups  # the suite expects it built (./dev setup has cc)
from undo.core.records import Relation
from undo.stream import pgoutput, wal2json
from undo.stream._accel import no_stage

RELID = 16384


def tuple_data(*values: bytes | None) -> bytes:
    out = struct.pack(">h", len(values))
    for v in values:
        out += b"n" if v is None else b"t" + struct.pack(">i", len(v)) + v
    return out


def head(op: bytes) -> bytes:
    return op + struct.pack(">I", RELID)


INSERT = head(b"I") + b"N" + tuple_data(b"abc", None)
UPDATE = head(b"U") + b"O" + tuple_data(b"1", b"x") + b"N" + tuple_data(b"1", b"y")
DELETE = head(b"D") + b"O" + tuple_data(b"1", b"x")
BEGIN = b"B" + struct.pack(">QqI", 100, 0, 7)
COMMIT = b"C" + struct.pack(">BQQq", 0, 100, 108, 0)
MESSAGE = b"M" + struct.pack(">BQ", 1, 100) + b"undo\0" + struct.pack(">i", 5) + b"hello"
RELATION = (
    b"R"
    + struct.pack(">I", RELID)
    + b"s\0t\0f"
    + struct.pack(">h", 2)
    + b"".join(b"\x01" + n + b"\0" + struct.pack(">Ii", 23, -1) for n in (b"c0", b"c1"))
)
TRUNCATE = b"T" + struct.pack(">iB", 1, 0) + struct.pack(">I", RELID)


def cuts(message: bytes, name: str) -> list[Any]:
    """Every proper prefix of a message but the empty one."""
    return [pytest.param(message[:n], id=f"{name}[:{n}]") for n in range(1, len(message))]


PGOUTPUT_MALFORMED = [
    *cuts(INSERT, "insert"),
    *cuts(UPDATE, "update"),
    *cuts(DELETE, "delete"),
    *cuts(BEGIN, "begin"),
    *cuts(COMMIT, "commit"),
    *cuts(MESSAGE, "message"),
    *cuts(RELATION, "relation"),
    *cuts(TRUNCATE, "truncate"),
    pytest.param(b"", id="empty"),
    # a value's length of 0xFFFFFFFF (-1 as int32, 4 GiB as uint32), and one past the end
    pytest.param(
        head(b"I") + b"N" + struct.pack(">h", 1) + b"t\xff\xff\xff\xffabc", id="length-ffffffff"
    ),
    pytest.param(
        head(b"I") + b"N" + struct.pack(">h", 1) + b"t" + struct.pack(">i", 4) + b"abc",
        id="length-past-end",
    ),
    pytest.param(
        head(b"U") + b"O" + tuple_data(b"1") + b"N" + struct.pack(">h", 1) + b"t\xff\xff\xff\xff",
        id="update-new-length-ffffffff",
    ),
    # a message's content longer than what follows it, or negative
    pytest.param(MESSAGE[:-9] + struct.pack(">i", 6) + b"hello", id="message-length-past-end"),
    pytest.param(MESSAGE[:-9] + b"\xff\xff\xff\xffhello", id="message-length-ffffffff"),
    pytest.param(MESSAGE[:10] + b"undo", id="message-prefix-unterminated"),
    pytest.param(b"T" + struct.pack(">iB", -1, 0), id="truncate-negative-count"),
    # a change of a relation the stream never described
    pytest.param(INSERT[:1] + struct.pack(">I", RELID + 1) + INSERT[5:], id="unknown-relation"),
    # the byte before a tuple is not one pgoutput sends there
    pytest.param(INSERT[:5] + b"X" + INSERT[6:], id="insert-not-N"),
    pytest.param(UPDATE.replace(b"N", b"X", 1), id="update-new-not-N"),
    pytest.param(DELETE[:5] + b"N" + DELETE[6:], id="delete-not-O-or-K"),
]


def pgoutput_decoder(path: str, monkeypatch: pytest.MonkeyPatch) -> pgoutput.PgOutputDecoder:
    if path == "python":
        monkeypatch.setattr(pgoutput, "_tuple", pgoutput._py_tuple)
    else:
        assert pgoutput._tuple is speedups.tuple_tokens
    decoder = pgoutput.PgOutputDecoder()
    if path == "python":
        decoder.stage = no_stage
    decoder.relations[RELID] = Relation(RELID, "s", "t", ("c0", "c1"))
    # resolved as audited: the C stage takes every well-formed change of it
    decoder.resolved[RELID] = (9, (0,))
    return decoder


def feed(decoder: Any, message: bytes) -> Any:
    """One XLogData frame through capture's two steps: stage (C), else decode (Python)."""
    frame = memoryview(b"w" + struct.pack(">QQQ", 100, 100, 0) + message)
    rows: list[Any] = []
    if decoder.stage(frame, decoder.resolved, rows, {}, 7, 3, 5):
        return rows
    return decoder.decode(bytes(frame[25:]))


def outcome(run: Callable[[], Any]) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        run()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("message", PGOUTPUT_MALFORMED)
def test_a_malformed_pgoutput_frame_is_refused_alike_by_both_paths(message, monkeypatch):
    with monkeypatch.context() as m:
        c_path = outcome(lambda: feed(pgoutput_decoder("c", m), message))
    with monkeypatch.context() as m:
        python_path = outcome(lambda: feed(pgoutput_decoder("python", m), message))
    assert c_path[0] is ValueError, c_path
    assert python_path == c_path


@pytest.mark.parametrize("message", [INSERT, UPDATE, DELETE, BEGIN, COMMIT, MESSAGE, RELATION])
def test_the_whole_messages_are_taken_by_both_paths(message, monkeypatch):
    """The frames cut above are well formed whole: what refuses them is the cut."""
    for path in ("c", "python"):
        with monkeypatch.context() as m:
            feed(pgoutput_decoder(path, m), message)


W2J_INSERT = (
    '{"action":"I","schema":"s","table":"t","columns":[{"name":"id","type":"integer",'
    '"typeoid":23,"value":1}]}'
)

WAL2JSON_MALFORMED = [
    *[pytest.param(W2J_INSERT[:n], id=f"insert[:{n}]") for n in range(1, len(W2J_INSERT), 7)],
    pytest.param("[1]", id="not-an-object"),
    pytest.param('"I"', id="a-string"),
    pytest.param('{"action":"I","schema":"s","table":"t"}', id="insert-no-columns"),
    pytest.param('{"action":"I","schema":"s","table":"t","columns":[1]}', id="column-not-object"),
    pytest.param(
        '{"action":"I","schema":"s","table":"t","columns":[{"name":"id","value":1}]}',
        id="column-no-type",
    ),
    pytest.param('{"action":"D","schema":"s","table":"t","identity":{"a":1}}', id="identity-obj"),
    pytest.param('{"action":"B","xid":1}', id="begin-short"),
    pytest.param(
        '{"action":"C","lsn":"0/10","nextlsn":"bad","timestamp":"2026-01-01 00:00:00+00"}',
        id="commit-bad-lsn",
    ),
    pytest.param('{"action":"C","lsn":"0/10"}', id="commit-short"),
    pytest.param('{"action":"M","transactional":true,"prefix":"undo"}', id="message-short"),
    pytest.param(
        '{"action":"M","transactional":true,"prefix":"undo","content":[104,105],"lsn":"0/10"}',
        id="message-content-a-list",
    ),
    pytest.param('{"action":"T","schema":"s"}', id="truncate-short"),
]


@pytest.mark.parametrize("document", WAL2JSON_MALFORMED)
@pytest.mark.parametrize("path", ["c", "python"])
def test_a_malformed_wal2json_frame_is_a_value_error(document, path):
    decoder = wal2json.Wal2JsonDecoder()
    if path == "python":
        decoder.stage = no_stage
    decoder.resolved[wal2json.signature("s", "t", ("id",))] = (9, (0,))
    kind, _ = outcome(lambda: feed(decoder, document.encode()))
    assert issubclass(kind, ValueError)  # json's JSONDecodeError is one
