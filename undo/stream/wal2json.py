"""wal2json format-version 2: one JSON document -> one record (or None).

Pure: no I/O. Numbers are kept as the exact text wal2json printed (never a float), booleans
become 't'/'f', bytea gets back its '\\x' prefix, so values match pgoutput's text form. A column
missing from an UPDATE's new tuple is a TOASTed value left unchanged, not a NULL.
wal2json sends no relation OID; capture resolves it by name.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from datetime import datetime
from json.encoder import encode_basestring as _token
from typing import Any

from undo.core.records import NULL, Begin, Change, Commit, Message, Record, Relation, Truncate
from undo.core.times import iso
from undo.core.wal import lsn_to_int
from undo.stream._accel import native, no_stage

#: the C scanner of a decoder whose numbers stay text; called directly, without the two
#: whitespace regexes and two Python calls of JSONDecoder.decode around it (wal2json sends one
#: document per message, with nothing around it): 7% of wal2json capture under a profile
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder(
    parse_float=str, parse_int=str
).scan_once  # type: ignore[attr-defined]  # set by JSONDecoder.__init__, not in typeshed
_name = operator.itemgetter("name")


def _loads(text: str) -> Any:
    """One JSON document, as json.loads would read it (wal2json's numbers as their text).

    >>> _loads('{"a": 1.50, "b": [true, null]}')
    {'a': '1.50', 'b': [True, None]}
    >>> _loads('{"a": 1} x')
    Traceback (most recent call last):
    ...
    ValueError: wal2json: not one JSON document
    """
    try:
        doc, end = _scan(text, 0)
    except StopIteration:
        end = -1
    if end != len(text):
        raise ValueError("wal2json: not one JSON document")
    return doc


#: stage(frame, resolved, rows, counts, change_id, txn_id, ord) -> 1 staged, 2 not audited, 0
#: for the Python path (undo/_speedups.c)
stage: Callable[..., int] = native.stage_wal2json if native else no_stage


def signature(schema: str, table: str, columns: tuple[str, ...]) -> bytes:
    """What names a table version in ``resolved``: the C stage builds the same bytes.

    >>> signature("public", "t", ("id", "v"))
    b'public\\x00t\\x00id\\x00v'
    """
    return "\0".join((schema, table, *columns)).encode()


def plugin_options(numbers_as_strings: bool) -> list[tuple[str, str]]:
    opts = [
        ("format-version", "2"),
        ("include-xids", "1"),
        ("include-timestamp", "1"),
        ("include-lsn", "1"),
        ("include-transaction", "1"),
        ("include-typmod", "1"),
        ("include-type-oids", "1"),
    ]
    if numbers_as_strings:
        opts.append(("numeric-data-types-as-string", "1"))
    return opts


def _time(text: str) -> str:
    return iso(datetime.fromisoformat(text))


def _tokens(cols: list[dict[str, Any]]) -> list[str]:
    """wal2json columns -> the JSON tokens of their PostgreSQL text forms (one loop, no call
    per value: this is the decoder's hot path)."""
    out: list[str] = []
    append = out.append
    for c in cols:
        v = c.get("value")
        if type(v) is str:  # strings as sent, numbers as their exact digits (parse_* = str)
            append(_token("\\x" + v) if c["type"] == "bytea" else _token(v))
        elif v is None:
            append(NULL)
        elif v is True:
            append('"t"')
        elif v is False:
            append('"f"')
        else:
            raise ValueError(f"wal2json: unexpected value {v!r}")
    return out


class Wal2JsonDecoder:
    """Decodes one wal2json v2 document; builds a Relation per distinct column list."""

    name = "wal2json"

    def __init__(self) -> None:
        self.relations: dict[tuple[Any, ...], Relation] = {}
        #: signature -> (store id, key positions) of the table versions capture resolved as
        #: audited with complete old rows, (None, None) of those not audited: the changes
        #: ``stage`` may take or drop (capture fills it)
        self.resolved: dict[bytes, tuple[int | None, tuple[int, ...] | None]] = {}
        self.stage = stage

    @staticmethod
    def resolved_key(rel: Relation) -> bytes:
        return signature(rel.schema, rel.name, rel.columns)

    def _relation(self, doc: dict[str, Any], cols: list[dict[str, Any]]) -> Relation:
        names = tuple(map(_name, cols))
        key = (doc["schema"], doc["table"], names)
        rel = self.relations.get(key)
        if rel is None:
            # type OIDs (include-type-oids), turned into format_type text by capture as for
            # pgoutput, so both decoders name a type alike (wal2json's own says char for "char")
            rel = Relation(
                None, doc["schema"], doc["table"], names, tuple(int(c["typeoid"]) for c in cols)
            )
            self.relations[key] = rel
        return rel

    def decode(self, buf: bytes) -> Record | None:
        """One document -> its record; ValueError for one that is malformed: not one JSON
        object, a field missing or of another type than wal2json sends."""
        try:
            doc = _loads(bytes(buf).decode())
        except UnicodeDecodeError:
            # wal2json writes a message's content bytes into the document as they are: any role
            # can emit bytes that are not UTF-8. Kept as they were (messages.py judges them).
            # Anything else is PostgreSQL's own text, never invalid: that is a broken stream.
            doc = _loads(bytes(buf).decode(errors="surrogateescape"))
            if not isinstance(doc, dict) or doc.get("action") != "M":
                raise
        try:
            action = doc["action"]
            if action == "I":
                cols = doc["columns"]
                rel = self._relation(doc, cols)
                rel.whole = True
                return Change(rel, "I", None, _tokens(cols))
            if action == "U":
                ident = doc.get("identity") or []
                cols = doc["columns"]
                if len(cols) == len(ident):  # the common case: nothing left out of the new tuple
                    rel = self._relation(doc, ident)
                    if all(a["name"] == b["name"] for a, b in zip(cols, ident, strict=True)):
                        return Change(rel, "U", _tokens(ident), _tokens(cols))
                if not ident or not {c["name"] for c in ident} >= {c["name"] for c in cols}:
                    return Change(self._relation(doc, cols), "U", None, _tokens(cols))
                rel = self._relation(doc, ident)
                by_name = {c["name"]: c for c in cols}
                new_values: list[str] = []
                unchanged: list[int] | None = None
                for i, c in enumerate(ident):
                    n = by_name.get(c["name"])
                    if n is None:
                        new_values.append(NULL)
                        if unchanged is None:
                            unchanged = []
                        unchanged.append(i)
                    else:
                        new_values += _tokens([n])
                return Change(rel, "U", _tokens(ident), new_values, unchanged)
            if action == "D":
                ident = doc.get("identity") or []
                rel = self._relation(doc, ident)
                return Change(rel, "D", _tokens(ident), None)
            if action == "B":
                return Begin(int(doc["xid"]), lsn_to_int(doc["lsn"]), _time(doc["timestamp"]))
            if action == "C":
                return Commit(
                    lsn_to_int(doc["lsn"]), lsn_to_int(doc["nextlsn"]), _time(doc["timestamp"])
                )
            if action == "M":
                content = doc["content"]
                if not isinstance(content, str):  # wal2json sends the content as a string
                    raise ValueError(f"wal2json: a message's content of {type(content).__name__}")
                return Message(
                    bool(doc["transactional"]),
                    doc["prefix"],
                    content.encode(errors="surrogateescape"),
                    lsn_to_int(doc["lsn"]),
                )
            if action == "T":
                key = (doc["schema"], doc["table"], ())
                if key not in self.relations:
                    self.relations[key] = Relation(None, doc["schema"], doc["table"], (), types=())
                return Truncate((self.relations[key],))
            return None
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            what = doc.get("action") if isinstance(doc, dict) else None
            raise ValueError(f"wal2json: malformed document ({what!r}: {e!r})") from None
