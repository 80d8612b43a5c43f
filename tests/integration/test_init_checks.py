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
