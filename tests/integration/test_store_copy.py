"""`undo store copy --to STORE` (issue 22, "Moving up"): a whole store into an empty one of
either kind, from one snapshot; the copy answers every listing as the original did and capture
goes on into it from the snapshot's position."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.conftest import STORES, Cluster, Source, run_cli
from tests.integration.test_ddl import _owner
from tests.integration.test_guard import _delete_as
from undo.source.pg import session_id

_counter = itertools.count(1)

#: status fields that say how big the store is or how long ago something was: not content
_MOMENTARY = {"store_bytes", "lag_bytes", "lag_seconds", "capture_lag", "last_capture", "slot"}


@pytest.fixture
def new_pg(cluster: Cluster) -> Iterator[Callable[[], str]]:
    """Makes empty databases of the test cluster for PostgreSQL stores; their conninfos."""
    made: list[str] = []

    def make() -> str:
        name = f"undo_copy_{os.getpid()}_{next(_counter)}"
        with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        made.append(name)
        return cluster.dsn(name)

    yield make
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
        for name in made:
            c.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _copy(src: Source, origin: str, target: str) -> subprocess.CompletedProcess[str]:
    return run_cli(src, "store", "copy", "--to", target, env={"UNDO_STORE": origin})


def _listings(src: Source, store: str, sessions: list[str]) -> dict[str, Any]:
    """Every listing's --json on ``store``, as comparable documents."""

    def cli(*args: str) -> Any:
        done = run_cli(src, *args, "--json", env={"UNDO_STORE": store})
        assert done.returncode == 0, (args, done.stderr)
        return json.loads(done.stdout)

    status = cli("status")
    return {
        "sessions": cli("sessions"),
        "show": {sid: cli("show", "session", sid) for sid in sessions},
        "history": [cli("history", "t", f"id={k}") for k in (1, 2, 3)],
        "activity": {by: cli("activity", "--by", by) for by in ("app", "session", "table")},
        "guards": cli("guard", "list"),
        "status": {k: v for k, v in status.items() if k not in _MOMENTARY},
    }


def _sqlite_tables(path: str) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as c:
        names = [
            r[0]
            for r in c.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite%' AND name <> '_sqlite_migrations'"
            )
        ]
        out = {n: sorted(c.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}
        if "sources" in out:  # registered_at: written to the millisecond, not as store times
            out["sources"] = [r[:4] for r in out["sources"]]
        return out


def _position(src: Source) -> list[tuple[Any, ...]]:
    """The source's position in its store (meta; source_meta where the store has sources)."""
    if not src.pg_store:
        with sqlite3.connect(src.store) as c:
            if c.execute("SELECT 1 FROM sqlite_master WHERE name = 'source_meta'").fetchone():
                return c.execute("SELECT value FROM source_meta WHERE key = 'position'").fetchall()
    return src.store_rows("SELECT value FROM meta WHERE key = 'position'")


def _history(src: Source) -> list[str]:
    """A store with every kind of record: inserts, updates, deletes, TOASTed values, NULLs, a
    table gap and a DDL record, a guard refusal and an undo; the sessions that wrote."""
    src.sql("CREATE TABLE t (id int PRIMARY KEY, v text, big text, n int)")
    src.init()
    big = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 3000) g)"
    sids = []
    with src.connect(application_name="signup") as c:
        sids.append(session_id(c))
        c.execute(
            f"INSERT INTO t VALUES (1, 'a', {big}, NULL), (2, NULL, NULL, 2), (3, 'c', 'x', 3)"
        )
    with src.connect(application_name="support") as c:
        sids.append(session_id(c))
        c.execute("UPDATE t SET v = 'a2', n = 1 WHERE id = 1")  # big: TOASTed, unchanged
        c.execute("UPDATE t SET v = NULL WHERE id = 3")
    with src.connect(application_name="cleanup") as c:
        sids.append(session_id(c))
        c.execute("DELETE FROM t WHERE id IN (2, 3)")
    assert src.undo_cli("guard", "add", "usage-metrics*", "--reason", "read only").returncode == 0
    refused = _delete_as(src, "usage-metrics-nightly")
    assert isinstance(refused, psycopg.errors.ReadOnlySqlTransaction)
    sids.append(refused.__notes__[0])
    src.capture()
    undone = src.undo_cli("session", sids[2], "--apply")
    assert undone.returncode == 0, undone.stderr
    with _owner(src) as c:  # a rewrite: a DDL record and a gap of the table
        sids.append(session_id(c))
        c.execute("ALTER TABLE t ALTER COLUMN n TYPE bigint USING n + 1")
    src.capture()
    return sids


def test_a_store_copied_to_postgresql_and_back_answers_every_listing_the_same(source, new_pg):
    sids = _history(source)
    before = _listings(source, source.store, sids)
    assert before["status"]["gaps"] and before["guards"][0]["refusals"] == 1
    shown = before["show"]
    assert shown[sids[2]]["undone"]["all"] is True and shown[sids[4]]["ddl"]
    assert any(r["new"] and r["new"]["big"] for h in before["history"] for r in h)

    pg = new_pg()
    up = _copy(source, source.store, pg)
    assert up.returncode == 0, up.stderr
    assert "copying changes:" in up.stderr and "rows" in up.stderr  # progress, by table
    assert _listings(source, pg, sids) == before

    back = source.store + ".back.db"
    down = _copy(source, pg, back)
    assert down.returncode == 0, down.stderr
    assert _listings(source, back, sids) == before
    # and row for row: ids, times, images, the position and the slot's meta
    assert _sqlite_tables(back) == _sqlite_tables(source.store)


@pytest.mark.parametrize(
    "store_kind, target_kind",
    [("sqlite", "postgresql"), ("postgresql", "sqlite"), ("postgresql", "postgresql")],
    indirect=["store_kind"],
)
def test_capture_goes_on_into_the_copy_without_loss_or_duplicates(
    pgo, new_pg, tmp_path, target_kind
):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    pgo.sql("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 50) g")
    pgo.capture()
    pg = new_pg() if target_kind == "postgresql" else str(tmp_path / "copy.db")
    copied = _copy(pgo, pgo.store, pg)
    assert copied.returncode == 0, copied.stderr
    pgo.sql("INSERT INTO t SELECT g, 'w' FROM generate_series(51, 80) g")
    pgo.sql("UPDATE t SET v = 'u' WHERE id <= 10")
    moved = dataclasses.replace(pgo, store=pg)
    # the copy registers the source as the database it is (init knows it, nothing to change)
    again = run_cli(moved, "init")
    assert again.returncode == 0, again.stderr
    moved.capture()
    rows = moved.store_rows(
        "SELECT r.table_name, c.op, c.key, count(*) FROM changes c"
        " JOIN relations r ON r.id = c.relation GROUP BY 1, 2, 3"
    )
    assert all(n == 1 for *_, n in rows)  # nothing twice
    assert sorted(
        (op, (k if isinstance(k, list) else json.loads(k))[0]) for _, op, k, _ in rows
    ) == sorted([("I", str(i)) for i in range(1, 81)] + [("U", str(i)) for i in range(1, 11)])
    # the changes' ids go on where the copy's ended, in one range a transaction
    txns = moved.store_rows("SELECT first_change, last_change FROM transactions ORDER BY id")
    assert [a for a, _ in txns[1:]] == [b + 1 for _, b in txns[:-1]]
    status = run_cli(pgo, "status", "--json", env={"UNDO_STORE": pg})
    assert json.loads(status.stdout)["transactions"] == 3


def test_a_target_that_holds_anything_is_refused_and_left_as_it_was(pgo, new_pg):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1)")
    pgo.capture()
    pg = new_pg()
    assert _copy(pgo, pgo.store, pg).returncode == 0
    with psycopg.connect(pg) as c:
        before = c.execute("SELECT count(*) FROM undo_store.transactions").fetchone()
    again = _copy(pgo, pgo.store, pg)
    assert again.returncode == 1, again.stderr
    assert again.stderr.count("\n") == 1 and "not empty" in again.stderr
    with psycopg.connect(pg) as c:
        assert c.execute("SELECT count(*) FROM undo_store.transactions").fetchone() == before
    # an SQLite store that holds anything, the original itself
    other = pgo.store + ".other.db"
    assert _copy(pgo, pg, other).returncode == 0
    size = os.path.getsize(other)
    into = _copy(pgo, pg, other)
    assert into.returncode == 1 and "not empty" in into.stderr
    assert _sqlite_tables(other) == _sqlite_tables(pgo.store)
    assert os.path.getsize(other) == size


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_a_copy_while_capture_writes_is_one_snapshot(pgo, new_pg, tmp_path):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    stop = threading.Event()

    def write() -> None:
        with pgo.connect(application_name="writer") as c:
            for i in itertools.count(1):
                if stop.is_set():
                    return
                c.execute(
                    "INSERT INTO t SELECT %s * 100 + g, 'v' FROM generate_series(1, 20) g", (i,)
                )

    env = {
        **os.environ,
        "UNDO_DSN": pgo.dsn,
        "UNDO_STORE": pgo.store,
        "UNDO_SLOT": pgo.slot,
        "UNDO_DECODER": pgo.decoder,
    }
    capture = subprocess.Popen(
        [sys.executable, "-m", "undo", "capture"], env=env, stderr=subprocess.DEVNULL
    )
    writer = threading.Thread(target=write)
    writer.start()
    try:
        deadline = time.monotonic() + 60
        while not pgo.store_rows("SELECT 1 FROM transactions LIMIT 1"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        target = new_pg() if not pgo.pg_store else str(tmp_path / "copy.db")
        copied = _copy(pgo, pgo.store, target)
        assert copied.returncode == 0, copied.stderr
    finally:
        stop.set()
        writer.join()
        capture.terminate()
        capture.wait(timeout=30)
    moved = dataclasses.replace(pgo, store=target)
    (position,) = _position(moved)[0]
    txns = moved.store_rows(
        "SELECT id, end_lsn, first_change, last_change, inserts FROM transactions ORDER BY id"
    )
    assert txns and all(t[4] == 20 and t[3] - t[2] == 19 for t in txns)  # each whole
    (changes,) = moved.store_rows("SELECT count(*) FROM changes")[0]
    assert changes == 20 * len(txns)
    # exactly what the original held at that position: none missing, none past it
    held = pgo.store_rows(
        "SELECT id, end_lsn, first_change, last_change, inserts FROM transactions"
        " WHERE end_lsn <= ? ORDER BY id",
        (int(position),),
    )
    assert [tuple(t) for t in txns] == [tuple(t) for t in held]
    assert max(t[1] for t in txns) <= int(position)
    more = pgo.store_rows("SELECT count(*) FROM transactions")[0][0]
    assert more > len(txns)  # capture went on after the snapshot


def test_history_of_days_past_lands_in_partitions_made_for_it(pgo, new_pg):
    """A PostgreSQL store keeps changes in partitions by commit time: the copy makes those
    its history needs (here: two days years ago, which no capture made)."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    for i in (1, 2, 3):
        with pgo.connect(application_name=f"app{i}") as c:
            c.execute("INSERT INTO t VALUES (%s)", (i,))
    pgo.capture()
    with sqlite3.connect(pgo.store) as c:  # as a store a capture filled in 2020 would be
        c.execute(
            "UPDATE transactions SET commit_time = '2020-03-01T10:00:00.000001Z' WHERE id = 1"
        )
        c.execute(
            "UPDATE transactions SET commit_time = '2020-03-02T23:59:59.999999Z' WHERE id = 2"
        )
        c.execute(
            "UPDATE activity SET minute = 1583056800"
            " WHERE minute = (SELECT min(minute) FROM activity)"
        )
    before = run_cli(pgo, "sessions", "--json").stdout
    pg = new_pg()
    copied = _copy(pgo, pgo.store, pg)
    assert copied.returncode == 0, copied.stderr
    assert run_cli(pgo, "sessions", "--json", env={"UNDO_STORE": pg}).stdout == before
    with psycopg.connect(pg) as c:
        parts = c.execute(
            "SELECT count(*) FROM undo_store.change_partitions WHERE upper <= '2021-01-01'"
        ).fetchone()
    assert parts == (2,)


def _as_two_sources(path: str) -> None:
    """Make a one-source SQLite store hold two sources whose transactions interleave (one
    sequence of ids, as an SQLite store with many sources keeps them): every other transaction
    is source 2's."""
    with sqlite3.connect(path) as c:
        c.executescript(
            """
            UPDATE sources SET name = 'a', system_identifier = '7001', database_name = 'a';
            INSERT INTO sources SELECT 2, 'b', '7002', 'b', registered_at FROM sources;
            INSERT INTO source_meta SELECT 2, key, value FROM source_meta;
            """
        )
        c.execute("UPDATE transactions SET source = 2 WHERE id % 2 = 0")


def test_sources_whose_ids_interleave_are_renumbered_into_spans_of_their_own(pgo, new_pg):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    for i in range(1, 7):
        with pgo.connect(application_name=f"app{i}") as c:
            c.execute("INSERT INTO t SELECT %s * 10 + g, 'v' FROM generate_series(1, %s) g", (i, i))
    sid = _as_session_deleting(pgo)
    pgo.capture()
    assert pgo.undo_cli("session", sid, "--apply").returncode == 0
    pgo.capture()
    origin = pgo.store_rows(
        "SELECT end_lsn, inserts + updates + deletes, commit_time FROM transactions ORDER BY id"
    )
    (undone,) = pgo.store_rows("SELECT selection FROM undos")[0]
    undone_lsns = sorted(
        pgo.store_rows(f"SELECT end_lsn FROM transactions WHERE id IN ({undone[1:-1]})")
    )
    _as_two_sources(pgo.store)

    pg = new_pg()
    copied = _copy(pgo, pgo.store, pg)
    assert copied.returncode == 0, copied.stderr
    with psycopg.connect(pg) as c:
        bases = dict(c.execute("SELECT name, id_base FROM undo_store.sources").fetchall())
        assert bases == {"a": 0, "b": 1 << 40}
        # every transaction in its source's span, its changes one range there, whole
        bad = c.execute(
            "SELECT t.id FROM undo_store.transactions t JOIN undo_store.sources s"
            " ON s.id = t.source"
            " WHERE t.id <= s.id_base OR t.id > s.id_base + 1000"
            " OR (SELECT count(*) FROM undo_store.changes x WHERE x.txn = t.id)"
            "    <> t.last_change - t.first_change + 1"
            " OR EXISTS (SELECT 1 FROM undo_store.changes x WHERE x.txn = t.id"
            "            AND x.id NOT BETWEEN t.first_change AND t.last_change)"
        ).fetchall()
        assert bad == []
        copied_rows = c.execute(
            "SELECT end_lsn, inserts + updates + deletes, commit_time FROM undo_store.transactions"
            " ORDER BY commit_lsn"
        ).fetchall()
        assert [(a, b) for a, b, _ in copied_rows] == [(a, b) for a, b, _ in origin]
        (selection,) = c.execute("SELECT selection FROM undo_store.undos").fetchone() or ("",)
        lsns = c.execute(
            "SELECT end_lsn FROM undo_store.transactions WHERE id = ANY(%s) ORDER BY 1",
            (json.loads(selection),),
        ).fetchall()
        assert [r[0] for r in lsns] == [r[0] for r in undone_lsns]  # the same transactions
    # and back into an SQLite store, both sources
    back = pgo.store + ".two.db"
    down = _copy(pgo, pg, back)
    assert down.returncode == 0, down.stderr
    count = "SELECT source, count(*), sum(inserts + deletes) FROM transactions GROUP BY 1"
    assert dataclasses.replace(pgo, store=back).store_rows(count) == pgo.store_rows(count)


def _as_session_deleting(src: Source) -> str:
    with src.connect(application_name="cleanup") as c:
        sid = session_id(c)
        c.execute("DELETE FROM t WHERE id IN (11, 21, 22)")
    return sid


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_what_capture_commits_while_a_copy_reads_is_not_in_the_copy(pgo, new_pg, tmp_path):
    """Capture commits a batch (transactions, changes, position) between the copy's reading
    of one table and the next: the copy holds none of it, nor a position past what it holds."""
    from undo.store.copy import copy_store

    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO t SELECT generate_series(1, 5)")
    pgo.capture()
    before = pgo.store_rows("SELECT id, end_lsn FROM transactions ORDER BY id")
    (position,) = _position(pgo)[0]
    done: list[str] = []

    def meanwhile(table: str, n: int, total: int) -> None:
        if table in ("relations", "changes") and n == 0:  # after meta, after transactions
            first = 10 * (len(done) + 1)
            pgo.sql("INSERT INTO t SELECT generate_series(%s::int, %s::int)", (first, first + 4))
            pgo.capture()
            done.append(table)

    target = str(tmp_path / "copy.db") if pgo.pg_store else new_pg()
    copy_store(pgo.store, target, meanwhile)
    assert done == ["relations", "changes"]
    assert len(pgo.store_rows("SELECT id FROM transactions")) == len(before) + 2
    moved = dataclasses.replace(pgo, store=target)
    assert moved.store_rows("SELECT id, end_lsn FROM transactions ORDER BY id") == before
    assert _position(moved) == [(position,)]
    assert moved.store_rows("SELECT count(*) FROM changes") == [(5,)]


def test_every_source_of_a_store_is_copied_and_each_capture_goes_on(pgo, new_pg, tmp_path):
    """Two databases captured into one SQLite file in turns (their ids interleave), copied to
    PostgreSQL and back: every listing of every source answers the same, and each source's
    capture goes on into the copy from its own position."""
    from tests.integration.test_sources import _beside, _ready

    with _beside(pgo, tmp_path, "b") as b:
        sids = [_ready(pgo), _ready(b)]
        for src in (pgo, b, pgo, b):
            src.sql("INSERT INTO t SELECT max(id) + 1, 'n' FROM t")
            src.capture()

        def listed(store: str) -> Any:
            out = {}
            for src in (pgo, b):
                asks = [["sessions"], ["activity"], ["history", "t", "id=1"]]
                asks += [["show", "session", s] for s in sids]
                for args in asks:
                    done = run_cli(
                        src, "--source", src.dbname, *args, "--json", env={"UNDO_STORE": store}
                    )
                    assert done.returncode == 0, (src.dbname, args, done.stderr)
                    out[src.dbname, *args] = json.loads(done.stdout)
            return out

        before = listed(pgo.store)
        assert all(before[src.dbname, "sessions"] for src in (pgo, b))
        pg = new_pg()
        up = _copy(pgo, pgo.store, pg)
        assert up.returncode == 0, up.stderr
        assert f"{pgo.dbname} at" in up.stderr and f"{b.dbname} at" in up.stderr
        per_source = (
            "SELECT s.name, count(*), sum(t.inserts + t.updates) FROM transactions t"
            " JOIN sources s ON s.id = t.source GROUP BY 1 ORDER BY 1"
        )
        copied = dataclasses.replace(pgo, store=pg)
        assert copied.store_rows(per_source) == pgo.store_rows(per_source)
        back = str(tmp_path / "back.db")
        assert _copy(pgo, pg, back).returncode == 0
        assert listed(back) == before
        # each source's capture goes on into the copy: nothing lost, nothing twice
        for src in (pgo, b):
            src.sql("INSERT INTO t SELECT max(id) + 1, 'after' FROM t")
            dataclasses.replace(src, store=pg).capture()
        inserted = copied.store_rows(
            "SELECT source, key::text, new::text FROM change_log WHERE op = 'I' ORDER BY 1, 2"
        )
        assert inserted == [
            (name, f'["{k}"]', f'["{k}", "{v}"]')
            for name in sorted((pgo.dbname, b.dbname))
            for k, v in ((1, "a"), (2, "b"), (3, "n"), (4, "n"), (5, "after"))
        ]


def test_a_source_not_yet_claimed_is_claimed_before_it_goes_to_postgresql(pgo, new_pg):
    """A store made before sources names its one source 'default' with no identity until a
    command connects to its database: a PostgreSQL store could never tell it; refused (exit
    2, saying how), then copied once claimed."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1)")
    pgo.capture()
    with sqlite3.connect(pgo.store) as c:  # as m014 leaves a store made before it
        c.execute("UPDATE sources SET name = 'default', system_identifier = '', database_name = ''")
    pg = new_pg()
    refused = _copy(pgo, pgo.store, pg)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "'default'" in refused.stderr and "undo status" in refused.stderr
    assert run_cli(pgo, "status").returncode == 0  # claims it
    copied = _copy(pgo, pgo.store, pg)
    assert copied.returncode == 0, copied.stderr
    moved = dataclasses.replace(pgo, store=pg)
    assert moved.store_rows("SELECT name, database_name FROM sources") == [(pgo.dbname, pgo.dbname)]
    pgo.sql("INSERT INTO t VALUES (2)")
    moved.capture()
    assert moved.store_rows("SELECT count(*) FROM changes") == [(2,)]
