"""Capture's C hot path (undo/_speedups.c) against its Python reference: the same tokens for any
tuple pgoutput can send, the same staged rows for any change it takes, the same errors for text
that is not UTF-8, and everything else left to the Python path untouched."""

from __future__ import annotations

import json
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from undo import _speedups as speedups
from undo.core.records import Begin, Relation
from undo.store import open_store
from undo.stream import pgoutput, wal2json

# a column: NULL, unchanged TOAST, or a text value (any code point but the surrogates,
# which UTF-8 cannot carry; control characters, quotes and backslashes included)
column = st.one_of(
    st.just(("n", None)),
    st.just(("u", None)),
    st.tuples(st.just("t"), st.text(st.characters(exclude_categories=["Cs"]), max_size=40)),
)


def tuple_data(columns: list[tuple[str, str | None]], prefix: bytes = b"") -> bytes:
    out = bytearray(prefix + struct.pack(">h", len(columns)))
    for kind, text in columns:
        out += kind.encode()
        if text is not None:
            raw = text.encode()
            out += struct.pack(">i", len(raw)) + raw
    return bytes(out)


def test_capture_decodes_with_the_c_module():
    assert pgoutput._tuple is speedups.tuple_tokens
    assert pgoutput.PgOutputDecoder().stage is speedups.stage
    assert wal2json.Wal2JsonDecoder().stage is speedups.stage_wal2json


@given(st.lists(column, max_size=12), st.binary(max_size=7))
def test_the_same_tokens_as_python(columns, prefix):
    buf = tuple_data(columns, prefix) + b"rest"
    got = speedups.tuple_tokens(buf, len(prefix))
    assert got == pgoutput._py_tuple(buf, len(prefix))
    tokens, unchanged, end = got
    assert buf[end:] == b"rest"
    assert [json.loads(t) for t in tokens] == [text for _, text in columns]
    assert unchanged == ([i for i, (k, _) in enumerate(columns) if k == "u"] or None)


@pytest.mark.parametrize("raw", [b"\xff", b"a\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_text_that_is_not_utf8_fails_alike(raw):
    buf = struct.pack(">h", 1) + b"t" + struct.pack(">i", len(raw)) + raw
    with pytest.raises(UnicodeDecodeError):
        pgoutput._py_tuple(buf, 0)
    with pytest.raises(UnicodeDecodeError):
        speedups.tuple_tokens(buf, 0)


@pytest.mark.parametrize("cut", range(1, 12))
@pytest.mark.parametrize("tuple_tokens", [speedups.tuple_tokens, pgoutput._py_tuple])
def test_a_truncated_tuple_is_an_error_not_a_short_value(cut, tuple_tokens):
    buf = tuple_data([("t", "abc"), ("n", None)])
    with pytest.raises(ValueError, match="truncated"):
        tuple_tokens(buf[: len(buf) - cut], 0)


@pytest.mark.parametrize("tuple_tokens", [speedups.tuple_tokens, pgoutput._py_tuple])
def test_an_unknown_column_kind_is_refused(tuple_tokens):
    with pytest.raises(ValueError, match="unexpected tuple column kind 'b'"):
        tuple_tokens(struct.pack(">h", 1) + b"b", 0)


# -- stage: a change frame straight into the writer's rows -------------------------------------

RELID = 16384


def frame(message: bytes) -> memoryview:
    """An XLogData frame as psycopg hands it over: 'w', three 8-byte fields, the message."""
    return memoryview(b"w" + bytes(24) + message)


def change(op: str, old: list | None, new: list | None, old_kind: bytes = b"O") -> bytes:
    head = op.encode() + struct.pack(">I", RELID)
    if op == "I":
        return head + b"N" + tuple_data(new)
    if op == "D":
        return head + old_kind + tuple_data(old)
    return head + (b"" if old is None else old_kind + tuple_data(old)) + b"N" + tuple_data(new)


@pytest.fixture(scope="module")
def writer(tmp_path_factory):
    db = open_store(str(tmp_path_factory.mktemp("s") / "s.db"), create=True)
    db.register_source("s", "1", "s")
    return db.writer()


def python_path(writer, message: bytes, key: tuple[int, ...] | None, ncols: int = 0):
    """What capture's Python path stages for the message: decode, then StoreWriter.add."""
    if message.startswith(b"{"):
        rec = wal2json.Wal2JsonDecoder().decode(message)
    else:
        decoder = pgoutput.PgOutputDecoder()
        columns = tuple(f"c{i}" for i in range(ncols))
        decoder.relations[RELID] = Relation(RELID, "s", "t", columns)
        rec = decoder.decode(message)
    writer.begin(Begin(3, 100, "2026-01-01T00:00:00.000000Z"))
    assert writer.txn is not None
    writer.txn.ord, writer.txn.id = 4, 3
    writer.next_change = 7
    writer.add(rec, 9, key)
    staged = (list(writer.rows), dict(writer.txn.counts))
    writer.abort()
    return staged


images = st.integers(1, 6).flatmap(
    lambda n: st.tuples(
        st.lists(column.filter(lambda c: c[0] != "u"), min_size=n, max_size=n),
        st.lists(column.filter(lambda c: c[0] != "u"), min_size=n, max_size=n),
        st.one_of(st.none(), st.lists(st.integers(0, n - 1), min_size=1, max_size=3)),
    )
)


@settings(max_examples=300)  # deadline and health checks: the profile in tests/conftest.py
@given(st.sampled_from("IUD"), images)
def test_stage_appends_what_the_python_path_does(writer, op, image_pair):
    old, new, key = image_pair
    key = None if key is None else tuple(key)
    message = change(op, old, new)
    rows: list = []
    counts: dict = {}
    assert speedups.stage(frame(message), {RELID: (9, key)}, rows, counts, 7, 3, 5) == 1
    assert (rows, counts) == python_path(writer, message, key, len(old))


@pytest.mark.parametrize(
    "message",
    [
        change("U", [("t", "1")], [("u", None)]),  # an unchanged TOASTed value
        change("U", [("t", "1")], [("t", "2")], old_kind=b"K"),  # key-only old row
        change("U", None, [("t", "2")]),  # no old row
        change("D", [("t", "1")], None, old_kind=b"K"),
        b"B" + bytes(20),  # not a change
        change("I", None, [("t", "1")])[:9],  # truncated
        change("I", None, [("t", "1"), ("t", "2")]).replace(b"N", b"N", 1)[:-1],
    ],
)
def test_stage_leaves_everything_else_to_the_python_path(message):
    rows: list = ["x"]
    counts: dict = {}
    assert not speedups.stage(frame(message), {RELID: (9, (0,))}, rows, counts, 7, 3, 5)
    assert (rows, counts) == (["x"], {})


def test_stage_leaves_tables_not_resolved_to_the_python_path():
    message = change("I", None, [("t", "1")])
    assert not speedups.stage(frame(message), {RELID + 1: (9, None)}, [], {}, 7, 3, 5)


def test_stage_leaves_text_that_is_not_utf8_to_the_python_path_which_raises():
    raw = b"\xff"
    message = b"I" + struct.pack(">I", RELID) + b"N" + struct.pack(">h", 1) + b"t"
    message += struct.pack(">i", 1) + raw
    rows: list = []
    assert not speedups.stage(frame(message), {RELID: (9, None)}, rows, {}, 7, 3, 5)
    assert rows == []
    decoder = pgoutput.PgOutputDecoder()
    decoder.relations[RELID] = Relation(RELID, "s", "t", ("c0",))
    with pytest.raises(UnicodeDecodeError):
        decoder.decode(message)
    document = (W2J_INSERT % '"\xff"').encode("latin-1")
    sig = wal2json.signature("s", "t", ("id",))
    assert not speedups.stage_wal2json(frame(document), {sig: (9, None)}, rows, {}, 7, 3, 5)
    with pytest.raises(UnicodeDecodeError):
        wal2json.Wal2JsonDecoder().decode(document)


# -- stage_wal2json: the same for a wal2json document -------------------------------------------

TYPES = ["bigint", "text", "bytea", "boolean", "numeric", "jsonb", 'we"ird type']
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
json_number = st.from_regex(r"\A-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,4})?([eE][+-]?[0-9]{1,3})?\Z")


@st.composite
def w2j_value(draw) -> str | None:
    """A column's "value" as wal2json prints it (None: no value key at all)."""
    kind = draw(st.sampled_from(["str", "num", "true", "false", "null", "missing"]))
    if kind == "str":
        return json.dumps(draw(any_text), ensure_ascii=draw(st.booleans()))
    if kind == "num":
        return draw(json_number)
    return None if kind == "missing" else kind


@st.composite
def w2j_columns(draw, names: list[str], colon: str, comma: str) -> str:
    cols = []
    for name in names:
        fields = [
            f'"name"{colon}{json.dumps(name)}',
            f'"type"{colon}{json.dumps(draw(st.sampled_from(TYPES)))}',
            f'"typeoid"{colon}{draw(st.integers(16, 5000))}',
        ]
        value = draw(w2j_value())
        if value is not None:
            fields.append(f'"value"{colon}{value}')
        cols.append("{" + comma.join(draw(st.permutations(fields))) + "}")
    return "[" + comma.join(cols) + "]"


@st.composite
def w2j_change(draw):
    names = draw(st.lists(any_text, min_size=1, max_size=5))
    op = draw(st.sampled_from("IUD"))
    schema, table = draw(any_text), draw(any_text)
    # wal2json writes no space between tokens; json.loads takes any there
    colon, comma = draw(st.sampled_from([(":", ","), (": ", ", "), (" :\n", "\t, ")]))
    parts = [
        f'"action"{colon}"{op}"',
        f'"xid"{colon}728{comma}"timestamp"{colon}"2026-12-01 03:42:24.383785+00"',
        f'"schema"{colon}{json.dumps(schema)}{comma}"table"{colon}{json.dumps(table)}',
    ]
    if op in "IU":
        parts.append(f'"columns"{colon}{draw(w2j_columns(names, colon, comma))}')
    if op in "UD":
        parts.append(f'"identity"{colon}{draw(w2j_columns(names, colon, comma))}')
    key = draw(st.one_of(st.none(), st.lists(st.integers(0, len(names) - 1), min_size=1)))
    doc = "{" + comma.join(draw(st.permutations(parts))) + "}"
    return doc.encode(), wal2json.signature(schema, table, tuple(names)), key


@settings(max_examples=300)
@given(w2j_change())
def test_stage_wal2json_appends_what_the_python_path_does(writer, change):
    message, sig, key = change
    key = None if key is None else tuple(key)
    rows: list = []
    counts: dict = {}
    assert speedups.stage_wal2json(frame(message), {sig: (9, key)}, rows, counts, 7, 3, 5) == 1
    assert (rows, counts) == python_path(writer, message, key)


W2J_INSERT = (
    '{"action":"I","schema":"s","table":"t","columns":[{"name":"id","type":"integer",'
    '"typeoid":23,"value":%s}]}'
)


@pytest.mark.parametrize(
    "message",
    [
        W2J_INSERT % "NaN",  # json.loads reads it, _tokens refuses it
        W2J_INSERT % "-Infinity",
        W2J_INSERT % '{"a": 1}',
        W2J_INSERT % '"\\ud800"',  # a lone surrogate
        W2J_INSERT % '"tab\there"',  # a control character json.loads refuses
        W2J_INSERT % "1" + " ",  # json.loads takes nothing after the document
        " " + W2J_INSERT % "1",
        W2J_INSERT % "01",
        (W2J_INSERT % "1")[:-2],  # truncated
        '{"action":"M","transactional":true,"prefix":"undo","content":"x"}',
        '{"action":"B","xid":1}',
        # an update whose new row leaves out an unchanged TOASTed value
        '{"action":"U","schema":"s","table":"t","columns":[{"name":"id","type":"integer",'
        '"value":1}],"identity":[{"name":"id","type":"integer","value":1},{"name":"v",'
        '"type":"text","value":"x"}]}',
        '{"action":"D","schema":"s","table":"t","identity":[]}',
    ],
)
def test_stage_wal2json_leaves_everything_else_to_the_python_path(message):
    rows: list = ["x"]
    counts: dict = {}
    sig = wal2json.signature("s", "t", ("id",))
    resolved = {sig: (9, (0,)), wal2json.signature("s", "t", ("id", "v")): (9, (0,))}
    assert not speedups.stage_wal2json(frame(message.encode()), resolved, rows, counts, 7, 3, 5)
    assert (rows, counts) == (["x"], {})


def test_stage_wal2json_leaves_tables_not_resolved_to_the_python_path():
    message = (W2J_INSERT % "1").encode()
    other = wal2json.signature("s", "t", ("id", "v"))
    assert not speedups.stage_wal2json(frame(message), {other: (9, None)}, [], {}, 7, 3, 5)


def test_a_value_of_megabytes_is_staged_whole(writer):
    """Scratch buffers grow for it and are given back after the call."""
    big = 'x"\\\n' * 800_000
    for _ in range(2):
        message = change("U", [("t", "1"), ("t", big)], [("t", "1"), ("t", big + "!")])
        rows: list = []
        assert speedups.stage(frame(message), {RELID: (9, (0,))}, rows, {}, 7, 3, 5)
        assert rows == python_path(writer, message, (0,), 2)[0]
        assert json.loads(rows[7])[1] == big + "!"


def test_a_change_of_a_table_not_audited_is_dropped_untouched():
    pg = frame(change("I", None, [("t", "1")]))
    w2j = frame((W2J_INSERT % "1").encode())
    sig = wal2json.signature("s", "t", ("id",))
    rows: list = []
    counts: dict = {}
    assert speedups.stage(pg, {RELID: (None, None)}, rows, counts, 7, 3, 5) == 2
    assert speedups.stage_wal2json(w2j, {sig: (None, None)}, rows, counts, 7, 3, 5) == 2
    assert (rows, counts) == ([], {})


def test_scratch_space_a_huge_value_grew_is_given_back():
    """Capture runs for months: one large value must not hold its size of memory after it."""
    big = "x" * 20_000_000  # larger than any value before it here: the buffers grow for it
    message = frame(change("U", [("t", "1"), ("t", big)], [("t", "1"), ("t", big + "!")]))
    tracemalloc.start()
    try:
        rows: list = []
        assert speedups.stage(message, {RELID: (9, (0,))}, rows, {}, 7, 3, 5) == 1
        del rows
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 1_000_000


# -- a PostgreSQL store's images ---------------------------------------------------------------

#: jsonb's text of a flat array of strings and nulls, as the server prints one (", " between
#: elements, json.dumps's escapes), and near misses: another separator, other JSON values
_jsonb_string = st.text(st.characters(exclude_categories=["Cs"]), max_size=8).map(
    lambda v: json.dumps(v, ensure_ascii=False)
)
_jsonb_element = st.sampled_from(["null", "1", '""', "[]", '"\\', "nul", '"a"b"']) | _jsonb_string
_jsonb_flat = st.lists(st.just("null") | _jsonb_string, max_size=5).map(
    lambda t: ("[" + ", ".join(t) + "]").encode()
)
_jsonb_text = _jsonb_flat | st.tuples(
    st.lists(_jsonb_element, max_size=5),
    st.sampled_from([", ", ",", " , ", ",  "]),
    st.sampled_from([("[", "]"), ("[", "] "), (" [", "]"), ("[", ""), ("{", "}")]),
).map(lambda t: (t[2][0] + t[1].join(t[0]) + t[2][1]).encode())


def _python_compact(data: bytes) -> str | None:
    from undo.store.postgres._store import _FLAT, _py_json_text

    return _py_json_text(data) if _FLAT.fullmatch(data) else None


def test_a_postgresql_store_loads_images_with_the_c_module():
    from undo.store.postgres import _store

    assert _store._compact is speedups.compact_flat_array


@settings(max_examples=500)
@given(
    st.one_of(
        _jsonb_text,
        st.binary(max_size=12).map(lambda b: b"[" + b + b"]"),
        st.binary(max_size=6).map(
            lambda b: b'["' + b.replace(b'"', b"").replace(b"\\", b"") + b'"]'
        ),
    )
)
def test_a_stored_image_compacts_as_in_python(data):
    """A PostgreSQL store's reader compacts jsonb's text of an image in C: the same text as
    its Python reference, None for any text that reference leaves to json.loads, and the same
    error for text that is not UTF-8."""
    try:
        expected = _python_compact(data)
    except UnicodeDecodeError:
        with pytest.raises(UnicodeDecodeError):
            speedups.compact_flat_array(data)
        return
    assert speedups.compact_flat_array(data) == expected
    assert speedups.compact_flat_array(memoryview(data)) == expected


def test_images_of_every_size_compact():
    for n in (0, 1, 100, 600, 100_000):  # below and above the stack buffer
        values = ["x" * n, None, "é" * n]
        raw = json.dumps(values, ensure_ascii=False, separators=(", ", ": ")).encode()
        assert speedups.compact_flat_array(raw) == json.dumps(
            values, ensure_ascii=False, separators=(",", ":")
        )
