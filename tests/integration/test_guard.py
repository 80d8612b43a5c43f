"""undo guard: a guarded application's writes fail (SQLSTATE 25006) and the attempt is recorded."""

from __future__ import annotations

import json

import psycopg
import pytest
from prometheus_client.exposition import generate_latest

from tests.integration.test_sources import _beside
from undo.source.pg import session_id
from undo.web.metrics import registry


def _delete_as(source, app: str, query: str = "DELETE FROM t") -> psycopg.Error | None:
    with source.connect(application_name=app, autocommit=False) as c:
        sid = session_id(c)
        try:
            c.execute("CREATE TABLE IF NOT EXISTS scratch (x int)")  # a write before: rolled back
            c.execute(query)
            c.commit()
        except psycopg.Error as e:
            c.rollback()
            e.add_note(sid)
            return e
    return None


def test_guarded_application_cannot_write_and_the_attempt_is_recorded(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10) g")
    before = source.snapshot("t")
    added = source.undo_cli("guard", "add", "usage-metrics*", "--reason", "reporting only")
    assert added.returncode == 0, added.stderr
    assert source.undo_cli("guard", "add", "report_?").returncode == 0

    err = _delete_as(source, "usage-metrics-nightly")
    assert isinstance(err, psycopg.errors.ReadOnlySqlTransaction)
    assert err.sqlstate == "25006"
    assert "usage-metrics*" in str(err) and "reporting only" in str(err)
    sid = err.__notes__[0]
    assert source.snapshot("t") == before
    assert source.sql("SELECT to_regclass('scratch')") == [(None,)]  # nothing it did commits
    # globs are globs: _ is a character like any other, ? is one character
    assert isinstance(_delete_as(source, "report_1", "DELETE FROM t WHERE id = 1"), psycopg.Error)
    assert _delete_as(source, "reportX1", "DELETE FROM t WHERE id = 2") is None
    assert _delete_as(source, "web", "DELETE FROM t WHERE id = 3") is None

    source.capture()
    rows = source.store_rows(
        "SELECT guard, reason, session_id, application_name, statement, tag FROM guard_refusals"
        " ORDER BY lsn"
    )
    assert rows == [
        (
            "usage-metrics*",
            "reporting only",
            sid,
            "usage-metrics-nightly",
            "DELETE FROM t",
            "trusted",
        ),
        ("report_?", None, rows[1][2], "report_1", "DELETE FROM t WHERE id = 1", "trusted"),
    ]
    listed = json.loads(
        source.undo_cli("sessions", "--app", "usage-metrics-nightly", "--json").stdout
    )
    assert [
        (r["session_id"], r["transactions"], r["deletes"], r["guard_refusals"]) for r in listed
    ] == [(sid, 0, 0, 1)]
    shown = source.undo_cli("show", "session", sid)
    assert shown.returncode == 0 and "refused by guard usage-metrics*" in shown.stdout
    # a session with nothing but refusals has nothing to undo
    assert source.undo_cli("session", sid).returncode == 2
    metrics = generate_latest(registry(source.settings)).decode()
    assert (
        'undo_guard_refusals_total{application="usage-metrics-nightly",guard="usage-metrics*",'
        f'source="{source.dbname}"}} 1.0' in metrics
    )
    guards = json.loads(source.undo_cli("guard", "list", "--json").stdout)
    assert [(g["pattern"], g["reason"], g["refusals"]) for g in guards] == [
        ("report_?", None, 1),
        ("usage-metrics*", "reporting only", 1),
    ]

    assert source.undo_cli("guard", "remove", "usage-metrics*").returncode == 0
    assert _delete_as(source, "usage-metrics-nightly", "DELETE FROM t WHERE id = 4") is None
    gone = source.undo_cli("guard", "remove", "usage-metrics*")
    assert gone.returncode == 2 and "no guard" in gone.stderr


def test_guards_belong_to_the_init_role_and_refusals_cannot_be_forged(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    role = f"eve_{pgo.dbname}"
    pgo.sql(f"CREATE ROLE {role} LOGIN; GRANT ALL ON t TO {role}")
    eve = psycopg.conninfo.make_conninfo(pgo.dsn, user=role)
    as_eve = pgo.undo_cli("--dsn", eve, "guard", "add", "web*")
    assert as_eve.returncode == 1
    assert (
        as_eve.stderr.count("\n") == 1
        and "only" in as_eve.stderr
        and "Traceback" not in (as_eve.stderr)
    )
    with psycopg.connect(eve, autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("INSERT INTO undo.guards (pattern) VALUES ('web*')")
        # a made-up refusal, to blame another application
        c.execute(
            "SELECT pg_logical_emit_message(false, 'undo.guard', %s)",
            (
                "0" * 64
                + json.dumps({"session_id": "x.1"})
                + "\n"
                + json.dumps({"application_name": "web", "guard": "web*"}),
            ),
        )
    # a guard that would stop undo itself is refused
    blocks = pgo.undo_cli("guard", "add", "u*")
    assert blocks.returncode == 2 and "undo" in blocks.stderr
    pgo.capture()
    assert pgo.store_rows("SELECT application_name, tag, tag_reason FROM guard_refusals") == [
        ("web", "untrusted", "forged")
    ]


def test_a_long_lived_session_sees_guards_added_and_removed_and_its_own_renames(source):
    """A pooled connection that wrote before a guard was added is refused after it, and follows
    its own application_name and the guard's removal: every writing transaction reads the
    guards; no session keeps what it found."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10) g")
    with source.connect(application_name="report-x", autocommit=True) as s:

        def write(i: int) -> bool:
            try:
                s.execute("UPDATE t SET v = v || '!' WHERE id = %s", (i,))
            except psycopg.errors.ReadOnlySqlTransaction:
                return False
            return True

        assert write(1)  # no guard: found, and kept
        assert source.undo_cli("guard", "add", "report-*").returncode == 0
        assert not write(2)
        s.execute("SET application_name = 'web'")
        assert write(3)
        s.execute("SET application_name = 'report-y'")
        assert not write(4)
        assert source.undo_cli("guard", "remove", "report-*").returncode == 0
        assert write(5)
    assert source.sql("SELECT id FROM t WHERE v LIKE '%!' ORDER BY id") == [(1,), (3,), (5,)]


def test_guard_add_and_remove_act_only_on_the_source_dsn_is(pgo, tmp_path):
    """`--source shop --dsn billing guard add` is refused (exit 2) as every command acting on
    one source refuses a --dsn that is not it: never a guard added to (or removed from) the
    database --dsn happens to name."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    with _beside(pgo, tmp_path, "billing") as billing:
        billing.sql("CREATE TABLE t (id int PRIMARY KEY)")
        assert billing.undo_cli("init").returncode == 0
        assert billing.undo_cli("guard", "add", "kept*").returncode == 0
        for args in (("guard", "add", "reporting*"), ("guard", "remove", "kept*")):
            refused = billing.undo_cli("--source", pgo.dbname, *args)
            assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
            assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
            assert f"--dsn is database {billing.dbname}" in refused.stderr
        assert billing.sql("SELECT pattern FROM undo.guards") == [("kept*",)]
        assert pgo.sql("SELECT pattern FROM undo.guards") == []
        # the right --dsn for --source acts
        done = pgo.undo_cli("--source", pgo.dbname, "guard", "add", "reporting*")
        assert done.returncode == 0, done.stderr
        assert pgo.sql("SELECT pattern FROM undo.guards") == [("reporting*",)]
