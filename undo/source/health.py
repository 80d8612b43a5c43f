"""What is wrong with capture, each with its fix: one definition for `undo check`, `undo
status` (`problems`, `unprepared_tables`) and `undo init` (its warnings).

The rules only; the numbers they judge (lag, the slot's row) are gathered by source/status.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql

from undo.core import wal
from undo.core.config import Settings
from undo.source import install
from undo.store import recovery, shown
from undo.store.api import StatusGap, Store


@dataclass(frozen=True)
class Problem:
    """One thing that makes the audit trail incomplete now, or soon."""

    check: str  # table, slot, publication, decoder, lag, gap, store, install
    subject: str  # what it is about: a table, the slot, the store
    problem: str
    fix: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


#: the fix for each code of undo.table_problems (install.problem_rows)
_TABLE_FIXES = {
    "unlogged": "ALTER TABLE {t} SET LOGGED; then `undo init`",
    "identity": "`undo init` (it sets REPLICA IDENTITY FULL on {t} again)",
    "trigger": "`undo init` (it makes undo's trigger on {t} again)",
    "descendant": "`undo init` audits it where it can; else take it out from under {t}"
    " (ALTER TABLE ... NO INHERIT, ALTER TABLE {t} DETACH PARTITION ...) or SET LOGGED",
}


def table_problems(conn: psycopg.Connection[Any], schemas: list[str]) -> list[Problem]:
    """The audited tables capture is incomplete for (undo.table_problems), with their fixes. A
    source an earlier undo prepared has no undo.table_problems: that is the one problem."""
    if conn.execute("SELECT to_regprocedure('undo.table_problems(oid[])')").fetchone() == (None,):
        return [
            Problem(
                "install",
                conn.info.dbname,
                "undo's SQL in this database is older than this undo (no undo.table_problems):"
                " what it checks is unknown",
                "`undo init` (as a superuser)",
            )
        ]
    return [
        Problem("table", table, problem, _TABLE_FIXES.get(code, "`undo init`").format(t=table))
        for table, code, problem in install.problem_rows(conn, schemas)
    ]


def unaudited_schemas(conn: psycopg.Connection[Any], schemas: list[str]) -> list[str]:
    """Schemas holding tables that are not in the audited ones (a `billing` beside `public`):
    init audits `public` when given no --schema, and says nothing of the others otherwise."""
    return [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT n.nspname FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
            " AND c.relpersistence = 'p' AND n.nspname <> ALL (%s)"
            " AND n.nspname NOT IN ('undo', 'information_schema')"
            " AND n.nspname !~ '^pg_' ORDER BY 1",
            (schemas,),
        ).fetchall()
    ]


#: what capture calls its replication connection, so that another process can say which
#: capture holds the slot (the server knows only its walsender's pid)
_CAPTURE = re.compile(r"undo capture pid (\d+) on (.+)")


def capture_application_name() -> str:
    return f"undo capture pid {os.getpid()} on {socket.gethostname()}"[:63]


def slot_holder(conn: psycopg.Connection[Any], walsender_pid: int) -> tuple[str, bool]:
    """Who holds a slot, as far as the server can say, and whether it is a capture of this
    machine that has exited. The slot knows only the pid of the walsender serving it;
    pg_stat_replication adds that connection's application_name (where an `undo capture`
    says its own pid and host), client address and port (-1: a Unix socket) and start. A
    role without pg_read_all_stats sees none of those for another role's connection."""
    row = conn.execute(
        "SELECT application_name, client_addr::text, client_port, backend_start"
        " FROM pg_stat_replication WHERE pid = %s",
        (walsender_pid,),
    ).fetchone()
    if row is None:
        return f"walsender pid {walsender_pid}, which has no replication connection now", False
    app, addr, port, started = row
    if addr:
        where = f"{addr} port {port}"
    else:
        where = "a Unix socket" if port == -1 else "a client this role may not see"
    since = f", since {started:%Y-%m-%d %H:%M:%S}" if started else ""
    m = _CAPTURE.fullmatch(app or "")
    if m is None:
        return (
            f"walsender pid {walsender_pid} serving application {app or ''!r} from {where}{since}"
            " (the server does not know its client's own pid)"
        ), False
    pid, host = int(m.group(1)), m.group(2)
    gone = host == socket.gethostname() and not _alive(pid)
    return (
        f"undo capture pid {pid} on {host} (from {where}{since}; walsender pid {walsender_pid})",
        gone,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def corrupt(store: str, what: str) -> Problem:
    """The store is malformed (it says so itself)."""
    return Problem(
        "store",
        store,
        what,
        f"stop capture; move the store aside, and either restore a copy or {recovery(store)}",
    )


@dataclass
class Health:
    """What a store audits (``audits``), what is wrong (``problems``), and what is worth
    knowing but needs nothing done (``notes``)."""

    audits: dict[str, Any]
    problems: list[Problem]
    notes: list[str]


def event_triggers(
    conn: psycopg.Connection[Any], problems: list[Problem], notes: list[str]
) -> None:
    """init's event triggers (install.EVENT_TRIGGERS), which prepare a table created later
    and record DDL. None at all: a non-superuser init, which warned; a note, since what is
    audited now is whole (a table created since is a table problem). Some, or one disabled
    or calling another function: someone undid a superuser's init; a problem."""
    found = {
        name: (event, enabled, function)
        for name, event, enabled, function in conn.execute(
            "SELECT evtname, evtevent, evtenabled,"
            " CASE WHEN evtfoid <> 'undo.on_ddl'::regproc THEN evtfoid::regproc::text END"
            " FROM pg_event_trigger WHERE evtname = ANY(%s)",
            (list(install.EVENT_TRIGGERS),),
        )
    }
    if not found:
        notes.append(
            "no event trigger (init ran without superuser): a table created from now on is not"
            " audited until `undo init` runs again (run it after creating tables, or once as a"
            " superuser)"
        )
        return
    for name, event in install.EVENT_TRIGGERS.items():
        fix = "`undo init` as a superuser"
        if name not in found:
            problem = f"event trigger {name} is missing: tables created now are not audited"
        elif found[name][2] is not None or found[name][0] != event:
            calls = found[name][2] or "undo.on_ddl"
            problem = f"event trigger {name} is not undo's (on {found[name][0]}, calls {calls})"
            fix = f"DROP EVENT TRIGGER {name}; then {fix}"
        elif found[name][1] != "A":
            problem = f"event trigger {name} is not ENABLE ALWAYS: DDL can go unrecorded"
        else:
            continue
        problems.append(Problem("event trigger", name, problem, fix))


def judge(
    conn: psycopg.Connection[Any],
    db: Store,
    settings: Settings,
    slot: tuple[Any, ...] | None,
    lag: dict[str, Any],
    max_lag: float | None,
    gaps: Sequence[StatusGap],
    deep: bool,
) -> Health:
    """The checks, on what status gathered: ``slot`` (pg_replication_slots' row of that name:
    confirmed_flush_lsn, wal_status, active_pid, WAL held, database, whether it is this
    database's, plugin), ``lag`` (status.lag), ``gaps`` (the store's status). ``max_lag``: lag
    seconds over it is a problem (None: lag is not judged). ``deep``: SQLite's quick_check of
    the store too (it reads every page)."""
    problems: list[Problem] = []
    notes: list[str] = []
    store_slot = db.meta("slot")
    decoder = db.meta("decoder") or "pgoutput"
    publication = db.meta("publication") if decoder == "pgoutput" else None
    database = conn.info.dbname
    audits: dict[str, Any] = {
        "database": database,
        "server_version": conn.info.parameter_status("server_version"),
        "store": shown(settings.store),
        "slot": settings.slot,
        "slot_database": None if slot is None else slot[4],
        "decoder": decoder,
        "publication": publication,
        "schemas": [],
        "tables": [],
    }
    # the store
    not_its_slot = store_slot is not None and store_slot != settings.slot
    if not_its_slot:
        problems.append(
            Problem(
                "store",
                shown(settings.store),
                f"the store belongs to slot {store_slot}, not {settings.slot}",
                f"--slot {store_slot} (or the store of slot {settings.slot})",
            )
        )
    if deep:
        problems += [
            corrupt(settings.store, f"{db.engine}'s quick_check: {x}") for x in db.quick_check()
        ]
    notes += db.notes()
    # the source
    if conn.execute("SELECT to_regclass('undo.config')").fetchone() == (None,):
        problems.append(
            Problem(
                "install", database, f"undo is not installed in database {database}", "`undo init`"
            )
        )
        return Health(audits, problems, notes)
    row = conn.execute("SELECT schemas FROM undo.config").fetchone()
    schemas = list(row[0]) if row else []
    audits["schemas"] = schemas
    # which statements the tag marks (undo init --statements): first attributes each change
    # to its transaction's first statement
    audits["statements"] = install.statements_mode(conn)
    if audits["statements"] == "first":
        notes.append(
            "statements first: a change made by a transaction's later statement is shown with"
            " its first statement (`undo init --statements each` marks every statement)"
        )
    if publication is not None:
        row = conn.execute(
            "SELECT schemas FROM undo.publications WHERE name = %s", (publication,)
        ).fetchone()
        audits["publication_schemas"] = list(row[0]) if row else []
    audits["tables"] = [
        r[0]
        for r in conn.execute(
            sql.SQL(
                "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid IN ({}) ORDER BY 1"
            ).format(sql.SQL(install.AUDITED)),
            {"schemas": schemas},
        ).fetchall()
    ]
    problems += table_problems(conn, schemas)
    for table, why in install.unpublishable(conn, schemas):
        notes.append(f"not audited: {table} is {why}")
    others = unaudited_schemas(conn, schemas)
    if others:
        notes.append(
            f"schemas not audited: {', '.join(others)} (hold tables; `undo init --schema S`"
            " audits one)"
        )
    event_triggers(conn, problems, notes)
    # the slot: only the store's own; another's state (missing, another database's) would
    # ask for a fix of a slot the store never used, beside the right one (--slot above)
    if not_its_slot:
        pass
    elif slot is None:
        problems.append(
            Problem(
                "slot",
                settings.slot,
                f"replication slot {settings.slot} does not exist: nothing is captured",
                "`undo init` (it makes a new slot and records the gap)",
            )
        )
    elif not slot[5]:
        whose = install.foreign_slot(conn, settings.slot) or "is another database's"
        problems.append(
            Problem(
                "slot",
                settings.slot,
                f"replication slot {settings.slot} {whose}, not {database}'s (slot names are"
                " per cluster)",
                f"--slot {install.free_slot_name(conn)} with `undo init` (a new store)",
            )
        )
    else:
        confirmed, wal_status, active_pid, held, _, _, plugin = slot
        audits["slot_plugin"] = plugin
        if wal_status == "lost":
            problems.append(
                Problem(
                    "slot",
                    settings.slot,
                    f"replication slot {settings.slot} was invalidated (max_slot_wal_keep_size):"
                    " the WAL it needed is gone",
                    "`undo init` (it makes a new slot and records the gap)",
                )
            )
        if plugin != decoder:
            problems.append(
                Problem(
                    "decoder",
                    settings.slot,
                    f"the slot decodes with {plugin}, the store was made with {decoder}",
                    f"`undo init --decoder {decoder} --slot NEW` (a slot of the store's decoder)",
                )
            )
        position = int(db.meta("position") or 0)
        if confirmed and wal.lsn_to_int(confirmed) > position:
            problems.append(
                Problem(
                    "slot",
                    settings.slot,
                    f"the slot is at {confirmed}, ahead of the store at"
                    f" {wal.int_to_lsn(position)}: the changes between are lost to this store,"
                    " and capture refuses to go on",
                    "`undo capture --accept-gap` (it records the gap)",
                )
            )
        if active_pid is None:
            notes.append(f"no capture holds slot {settings.slot} now")
        else:
            notes.append(f"slot {settings.slot} is held by {slot_holder(conn, active_pid)[0]}")
        notes.append(f"the slot holds {held or 0:,} bytes of WAL back")
        if max_lag is not None and (lag.get("lag_seconds") or 0) > max_lag:
            problems.append(
                Problem(
                    "lag",
                    settings.slot,
                    f"the oldest commit not yet stored is {lag['lag_seconds']:,.0f} s old"
                    f" (over --max-lag {max_lag:,.0f} s)",
                    "start `undo capture` (nothing holds the slot)"
                    if active_pid is None
                    else "capture is running but behind: see its log lines (changes/s, lag)",
                )
            )
        if lag.get("lag_seconds") is None:
            notes.append("lag unknown: the slot could not be peeked (held, or no privilege)")
    if publication is not None:
        if (
            conn.execute(
                "SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)
            ).fetchone()
            is None
        ):
            problems.append(
                Problem(
                    "publication",
                    publication,
                    f"publication {publication} does not exist: pgoutput sends nothing",
                    "`undo init`",
                )
            )
        else:
            for (table,) in conn.execute(
                sql.SQL(
                    "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE c.oid IN ({}) AND c.relkind = 'r' AND n.nspname = ANY (%(mine)s)"
                    " AND NOT EXISTS (SELECT 1 FROM pg_publication_tables p"
                    "  WHERE p.pubname = %(pub)s AND p.schemaname = n.nspname"
                    "  AND p.tablename = c.relname) ORDER BY 1"
                ).format(sql.SQL(install.AUDITED)),
                {
                    "schemas": schemas,
                    "mine": audits.get("publication_schemas", []),
                    "pub": publication,
                },
            ).fetchall():
                problems.append(
                    Problem(
                        "publication",
                        table,
                        f"{table} is not in publication {publication}: its changes are not sent",
                        "`undo init`",
                    )
                )
    if decoder == "wal2json" and db.meta("numbers_as_strings") != "1":
        notes.append(
            "wal2json older than 2.6: NaN and Infinity of float and numeric columns are stored"
            " as null and cannot be restored"
        )
    # the trail
    for gap in gaps:
        if gap.to_lsn is not None:
            continue
        if gap.kind == "table":
            table = gap.table or "?"
            problems.append(
                Problem(
                    "gap",
                    table,
                    f"capture of {table} is incomplete since {gap.at} ({gap.reason})",
                    "put the table right (its problem above; `undo init` does what it can):"
                    " the gap closes with the DDL that does",
                )
            )
        else:
            problems.append(
                Problem(
                    "gap",
                    settings.slot,
                    f"the audit trail has an open gap since {gap.at} ({gap.reason})",
                    "`undo init` (a new slot), then `undo capture`",
                )
            )
    closed = sum(1 for g in gaps if g.to_lsn is not None)
    if closed:
        notes.append(
            f"{closed} closed gap(s) in the history (status lists them; rewinds refuse to"
            " cross them)"
        )
    return Health(audits, problems, notes)
