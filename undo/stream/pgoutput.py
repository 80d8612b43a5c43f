"""pgoutput, protocol version 1, text values: one message -> one record (or None).

Pure: no I/O. Relation messages are remembered here and referred to by later changes.
Column values arrive as PostgreSQL's text output; 'u' marks a TOASTed value an UPDATE left
unchanged. With REPLICA IDENTITY FULL the old tuple ('O') is complete; a key-only ('K') or
missing old tuple means the change cannot be undone, and ``old`` is None.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from json.encoder import encode_basestring as _token

from undo.core.records import NULL, Begin, Change, Commit, Message, Record, Relation, Truncate
from undo.core.times import pg_time_to_iso
from undo.stream._accel import native, no_stage

_I16 = struct.Struct(">h")
_U32 = struct.Struct(">I")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")
_MSG_HEAD = struct.Struct(">BQ")


def plugin_options(publication: str) -> list[tuple[str, str]]:
    return [("proto_version", "1"), ("publication_names", publication), ("messages", "true")]


#: PostgreSQL's MaxTupleAttributeNumber: a row of more columns is not one the server sends
MAX_COLUMNS = 1664


class _Short(Exception):
    """A field runs past the end of its message (decode says which message)."""


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.find(b"\0", pos)
    if end < 0:
        raise _Short
    return buf[pos:end].decode(), end + 1


def _truncated() -> ValueError:
    return ValueError("pgoutput: truncated tuple data")


def _py_tuple(buf: bytes, pos: int) -> tuple[list[str], list[int] | None, int]:
    """TupleData -> (JSON tokens, positions of unchanged TOAST values, next position).

    The reference for undo/_speedups.c, used where that module was not built: the same values,
    and the same ValueError for what it refuses (a tuple cut short, a length past its end)."""
    size = len(buf)
    if pos < 0 or pos + 2 > size:
        raise _truncated()
    n = (buf[pos] << 8) | buf[pos + 1]
    pos += 2
    values: list[str] = []
    unchanged: list[int] | None = None
    append = values.append
    unpack = _U32.unpack_from
    for i in range(min(n, MAX_COLUMNS + 1)):
        if pos >= size:
            raise _truncated()
        kind = buf[pos]
        if kind != 0x74 and kind != 0x6E and kind != 0x75:
            raise ValueError(f"pgoutput: unexpected tuple column kind {chr(kind)!r}")
        if i == MAX_COLUMNS:
            raise ValueError(f"a row of more than {MAX_COLUMNS} columns")
        if kind == 0x74:  # 't'
            if pos + 5 > size:
                raise _truncated()
            (length,) = unpack(buf, pos + 1)
            pos += 5
            if length > size - pos:  # 0xFFFFFFFF (-1 as int32) too
                raise _truncated()
            append(_token(buf[pos : pos + length].decode()))
            pos += length
        elif kind == 0x6E:  # 'n'
            pos += 1
            append(NULL)
        else:  # 'u'
            pos += 1
            append(NULL)
            if unchanged is None:
                unchanged = []
            unchanged.append(i)
    return values, unchanged, pos


_tuple: Callable[[bytes, int], tuple[list[str], list[int] | None, int]] = (
    native.tuple_tokens if native else _py_tuple
)
#: stage(frame, resolved, rows, counts, change_id, txn_id, ord) -> 1 staged, 2 not audited, 0
#: for the Python path (undo/_speedups.c)
stage: Callable[..., int] = native.stage if native else no_stage


class PgOutputDecoder:
    """Decodes one pgoutput message at a time; keeps the relations seen so far."""

    name = "pgoutput"

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        #: relation OID -> (store id, key positions) of the tables capture resolved as audited
        #: with complete old rows, (None, None) of those not audited: the changes ``stage`` may
        #: take or drop (capture fills it)
        self.resolved: dict[int, tuple[int | None, tuple[int, ...] | None]] = {}
        self.stage = stage

    @staticmethod
    def resolved_key(rel: Relation) -> int | None:
        return rel.oid

    def decode(self, buf: bytes) -> Record | None:
        """One message -> its record; ValueError for one that is malformed: cut short, a
        length past its end, a change of a relation the stream never described."""
        if not buf:
            raise ValueError("pgoutput: empty message")
        kind = buf[0]
        try:
            if kind == 0x49:  # 'I'
                rel = self.relations[_U32.unpack_from(buf, 1)[0]]
                if buf[5] != 0x4E:  # 'N'
                    raise ValueError("pgoutput: malformed message 'I'")
                new, _, _ = _tuple(buf, 6)
                return Change(rel, "I", None, new)
            if kind == 0x55:  # 'U'
                rel = self.relations[_U32.unpack_from(buf, 1)[0]]
                pos = 5
                old = None
                if buf[pos] in (0x4F, 0x4B):  # 'O' full old tuple, 'K' key only
                    full = buf[pos] == 0x4F
                    old_values, _, pos = _tuple(buf, pos + 1)
                    old = old_values if full else None
                if buf[pos] != 0x4E:  # 'N'
                    raise ValueError("pgoutput: malformed message 'U'")
                new, unchanged, _ = _tuple(buf, pos + 1)
                return Change(rel, "U", old, new, unchanged)
            if kind == 0x44:  # 'D'
                rel = self.relations[_U32.unpack_from(buf, 1)[0]]
                if buf[5] not in (0x4F, 0x4B):  # 'O' full old tuple, 'K' key only
                    raise ValueError("pgoutput: malformed message 'D'")
                full = buf[5] == 0x4F
                old_values, _, _ = _tuple(buf, 6)
                return Change(rel, "D", old_values if full else None, None)
            if kind == 0x42:  # 'B'
                final_lsn, ts, xid = _BEGIN.unpack_from(buf, 1)
                return Begin(xid, final_lsn, pg_time_to_iso(ts))
            if kind == 0x43:  # 'C'
                _, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(buf, 1)
                return Commit(commit_lsn, end_lsn, pg_time_to_iso(ts))
            if kind == 0x52:  # 'R'
                self._relation(buf)
                return None
            if kind == 0x4D:  # 'M'
                flags, lsn = _MSG_HEAD.unpack_from(buf, 1)
                prefix, pos = _cstring(buf, 10)
                (length,) = _U32.unpack_from(buf, pos)
                pos += 4
                if length > len(buf) - pos:
                    raise _Short
                return Message(bool(flags & 1), prefix, bytes(buf[pos : pos + length]), lsn)
            if kind == 0x54:  # 'T'
                (count,) = _U32.unpack_from(buf, 1)
                if 6 + 4 * count > len(buf):
                    raise _Short
                relids = struct.unpack_from(f">{count}I", buf, 6)
                return Truncate(tuple(self.relations[r] for r in relids))
        except (_Short, struct.error, IndexError):
            raise ValueError(f"pgoutput: truncated message {chr(kind)!r}") from None
        except KeyError as e:
            raise ValueError(
                f"pgoutput: message {chr(kind)!r} of relation {e.args[0]}, never described"
            ) from None
        if kind in (0x59, 0x4F):  # 'Y' type, 'O' origin: nothing to record
            return None
        raise ValueError(f"pgoutput: unknown message {chr(kind)!r}")

    def _relation(self, buf: bytes) -> None:
        (relid,) = _U32.unpack_from(buf, 1)
        schema, pos = _cstring(buf, 5)
        name, pos = _cstring(buf, pos)
        replident = chr(buf[pos])  # the table's replica identity when the change was made
        pos += 1
        (natts,) = _I16.unpack_from(buf, pos)
        pos += 2
        columns, oids, mods = [], [], []
        for _ in range(natts):
            pos += 1  # flags: part of the replica identity (all of them under FULL)
            col, pos = _cstring(buf, pos)
            typoid, typmod = struct.unpack_from(">Ii", buf, pos)
            pos += 8
            columns.append(col)
            oids.append(typoid)
            mods.append(typmod)
        self.resolved.pop(relid, None)  # a new version of the table: resolved again
        self.relations[relid] = Relation(
            relid,
            schema or "pg_catalog",
            name,
            tuple(columns),
            tuple(oids),
            tuple(mods),
            replident=replident,
        )
