"""The read side against a real capture: sessions, show, status, history, activity, prune."""

from __future__ import annotations

import csv
import io
import json
import re
import threading
import time

import psycopg
import pytest

from tests.conftest import STORES, run_cli
from tests.integration.test_undo import _as_session
from undo.core.errors import NotRecorded
from undo.core.times import epoch
from undo.source import keyforms, pg
from undo.source.pg import session_id
from undo.store import open_store
from undo.store.api import parse_key
from undo.stream.capture import capture


def _setup(src):
    src.sql("CREATE TABLE accounts (id int PRIMARY KEY, name text)")
    src.init()
    with src.connect(application_name="signup") as c:
        c.execute("INSERT INTO accounts VALUES (42, 'Ada'), (43, 'Bob')")
    with src.connect(application_name="support") as c:
        c.execute("UPDATE accounts SET name = 'Ada L.' WHERE id = 42")
    with src.connect(application_name="usage-metrics") as c:
        c.execute("DELETE FROM accounts WHERE id = 42")
    src.capture()


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_history_of_one_row_oldest_first(pgo):
    _setup(pgo)
    result = pgo.undo_cli("history", "public.accounts", "id=42", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["op"], r["application_name"]) for r in rows] == [
        ("insert", "signup"),
        ("update", "support"),
        ("delete", "usage-metrics"),
    ]
    assert rows[1]["old"] == {"id": "42", "name": "Ada"}
    assert rows[1]["new"] == {"id": "42", "name": "Ada L."}
    assert rows[2]["statement"] == "DELETE FROM accounts WHERE id = 42"
    bad = pgo.undo_cli("history", "public.accounts", "name=Ada")
    assert bad.returncode == 2 and "key" in bad.stderr


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_sessions_filters_and_show(pgo):
    _setup(pgo)
    result = pgo.undo_cli("sessions", "--app", "usage-metrics", "--json")
    (row,) = json.loads(result.stdout)
    assert (row["deletes"], row["tables"], row["transactions"]) == (1, ["public.accounts"], 1)
    assert set(row) >= {
        "session_id",
        "application_name",
        "user",
        "client_addr",
        "first_change_at",
        "last_change_at",
        "inserts",
        "updates",
    }
    shown = json.loads(pgo.undo_cli("show", "session", row["session_id"], "--json").stdout)
    (txn,) = shown["transactions"]
    assert txn["changes"][0]["old"] == {"id": "42", "name": "Ada L."}
    xact = json.loads(pgo.undo_cli("show", "xact", str(txn["xid"]), "--json").stdout)
    assert xact["transactions"][0]["xid"] == txn["xid"]
    qualified = json.loads(pgo.undo_cli("sessions", "--table", "public.accounts", "--json").stdout)
    assert row["session_id"] in [r["session_id"] for r in qualified]
    for name in ("accounts", "PUBLIC.Accounts", '"public"."accounts"'):
        by_name = json.loads(pgo.undo_cli("sessions", "--table", name, "--json").stdout)
        assert by_name == qualified, name
    nope = pgo.undo_cli("sessions", "--table", "public.nope", "--json")
    assert nope.returncode == 2 and nope.stdout == "" and nope.stderr.count("\n") == 1
    assert (
        json.loads(pgo.undo_cli("sessions", "--since", "2099-01-01T00:00:00Z", "--json").stdout)
        == []
    )


def test_activity_counts_match_the_changes(pgo):
    _setup(pgo)
    rows = open_store(pgo.store).activity(by="app", bucket_seconds=3600)
    got = {r.name: (r.inserts, r.updates, r.deletes) for r in rows}
    assert got == {"signup": (2, 0, 0), "support": (0, 1, 0), "usage-metrics": (0, 0, 1)}
    by_table = json.loads(
        pgo.undo_cli("activity", "--by", "table", "--bucket", "1d", "--json").stdout
    )
    assert [(r["table"], r["inserts"], r["deletes"]) for r in by_table] == [
        ("public.accounts", 2, 1)
    ]


def test_status_reports_slot_and_capture(pgo):
    _setup(pgo)
    pgo.sql("CREATE TABLE unaudited (id int)")
    pgo.sql("ALTER TABLE unaudited DISABLE TRIGGER undo_tag")
    st = json.loads(pgo.undo_cli("status", "--json").stdout)
    assert st["slot"]["name"] == pgo.slot and st["slot"]["wal_held_bytes"] >= 0
    assert st["transactions"] == 3 and st["last_commit_time"]
    assert st["unprepared_tables"] == ["public.unaudited"]


def test_prune_removes_what_committed_before_the_cut_and_keeps_the_ledger(pgo):
    _setup(pgo)
    store = open_store(pgo.store)
    db = store.file  # type: ignore[attr-defined]  # the SQLite store's own
    db.execute(
        "INSERT INTO undos (applied_at, target, selection, undo_xid, source)"
        " VALUES ('2020-01-01T00:00:00.000000Z', '{}', '[]', 1, 1)"
    )
    db.conn.commit()
    last = db.execute("SELECT max(commit_time) FROM transactions").fetchone()[0]
    report = store.prune(last)  # the last transaction committed at `last`: kept
    assert (report.transactions, report.changes) == (2, 3)
    assert db.execute("SELECT application_name FROM transactions").fetchall() == [
        ("usage-metrics",)
    ]
    assert db.execute("SELECT count(*) FROM undos").fetchone() == (1,)
    # the cut never passes the newest stored transaction (capture may be behind): it stays
    result = pgo.undo_cli("prune", "--before", "2099-01-01T00:00:00Z")
    assert result.returncode == 0 and "removed 0 transaction(s)" in result.stdout
    assert db.execute("SELECT count(*) FROM transactions").fetchone() == (1,)


def test_sessions_and_show_say_what_undid_them(pgo):
    pgo.sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO a VALUES (1), (2); INSERT INTO b VALUES (1), (2)")
    sid = _as_session(pgo, "DELETE FROM a; DELETE FROM b", app="usage-metrics")
    pgo.capture()

    def undone(*flags):
        listed = pgo.undo_cli("sessions", "--app", "usage-metrics", "--json", *flags)
        return [r["undone"] for r in json.loads(listed.stdout)]

    assert undone() == [None] and undone("--undone") == [] and undone("--not-undone") == [None]
    assert pgo.undo_cli("session", sid, "--table", "a", "--apply").returncode == 0
    pgo.capture()
    (first,) = undone("--undone")
    assert first["all"] is False and undone("--not-undone") == []
    assert "undone: part, by xid" in pgo.undo_cli("show", "session", sid).stdout
    assert pgo.undo_cli("session", sid, "--table", "b", "--apply").returncode == 0
    pgo.capture()
    (second,) = undone()
    assert second["all"] is True and second["undo_xid"] != first["undo_xid"]
    assert pgo.undo_cli("xact", str(second["undo_xid"]), "--apply").returncode == 0
    pgo.capture()
    assert undone() == [first]  # the undo of b was undone: only a's undo stands
    text = pgo.undo_cli("sessions", "--app", "usage-metrics").stdout
    assert "part, by xid" in text and "trusted" in text


def test_history_of_a_keyless_row_and_of_an_unknown_row(pgo):
    pgo.sql("CREATE TABLE log (at int, msg text)")
    pgo.init()
    with pgo.connect(application_name="app") as c:
        c.execute("INSERT INTO log VALUES (1, 'a'), (2, 'b')")
        c.execute("UPDATE log SET msg = 'c' WHERE at = 2")
    with pgo.connect(application_name="cleanup") as c:
        c.execute("DELETE FROM log WHERE msg = 'c'")
    pgo.capture()
    rows = json.loads(pgo.undo_cli("history", "log", "at=2", "--json").stdout)
    assert [(r["op"], r["application_name"]) for r in rows] == [
        ("insert", "app"),
        ("update", "app"),
        ("delete", "cleanup"),
    ]
    rows = json.loads(pgo.undo_cli("history", "log", "at=2", "msg=b", "--json").stdout)
    assert [r["op"] for r in rows] == ["insert", "update"]  # the rows holding both values
    for args in (["log", "at=3"], ["log", "msg=\\N"]):
        result = pgo.undo_cli("history", *args)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.count("\n") == 1
        assert "no recorded change of public.log" in result.stderr
    result = pgo.undo_cli("history", "log", "nope=1")
    assert result.returncode == 2


def test_history_names_the_undo_that_made_a_version(pgo):
    _setup(pgo)
    sid = json.loads(pgo.undo_cli("sessions", "--app", "usage-metrics", "--json").stdout)[0]
    assert pgo.undo_cli("session", sid["session_id"], "--apply").returncode == 0
    pgo.capture()
    rows = json.loads(pgo.undo_cli("history", "accounts", "id=42", "--json").stdout)
    assert rows[-1]["op"] == "insert" and rows[-1]["application_name"] == "undo"
    assert rows[-1]["undo_of"] == {"session": sid["session_id"]}
    assert 'undo of: {"session"' in pgo.undo_cli("history", "accounts", "id=42").stdout


def test_lag_is_zero_when_caught_up_and_the_age_of_the_oldest_unstored_commit(source):
    """A quiet database must not look behind (the age of the last commit is not lag); a
    backlog's lag is the age of its oldest commit, found by peeking the slot, or while capture
    holds the slot, what capture last reported."""
    from undo.source.status import status

    source.sql("CREATE TABLE t (id int PRIMARY KEY)")
    source.init()
    source.sql("INSERT INTO t VALUES (1)")
    source.capture()
    time.sleep(1.5)
    quiet = status(source.settings)
    assert quiet["lag_seconds"] == 0 and quiet["lag_bytes"] < 1_000_000
    source.sql("INSERT INTO t VALUES (2)")
    time.sleep(1.5)
    source.sql("INSERT INTO t VALUES (3)")
    behind = status(source.settings)
    assert 1.5 <= behind["lag_seconds"] < 60 and behind["lag_bytes"] > 0
    started = time.time()
    stop = threading.Event()
    worker = threading.Thread(
        target=capture, args=(source.settings,), kwargs={"should_stop": stop.is_set}
    )
    worker.start()
    try:
        for _ in range(100):
            running = status(source.settings)
            reported = running.get("lag_reported_at")
            if running["slot"]["active_pid"] and reported and epoch(reported) >= started:
                break
            time.sleep(0.1)
        assert running["slot"]["active_pid"] and epoch(running["lag_reported_at"]) >= started
        assert 0 <= running["lag_seconds"] < 60  # the backlog's age when stored, then 0
    finally:
        stop.set()
        worker.join(timeout=30)


def test_lag_counts_a_transaction_capture_is_still_writing(source, monkeypatch):
    """The on-call's page: status said lag_seconds 0.0 for 10 s while capture wrote a committed
    500,000-row update (its batch not committed yet), then 7.68. The lag is the age of the
    oldest commit not yet stored, which capture records when it starts writing it."""
    from undo.source.status import status
    from undo.store import _writer as writer_module

    source.sql("CREATE TABLE t (id int PRIMARY KEY)")
    source.init()
    source.capture()  # caught up: capture reported 0
    source.sql("INSERT INTO t SELECT g FROM generate_series(1, 2000) g")
    committed = time.time()
    time.sleep(2)
    writing, go_on = threading.Event(), threading.Event()
    write_rows = writer_module.StoreWriter._write_rows

    def slow(self):  # capture stays in the middle of the transaction until told to go on
        if self.txn is not None and not writing.is_set():
            writing.set()
            go_on.wait(60)
        write_rows(self)

    monkeypatch.setattr(writer_module.StoreWriter, "_write_rows", slow)
    worker = threading.Thread(target=capture, args=(source.settings,), kwargs={"once": True})
    worker.start()
    try:
        assert writing.wait(60)
        busy = status(source.settings)
        assert busy["slot"]["active_pid"]
        assert busy["lag_seconds"] is not None and busy["lag_seconds"] >= 2
        assert busy["lag_seconds"] <= time.time() - committed + 1
    finally:
        go_on.set()
        worker.join(timeout=60)
    caught_up = status(source.settings)
    assert caught_up["lag_seconds"] == 0


def test_show_reads_like_psql_with_a_summary_and_a_limit(pgo):
    pgo.sql("CREATE TABLE accounts (id int PRIMARY KEY, name text)")
    pgo.init()
    sid = _as_session(
        pgo,
        "INSERT INTO accounts SELECT g, NULL FROM generate_series(1, 5) g",
        "UPDATE accounts SET name = 'x' WHERE id = 1",
        app="import",
    )
    pgo.capture()
    out = pgo.undo_cli("show", "session", sid, "--limit", "2").stdout
    assert out.startswith(f"session {sid}: 2 transaction(s), 6 change(s)")
    assert "public.accounts  insert     5" in out and "public.accounts  update     1" in out
    assert "insert   public.accounts  id=1" in out and "new: id=1, name=NULL" in out
    assert "(4 more change(s): --limit N or --all to see them)" in out
    assert "None" not in out and "['" not in out and "{'" not in out
    every = pgo.undo_cli("show", "session", sid, "--all").stdout
    assert "more change(s)" not in every and "old: id=1, name=NULL" in every
    assert "new: name=x" in every  # an update shows what it changed
    status = pgo.undo_cli("status").stdout
    assert "slot.confirmed_flush_lsn" in status and "{'" not in status


def test_every_table_name_shown_can_be_given_back(pgo):
    """A table name a listing prints is one `--table` takes back: quoted as PostgreSQL reads it.
    On 6e4cc57 `sessions`, `show`, `activity --by table` and /metrics printed `odd."we"ird.x]"`
    unquoted, which names another table (or none)."""
    pgo.sql('CREATE SCHEMA "Odd"; CREATE TABLE "Odd"."we""ird.x]" (id int PRIMARY KEY)')
    pgo.init(schemas=["Odd"])
    with pgo.connect(application_name="cron") as c:
        c.execute('INSERT INTO "Odd"."we""ird.x]" VALUES (1)')
        sid = session_id(c)
    pgo.capture()
    name = '"Odd"."we""ird.x]"'
    (row,) = json.loads(pgo.undo_cli("sessions", "--json").stdout)
    assert row["tables"] == [name]
    shown = json.loads(pgo.undo_cli("show", "session", sid, "--json").stdout)
    assert [c["table"] for t in shown["transactions"] for c in t["changes"]] == [name]
    by_table = json.loads(pgo.undo_cli("activity", "--by", "table", "--json").stdout)
    assert {r["table"] for r in by_table} == {name}
    from prometheus_client import generate_latest

    from undo.web.metrics import registry

    metrics = generate_latest(registry(pgo.settings)).decode()
    assert 'table="\\"Odd\\".\\"we\\"\\"ird.x]\\""' in metrics
    # and each is taken back
    undone = pgo.undo_cli("session", sid, "--table", name, "--apply")
    assert undone.returncode == 0, undone.stderr
    assert pgo.sql('SELECT count(*) FROM "Odd"."we""ird.x]"') == [(0,)]


_INVOICES = (
    "CREATE TABLE invoices (id int NOT NULL, issued_at timestamptz NOT NULL,"
    " amount numeric(10,2)) PARTITION BY RANGE (issued_at);"
    " CREATE TABLE invoices_2026_09 PARTITION OF invoices (PRIMARY KEY (id))"
    "  FOR VALUES FROM ('2026-09-01') TO ('2026-10-01');"
    " CREATE TABLE invoices_2026_10 PARTITION OF invoices (PRIMARY KEY (id))"
    "  FOR VALUES FROM ('2026-10-01') TO ('2026-11-01')"
)


def test_history_takes_a_partitioned_table_and_follows_a_row_across_partitions(source):
    source.sql(_INVOICES)
    source.init()
    with source.connect(application_name="billing") as c:
        c.execute(
            "INSERT INTO invoices VALUES (150, '2026-09-30 10:00+00', 10), (151, '2026-10-02', 1)"
        )
        c.execute("UPDATE invoices SET amount = 12 WHERE id = 150")
    with source.connect(application_name="fix-dates") as c:
        c.execute("UPDATE invoices SET issued_at = '2026-10-20' WHERE id = 150")  # moves it
    with source.connect(application_name="billing") as c:
        c.execute("UPDATE invoices SET amount = 13 WHERE id = 150")
    source.capture()
    result = source.undo_cli("history", "public.invoices", "id=150", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["op"], r["table"], r["moved_from"], r["application_name"]) for r in rows] == [
        ("insert", "public.invoices_2026_09", None, "billing"),
        ("update", "public.invoices_2026_09", None, "billing"),
        ("update", "public.invoices_2026_10", "public.invoices_2026_09", "fix-dates"),
        ("update", "public.invoices_2026_10", None, "billing"),
    ]
    assert rows[2]["old"] == {"id": "150", "issued_at": "2026-09-30 10:00:00+00", "amount": "12.00"}
    assert rows[2]["new"] == {"id": "150", "issued_at": "2026-10-20 00:00:00+00", "amount": "12.00"}
    text = source.undo_cli("history", "invoices", "id=150").stdout
    assert "moved from public.invoices_2026_09 to public.invoices_2026_10" in text
    # a partition's own name: its changes only, the move an insert there
    leaf = json.loads(source.undo_cli("history", "invoices_2026_10", "id=150", "--json").stdout)
    assert [(r["op"], r["moved_from"]) for r in leaf] == [("insert", None), ("update", None)]
    assert source.store_rows(
        "SELECT DISTINCT table_name, root_schema, root_table FROM relations ORDER BY 1"
    ) == [("invoices_2026_09", "public", "invoices"), ("invoices_2026_10", "public", "invoices")]
    # a store made before roots were recorded: partitions by their own names only
    source.store_rows("UPDATE relations SET root_schema = NULL, root_table = NULL")
    old = source.undo_cli("history", "public.invoices_2026_09", "id=150", "--json")
    assert [r["op"] for r in json.loads(old.stdout)] == ["insert", "update", "delete"]
    assert source.undo_cli("history", "public.invoices", "id=150").returncode == 2


def test_metrics_count_a_partitions_changes_under_its_partitioned_table(source):
    """/metrics labels a partition's changes with its partitioned table (the root capture
    recorded, m012), so a table is one series however many partitions it has and Grafana's
    labels stay bounded; on 6305851 each partition was a series of its own."""
    from prometheus_client import generate_latest

    from undo.web.metrics import registry

    source.sql(_INVOICES)
    source.init()
    with source.connect(application_name="billing") as c:
        c.execute("INSERT INTO invoices VALUES (1, '2026-09-05', 10), (2, '2026-10-05', 20)")
        c.execute("UPDATE invoices SET issued_at = '2026-10-06' WHERE id = 1")  # moves it
    source.capture()
    text = generate_latest(registry(source.settings)).decode()
    series = {
        (labels["table"], labels["operation"]): float(value)
        for line in text.splitlines()
        if line.startswith("undo_changes_total{")
        for labels, value in [(dict(re.findall(r'(\w+)="([^"]*)"', line)), line.rsplit(" ", 1)[1])]
    }
    assert {table for table, _ in series} == {"public.invoices"}
    # the move is a delete in one partition and an insert in the other
    assert series["public.invoices", "insert"] == 3 and series["public.invoices", "delete"] == 1


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_sessions_table_takes_a_partitioned_table_for_its_partitions(source):
    """A partitioned table's changes are stored under its partitions (the stream's names):
    `sessions --table PARENT` means all of them, as /metrics and history count them; on
    b6ddbd6 it was exit 2, no table of that name."""
    source.sql(_INVOICES + "; CREATE TABLE other (id int PRIMARY KEY)")
    source.init()
    with source.connect(application_name="billing") as c:
        c.execute("INSERT INTO invoices VALUES (1, '2026-09-05', 10)")
    with source.connect(application_name="october") as c:
        c.execute("UPDATE invoices SET amount = 11 WHERE id = 1")
        c.execute("INSERT INTO invoices VALUES (2, '2026-10-05', 20)")
    with source.connect(application_name="elsewhere") as c:
        c.execute("INSERT INTO other VALUES (1)")
    source.capture()

    def apps(*table: str) -> list[str]:
        result = source.undo_cli("sessions", *table, "--json")
        assert result.returncode == 0, result.stderr
        return sorted(r["application_name"] for r in json.loads(result.stdout))

    assert apps("--table", "invoices") == ["billing", "october"]
    assert apps("--table", "public.invoices") == ["billing", "october"]
    assert apps("--table", "invoices_2026_10") == ["october"]  # a partition: its own only
    assert apps("--table", "invoices", "--table", "other") == []  # both: none touched both
    (row,) = json.loads(source.undo_cli("sessions", "--app", "october", "--json").stdout)
    assert row["tables"] == ["public.invoices_2026_09", "public.invoices_2026_10"]


def test_history_reads_a_key_in_any_form_its_type_reads_the_same(pgo):
    pgo.sql(
        "CREATE TABLE payments (id bigint, issued_at timestamptz, PRIMARY KEY (id, issued_at));"
        " CREATE TABLE ledger (n int, amount numeric(10,2), x numeric, ref uuid, paid boolean,"
        " day date, at timestamp, code char(4), note text)"
    )
    pgo.init()
    with pgo.connect(application_name="app") as c:
        c.execute("INSERT INTO payments VALUES (150, '2026-10-20 00:00:00+00')")
        c.execute(
            "INSERT INTO ledger VALUES (7, 7.5, 15.0, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',"
            " true, '2026-10-20', '2026-10-20 08:30', 'ab', 'hi')"
        )
    pgo.capture()
    db = open_store(pgo.store)
    # without the source: the documented forms (README, Commands: history)
    for key in (
        ["id=150", "issued_at=2026-10-20"],
        ["id=+0150", "issued_at=2026-10-20T02:00:00+02:00"],
        ["id= 150 ", "issued_at=2026-10-20 00:00:00.000Z"],
        ["id=150", "issued_at=2026-10-20 00:00:00+00"],
    ):
        rows = db.history("payments", parse_key(key), keyforms.offline)
        assert [r.op for r in rows] == ["insert"], key
    for pair in (
        "n=007",
        "amount=7.5",
        "amount=7.500",
        "x=1.50e1",
        "ref=A0EEBC999C0B4EF8BB6D6BB9BD380A11",
        "ref={a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
        "paid=yes",
        "paid=TRUE",
        "day=20261020",
        "at=2026-10-20T08:30:00.000",
        "code=ab",
        "note=hi",
    ):
        rows = db.history("ledger", parse_key([pair]), keyforms.offline)
        assert [r.op for r in rows] == ["insert"], pair
    for pair in ("note= hi", "x=15", "paid=no", "day=2026-10-21"):
        with pytest.raises(NotRecorded):
            db.history("ledger", parse_key([pair]), keyforms.offline)
    # through the source: whatever the type's input function reads
    found = pgo.undo_cli("history", "payments", "id=150", "issued_at=Oct 20 2026", "--json")
    assert found.returncode == 0, found.stderr
    assert [r["op"] for r in json.loads(found.stdout)] == ["insert"]
    bad = pgo.undo_cli("history", "payments", "id=abc", "issued_at=2026-10-20")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "id=abc" in bad.stderr
    # the source out of reach: the documented forms, and a warning saying so
    away = ["--dsn", "host=127.0.0.1 port=1 connect_timeout=2"]
    found = pgo.undo_cli("history", "payments", "id=150", "issued_at=2026-10-20", *away)
    assert found.returncode == 0, found.stderr
    assert "2026-10-20 00:00:00+00" in found.stdout and "cannot connect" in found.stderr
    missed = pgo.undo_cli("history", "payments", "id=150", "issued_at=Oct 20 2026", *away)
    assert missed.returncode == 1
    # libpq's variables alone stand in for --dsn, as for every other command: they said "no
    # recorded change" (exit 1) for id=abc, with no warning
    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE"}
    names["password"] = "PGPASSWORD"
    libpq = {names[k]: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(pgo.dsn).items()}
    bad = run_cli(
        pgo, "--dsn", "", "history", "payments", "id=abc", "issued_at=2026-10-20", env=libpq
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "id=abc" in bad.stderr
    found = run_cli(
        pgo, "--dsn", "", "history", "payments", "id=150", "issued_at=Oct 20 2026", env=libpq
    )
    assert found.returncode == 0 and "warning" not in found.stderr, found.stderr
    away_libpq = {**libpq, "PGHOST": "127.0.0.1", "PGPORT": "1", "PGCONNECT_TIMEOUT": "2"}
    found = run_cli(
        pgo, "--dsn", "", "history", "payments", "id=150", "issued_at=2026-10-20", env=away_libpq
    )
    assert found.returncode == 0 and "cannot connect" in found.stderr, found.stderr


_FORMS = {
    "integer": [" +0150 ", "-7", "007"],
    "bigint": ["9223372036854775807", "-0"],
    "numeric": ["7.5", "1.50e1", "-0.00", ".5", "1.", "NaN", "nan", "-Infinity", "inf", "150e-2"],
    "numeric(10,2)": ["2.345", "-2.345", "7", "2.344999"],
    "numeric(5)": ["2.5", "-2.5"],
    "boolean": ["yes", "TRUE", "t", "of", "off", "n", "1", "0", " on "],
    "uuid": [
        "A0EEBC999C0B4EF8BB6D6BB9BD380A11",
        "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    ],
    "date": ["20261020", "2026-10-20", " 2026-10-20 ", "infinity", "2026-10-20 13:00"],
    "timestamp without time zone": [
        "2026-10-20T08:30",
        "2026-10-20 08:30:00.250",
        "2026-10-20 08:30+02",
        "2026-10-20",
        "-infinity",
    ],
    "timestamp(3) without time zone": ["2026-10-20 08:30:00.12351", "2026-10-20 23:59:59.9999"],
    "timestamp with time zone": [
        "2026-10-20",
        "2026-10-20T02:00:00+02:00",
        "2026-10-20 00:00:00Z",
        "2026-10-20 00:00:00.5-03:30",
        "2026-10-20 00:00:00+00",
    ],
    "timestamp(0) with time zone": ["2026-10-20 00:00:00.6+00"],
    "character(4)": ["ab", "abcd  "],
    "character varying(9)": [" hi "],
    "text": [" hi ", "Ü"],
}


def test_the_documented_forms_read_as_postgresql_reads_them(pgo):
    """history without a source compares these forms as the source's types would read them."""
    with psycopg.connect(pgo.dsn, options=pg.PINNED_OPTIONS, autocommit=True) as c:
        source = keyforms.through_source(c)
        for type_name, values in _FORMS.items():
            for value in values:
                got = keyforms.offline("c", type_name, value)
                assert got == source("c", type_name, value), (type_name, value)


def test_show_lists_every_statement_before_the_changes(pgo):
    """The on-call's page: `show session` printed the first 100 changes, all of the first
    transaction, and the `DELETE FROM orders ...` that did the damage never appeared; with
    --limit 0 it printed no statement at all. Statements come first, all of them; --limit
    cuts the changes only."""
    pgo.sql("CREATE TABLE orders (id int PRIMARY KEY, status text)")
    pgo.sql("INSERT INTO orders SELECT g, 'new' FROM generate_series(1, 150) g")
    pgo.init()
    sid = _as_session(
        pgo,
        "UPDATE orders SET status = 'billed'",
        "DELETE FROM orders\nWHERE id > 140",
        app="billing",
    )
    pgo.capture()
    out = pgo.undo_cli("show", "session", sid).stdout
    assert "statement: DELETE FROM orders" in out and "             WHERE id > 140" in out
    assert out.index("statement: DELETE FROM orders") < out.index("update   public.orders")
    assert "150 update(s)" in out and "10 delete(s)" in out  # each transaction's changes
    assert "(60 more change(s): --limit N or --all to see them)" in out
    bare = pgo.undo_cli("show", "session", sid, "--limit", "0").stdout
    assert "statement: UPDATE orders SET status = 'billed'" in bare
    assert "statement: DELETE FROM orders" in bare and "public.orders  id=" not in bare
    assert "(160 more change(s)" in bare
    assert ".0" not in out.split("statements:")[1].split("\n")[1]  # times to the second
    records = pgo.undo_cli("show", "session", sid, "-x", "--limit", "1").stdout
    assert "statement        | DELETE FROM orders WHERE id > 140" in records
    assert "-[ RECORD 1 ]" in records and "op    | update" in records
    rows = list(
        csv.DictReader(io.StringIO(pgo.undo_cli("show", "session", sid, "--format", "csv").stdout))
    )
    assert (
        len(rows) == 160
        and rows[-1]["op"] == "delete"
        and rows[-1]["statement"].startswith("DELETE")
    )
    assert json.loads(rows[-1]["old"]) == {"id": "150", "status": "billed"}
    cut = json.loads(pgo.undo_cli("show", "session", sid, "--json", "--limit", "5").stdout)
    assert [len(t["changes"]) for t in cut["transactions"]] == [5, 0]
    assert cut["changes_left_out"] == 155 and cut["totals"]["changes"] == 160
    whole = json.loads(pgo.undo_cli("show", "session", sid, "--json").stdout)
    assert sum(len(t["changes"]) for t in whole["transactions"]) == 160


def test_sessions_and_history_take_limit_format_and_expanded(pgo):
    """The on-call's page: `undo sessions` printed lines of 397 characters with microseconds,
    had no --limit, and an empty result printed only its headers."""
    _setup(pgo)
    text = pgo.undo_cli("sessions").stdout
    assert not re.search(r"\d\d:\d\d:\d\d\.\d", text)  # times to the second
    assert text.splitlines()[-1] == "(3 rows)"
    newest = pgo.undo_cli("sessions", "--limit", "1")
    assert newest.returncode == 0 and "usage-metrics" in newest.stdout
    assert "signup" not in newest.stdout
    assert newest.stdout.splitlines()[-1] == "(1 row) (more with a higher --limit)"
    listed = json.loads(pgo.undo_cli("sessions", "--format", "json", "--limit", "2").stdout)
    assert [r["application_name"] for r in listed] == ["usage-metrics", "support"]
    assert re.fullmatch(r".*\.\d{6}Z", listed[0]["first_change_at"])  # JSON: whole
    table = list(csv.DictReader(io.StringIO(pgo.undo_cli("sessions", "--format", "csv").stdout)))
    assert [r["application_name"] for r in table] == ["usage-metrics", "support", "signup"]
    assert json.loads(table[0]["tables"]) == ["public.accounts"] and table[0]["undone"] == ""
    records = pgo.undo_cli("sessions", "-x", "--app", "signup").stdout
    assert records.startswith("-[ RECORD 1 ]") and "\napplication_name | signup\n" in records
    none = pgo.undo_cli("sessions", "--app", "nobody").stdout
    assert none.splitlines()[0].startswith("session_id") and none.endswith("(0 rows)\n")
    first = pgo.undo_cli("history", "accounts", "id=42", "--limit", "2").stdout
    assert "insert" in first and "update" in first and "delete" not in first
    assert first.endswith("(2 rows) (more with a higher --limit)\n")
    versions = list(
        csv.DictReader(
            io.StringIO(pgo.undo_cli("history", "accounts", "id=42", "--format", "csv").stdout)
        )
    )
    assert [v["op"] for v in versions] == ["insert", "update", "delete"]
    assert json.loads(versions[1]["new"]) == {"id": "42", "name": "Ada L."}
    expanded = pgo.undo_cli("history", "accounts", "id=42", "-x").stdout
    assert (
        expanded.count("-[ RECORD") == 3 and "statement        | DELETE FROM accounts" in expanded
    )


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_a_page_of_changes_is_the_slice_of_them_all(pgo):
    """The dashboard's pages of a session's changes (changes_page, read by id ranges) are
    exactly the slices of all its changes in commit order: none skipped, none twice, across
    transactions of every size, a transaction with no change among them."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    with pgo.connect(application_name="pager") as c:
        for n in (1, 7, 0, 3, 12, 1):
            with c.transaction():
                c.execute("SELECT 1")  # a transaction with no change when n = 0
                for _ in range(n):
                    c.execute("INSERT INTO t SELECT coalesce(max(id), 0) + 1, 'x' FROM t")
    pgo.capture()
    with open_store(pgo.store) as db:
        txns = db.transactions(app="pager")
        ids = [t.id for t in txns]
        every = [(c.txn, c.ord) for c in db.changes_page(ids, 1000, 0)]
        assert len(every) == 24 and every == sorted(every)
        for limit in (1, 5, 24):
            for offset in range(0, 26):
                page = [(c.txn, c.ord) for c in db.changes_page(ids, limit, offset)]
                assert page == every[offset : offset + limit], (limit, offset)


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_each_session_lists_its_own_tables_however_many_sessions(pgo, monkeypatch):
    """A listing of more sessions than one IN list takes reads every session's tables in one
    query when unfiltered, in chunks of ids when filtered (here a chunk is 2 sessions, as 500
    are in a store): each session's tables are its own either way."""
    from undo.store import _queries

    pgo.sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    pgo.init()
    expected = {}
    for i in range(5):
        tables = ["a", "b", "a b"][i % 3].split()
        with pgo.connect(application_name=f"app{i % 2}") as c:
            sid = session_id(c)
            for t in tables:
                c.execute(f"INSERT INTO {t} VALUES ({i})")
        expected[sid] = tuple(f"public.{t}" for t in tables)
    pgo.capture()

    def listed(**kw):
        db = open_store(pgo.store)
        try:
            return {r.session_id: r.tables for r in db.sessions(**kw)}
        finally:
            db.close()

    whole, app0 = listed(), listed(app="app0")
    monkeypatch.setattr(_queries, "_IDS_AT_ONCE", 2)
    assert listed() == whole == expected
    assert listed(app="app0") == app0 == {s: t for s, t in expected.items() if s in app0}
    assert len(app0) == 3
