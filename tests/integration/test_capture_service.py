"""Capture run as a service: what stops it and how it says so (exit codes a service manager
acts on: 75 restart, 1 and 2 a person), a store SQLite reports malformed, the slot's holder,
retention (--keep) while capturing; and its log: nothing while idle, nothing but faults with
-q."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import psycopg
import pytest
from psycopg import sql

from tests.conftest import Source
from tests.integration.test_bad_input import env_of, wait_for


def _start(src: Source, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "undo", "capture", *args],
        env=env_of(src),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _held(src: Source) -> bool:
    return src.sql(
        "SELECT active_pid IS NOT NULL FROM pg_replication_slots WHERE slot_name = %s",
        (src.slot,),
    ) == [(True,)]


def _confirmed(src: Source) -> int:
    ((lsn,),) = src.sql(
        "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots"
        " WHERE slot_name = %s",
        (src.slot,),
    )
    return int(lsn)


def test_capture_stops_when_sqlite_reports_the_store_malformed_while_it_runs(source):
    """Pages overwritten under a running capture (the roots of changes and its index): at its
    next write SQLite says malformed (SQLITE_CORRUPT); capture stops at once with one line and
    exit 2, and confirms nothing more, so the slot keeps what the store may not hold."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 2000) g")
    proc = _start(source)
    try:
        wait_for(lambda: source.store_rows("SELECT count(*) FROM changes") == [(2000,)])
        time.sleep(1.5)  # idle: its batch committed, no SQLite transaction open
        with contextlib.closing(sqlite3.connect(source.store)) as c:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the file itself
            size = c.execute("PRAGMA page_size").fetchone()[0]
            roots = [
                r[0]
                for r in c.execute(
                    "SELECT rootpage FROM sqlite_master WHERE name IN ('changes', 'changes_row')"
                )
            ]
            position = int(
                c.execute("SELECT value FROM source_meta WHERE key = 'position'").fetchone()[0]
            )
        with open(source.store, "r+b") as f:
            for page in roots:
                f.seek((page - 1) * size)
                f.write(b"\xa5" * size)
        with contextlib.closing(sqlite3.connect(source.store)) as c:
            # any write from another connection: capture's page cache is read again
            c.execute("UPDATE source_meta SET value = value WHERE key = 'slot'")
            c.commit()
        confirmed = _confirmed(source)
        # the transaction the store can no longer hold; its commit record begins at or after
        # the WAL position read just before COMMIT
        with source.connect(autocommit=False) as c:
            c.execute("INSERT INTO t SELECT g, 'w' FROM generate_series(2001, 2100) g")
            ((before_commit,),) = c.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"
            ).fetchall()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = err.splitlines()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and lines[-1].startswith("Error: capture stopped: the audit")
    assert "is corrupt" in lines[-1] and "database disk image is malformed" in lines[-1]
    assert sum(line.startswith("Error:") for line in lines) == 1
    # that transaction is not confirmed: a restart decodes it again. (An idle capture may
    # confirm WAL before it that held nothing to store: the walsender's keepalives.)
    assert _confirmed(source) <= before_commit
    assert confirmed <= position
    # and it will not start on it again
    again = source.undo_cli("capture", "--once")
    assert again.returncode == 2 and "quick_check" in again.stderr.splitlines()[-1]


def test_a_second_capture_is_told_the_first_ones_pid(pgo):
    """The slot knows only its walsender's pid; a capture names itself in its replication
    connection's application_name, so the second one says which process to stop."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    first = _start(pgo)
    try:
        wait_for(lambda: _held(pgo))
        ((walsender,),) = pgo.sql(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (pgo.slot,)
        )
        second = pgo.undo_cli("capture", "--once")
        assert second.returncode == 1, second.stderr
        line = second.stderr.splitlines()[-1]
        assert f"undo capture pid {first.pid} on {socket.gethostname()}" in line, line
        assert f"walsender pid {walsender}" in line
        status = json.loads(pgo.undo_cli("status", "--json").stdout)
        assert f"undo capture pid {first.pid}" in status["slot"]["held_by"]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 0


def test_a_slot_still_held_for_a_capture_that_exited_is_a_fault_a_restart_fixes(pgo):
    """A walsender whose capture is gone (its network vanished) holds the slot until
    wal_sender_timeout: exit 75, so systemd tries again, instead of 1, which stops it."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    gone = 4_000_000  # above any pid_max: no such process
    rconn = psycopg.connect(
        pgo.dsn,
        autocommit=True,
        replication="database",
        application_name=f"undo capture pid {gone} on {socket.gethostname()}",
    )
    try:
        rconn.pgconn.send_query(
            sql.SQL(
                "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {})"
            )
            .format(sql.Identifier(pgo.slot), sql.Literal(pgo.slot))
            .as_bytes(None)
        )
        wait_for(lambda: _held(pgo))
        done = pgo.undo_cli("capture", "--once")
    finally:
        rconn.pgconn.finish()
        rconn.close()
    assert done.returncode == 75, done.stderr
    line = done.stderr.splitlines()[-1]
    assert f"undo capture pid {gone}" in line and "has exited" in line


def test_a_source_that_does_not_answer_is_a_fault_a_restart_fixes(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    done = subprocess.run(
        [sys.executable, "-m", "undo", "capture", "--once"],
        env=env_of(pgo, UNDO_DSN="host=127.0.0.1 port=1 dbname=x connect_timeout=3"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 75, done.stderr
    assert done.stderr.count("\n") == 1 and "Connection refused" in done.stderr


def test_quiet_capture_says_nothing_when_all_is_well(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1)")
    done = subprocess.run(
        [sys.executable, "-m", "undo", "-q", "capture", "--once"],
        env=env_of(pgo),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    loud = pgo.undo_cli("capture", "--once")
    assert "captured 0 transaction(s), 0 change(s)" in loud.stderr


# -- retention ------------------------------------------------------------------------------


def _pages(store: str) -> tuple[int, int, int]:
    with contextlib.closing(sqlite3.connect(store)) as c:
        return (
            c.execute("PRAGMA auto_vacuum").fetchone()[0],
            c.execute("PRAGMA page_count").fetchone()[0],
            c.execute("PRAGMA freelist_count").fetchone()[0],
        )


def test_keep_prunes_while_capturing_and_hands_space_back(source):
    """capture --keep 2s: a session older than that is pruned by capture itself, in steps,
    while it goes on capturing the new one; a store made now has incremental vacuum, so the
    pages come back to the file system (never a full VACUUM)."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t SELECT g, repeat('o', 300) FROM generate_series(1, 20000) g")
    source.capture()
    auto_vacuum, before, _ = _pages(source.store)
    assert auto_vacuum == 2  # INCREMENTAL
    time.sleep(2.5)
    # stored up to now: the cut never passes the newest stored transaction (capture may be
    # behind), so --keep's first step may drop the old session only once a newer one is stored
    source.sql("INSERT INTO t VALUES (100001, 'new')")
    source.capture()
    proc = _start(source, "--keep", "2s")
    try:
        wait_for(lambda: _held(source))
        wait_for(lambda: source.store_rows("SELECT count(*) FROM changes") == [(1,)], timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "pruned 1 transaction(s), 20,000 change(s) committed before" in err
    rows = source.store_rows(
        "SELECT c.key FROM changes c JOIN transactions t ON c.id BETWEEN t.first_change"
        " AND t.last_change"
    )
    assert rows == [('["100001"]',)]
    (pruned_before,) = source.store_rows("SELECT value FROM meta WHERE key = 'pruned_before'")[0]
    assert pruned_before is not None
    _, after, free = _pages(source.store)
    assert after < before / 4 and free < 50, (before, after, free)


def test_keep_on_a_store_without_incremental_vacuum_says_so_and_prune_turns_it_on(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    with contextlib.closing(sqlite3.connect(pgo.store, isolation_level=None)) as c:
        c.execute("PRAGMA auto_vacuum = NONE")  # a store made before 0.3.0
        c.execute("VACUUM")
    assert _pages(pgo.store)[0] == 0
    pgo.sql("INSERT INTO t VALUES (1, 'a')")
    done = subprocess.run(
        [sys.executable, "-m", "undo", "capture", "--once", "--keep", "90d"],
        env=env_of(pgo),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "made before incremental vacuum" in done.stderr and "undo prune" in done.stderr
    pruned = pgo.undo_cli("prune", "--before", "90d")
    assert pruned.returncode == 0, pruned.stderr
    assert _pages(pgo.store)[0] == 2
    code = pgo.undo_cli("check", "--json")
    assert not any("incremental" in n for n in json.loads(code.stdout)["notes"])


def test_keep_takes_an_age(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    for bad in ("0d", "soon", "-3d"):
        done = pgo.undo_cli("capture", "--keep", bad)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "--keep" in done.stderr


@pytest.mark.parametrize("age", ["90d", "12w", "36h"])
def test_keep_ages_are_read(age):
    from undo.core.times import parse_age

    assert parse_age(age, "--keep", "90d") > 0
