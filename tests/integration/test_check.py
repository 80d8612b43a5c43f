"""`undo check` (like `pgbackrest check`): what a store audits, what is wrong with each fix,
exit 1 when anything is, 0 when healthy; the same rules as `status` and `init` (health.py).
Every fault is made on a real server."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.conftest import Source, run_cli
from tests.integration.test_bad_input import corrupt_copy


def _check(src: Source, *args: str) -> tuple[int, dict[str, Any]]:
    done = src.undo_cli("check", "--json", *args)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def _problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["check"], p["subject"]) for p in doc["problems"]]


def _shop(src: Source) -> None:
    src.sql(
        "CREATE SCHEMA billing; CREATE TABLE billing.invoices (id int PRIMARY KEY, total numeric);"
        " CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE other (id int)"
    )
    src.init(["public", "billing"])
    src.sql("INSERT INTO t VALUES (1, 'a')")
    src.capture()


def test_a_healthy_source_is_ok_and_says_what_it_audits(source):
    _shop(source)
    code, doc = _check(source)
    assert code == 0 and doc["ok"] and doc["problems"] == [], doc
    audits = doc["audits"]
    assert audits["database"] == source.dbname and audits["slot"] == source.slot
    assert audits["slot_database"] == source.dbname and audits["decoder"] == source.decoder
    assert audits["schemas"] == ["billing", "public"]
    assert audits["tables"] == ["billing.invoices", "public.other", "public.t"]
    assert audits["publication"] == (source.slot if source.decoder == "pgoutput" else None)
    text = source.undo_cli("check")
    assert text.returncode == 0 and text.stdout.splitlines()[-1] == "ok: nothing wrong"
    assert f"slot {source.slot} (database {source.dbname})" in text.stdout


def test_each_fault_of_the_tables_with_its_fix_and_the_same_in_status(pgo):
    """Missing trigger, a trigger replaced by an impostor, identity not FULL, a table taken out
    of the publication; and the open gap that DDL left once captured."""
    _shop(pgo)
    pgo.sql(
        "CREATE FUNCTION nothing() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'"
    )
    pgo.sql("DROP TRIGGER undo_tag ON t")
    pgo.sql(
        "CREATE OR REPLACE TRIGGER undo_tag BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON"
        " billing.invoices FOR EACH STATEMENT EXECUTE FUNCTION nothing()"
    )
    pgo.sql("ALTER TABLE billing.invoices ENABLE ALWAYS TRIGGER undo_tag")
    pgo.sql("ALTER TABLE other REPLICA IDENTITY DEFAULT")
    pgo.sql(
        sql.SQL("ALTER PUBLICATION {} DROP TABLE t")
        .format(sql.Identifier(pgo.slot))
        .as_string(None)
    )
    code, doc = _check(pgo)
    assert code == 1 and not doc["ok"]
    found = {(p["check"], p["subject"]): p for p in doc["problems"]}
    assert "undo_tag trigger" in found[("table", "public.t")]["problem"]
    assert "undo init" in found[("table", "public.t")]["fix"]
    assert "undo_tag trigger" in found[("table", "billing.invoices")]["problem"]
    assert "REPLICA IDENTITY FULL" in found[("table", "public.other")]["fix"]
    assert "not in publication" in found[("publication", "public.t")]["problem"]
    # status: the same problems, by the same code
    status = json.loads(pgo.undo_cli("status", "--json").stdout)
    assert [p for p in status["problems"] if p["check"] == "table"] == [
        p for p in doc["problems"] if p["check"] == "table"
    ]
    # captured, the DDL left open gaps: problems too, until put right
    pgo.capture()
    _, doc = _check(pgo)
    assert ("gap", "public.t") in _problems(doc) and ("gap", "public.other") in _problems(doc)
    text = pgo.undo_cli("check").stdout
    assert "PROBLEM   public.t: the undo_tag trigger" in text and "  fix:    `undo init`" in text
    # init puts it all right, and says how in its warnings when it cannot
    pgo.init(["public", "billing"])
    pgo.capture()
    code, doc = _check(pgo)
    assert code == 0, doc["problems"]


def test_an_unlogged_table_where_postgresql_allows_it(source):
    if source.decoder == "pgoutput":
        pytest.skip("a published table cannot become unlogged (pgoutput)")
    _shop(source)
    source.sql("ALTER TABLE t SET UNLOGGED")
    code, doc = _check(source)
    assert code == 1
    (p,) = [p for p in doc["problems"] if p["check"] == "table"]
    assert p["subject"] == "public.t" and p["problem"].startswith("unlogged")
    assert p["fix"] == "ALTER TABLE public.t SET LOGGED; then `undo init`"


def test_the_slot_missing_or_another_databases(pgo, cluster):
    _shop(pgo)
    pgo.sql("SELECT pg_drop_replication_slot(%s)", (pgo.slot,))
    code, doc = _check(pgo)
    assert code == 1 and ("slot", pgo.slot) in _problems(doc)
    assert "does not exist" in doc["problems"][0]["problem"]
    other = f"{pgo.dbname}_other"
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    try:
        with psycopg.connect(cluster.dsn(other), autocommit=True) as c:
            c.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (pgo.slot,))
        code, doc = _check(pgo)
        assert code == 1
        (p,) = [p for p in doc["problems"] if p["check"] == "slot"]
        assert f"belongs to database {other}" in p["problem"] and "--slot undo_" in p["fix"]
        assert doc["audits"]["slot_database"] == other
    finally:
        with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
            c.execute("SELECT pg_drop_replication_slot(%s)", (pgo.slot,))
            c.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(other)))


def test_a_store_checked_with_another_slot_has_one_fix(pgo, cluster):
    """A store made with --slot w2j, checked without --slot: the fix is `--slot w2j`, and
    nothing about the slot named by mistake (it said `--slot undo_w2j` with `undo init`, a new
    store, beside it), whether that slot is missing or another database's."""
    _shop(pgo)
    wrong = f"{pgo.slot}_not"
    code, doc = _check(pgo, "--slot", wrong)
    assert code == 1 and _problems(doc) == [("store", pgo.store)], doc["problems"]
    assert doc["problems"][0]["fix"].startswith(f"--slot {pgo.slot} ")
    other = f"{pgo.dbname}_other"
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    try:
        with psycopg.connect(cluster.dsn(other), autocommit=True) as c:
            c.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (wrong,))
        code, doc = _check(pgo, "--slot", wrong)
        assert code == 1 and _problems(doc) == [("store", pgo.store)], doc["problems"]
        assert doc["problems"][0]["fix"].startswith(f"--slot {pgo.slot} ")
    finally:
        with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
            c.execute("SELECT pg_drop_replication_slot(%s)", (wrong,))
            c.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(other)))


def test_lag_over_max_lag(pgo):
    _shop(pgo)
    pgo.sql("INSERT INTO t VALUES (2, 'b')")  # not captured: nothing holds the slot
    time.sleep(2.5)
    code, doc = _check(pgo, "--max-lag", "2s")
    assert code == 1 and ("lag", pgo.slot) in _problems(doc)
    (p,) = [p for p in doc["problems"] if p["check"] == "lag"]
    assert "start `undo capture`" in p["fix"] and doc["lag_seconds"] > 2
    code, doc = _check(pgo)  # the default, 5 minutes
    assert code == 0, doc["problems"]
    bad = pgo.undo_cli("check", "--max-lag", "soon")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_a_store_sqlite_reports_malformed(pgo, tmp_path: Path):
    _shop(pgo)
    pgo.sql("INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(2, 3000) g")
    pgo.capture()
    broken = corrupt_copy(pgo, tmp_path)
    done = pgo.undo_cli("check", "--json", "--store", str(broken))
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    stores = [p for p in doc["problems"] if p["check"] == "store"]
    assert stores and all(p["subject"] == str(broken) for p in stores)
    assert ".recover" in stores[0]["fix"]


def test_init_without_schema_says_which_schemas_it_leaves_out(pgo):
    pgo.sql(
        "CREATE SCHEMA billing; CREATE TABLE billing.tax (id int PRIMARY KEY);"
        " CREATE TABLE t (id int PRIMARY KEY)"
    )
    done = pgo.undo_cli("init")
    assert done.returncode == 0, done.stderr
    assert "no --schema given, so schema public: tables of schema(s) billing" in done.stderr
    given = pgo.undo_cli("init", "--schema", "public")
    assert "billing" not in given.stderr


def test_a_source_an_earlier_undo_prepared(pgo):
    """Without undo.table_problems (made by init since 0.3.0), status still answers and check
    says to run init, instead of failing on the missing function."""
    _shop(pgo)
    pgo.sql("DROP FUNCTION undo.table_problems(oid[]) CASCADE")
    status = pgo.undo_cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert [p["check"] for p in json.loads(status.stdout)["problems"]] == ["install"]
    code, doc = _check(pgo)
    assert code == 1 and ("install", pgo.dbname) in _problems(doc)


def _owner_init(src: Source) -> dict[str, str]:
    """init as a role that owns the database and its tables but is not a superuser: no event
    trigger (init warns); the environment that runs undo as that role."""
    role = f"owner_{src.dbname}"
    src.sql(
        sql.SQL(
            "CREATE ROLE {r} LOGIN REPLICATION CREATEROLE; ALTER DATABASE {d} OWNER TO {r};"
            " ALTER SCHEMA public OWNER TO {r}"
        )
        .format(r=sql.Identifier(role), d=sql.Identifier(src.dbname))
        .as_string()
    )
    params = dict(psycopg.conninfo.conninfo_to_dict(src.dsn), user=role)
    dsn = psycopg.conninfo.make_conninfo("", **params)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    env = {"UNDO_DSN": dsn}
    done = run_cli(src, "init", env=env)
    assert done.returncode == 0 and "not a superuser" in done.stderr, done.stderr
    return env


def test_no_event_trigger_is_noted_with_its_fix(pgo):
    """A non-superuser init makes no event trigger: a table created later is not audited and
    no gap says so. check notes it (not a failure: what is audited now is whole), with the
    fix; a table created since is the problem it always was."""
    env = _owner_init(pgo)
    done = run_cli(pgo, "check", "--json", env=env)
    doc = json.loads(done.stdout)
    assert done.returncode == 0 and doc["ok"], doc
    (note,) = [n for n in doc["notes"] if "event trigger" in n]
    assert "`undo init`" in note and "superuser" in note, note
    text = run_cli(pgo, "check", env=env)
    assert text.returncode == 0 and "note:     no event trigger" in text.stdout, text.stdout


def test_an_event_trigger_missing_or_disabled_is_a_problem(pgo):
    """Some of init's event triggers there and one not, or one disabled: someone undid what a
    superuser's init made; tables created now would go unaudited."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("ALTER EVENT TRIGGER undo_ddl DISABLE")
    code, doc = _check(pgo)
    assert code == 1 and ("event trigger", "undo_ddl") in _problems(doc), doc
    pgo.sql("DROP EVENT TRIGGER undo_ddl_rewrite")
    code, doc = _check(pgo)
    assert code == 1 and ("event trigger", "undo_ddl_rewrite") in _problems(doc), doc
    pgo.init()
    code, doc = _check(pgo)
    assert code == 0 and not [n for n in doc["notes"] if "event trigger" in n], doc
