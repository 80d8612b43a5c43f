"""The audit store's interface: what the rest of undo may ask of a store, and the records it
answers with. ``open_store`` (undo.store) gives a :class:`Store`; the SQLite file
(undo/store/sqlite.py) is one implementation, a PostgreSQL database (#16) another. Nothing
outside undo/store/ holds store SQL or knows where or how a store keeps its data.

Records are frozen dataclasses (a change read by an undo is a NamedTuple: millions are made
in a tight loop). The listings (sessions, show, history, activity, status...) are records too;
each one's ``to_json()`` is the document `--json` prints, its keys in their order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Protocol

from undo.core import names
from undo.core.errors import BadInput
from undo.core.images import Value
from undo.core.records import Begin, Change, Commit, Relation

#: a value as JSON holds it
Json = dict[str, "Json"] | list["Json"] | str | int | float | bool | None
#: a record as `--json` prints it (its ``to_json()``)
JsonDoc = dict[str, object]
#: a row by column, as a change's images show it (undo.core.images.shown_images)
Image = dict[str, Value]
#: (column, type as format_type prints it, value as typed) -> the value's text form, as the
#: store holds it (undo.source.keyforms)
Normalise = Callable[[str, str, str], str]


@dataclass(frozen=True)
class Source:
    """A source database the store holds the history of: its name in the store, and what tells
    it apart (the server's system identifier and the database's name; '' each for a store made
    before sources, until a command connected to it claims it)."""

    id: int
    name: str
    system_identifier: str
    database_name: str

    @property
    def claimed(self) -> bool:
        return bool(self.system_identifier)


@dataclass(frozen=True)
class TableVersion:
    """A table as capture recorded it: one version of its columns, types, key and root."""

    id: int
    oid: int | None
    schema: str
    name: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    key: tuple[int, ...] | None
    partial: bool

    @property
    def qualified(self) -> str:
        return names.quote(self.schema, self.name)


class StoredChange(NamedTuple):
    """One change as the store holds it: images are JSON arrays of text forms (a tuple: a
    session's worth of them is made in a tight loop)."""

    id: int
    op: str
    old: str | None
    new: str | None
    unchanged: str | None
    xid: int | None = None  # the transaction's xid, where a row version it wrote is known by it


@dataclass(frozen=True)
class Transaction:
    """A source transaction as stored: its attribution (from its tag), trust, counts, and its
    changes as the id range first_change..last_change."""

    id: int
    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: str
    session_id: str | None
    application_name: str | None
    user_name: str | None
    client_addr: str | None
    client_port: int | None
    backend_pid: int | None
    backend_start: str | None
    statement: str | None
    tag: str  # trusted, untrusted or none
    tag_reason: str | None
    undo_of: str | None
    inserts: int
    updates: int
    deletes: int
    truncates: int
    first_change: int | None
    last_change: int | None
    full_xid: int | None


@dataclass(frozen=True)
class TxnChanges:
    """How many changes of one operation a transaction made to one table version, and how many
    of its updates or deletes came without a full old row."""

    relation: int
    op: str
    n: int
    without_old: int


@dataclass(frozen=True)
class TableGap:
    """A table capture could not follow (DDL: a rewrite, unlogged, the tag trigger off...)."""

    table: str | None
    xid: int | None
    reason: str


@dataclass(frozen=True)
class Gap:
    """A stretch of history the audit trail does not hold: of the stream, or of one table."""

    detected_at: str
    reason: str
    kind: str  # stream, table
    table: str | None


@dataclass(frozen=True)
class LastWriter:
    """Who changed a row last, as far as the store knows."""

    session_id: str | None
    xid: int
    application_name: str | None


@dataclass(frozen=True)
class MetricsFigures:
    """What /metrics reports of the store, from the aggregates capture keeps (never the
    changes). A partition's changes count under its partitioned table (its root), so that a
    table's label stays one however many partitions it has."""

    #: (application, table, inserts, updates, deletes, truncates)
    changes: tuple[tuple[str, str, int, int, int, int], ...]
    #: (application, transactions), first seen first (the minute of its first change, then
    #: its name): a key an application keeps for good, so /metrics names the same ones
    transactions: tuple[tuple[str, int], ...]
    #: (reason, row changes) of writes without a trusted tag
    untrusted: tuple[tuple[str | None, int], ...]
    #: (guard, application, refusals), trusted refusals only, first refused first
    guard_refusals: tuple[tuple[str | None, str | None, int], ...]
    #: (prefix, messages)
    malformed: tuple[tuple[str, int], ...]
    last_commit_time: str | None
    gaps: int


@dataclass(frozen=True)
class PruneReport:
    """What a prune removed. ``cut``: history recorded before it went (on SQLite the time
    asked; on PostgreSQL the start of the partition that holds it, or earlier: see
    postgres/_prune.py); ``kept_sessions``: sessions the cut went through, which keep their
    later transactions only."""

    transactions: int
    changes: int
    sessions: int
    kept_sessions: int
    bytes_before: int
    bytes_after: int
    cut: str


@dataclass(frozen=True)
class StepReport:
    transactions: int
    changes: int
    more: bool  # transactions before that time are left to prune
    pages_freed: int


# -- the listings: what `sessions`, `show`, `history`, `activity` and `status` print --------


def _doc(record: object) -> JsonDoc:
    """A record's fields as a JSON document, in their order: records as objects, tuples as
    lists (as --json prints them and as `undo status` lays them out); a listing's ``source``
    (its last field: the name of the source it is of) first."""
    doc = {k: _listed(v) for k, v in asdict(record).items()}  # type: ignore[call-overload]
    if "source" in doc:
        doc = {"source": doc.pop("source"), **doc}
    return doc


def _listed(v: object) -> object:
    if isinstance(v, tuple | list):
        return [_listed(x) for x in v]
    if isinstance(v, dict):
        return {k: _listed(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class Undone:
    """What undid a session: the latest undo that undid any of its changes, and whether every
    change of it is undone (``all``)."""

    undone_at: str
    undo_xid: int
    all: bool

    def to_json(self) -> JsonDoc:
        return _doc(self)


@dataclass(frozen=True)
class SessionRow:
    """A session and tag that wrote (a forged tag claiming a session is its own row), with its
    totals, the tables it touched and what undid it; `undo sessions` prints one a line."""

    session_id: str | None
    application_name: str | None
    user: str | None
    client_addr: str | None
    first_change_at: str
    last_change_at: str
    transactions: int
    inserts: int
    updates: int
    deletes: int
    guard_refusals: int  # its writes a guard refused
    tag: str
    tag_reason: str | None
    tables: tuple[str, ...]
    undone: Undone | None
    source: str | None = None  # the source's name in the store

    def to_json(self) -> JsonDoc:
        return _doc(self)


@dataclass(frozen=True)
class GuardRefusal:
    """A write a guard refused."""

    refused_at: str
    guard: str | None
    reason: str | None
    session_id: str | None
    application_name: str | None
    user: str | None
    client_addr: str | None
    statement: str | None
    tag: str
    tag_reason: str | None

    def to_json(self) -> JsonDoc:
        return _doc(self)


@dataclass(frozen=True)
class DdlCommand:
    """DDL a session ran on an audited schema."""

    commit_time: str
    xid: int
    command: str | None
    object_type: str | None
    object: str | None
    statement: str | None
    tag: str
    tag_reason: str | None

    def to_json(self) -> JsonDoc:
        return _doc(self)


@dataclass(frozen=True)
class MalformedMessage:
    """A message with undo's prefix that was not what undo's SQL writes: kept, never used."""

    received_at: str
    lsn: int
    prefix: str
    xid: int | None
    session_id: str | None
    problem: str
    size: int

    def to_json(self) -> JsonDoc:
        return _doc(self)


@dataclass(frozen=True)
class RowChange:
    """A row change as `show` and the dashboard list it: its table, key and images by column
    (a TOASTed value an update left unchanged shown in ``new`` as the old value it kept)."""

    txn: int  # the transaction's store id (``Transaction.id``); `show` lists it under it
    ord: int
    table: str
    op: str  # insert, update, delete, truncate
    key: tuple[str | None, ...] | None
    key_columns: tuple[str, ...] | None
    statement: str | None
    old: Image | None
    new: Image | None

    def to_json(self) -> JsonDoc:
        """As `show --json` prints it, under its transaction (no ``txn``)."""
        doc = _doc(self)
        del doc["txn"]
        return doc


@dataclass(frozen=True)
class ShownTransaction:
    """A transaction as `show` lists it, with its row changes."""

    xid: int
    commit_time: str
    application_name: str | None
    user: str | None
    statement: str | None
    tag: str
    tag_reason: str | None
    changes: tuple[RowChange, ...]

    def to_json(self) -> JsonDoc:
        return {
            "xid": self.xid,
            "commit_time": self.commit_time,
            "application_name": self.application_name,
            "user": self.user,
            "statement": self.statement,
            "tag": self.tag,
            "tag_reason": self.tag_reason,
            "changes": [c.to_json() for c in self.changes],
        }


@dataclass(frozen=True)
class TableOpRows:
    """How many rows one operation changed in one table."""

    table: str
    operation: str
    rows: int


@dataclass(frozen=True)
class ShownTotals:
    """Transactions, row changes, and rows per table and operation, of `show`'s transactions."""

    transactions: int
    changes: int
    rows: tuple[TableOpRows, ...]

    def to_json(self) -> JsonDoc:
        return _doc(self)


@dataclass(frozen=True)
class ShownClaims:
    """The transactions that claim a session with a tag that does not verify: listed apart,
    never counted in its totals."""

    undone: Undone | None
    totals: ShownTotals
    transactions: tuple[ShownTransaction, ...]

    def to_json(self) -> JsonDoc:
        return {
            "undone": None if self.undone is None else self.undone.to_json(),
            "totals": self.totals.to_json(),
            "transactions": [t.to_json() for t in self.transactions],
        }


@dataclass(frozen=True)
class Shown:
    """What `show session` (or `show xact`) prints: the session's transactions and their
    changes, those that only claim it, the writes guards refused, its DDL, and the malformed
    messages that claimed it (the first ones; ``malformed_count`` says how many)."""

    session_id: str | None
    undone: Undone | None
    totals: ShownTotals
    transactions: tuple[ShownTransaction, ...]
    untrusted: ShownClaims
    guard_refusals: tuple[GuardRefusal, ...]
    ddl: tuple[DdlCommand, ...]
    malformed: tuple[MalformedMessage, ...]
    malformed_count: int
    source: str | None = None

    def to_json(self) -> JsonDoc:
        return {
            "source": self.source,
            "session_id": self.session_id,
            "undone": None if self.undone is None else self.undone.to_json(),
            "totals": self.totals.to_json(),
            "transactions": [t.to_json() for t in self.transactions],
            "untrusted": self.untrusted.to_json(),
            "guard_refusals": [g.to_json() for g in self.guard_refusals],
            "ddl": [d.to_json() for d in self.ddl],
            "malformed": [m.to_json() for m in self.malformed],
            "malformed_count": self.malformed_count,
        }


@dataclass(frozen=True)
class HistoryVersion:
    """A recorded version of a row (a change of it), or DDL on its table (``op`` 'ddl', its
    ``command``), with who made it. A row moved between partitions is one update
    (``moved_from``: the partition it left)."""

    op: str  # insert, update, delete, ddl
    command: str | None  # DDL only
    table: str
    moved_from: str | None
    xid: int
    commit_time: str
    session_id: str | None
    application_name: str | None
    user: str | None
    tag: str
    statement: str | None
    undo_of: Json
    old: Image | None
    new: Image | None
    source: str | None = None

    def to_json(self) -> JsonDoc:
        """As `history --json` prints it: ``command`` only for DDL."""
        doc = _doc(self)
        if self.op != "ddl":
            del doc["command"]
        return doc


@dataclass(frozen=True)
class ActivityBucket:
    """Inserts, updates, deletes and truncates in one time bucket by one application, session
    or table (``by``; ``name`` None: untagged)."""

    bucket: str
    by: str  # app, session, table
    name: str | None
    inserts: int
    updates: int
    deletes: int
    truncates: int
    source: str | None = None

    def to_json(self) -> JsonDoc:
        """As `activity --json` prints it: the name under the key ``by``, last."""
        return {
            "source": self.source,
            "bucket": self.bucket,
            "inserts": self.inserts,
            "updates": self.updates,
            "deletes": self.deletes,
            "truncates": self.truncates,
            self.by: self.name,
        }


@dataclass(frozen=True)
class StatusGap:
    """A gap as `status` lists it: of the stream, or of a table (``to_lsn`` None: open)."""

    kind: str  # stream, table
    table: str | None
    session_id: str | None
    from_lsn: int | None
    to_lsn: int | None
    at: str
    reason: str
    detected_at: str


@dataclass(frozen=True)
class StoreStatus:
    """What the store says of itself in `status`: where capture is, what it holds, the writes
    without a trusted tag by reason, malformed messages by prefix, and the gaps."""

    decoder: str | None
    slot: str | None
    store_position: int
    last_commit_time: str | None
    transactions: int
    changes: int
    untrusted_writes: dict[str | None, int]
    malformed_messages: dict[str, int]
    gaps: tuple[StatusGap, ...]
    source: str | None = None

    def to_json(self) -> JsonDoc:
        return _doc(self)


class StagedTxn(Protocol):
    """The source transaction a writer is writing, as capture's C stage sees it."""

    id: int
    xid: int
    ord: int
    #: (relation id, op) -> changes staged
    counts: Any


class Writer(Protocol):
    """What capture calls to write the stream: source transactions batched into store
    transactions, each committed with the position it reaches (``flush``), nothing of a source
    transaction kept unless it is whole (``abort``).

    ``rows`` is the staged changes, flat, nine values a change (id, txn, ord, relation, op,
    key, old, new, unchanged; '' for a NULL image or key, never a value: they are JSON
    arrays): ``add`` appends them and so does the C stage (undo._speedups.stage), which then
    calls ``add_staged``. A writer writes them when they fill a chunk, at ``commit`` and at
    ``flush``: SQLite as multi-row INSERTs, PostgreSQL as COPY text (NULL '').
    """

    position: int  # committed: what capture may confirm
    rows: list[Any]
    batch_open: bool
    batch_started: float  # time.monotonic() of the batch's first write
    batch_changes: int
    next_change: int
    txn: Any  # StagedTxn | None: the source transaction being written

    def relation_id(self, rel: Relation, key: tuple[int, ...] | None, partial: bool) -> int: ...
    def relation_oid(self, rel_id: int, oid: int | None) -> None: ...
    def already_stored(self, begin: Begin) -> bool: ...
    def begin(self, begin: Begin) -> None: ...
    def add(self, ch: Change, rel_id: int, key_positions: tuple[int, ...] | None) -> None: ...
    def add_staged(self) -> None: ...
    def add_truncate(self, rel_id: int) -> None: ...
    @property
    def txn_xid(self) -> int: ...
    def set_tag(self, tag: dict[str, Any], untrusted: str | None) -> None: ...
    def add_statement(self, statement: str | None) -> None: ...
    def add_ddl(
        self, doc: dict[str, Any], untrusted: str | None, problems: Sequence[tuple[str, str]] = ()
    ) -> None: ...
    def set_ledger(
        self, doc: dict[str, Any] | None, content: bytes, untrusted: str | None
    ) -> None: ...
    def add_malformed(
        self, lsn: int, prefix: str, session_id: str | None, problem: str, content: bytes
    ) -> None: ...
    def add_gap(self, table: str, reason: str) -> None: ...
    def add_refusal(self, lsn: int, tag: dict[str, Any], untrusted: str | None) -> None: ...
    def commit(self, commit: Commit) -> bool: ...
    def abort(self) -> None: ...
    def advance(self, lsn: int) -> None: ...
    @property
    def unstored_since(self) -> str | None: ...
    def flush(self) -> int: ...


class Store(Protocol):
    """An audit store: its reads, its metadata, its gaps, pruning, its health, and a writer."""

    #: where it is, as given (a path; a PostgreSQL URI or conninfo)
    location: str
    #: what it is, as messages name it ("SQLite", "PostgreSQL")
    engine: str

    def close(self) -> None:
        """Let go of the store; an open batch is rolled back. Never fails."""

    def __enter__(self) -> Store:
        """The store, closed when the ``with`` block ends (``with open_store(...) as db``),
        however it ends: a PostgreSQL store's connection ends then, not when the store is
        dropped (an exception's traceback keeps the store, and a caller may keep the error)."""

    def __exit__(self, *exc: object) -> None: ...

    def atomic(self) -> AbstractContextManager[Any]:
        """One store transaction around the calls made inside it."""

    # -- metadata, gaps --------------------------------------------------------------------
    def meta(self, key: str) -> str | None: ...
    def set_meta(self, values: Mapping[str, str | None]) -> None:
        """Set these keys, in one store transaction."""

    def record_gap(self, from_lsn: int | None, to_lsn: int | None, reason: str) -> None:
        """A stretch of the source's history that the audit trail does not hold."""

    def history_start(self) -> str | None:
        """Where the store's history starts: the slot made by init (meta 'history_from'), else
        its first commit."""

    def position_at(self, time: str) -> int:
        """The end LSN of the last transaction committed at or before ``time`` (0: none)."""

    def gaps_after(self, time: str, lsn: int) -> list[Gap]:
        """Gaps detected after ``time`` not closed by ``lsn``, and open gaps of tables."""

    def table_gaps(self, session_id: str | None, xids: Sequence[int]) -> list[TableGap]:
        """Table gaps a session's (or these transactions') DDL opened, in order."""

    # -- the store itself ------------------------------------------------------------------
    def size(self) -> int:
        """Bytes the store takes."""

    def quick_check(self) -> list[str]:
        """[] when the store is sound, else what is wrong, a line each (at most 10): the
        engine's own check ("SQLite's quick_check"), which may read every page."""

    def returns_space(self) -> bool:
        """Whether space pruned by capture --keep goes back to the file system."""

    def notes(self) -> list[str]:
        """What is worth knowing about this store and needs nothing done (`undo check`)."""

    def probe_write(self) -> None:
        """Raise the store's error if it cannot be written (nothing is changed)."""

    def register_source(
        self, name: str | None, system_identifier: str, database: str, reregister: bool = False
    ) -> str:
        """Register the source database (`undo init`) under ``name`` (None: the database's
        name) and act for it; the name. A name another database holds is BadInput, unless
        ``reregister`` (the same database name, moved to a new server: pg_upgrade, a restore),
        which gives the name this identity. An unclaimed source (a store made before sources)
        takes this identity and, unless ``name`` is given, the database's name."""

    def sources(self) -> list[Source]:
        """The sources the store holds, in the order they were registered."""

    def use(self, name: str) -> Source:
        """Act for the source ``name`` from now on: every read, meta and the writer are its.
        An unknown name is BadInput naming the sources."""

    #: the name of the source it acts for (None: not chosen; reads cover every source)
    source_name: str | None

    def writer(self) -> Writer: ...
    def prune(self, before: str) -> PruneReport: ...
    def prune_step(self, before: str) -> StepReport: ...

    # -- what an undo reads ----------------------------------------------------------------
    def recorded_tables(self) -> list[tuple[str, str]]:
        """(schema, table) of every table the source's history holds, sorted."""

    def resolve_table(self, text: str, roots: bool = False) -> tuple[str, str]:
        """A table name as the user typed it -> (schema, table) among the tables the store
        holds (with ``roots``, partitioned tables whose partitions it holds too)."""

    def transactions(
        self,
        *,
        tables: set[tuple[str, str]] | None = None,
        after: str | None = None,
        session_id: str | None = None,
        xids: Sequence[int] = (),
        app: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> list[Transaction]:
        """The transactions that match all of these, newest first: ``tables`` changed one of
        them, committed after ``after``, at or after ``since`` and before ``until``."""

    def txn_changes(self, txn_id: int, refusable: bool = False) -> list[TxnChanges]:
        """A transaction's changes per table version and operation (``refusable``: only its
        truncates and its updates and deletes without a full old row), by relation and op."""

    def table_version(self, rel_id: int) -> TableVersion: ...
    def changes(
        self, first: int, last: int, rel_id: int, xid: int | None
    ) -> Iterator[StoredChange]:
        """The changes of one table version among the ids first..last (a transaction's range),
        oldest first, each with ``xid``."""

    def later_writer(
        self, oid: int, change_id: int, key: str | None, image: str | None
    ) -> LastWriter | None:
        """Who last changed the row of this key (a keyless row: who wrote or removed one
        identical to ``image``) in a table of this OID, after the change ``change_id``."""

    def guard_refusal_counts(self) -> dict[str | None, int]:
        """Refusals stored per guard pattern."""

    def metrics(self) -> MetricsFigures: ...
    def metrics_by_source(self, sources: Sequence[str]) -> dict[str, MetricsFigures]:
        """metrics() of each of these sources, read in one query each over them all (the
        store-wide reader)."""

    # -- listings --------------------------------------------------------------------------
    # Of the source it acts for; those that take ``sources`` (names; an unknown one is
    # BadInput) read those sources instead, each in one query over them all (the store-wide
    # reader), each row naming its source: the same rows, order and paging as each source's
    # listing merged (undo.store.across), without a query per source.
    def sessions(
        self,
        since: str | None = None,
        until: str | None = None,
        app: str | None = None,
        user: str | None = None,
        tables: list[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        undone_filter: bool | None = None,
        sources: Sequence[str] | None = None,
    ) -> list[SessionRow]:
        """Newest first (a tie: the source registered first first). With ``sources``, a
        table of ``tables`` is looked up in each: a source without it is left out, and none
        with it is the error of one source's listing."""

    def show(self, session_id: str | None = None, xid: int | None = None) -> Shown: ...
    def history(
        self, table: str, key: dict[str, str | None], normalise: Normalise
    ) -> list[HistoryVersion]: ...
    def activity(
        self,
        by: str = "app",
        since: str | None = None,
        bucket_seconds: int = 60,
        sources: Sequence[str] | None = None,
    ) -> list[ActivityBucket]:
        """By bucket, name, then source (its id: the order sources were registered)."""

    def status(self) -> StoreStatus: ...
    def statuses(self, sources: Sequence[str]) -> list[StoreStatus]:
        """status() of each of these sources, in the order they were registered, in one
        query each over them all (the store-wide reader)."""

    def guard_refusals(
        self, session_id: str | None = None, sources: Sequence[str] | None = None
    ) -> list[GuardRefusal]:
        """Oldest first; of several sources, each source's in turn (as registered)."""

    def ddl_of(self, session_id: str | None = None, xid: int | None = None) -> list[DdlCommand]: ...
    def transactions_of_session(self, session_id: str) -> list[Transaction]: ...
    def undone_sessions(self) -> dict[tuple[str | None, str], Undone]: ...
    def changes_page(self, txn_ids: list[int], limit: int, offset: int) -> list[RowChange]: ...


# -- shared by the implementations and their callers ----------------------------------------


def split_claims(txns: list[Transaction]) -> tuple[list[Transaction], list[Transaction]]:
    """A session's transactions (trusted tags) and the others that claim its id (forged,
    replayed, malformed): never merged into it, nor counted in its totals."""
    return [t for t in txns if t.tag == "trusted"], [t for t in txns if t.tag != "trusted"]


def parse_key(pairs: list[str]) -> dict[str, str | None]:
    """['id=42', 'region=eu'] -> {'id': '42', 'region': 'eu'}; 'col=' + NULL spelled \\N."""
    out: dict[str, str | None] = {}
    for p in pairs:
        name, sep, value = p.partition("=")
        if not sep or not name:
            raise BadInput(f"malformed key {p!r}: write COLUMN=VALUE, e.g. id=42")
        out[name] = None if value == "\\N" else value
    return out


_LSN = re.compile(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}")


def ledger_entry(e: Any) -> list[Any] | None:
    """A ledger mirror's entry, ``[commit LSN, schema, table, op, xid]`` (the xid a string of
    digits, as undo.record_undo writes it), or None when it is not one: whatever the mirror
    holds, nothing that reads it may fail.

    >>> ledger_entry(["0/16B3748", "public", "t", "D", "731"]), ledger_entry(["zz"])
    (['0/16B3748', 'public', 't', 'D', '731'], None)
    """
    if not (isinstance(e, list) and len(e) == 5 and all(isinstance(v, str) for v in e)):
        return None
    lsn, _, _, op, xid = e
    if not (
        _LSN.fullmatch(lsn)
        and op in ("I", "U", "D")
        and 0 < len(xid) <= 20
        and xid.isascii()
        and xid.isdigit()
    ):
        return None
    return e


def activity_session(session_id: str | None, tag: str) -> str:
    """The session activity files a transaction under: an untrusted tag never under the
    session it claims, an untagged one under ''.

    >>> activity_session("6b0.1", "untrusted"), activity_session("6b0.1", "none")
    ('untrusted:6b0.1', '')
    """
    if tag == "trusted":
        return session_id or ""
    return f"untrusted:{session_id or ''}" if tag == "untrusted" else ""
