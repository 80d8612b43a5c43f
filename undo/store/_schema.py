"""The audit store's schema, changed only through versioned migrations.

Documented for auditors in the README ("The audit store"). Values are JSON arrays of
PostgreSQL text forms aligned with the column list of the table version in ``relations``,
so column names and types are stored once per table version, not once per row.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from undo.core import names
from undo.core.errors import BadInput, StoreBusy, StoreCorrupt, StoreFault, StoreUnreadable

migrations = Migrations("undo")


@migrations()
def m001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT
        );
        CREATE TABLE relations (
            id INTEGER PRIMARY KEY,
            oid INTEGER,
            schema_name TEXT NOT NULL,
            table_name TEXT NOT NULL,
            columns TEXT NOT NULL,      -- JSON array of column names
            types TEXT NOT NULL,        -- JSON array of type names (format_type)
            key_columns TEXT,           -- JSON array of positions in columns; NULL: no key
            partial INTEGER NOT NULL DEFAULT 0  -- 1: old images incomplete (no FULL identity)
        );
        CREATE UNIQUE INDEX relations_version
            ON relations (oid, schema_name, table_name, columns, types, key_columns, partial);
        CREATE TABLE transactions (
            id INTEGER PRIMARY KEY,
            xid INTEGER NOT NULL,
            commit_lsn INTEGER NOT NULL,
            end_lsn INTEGER NOT NULL UNIQUE,
            commit_time TEXT NOT NULL,  -- UTC, 'YYYY-MM-DDTHH:MM:SS.ffffffZ'
            session_id TEXT,            -- the %c of log_line_prefix; NULL: untagged
            application_name TEXT,
            user_name TEXT,
            client_addr TEXT,
            client_port INTEGER,
            backend_pid INTEGER,
            backend_start TEXT,
            statement TEXT,
            tag TEXT NOT NULL,          -- 'trusted', 'untrusted' or 'none'
            undo_of TEXT,               -- JSON: what this transaction undid, if it was an undo
            inserts INTEGER NOT NULL DEFAULT 0,
            updates INTEGER NOT NULL DEFAULT 0,
            deletes INTEGER NOT NULL DEFAULT 0,
            truncates INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX transactions_session ON transactions (session_id);
        CREATE INDEX transactions_time ON transactions (commit_time);
        CREATE INDEX transactions_app ON transactions (application_name, commit_time);
        CREATE INDEX transactions_xid ON transactions (xid);
        CREATE TABLE changes (
            id INTEGER PRIMARY KEY,
            txn INTEGER NOT NULL REFERENCES transactions (id),
            ord INTEGER NOT NULL,       -- position within the transaction
            relation INTEGER NOT NULL REFERENCES relations (id),
            op TEXT NOT NULL,           -- 'I', 'U', 'D' or 'T' (truncate)
            key TEXT,                   -- JSON array of the key's values (new row; old for 'D')
            old TEXT,                   -- JSON array, NULL for 'I' or an incomplete old image
            new TEXT,                   -- JSON array, NULL for 'D'
            unchanged TEXT              -- JSON array of positions of TOASTed values left unchanged
        );
        CREATE UNIQUE INDEX changes_position ON changes (txn, ord);
        CREATE TABLE gaps (
            id INTEGER PRIMARY KEY,
            detected_at TEXT NOT NULL,
            from_lsn INTEGER,
            to_lsn INTEGER,
            reason TEXT NOT NULL
        );
        CREATE TABLE undos (
            id INTEGER PRIMARY KEY,
            applied_at TEXT NOT NULL,
            target TEXT NOT NULL,       -- JSON: {"session": ...} or {"xids": [...]} or {"app": ...}
            selection TEXT NOT NULL,    -- JSON array of the undone transactions' ids
            undo_xid INTEGER            -- the source transaction that applied it
        );
        CREATE VIEW sessions AS
            SELECT session_id,
                   max(application_name) AS application_name,
                   max(user_name) AS user_name,
                   max(client_addr) AS client_addr,
                   min(commit_time) AS first_change_at,
                   max(commit_time) AS last_change_at,
                   count(*) AS transactions,
                   sum(inserts) AS inserts,
                   sum(updates) AS updates,
                   sum(deletes) AS deletes
              FROM transactions GROUP BY session_id;
        CREATE VIEW table_changes AS
            SELECT r.schema_name, r.table_name,
                   sum(c.op = 'I') AS inserts, sum(c.op = 'U') AS updates,
                   sum(c.op = 'D') AS deletes, sum(c.op = 'T') AS truncates
              FROM changes c JOIN relations r ON r.id = c.relation
             GROUP BY r.schema_name, r.table_name;
        CREATE VIEW change_log AS
            SELECT c.id, t.xid, t.commit_time, t.session_id, t.application_name, t.user_name,
                   r.schema_name, r.table_name, c.op, c.key, r.columns, c.old, c.new, c.unchanged,
                   t.statement
              FROM changes c JOIN transactions t ON t.id = c.txn
              JOIN relations r ON r.id = c.relation;
        """
    )


@migrations()
def m002_activity(db: Database) -> None:
    """Per-minute write counts kept by capture in the same transaction as the changes, so
    `undo activity`, the dashboard and /metrics never scan the changes; and an index for a
    row's history."""
    db.executescript(
        """
        CREATE TABLE activity (
            minute INTEGER NOT NULL,    -- Unix time of the minute's start (UTC)
            application_name TEXT NOT NULL,  -- '' when unknown (untagged)
            session_id TEXT NOT NULL,        -- '' when unknown (untagged)
            relation INTEGER NOT NULL REFERENCES relations (id),
            inserts INTEGER NOT NULL DEFAULT 0,
            updates INTEGER NOT NULL DEFAULT 0,
            deletes INTEGER NOT NULL DEFAULT 0,
            truncates INTEGER NOT NULL DEFAULT 0,
            transactions INTEGER NOT NULL DEFAULT 0  -- counted on a transaction's first table
        );
        CREATE UNIQUE INDEX activity_key
            ON activity (minute, application_name, session_id, relation);
        CREATE INDEX changes_row ON changes (relation, key);
        CREATE INDEX activity_session ON activity (session_id);
        INSERT INTO activity (minute, application_name, session_id, relation, inserts, updates,
                              deletes, truncates, transactions)
            SELECT CAST(strftime('%s', substr(t.commit_time, 1, 19)) AS INTEGER) / 60 * 60,
                   coalesce(t.application_name, ''), coalesce(t.session_id, ''), c.relation,
                   sum(c.op = 'I'), sum(c.op = 'U'), sum(c.op = 'D'), sum(c.op = 'T'),
                   count(DISTINCT CASE WHEN c.ord = 1 THEN t.id END)
              FROM changes c JOIN transactions t ON t.id = c.txn
             GROUP BY 1, 2, 3, 4;
        """
    )


@migrations()
def m003_change_ranges(db: Database) -> None:
    """A transaction's changes are one contiguous range of changes.id (capture allocates ids
    in commit order), kept as first_change/last_change. This replaces the unique index on
    (txn, ord), which cost about 10% of capture throughput (bench/capture)."""
    db.executescript(
        """
        ALTER TABLE transactions ADD COLUMN first_change INTEGER;
        ALTER TABLE transactions ADD COLUMN last_change INTEGER;
        UPDATE transactions SET
            first_change = (SELECT min(id) FROM changes WHERE txn = transactions.id),
            last_change = (SELECT max(id) FROM changes WHERE txn = transactions.id);
        DROP INDEX changes_position;
        DROP VIEW change_log;
        CREATE VIEW change_log AS
            SELECT c.id, t.xid, t.commit_time, t.session_id, t.application_name, t.user_name,
                   r.schema_name, r.table_name, c.op, c.key, r.columns, c.old, c.new, c.unchanged,
                   t.statement
              FROM transactions t
              JOIN changes c ON c.id BETWEEN t.first_change AND t.last_change
              JOIN relations r ON r.id = c.relation;
        """
    )


@migrations()
def m004_undo_entries(db: Database) -> None:
    """undos mirrors the source's ledger (undo.ledger) from the stream: entries lists what each
    undo undid as [commit LSN, schema, table, op, xid] of the undone transactions."""
    db.executescript("ALTER TABLE undos ADD COLUMN entries TEXT;")


@migrations()
def m005_full_xid(db: Database) -> None:
    """full_xid: the transaction's 64-bit xid from its trusted tag (NULL without one); undo
    uses it to know a row version by its xmin."""
    db.executescript("ALTER TABLE transactions ADD COLUMN full_xid INTEGER;")


@migrations()
def m006_txn_changes(db: Database) -> None:
    """txn_changes: per transaction, table version and operation, how many changes and how many
    of its updates and deletes lack a full old row, so an undo sizes its selection without
    reading the changes. Filled from the changes already stored."""
    db.executescript(
        """
        CREATE TABLE txn_changes (
            txn INTEGER NOT NULL REFERENCES transactions (id),
            relation INTEGER NOT NULL REFERENCES relations (id),
            op TEXT NOT NULL,
            n INTEGER NOT NULL,
            without_old INTEGER NOT NULL,
            PRIMARY KEY (txn, relation, op)
        ) WITHOUT ROWID;
        INSERT INTO txn_changes
        SELECT txn, relation, op, count(*), coalesce(sum(old IS NULL AND op <> 'I'), 0)
          FROM changes GROUP BY txn, relation, op;
        """
    )


@migrations()
def m007_tag_reason(db: Database) -> None:
    """tag_reason: why a transaction's tag is not trusted (forged, replayed, malformed; missing
    when it had none); NULL when trusted."""
    db.executescript(
        "ALTER TABLE transactions ADD COLUMN tag_reason TEXT;"
        " UPDATE transactions SET tag_reason = 'missing' WHERE tag = 'none';"
        " UPDATE transactions SET tag_reason = 'forged' WHERE tag = 'untrusted';"
    )


@migrations()
def m008_guard_refusals(db: Database) -> None:
    """guard_refusals: writes a guard refused (undo guard), one row per refused transaction,
    from the source's non-transactional message; ``lsn`` makes a message sent twice one row.
    And txn_changes by relation: the transactions that changed a table (undo table)."""
    db.executescript(
        """
        CREATE TABLE guard_refusals (
            id INTEGER PRIMARY KEY,
            lsn INTEGER NOT NULL UNIQUE,
            refused_at TEXT NOT NULL,
            guard TEXT,
            reason TEXT,
            session_id TEXT,
            application_name TEXT,
            user_name TEXT,
            client_addr TEXT,
            backend_pid INTEGER,
            statement TEXT,
            tag TEXT NOT NULL,
            tag_reason TEXT
        );
        CREATE INDEX guard_refusals_time ON guard_refusals (refused_at);
        CREATE INDEX guard_refusals_session ON guard_refusals (session_id);
        CREATE INDEX txn_changes_relation ON txn_changes (relation, txn);
        """
    )


@migrations()
def m009_ddl(db: Database) -> None:
    """ddl: DDL commands on audited schemas, with their transaction's attribution; gaps gain
    a kind ('stream': the slot; 'table': DDL made capture of a table incomplete), the table,
    the session and the transaction's xid."""
    db.executescript(
        """
        CREATE TABLE ddl (
            id INTEGER PRIMARY KEY,
            commit_lsn INTEGER NOT NULL,
            commit_time TEXT NOT NULL,
            xid INTEGER NOT NULL,
            session_id TEXT,
            application_name TEXT,
            user_name TEXT,
            statement TEXT,
            command TEXT NOT NULL,
            object_type TEXT,
            object TEXT,
            tag TEXT NOT NULL,
            tag_reason TEXT
        );
        CREATE INDEX ddl_lsn ON ddl (commit_lsn);
        CREATE INDEX ddl_session ON ddl (session_id);
        ALTER TABLE gaps ADD COLUMN kind TEXT NOT NULL DEFAULT 'stream';
        ALTER TABLE gaps ADD COLUMN table_name TEXT;
        ALTER TABLE gaps ADD COLUMN session_id TEXT;
        ALTER TABLE gaps ADD COLUMN xid INTEGER;
        """
    )


@migrations()
def m010_malformed(db: Database) -> None:
    """malformed: messages with undo's prefixes that are not what undo's SQL writes (any role
    can emit one): kept with their LSN, prefix, transaction, the session they claim and what
    was wrong, never used."""
    db.executescript(
        """
        CREATE TABLE malformed (
            id INTEGER PRIMARY KEY,
            lsn INTEGER NOT NULL,
            prefix TEXT NOT NULL,
            received_at TEXT NOT NULL,
            xid INTEGER,
            session_id TEXT,
            problem TEXT NOT NULL,
            size INTEGER NOT NULL,
            content BLOB NOT NULL
        );
        CREATE UNIQUE INDEX malformed_lsn ON malformed (lsn, prefix);
        CREATE INDEX malformed_session ON malformed (session_id);
        """
    )


@migrations()
def m011_undo_trust(db: Database) -> None:
    """undos gains the trust of its mirror, as transactions have: tag 'trusted' (signed by
    undo.record_undo, in its own transaction) or 'untrusted', tag_reason (forged, replayed,
    malformed; 'unsigned' for a row mirrored before mirrors were signed, which cannot be told
    from a forged one), and message, an untrusted mirror as it came. Readers count trusted
    rows only."""
    db.executescript(
        """
        ALTER TABLE undos ADD COLUMN tag TEXT NOT NULL DEFAULT 'untrusted';
        ALTER TABLE undos ADD COLUMN tag_reason TEXT;
        ALTER TABLE undos ADD COLUMN message TEXT;
        UPDATE undos SET tag_reason = 'unsigned';
        """
    )


@migrations()
def m012_relation_roots(db: Database) -> None:
    """root_schema, root_table: the top of a partition's tree (pg_partition_root) when capture
    met it, so that a partitioned table's name finds its partitions' changes from the store
    alone; NULL for a table that is no partition, and for versions stored before this. The
    root is part of a table version (a partition attached elsewhere is a new version)."""
    db.executescript(
        """
        ALTER TABLE relations ADD COLUMN root_schema TEXT;
        ALTER TABLE relations ADD COLUMN root_table TEXT;
        DROP INDEX relations_version;
        CREATE UNIQUE INDEX relations_version ON relations
            (oid, schema_name, table_name, columns, types, key_columns, partial, root_schema,
             root_table);
        CREATE INDEX relations_root ON relations (root_schema, root_table);
        """
    )


@migrations()
def m013_statements(db: Database) -> None:
    """statements: where a trusted transaction's changes were made by a later statement than
    its first (transactions.statement), one row from the first change each such statement made
    (``first_ord``: its ``changes.ord``); a change's statement is the row with the greatest
    ``first_ord`` not past its own, else the transaction's. ``change_log`` gives it per change.
    guard_refusals gains the refusal's nonce: a trusted refusal is stored once."""
    db.executescript(
        """
        CREATE TABLE statements (
            txn INTEGER NOT NULL REFERENCES transactions (id),
            first_ord INTEGER NOT NULL,
            statement TEXT,
            PRIMARY KEY (txn, first_ord)
        ) WITHOUT ROWID;
        ALTER TABLE guard_refusals ADD COLUMN nonce TEXT;
        CREATE UNIQUE INDEX guard_refusals_nonce ON guard_refusals (nonce)
            WHERE tag = 'trusted';
        DROP VIEW IF EXISTS change_log;
        CREATE VIEW change_log AS
            SELECT c.id, t.xid, t.commit_time, t.session_id, t.application_name, t.user_name,
                   r.schema_name, r.table_name, c.op, c.key, r.columns, c.old, c.new, c.unchanged,
                   coalesce((SELECT s.statement FROM statements s
                              WHERE s.txn = t.id AND s.first_ord <= c.ord
                              ORDER BY s.first_ord DESC LIMIT 1), t.statement) AS statement
              FROM transactions t
              JOIN changes c ON c.id BETWEEN t.first_change AND t.last_change
              JOIN relations r ON r.id = c.relation;
        """
    )


#: the name a store made before sources (m014) gives its one source, until a command that
#: connects to that database claims it (undo.source.sources): then it takes the database's name
UNCLAIMED = "default"
#: meta keys that belong to one source (m014 moves them to source_meta); the rest are the store's
SOURCE_KEYS = (
    "slot",
    "decoder",
    "publication",
    "numbers_as_strings",
    "position",
    "history_from",
    "capture_lag",
    "server_version",
    "settings",
)


@migrations()
def m014_sources(db: Database) -> None:
    """sources: the databases whose history the store holds (#22), by name, with the server's
    system identifier and the database name that tell them apart. Every table that is not
    reached through a transaction or a relation gains ``source``; what was unique per store
    (a transaction's end LSN, a refusal's LSN, a malformed message's LSN) is unique per source,
    since two servers' LSNs may meet. The slot, decoder, position... are per source
    (source_meta); meta keeps the store's own keys. A store made before this holds one source:
    named UNCLAIMED, with an unknown identity, until a command connected to its database claims
    it. The documented views gain ``source`` (its name) as their first column."""
    has_data = db.execute(
        "SELECT EXISTS (SELECT 1 FROM meta WHERE key = 'slot')"
        " OR EXISTS (SELECT 1 FROM transactions) OR EXISTS (SELECT 1 FROM relations)"
    ).fetchone()[0]
    db.executescript(
        """
        CREATE TABLE sources (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            system_identifier TEXT NOT NULL,  -- pg_control_system(); '' until claimed
            database_name TEXT NOT NULL,      -- '' until claimed
            registered_at TEXT NOT NULL
        );
        CREATE TABLE source_meta (
            source INTEGER NOT NULL REFERENCES sources (id),
            key TEXT NOT NULL,
            value TEXT,
            PRIMARY KEY (source, key)
        ) WITHOUT ROWID;
        DROP VIEW IF EXISTS sessions;
        DROP VIEW IF EXISTS change_log;
        DROP VIEW IF EXISTS table_changes;
        CREATE TABLE transactions_m014 (
            id INTEGER PRIMARY KEY,
            xid INTEGER NOT NULL,
            commit_lsn INTEGER NOT NULL,
            end_lsn INTEGER NOT NULL,
            commit_time TEXT NOT NULL,
            session_id TEXT,
            application_name TEXT,
            user_name TEXT,
            client_addr TEXT,
            client_port INTEGER,
            backend_pid INTEGER,
            backend_start TEXT,
            statement TEXT,
            tag TEXT NOT NULL,
            undo_of TEXT,
            inserts INTEGER NOT NULL DEFAULT 0,
            updates INTEGER NOT NULL DEFAULT 0,
            deletes INTEGER NOT NULL DEFAULT 0,
            truncates INTEGER NOT NULL DEFAULT 0,
            first_change INTEGER,
            last_change INTEGER,
            full_xid INTEGER,
            tag_reason TEXT,
            source INTEGER NOT NULL,
            UNIQUE (source, end_lsn)
        );
        INSERT INTO transactions_m014 SELECT id, xid, commit_lsn, end_lsn, commit_time,
            session_id, application_name, user_name, client_addr, client_port, backend_pid,
            backend_start, statement, tag, undo_of, inserts, updates, deletes, truncates,
            first_change, last_change, full_xid, tag_reason, 1 FROM transactions;
        DROP TABLE transactions;
        ALTER TABLE transactions_m014 RENAME TO transactions;
        CREATE INDEX transactions_session ON transactions (session_id);
        CREATE INDEX transactions_time ON transactions (commit_time);
        CREATE INDEX transactions_app ON transactions (application_name, commit_time);
        CREATE INDEX transactions_xid ON transactions (xid);
        CREATE TABLE guard_refusals_m014 (
            id INTEGER PRIMARY KEY,
            lsn INTEGER NOT NULL,
            refused_at TEXT NOT NULL,
            guard TEXT,
            reason TEXT,
            session_id TEXT,
            application_name TEXT,
            user_name TEXT,
            client_addr TEXT,
            backend_pid INTEGER,
            statement TEXT,
            tag TEXT NOT NULL,
            tag_reason TEXT,
            nonce TEXT,
            source INTEGER NOT NULL,
            UNIQUE (source, lsn)
        );
        INSERT INTO guard_refusals_m014 SELECT id, lsn, refused_at, guard, reason, session_id,
            application_name, user_name, client_addr, backend_pid, statement, tag, tag_reason,
            nonce, 1 FROM guard_refusals;
        DROP TABLE guard_refusals;
        ALTER TABLE guard_refusals_m014 RENAME TO guard_refusals;
        CREATE INDEX guard_refusals_time ON guard_refusals (refused_at);
        CREATE INDEX guard_refusals_session ON guard_refusals (session_id);
        CREATE UNIQUE INDEX guard_refusals_nonce ON guard_refusals (source, nonce)
            WHERE tag = 'trusted';
        ALTER TABLE relations ADD COLUMN source INTEGER NOT NULL DEFAULT 0;
        UPDATE relations SET source = 1;
        DROP INDEX relations_version;
        CREATE UNIQUE INDEX relations_version ON relations
            (source, oid, schema_name, table_name, columns, types, key_columns, partial,
             root_schema, root_table);
        ALTER TABLE gaps ADD COLUMN source INTEGER NOT NULL DEFAULT 0;
        UPDATE gaps SET source = 1;
        ALTER TABLE undos ADD COLUMN source INTEGER NOT NULL DEFAULT 0;
        UPDATE undos SET source = 1;
        ALTER TABLE ddl ADD COLUMN source INTEGER NOT NULL DEFAULT 0;
        UPDATE ddl SET source = 1;
        ALTER TABLE malformed ADD COLUMN source INTEGER NOT NULL DEFAULT 0;
        UPDATE malformed SET source = 1;
        DROP INDEX malformed_lsn;
        CREATE UNIQUE INDEX malformed_lsn ON malformed (source, lsn, prefix);
        CREATE VIEW sessions AS
            SELECT s.name AS source, t.session_id,
                   max(t.application_name) AS application_name,
                   max(t.user_name) AS user_name,
                   max(t.client_addr) AS client_addr,
                   min(t.commit_time) AS first_change_at,
                   max(t.commit_time) AS last_change_at,
                   count(*) AS transactions,
                   sum(t.inserts) AS inserts,
                   sum(t.updates) AS updates,
                   sum(t.deletes) AS deletes
              FROM transactions t JOIN sources s ON s.id = t.source
             GROUP BY s.name, t.session_id;
        CREATE VIEW table_changes AS
            SELECT s.name AS source, r.schema_name, r.table_name,
                   sum(c.op = 'I') AS inserts, sum(c.op = 'U') AS updates,
                   sum(c.op = 'D') AS deletes, sum(c.op = 'T') AS truncates
              FROM changes c JOIN relations r ON r.id = c.relation
              JOIN sources s ON s.id = r.source
             GROUP BY s.name, r.schema_name, r.table_name;
        CREATE VIEW change_log AS
            SELECT s.name AS source, c.id, t.xid, t.commit_time, t.session_id,
                   t.application_name, t.user_name, r.schema_name, r.table_name, c.op, c.key,
                   r.columns, c.old, c.new, c.unchanged,
                   coalesce((SELECT st.statement FROM statements st
                              WHERE st.txn = t.id AND st.first_ord <= c.ord
                              ORDER BY st.first_ord DESC LIMIT 1), t.statement) AS statement
              FROM transactions t
              JOIN changes c ON c.id BETWEEN t.first_change AND t.last_change
              JOIN relations r ON r.id = c.relation
              JOIN sources s ON s.id = t.source;
        """
    )
    if has_data:
        db.execute(
            "INSERT INTO sources (id, name, system_identifier, database_name, registered_at)"
            " VALUES (1, ?, '', '', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            [UNCLAIMED],
        )
        keys = ",".join("?" * len(SOURCE_KEYS))
        db.execute(
            "INSERT INTO source_meta (source, key, value) SELECT 1, key, value FROM meta"  # noqa: S608
            f" WHERE key IN ({keys})",
            list(SOURCE_KEYS),
        )
    db.execute(f"DELETE FROM meta WHERE key IN ({','.join('?' * len(SOURCE_KEYS))})", SOURCE_KEYS)  # noqa: S608


@migrations()
def m015_pruned_counts(db: Database) -> None:
    """pruned_counts: what pruning took out of the totals /metrics reports, so that its
    counters never go down (a Prometheus counter that drops is read as a reset): per
    application and table version the activity folded in (``kind`` 'activity': its
    inserts..truncates, ``n`` its transactions), per tag_reason the row changes of untrusted
    transactions ('untrusted', ``label``), per prefix the malformed messages ('malformed')."""
    db.executescript(
        """
        CREATE TABLE pruned_counts (
            source INTEGER NOT NULL,
            kind TEXT NOT NULL,
            application_name TEXT NOT NULL DEFAULT '',
            relation INTEGER NOT NULL DEFAULT 0,
            label TEXT NOT NULL DEFAULT '',
            inserts INTEGER NOT NULL DEFAULT 0,
            updates INTEGER NOT NULL DEFAULT 0,
            deletes INTEGER NOT NULL DEFAULT 0,
            truncates INTEGER NOT NULL DEFAULT 0,
            n INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (source, kind, application_name, relation, label)
        ) WITHOUT ROWID;
        """
    )


PAGE_SIZE = 8192

# SQLite's primary result codes (sqlite3.h). Python 3.11's sqlite3 gives an error's extended
# code as ``sqlite_errorcode``: its low byte is the primary one.
SQLITE_PERM = 3
SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_READONLY = 8
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_CANTOPEN = 14
SQLITE_NOTADB = 26


def error_code(e: BaseException) -> int | None:
    """The primary SQLite result code of an sqlite3 error, None for any other exception."""
    code = getattr(e, "sqlite_errorcode", None) if isinstance(e, sqlite3.Error) else None
    return None if code is None else int(code) & 0xFF


def is_corrupt(e: BaseException) -> bool:
    """SQLite reports the file malformed: SQLITE_CORRUPT, or SQLITE_NOTADB (its header gone)."""
    return error_code(e) in (SQLITE_CORRUPT, SQLITE_NOTADB)


def store_fault(e: BaseException, path: str) -> StoreFault | None:
    """What an SQLite error means for the person running undo, as one line with the fix; None
    for an error that is not about the file (a bug, a constraint)."""
    code = error_code(e)
    if code in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return StoreCorrupt(
            f"the audit store {path} is corrupt (SQLite: {e}): move it aside, and either restore"
            f" a copy or recover what SQLite can read (sqlite3 {path} .recover | sqlite3 NEW.db);"
            " then `undo check`"
        )
    if code == SQLITE_FULL:
        return StoreFault(
            f"the disk holding the audit store {path} is full (SQLite: {e}): free space there"
            " (or `undo prune`), then run the command again"
        )
    if code == SQLITE_CANTOPEN:
        return StoreFault(
            f"cannot open the audit store {path} (SQLite: {e}): it must be a file undo may read"
            f" and write, in a folder it may write ({path}-wal and {path}-shm go beside it)"
        )
    if code in (SQLITE_READONLY, SQLITE_PERM):
        return StoreFault(
            f"the audit store {path} cannot be written (SQLite: {e}): the file or its folder is"
            f" read-only (permissions, a read-only mount); SQLite also writes {path}-wal and"
            f" {path}-shm beside it"
        )
    if code == SQLITE_IOERR:
        return StoreFault(
            f"I/O error on the audit store {path} (SQLite: {e}): check its disk (dmesg), then"
            " `undo check`"
        )
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return StoreBusy(
            f"the audit store {path} stayed locked by another process for 10 s (SQLite: {e}):"
            " a prune or a copy holding it; run the command again when it is done"
        )
    return None


def quick_check(db: Database) -> list[str]:
    """SQLite's PRAGMA quick_check of the store: [] when sound, else what it reports, a line
    each (at most 10). It reads every page: seconds per GB."""
    try:
        rows = [r[0] for r in db.execute("PRAGMA quick_check(10)").fetchall()]
    except sqlite3.DatabaseError as e:
        if not is_corrupt(e):
            raise
        return [str(e)]
    if rows == ["ok"]:
        return []
    lines = [x.strip() for r in rows for x in str(r).splitlines()]
    return [x for x in lines if x and not x.startswith("*** in database")][:10]


def incremental_vacuum(db: Database) -> bool:
    """Whether freed pages can be handed back to the file system a few at a time (PRAGMA
    auto_vacuum = INCREMENTAL: every store made since 0.3.0; an older one gets it from the full
    VACUUM of `undo prune`)."""
    return int(db.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2


def open_database(path: str, create: bool = False) -> Database:
    """Open the store (WAL mode, synchronous FULL), creating it with mode 0600 if asked."""
    p = Path(path)
    new = not p.exists()
    if new:
        if not create:
            raise StoreUnreadable(
                f"no audit store at {path}: run `undo init` first,"
                " or point --store/UNDO_STORE at it"
            )
        try:
            fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
        except OSError as e:
            raise StoreFault(f"cannot create the audit store {path}: {e.strerror}") from None
        os.close(fd)
    try:
        conn = sqlite3.connect(str(p), isolation_level=None, check_same_thread=False)
        if new:
            # 8 KB pages (before WAL mode, which fixes the size): capture's inserts cost about
            # 7% less SQLite time than with 4 KB (measured on their own), the store is 1% smaller
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            # before the first table: pages freed by pruning can go back to the file system a
            # few at a time (capture --keep), never by a full VACUUM that stalls capture
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        # a table's name as every listing shows it: quoted as PostgreSQL reads it, so that it
        # can be given back to --table (one definition: names.quote)
        conn.create_function("qualified_name", 2, names.quote, deterministic=True)
        db = Database(conn)
        if create:
            migrations.apply(db)
        elif not db["meta"].exists():
            raise StoreUnreadable(
                f"{path} is not an undo audit store: run `undo init` to create one"
            )
        else:
            migrations.apply(db)
    except sqlite3.DatabaseError as e:
        if error_code(e) == SQLITE_NOTADB:  # a wrong --store as often as a store overwritten
            raise StoreUnreadable(
                f"{path} is not an SQLite database (SQLite: {e}): point --store/UNDO_STORE at"
                " the audit store"
            ) from None
        raise store_fault(e, path) or StoreUnreadable(
            f"cannot read the audit store {path}: {e}"
        ) from None
    return db


def get_meta(db: Database, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    return None if row is None else row[0]


def set_meta(db: Database, key: str, value: str | None) -> None:
    db.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )


def get_source_meta(db: Database, source: int, key: str) -> str | None:
    row = db.execute(
        "SELECT value FROM source_meta WHERE source = ? AND key = ?", [source, key]
    ).fetchone()
    return None if row is None else row[0]


def set_source_meta(db: Database, source: int, key: str, value: str | None) -> None:
    db.execute(
        "INSERT INTO source_meta (source, key, value) VALUES (?, ?, ?)"
        " ON CONFLICT (source, key) DO UPDATE SET value = excluded.value",
        [source, key, value],
    )


@dataclass(frozen=True)
class Registration:
    """What registering a source database comes to (decide_registration): ``found`` it under
    ``name`` (row ``source``), ``update`` row ``source`` to this identity under ``name`` (an
    unclaimed source, or --reregister after its server changed), or ``insert`` it."""

    action: str
    name: str
    source: int | None = None


def decide_registration(
    rows: list[tuple[int, str, str, str]],
    name: str | None,
    system_identifier: str,
    database: str,
    reregister: bool,
    where: str,
) -> Registration:
    """The one rule of both stores, over their ``sources`` rows (id, name, system identifier,
    database name): one already registered under this identity is found by it (under ``name``,
    or any name when ``name`` is None); an unclaimed one (m014) takes this identity; a name
    another database holds is BadInput, unless ``reregister`` and that database has this one's
    name (its server changed)."""
    same = [r for r in rows if (r[2], r[3]) == (system_identifier, database)]
    if same and name not in (None, same[0][1]):
        raise BadInput(
            f"database {database} is the source {same[0][1]!r} of the audit store {where}:"
            f" use --source {same[0][1]}"
        )
    if same:
        return Registration("found", str(same[0][1]), int(same[0][0]))
    wanted = name or database
    held = next((r for r in rows if r[1] == wanted), None)
    unclaimed = [r for r in rows if r[2] == ""]
    if held is None and name is None and unclaimed:
        held = unclaimed[0]  # a store made before sources: its one source is this database
    if held is None:
        return Registration("insert", wanted)
    if held[2] == "" or (reregister and held[3] == database):
        return Registration("update", wanted, int(held[0]))
    raise BadInput(taken(wanted, held[3], held[2], where, database))


def register_source(
    db: Database,
    name: str | None,
    system_identifier: str,
    database: str,
    reregister: bool,
    where: str,
) -> str:
    """Register a source database (sources) by decide_registration's rule: its name."""
    rows = db.execute(
        "SELECT id, name, system_identifier, database_name FROM sources ORDER BY id"
    ).fetchall()
    got = decide_registration(rows, name, system_identifier, database, reregister, where)
    if got.action == "update":
        db.execute(
            "UPDATE sources SET name = ?, system_identifier = ?, database_name = ? WHERE id = ?",
            [got.name, system_identifier, database, got.source],
        )
    elif got.action == "insert":
        db.execute(
            "INSERT INTO sources (name, system_identifier, database_name, registered_at)"
            " VALUES (?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            [got.name, system_identifier, database],
        )
    return got.name


def taken(name: str, held_db: str, held_sysid: str, where: str, database: str) -> str:
    """The refusal of a source name another database holds."""
    if held_db == database:
        return (
            f"the source {name!r} of the audit store {where} is database {held_db} of the server"
            f" with system identifier {held_sysid}, and this server's differs (pg_upgrade, or a"
            f" restore into a new cluster?): if it is the same database, register it again with"
            f" `undo init --source {name} --reregister` (capture then starts from a new slot's"
            " position; what happened between is a gap)"
        )
    return (
        f"the source name {name!r} is taken in the audit store {where} by database {held_db}"
        f" of the server with system identifier {held_sysid}: choose another --source"
    )
