"""`undo init --statements each|first`: with first, the tag marks no statement after a
transaction's first (the hot path's cost bought back), and every change carries the first
statement; each marks every statement. Only undo's owner switches it, for the whole database.

Real roles against a real server, both decoders; the slot is peeked for the markers.
"""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.conftest import run_cli
from undo.source.pg import session_id

TABLES = (
    "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY);"
    " CREATE TABLE c (id int PRIMARY KEY); INSERT INTO a VALUES (1, 'x'), (2, 'y');"
    " INSERT INTO c VALUES (1), (2), (3)"
)


def _messages(source):
    """The prefixes of the tags and markers waiting in undo's slot, in order (peeked: capture
    still reads them)."""
    if source.decoder == "pgoutput":
        rows = source.sql(
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
            " 'proto_version', '1', 'publication_names', %s, 'messages', 'true')"
            " WHERE get_byte(data, 0) = 77",  # 'M': flags, LSN, then the prefix
            (source.slot, source.slot),
        )
        found = [bytes(d[10:]).split(b"\0", 1)[0].decode() for (d,) in rows]
        return [p for p in found if p in ("undo", "undo.stmt")]
    rows = source.sql(
        "SELECT data::json ->> 'prefix' FROM pg_logical_slot_peek_changes(%s, NULL, NULL,"
        " 'format-version', '2') WHERE data::json ->> 'action' = 'M'",
        (source.slot,),
    )
    return [p for (p,) in rows if p in ("undo", "undo.stmt")]


def _three_statements(conn, n):
    """UPDATE a; INSERT b; DELETE c: one transaction, three top-level statements."""
    with conn.transaction():
        conn.execute(f"UPDATE a SET v = 'v{n}'")
        conn.execute(f"INSERT INTO b VALUES ({n})")
        conn.execute(f"DELETE FROM c WHERE id = {n}")


def test_first_attributes_every_change_to_the_first_statement_and_each_restores(source):
    """A session opened under each, switched to first by init: its multi-statement transaction
    emits one tag and no marker, and every change carries the first statement (change_log,
    show); status and check say first. Switched back: markers again, each change its own."""
    source.sql(TABLES)
    assert source.undo_cli("init").returncode == 0
    with source.connect(application_name="app") as conn:
        sid = session_id(conn)
        _three_statements(conn, 1)  # each: its plans made before the switch
        switched = source.undo_cli("init", "--statements", "first")
        assert switched.returncode == 0, switched.stderr
        assert "statements first" in switched.stdout
        again = source.undo_cli("init", "--statements", "first")
        assert "nothing changed" in again.stdout  # the same mode: nothing replaced
        before = len(_messages(source))
        _three_statements(conn, 2)
        assert _messages(source)[before:] == ["undo"]  # the tag; no undo.stmt
        assert source.undo_cli("init").returncode == 0  # without --statements: kept
        status = json.loads(source.undo_cli("status", "--json").stdout)
        assert status["statements"] == "first"
        check = json.loads(source.undo_cli("check", "--json").stdout)
        assert check["audits"]["statements"] == "first"
        assert any(n.startswith("statements first:") for n in check["notes"]), check["notes"]
        back = source.undo_cli("init", "--statements", "each")
        assert back.returncode == 0 and "statements each" in back.stdout, back.stdout
        before = len(_messages(source))
        _three_statements(conn, 3)
        assert _messages(source)[before:] == ["undo", "undo.stmt", "undo.stmt"]
    source.capture()
    rows = source.store_rows(
        "SELECT t.tag, c.table_name, c.op, c.statement FROM change_log c"
        " JOIN transactions t ON t.xid = c.xid ORDER BY c.id"
    )
    assert rows == [
        ("trusted", "a", "U", "UPDATE a SET v = 'v1'"),
        ("trusted", "a", "U", "UPDATE a SET v = 'v1'"),
        ("trusted", "b", "I", "INSERT INTO b VALUES (1)"),
        ("trusted", "c", "D", "DELETE FROM c WHERE id = 1"),
        ("trusted", "a", "U", "UPDATE a SET v = 'v2'"),
        ("trusted", "a", "U", "UPDATE a SET v = 'v2'"),
        ("trusted", "b", "I", "UPDATE a SET v = 'v2'"),  # first: the first statement's
        ("trusted", "c", "D", "UPDATE a SET v = 'v2'"),
        ("trusted", "a", "U", "UPDATE a SET v = 'v3'"),
        ("trusted", "a", "U", "UPDATE a SET v = 'v3'"),
        ("trusted", "b", "I", "INSERT INTO b VALUES (3)"),
        ("trusted", "c", "D", "DELETE FROM c WHERE id = 3"),
    ]
    shown = json.loads(source.undo_cli("show", "session", sid, "--json").stdout)
    assert [[c["statement"] for c in t["changes"]] for t in shown["transactions"]] == [
        [r[3] for r in rows[:4]],
        [r[3] for r in rows[4:8]],
        [r[3] for r in rows[8:]],
    ]
    status = json.loads(source.undo_cli("status", "--json").stdout)
    assert status["statements"] == "each"


def test_a_role_cannot_switch_the_mode(source):
    """A table owner (even one who may replicate) cannot make the database's tag skip its
    markers: not through init, not by calling the generator, not by replacing, renaming or
    shadowing the mode's function; her own transactions stay marked statement by statement."""
    role = f"mallory_{source.dbname}"
    source.sql(f"CREATE ROLE {role} LOGIN REPLICATION")
    source.sql(
        f"GRANT CREATE ON SCHEMA public TO {role}; GRANT CREATE ON DATABASE"
        f" {source.dbname} TO {role}"
    )
    dsn = psycopg.conninfo.make_conninfo(source.dsn, user=role)
    with psycopg.connect(dsn, autocommit=True) as m:
        m.execute(TABLES)
    assert source.undo_cli("init").returncode == 0
    result = run_cli(
        source,
        "--dsn",
        dsn,
        "--store",
        source.store + ".mallory",
        "init",
        "--statements",
        "first",
    )
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    with psycopg.connect(dsn, autocommit=True) as m:
        for attack in (
            "SELECT undo.make_statements('first')",
            "CREATE OR REPLACE FUNCTION undo.statements_mode() RETURNS text LANGUAGE sql"
            " IMMUTABLE AS $$SELECT 'first'::text$$",
            "ALTER FUNCTION undo.statements_mode() RENAME TO statements_mode_old",
            "CREATE FUNCTION undo.statements_mode(x int) RETURNS text LANGUAGE sql"
            " AS $$SELECT 'first'::text$$",
            "UPDATE pg_catalog.pg_proc SET prosrc = 'SELECT ''first''::text'"
            " WHERE oid = 'undo.statements_mode()'::regprocedure",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                m.execute(attack)
        # her own function of that name first on her path: never the one the tag calls
        m.execute("CREATE SCHEMA ms")
        m.execute(
            "CREATE FUNCTION ms.statements_mode() RETURNS text LANGUAGE sql IMMUTABLE"
            " AS $$SELECT 'first'::text$$"
        )
        m.execute("SET search_path = ms, undo, public")
        before = len(_messages(source))
        _three_statements(m, 1)
    assert _messages(source)[before:] == ["undo", "undo.stmt", "undo.stmt"]
    assert source.sql("SELECT undo.statements_mode()") == [("each",)]
    source.capture()
    assert source.store_rows(
        "SELECT t.tag, c.statement FROM change_log c JOIN transactions t ON t.xid = c.xid"
        " WHERE c.table_name IN ('b', 'c') ORDER BY c.id"
    ) == [
        ("trusted", "INSERT INTO b VALUES (1)"),
        ("trusted", "DELETE FROM c WHERE id = 1"),
    ]
