"""Many sources in one store (#22): each registered by `undo init`, told apart by the server's
system identifier and the database name; a command acting on one source chooses it (--source,
else the --dsn database's, else the store's only one) and refuses a --dsn that is not it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
from collections.abc import Iterator

from tests.conftest import Source, _make_source
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
            assert json.loads(st.stdout)["store_position"]
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
