"""What a decoder turns one logical-decoding message into: the same records for every decoder.

A row image is a list of JSON tokens, one per column: a JSON string holding PostgreSQL's text
output of the value (what the type's output function prints), or ``null``. Decoders emit the
tokens directly, so capture stores ``[tok,tok,...]`` without decoding and re-encoding values:
JSON encoding was the largest single cost of capture. A column whose TOASTed value an UPDATE
left unchanged is ``null`` in ``new`` and listed in ``unchanged``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class Relation:
    """One version of a table as the stream describes it.

    ``oid`` is the relation OID (pgoutput sends it; for wal2json capture looks it up by name).
    ``types`` are type names as ``format_type`` prints them, filled in by capture for pgoutput,
    which sends type OIDs. ``store_id`` is capture's cache of the store's row for this version.
    """

    oid: int | None
    schema: str
    name: str
    columns: tuple[str, ...]
    type_oids: tuple[int, ...] | None = None
    type_mods: tuple[int, ...] | None = None
    types: tuple[str, ...] | None = None
    store_id: int | None = field(default=None)
    key: tuple[int, ...] | None = field(default=None)
    partial: bool = False
    #: pgoutput's replica identity of the table at the change ('f': FULL), None from wal2json
    replident: str | None = None
    #: wal2json: the columns of a new tuple (an INSERT's), every column the table had then
    whole: bool = False
    #: (schema, name) of the top of its partition tree when it is a partition (capture's catalog)
    root: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Begin:
    xid: int
    commit_lsn: int
    commit_time: str


@dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_time: str


NULL = "null"


@dataclass(slots=True)
class Change:
    """One row change, images as JSON tokens; ``old`` is None without full replica identity."""

    rel: Relation
    op: str  # 'I', 'U', 'D'
    old: list[str] | None
    new: list[str] | None
    unchanged: list[int] | None = None


@dataclass(frozen=True, slots=True)
class Truncate:
    rels: tuple[Relation, ...]


@dataclass(frozen=True, slots=True)
class Message:
    transactional: bool
    prefix: str
    content: bytes
    lsn: int


Record = Begin | Commit | Change | Truncate | Message
