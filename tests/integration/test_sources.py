"""Many sources in one store (#22): each registered by `undo init`, told apart by the server's
system identifier and the database name; a command acting on one source chooses it (--source,
else the --dsn database's, else the store's only one) and refuses a --dsn that is not it."""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from tests.conftest import STORES, Source, _make_source
from undo.source.pg import session_id


@contextlib.contextmanager
def _beside(src: Source, tmp_path, name: str) -> Iterator[Source]:
    """A second database of the same cluster whose history goes into ``src``'s store."""
    made = _make_source(src.cluster, tmp_path / name, src.decoder)
    other = next(made)
    try:
        yield dataclasses.replace(other, store=src.store)
    finally:
        with contextlib.suppress(StopIteration):
            next(made)


def _ready(src: Source) -> str:
    """A table, init, one tagged session that inserts and updates: its session id."""
    src.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    done = src.undo_cli("init")
    assert done.returncode == 0, done.stderr
    with src.connect(application_name="app-" + src.dbname[-6:]) as c:
        sid = session_id(c)
        c.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
        c.execute("UPDATE t SET v = 'changed' WHERE id = 1")
    return sid


def test_the_only_source_is_the_default_and_another_dsn_is_refused(pgo, tmp_path):
    sid = _ready(pgo)
    assert pgo.undo_cli("capture", "--once").returncode == 0
    # the store's only source: no --source needed, and --dsn is it
    shown = pgo.undo_cli("session", sid)
    assert shown.returncode == 0, shown.stderr
    assert "2 transaction(s), 3 change(s)" in shown.stdout
    with _beside(pgo, tmp_path, "b") as b:
        b.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
        b.sql("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
        # pgo's session, undone into another database: never
        for args in (("session", sid, "--apply"), ("--source", pgo.dbname, "session", sid)):
            refused = b.undo_cli(*args)
            assert refused.returncode == 2, refused.stderr
            assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
            assert f"--dsn is database {b.dbname}" in refused.stderr
            assert f"not the source {pgo.dbname!r}" in refused.stderr
        assert b.sql("SELECT id, v FROM t ORDER BY id") == [(1, "a"), (2, "b")]
        # an unknown --source names the store's sources
        unknown = pgo.undo_cli("--source", "nope", "status")
        assert unknown.returncode == 2
        assert "no source 'nope'" in unknown.stderr and pgo.dbname in unknown.stderr


def test_none_decides_exit_2_naming_the_sources(pgo, tmp_path):
    _ready(pgo)
    with _beside(pgo, tmp_path, "b") as b, _beside(pgo, tmp_path, "c") as c:
        _ready(b)
        c.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
        # two sources, and --dsn is neither: which one is not guessed
        for args in (("status",), ("capture", "--once"), ("session", "6b0.1")):
            asked = c.undo_cli(*args)
            assert asked.returncode == 2, (args, asked.stderr)
            assert "which source?" in asked.stderr, asked.stderr
            assert pgo.dbname in asked.stderr and b.dbname in asked.stderr
            assert f"--dsn (database {c.dbname}) is none of them" in asked.stderr
        # --dsn decides for each registered database
        for src in (pgo, b):
            st = src.undo_cli("status", "--json")
            assert st.returncode == 0, st.stderr
            assert json.loads(st.stdout)["source"] == src.dbname
        # two --source for a command acting on one
        two = pgo.undo_cli("--source", pgo.dbname, "--source", b.dbname, "status")
        assert two.returncode == 2 and "acts on one source" in two.stderr


def test_a_source_whose_server_changed_is_refused_until_registered_again(pgo):
    sid = _ready(pgo)
    assert pgo.undo_cli("capture", "--once").returncode == 0
    # as after pg_upgrade or a restore into a new cluster: same database name, new identifier
    with contextlib.closing(sqlite3.connect(pgo.store)) as s:
        s.execute("UPDATE sources SET system_identifier = '7000000000000000001'")
        s.commit()
    for args in (("status",), ("session", sid), ("capture", "--once")):
        refused = pgo.undo_cli(*args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert "7000000000000000001" in refused.stderr
        assert f"undo init --source {pgo.dbname} --reregister" in refused.stderr
    # init alone does not take the name over
    again = pgo.undo_cli("init")
    assert again.returncode == 2 and "--reregister" in again.stderr
    done = pgo.undo_cli("init", "--source", pgo.dbname, "--reregister")
    assert done.returncode == 0, done.stderr
    assert pgo.undo_cli("status").returncode == 0
    shown = pgo.undo_cli("session", sid)
    assert shown.returncode == 0 and "2 transaction(s), 3 change(s)" in shown.stdout


def test_init_of_a_name_another_database_holds_is_refused(pgo, tmp_path):
    _ready(pgo)
    with _beside(pgo, tmp_path, "b") as b:
        b.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
        taken = b.undo_cli("init", "--source", pgo.dbname)
        assert taken.returncode == 2
        assert f"the source name {pgo.dbname!r} is taken" in taken.stderr
        assert f"by database {pgo.dbname}" in taken.stderr


def _two_sources(a: Source, b: Source, at_once: bool) -> tuple[str, str]:
    """Both initialised into a's store and captured (at once: two capture processes side by
    side; else one after the other): each one's session id."""
    sid_a, sid_b = _ready(a), _ready(b)
    if at_once:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "undo", "capture", "--once"],
                env={
                    **os.environ,
                    "UNDO_DSN": s.dsn,
                    "UNDO_STORE": s.store,
                    "UNDO_SLOT": s.slot,
                    "UNDO_DECODER": s.decoder,
                },
                stderr=subprocess.PIPE,
                text=True,
            )
            for s in (a, b)
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
    else:
        for s in (a, b):
            done = s.undo_cli("capture", "--once")
            assert done.returncode == 0, done.stderr
    return sid_a, sid_b


def _listed_by_source(src: Source, tmp_path, at_once: bool) -> None:
    with _beside(src, tmp_path, "b") as b:
        sid_a, sid_b = _two_sources(src, b, at_once)
        a_name, b_name = src.dbname, b.dbname
        # without --source: every source, each row naming its own
        every = json.loads(src.undo_cli("sessions", "--json").stdout)
        assert sorted((r["source"], r["session_id"]) for r in every) == sorted(
            [(a_name, sid_a), (b_name, sid_b)]
        )
        assert all(next(iter(r)) == "source" for r in every)
        table = src.undo_cli("sessions").stdout
        assert table.splitlines()[0].split()[:2] == ["source", "session_id"]
        # --source, repeatable
        only_b = json.loads(src.undo_cli("sessions", "--source", b_name, "--json").stdout)
        assert [(r["source"], r["session_id"]) for r in only_b] == [(b_name, sid_b)]
        both = src.undo_cli("sessions", "--source", a_name, "--source", b_name, "--json")
        assert len(json.loads(both.stdout)) == 2
        shown = json.loads(src.undo_cli("show", "session", sid_b, "--json").stdout)
        assert (shown["source"], shown["totals"]["changes"]) == (b_name, 3)
        history = json.loads(src.undo_cli("history", "t", "id=1", "--json").stdout)
        assert sorted({(v["source"], v["op"]) for v in history}) == sorted(
            [(a_name, "insert"), (a_name, "update"), (b_name, "insert"), (b_name, "update")]
        )
        activity = json.loads(src.undo_cli("activity", "--json").stdout)
        assert {r["source"] for r in activity} == {a_name, b_name}
        assert json.loads(b.undo_cli("status", "--json").stdout)["source"] == b_name
        # undone by source: b's session, applied to b (its --dsn), a untouched
        undone = b.undo_cli("session", sid_b, "--apply")
        assert undone.returncode == 0, undone.stderr
        assert b.sql("SELECT count(*) FROM t") == [(0,)]
        assert src.sql("SELECT id, v FROM t ORDER BY id") == [(1, "changed"), (2, "b")]
        # a's session with b's --dsn: looked up within b, where it is not
        missing = b.undo_cli("session", sid_a)
        assert missing.returncode == 2 and f"unknown session {sid_a!r}" in missing.stderr
        undone = src.undo_cli("--source", a_name, "session", sid_a, "--apply")
        assert undone.returncode == 0, undone.stderr
        assert src.sql("SELECT count(*) FROM t") == [(0,)]


def test_two_sources_captured_one_after_the_other_into_one_sqlite_file(source, tmp_path):
    _listed_by_source(source, tmp_path, at_once=False)


@pytest.mark.parametrize("store_kind", ["postgresql"], indirect=True)
def test_two_sources_captured_at_once_into_one_postgresql_store(source, tmp_path):
    _listed_by_source(source, tmp_path, at_once=True)


def test_a_second_capture_into_one_sqlite_file_is_refused_while_the_first_runs(pgo, tmp_path):
    _ready(pgo)
    with _beside(pgo, tmp_path, "b") as b:
        _ready(b)
        env = {**os.environ, "UNDO_DSN": pgo.dsn, "UNDO_STORE": pgo.store, "UNDO_SLOT": pgo.slot}
        first = subprocess.Popen(
            [sys.executable, "-m", "undo", "capture"], env=env, stderr=subprocess.PIPE, text=True
        )
        try:
            for _ in range(200):  # until the first has written its first batch
                if pgo.meta("position") and pgo.store_rows("SELECT count(*) FROM transactions")[
                    0
                ] != (0,):
                    break
                time.sleep(0.1)
            second = b.undo_cli("capture", "--once")
            assert second.returncode == 1, second.stderr
            assert "being written by another capture" in second.stderr
            assert "Traceback" not in second.stderr
        finally:
            first.send_signal(signal.SIGTERM)
            first.communicate(timeout=60)
        assert first.returncode == 0
        # the first stopped: the second goes on
        done = b.undo_cli("capture", "--once")
        assert done.returncode == 0, done.stderr
        assert {r[0] for r in pgo.store_rows("SELECT source FROM transactions")} == {1, 2}


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_the_dashboard_shows_the_source_of_everything_and_filters_by_it(pgo, tmp_path):
    import threading
    import urllib.error
    import urllib.request

    from undo.web import serve

    def get(url: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            body = e.read().decode()
            e.close()
            return e.code, body

    with _beside(pgo, tmp_path, "b") as b:
        sid_a, sid_b = _two_sources(pgo, b, at_once=False)
        server = serve(b.settings, "127.0.0.1", 0, None, ())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"
        try:
            status, page = get(base + "/sessions")
            assert status == 200 and sid_a in page and sid_b in page
            assert f"<td>{pgo.dbname}</td>" in page and f"<td>{b.dbname}</td>" in page
            status, page = get(base + f"/sessions?source={b.dbname}")
            assert status == 200 and sid_b in page and sid_a not in page
            status, page = get(base + "/")
            assert f"Capture health: {pgo.dbname}" in page
            assert f"Capture health: {b.dbname}" in page
            # the slot's figures are the --dsn database's (b): under b only, not also under a
            # (a capture stopped on a looked healthy)
            health = {part.split("</h2>")[0]: part for part in page.split("Capture health: ")[1:]}
            assert "--dsn is another source&#39;s database" in health[pgo.dbname]
            assert re.search(r"WAL held by the slot: [\d,]+ bytes", health[b.dbname])
            assert "WAL held by the slot: <span" in health[pgo.dbname]
            # a card's link lists that application's sessions in its source
            for src in (pgo, b):
                app = "app-" + src.dbname[-6:]
                link = re.search(r'href="/sessions\?([^"]*)">' + f"{src.dbname}: {app}<", page)
                assert link, page
                status, listed = get(base + "/sessions?" + html.unescape(link.group(1)))
                assert status == 200 and app in listed and "no session" not in listed
            status, page = get(base + f"/sessions/{sid_a}?source={pgo.dbname}")
            assert status == 200 and f'source: <a href="?source={pgo.dbname}"' in page
            status, page = get(base + "/history/public.t?id=1")
            assert status == 200 and f"<td>{pgo.dbname}</td>" in page
            assert f"<td>{b.dbname}</td>" in page
            status, page = get(base + "/sessions?source=nope")
            assert status == 400 and "no source" in page
            status, text = get(base + "/metrics")
            counted = [x for x in text.splitlines() if x.startswith("undo_transactions_total{")]
            for name in (pgo.dbname, b.dbname):
                assert any(f'source="{name}"' in x for x in counted), counted
            # the lag is the --dsn database's
            assert f'undo_capture_lag_bytes{{source="{b.dbname}"}}' in text
            # ?source= keeps that source's series only (it was ignored: every source's)
            status, text = get(base + f"/metrics?source={pgo.dbname}")
            assert status == 200 and f'source="{pgo.dbname}"' in text
            assert f'source="{b.dbname}"' not in text
        finally:
            server.shutdown()
            server.server_close()


def test_a_source_made_before_sources_is_claimed_only_by_its_slots_database(pgo, tmp_path):
    """A store made before sources holds one source 'default' of no identity: only the
    database its slot lives in claims it. A copy of that database (CREATE DATABASE ...
    TEMPLATE) or another one is refused (exit 2), never an undo into it; nor is it claimed."""
    sid = _ready(pgo)
    assert pgo.undo_cli("capture", "--once").returncode == 0
    with sqlite3.connect(pgo.store) as c:  # as m014 leaves a store made before it
        c.execute("UPDATE sources SET name = 'default', system_identifier = '', database_name = ''")
    clone_name = pgo.dbname + "_clone"
    with psycopg.connect(pgo.cluster.admin_dsn, autocommit=True) as c:
        c.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(clone_name), sql.Identifier(pgo.dbname)
            )
        )
    clone = dataclasses.replace(pgo, dsn=pgo.cluster.dsn(clone_name), dbname=clone_name)
    try:
        for args in (("session", sid, "--apply"), ("status",)):
            refused = clone.undo_cli(*args)
            assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
            assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
            assert f"slot {pgo.slot}" in refused.stderr and pgo.dbname in refused.stderr
        # nor does init of the copy, with a slot of its own, adopt that history
        adopted = clone.undo_cli("--slot", "clone_slot", "init")
        assert adopted.returncode == 2 and f"slot {pgo.slot}" in adopted.stderr, adopted.stderr
        assert clone.sql("SELECT id, v FROM t ORDER BY id") == [(1, "changed"), (2, "b")]
        with sqlite3.connect(pgo.store) as c:  # still unclaimed
            assert c.execute("SELECT name, database_name FROM sources").fetchall() == [
                ("default", "")
            ]
        # the database of its slot claims it, and the undo goes there
        undone = pgo.undo_cli("session", sid, "--apply")
        assert undone.returncode == 0, undone.stderr
        assert pgo.sql("SELECT count(*) FROM t") == [(0,)]
        with sqlite3.connect(pgo.store) as c:
            assert c.execute("SELECT name, database_name FROM sources").fetchall() == [
                (pgo.dbname, pgo.dbname)
            ]
    finally:
        with psycopg.connect(pgo.cluster.admin_dsn, autocommit=True) as c:
            c.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(clone_name)))


def test_a_source_made_before_sources_whose_slot_is_gone_is_claimed_by_init(pgo):
    """Its slot dropped, no database proves to be a store made before sources' own: every
    command refuses (exit 2, saying `undo init`), and init on its database claims it."""
    _ready(pgo)
    assert pgo.undo_cli("capture", "--once").returncode == 0
    with sqlite3.connect(pgo.store) as c:  # as m014 leaves a store made before it
        c.execute("UPDATE sources SET name = 'default', system_identifier = '', database_name = ''")
    pgo.sql("SELECT pg_drop_replication_slot(%s)", (pgo.slot,))
    refused = pgo.undo_cli("status")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"slot {pgo.slot}" in refused.stderr and "`undo init` there" in refused.stderr
    done = pgo.undo_cli("init")
    assert done.returncode == 0, done.stderr
    assert pgo.undo_cli("status").returncode == 0
    with sqlite3.connect(pgo.store) as c:
        assert c.execute("SELECT name, database_name FROM sources").fetchall() == [
            (pgo.dbname, pgo.dbname)
        ]


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_reregister_onto_a_database_without_the_sources_tables_is_refused(pgo):
    """--reregister is for the same database on a new server. A database of the same name that
    holds none of the tables the source recorded (another live database, a wrong --dsn) was
    accepted, and the source's undos would then have written into it."""
    sid = _ready(pgo)
    assert pgo.undo_cli("capture", "--once").returncode == 0
    _as_if_moved(pgo)
    pgo.sql("ALTER TABLE t RENAME TO u")  # this database no longer holds the history's table
    pgo.sql("CREATE VIEW t AS SELECT 1 AS id, 'x'::text AS v")  # a view of its name is none
    refused = pgo.undo_cli("init", "--source", pgo.dbname, "--reregister")
    assert refused.returncode == 2, refused.stderr
    assert "holds none of the 1 table(s)" in refused.stderr and "public.t" in refused.stderr
    assert refused.stderr.count("\n") == 1
    # nothing changed: the source keeps its old server's identity, every command refuses
    assert "7000000000000000001" in pgo.undo_cli("session", sid).stderr
    # the same database (its table back): accepted
    pgo.sql("DROP VIEW t; ALTER TABLE u RENAME TO t")
    done = pgo.undo_cli("init", "--source", pgo.dbname, "--reregister")
    assert done.returncode == 0, done.stderr
    assert pgo.undo_cli("session", sid).returncode == 0


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_what_prune_took_counts_under_its_own_source(pgo, tmp_path):
    """What a prune took out (pruned_counts, per source) is counted under that source: on
    SQLite every source's /metrics read every source's (another source's pruned applications
    appeared under each, and its transaction totals were off). The rows are those a prune of
    each source's minutes of activity leaves (a real one needs a whole minute gone)."""
    from tests.integration.test_prune import _counters

    with _beside(pgo, tmp_path, "b") as b:
        _two_sources(pgo, b, at_once=False)
        schema = "undo_store." if pgo.pg_store else ""
        for source, src in ((1, pgo), (2, b)):
            insert = (
                f"INSERT INTO {schema}pruned_counts (source, kind, application_name, relation,"
                f" inserts, n) SELECT source, 'activity', 'gone-{src.dbname[-6:]}', id, 3, 2"
                f" FROM {schema}relations WHERE source = {source}"
            )
            if pgo.pg_store:
                with psycopg.connect(pgo.store, autocommit=True) as c:
                    c.execute(insert.encode())
            else:
                with contextlib.closing(sqlite3.connect(pgo.store)) as c:
                    c.execute(insert)
                    c.commit()
        counted = _counters(pgo)
        for src in (pgo, b):
            gone = f'application="gone-{src.dbname[-6:]}"'
            series = [k for k in counted if k.startswith("undo_transactions_total") and gone in k]
            assert series == [f'undo_transactions_total{{{gone},source="{src.dbname}"}}'], series
            assert counted[series[0]] == 2


def _as_if_moved(src: Source, position: int | None = None) -> None:
    """The store's source as if it were last captured on another server (a fake system
    identifier), which had reached ``position`` there (None: as this one)."""
    from undo.store import open_store

    changed = "UPDATE sources SET system_identifier = '7000000000000000001'"
    if src.pg_store:
        with psycopg.connect(src.store, autocommit=True) as s:
            s.execute("UPDATE undo_store." + changed.removeprefix("UPDATE "))
    else:
        with contextlib.closing(sqlite3.connect(src.store)) as s:
            s.execute(changed)
            s.commit()
    if position is None:
        return
    db = open_store(src.store, source=src.dbname)
    try:
        db.set_meta({"position": str(position)})
    finally:
        db.close()


def _slot_at(src: Source) -> int:
    from undo.core.wal import lsn_to_int

    ((at,),) = src.sql(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (src.slot,),
    )
    return lsn_to_int(at)


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_reregister_onto_a_server_whose_slot_is_behind_the_store_is_refused(pgo):
    """Back onto a server whose slot survived (the red team: register on B, then on A again):
    the store's position is B's, above A's slot. Accepted, capture skipped A's changes up to
    that position as already stored, and init said "nothing changed"."""
    sid = _ready(pgo)
    assert pgo.undo_cli("capture", "--once").returncode == 0
    at = _slot_at(pgo)
    _as_if_moved(pgo, at + (1 << 32))  # the other server was further on
    pgo.sql("INSERT INTO t VALUES (3, 'c')")  # this server's slot holds it
    refused = pgo.undo_cli("init", "--source", pgo.dbname, "--reregister")
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert f"pg_drop_replication_slot('{pgo.slot}')" in refused.stderr
    # nothing changed: the source keeps the other server's identity
    assert "7000000000000000001" in pgo.undo_cli("session", sid).stderr
    # as it says: the slot dropped, the switch is a gap and capture goes on from the new slot
    pgo.sql("SELECT pg_drop_replication_slot(%s)", (pgo.slot,))
    done = pgo.undo_cli("init", "--source", pgo.dbname, "--reregister")
    assert done.returncode == 0, done.stderr
    assert "recorded as a gap" in done.stderr
    pgo.sql("INSERT INTO t VALUES (4, 'd')")
    assert pgo.undo_cli("capture", "--once").returncode == 0
    assert pgo.store_rows("SELECT count(*) FROM gaps") == [(1,)]


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_reregister_onto_a_server_whose_slot_is_ahead_records_the_switch_as_a_gap(pgo):
    """The kept slot is past the store's position (another server's, lower): what this
    server did before the slot's position is not in the trail. init recorded nothing, said
    "nothing changed", and capture then wanted --accept-gap."""
    _ready(pgo)
    assert pgo.undo_cli("capture", "--once").returncode == 0
    at = _slot_at(pgo)
    _as_if_moved(pgo, at - 0x100)
    done = pgo.undo_cli("init", "--source", pgo.dbname, "--reregister")
    assert done.returncode == 0, done.stderr
    assert "re-registered" in done.stdout and "nothing changed" not in done.stdout
    assert "recorded as a gap" in done.stderr
    assert pgo.store_rows("SELECT count(*) FROM gaps") == [(1,)]
    pgo.sql("INSERT INTO t VALUES (3, 'c')")
    captured = pgo.undo_cli("capture", "--once")
    assert captured.returncode == 0, captured.stderr
    assert pgo.store_rows("SELECT count(*) FROM changes") == [(4,)]


def test_the_dashboard_reads_the_slot_the_store_recorded_for_the_dsn_source(pgo, tmp_path):
    """serve read the slot named by --slot (its default, `undo`), not the one the store's
    source was made with: no WAL held, no lag, "source unreachable"; and with --dsn on a
    database of the server that is not a source, every card said "source unreachable" too."""
    from werkzeug.test import Client

    from undo.web import make_app

    _ready(pgo)
    assert pgo.undo_cli("capture", "--once").returncode == 0
    other = dataclasses.replace(pgo.settings, slot="undo")  # serve's default --slot
    metrics = Client(make_app(other)).get("/metrics", headers={"Host": "localhost"}).text
    assert f'undo_slot_wal_held_bytes{{source="{pgo.dbname}"}}' in metrics
    assert f'undo_capture_lag_bytes{{source="{pgo.dbname}"}}' in metrics
    page = Client(make_app(other)).get("/", headers={"Host": "localhost"}).text
    assert re.search(r"WAL held by the slot: [\d,]+ bytes", page), page
    with _beside(pgo, tmp_path, "b") as b:  # a database of the server, never registered
        elsewhere = dataclasses.replace(pgo.settings, dsn=b.dsn)
        page = Client(make_app(elsewhere)).get("/", headers={"Host": "localhost"}).text
        assert "source unreachable" not in page
        assert "--dsn is no source of the store" in html.unescape(page)


@pytest.mark.parametrize("why", ["dropped", "reregister"])
def test_a_kept_slot_older_than_the_publication_init_makes_is_made_again(pgo, why):
    """Red team 6: a slot kept while init makes its publication (dropped meanwhile; a slot made
    by hand before a --reregister) cannot decode a change before the publication existed
    ("publication does not exist", in the walsender): capture said "connection lost (no error
    details available)" and retried for ever, even with --once. init makes the slot again and
    records the gap, as for a lost slot."""
    _ready(pgo)
    assert pgo.undo_cli("capture", "--once").returncode == 0
    pgo.sql(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(pgo.slot)).as_string(None))
    pgo.sql("INSERT INTO t VALUES (3, 'c')")  # a change the slot holds, before the publication
    args: tuple[str, ...] = ("init",)
    if why == "reregister":
        _as_if_moved(pgo, 0x100)
        args = ("init", "--source", pgo.dbname, "--reregister")
    done = pgo.undo_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "recorded as a gap" in done.stderr
    pgo.sql("INSERT INTO t VALUES (4, 'd')")
    captured = subprocess.run(
        [sys.executable, "-m", "undo", "capture", "--once"],
        env={**os.environ, "UNDO_DSN": pgo.dsn, "UNDO_STORE": pgo.store, "UNDO_SLOT": pgo.slot},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert captured.returncode == 0, captured.stderr
    assert pgo.store_rows("SELECT count(*) FROM changes WHERE new LIKE '[\"4\",%'") == [(1,)]


def test_a_stream_the_server_ends_with_an_error_is_given_up_with_its_message(pgo):
    """Red team 6: the walsender's ERROR at the same change on every attempt ("publication ...
    does not exist") was "connection lost (no error details available)", and the attempts
    started again at each reconnect, so `capture --once` never ended."""
    _ready(pgo)
    assert pgo.undo_cli("capture", "--once").returncode == 0
    pgo.sql(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(pgo.slot)).as_string(None))
    pgo.sql("INSERT INTO t VALUES (3, 'c')")
    script = (
        "import sys\n"
        "from undo.core.config import Settings\n"
        "from undo.core.errors import TryAgain\n"
        "from undo.stream.capture import capture\n"
        "try:\n"
        f"    capture(Settings(dsn={pgo.dsn!r}, store={pgo.store!r}, slot={pgo.slot!r}),"
        " once=True, max_attempts=2)\n"
        "except TryAgain as e:\n"
        "    print(e)\n"
        "    sys.exit(75)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 75, (ran.stdout, ran.stderr)
    assert f'publication "{pgo.slot}" does not exist' in ran.stdout, ran.stdout
    assert "after 2 reconnect(s)" in ran.stdout
    assert "no error details available" not in ran.stderr
