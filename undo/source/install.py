"""`undo init`: make the source database ready, and `undo init --uninstall`.

Installs the SQL in ``migrations/`` (shipped in the package as ``undo.migrations``), prepares
every table of the audited schemas through ``undo.audit_table`` (the same function the event
trigger calls for tables created later), creates the publication and the slot, and the store.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from undo.core import names, wal
from undo.core.config import Settings
from undo.core.errors import BadInput, NotFound, NotReady, UndoError
from undo.source import pg
from undo.source.sources import identity
from undo.store import exists, open_store, shown

log = logging.getLogger(__name__)


def migration_scripts() -> list[tuple[str, str]]:
    """The source-side SQL files, in order: (name, text)."""
    files = resources.files("undo.migrations")
    return sorted(
        (f.name, f.read_text(encoding="utf-8")) for f in files.iterdir() if f.name.endswith(".sql")
    )


def _publish_generated(conn: psycopg.Connection[Any], publication: str) -> bool:
    """PostgreSQL 18 refuses UPDATE and DELETE on a table whose replica identity (FULL, here)
    holds a stored generated column its publication does not publish: publish them. Returns
    whether it changed the publication."""
    if pg.server_version(conn) < 180000:
        return False
    row = conn.execute(
        "SELECT pubgencols FROM pg_publication WHERE pubname = %s", (publication,)
    ).fetchone()
    if row is None or row[0] == "s":
        return False
    conn.execute(
        sql.SQL("ALTER PUBLICATION {} SET (publish_generated_columns = stored)").format(
            sql.Identifier(publication)
        )
    )
    return True


#: the event triggers init makes (superuser only), all calling undo.on_ddl (004_ddl.sql)
EVENT_TRIGGERS = {
    "undo_ddl": "ddl_command_end",
    "undo_ddl_drop": "sql_drop",
    "undo_ddl_rewrite": "table_rewrite",
}


@dataclass
class InitReport:
    changed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        return not self.changed


#: Tables of the audited schemas that no publication can hold: their changes are not in the WAL.
UNPUBLISHABLE = """
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname),
       CASE WHEN c.relkind = 'f' THEN 'a foreign table: its rows live elsewhere, audit them there'
            ELSE 'unlogged: its changes are not in the WAL; run ALTER TABLE '
                 || quote_ident(n.nspname) || '.' || quote_ident(c.relname)
                 || ' SET LOGGED, then undo init again' END
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = ANY (%s) AND (c.relkind = 'f' OR (c.relkind IN ('r', 'p')
       AND c.relpersistence = 'u'))
 ORDER BY 1
"""


def unpublishable(conn: psycopg.Connection[Any], schemas: list[str]) -> list[tuple[str, str]]:
    """(table, why and the fix) for each table of these schemas that cannot be audited."""
    return [(r[0], r[1]) for r in conn.execute(UNPUBLISHABLE, (schemas,)).fetchall()]


def foreign_slot(conn: psycopg.Connection[Any], slot: str) -> str | None:
    """Whose a slot of this name is when it is not this database's ("belongs to database
    shop", "is a physical slot"), or None: slot names are per cluster, and a slot belongs to
    one database (pg_replication_slots.database)."""
    row = conn.execute(
        "SELECT slot_type, database FROM pg_replication_slots"
        " WHERE slot_name = %s AND database IS DISTINCT FROM current_database()",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    return f"belongs to database {row[1]}" if row[1] is not None else f"is a {row[0]} slot"


def free_slot_name(conn: psycopg.Connection[Any]) -> str:
    """A slot name no database holds yet: undo_<database> (made a valid slot name)."""
    base = re.sub(r"[^a-z0-9_]", "_", f"undo_{conn.info.dbname}".lower())[:60]
    taken = {r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall()}
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def _refuse_foreign_slot(conn: psycopg.Connection[Any], slot: str) -> None:
    whose = foreign_slot(conn, slot)
    if whose is not None:
        raise BadInput(
            f"replication slot {slot} {whose} (slot names are per cluster): pass"
            f" --slot {free_slot_name(conn)} (or another free name) for database"
            f" {conn.info.dbname}"
        )


#: The tables of the audited schemas a publication can hold, and every table undo audits: what
#: undo.table_problems (001_install.sql) is asked about.
AUDITED = """
SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = ANY (%(schemas)s) AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
UNION SELECT a.relid FROM undo.audited a
"""


def _refuse_foreign_claim(conn: psycopg.Connection[Any], db: Any, settings: Settings) -> None:
    """A store made before sources holds a source of no identity, which init claims for its
    database: not when that source's slot lives in another database (a copy made with CREATE
    DATABASE ... TEMPLATE, or any other one), whose history it would then call this one's."""
    for src in db.sources():
        if src.system_identifier:
            continue
        db.use(src.name)
        slot = db.meta("slot")
        row = None
        if slot is not None:
            row = conn.execute(
                "SELECT database FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
                (slot,),
            ).fetchone()
        here = conn.info.dbname
        if row is not None and row[0] != here:
            raise BadInput(
                f"the audit store {shown(settings.store)} was made before sources: its source"
                f" {src.name!r} is the history of slot {slot}'s database {row[0]}, not {here}:"
                f" run `undo init` with the --dsn of {row[0]}, or give {here} a store of its own"
            )


def _refuse_a_stranger(
    conn: psycopg.Connection[Any], db: Any, name: str, settings: Settings
) -> None:
    """--reregister gives a source's history to this database, as the same database on a new
    server: not to one that holds none of the tables that history recorded (another live
    database of the same name, a wrong --dsn), whose undos would then write into it."""
    if name not in {s.name for s in db.sources()}:
        return
    db.use(name)
    recorded = db.recorded_tables()
    if not recorded:
        return
    row = conn.execute(
        "SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
        " ON n.oid = c.relnamespace AND c.relkind IN ('r', 'p')"  # tables, not views
        " JOIN ROWS FROM (pg_catalog.unnest(%s::text[]),"
        " pg_catalog.unnest(%s::text[])) AS r(s, t)"
        " ON n.nspname = r.s AND c.relname = r.t",
        ([s for s, _ in recorded], [t for _, t in recorded]),
    ).fetchone()
    if row and row[0]:
        return
    some = ", ".join(names.quote(s, t) for s, t in recorded[:3])
    raise BadInput(
        f"database {conn.info.dbname} holds none of the {len(recorded)} table(s) the source"
        f" {name!r} of the audit store {shown(settings.store)} recorded ({some}"
        f"{', ...' if len(recorded) > 3 else ''}): it is not that database on a new server."
        " --reregister is for the same database after pg_upgrade or a restore; check --dsn,"
        " or register this database under a name of its own (--source)"
    )


def _switch(
    conn: psycopg.Connection[Any], db: Any, name: str, settings: Settings
) -> tuple[int | None, int] | None:
    """--reregister of a source whose identity is not this database's: None when it is (or
    the name is new); else (the slot's position where this database keeps a slot of that name
    past the store's and a gap is to be recorded, else None; the store's position). A kept
    slot behind the store's position (the source moved away and back: the position is the
    other server's) is refused before anything changes: capture would take this server's
    changes up to that position as stored and skip them."""
    known = {s.name: s for s in db.sources()}
    if name not in known or (known[name].system_identifier, known[name].database_name) == identity(
        conn
    ):
        return None
    db.use(name)
    position = db.meta("position")
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots"
        " WHERE slot_name = %s AND database = pg_catalog.current_database()"
        " AND wal_status IS DISTINCT FROM 'lost'",
        (settings.slot,),
    ).fetchone()
    if position is None or row is None or row[0] is None:
        return None, int(position or 0)
    kept_at, was_at = wal.lsn_to_int(row[0]), int(position)
    if kept_at < was_at:
        raise UndoError(
            f"slot {settings.slot} of database {conn.info.dbname} is at {row[0]}, behind the"
            f" audit store's position {wal.int_to_lsn(was_at)} of the source {name!r} on its"
            " other server: capture would skip this server's changes up to there. Drop the"
            f" slot (SELECT pg_drop_replication_slot('{settings.slot}')) and run `undo init"
            f" --source {name} --reregister` again: it makes a new slot and records the switch"
            " as a gap"
        )
    return (kept_at if kept_at > was_at else None), was_at


def problem_rows(conn: psycopg.Connection[Any], schemas: list[str]) -> list[tuple[str, str, str]]:
    """(table, code, problem) for each thing that makes capture of an audited table incomplete
    now: undo.table_problems, the definition the event trigger and capture use too; its code
    is unlogged, identity, trigger or descendant."""
    query = sql.SQL(
        "SELECT p.table_name, p.code, p.problem FROM undo.table_problems(ARRAY({})) p ORDER BY 1, 3"
    ).format(sql.SQL(AUDITED))
    return [(r[0], r[1], r[2]) for r in conn.execute(query, {"schemas": schemas}).fetchall()]


def problems(conn: psycopg.Connection[Any], schemas: list[str]) -> list[tuple[str, str]]:
    """(table, problem): problem_rows without the code."""
    return [(table, problem) for table, _, problem in problem_rows(conn, schemas)]


def unprepared(conn: psycopg.Connection[Any], schemas: list[str]) -> list[str]:
    """The audited tables capture is incomplete for (`status`: unprepared_tables). A source an
    earlier undo prepared has no undo.table_problems: every table is, until `undo init`."""
    if conn.execute("SELECT to_regprocedure('undo.table_problems(oid[])')").fetchone() == (None,):
        query = sql.SQL(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid IN ({}) ORDER BY 1"
        ).format(sql.SQL(AUDITED))
        return [r[0] for r in conn.execute(query, {"schemas": schemas}).fetchall()]
    return sorted({table for table, _ in problems(conn, schemas)})


def _tables(conn: psycopg.Connection[Any], schemas: list[str], tables: list[str]) -> list[int]:
    oids = [
        r[0]
        for r in conn.execute(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = ANY (%s) AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p'"
            " ORDER BY c.oid",
            (schemas,),
        ).fetchall()
    ]
    for name in tables:
        schema, table = names.parse(name)
        row = conn.execute(
            "SELECT c.oid, c.relpersistence FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s"
            " AND c.relkind IN ('r', 'p')",
            (schema or "public", table),
        ).fetchone()
        if row is None:
            raise NotFound(f"no table {name}: give --table as schema.table")
        if row[1] != "p":
            raise NotReady(
                f"table {name} is unlogged or temporary: its changes are not in the WAL, so"
                " it cannot be audited; run ALTER TABLE ... SET LOGGED first"
            )
        if row[0] not in oids:
            oids.append(row[0])
    return oids


#: `undo init --statements`: which statements of a transaction the tag marks (001_install.sql,
#: undo.statements_mode()): each (every change carries its own statement), first (none after
#: the first: cheaper, and every change carries the transaction's first statement)
STATEMENTS = ("each", "first")


def statements_mode(conn: psycopg.Connection[Any]) -> str | None:
    """The source's mode (undo.statements_mode()), or None where undo is not installed or was
    installed before the mode (it marks each statement, or, older still, none)."""
    if conn.execute("SELECT to_regprocedure('undo.statements_mode()')").fetchone() == (None,):
        return None
    row = conn.execute("SELECT undo.statements_mode()").fetchone()
    return str(row[0]) if row else None


def _database_name(dsn: str) -> str | None:
    """The database a DSN names, as far as it says (libpq's defaults aside)."""
    from psycopg import conninfo

    name = conninfo.conninfo_to_dict(dsn).get("dbname")
    return str(name) if name else None


def init(
    settings: Settings,
    schemas: list[str],
    tables: list[str],
    failover: bool = False,
    statements: str | None = None,
    source: str | None = None,
    reregister: bool = False,
) -> InitReport:
    """Prepare the source database and the store; idempotent. ``failover``: a slot that
    PostgreSQL 17+ keeps in step on standbys (sync_replication_slots), so capture can go on
    from a promoted standby. ``statements``: switch the tag's mode (STATEMENTS) for the whole
    database; None keeps it (each on a new install). ``source``: the name the store registers
    the source database under (default: its name); ``reregister``: give that name this
    database's identity (the same database on a new server)."""
    if statements is not None and statements not in STATEMENTS:
        raise BadInput(f"--statements must be {' or '.join(STATEMENTS)}, not {statements!r}")
    report = InitReport()
    # an existing store remembers its decoder; a new one is created only once the source passed
    # its checks, so a refused init leaves nothing behind
    name = source or _database_name(settings.dsn)
    known = None
    if exists(settings.store):
        store = open_store(settings.store, source=name)
        try:
            known = store.meta("decoder")
        finally:
            store.close()
    decoder = settings.decoder or known or "pgoutput"
    if known is not None and known != decoder:
        raise UndoError(
            f"the store at {shown(settings.store)} was made with decoder {known}: use --decoder"
            f" {known} or a new --store"
        )
    defaulted = not schemas and not tables
    if defaulted:
        schemas = ["public"]
    with pg.connect(settings.dsn) as conn, contextlib.ExitStack() as closing:
        report.warnings += pg.check_ready(conn, decoder)
        if failover and pg.server_version(conn) < 170000:
            raise NotReady(
                f"--failover needs PostgreSQL 17 or newer (failover slots); this server is"
                f" {conn.info.parameter_status('server_version')}"
            )
        # before anything is made here or in the store: never adopt another database's slot
        _refuse_foreign_slot(conn, settings.slot)
        db = open_store(settings.store, create=True, source=name)
        closing.callback(db.close)
        if reregister and source is None:
            raise BadInput("--reregister needs --source: the name of the source to re-register")
        _refuse_foreign_claim(conn, db, settings)
        switched = None
        if reregister and source is not None:
            _refuse_a_stranger(conn, db, source, settings)
            switched = _switch(conn, db, source, settings)
        db.register_source(source, *identity(conn), reregister=reregister)
        if switched is not None:
            report.changed.append(
                f"re-registered the source {source!r}: database {conn.info.dbname} of the server"
                f" with system identifier {identity(conn)[0]}"
            )
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        superuser = bool(row and row[0])
        numbers_as_strings = decoder == "wal2json" and pg.wal2json_numbers_as_strings(conn)
        installed = conn.execute("SELECT to_regproc('undo.audit_table') IS NOT NULL").fetchone()
        published_now = False  # this init made the slot's publication
        try:
            with conn.transaction():
                for _, text in migration_scripts():
                    conn.execute(text.encode())
                if not (installed and installed[0]):
                    report.changed.append("installed the undo schema and tagging function")
                if statements is not None:
                    row = conn.execute("SELECT undo.make_statements(%s)", (statements,)).fetchone()
                    if row and row[0]:
                        report.changed.append(
                            "statements first: the tag marks no statement after a transaction's"
                            " first (its changes carry the first)"
                            if statements == "first"
                            else "statements each: every change carries its own statement"
                        )
                prior = conn.execute("SELECT schemas FROM undo.config").fetchone()
                merged = sorted(set(prior[0] if prior else []) | set(schemas))
                conn.execute(
                    "INSERT INTO undo.config (schemas) VALUES (%s)"
                    " ON CONFLICT (single) DO UPDATE SET schemas = excluded.schemas",
                    (merged,),
                )
                publication = settings.slot if decoder == "pgoutput" else None
                mine = merged  # wal2json reads every table: audit all the schemas
                if publication is not None:
                    # this slot's publication keeps its own schemas; another slot's are not its
                    row = conn.execute(
                        "INSERT INTO undo.publications AS p (name, schemas) VALUES (%s, %s)"
                        " ON CONFLICT (name) DO UPDATE SET schemas = ARRAY(SELECT DISTINCT"
                        " unnest(p.schemas || excluded.schemas) ORDER BY 1) RETURNING schemas",
                        (publication, sorted(set(schemas))),
                    ).fetchone()
                    mine = list(row[0]) if row else sorted(set(schemas))
                if (
                    publication is not None
                    and conn.execute(
                        "SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)
                    ).fetchone()
                    is None
                ):
                    conn.execute(
                        sql.SQL("CREATE PUBLICATION {}").format(sql.Identifier(publication))
                    )
                    published_now = True
                    report.changed.append(f"created publication {publication}")
                if publication is not None and _publish_generated(conn, publication):
                    report.changed.append(f"publication {publication} publishes generated columns")
                for table, why in unpublishable(conn, merged):
                    report.warnings.append(f"not audited: {table} is {why}")
                count = 0
                oids = _tables(conn, mine, tables)
                for oid in oids:
                    row = conn.execute(
                        "SELECT undo.audit_table(%s::oid::regclass, %s)", (oid, publication)
                    ).fetchone()
                    count += bool(row and row[0])
                # and every other table undo audits (under an audited one, of another slot's
                # schema, named by --table before): put right, in its own publications
                for (oid,) in conn.execute(
                    "SELECT a.relid FROM undo.audited a JOIN pg_class c ON c.oid = a.relid"
                    " WHERE a.relid <> ALL (%s::oid[]) ORDER BY 1",
                    (oids,),
                ).fetchall():
                    row = conn.execute(
                        "SELECT undo.audit_table(%s::oid::regclass)", (oid,)
                    ).fetchone()
                    count += bool(row and row[0])
                if count:
                    report.changed.append(
                        f"prepared {count} table(s): REPLICA IDENTITY FULL, trigger"
                    )
                # the rules `undo check` and `status` apply (health; imported here, as it
                # reads this module)
                from undo.source.health import table_problems, unaudited_schemas

                warned = {t for t, _ in unpublishable(conn, merged)}
                for p in table_problems(conn, merged):
                    if p.subject not in warned:
                        report.warnings.append(
                            f"capture of {p.subject} is incomplete: {p.problem} (fix: {p.fix})"
                        )
                others = unaudited_schemas(conn, merged) if defaulted else []
                if others:
                    report.warnings.append(
                        "no --schema given, so schema public: tables of schema(s)"
                        f" {', '.join(others)} are not audited (`undo init --schema S` adds one)"
                    )
                if superuser:
                    # before DDL was recorded, one event trigger prepared new tables
                    conn.execute("DROP EVENT TRIGGER IF EXISTS undo_create_table")
                    conn.execute("DROP FUNCTION IF EXISTS undo.on_create_table()")
                    made = False
                    for name, event in EVENT_TRIGGERS.items():
                        if (
                            conn.execute(
                                "SELECT 1 FROM pg_event_trigger WHERE evtname = %s", (name,)
                            ).fetchone()
                            is None
                        ):
                            conn.execute(
                                sql.SQL(
                                    "CREATE EVENT TRIGGER {} ON {} EXECUTE FUNCTION {}()"
                                ).format(
                                    sql.Identifier(name),
                                    sql.Identifier(event),
                                    sql.Identifier("undo", "on_ddl"),
                                )
                            )
                            made = True
                        # ALWAYS: DDL run under session_replication_role = replica (any role
                        # granted SET on it) is recorded too; by default an event trigger is
                        # ORIGIN and stays quiet there
                        if conn.execute(
                            "SELECT 1 FROM pg_event_trigger"
                            " WHERE evtname = %s AND evtenabled <> 'A'",
                            (name,),
                        ).fetchone():
                            conn.execute(
                                sql.SQL("ALTER EVENT TRIGGER {} ENABLE ALWAYS").format(
                                    sql.Identifier(name)
                                )
                            )
                            made = True
                    if made:
                        report.changed.append(
                            "created the event triggers (ENABLE ALWAYS): new tables are audited,"
                            " DDL recorded"
                        )
                else:
                    report.warnings.append(
                        "not a superuser: no event trigger, so run `undo init` again after"
                        " creating tables"
                    )
        except psycopg.errors.InsufficientPrivilege as e:
            raise NotReady(
                f"role {conn.info.user} lacks a privilege init needs ({e.diag.message_primary}):"
                " run init as the owner of the tables or a superuser"
            ) from None
        slot = conn.execute(
            "SELECT plugin, confirmed_flush_lsn::text, wal_status,"
            " (to_jsonb(s) ->> 'failover')::boolean"  # a column of 17+
            " FROM pg_replication_slots s WHERE slot_name = %s AND database = current_database()",
            (settings.slot,),
        ).fetchone()
        position = db.meta("position")
        # a slot older than the publication this init made cannot decode a change before it
        # ("publication does not exist", for ever): made again, as a lost one, with the gap
        if slot is not None and (slot[2] == "lost" or published_now):
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (settings.slot,))
            except psycopg.errors.ObjectInUse:
                raise UndoError(
                    f"slot {settings.slot} is older than its publication, which init made now,"
                    " and a capture holds it: stop the capture and run `undo init` again"
                ) from None
            slot = None
        if slot is not None and slot[0] != decoder:
            raise UndoError(
                f"slot {settings.slot} exists with plugin {slot[0]}, not {decoder}: choose another"
                " --slot or drop it"
            )
        kept_at, was_at = switched or (None, 0)
        if slot is not None and kept_at is not None:
            # the slot kept on this server is past the store's position of the other server:
            # what this one did before the slot's position is not in the trail
            db.record_gap(
                was_at, kept_at, f"source re-registered on a new server; slot {settings.slot} kept"
            )
            db.set_meta({"position": str(kept_at)})
            report.warnings.append(
                "the source's server changed: changes before slot"
                f" {settings.slot}'s {wal.int_to_lsn(kept_at)} on this server are not in the"
                " audit trail (recorded as a gap)"
            )
        if slot is not None and failover and not slot[3]:
            with pg.connect(settings.dsn, replication="database") as rconn:
                rconn.execute(
                    sql.SQL("ALTER_REPLICATION_SLOT {} (FAILOVER true)").format(
                        sql.Identifier(settings.slot)
                    )
                )
            report.changed.append(f"slot {settings.slot} now fails over to standbys")
        if slot is None:
            try:
                row = conn.execute(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, %s, false,"
                    " false, true)"
                    if failover
                    else "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, %s)",
                    (settings.slot, decoder),
                ).fetchone()
            except psycopg.errors.DuplicateObject:
                _refuse_foreign_slot(conn, settings.slot)  # made since the check above
                raise
            assert row is not None
            new_position = wal.lsn_to_int(row[0])
            if position is not None:
                if reregister:  # two servers' positions: the gap is known by its time
                    db.record_gap(
                        int(position),
                        new_position,
                        f"source re-registered on a new server; slot {settings.slot} re-created",
                    )
                    report.warnings.append(
                        "the source's server changed: changes after the old server's"
                        f" {wal.int_to_lsn(int(position))} and before the new slot's {row[0]}"
                        " are not in the audit trail (recorded as a gap)"
                    )
                else:
                    db.record_gap(int(position), new_position, f"slot {settings.slot} re-created")
                    report.warnings.append(
                        "the slot was missing, lost or older than its publication: changes between"
                        f" {wal.int_to_lsn(int(position))} and {row[0]} are not in the audit"
                        " trail (recorded as a gap)"
                    )
            moved: dict[str, str | None] = {"position": str(new_position)}
            if position is None:  # the store's history starts here (undo table --to)
                now = conn.execute(
                    "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
                ).fetchone()
                moved["history_from"] = now[0] if now else None
            db.set_meta(moved)
            report.changed.append(f"created slot {settings.slot} ({decoder})")
        conn.execute(
            "INSERT INTO undo.slots (name, decoder) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET decoder = excluded.decoder",
            (settings.slot, decoder),
        )
        db.set_meta(
            {
                "decoder": decoder,
                "slot": settings.slot,
                "publication": settings.slot if decoder == "pgoutput" else None,
                "numbers_as_strings": "1" if numbers_as_strings else "0",
                "server_version": conn.info.parameter_status("server_version") or "",
                "settings": " ".join(f"{k}={v}" for k, v in pg.PINNED_SETTINGS.items()),
            }
        )
    return report


def uninstall(settings: Settings) -> list[str]:
    """Remove what init installed for this slot: its slot and publication; and, when no other
    slot of undo is left on the database, the triggers, event triggers, replica identities and
    the schema undo. Another slot's store still needs those: they are kept, and it says so."""
    done: list[str] = []
    with pg.connect(settings.dsn) as conn:
        if conn.execute("SELECT to_regclass('undo.audited')").fetchone() == (None,):
            return done
        # this database's slot of that name only: another database's is never dropped here
        slot = conn.execute(
            "SELECT active_pid FROM pg_replication_slots"
            " WHERE slot_name = %s AND database = current_database()",
            (settings.slot,),
        ).fetchone()
        foreign = foreign_slot(conn, settings.slot)
        if slot is not None and slot[0] is not None:
            raise UndoError(f"slot {settings.slot} is in use (pid {slot[0]}): stop `undo capture`")
        # undo.slots is new: an install no init of this version ran again knows its slots by
        # their publications only
        registered = conn.execute("SELECT to_regclass('undo.slots')").fetchone() != (None,)
        registry = "SELECT name FROM undo.publications"
        if registered:
            registry += " UNION SELECT name FROM undo.slots"
        others = [
            name
            for (name,) in conn.execute(
                sql.SQL(
                    "SELECT s.name FROM ({}) s JOIN pg_replication_slots r"
                    " ON r.slot_name = s.name AND r.database = current_database()"
                    " WHERE s.name <> %s ORDER BY 1"
                ).format(sql.SQL(registry)),
                (settings.slot,),
            ).fetchall()
        ]
        with conn.transaction():
            if others:
                _uninstall_slot(conn, settings.slot, registered, done)
                done.append(
                    "kept the triggers, REPLICA IDENTITY FULL and the schema undo: slot(s) "
                    + ", ".join(others)
                    + " still capture through them (uninstall those too to remove everything)"
                )
            else:
                _uninstall_all(conn, done)
        if slot is not None:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (settings.slot,))
            done.append(f"dropped slot {settings.slot}")
        elif foreign is not None:
            done.append(f"kept slot {settings.slot}: it {foreign}")
    return done


def _uninstall_slot(
    conn: psycopg.Connection[Any], slot: str, registered: bool, done: list[str]
) -> None:
    """Forget one slot of several: its publication (named after it) and its registrations."""
    if conn.execute("SELECT 1 FROM undo.publications WHERE name = %s", (slot,)).fetchone():
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(slot)))
        done.append(f"dropped publication {slot}")
    conn.execute("DELETE FROM undo.publications WHERE name = %s", (slot,))
    if registered:
        conn.execute("DELETE FROM undo.slots WHERE name = %s", (slot,))


def _uninstall_all(conn: psycopg.Connection[Any], done: list[str]) -> None:
    for name in ("undo_create_table", *EVENT_TRIGGERS):
        conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)))
    rows = conn.execute(
        "SELECT n.nspname, c.relname, a.prior_identity, c.relreplident"
        " FROM undo.audited a JOIN pg_class c ON c.oid = a.relid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
    ).fetchall()
    identity = {"d": "DEFAULT", "n": "NOTHING", "f": "FULL", "i": "DEFAULT"}
    for schema, name, prior, current in rows:
        rel = sql.Identifier(schema, name)
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS undo_tag ON {}").format(rel))
        if prior != current:
            conn.execute(
                sql.SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(rel, sql.SQL(identity[prior]))
            )
    done.append(f"removed the trigger from {len(rows)} table(s)")
    for (pub,) in conn.execute(
        "SELECT name FROM undo.publications UNION SELECT publication FROM undo.config"
        " WHERE publication IS NOT NULL"
    ).fetchall():
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(pub)))
        done.append(f"dropped publication {pub}")
    conn.execute("DROP SCHEMA undo CASCADE")
    done.append("dropped schema undo")
    _drop_operator_role(conn, done)


def _drop_operator_role(conn: psycopg.Connection[Any], done: list[str]) -> None:
    """Drop undo_operator, unless something still depends on it: a role belongs to the whole
    cluster, and undo in another database grants it record_undo there. PostgreSQL knows
    (SQLSTATE 2BP01): then it is kept, and so is every membership in it."""
    role = pg.OPERATOR_ROLE
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
        return
    try:
        with conn.transaction():  # a savepoint: a refusal leaves the rest of the uninstall
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    except psycopg.errors.DependentObjectsStillExist:
        done.append(
            f"kept role {role}: objects still depend on it (undo in another database of this"
            " cluster, or privileges granted to it)"
        )
    except psycopg.errors.InsufficientPrivilege:
        done.append(f"kept role {role}: role {conn.info.user} may not drop roles")
    else:
        done.append(f"dropped role {role}")
