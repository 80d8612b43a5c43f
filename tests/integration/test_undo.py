"""Undo round trips against a real server, for both decoders: exact, atomic, conflict-aware."""

from __future__ import annotations

import io
import json
import re
import subprocess

import psycopg
import pytest

from tests.conftest import STORES
from tests.fixtures import HOSTILE_SCHEMA, TYPES_SCHEMA
from undo.core.errors import NotFound, Refused
from undo.engine.apply import undo
from undo.engine.plan import Target
from undo.source.pg import session_id


def _as_session(src, *statements, app="script"):
    with src.connect(application_name=app) as c:
        sid = session_id(c)
        for s in statements:
            c.execute(s.encode())
    return sid


def _apply(src, **target):
    return undo(src.settings, Target(**target), apply=True)


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_every_type_round_trips_through_delete_update_insert(source):
    source.sql(TYPES_SCHEMA)
    source.init()
    source.load_types()
    before = source.snapshot("everything")
    sid = _as_session(
        source,
        "UPDATE everything SET n = n + 1, t = t || '!', jb = '{}', arr = '{9}', big = big"
        " WHERE id = 1",
        "UPDATE everything SET b = NOT b, d = d + 1, x = '<y/>', comp = ROW(2, 'q')",
        "DELETE FROM everything WHERE id IN (2, 3, 4, 5)",
        "INSERT INTO everything (id, t) VALUES (100, 'new')",
    )
    source.capture()
    report = _apply(source, session=sid)
    assert report.applied and not report.conflicts
    assert source.snapshot("everything") == before


def test_small_update_beside_a_2mb_toasted_value(source):
    source.sql(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text, meta jsonb);"
        "ALTER TABLE docs ALTER body SET STORAGE EXTERNAL"
    )
    source.init()
    source.sql(
        "INSERT INTO docs SELECT 1, 'a', string_agg(md5(g::text), '') ,"
        " '{\"k\": 1}' FROM generate_series(1, 65536) g"
    )
    before = source.snapshot("docs")
    sid = _as_session(source, "UPDATE docs SET title = 'b'", "UPDATE docs SET meta = '{}'")
    source.capture()
    _apply(source, session=sid)
    assert source.snapshot("docs") == before
    assert source.sql("SELECT length(body) FROM docs") == [(2097152,)]


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_identity_generated_nokey_uniqueindex_partitioned_hostile(source):
    source.sql(HOSTILE_SCHEMA)
    source.sql(
        "CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text,"
        " twice int GENERATED ALWAYS AS (length(v) * 2) STORED);"
        "CREATE TABLE nokey (a int, b text);"
        "CREATE TABLE uniq (code text NOT NULL UNIQUE, v int);"
        "CREATE TABLE part (id int, k int, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);"
        "CREATE TABLE part1 PARTITION OF part FOR VALUES FROM (0) TO (10);"
        "CREATE TABLE part2 PARTITION OF part FOR VALUES FROM (10) TO (20);"
        "CREATE SCHEMA other; CREATE TABLE other.t (id int PRIMARY KEY, v text)"
    )
    source.init(schemas=["public", "Odd Schema", "other"])
    source.sql(
        "INSERT INTO ident (v) VALUES ('a'), ('bb'), ('ccc');"
        "INSERT INTO nokey VALUES (1, 'dup'), (1, 'dup'), (2, 'x');"
        "INSERT INTO uniq VALUES ('A', 1), ('B', 2);"
        "INSERT INTO part VALUES (1, 1, 'one'), (2, 15, 'two');"
        "INSERT INTO other.t VALUES (1, 'o');"
        "INSERT INTO \"Odd Schema\".\"we\"\"ird.x]\" VALUES (1, 'ü', 'a.b', 'sel', 3)"
    )
    tables = ["ident", "nokey", "uniq", "part", "other.t", '"Odd Schema"."we""ird.x]"']
    before = {t: source.snapshot(t) for t in tables}
    sid = _as_session(
        source,
        "DELETE FROM ident WHERE id = 2",
        "UPDATE ident SET v = 'zzzz' WHERE id = 3",
        "DELETE FROM nokey WHERE ctid = (SELECT min(ctid) FROM nokey WHERE a = 1)",
        "UPDATE nokey SET b = 'y' WHERE a = 2",
        "DELETE FROM uniq WHERE code = 'A'",
        "UPDATE uniq SET v = 20 WHERE code = 'B'",
        "UPDATE part SET k = 12 WHERE id = 1",
        "DELETE FROM part WHERE id = 2",
        "UPDATE other.t SET v = 'p'",
        'UPDATE "Odd Schema"."we""ird.x]" SET "ü" = \'ö\', "x]" = 4',
        'DELETE FROM "Odd Schema"."we""ird.x]"',
    )
    source.capture()
    report = _apply(source, session=sid)
    assert not report.conflicts
    for t in tables:
        assert source.snapshot(t) == before[t], t


def test_fk_cascade_and_updated_at_trigger(source):
    source.sql(
        "CREATE TABLE accounts (id int PRIMARY KEY, name text, updated_at timestamptz);"
        "CREATE TABLE events (id int PRIMARY KEY, account int REFERENCES accounts"
        " ON DELETE CASCADE, what text);"
        "CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN NEW.updated_at := now(); RETURN NEW; END$$;"
        "CREATE TRIGGER stamp BEFORE UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION stamp()"
    )
    source.init()
    source.sql(
        "INSERT INTO accounts VALUES (1, 'a', '2020-01-01'), (2, 'b', '2020-01-01');"
        "INSERT INTO events SELECT g, 1 + g % 2, 'e' FROM generate_series(1, 50) g"
    )
    before = (source.snapshot("accounts"), source.snapshot("events"))
    sid = _as_session(
        source,
        "UPDATE accounts SET name = 'changed' WHERE id = 2",
        "DELETE FROM accounts WHERE id = 1",
    )
    source.capture()
    _apply(source, session=sid)
    assert (source.snapshot("accounts"), source.snapshot("events")) == before


def _conflict_setup(src):
    src.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    src.init()
    src.sql("INSERT INTO t SELECT g, 'orig' FROM generate_series(1, 5) g")
    sid = _as_session(src, "UPDATE t SET v = 'bad' WHERE id <= 3", "DELETE FROM t WHERE id = 5")
    later = _as_session(
        src,
        "UPDATE t SET v = 'someone else' WHERE id = 2",
        "INSERT INTO t VALUES (5, 'reborn')",
        app="web",
    )
    src.capture()
    return sid, later


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_conflict_abort_changes_nothing_and_names_the_later_session(source):
    sid, later = _conflict_setup(source)
    before = source.snapshot("t")
    with pytest.raises(Refused) as e:
        _apply(source, session=sid)
    assert source.snapshot("t") == before
    assert "2 conflict(s)" in str(e.value) and later in str(e.value)
    assert "id=2" in str(e.value) and "id=5" in str(e.value)


def test_conflict_skip_restores_the_rest(source):
    sid, _ = _conflict_setup(source)
    report = undo(source.settings, Target(session=sid), apply=True, on_conflict="skip")
    assert len(report.conflicts) == 2
    assert source.sql("SELECT id, v FROM t ORDER BY id") == [
        (1, "orig"),
        (2, "someone else"),
        (3, "orig"),
        (4, "orig"),
        (5, "reborn"),
    ]


def test_printed_script_through_psql_equals_apply(source, tmp_path):
    source.sql(TYPES_SCHEMA)
    source.init()
    source.load_types()
    before = source.snapshot("everything")
    sid = _as_session(
        source,
        "UPDATE everything SET t = 'x', arr = '{}' WHERE id = 1",
        "DELETE FROM everything WHERE id >= 2",
        "INSERT INTO everything (id, jb) VALUES (9, '[]')",
    )
    source.capture()
    script = source.undo_cli("session", sid)
    assert script.returncode == 0, script.stderr
    assert script.stdout.startswith("-- undo of")
    psql = source.psql(script.stdout, "-v", "ON_ERROR_STOP=1")
    assert psql.returncode == 0, psql.stderr
    assert source.snapshot("everything") == before


def test_printed_script_fails_on_conflict(pgo):
    """A script printed before a later session changed its rows checks them itself."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    pgo.sql("INSERT INTO t SELECT g, 'orig' FROM generate_series(1, 5) g")
    sid = _as_session(pgo, "UPDATE t SET v = 'bad' WHERE id <= 3", "DELETE FROM t WHERE id = 5")
    pgo.capture()
    script = pgo.undo_cli("session", sid)
    assert script.returncode == 0, script.stderr
    _as_session(pgo, "UPDATE t SET v = 'someone else' WHERE id = 2", app="web")
    before = pgo.snapshot("t")
    psql = pgo.psql(script.stdout, "-v", "ON_ERROR_STOP=1")
    assert psql.returncode != 0
    assert pgo.snapshot("t") == before


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_undo_of_undo_and_double_undo_refused(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    original = source.snapshot("t")
    sid = _as_session(source, "DELETE FROM t WHERE id = 1", "UPDATE t SET v = 'z'")
    damaged = source.snapshot("t")
    source.capture()
    first = _apply(source, session=sid)
    assert source.snapshot("t") == original
    with pytest.raises(Refused, match="already undone"):
        _apply(source, session=sid)
    source.capture()
    undo_txn = source.store_rows(
        "SELECT application_name, undo_of, tag FROM transactions WHERE xid = ?", (first.undo_xid,)
    )
    assert undo_txn[0][0] == "undo" and json.loads(undo_txn[0][1]) == {"session": sid}
    _apply(source, xids=(first.undo_xid,))
    assert source.snapshot("t") == damaged
    source.capture()
    _apply(source, session=sid)
    assert source.snapshot("t") == original


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_undo_xact_and_app_since(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    with pgo.connect(application_name="metrics") as c:
        x1 = c.execute("DELETE FROM t WHERE id = 1 RETURNING txid_current()").fetchone()[0]
        c.execute("DELETE FROM t WHERE id = 2")
    pgo.capture()
    result = pgo.undo_cli("xact", str(x1), "--apply")
    assert result.returncode == 0, result.stderr
    assert pgo.sql("SELECT id FROM t ORDER BY id") == [(1,), (3,)]
    result = pgo.undo_cli("app", "metrics", "--since", "1h", "--apply", "--only", "delete")
    assert result.returncode == 1 and "already undone" in result.stderr
    # printed, it is refused too: the row xact x1 deleted is back (the script would meet it)
    result = pgo.undo_cli("app", "metrics", "--since", "1h", "--until", "2099-01-01T00:00:00Z")
    assert result.returncode == 1 and result.stdout == "" and "id=1" in result.stderr
    result = pgo.undo_cli(
        "app",
        "metrics",
        "--since",
        "1h",
        "--until",
        "2099-01-01T00:00:00Z",
        "--only",
        "delete",
        "--on-conflict",
        "skip",
    )
    assert result.returncode == 1 and "COPY" in result.stdout


def test_truncate_refused_unless_skipped(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE u (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1); INSERT INTO u VALUES (1)")
    sid = _as_session(pgo, "DELETE FROM u", "TRUNCATE t")
    pgo.capture()
    with pytest.raises(Refused, match="TRUNCATE") as e:
        _apply(pgo, session=sid)
    assert "public.t" in str(e.value)
    assert pgo.sql("SELECT count(*) FROM u") == [(0,)]
    report = undo(pgo.settings, Target(session=sid), apply=True, on_conflict="skip")
    assert report.not_undoable and pgo.sql("SELECT count(*) FROM u") == [(1,)]


def test_table_recreated_since_capture_is_refused(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1, 'a')")
    sid = _as_session(pgo, "DELETE FROM t")
    pgo.capture()
    pgo.sql("DROP TABLE t; CREATE TABLE t (id int PRIMARY KEY, v text)")
    with pytest.raises(Refused, match="re-created"):
        _apply(pgo, session=sid)
    assert pgo.sql("SELECT count(*) FROM t") == [(0,)]


def test_column_changed_since_capture_is_refused(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1, 'a')")
    sid = _as_session(pgo, "DELETE FROM t")
    pgo.capture()
    pgo.sql("ALTER TABLE t ALTER v TYPE varchar(3)")
    with pytest.raises(Refused, match=r"columns of public\.t changed"):
        _apply(pgo, session=sid)


def test_unknown_session_is_bad_input(pgo):
    pgo.init()
    with pytest.raises(NotFound):
        _apply(pgo, session="dead.beef")
    result = pgo.undo_cli("session", "dead.beef")
    assert result.returncode == 2 and result.stderr.count("\n") == 1


def test_role_without_replica_role_is_told_the_grant(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    role = f"app_{pgo.dbname}"
    pgo.sql(f"CREATE ROLE {role} LOGIN; GRANT ALL ON t TO {role}")
    pgo.sql("INSERT INTO t VALUES (1)")
    sid = _as_session(pgo, "DELETE FROM t")
    pgo.capture()
    params = dict(psycopg.conninfo.conninfo_to_dict(pgo.dsn), user=role)
    dsn = psycopg.conninfo.make_conninfo(**params)
    result = pgo.undo_cli("--dsn", dsn, "session", sid, "--apply")
    assert result.returncode == 1
    assert "GRANT SET ON PARAMETER session_replication_role" in result.stderr
    pgo.sql(f"GRANT undo_operator TO {role}")  # who may undo (test_ledger_trust.py)
    fired = pgo.undo_cli("--dsn", dsn, "session", sid, "--apply", "--fire-triggers")
    assert fired.returncode == 0, fired.stderr
    assert pgo.sql("SELECT id FROM t") == [(1,)]


def test_ctrl_c_during_apply_rolls_back_everything(pgo):
    """SIGINT while the undo waits on a lock: nothing stays applied, the process exits."""
    import os
    import signal
    import sys
    import time

    pgo.sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql(
        "INSERT INTO a SELECT generate_series(1, 1000);"
        " INSERT INTO b SELECT generate_series(1, 1000)"
    )
    sid = _as_session(pgo, "DELETE FROM a", "DELETE FROM b")
    pgo.capture()
    blocker = pgo.connect(autocommit=False)
    blocker.execute("LOCK TABLE a IN ACCESS EXCLUSIVE MODE")  # undo does b first, then waits on a
    env = dict(os.environ, UNDO_DSN=pgo.dsn, UNDO_STORE=pgo.store, UNDO_SLOT=pgo.slot)
    proc = subprocess.Popen(
        [sys.executable, "-m", "undo", "session", sid, "--apply", "--lock-timeout", "60s"],
        # a run started in the background of a shell ignores SIGINT, and so would
        # the child it inherits that from: Ctrl-C's own disposition, as at a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not pgo.sql(
            "SELECT 1 FROM pg_locks WHERE relation = 'a'::regclass AND NOT granted"
        ):
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        blocker.rollback()
        blocker.close()
    assert pgo.sql("SELECT count(*) FROM a") == [(0,)]
    assert pgo.sql("SELECT count(*) FROM b") == [(0,)]
    assert pgo.store_rows("SELECT count(*) FROM undos") == [(0,)]


def test_lock_timeout_is_refused_in_one_line_and_changes_nothing(pgo):
    pgo.sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO a VALUES (1); INSERT INTO b VALUES (1)")
    sid = _as_session(pgo, "DELETE FROM a", "DELETE FROM b")
    pgo.capture()
    blocker = pgo.connect(autocommit=False)
    blocker.execute("LOCK TABLE a IN ACCESS EXCLUSIVE MODE")  # b goes back first, then a waits
    try:
        result = pgo.undo_cli("session", sid, "--apply", "--lock-timeout", "1s")
    finally:
        blocker.rollback()
        blocker.close()
    assert result.returncode == 1
    assert "gave up waiting" in result.stderr and "--lock-timeout 1s" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert pgo.sql("SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b)") == [(0, 0)]


def test_a_conflict_over_a_value_the_decoder_could_not_carry_says_so(source):
    if source.decoder == "pgoutput":
        pytest.skip("pgoutput carries NaN and Infinity: no value is lost to the decoder")
    source.sql(
        "CREATE TABLE num_input_test (n1 numeric, f8 float8, label text);"
        " INSERT INTO num_input_test VALUES ('NaN', 1, 'a'), (2.5, '-Infinity', 'b'), (3, 3, 'c');"
        " CREATE TABLE m (id int PRIMARY KEY, f float8, label text);"
        " INSERT INTO m VALUES (1, 'NaN', 'a')"
    )
    source.init()
    if source.nan_restorable():  # the store's meta says numbers_as_strings: wal2json 2.6+
        pytest.skip("this server's wal2json (2.6+) sends NaN and Infinity: nothing is lost")
    sid = _as_session(
        source,
        "INSERT INTO num_input_test SELECT * FROM num_input_test",
        "INSERT INTO num_input_test VALUES (NULL, 4, 'd')",
        # in a subtransaction: the row is compared by value, not known by its xmin
        "BEGIN; SAVEPOINT s; UPDATE m SET label = 'b'; RELEASE s; COMMIT",
    )
    _as_session(source, "DELETE FROM num_input_test WHERE label = 'd'", app="cleanup")
    source.capture()
    before = source.snapshot("num_input_test"), source.snapshot("m")
    refused = source.undo_cli("session", sid, "--apply")
    assert refused.returncode == 1, refused.stderr
    assert (source.snapshot("num_input_test"), source.snapshot("m")) == before
    lines = {
        line.split(" (")[0].strip() + " " + line.split(")")[0].split("(")[1]: line
        for line in refused.stderr.splitlines()
        if "public." in line
    }
    for row, column in (
        ("public.num_input_test n1=NULL, f8=1, label=a", "n1"),
        ("public.num_input_test n1=2.5, f8=NULL, label=b", "f8"),
        ("public.m id=1", "f"),
    ):
        line = lines[row]
        assert f"holds NaN or Infinity in {column} where the audit store has NULL" in line, line
        assert "wal2json before 2.6" in line and "--on-conflict skip" in line, line
        assert "cannot name" not in line, line
    # a row really gone since is still a conflict of another kind, and names who removed it
    gone = lines["public.num_input_test n1=NULL, f8=4, label=d"]
    assert "(cleanup)" in gone and "NaN" not in gone, gone
    skipped = source.undo_cli("session", sid, "--apply", "--on-conflict", "skip")
    assert skipped.returncode == 1, skipped.stderr
    assert source.sql("SELECT label, count(*) FROM num_input_test GROUP BY 1 ORDER BY 1") == [
        ("a", 2),
        ("b", 2),
        ("c", 1),
    ]
    assert source.sql("SELECT label FROM m") == [("b",)]


def test_printing_refuses_what_apply_would_refuse(source):
    """Print mode checks the live rows first: a row changed since refuses the script (exit 1,
    nothing printed) as --apply would; with skip the script leaves those rows out."""
    sid, later = _conflict_setup(source)
    before = source.snapshot("t")
    printed = source.undo_cli("session", sid)
    assert printed.returncode == 1 and printed.stdout == "", printed.stderr
    assert "id=2" in printed.stderr and "id=5" in printed.stderr and later in printed.stderr
    skipped = source.undo_cli("session", sid, "--on-conflict", "skip")
    assert skipped.returncode == 1 and "id=2" in skipped.stderr and "id=5" in skipped.stderr
    assert source.snapshot("t") == before
    ran = source.psql(skipped.stdout, "-v", "ON_ERROR_STOP=1")
    assert ran.returncode == 0, ran.stderr
    assert source.sql("SELECT id, v FROM t ORDER BY id") == [
        (1, "orig"),
        (2, "someone else"),
        (3, "orig"),
        (4, "orig"),
        (5, "reborn"),
    ]


def test_printed_script_keeps_a_carriage_return_in_a_table_name(pgo):
    """The script was spooled through a text file read back with universal newlines: a \\r
    in a table's name came out as \\n, and psql found no such table."""
    pgo.sql('CREATE TABLE "a\rb" (id int PRIMARY KEY); INSERT INTO "a\rb" VALUES (1)')
    pgo.init()
    sid = _as_session(pgo, 'DELETE FROM "a\rb"')
    pgo.capture()
    out = io.StringIO()
    undo(pgo.settings, Target(session=sid), out=out)
    assert '"a\rb"' in out.getvalue()
    run = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", pgo.dsn, "-f", "-"],
        input=out.getvalue().encode(),
        capture_output=True,
    )
    assert run.returncode == 0, run.stderr
    assert pgo.sql('SELECT id FROM "a\rb"') == [(1,)]


_INVOICES = (
    "CREATE TABLE customers (id int PRIMARY KEY);"
    " INSERT INTO customers VALUES (1), (2);"
    " CREATE TABLE invoices (id int PRIMARY KEY, customer int REFERENCES customers, n int);"
    " INSERT INTO invoices SELECT g, 1, 0 FROM generate_series(1, 20) g"
)
_BILLING = (
    "UPDATE invoices SET n = n + 1 WHERE id <= 10",
    "UPDATE invoices SET n = n + 1 WHERE id <= 5",  # a row updated twice: one row written
    "UPDATE invoices SET id = 114 WHERE id = 14",  # a key change: a delete and an insert
    "DELETE FROM invoices WHERE id > 12 AND id < 100",
)


def _counts(stderr: str) -> list[str]:
    """The summary's count lines, without their verb (to undo, undone)."""
    return re.findall(r"(?m)^(\d+ \w+\(s\) of \S+) (?:to undo|undone)$", stderr)


def test_preview_and_result_count_the_same_changes_and_say_why_rows_differ(pgo):
    """The on-call's page: the preview said 316 deletes and 1156 updates to undo, the result
    326 deletes, 10 inserts and 1122 updates undone, without a word. Both count changes; the
    result adds the rows it wrote, and why they differ."""
    pgo.sql(_INVOICES)
    pgo.init()
    sid = _as_session(pgo, *_BILLING, app="billing")
    pgo.capture()
    preview = pgo.undo_cli("session", sid)
    assert _counts(preview.stderr) == [
        "7 delete(s) of public.invoices",
        "16 update(s) of public.invoices",
    ]
    assert "a key change is a delete and an insert" in preview.stderr
    applied = pgo.undo_cli("session", sid, "--apply")
    assert applied.returncode == 0, applied.stderr
    assert _counts(applied.stderr) == _counts(preview.stderr)
    assert "16 update(s) of public.invoices undone" in applied.stderr
    assert "rows written: public.invoices: 8 inserted back, 10 set back, 1 deleted" in (
        applied.stderr
    )
    assert "repeated updates of a row collapse into one" in applied.stderr
    plain = _as_session(pgo, "DELETE FROM invoices WHERE id = 1", app="billing")
    pgo.capture()
    one = pgo.undo_cli("session", plain, "--apply")  # one change, one row: nothing to explain
    assert one.stderr.startswith("1 delete(s) of public.invoices undone\n")
    assert "rows written" not in one.stderr and "collapse" not in one.stderr


def test_printed_script_says_what_it_does_and_runs_quietly(pgo):
    """The on-call's page: 9,283 lines of COPY data and generated SQL, and through psql 65
    lines of set_config results and no word of what it did. The script opens with a summary
    in comments (tables, operations, counts, checks), prints nothing under psql, and ends
    with a NOTICE of what it did. A table's name cannot end the comment that names it."""
    odd = 'inv"\nDROP TABLE victim; --\r'
    pgo.sql(
        _INVOICES
        + "; CREATE TABLE victim (id int); CREATE TABLE "
        + '"inv""\nDROP TABLE victim; --\r" (id int PRIMARY KEY)'
    )
    pgo.init()
    pgo.sql('INSERT INTO "inv""\nDROP TABLE victim; --\r" VALUES (1), (2)')
    before = pgo.snapshot("invoices")
    sid = _as_session(pgo, *_BILLING, 'DELETE FROM "inv""\nDROP TABLE victim; --\r"', app="billing")
    pgo.capture()
    out = io.StringIO()  # exactly as printed (a pipe in text mode reads \r as \n)
    undo(pgo.settings, Target(session=sid), out=out)
    script = out.getvalue()
    head = script[: script.index("\\set ON_ERROR_STOP on")].splitlines()
    assert all(line.startswith("--") for line in head), head
    text = "\n".join(head)
    assert "public.invoices: 7 delete(s): inserts the rows back; 16 update(s): sets the old" in text
    assert "\\u000aDROP TABLE victim; --\\u000d" in text and odd not in script.split("COPY")[0]
    assert "the foreign keys of the rows it writes back" in text and "conflict" in text
    # settings are SET LOCAL; the one set_config (what the undo undoes, stamped with the
    # transaction's start) goes into a psql variable: nothing printed
    # (the owner-code guard names set_config, as a function it refuses, without calling it)
    assert all(line.endswith("\\gset") for line in script.splitlines() if "set_config(" in line)
    run = subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", pgo.dsn, "-f", "-"],
        input=script.encode(),
        capture_output=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == b""  # no result rows, no command tags
    notice = run.stderr.decode()  # the one thing psql prints (the odd name's lines in it)
    assert notice.count("NOTICE:") == 1 and "NOTICE:  undo: committed in xid " in notice
    assert "7 delete(s), 16 update(s) of public.invoices" in notice
    assert "public.invoices: 8 inserted back, 10 set back, 1 deleted" in notice
    assert pgo.snapshot("invoices") == before
    assert pgo.sql('SELECT count(*) FROM "inv""\nDROP TABLE victim; --\r"') == [(2,)]
    assert pgo.sql("SELECT to_regclass('victim') IS NOT NULL") == [(True,)]
