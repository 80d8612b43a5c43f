"""`undo init` refuses, with the fix spelled out, a database that is not ready."""

from __future__ import annotations

import os

import psycopg

from tests.conftest import run_cli
from undo.tempdb import TempCluster


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
