"""The audit store as one SQLite file (WAL mode): the :class:`~undo.store.api.Store` of a path.

Its schema and migrations are _schema.py, its writer _writer.py, its listings _queries.py,
pruning _prune.py; this module is the rest of what undo asks of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Self

from sqlite_utils import Database

from undo.core import names
from undo.core.errors import BadInput, UndoError
from undo.core.times import iso
from undo.store import _prune, _queries, _schema
from undo.store._writer import StoreWriter
from undo.store.api import (
    ActivityBucket,
    DdlCommand,
    Gap,
    GuardRefusal,
    HistoryVersion,
    LastWriter,
    MetricsFigures,
    Normalise,
    PruneReport,
    RowChange,
    SessionRow,
    Shown,
    Source,
    StepReport,
    StoredChange,
    StoreStatus,
    TableGap,
    TableVersion,
    Transaction,
    TxnChanges,
    Undone,
)

_TRANSACTION_COLUMNS = (
    "id, xid, commit_lsn, end_lsn, commit_time, session_id, application_name, user_name,"
    " client_addr, client_port, backend_pid, backend_start, statement, tag, tag_reason, undo_of,"
    " inserts, updates, deletes, truncates, first_change, last_change, full_xid"
)


#: the file beside the store whose flock the one capture writing the store holds
LOCK_SUFFIX = "-capture"


def recovery(path: str) -> str:
    """How to get back what SQLite can still read of a corrupt store."""
    return f"recover what SQLite can read (sqlite3 {path} .recover | sqlite3 NEW.db)"


#: the tables the reads name, as views of the rows of one source, or of several for the
#: store-wide listings (``{s}``: their ids), on the reading connection (temporary views are
#: searched before the file's tables)
_SCOPED = {
    "meta": "SELECT source, key, value FROM main.source_meta WHERE source IN ({s})"
    " UNION ALL SELECT NULL, key, value FROM main.meta",
    "relations": "SELECT * FROM main.relations WHERE source IN ({s})",
    "transactions": "SELECT * FROM main.transactions WHERE source IN ({s})",
    "activity": "SELECT a.* FROM main.activity a WHERE a.relation IN"
    " (SELECT id FROM main.relations WHERE source IN ({s}))",
    "gaps": "SELECT * FROM main.gaps WHERE source IN ({s})",
    "undos": "SELECT * FROM main.undos WHERE source IN ({s})",
    "guard_refusals": "SELECT * FROM main.guard_refusals WHERE source IN ({s})",
    "ddl": "SELECT * FROM main.ddl WHERE source IN ({s})",
    "malformed": "SELECT * FROM main.malformed WHERE source IN ({s})",
    "pruned_counts": "SELECT * FROM main.pruned_counts WHERE source IN ({s})",
}


#: the figures of a source with nothing stored
_NO_FIGURES = MetricsFigures((), (), (), (), (), None, 0)


def unknown_source(name: str, known: Sequence[Source], where: str) -> BadInput:
    names = ", ".join(s.name for s in known) or "none"
    return BadInput(f"no source {name!r} in the audit store {where} (its sources: {names})")


class SqliteStore:
    """The store in the SQLite file at ``location``, acting for one source (``source``: a name;
    else the store's only one; none chosen, reads cover every source)."""

    engine = "SQLite"

    def __init__(self, location: str, create: bool = False, source: str | None = None) -> None:
        self.location = location
        #: the file, every source's rows: what writes and pruning use
        self.file: Database = _schema.open_database(location, create)
        self.source_id: int | None = None
        self.source_name: str | None = None
        self._reader: Database | None = None
        self._scope: tuple[int, ...] = ()  # the sources the reader's views hold
        self._lock: int | None = None  # the flock a writer holds
        self._choose(source)

    def _choose(self, source: str | None) -> None:
        """Bind the source named (one not registered yet is only remembered: `undo init
        --source` registers it), else the store's only one; with several and none named,
        none (listings cover them all)."""
        known = self.sources()
        if source is not None:
            if any(s.name == source for s in known):
                self.use(source)
            else:
                self.source_name = source
        elif len(known) == 1:
            self.use(known[0].name)

    @property
    def db(self) -> Database:
        """What the reads run on: a connection whose tables are the source's rows (temporary
        views), or the file (no source chosen: every source's)."""
        if self.source_id is None:
            return self.file
        return self._scoped((self.source_id,))

    def _scoped(self, ids: tuple[int, ...]) -> Database:
        """The reader of these sources' rows: the source's, or several sources' (the
        store-wide listings, each row with its source's id); made again when they change."""
        if self._reader is not None and self._scope != ids:
            with contextlib.suppress(sqlite3.Error):
                self._reader.conn.close()
            self._reader = None
        if self._reader is None:
            conn = sqlite3.connect(self.location, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=10000")
            conn.create_function("qualified_name", 2, names.quote, deterministic=True)
            listed = ", ".join(str(int(i)) for i in ids)
            for name, text in _SCOPED.items():
                conn.execute(f'CREATE TEMP VIEW "{name}" AS ' + text.format(s=listed))  # integers
            self._reader, self._scope = Database(conn), ids
        return self._reader

    def _reader_of(self, sources: Sequence[str]) -> tuple[Database, dict[int, str | None]]:
        """The store-wide reader of the sources named (an unknown name is BadInput), and their
        names by id."""
        known = self.sources()
        by_name = {s.name: s for s in known}
        for name in sources:
            if name not in by_name:
                raise unknown_source(name, known, self._where())
        ids = tuple(sorted(by_name[n].id for n in set(sources)))
        names: dict[int, str | None] = {s.id: s.name for s in known if s.id in ids}
        return self._scoped(ids), names

    def _where(self) -> str:
        """The store as messages name it."""
        return self.location

    # -- sources ---------------------------------------------------------------------------
    def sources(self) -> list[Source]:
        return [
            Source(int(r[0]), r[1], r[2], r[3])
            for r in self.file.execute(
                "SELECT id, name, system_identifier, database_name FROM sources ORDER BY id"
            )
        ]

    def use(self, name: str) -> Source:
        known = self.sources()
        found = next((s for s in known if s.name == name), None)
        if found is None:
            raise unknown_source(name, known, self.location)
        self.source_id, self.source_name = found.id, found.name
        return found

    @property
    def source(self) -> int:
        """The id of the source it acts for (BadInput when none is chosen)."""
        if self.source_id is None:
            known = self.sources()
            if self.source_name is not None:
                raise unknown_source(self.source_name, known, self.location)
            if not known:
                raise BadInput(
                    f"the audit store {self.location} has no source yet: run `undo init`"
                )
            raise BadInput(
                f"the audit store {self.location} holds several sources"
                f" ({', '.join(s.name for s in known)}): name one with --source"
            )
        return self.source_id

    # -- the store itself ------------------------------------------------------------------
    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self._reader is not None:
                self._reader.conn.close()
            self.file.conn.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __del__(self) -> None:
        # a store dropped without close: its writer's lock goes with it
        if getattr(self, "_lock", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock)  # type: ignore[arg-type]
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def atomic(self) -> contextlib.AbstractContextManager[Any]:
        return self.file.atomic()

    def size(self) -> int:
        p = self.location
        return sum(os.path.getsize(f) for f in (p, p + "-wal") if os.path.exists(f))

    def quick_check(self) -> list[str]:
        return _schema.quick_check(self.file)

    def returns_space(self) -> bool:
        return _schema.incremental_vacuum(self.file)

    def notes(self) -> list[str]:
        if self.returns_space():
            return []
        return [
            "the store was made before incremental vacuum: capture --keep frees space for"
            " reuse but the file does not shrink (`undo prune` once, with capture stopped,"
            " turns it on)"
        ]

    def probe_write(self) -> None:
        class _Probe(Exception):
            """Rolls back the write that shows the store can be written."""

        with contextlib.suppress(_Probe), self.file.atomic():
            self.file.execute("UPDATE meta SET value = value WHERE key = 'slot'")
            raise _Probe

    def register_source(
        self, name: str | None, system_identifier: str, database: str, reregister: bool = False
    ) -> str:
        with self.file.atomic():
            got = _schema.register_source(
                self.file, name, system_identifier, database, reregister, self.location
            )
        self.use(got)
        return got

    def writer(self) -> StoreWriter:
        """The writer of the source it acts for. SQLite takes one writer at a time: a second
        capture into the same file (another source's too) is refused at its first write while
        the first runs (after its slot's own check, which names the capture that holds a
        slot): an flock of the file LOCK_SUFFIX beside the store, let go when this process
        closes the store or exits. Never of the store's own file: closing a descriptor of it
        would drop the POSIX locks SQLite's connections in this process hold on it."""
        return StoreWriter(self.file, self.source, self._take_lock)

    def _take_lock(self) -> None:
        if self._lock is not None:
            return
        fd = os.open(self.location + LOCK_SUFFIX, os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UndoError(
                f"the audit store {self.location} is being written by another capture: an"
                " SQLite store takes one capture at a time (a PostgreSQL store takes one per"
                " source at once); stop it first"
            ) from None
        self._lock = fd

    def prune(self, before: str) -> PruneReport:
        return _prune.prune(self.file, before)

    def prune_step(self, before: str) -> StepReport:
        return _prune.prune_step(self.file, before)

    # -- metadata, gaps --------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        if key in _schema.SOURCE_KEYS:
            if self.source_id is None:
                return None
            return _schema.get_source_meta(self.file, self.source_id, key)
        return _schema.get_meta(self.file, key)

    def set_meta(self, values: Mapping[str, str | None]) -> None:
        with self.file.atomic():
            for k, v in values.items():
                if k in _schema.SOURCE_KEYS:
                    _schema.set_source_meta(self.file, self.source, k, v)
                else:
                    _schema.set_meta(self.file, k, v)

    def record_gap(self, from_lsn: int | None, to_lsn: int | None, reason: str) -> None:
        with self.file.atomic():
            self.file.execute(
                "INSERT INTO gaps (source, detected_at, from_lsn, to_lsn, reason)"
                " VALUES (?, ?, ?, ?, ?)",
                (self.source, iso(datetime.now(UTC)), from_lsn, to_lsn, reason),
            )

    def history_start(self) -> str | None:
        start = self.meta("history_from")
        if start is None:
            start = self.db.execute("SELECT min(commit_time) FROM transactions").fetchone()[0]
        return start

    def position_at(self, time: str) -> int:
        return int(
            self.db.execute(
                # the last one's, not the highest: after init --reregister the old server's
                # positions may be above all of the new one's
                "SELECT coalesce((SELECT end_lsn FROM transactions WHERE commit_time <= ?"
                " ORDER BY commit_time DESC, id DESC LIMIT 1), 0)",
                [time],
            ).fetchone()[0]
        )

    def gaps_after(self, time: str, lsn: int) -> list[Gap]:
        return [
            Gap(*r)
            for r in self.db.execute(
                # an end at or below the start: positions of two servers (init --reregister),
                # which no position of the old one compares with; the gap is after by time
                "SELECT detected_at, reason, kind, table_name FROM gaps WHERE (detected_at > ?"
                " AND (to_lsn IS NULL OR to_lsn > ? OR (kind = 'stream' AND to_lsn <= from_lsn)))"
                " OR (kind = 'table' AND to_lsn IS NULL)"
                " ORDER BY id",
                [time, lsn],
            )
        ]

    def table_gaps(self, session_id: str | None, xids: Sequence[int]) -> list[TableGap]:
        params: list[Any]
        if session_id is not None:
            cond, params = "session_id = ?", [session_id]
        elif xids:
            cond, params = f"xid IN ({','.join('?' * len(xids))})", list(xids)
        else:
            return []
        return [
            TableGap(*r)
            for r in self.db.execute(
                "SELECT table_name, xid, reason FROM gaps WHERE kind = 'table' AND "  # noqa: S608
                + cond
                + " ORDER BY id",
                params,
            )
        ]

    # -- what an undo reads ----------------------------------------------------------------
    def recorded_tables(self) -> list[tuple[str, str]]:
        return _queries.recorded_tables(self.db)

    def resolve_table(self, text: str, roots: bool = False) -> tuple[str, str]:
        return _queries.resolve_table(self.db, text, roots)

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
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if tables is not None:  # only transactions that changed one of the tables
            where.append(  # placeholders only
                "id IN (SELECT x.txn FROM txn_changes x JOIN relations r ON r.id = x.relation"  # noqa: S608
                " WHERE "
                + " OR ".join(["(r.schema_name = ? AND r.table_name = ?)"] * len(tables))
                + ")"
            )
            params += [part for pair in sorted(tables) for part in pair]
        for cond, value in (
            ("commit_time > ?", after or None),
            ("session_id = ?", session_id),
            ("application_name = ?", app),
            ("commit_time >= ?", since or None),
            ("commit_time < ?", until or None),
        ):
            if value is not None:
                where.append(cond)
                params.append(value)
        if xids:
            where.append(f"xid IN ({','.join('?' * len(xids))})")
            params += list(xids)
        return [
            Transaction(*r)
            for r in self.db.execute(
                f"SELECT {_TRANSACTION_COLUMNS} FROM transactions WHERE "  # noqa: S608
                + " AND ".join(where)
                + " ORDER BY commit_lsn DESC",
                params,
            )
        ]

    def txn_changes(self, txn_id: int, refusable: bool = False) -> list[TxnChanges]:
        return [
            TxnChanges(*r)
            for r in self.db.execute(
                "SELECT relation, op, n, without_old FROM txn_changes WHERE txn = ?"
                " AND (op = 'T' OR (op IN ('U', 'D') AND without_old > 0)) ORDER BY relation, op"
                if refusable
                else "SELECT relation, op, n, without_old FROM txn_changes WHERE txn = ?",
                [txn_id],
            )
        ]

    def table_version(self, rel_id: int) -> TableVersion:
        r = self.db.execute(
            "SELECT id, oid, schema_name, table_name, columns, types, key_columns, partial"
            " FROM relations WHERE id = ?",
            [rel_id],
        ).fetchone()
        return TableVersion(
            r[0],
            r[1],
            r[2],
            r[3],
            tuple(json.loads(r[4])),
            tuple(json.loads(r[5])),
            None if r[6] is None else tuple(json.loads(r[6])),
            bool(r[7]),
        )

    def changes(
        self, first: int, last: int, rel_id: int, xid: int | None
    ) -> Iterator[StoredChange]:
        # +relation: scan the transaction's id range; the index on relation would read the
        # table's changes of all time and sort them
        return map(
            StoredChange._make,
            self.db.execute(
                "SELECT id, op, old, new, unchanged, ? FROM changes"
                " WHERE id BETWEEN ? AND ? AND +relation = ? ORDER BY id",
                [xid, first, last, rel_id],
            ),
        )

    def later_writer(
        self, oid: int, change_id: int, key: str | None, image: str | None
    ) -> LastWriter | None:
        # a keyless row: a later change that wrote or removed an identical one
        found = "c.key = ?" if key is not None else "c.key IS NULL AND (c.new = ? OR c.old = ?)"
        row = self.db.execute(
            "SELECT t.session_id, t.xid, t.application_name FROM changes c"  # noqa: S608
            " JOIN transactions t ON t.id = c.txn"
            " WHERE c.relation IN (SELECT id FROM relations WHERE oid = ?) AND "
            + found
            + " AND c.id > ? ORDER BY c.id DESC LIMIT 1",
            [oid, *([key] if key is not None else [image, image]), change_id],
        ).fetchone()
        return None if row is None else LastWriter(*row)

    def guard_refusal_counts(self) -> dict[str | None, int]:
        return dict(
            self.db.execute("SELECT guard, count(*) FROM guard_refusals GROUP BY guard").fetchall()
        )

    def metrics(self) -> MetricsFigures:
        return self._metrics(self.db).get(self.source, _NO_FIGURES)

    def metrics_by_source(self, sources: Sequence[str]) -> dict[str, MetricsFigures]:
        if not sources:
            return {}
        db, named = self._reader_of(sources)
        figures = self._metrics(db)
        return {str(name): figures.get(i, _NO_FIGURES) for i, name in named.items()}

    @staticmethod
    def _metrics(db: Database) -> dict[int, MetricsFigures]:
        """The figures of each source the reader holds (one, or several at once), by id."""
        # each counter: what the store holds plus what pruning took out of it (pruned_counts),
        # so that it never goes down (sums cast: PostgreSQL's sum of a bigint is a numeric)
        # by application and relation first, then each relation's source and name (a join
        # per activity row was most of /metrics' time); a relation is never pruned, so every
        # row pruning counted has its relation, of the same source
        activity = (
            "SELECT application_name, relation, CAST(sum(inserts) AS bigint) AS inserts,"
            " CAST(sum(updates) AS bigint) AS updates, CAST(sum(deletes) AS bigint) AS deletes,"
            " CAST(sum(truncates) AS bigint) AS truncates,"
            " CAST(sum(transactions) AS bigint) AS transactions, min(minute) AS minute FROM ("
            "SELECT application_name, relation, inserts, updates, deletes, truncates,"
            " transactions, minute FROM activity UNION ALL SELECT application_name, relation,"
            " inserts, updates, deletes, truncates, n, NULL FROM pruned_counts"
            " WHERE kind = 'activity') u GROUP BY 1, 2"
        )
        parts: dict[str, dict[int, list[Any]]] = {}

        def by_source(part: str, query: str) -> None:
            for src, *row in db.execute(query):
                parts.setdefault(part, {}).setdefault(src, []).append(tuple(row))

        # a partition under its partitioned table (m012's roots): a label per table, however
        # many partitions it has or will have
        by_source(
            "changes",
            "SELECT r.source, a.application_name, qualified_name(coalesce(r.root_schema,"  # noqa: S608
            " r.schema_name), coalesce(r.root_table, r.table_name)),"
            " CAST(sum(a.inserts) AS bigint), CAST(sum(a.updates) AS bigint),"
            " CAST(sum(a.deletes) AS bigint), CAST(sum(a.truncates) AS bigint)"
            f" FROM ({activity}) a JOIN relations r ON r.id = a.relation GROUP BY 1, 2, 3",
        )
        # first seen first (then by name): /metrics names the first applications; an
        # application whose every minute was pruned counts as seen first
        by_source(
            "transactions",
            "SELECT r.source, a.application_name, CAST(sum(a.transactions) AS bigint)"  # noqa: S608
            f" FROM ({activity}) a JOIN relations r ON r.id = a.relation GROUP BY 1, 2"
            " ORDER BY 1, min(a.minute) IS NULL DESC, min(a.minute), 2",
        )
        by_source(
            "untrusted",
            "SELECT source, reason, CAST(sum(n) AS bigint) FROM (SELECT source,"
            " coalesce(tag_reason, '') AS reason,"
            " inserts + updates + deletes + truncates AS n FROM transactions"
            " WHERE tag <> 'trusted' UNION ALL SELECT source, label, n FROM pruned_counts"
            " WHERE kind = 'untrusted') u GROUP BY 1, 2",
        )
        # trusted refusals only: any role can emit a forged one naming any application
        by_source(
            "guard_refusals",
            "SELECT source, guard, application_name, count(*) FROM guard_refusals"
            " WHERE tag = 'trusted' GROUP BY 1, 2, 3 ORDER BY 1, min(id)",
        )
        by_source(
            "malformed",
            "SELECT source, prefix, CAST(sum(n) AS bigint) FROM (SELECT source, prefix, 1 AS n"
            " FROM malformed UNION ALL SELECT source, label, n FROM pruned_counts"
            " WHERE kind = 'malformed') m GROUP BY 1, 2",
        )
        last = dict(db.execute("SELECT source, max(commit_time) FROM transactions GROUP BY 1"))
        gaps = dict(db.execute("SELECT source, count(*) FROM gaps GROUP BY 1"))
        ids = {i for rows in parts.values() for i in rows} | set(last) | set(gaps)
        return {
            i: MetricsFigures(
                changes=tuple(parts.get("changes", {}).get(i, ())),
                transactions=tuple(parts.get("transactions", {}).get(i, ())),
                untrusted=tuple(parts.get("untrusted", {}).get(i, ())),
                guard_refusals=tuple(parts.get("guard_refusals", {}).get(i, ())),
                malformed=tuple(parts.get("malformed", {}).get(i, ())),
                last_commit_time=last.get(i),
                gaps=int(gaps.get(i, 0)),
            )
            for i in ids
        }

    # -- listings --------------------------------------------------------------------------
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
        db, named = self._listing(sources)
        return _queries.sessions(
            db, since, until, app, user, tables, limit, offset, undone_filter, named
        )

    def _listing(self, sources: Sequence[str] | None) -> tuple[Database, dict[int, str | None]]:
        """The reader of a listing: of the sources named, in one query (the store-wide
        reader), else of the source it acts for; the names its rows carry, by source id."""
        if sources is not None:
            return self._reader_of(sources)
        if self.source_id is None:
            if self.source_name is not None:  # named, not registered: which it names
                self.source  # noqa: B018 (raises)
            return self._reader_of([s.name for s in self.sources()])  # none chosen: every one
        return self.db, {self.source_id: self.source_name}

    def show(self, session_id: str | None = None, xid: int | None = None) -> Shown:
        return replace(_queries.show(self.db, session_id, xid), source=self.source_name)

    def history(
        self, table: str, key: dict[str, str | None], normalise: Normalise
    ) -> list[HistoryVersion]:
        rows = _queries.history(self.db, table, key, normalise)
        return [replace(r, source=self.source_name) for r in rows]

    def activity(
        self,
        by: str = "app",
        since: str | None = None,
        bucket_seconds: int = 60,
        sources: Sequence[str] | None = None,
    ) -> list[ActivityBucket]:
        db, named = self._listing(sources)
        return _queries.activity(db, by, since, bucket_seconds, named)

    def status(self) -> StoreStatus:
        return replace(_queries.status(self._listing(None)[0]), source=self.source_name)

    def statuses(self, sources: Sequence[str]) -> list[StoreStatus]:
        db, named = self._reader_of(sources)
        return _queries.statuses(db, {i: named[i] for i in sorted(named)})

    def guard_refusals(
        self, session_id: str | None = None, sources: Sequence[str] | None = None
    ) -> list[GuardRefusal]:
        return _queries.guard_refusals(self._listing(sources)[0], session_id)

    def ddl_of(self, session_id: str | None = None, xid: int | None = None) -> list[DdlCommand]:
        return _queries.ddl_of(self.db, session_id, xid)

    def transactions_of_session(self, session_id: str) -> list[Transaction]:
        return _queries.transactions_of_session(self.db, session_id)

    def undone_sessions(self) -> dict[tuple[str | None, str], Undone]:
        return _queries.undone_sessions(self.db)

    def changes_page(self, txn_ids: list[int], limit: int, offset: int) -> list[RowChange]:
        return _queries.changes_page(self.db, txn_ids, limit, offset)
