"""Retention by one rule on both stores (docs/operations.md, "Retention"): `undo prune` cuts
history per transaction, a session the cut went through keeps only its later transactions and
an undo of it refuses (or, with --on-conflict skip, undoes exactly what is kept), /metrics'
counters never go down; on a PostgreSQL store the cut is a partition boundary and the
partitions before it are dropped, never rewritten."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psycopg
import pytest
from prometheus_client import generate_latest
from psycopg import sql

from tests.conftest import STORES, Source, erase_own_tag
from tests.integration.test_bad_input import env_of, wait_for
from undo.source.pg import session_id
from undo.store import open_store
from undo.web.metrics import registry


def _narrow_partitions(src: Source, seconds: int = 1) -> None:
    """A PostgreSQL store with partitions of ``seconds`` (init made day-wide ones, still empty):
    so that a test's transactions fall on both sides of a partition boundary."""
    if not src.pg_store:
        return
    with psycopg.connect(src.store, autocommit=True) as c:
        for (name,) in c.execute("SELECT name FROM undo_store.change_partitions").fetchall():
            c.execute(sql.SQL("DROP TABLE undo_store.{}").format(sql.Identifier(name)))
        c.execute("DELETE FROM undo_store.change_partitions")
        c.execute(
            "INSERT INTO undo_store.meta (source, key, value) VALUES (0, 'partition_seconds', %s)"
            " ON CONFLICT (source, key) DO UPDATE SET value = excluded.value",
            (str(seconds),),
        )


def _partitions(src: Source) -> list[tuple[str, str]]:
    """(name, lower) of the partitions of changes, as PostgreSQL has them attached."""
    with psycopg.connect(src.store) as c:
        return [
            (r[0], r[1])
            for r in c.execute(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
                " JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'undo_store.changes'::regclass ORDER BY 1"
            )
        ]


def _past_a_boundary(src: Source) -> str:
    """A time after what committed before, in a later partition of 1 s (see above)."""
    time.sleep(1.1)
    return src.now()


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_an_undo_of_a_session_the_cut_went_through_refuses_or_undoes_what_is_kept(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    _narrow_partitions(pgo)
    with pgo.connect(application_name="nightly") as c:
        sid = session_id(c)
        c.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")  # before the cut: pruned
        cut = _past_a_boundary(pgo)
        c.execute("UPDATE t SET v = 'B' WHERE id = 2")  # after it: kept
        c.execute("DELETE FROM t WHERE id = 1")
    pgo.capture()
    pruned = pgo.undo_cli("prune", "--before", cut)
    assert pruned.returncode == 0, pruned.stderr
    assert "removed 1 transaction(s), 2 change(s) of 1 session(s)" in pruned.stdout
    assert "1 session(s) go on after it and keep their later transactions only" in pruned.stdout
    assert pgo.store_rows("SELECT count(*), sum(inserts) FROM transactions") == [(2, 0)]
    assert pgo.store_rows("SELECT count(*) FROM changes") == [(2,)]

    refused = pgo.undo_cli("session", sid, "--apply")
    assert refused.returncode == 1, refused.stderr
    assert f"session {sid} began before" in refused.stderr and "pruned" in refused.stderr
    assert "--on-conflict skip" in refused.stderr and refused.stderr.count("\n") == 1
    assert pgo.sql("SELECT * FROM t ORDER BY id") == [(2, "B")]

    kept = pgo.undo_cli("session", sid, "--apply", "--on-conflict", "skip")
    assert kept.returncode == 1, kept.stderr
    assert "cannot undo: session" in kept.stderr and "applied in xid" in kept.stderr
    # exactly what was kept is undone: the update and the delete, not the pruned inserts
    assert pgo.sql("SELECT * FROM t ORDER BY id") == [(1, "a"), (2, "b")]

    if pgo.pg_store:  # the partition of the pruned transaction is gone; none was rewritten
        (cut_text,) = re.findall(r"committed before (\S+);", pruned.stdout)
        assert cut_text <= cut
        names = {n for n, _ in _partitions(pgo)}
        assert names == {n for (n,) in pgo.store_rows("SELECT name FROM change_partitions")}
        assert pgo.store_rows(
            "SELECT count(*) FROM change_partitions WHERE lower < ?", [cut_text]
        ) == [(0,)]


def _counters(src: Source) -> dict[str, float]:
    """Every counter sample of /metrics, by its series."""
    text = generate_latest(registry(src.settings)).decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("undo_") and "_total" in line.split("{")[0]
    }


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_metrics_counters_never_go_down_when_history_is_pruned(pgo):
    """Prometheus reads a counter that drops as a reset: what prune deletes stays counted."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    _narrow_partitions(pgo)
    with pgo.connect(application_name="web") as c:
        c.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
        c.execute("UPDATE t SET v = 'c' WHERE id = 1")
    with pgo.connect(application_name="web") as c, c.transaction():
        erase_own_tag(c)  # an untrusted ('missing') write, and a malformed tag message
        c.execute("SELECT pg_logical_emit_message(true, 'undo', 'not a tag')")
        c.execute("INSERT INTO t VALUES (3, 'x')")
    cut = _past_a_boundary(pgo)
    with pgo.connect(application_name="report") as c:
        c.execute("DELETE FROM t WHERE id = 2")
    pgo.capture()
    before = _counters(pgo)
    key = (
        'undo_changes_total{application="web",operation="insert",'
        f'source="{pgo.dbname}",table="public.t"}}'
    )
    assert before[key] == 2
    assert any(k.startswith("undo_untrusted_writes_total") for k in before)
    assert any(k.startswith("undo_malformed_messages_total") for k in before)
    pruned = pgo.undo_cli("prune", "--before", cut)
    assert pruned.returncode == 0, pruned.stderr
    assert "removed 3 transaction(s)" in pruned.stdout
    assert pgo.store_rows("SELECT count(*) FROM transactions") == [(1,)]
    assert _counters(pgo) == before
    with pgo.connect(application_name="web") as c:
        c.execute("INSERT INTO t VALUES (4, 'd')")
    pgo.capture()
    after = _counters(pgo)
    assert after[key] == 3 and all(after[k] >= v for k, v in before.items())
    everything = pgo.undo_cli("prune", "--before", "2099-01-01T00:00:00Z")
    assert everything.returncode == 0, everything.stderr
    assert _counters(pgo) == after


@pytest.mark.parametrize("store_kind", ["postgresql"], indirect=True)
def test_keep_on_a_postgresql_store_drops_the_old_partitions_while_capturing(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    _narrow_partitions(pgo)
    pgo.sql("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 1000) g")
    pgo.capture()
    old = _partitions(pgo)
    time.sleep(3)
    pgo.sql("INSERT INTO t VALUES (100001, 'new')")
    pgo.capture()  # stored up to now: capture --keep's first step may drop what is older
    proc = subprocess.Popen(
        [sys.executable, "-m", "undo", "capture", "--keep", "2s"],
        env=env_of(pgo),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # a step of --keep that finds nothing to do looks again a minute later
        # (PRUNE_IDLE_SECONDS): on a loaded machine the first look may come too early
        wait_for(lambda: pgo.store_rows("SELECT count(*) FROM changes") == [(1,)], timeout=150)
        wait_for(lambda: not set(old) & set(_partitions(pgo)), timeout=150)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert pgo.store_rows("SELECT count(*) FROM transactions WHERE inserts = 1000") == [(0,)]
    assert pgo.store_rows("SELECT value IS NOT NULL FROM meta WHERE key = 'pruned_before'") == [
        (True,)
    ]
    # the log names the real cut (a partition boundary), not the time --keep asked for
    logged = re.findall(r"committed before (\S+) \(--keep\)", err)
    assert logged, err
    db = open_store(pgo.store, source=pgo.dbname)
    try:
        # a later step with nothing to log may move the cut on: each logged one is a boundary
        # (partitions of a second here) and none is past the store's
        cut = db.meta("pruned_before")
        assert cut is not None and all(t.endswith(".000000Z") and t <= cut for t in logged)
    finally:
        db.close()


@pytest.mark.parametrize("store_kind", ["postgresql"], indirect=True)
def test_prune_waits_for_a_reader_of_the_partition_and_blocks_no_other(pgo):
    """DETACH ... CONCURRENTLY: a reader's open transaction holds the drop back, while other
    readers (and capture) go on reading and writing changes."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    _narrow_partitions(pgo)
    pgo.sql("INSERT INTO t VALUES (1)")
    cut = _past_a_boundary(pgo)
    pgo.sql("INSERT INTO t VALUES (2)")
    pgo.capture()
    with psycopg.connect(pgo.store) as reader:
        reader.execute("SELECT count(*) FROM undo_store.changes").fetchone()  # holds a snapshot
        proc = subprocess.Popen(
            [sys.executable, "-m", "undo", "prune", "--before", cut],
            env=env_of(pgo),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        assert proc.poll() is None  # waiting for the reader
        with psycopg.connect(pgo.store, options="-c statement_timeout=5s") as other:
            other.execute("SELECT count(*) FROM undo_store.changes").fetchone()
        pgo.sql("INSERT INTO t VALUES (3)")
        assert pgo.capture().changes == 1
        reader.rollback()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "removed 1 transaction(s)" in out
    assert pgo.store_rows("SELECT count(*) FROM changes") == [(2,)]


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_a_prune_before_a_time_to_come_cuts_no_later_than_now(pgo):
    """A cut in the future would make every later session one that "began before the cut"."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1)")
    pgo.capture()
    pruned = pgo.undo_cli("prune", "--before", "2099-01-01T00:00:00Z")
    assert pruned.returncode == 0, pruned.stderr
    assert "committed before 2099" not in pruned.stdout
    time.sleep(1.1)  # a session that began in the cut's second may have begun before it
    with pgo.connect(application_name="later") as c:
        sid = session_id(c)
        c.execute("DELETE FROM t")
    pgo.capture()
    undone = pgo.undo_cli("session", sid, "--apply")
    assert undone.returncode == 0, undone.stderr
    assert pgo.sql("SELECT id FROM t") == [(1,)]


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_an_undo_of_a_session_or_app_wholly_pruned_is_refused_not_unknown(pgo):
    """Every transaction of the session (and of the application) pruned: the store holds none,
    which gave exit 2 "unknown session" / "no transaction of application"; the session's id
    says it began before the cut, so it is the prune's refusal (exit 1)."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    _narrow_partitions(pgo)
    since = pgo.now()
    with pgo.connect(application_name="nightly") as c:
        sid = session_id(c)
        c.execute("INSERT INTO t VALUES (1, 'a')")
    cut = _past_a_boundary(pgo)
    pgo.sql("INSERT INTO t VALUES (2, 'b')")  # another session's, kept
    pgo.capture()
    pruned = pgo.undo_cli("prune", "--before", cut)
    assert pruned.returncode == 0, pruned.stderr
    assert pgo.store_rows("SELECT count(*) FROM transactions WHERE session_id = ?", [sid]) == [(0,)]
    for args in (("session", sid), ("app", "nightly", "--since", since)):
        refused = pgo.undo_cli(*args)
        assert refused.returncode == 1, (args, refused.stderr)
        assert "pruned" in refused.stderr and refused.stderr.count("\n") == 1, refused.stderr
    # none of it kept: the line does not say its later transactions are (an id of a session
    # that began before the cut and never wrote reads the same: the store cannot tell them apart)
    wholly = pgo.undo_cli("session", sid).stderr
    assert f"holds no transaction of session {sid}, which began before" in wholly
    assert "later transactions are kept" not in wholly
    # and `show` says the same (it said "unknown session", exit 2)
    shown = pgo.undo_cli("show", "session", sid)
    assert shown.returncode == 1, shown.stderr
    assert f"holds no transaction of session {sid}, which began before" in shown.stderr
    # an id that is no session's start is still unknown, however much of one it holds
    start = sid.split(".")[0]
    pid = sid.split(".")[1]
    for text in (
        *("nope", start, start + ".", sid.upper(), " " + sid, sid + ";x", "+" + sid),
        *("0" + sid, f"{start}.0{pid}", f"{start}.1{'0' * 8}", "0.0"),  # never PostgreSQL's
    ):
        unknown = pgo.undo_cli("session", text)
        assert unknown.returncode == 2 and "unknown session" in unknown.stderr, (text, unknown)
    assert pgo.undo_cli("show", "session", "0" + sid).returncode == 2


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_a_prune_while_capture_is_behind_cuts_no_later_than_what_it_stored(pgo):
    """A session that began after the newest stored transaction and committed before the cut,
    not captured yet at the prune: its capture comes after the prune, none of it was pruned,
    and its undo must not refuse (SQLite cut at the time asked, so it did)."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    _narrow_partitions(pgo)
    pgo.sql("INSERT INTO t VALUES (1)")
    pgo.capture()
    time.sleep(1.1)  # a session id knows its start to the second
    with pgo.connect(application_name="behind") as c:
        sid = session_id(c)
        c.execute("INSERT INTO t VALUES (2)")
    cut = _past_a_boundary(pgo)
    pruned = pgo.undo_cli("prune", "--before", cut)  # capture has not stored the session yet
    assert pruned.returncode == 0, pruned.stderr
    pgo.capture()
    undone = pgo.undo_cli("session", sid, "--apply")
    assert undone.returncode == 0, undone.stderr
    assert pgo.sql("SELECT id FROM t") == [(1,)]


@pytest.mark.parametrize("store_kind", ["postgresql"], indirect=True)
def test_capture_whose_partition_a_prune_dropped_exits_to_be_restarted(pgo):
    """A prune may drop the partition a running capture made for a transaction and still
    writes into (commit times are not in commit order to the microsecond; a clock may step
    back). Capture stopped with exit 2, for a person to act; it is a fault a restart puts right
    (exit 75: the restart makes the partition again), and nothing is lost."""
    from tests.integration.test_bad_input import wait_for
    from tests.integration.test_capture_service import _start

    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    proc = _start(pgo)
    try:
        pgo.sql("INSERT INTO t VALUES (1)")
        wait_for(lambda: pgo.store_rows("SELECT count(*) FROM changes") == [(1,)])
        with psycopg.connect(pgo.store, autocommit=True) as c:  # what the prune does
            for (name,) in c.execute("SELECT name FROM undo_store.change_partitions").fetchall():
                c.execute(sql.SQL("DROP TABLE undo_store.{}").format(sql.Identifier(name)))
            c.execute("DELETE FROM undo_store.change_partitions")
        pgo.sql("INSERT INTO t VALUES (2)")
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, err
    assert "was dropped meanwhile" in err.splitlines()[-1] and "Traceback" not in err
    again = pgo.undo_cli("capture", "--once")
    assert again.returncode == 0, again.stderr
    # the first went with its partition; the second is stored now
    assert pgo.store_rows("SELECT count(*) FROM changes") == [(1,)]
