"""`undo init` refuses, with the fix spelled out, a database that is not ready."""

from __future__ import annotations

import os
import sqlite3

import psycopg

from tests.conftest import run_cli
from undo.demo.cluster import TempCluster


def test_wal_level_not_logical_is_refused_with_the_fix(cluster, tmp_path, pgo):
    with TempCluster({"wal_level": "replica"}) as other:
        src = type(pgo)(
            other.dsn("postgres"),
            "postgres",
            str(tmp_path / "s.db"),
            "undo_x",
            "pgoutput",
            pgo.cluster,
        )
        result = run_cli(src, "init")
    assert result.returncode == 1
    assert "wal_level is replica" in result.stderr and "ALTER SYSTEM SET wal_level" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "s.db").exists()


def test_role_without_replication_is_refused_with_the_fix(pgo):
    role = f"plain_{pgo.dbname}"
    pgo.sql(f"CREATE ROLE {role} LOGIN")
    params = dict(psycopg.conninfo.conninfo_to_dict(pgo.dsn), user=role)
    result = run_cli(pgo, "--dsn", psycopg.conninfo.make_conninfo("", **params), "init")
    assert result.returncode == 1
    assert f"ALTER ROLE {role} REPLICATION" in result.stderr
    assert pgo.sql("SELECT to_regnamespace('undo')") == [(None,)]
    assert not os.path.exists(pgo.store)


def test_failover_slot_where_the_server_has_them(pgo):
    """17+: init --failover makes a failover slot (and turns an existing one into one); older
    servers refuse it in one line, before anything is installed."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    if int(pgo.sql("SHOW server_version_num")[0][0]) < 170000:
        result = pgo.undo_cli("init", "--failover")
        assert result.returncode == 1 and "--failover needs PostgreSQL 17" in result.stderr
        assert result.stderr.count("\n") == 1
        assert pgo.sql("SELECT to_regnamespace('undo')") == [(None,)]
        assert not os.path.exists(pgo.store)
        return
    assert pgo.undo_cli("init").returncode == 0
    failover = "SELECT failover FROM pg_replication_slots WHERE slot_name = %s"
    assert pgo.sql(failover, (pgo.slot,)) == [(False,)]
    result = pgo.undo_cli("init", "--failover")
    assert result.returncode == 0 and "fails over" in result.stdout
    assert pgo.sql(failover, (pgo.slot,)) == [(True,)]


def test_two_slots_on_one_database_keep_their_own_publications(pgo, tmp_path):
    """A second init with another --slot used to overwrite the one publication setting: tables
    created afterwards went only to the new publication, and the first store missed them."""
    from dataclasses import replace

    from undo.source.install import init
    from undo.stream.capture import capture

    pgo.sql(
        "CREATE SCHEMA a; CREATE SCHEMA b; CREATE TABLE a.t (id int PRIMARY KEY);"
        " CREATE TABLE b.t (id int PRIMARY KEY)"
    )
    first = pgo.settings
    second = replace(first, slot=f"{first.slot}_2", store=str(tmp_path / "second.db"))
    init(first, ["a"], [])
    init(second, ["b"], [])
    init(first, ["a"], [])  # again: changes nothing of the second's
    pgo.sql("CREATE TABLE a.later (id int PRIMARY KEY); CREATE TABLE b.later (id int PRIMARY KEY)")
    for schema in ("a", "b"):
        pgo.sql(f"INSERT INTO {schema}.t VALUES (1); INSERT INTO {schema}.later VALUES (1)")
    for s in (first, second):
        capture(s, once=True)
    stored = (
        "SELECT DISTINCT r.schema_name || '.' || r.table_name FROM changes c"
        " JOIN relations r ON r.id = c.relation ORDER BY 1"
    )
    assert pgo.store_rows(stored) == [("a.later",), ("a.t",)]
    with sqlite3.connect(second.store) as c:
        assert c.execute(stored).fetchall() == [("b.later",), ("b.t",)]


def test_uninstalling_one_of_two_slots_keeps_what_the_other_captures_through(pgo, tmp_path):
    """--uninstall of one slot used to drop the triggers, the key, the replica identities and
    the schema undo that a second slot's store still captured through: its writes went on
    untagged and its updates and deletes without old rows. Now only the last one removes them."""
    from dataclasses import replace

    from undo.source.install import init, uninstall
    from undo.stream.capture import capture

    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a')")
    first = pgo.settings
    second = replace(first, slot=f"{first.slot}_2", store=str(tmp_path / "second.db"))
    init(first, ["public"], [])
    init(second, ["public"], [])
    done = uninstall(first)
    assert any("kept the triggers" in line and second.slot in line for line in done), done
    assert pgo.sql(
        "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
    ) == [(second.slot,)]
    assert pgo.sql("SELECT pubname FROM pg_publication") == [(second.slot,)]
    with pgo.connect(application_name="after") as c:
        c.execute("UPDATE t SET v = 'b'")
    capture(second, once=True)
    with sqlite3.connect(second.store) as c:
        assert c.execute(
            "SELECT t.tag, t.application_name, ch.old FROM changes ch"
            " JOIN transactions t ON t.id = ch.txn"
        ).fetchall() == [("trusted", "after", '["1","a"]')]
    done = uninstall(second)
    assert "dropped schema undo" in done, done
    assert pgo.sql(
        "SELECT to_regnamespace('undo') IS NULL, (SELECT relreplident FROM pg_class"
        " WHERE relname = 't'), (SELECT count(*) FROM pg_trigger WHERE tgname = 'undo_tag')"
    ) == [(True, "d", 0)]
