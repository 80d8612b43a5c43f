"""A slot belongs to one database (PITFALLS 50). Slot names are per cluster: on a cluster with
two databases, `undo init` on the second with the first's slot name used to adopt the first's
slot (creating none, so capture found no slot and init found nothing to do, in a loop), and
`undo init --uninstall` on the second dropped the first's live slot."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from tests.conftest import Source, _make_source


@pytest.fixture(params=["pgoutput", "wal2json"])
def two(request, cluster, tmp_path) -> Iterator[tuple[Source, Source]]:
    """Two databases of the test cluster, the second told to use the first's slot name."""
    made = [_make_source(cluster, tmp_path / name, request.param) for name in ("first", "second")]
    try:
        first, second = (next(m) for m in made)
        os.makedirs(os.path.dirname(first.store))
        os.makedirs(os.path.dirname(second.store))
        second.slot = first.slot
        for src in (first, second):
            src.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
        yield first, second
    finally:
        for m in made:
            next(m, None)  # drops its database and that database's slots


def slot_of(src: Source) -> list[tuple]:
    return src.sql(
        "SELECT database, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (src.slot,),
    )


def test_init_refuses_a_slot_name_another_database_holds(two):
    first, second = two
    assert first.undo_cli("init").returncode == 0
    before = slot_of(first)
    assert before and before[0][0] == first.dbname

    result = second.undo_cli("init")
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"database {first.dbname}" in result.stderr
    assert f"--slot undo_{second.dbname}" in result.stderr
    # nothing made in the second database or its store; the first's slot untouched
    assert not os.path.exists(second.store)
    assert second.sql("SELECT to_regnamespace('undo')") == [(None,)]
    assert second.sql("SELECT count(*) FROM pg_publication") == [(0,)]
    assert slot_of(first) == before

    # the name it suggests works, and the first database still captures through its slot
    fixed = second.undo_cli("init", "--slot", f"undo_{second.dbname}")
    assert fixed.returncode == 0, fixed.stderr
    second.slot = f"undo_{second.dbname}"
    assert slot_of(second)[0][0] == second.dbname
    first.sql("INSERT INTO t VALUES (1, 'a')")
    second.sql("INSERT INTO t VALUES (2, 'b')")
    assert first.capture().changes == 1
    assert second.capture().changes == 1


def test_uninstall_never_drops_another_databases_slot(two):
    first, second = two
    assert first.undo_cli("init").returncode == 0
    # the second database installed under its own slot name, then uninstalled under the first's
    assert second.undo_cli("init", "--slot", "undo_own").returncode == 0
    before = slot_of(first)

    result = second.undo_cli("init", "--uninstall")
    assert result.returncode == 0, result.stderr
    assert f"dropped slot {first.slot}" not in result.stdout
    assert slot_of(first) == before
    first.sql("INSERT INTO t VALUES (1, 'a')")
    assert first.capture().changes == 1


def test_status_names_no_foreign_slot(two):
    first, second = two
    assert first.undo_cli("init").returncode == 0
    assert second.undo_cli("init", "--slot", "undo_own").returncode == 0

    own = json.loads(second.undo_cli("status", "--json", "--slot", "undo_own").stdout)
    assert own["slot"]["name"] == "undo_own" and own["slot_database"] == second.dbname
    text = second.undo_cli("status", "--slot", "undo_own").stdout
    assert any(line.split() == ["slot_database", second.dbname] for line in text.splitlines()), text

    # asked about the first database's slot name (the trial's `status` on shop2): not this
    # database's slot, and it says whose it is
    foreign = json.loads(second.undo_cli("status", "--json", "--slot", first.slot).stdout)
    assert foreign["slot"] is None, foreign["slot"]
    assert foreign["slot_database"] == first.dbname

    # nor does /metrics count the WAL the first database's slot holds as this store's: it
    # reads the slot this store's source was made with, whatever --slot says
    from undo.web.metrics import StoreCollector

    first.sql("SELECT pg_drop_replication_slot(%s)", (first.slot,))  # were it read: none
    held = [
        s.labels["source"]
        for m in StoreCollector(second.settings).collect()
        if m.name == "undo_slot_wal_held_bytes"
        for s in m.samples
    ]
    assert held == [second.dbname]
