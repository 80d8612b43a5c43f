"""Connections to the source database and the checks that it is ready for undo."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import psycopg

from undo.core import names
from undo.core.config import masked_dsn
from undo.core.errors import DatabaseUnreachable, NotReady
from undo.core.wal import int_to_lsn

log = logging.getLogger(__name__)

#: Settings that change the text of values. Pinned on every connection undo opens, so that
#: role or database defaults (bytea_output=escape, DateStyle='SQL, DMY', ...) change nothing.
PINNED_SETTINGS = {
    "DateStyle": "ISO",
    "TimeZone": "UTC",
    "IntervalStyle": "postgres",
    "bytea_output": "hex",
    "extra_float_digits": "3",
}
PINNED_OPTIONS = " ".join(f"-c {k}={v}" for k, v in PINNED_SETTINGS.items())
#: The search_path undo's own SQL runs under wherever it runs as the operator on the source (the
#: undo transaction, the printed script, a rewind's reads): pg_catalog first and pg_temp last,
#: explicitly, so that no function, operator or type of another schema's (a role with CREATE on
#: a schema of the operator's path: public on PostgreSQL 14) can stand in for pg_catalog's (an
#: exact-type public.concat(integer) beats pg_catalog.concat(VARIADIC "any")). pg_temp is never
#: searched for functions or operators; listed last it cannot shadow a table or a type either.
PINNED_PATH = "pg_catalog, pg_temp"
#: its statement, the first of every transaction of undo's on the source (SET LOCAL: a
#: transaction's own; the script's too)
PIN_PATH = "SET LOCAL search_path = " + PINNED_PATH
#: connection options of undo's own transactions on the source: the pinned settings, and the
#: path pinned for the session too (SET LOCAL ends with a rollback; this does not)
PINNED_PATH_OPTIONS = PINNED_OPTIONS + " -c search_path=" + PINNED_PATH.replace(" ", "")
#: The role whose members may undo (call undo.record_undo); made by init (002_ledger.sql).
OPERATOR_ROLE = "undo_operator"


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """Open a connection with the pinned settings; an unreachable server is a one-line error."""
    kwargs.setdefault("options", PINNED_OPTIONS)
    kwargs.setdefault("autocommit", True)
    try:
        return psycopg.connect(dsn, **kwargs)
    except psycopg.OperationalError as e:
        raise DatabaseUnreachable(
            f"cannot connect to {masked_dsn(dsn)}: {connect_failure(e)} (set --dsn or UNDO_DSN)"
        ) from None


def connect_failure(e: Exception) -> str:
    r"""libpq's complaint about a failed connection as one line: what failed (the first line),
    with its hint (the tab-indented line after it) in parentheses.

    >>> connect_failure(Exception("connection failed: port 1 failed: refused\n\tIs it up?"))
    'port 1 failed: refused (is it up?)'
    """
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0].removeprefix("connection failed: ")
    hint = lines[1] if len(lines) > 1 and str(e).strip().splitlines()[1].startswith("\t") else ""
    return f"{first} ({hint[:1].lower()}{hint[1:]})" if hint else first


def pin_path(conn: psycopg.Connection[Any]) -> None:
    """Pin the search_path (PINNED_PATH) before anything else runs on ``conn``: for its
    transaction (opened by this statement) or, on an autocommit connection, its session."""
    conn.execute(PIN_PATH if not conn.autocommit else "SET search_path = " + PINNED_PATH)


def resolve_tables(conn: psycopg.Connection[Any], tables: Iterable[str]) -> list[int | None]:
    """OIDs of tables named as the operator's SQL names them (their search_path), None where
    there is none. Safe under any path: the function is schema-qualified and its argument
    exactly typed, so no other schema's function can be chosen; nothing else is called."""
    out: list[int | None] = []
    for t in tables:
        names.parse(t)  # a malformed name is bad input here, not an error of the server's
        row = conn.execute(
            "SELECT pg_catalog.to_regclass(%s::pg_catalog.text)::pg_catalog.oid", (t,)
        ).fetchone()
        out.append(None if row is None or row[0] is None else int(row[0]))
    return out


def wal_after(conn: psycopg.Connection[Any], position: int) -> int:
    """Bytes of WAL the server has written past a position (0 if it is not past it)."""
    row = conn.execute(
        "SELECT greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn), 0)::bigint",
        (int_to_lsn(position),),
    ).fetchone()
    return int(row[0]) if row else 0


def server_version(conn: psycopg.Connection[Any]) -> int:
    return int(conn.info.server_version)


def check_ready(conn: psycopg.Connection[Any], decoder: str) -> list[str]:
    """Refuse, with the fix spelled out, what would stop capture; return warnings."""
    warnings: list[str] = []
    if server_version(conn) < 140000:
        raise NotReady(f"PostgreSQL {conn.info.server_version} is too old: undo needs 14 or newer")
    row = conn.execute("SHOW wal_level").fetchone()
    if row is None or row[0] != "logical":
        raise NotReady(
            f"wal_level is {row[0] if row else '?'}, not logical: run "
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
        )
    priv = conn.execute(
        "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if priv is None or not (priv[0] or priv[1]):
        raise NotReady(
            "the role may not use replication: run ALTER ROLE "
            f"{conn.info.user} REPLICATION; (as a superuser)"
        )
    if decoder == "wal2json" and not wal2json_numbers_as_strings(conn):
        warnings.append(
            "this server's wal2json is older than 2.6: it sends NaN and Infinity of float and "
            "numeric columns as null, so undo cannot restore those values; use the default "
            "decoder pgoutput or upgrade wal2json"
        )
    return warnings


def wal2json_numbers_as_strings(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server's wal2json knows numeric-data-types-as-string (2.6+).

    Probes on a temporary slot; a missing wal2json is refused with the fix.
    """
    probe = f"undo_probe_{conn.info.backend_pid}"
    try:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json', true)", (probe,))
    except psycopg.errors.UndefinedFile:
        major = server_version(conn) // 10000
        raise NotReady(
            "the wal2json decoder is not installed on the server: run "
            f"apt-get install postgresql-{major}-wal2json (or use --decoder pgoutput)"
        ) from None
    try:
        conn.execute(
            "SELECT count(*) FROM pg_logical_slot_peek_changes(%s, NULL, 0,"
            " 'format-version', '2', 'numeric-data-types-as-string', '1')",
            (probe,),
        )
        return True
    except psycopg.Error:
        return False
    finally:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s",
            (probe,),
        )


def session_id(conn: psycopg.Connection[Any]) -> str:
    """This connection's session id: the %c of log_line_prefix, as the tag records it."""
    row = conn.execute(
        "SELECT to_hex(trunc(extract(epoch FROM backend_start))::bigint) || '.' || to_hex(pid)"
        " FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    ).fetchone()
    assert row is not None
    return str(row[0])


def with_partitions(conn: psycopg.Connection[Any], tables: Iterable[str]) -> tuple[str, ...]:
    """Table names as the stream knows them: a name of the source's that is a partitioned table
    becomes its leaf partitions (their changes are what the stream carries), quoted; any other
    name is kept as given. Names are resolved on the operator's search_path (resolve_tables),
    then the path is pinned (pin_path) for the rest: ``conn`` keeps it."""
    tables = list(tables)
    oids = resolve_tables(conn, tables)
    pin_path(conn)
    out: list[str] = []
    for t, oid in zip(tables, oids, strict=True):
        rows = (
            conn.execute(
                "SELECT n.nspname, c.relname FROM pg_partition_tree(%s::oid::regclass) p"
                " JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE p.isleaf AND (SELECT relkind FROM pg_class WHERE oid = %s::oid) = 'p'"
                " ORDER BY 1, 2",
                (oid, oid),
            ).fetchall()
            if oid is not None
            else []
        )
        out += [names.quote(schema, name) for schema, name in rows] or [t]
    return tuple(out)
