"""Row images as the store keeps them: one definition of each thing that reads or writes one.

An image is a JSON array of each column's PostgreSQL text form, or null: ``["7","a b",null]``.
Capture writes it from the decoders' JSON tokens without decoding a value (and the C stage,
``undo/_speedups.c``, the same bytes: its tests compare it with :func:`key_of_tokens`). The key
of a change (``changes.key``) is the image of its key columns: the new row's, the old row's for
a delete. An update's new image holds null for a TOASTed value the update left unchanged, whose
position is in ``unchanged``: the row as the update left it takes that value from the old
image (:func:`merged_new`). A change's operation is one letter; :data:`OP_NAMES` says it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from json.encoder import encode_basestring as _token
from typing import Any

Value = str | None

#: a change's operation, as the store keeps it and as commands say it
OP_NAMES = {"I": "insert", "U": "update", "D": "delete", "T": "truncate"}
#: the operations an undo takes (``--only``), by name
OPS = {name: op for op, name in OP_NAMES.items() if op != "T"}

#: the C scanner behind json.loads, without its Python wrapper (whitespace regexes): the store's
#: arrays have no surrounding whitespace, and this halves the cost of reading a change
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def load(text: str) -> Any:
    """An image's (or a list's) JSON text -> its values.

    >>> load('["7",null]')
    ['7', None]
    """
    return _scan(text, 0)[0]


def image_text(values: Sequence[Value]) -> str:
    """An image as the store writes it: a JSON array of text forms (capture's own tokens).

    >>> image_text(["a\\tb", None])
    '["a\\\\tb",null]'
    """
    return "[" + ",".join("null" if v is None else _token(v) for v in values) + "]"


def key_of_tokens(tokens: Sequence[str], positions: Sequence[int]) -> str:
    """The stored key of a row given as capture's JSON tokens: the tokens at the key's
    positions, as a JSON array.

    >>> key_of_tokens(['"7"', '"a"', 'null'], (0,)), key_of_tokens(['"7"', '"a"'], (1, 0))
    ('["7"]', '["a","7"]')
    """
    if len(positions) == 1:  # most keys: no list and no join
        return "[" + tokens[positions[0]] + "]"
    return "[" + ",".join([tokens[i] for i in positions]) + "]"


def key_text(image: Sequence[Value], positions: Sequence[int] | None) -> str | None:
    """The stored key of a row given as values (None for a keyless table).

    >>> key_text(["7", "a"], (0,)), key_text(["7"], None)
    ('["7"]', None)
    """
    if positions is None:
        return None
    return image_text([image[i] for i in positions])


def merged_new(old: Sequence[Value], new: Sequence[Value], unchanged: Iterable[int]) -> list[Value]:
    """The row as an update left it: TOASTed values it left unchanged come from the old image.

    >>> merged_new(["1", "big"], ["2", None], [1])
    ['2', 'big']
    """
    out = list(new)
    for i in unchanged:
        out[i] = old[i]
    return out


def by_name(columns: Sequence[str], image: Sequence[Value] | None) -> dict[str, Value] | None:
    """An image as {column: value}, as commands show one.

    >>> by_name(["id", "v"], ["7", None])
    {'id': '7', 'v': None}
    """
    return None if image is None else dict(zip(columns, image, strict=False))


def shown_images(
    columns: Sequence[str], old_text: str | None, new_text: str | None, unchanged_text: str | None
) -> tuple[dict[str, Value] | None, dict[str, Value] | None]:
    """A stored change's old and new rows by column, the new one as the update left it (a
    TOASTed value it left unchanged shown as the old value it kept)."""
    old = load(old_text) if old_text else None
    new = load(new_text) if new_text else None
    if new is not None and old is not None and unchanged_text:
        new = merged_new(old, new, load(unchanged_text))
    return by_name(columns, old), by_name(columns, new)
