"""The C tuple decoder (undo/_speedups.c) against its Python reference: the same tokens for any
tuple pgoutput can send, the same errors for text that is not UTF-8."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from undo import _speedups as speedups  # the suite expects it built (./dev setup has cc)
from undo.stream import pgoutput

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
def test_a_truncated_tuple_is_an_error_not_a_short_value(cut):
    buf = tuple_data([("t", "abc"), ("n", None)])
    with pytest.raises(ValueError, match="truncated"):
        speedups.tuple_tokens(buf[: len(buf) - cut], 0)


def test_an_unknown_column_kind_is_refused():
    with pytest.raises(ValueError, match="unexpected tuple column kind 'b'"):
        speedups.tuple_tokens(struct.pack(">h", 1) + b"b", 0)
