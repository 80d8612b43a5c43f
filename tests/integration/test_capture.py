"""Capture against a real server, for both decoders: attribution, fidelity, exactly-once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from tests.conftest import STORES, erase_own_tag
from tests.fixtures import TYPES_SCHEMA
from undo.source.pg import session_id

TYPE_COLUMNS = None


def _changes(src, table=None):
    q = (
        "SELECT t.session_id, t.application_name, t.tag, c.op, c.old, c.new, c.unchanged,"
        " r.table_name, t.xid FROM changes c JOIN transactions t ON t.id = c.txn"
        " JOIN relations r ON r.id = c.relation"
    )
    if table:
        q += " WHERE r.table_name = ?"
    return src.store_rows(q + " ORDER BY t.commit_lsn, c.ord", (table,) if table else ())


def test_interleaved_sessions_are_attributed(source):
    source.sql("CREATE TABLE items (id int PRIMARY KEY, owner text)")
    source.init()
    conns = [source.connect(application_name=f"app{i}") for i in range(3)]
    sids = [session_id(c) for c in conns]
    txs = [c.transaction() for c in conns]
    for tx in txs:
        tx.__enter__()
    for round_ in range(3):
        for i, c in enumerate(conns):
            c.execute("INSERT INTO items VALUES (%s, %s)", (round_ * 10 + i, f"app{i}"))
    for tx in reversed(txs):
        tx.__exit__(None, None, None)
    conns[1].execute("SET application_name = 'renamed'")
    conns[1].execute("UPDATE items SET owner = 'renamed' WHERE id = 1")
    source.capture()
    rows = _changes(source)
    assert len(rows) == 10
    for sid, app, tag, _op, _old, new, _u, _t, _x in rows:
        owner = json.loads(new)[1]
        i = int(owner[3]) if owner.startswith("app") else 1
        assert sid == sids[i]
        assert app == owner
        assert tag == "trusted"
    for c in conns:
        c.close()


def test_rollbacks_leave_nothing_and_savepoints_keep_the_tag(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    with source.connect(application_name="sp") as c:
        sid = session_id(c)
        c.autocommit = False
        c.execute("INSERT INTO t VALUES (1, 'rolled back')")
        c.rollback()
        c.execute("SAVEPOINT s")
        c.execute("INSERT INTO t VALUES (2, 'gone with the savepoint')")
        c.execute("ROLLBACK TO SAVEPOINT s")
        c.execute("INSERT INTO t VALUES (3, 'kept')")
        c.commit()
    source.capture()
    rows = _changes(source)
    assert [(r[0], r[1], r[2], r[3], json.loads(r[5])) for r in rows] == [
        (sid, "sp", "trusted", "I", ["3", "kept"])
    ]


def test_untagged_writes_are_stored_without_session(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY)")
    source.init()
    source.sql("ALTER TABLE t DISABLE TRIGGER undo_tag")
    source.sql("INSERT INTO t VALUES (1)")
    source.capture()
    assert [(r[0], r[2]) for r in _changes(source)] == [(None, "none")]


def _tags(src, slot):
    """The signed tags a test_decoding slot has seen, in order."""
    rows = src.sql("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (slot,))
    head = "message: transactional: 1 prefix: undo, sz: "
    return [d.partition(" content:")[2].encode() for (d,) in rows if d.startswith(head)]


def test_forged_replayed_erased_and_malformed_tags_are_never_a_real_sessions(source):
    """An unprivileged role that owns nothing of undo tries every way to write under another
    session's name or under none: each lands as its own untrusted (or untagged) row, with why.
    Nothing in her session signs: she can only make up a MAC, or replay a tag undo signed."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY)")
    source.init()
    peek = "peek_" + source.slot  # the stream, as a replica or a backup of it holds it
    source.sql("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (peek,))
    role = f"mallory_{source.dbname}"
    source.sql(f"CREATE ROLE {role} LOGIN; GRANT ALL ON t TO {role}")
    victim = source.connect(application_name="cron")
    victim.execute("INSERT INTO t VALUES (0)")  # a real, trusted session to pass as
    victim_sid = session_id(victim)
    params = dict(psycopg.conninfo.conninfo_to_dict(source.dsn), user=role)
    with psycopg.connect(**params, autocommit=True) as c:
        c.execute("INSERT INTO t VALUES (1)")  # mallory's own tag: genuine
        mallory = session_id(c)
        victims_tag, her_tag = _tags(source, peek)  # genuine tags, from the stream
        claim = {**json.loads(victims_tag[64:]), "application_name": "cron"}

        def emitting(value, message):
            with c.transaction():  # silence the real tag
                erase_own_tag(c)
                if message is not None:
                    xid = c.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
                    c.execute("SELECT pg_logical_emit_message(true, 'undo', %s)", (message(xid),))
                c.execute("INSERT INTO t VALUES (%s)", (value,))

        made_up = json.dumps({**claim, "xid": 0}).encode()
        emitting(10, lambda xid: b"0" * 64 + made_up)  # forged: a made-up HMAC
        emitting(11, lambda xid: victims_tag)  # replayed: the victim's own, another xid
        emitting(12, lambda xid: her_tag)  # replayed: her own earlier one
        changed = victims_tag[:64] + json.dumps({**claim, "xid": 0}).encode()
        emitting(13, lambda xid: changed)  # a genuine MAC over another payload: forged
        c.execute("SET undo.session = '0'")  # the session cache of before: means nothing now
        c.execute("INSERT INTO t VALUES (16)")
        c.execute("RESET undo.session")
        emitting(14, None)  # erased: no tag at all
        emitting(15, lambda xid: "not a tag")  # malformed
    victim.close()
    source.capture()
    rows = source.store_rows(
        "SELECT json_extract(c.new, '$[0]'), t.session_id, t.tag, t.tag_reason FROM changes c"
        " JOIN transactions t ON t.id = c.txn ORDER BY t.commit_lsn"
    )
    assert rows == [
        ("0", victim_sid, "trusted", None),
        ("1", mallory, "trusted", None),
        ("10", victim_sid, "untrusted", "forged"),
        ("11", victim_sid, "untrusted", "replayed"),
        ("12", mallory, "untrusted", "replayed"),
        ("13", victim_sid, "untrusted", "forged"),
        ("16", mallory, "trusted", None),
        ("14", None, "none", "missing"),
        ("15", None, "untrusted", "malformed"),
    ]
    result = source.undo_cli("session", victim_sid)
    assert result.returncode == 0 and "left out 3 transaction(s) with an untrusted tag" in (
        result.stderr
    )
    assert '\t["0"]\n' in result.stdout  # the staged new image of the row to delete
    assert '["10"]' not in result.stdout and '["11"]' not in result.stdout
    listed = json.loads(source.undo_cli("sessions", "--json").stdout)
    assert sorted(
        (r["session_id"], r["tag"], r["tag_reason"], r["transactions"])
        for r in listed
        if r["session_id"] == victim_sid
    ) == [
        (victim_sid, "trusted", None, 1),
        (victim_sid, "untrusted", "forged", 2),
        (victim_sid, "untrusted", "replayed", 1),
    ]  # the forged transactions are their own row, never counted as the victim's
    by_session = json.loads(source.undo_cli("activity", "--by", "session", "--json").stdout)
    counted = {}
    for r in by_session:
        counted[r["session"]] = counted.get(r["session"], 0) + r["inserts"]
    assert counted[victim_sid] == 1 and counted[f"untrusted:{victim_sid}"] == 3
    status = json.loads(source.undo_cli("status", "--json").stdout)
    assert status["untrusted_writes"] == {"forged": 2, "malformed": 1, "missing": 1, "replayed": 2}


def test_show_counts_a_session_without_the_forged_transactions_that_claim_it(source):
    """`show session` totals, text, --json and the dashboard's page, are the session's trusted
    transactions: a role that forges tags claiming it is listed apart, never counted in them."""
    from tests.integration.test_web import _get
    from undo.web import serve

    source.sql("CREATE TABLE t (id int PRIMARY KEY)")
    source.init()
    role = f"mallory_{source.dbname}"
    source.sql(f"CREATE ROLE {role} LOGIN; GRANT SELECT, INSERT, UPDATE, DELETE ON t TO {role}")
    with source.connect(application_name="cron") as victim:
        victim.execute("INSERT INTO t VALUES (0)")  # the session's one trusted change
        victim_sid = session_id(victim)
        ((pid, start),) = source.sql(
            "SELECT pid, (extract(epoch FROM backend_start) * 1000000)::bigint"
            " FROM pg_stat_activity WHERE pid = %s",
            (victim.info.backend_pid,),
        )
    params = dict(psycopg.conninfo.conninfo_to_dict(source.dsn), user=role)
    with psycopg.connect(**params, autocommit=True, application_name="cron") as c:
        c.execute("INSERT INTO t VALUES (1)")  # her own session
        claim = json.dumps({"pid": pid, "backend_start": start, "user": role, "xid": 0})
        for value in (10, 11, 12):
            with c.transaction():  # silence the real tag
                erase_own_tag(c)
                c.execute("SELECT pg_logical_emit_message(true, 'undo', %s)", ("0" * 64 + claim,))
                c.execute("INSERT INTO t VALUES (%s)", (value,))
    source.capture()

    shown = source.undo_cli("show", "session", victim_sid, "--json")
    assert shown.returncode == 0, shown.stderr
    result = json.loads(shown.stdout)
    assert result["totals"] == {
        "transactions": 1,
        "changes": 1,
        "rows": [{"table": "public.t", "operation": "insert", "rows": 1}],
    }
    assert [(t["tag"], t["changes"][0]["new"]) for t in result["transactions"]] == [
        ("trusted", {"id": "0"})
    ]
    claims = result["untrusted"]
    assert claims["totals"] == {
        "transactions": 3,
        "changes": 3,
        "rows": [{"table": "public.t", "operation": "insert", "rows": 3}],
    }
    assert [(t["tag"], t["tag_reason"], t["user"]) for t in claims["transactions"]] == [
        ("untrusted", "forged", role)
    ] * 3
    text = source.undo_cli("show", "session", victim_sid, "--limit", "2").stdout
    assert text.startswith(f"session {victim_sid}: 1 transaction(s), 1 change(s)\n"), text
    assert "untrusted: 3 transaction(s), 3 change(s), claim this session" in text
    # every statement is listed, whatever the limit; the changes are cut at 2
    assert text.count("tag untrusted (forged)") == 3 and "(2 more change(s)" in text

    server = serve(source.settings, "127.0.0.1", 0, None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, page = _get(f"http://127.0.0.1:{server.server_port}/sessions/{victim_sid}")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200
    assert "Row changes (1)" in page
    assert "Untrusted: 3 transaction(s), 3 row change(s) claiming this session" in page
    assert page.count("untrusted (forged)") == 3  # the three listed apart


def _expected_text(src, ids):
    """Each column as PostgreSQL's output function prints it (the raw text-format result)."""
    with src.connect(
        options="-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3"
        " -c bytea_output=hex -c IntervalStyle=postgres"
    ) as c:
        rows = {}
        for i in ids:
            cur = c.execute("SELECT * FROM everything WHERE id = %s", (i,))
            res = cur.pgresult
            rows[str(i)] = [
                None if res.get_value(0, j) is None else res.get_value(0, j).decode()
                for j in range(res.nfields)
            ]
        return rows


def test_every_type_is_stored_as_its_text_form(source):
    source.sql(TYPES_SCHEMA)
    source.init()
    count = source.load_types()
    source.capture()
    expected = _expected_text(source, range(1, count + 1))
    stored = {json.loads(r[5])[0]: json.loads(r[5]) for r in _changes(source, "everything")}
    assert stored.keys() == expected.keys()
    for k in expected:
        assert stored[k] == expected[k], k


def test_unchanged_toast_is_marked_and_toast_set_null_is_null(source):
    source.sql(
        "CREATE TABLE t (id int PRIMARY KEY, n int, big text);"
        "ALTER TABLE t ALTER big SET STORAGE EXTERNAL"
    )
    source.init()
    source.sql("INSERT INTO t VALUES (1, 0, repeat('x', 100000)), (2, 0, repeat('y', 100000))")
    source.sql("UPDATE t SET n = 1 WHERE id = 1")
    source.sql("UPDATE t SET n = 1, big = NULL WHERE id = 2")
    source.capture()
    updates = [r for r in _changes(source) if r[3] == "U"]
    first, second = updates
    assert json.loads(first[5]) == ["1", "1", None] and json.loads(first[6]) == [2]
    assert json.loads(first[4])[2] == "x" * 100000
    assert json.loads(second[5]) == ["2", "1", None] and second[6] is None
    assert json.loads(second[4])[2] == "y" * 100000


def test_hostile_role_defaults_change_nothing(source):
    source.sql(
        "CREATE TABLE t (id int PRIMARY KEY, b bytea, d date, tz timestamptz,"
        " iv interval, f float8)"
    )
    source.init()
    source.sql(
        f"ALTER ROLE postgres IN DATABASE {source.dbname} SET bytea_output = 'escape';"
        f"ALTER ROLE postgres IN DATABASE {source.dbname} SET DateStyle = 'SQL, DMY';"
        f"ALTER ROLE postgres IN DATABASE {source.dbname} SET TimeZone = 'Asia/Kolkata';"
        f"ALTER ROLE postgres IN DATABASE {source.dbname} SET IntervalStyle = 'iso_8601';"
        f"ALTER ROLE postgres IN DATABASE {source.dbname} SET extra_float_digits = 0"
    )
    source.sql(
        "INSERT INTO t VALUES (1, '\\x5461706972', '2013-04-02',"
        " '2013-04-02 10:00:00+00', '1 day 02:00:00', 0.1)"
    )
    source.capture()
    (row,) = _changes(source)
    assert json.loads(row[5]) == [
        "1",
        "\\x5461706972",
        "2013-04-02",
        "2013-04-02 10:00:00+00",
        "1 day 02:00:00",
        "0.1",
    ]


def test_copy_of_10000_rows_is_stored_whole(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    with source.connect() as c, c.cursor().copy("COPY t FROM STDIN") as cp:
        for i in range(10000):
            cp.write_row((i, f"v{i}"))
    source.capture()
    assert source.store_rows("SELECT count(*), count(DISTINCT key), max(ord) FROM changes") == [
        (10000, 10000, 10000)
    ]


def test_truncate_is_recorded(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY)")
    source.init()
    source.sql("INSERT INTO t VALUES (1)")
    source.sql("TRUNCATE t")
    source.capture()
    assert [(r[3], r[7], r[2]) for r in _changes(source)] == [
        ("I", "t", "trusted"),
        ("T", "t", "trusted"),
    ]


def test_a_truncate_amid_many_rows_of_one_transaction_keeps_every_change_in_order(source):
    """Changes are written 250 rows to an INSERT: a TRUNCATE off that rhythm, in the middle of
    one transaction of many rows, must neither lose nor reorder a change."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    with source.connect() as c, c.transaction():
        c.execute("INSERT INTO t SELECT g, 'a' || g FROM generate_series(1, 249) g")
        c.execute("TRUNCATE t")
        c.execute("INSERT INTO t SELECT g, 'b' || g FROM generate_series(1, 600) g")
        c.execute("DELETE FROM t WHERE id <= 100")
    source.capture()
    rows = source.store_rows("SELECT ord, op, coalesce(new, old) FROM changes ORDER BY id")
    expected = (
        [("I", f'["{i}","a{i}"]') for i in range(1, 250)]
        + [("T", None)]
        + [("I", f'["{i}","b{i}"]') for i in range(1, 601)]
        + [("D", f'["{i}","b{i}"]') for i in range(1, 101)]
    )
    assert [(op, image) for _, op, image in rows] == expected
    assert [o for o, _, _ in rows] == list(range(1, len(expected) + 1))


def test_tables_created_later_are_audited(source):
    source.init()
    source.sql("CREATE TABLE later (id int PRIMARY KEY)")
    source.sql("INSERT INTO later VALUES (1)")
    source.capture()
    assert [(r[3], r[7], r[2]) for r in _changes(source)] == [("I", "later", "trusted")]
    assert source.sql("SELECT relreplident FROM pg_class WHERE relname = 'later'") == [("f",)]


def test_writes_aimed_at_a_partition_are_tagged(source):
    source.sql(
        "CREATE TABLE p (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);"
        "CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10);"
        "CREATE TABLE p2 PARTITION OF p FOR VALUES FROM (10) TO (20)"
    )
    source.init()
    source.sql("INSERT INTO p VALUES (1, 1)")
    source.sql("INSERT INTO p2 VALUES (2, 15)")
    source.sql("UPDATE p SET k = 12 WHERE id = 1")
    source.capture()
    rows = [(r[3], r[7], r[2]) for r in _changes(source)]
    assert rows == [
        ("I", "p1", "trusted"),
        ("I", "p2", "trusted"),
        ("D", "p1", "trusted"),
        ("I", "p2", "trusted"),
    ]


def test_init_is_idempotent_and_uninstall_removes_everything(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    first = pgo.undo_cli("init")
    assert first.returncode == 0, first.stderr
    second = pgo.undo_cli("init")
    assert second.returncode == 0 and "nothing changed" in second.stdout
    gone = pgo.undo_cli("init", "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert pgo.sql("SELECT count(*) FROM pg_trigger WHERE tgname = 'undo_tag'") == [(0,)]
    assert pgo.sql("SELECT relreplident FROM pg_class WHERE relname = 't'") == [("d",)]
    assert pgo.sql(
        "SELECT to_regnamespace('undo') IS NULL,"
        " (SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s)",
        (pgo.slot,),
    ) == [(True, 0)]


def test_one_tag_per_transaction_and_an_older_when_trigger_is_replaced(pgo):
    """The tag trigger has no WHEN clause (PostgreSQL parses one again for every statement);
    the function itself returns at once after the transaction's first statement. A trigger an
    earlier version made, with a WHEN clause, is replaced by the next init."""
    pgo.sql("CREATE TABLE a (id int PRIMARY KEY)")
    pgo.sql("CREATE TABLE b (id int PRIMARY KEY)")
    assert pgo.undo_cli("init").returncode == 0
    pgo.sql(
        "CREATE OR REPLACE TRIGGER undo_tag BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON a"
        " FOR EACH STATEMENT WHEN (pg_catalog.current_setting('undo.tagged', true)"
        " IS DISTINCT FROM '1') EXECUTE FUNCTION undo.tag()"
    )
    again = pgo.undo_cli("init")
    assert again.returncode == 0 and "nothing changed" not in again.stdout, again.stdout
    assert pgo.sql(
        "SELECT c.relname, t.tgqual IS NULL, t.tgenabled FROM pg_trigger t"
        " JOIN pg_class c ON c.oid = t.tgrelid WHERE t.tgname = 'undo_tag' ORDER BY 1"
    ) == [("a", True, "A"), ("b", True, "A")]
    with pgo.connect() as c, c.transaction():
        c.execute("INSERT INTO a VALUES (1)")
        c.execute("INSERT INTO b VALUES (1)")
        c.execute("UPDATE a SET id = 2")
    messages = pgo.sql(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
        " 'proto_version', '1', 'publication_names', %s, 'messages', 'true')"
        " WHERE substr(data, 1, 1) = 'M' AND substr(data, 11, 5) = '\\x756e646f00'::bytea",
        (pgo.slot, pgo.slot),
    )
    assert messages == [(1,)]
    source_rows = pgo.capture()
    assert source_rows.changes == 3
    assert pgo.store_rows("SELECT tag, inserts, updates FROM transactions") == [("trusted", 2, 1)]


def _start_capture(src, stderr=subprocess.DEVNULL):
    e = dict(os.environ, UNDO_DSN=src.dsn, UNDO_STORE=src.store, UNDO_SLOT=src.slot)
    return subprocess.Popen(
        [sys.executable, "-m", "undo", "capture"], env=e, stdout=subprocess.DEVNULL, stderr=stderr
    )


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_kill_9_mid_stream_then_restart_stores_every_change_once(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    proc = _start_capture(source)
    try:
        for batch in range(20):
            source.sql(
                f"INSERT INTO t SELECT g, 'v' FROM generate_series({batch * 5000},"
                f" {batch * 5000 + 4999}) g"
            )
            if batch == 10:
                time.sleep(0.3)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                proc = _start_capture(source)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    source.capture()
    assert source.store_rows("SELECT count(*), count(DISTINCT key) FROM changes") == [
        (100000, 100000)
    ]
    assert source.store_rows("SELECT count(*) FROM transactions") == [(20,)]


def test_sigterm_stops_cleanly(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    proc = _start_capture(pgo)
    pgo.sql("INSERT INTO t VALUES (1)")
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert pgo.store_rows("SELECT count(*) FROM changes") == [(1,)]


def test_clean_server_restart_adds_no_duplicates(pgo):
    if pgo.cluster.temp is None:
        pytest.skip("needs the throwaway cluster")
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    for i in range(3):
        pgo.sql(f"INSERT INTO t VALUES ({i})")
    pgo.capture()
    subprocess.run(
        [*pgo.cluster.pg_ctl, "-m", "fast", "-w", "restart"], check=True, capture_output=True
    )
    pgo.sql("INSERT INTO t VALUES (10)")
    pgo.capture()
    assert pgo.store_rows("SELECT count(*), count(DISTINCT key) FROM changes") == [(4, 4)]


def test_slot_advanced_elsewhere_is_refused_and_recorded(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1)")
    pgo.sql("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (pgo.slot,))
    result = pgo.undo_cli("capture", "--once")
    assert result.returncode == 1
    assert "ahead of the store" in result.stderr and "Traceback" not in result.stderr
    assert pgo.store_rows("SELECT reason FROM gaps") == [(f"slot {pgo.slot} ahead of the store",)]
    again = pgo.undo_cli("capture", "--once", "--accept-gap")
    assert again.returncode == 0, again.stderr


def test_slot_dropped_and_recreated_is_refused(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("SELECT pg_drop_replication_slot(%s)", (pgo.slot,))
    pgo.sql("INSERT INTO t VALUES (1)")
    missing = pgo.undo_cli("capture", "--once")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    pgo.sql("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (pgo.slot,))
    recreated = pgo.undo_cli("capture", "--once")
    assert recreated.returncode == 1 and "ahead of the store" in recreated.stderr


def test_second_consumer_is_refused(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    proc = _start_capture(pgo)
    try:
        time.sleep(1.5)
        second = pgo.undo_cli("capture", "--once")
        assert second.returncode == 1 and "in use" in second.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_capture_reconnects_after_a_server_restart(pgo, tmp_path):
    if pgo.cluster.temp is None:
        pytest.skip("needs the throwaway cluster")
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    log = tmp_path / "capture.log"
    with open(log, "w") as err:
        proc = _start_capture(pgo, stderr=err)
        try:
            pgo.sql("INSERT INTO t VALUES (1)")
            time.sleep(1.0)
            subprocess.run(
                [*pgo.cluster.pg_ctl, "-m", "fast", "-w", "restart"],
                check=True,
                capture_output=True,
            )
            pgo.sql("INSERT INTO t VALUES (2)")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if pgo.store_rows("SELECT count(*) FROM changes") == [(2,)]:
                    break
                time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert pgo.store_rows("SELECT count(*), count(DISTINCT key) FROM changes") == [(2, 2)]
    text = log.read_text()
    assert "reconnecting" in text and "reconnected after" in text
    assert text.count("capturing slot") == 2  # at start, and again once reconnected


def test_idle_audited_tables_do_not_hold_wal_back(pgo):
    pgo.sql(
        "CREATE TABLE t (id int PRIMARY KEY); CREATE SCHEMA busy;"
        " CREATE TABLE busy.log (id serial, v text)"
    )
    pgo.init()
    pgo.sql("INSERT INTO busy.log (v) SELECT repeat('x', 1000) FROM generate_series(1, 20000)")
    before = pgo.sql(
        "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots"
        " WHERE slot_name = %s",
        (pgo.slot,),
    )[0][0]
    pgo.capture()
    after = pgo.sql(
        "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots"
        " WHERE slot_name = %s",
        (pgo.slot,),
    )[0][0]
    assert before > 10_000_000 and after < 100_000
    assert pgo.store_rows("SELECT count(*) FROM changes") == [(0,)]


def test_invalidated_slot_is_refused_and_recorded(pgo):
    if pgo.cluster.temp is None:
        pytest.skip("needs the throwaway cluster")
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    with psycopg.connect(pgo.cluster.admin_dsn, autocommit=True) as c:
        c.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        c.execute("SELECT pg_reload_conf()")
    try:
        for _ in range(6):
            pgo.sql(
                "INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series(1, 3000) g"
                " ON CONFLICT (id) DO UPDATE SET v = excluded.v || '!'"
            )
            pgo.sql("SELECT pg_switch_wal()")
        pgo.sql("CHECKPOINT")
        status = pgo.sql(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (pgo.slot,)
        )
        assert status == [("lost",)]
        result = pgo.undo_cli("capture", "--once")
        assert result.returncode == 1 and "invalidated" in result.stderr
        assert pgo.store_rows("SELECT reason FROM gaps") == [
            (f"slot {pgo.slot} invalidated (wal_status lost)",)
        ]
        again = pgo.undo_cli("init")
        assert again.returncode == 0 and "gap" in again.stderr
    finally:
        with psycopg.connect(pgo.cluster.admin_dsn, autocommit=True) as c:
            c.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            c.execute("SELECT pg_reload_conf()")


def test_absent_values_are_sql_null(source):
    """Capture stages NULL as '' (cheaper to bind): the store must hold NULL, never ''."""
    source.sql("CREATE TABLE k (id int PRIMARY KEY, v text)")
    source.sql("CREATE TABLE nokey (id int, v text)")
    source.init()
    for t in ("k", "nokey"):
        source.sql(f"INSERT INTO {t} SELECT g, 'x' FROM generate_series(1, 300) g")
        source.sql(f"UPDATE {t} SET v = 'y'")
        source.sql(f"DELETE FROM {t}")
        source.sql(f"TRUNCATE {t}")
    source.capture()
    rows = source.store_rows(
        "SELECT r.table_name, c.op, c.key IS NULL, c.old IS NULL, c.new IS NULL,"
        " c.unchanged IS NULL, count(*) FROM changes c JOIN relations r ON r.id = c.relation"
        " GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2"
    )
    assert rows == [
        ("k", "D", 0, 0, 1, 1, 300),
        ("k", "I", 0, 1, 0, 1, 300),
        ("k", "T", 1, 1, 1, 1, 1),
        ("k", "U", 0, 0, 0, 1, 300),
        ("nokey", "D", 1, 0, 1, 1, 300),
        ("nokey", "I", 1, 1, 0, 1, 300),
        ("nokey", "T", 1, 1, 1, 1, 1),
        ("nokey", "U", 1, 0, 0, 1, 300),
    ]


def test_changes_of_tables_not_audited_are_left_out(source):
    """wal2json streams every table: capture drops those it does not audit (in C, once it has
    resolved the table), and keeps every change of the audited one, in order."""
    source.sql("CREATE TABLE audited (id int PRIMARY KEY, v text)")
    source.sql("CREATE TABLE other (id int PRIMARY KEY, v text)")
    source.init(tables=["public.audited"])
    with source.connect(autocommit=False) as c:
        for i in range(1, 301):
            c.execute("INSERT INTO other VALUES (%s, 'o')", (i,))
            c.execute("INSERT INTO audited VALUES (%s, %s)", (i, f"a{i}"))
        c.commit()
    source.sql("UPDATE other SET v = 'p'")
    source.sql("DELETE FROM audited WHERE id > 200")
    source.capture()
    rows = source.store_rows(
        "SELECT r.table_name, c.op, c.new, c.old FROM changes c"
        " JOIN relations r ON r.id = c.relation ORDER BY c.id"
    )
    assert {r[0] for r in rows} == {"audited"}
    assert [(op, json.loads(new)) for _, op, new, _ in rows[:300]] == [
        ("I", [str(i), f"a{i}"]) for i in range(1, 301)
    ]
    assert [(op, json.loads(old)) for _, op, _, old in rows[300:]] == [
        ("D", [str(i), f"a{i}"]) for i in range(201, 301)
    ]
