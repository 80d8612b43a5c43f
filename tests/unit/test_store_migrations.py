"""Store migrations applied to a store written by an older version keep its history usable."""

from __future__ import annotations

import sqlite3

import pytest
from sqlite_utils import Database

from undo.store import open_store
from undo.store._schema import migrations


def test_txn_changes_is_filled_from_the_changes_already_stored(tmp_path):
    path = tmp_path / "old.db"
    db = Database(sqlite3.connect(path))
    migrations.apply(db, stop_before="m006_txn_changes")  # a store as 005 left it
    db.execute(
        "INSERT INTO relations (id, oid, schema_name, table_name, columns, types)"
        " VALUES (1, 10, 's', 't', '[\"id\"]', '[\"integer\"]')"
    )
    db.execute(
        "INSERT INTO transactions (id, xid, commit_lsn, end_lsn, commit_time, tag,"
        " inserts, updates, deletes, truncates, first_change, last_change)"
        " VALUES (1, 7, 1, 2, '2026-01-01T00:00:00Z', 'none', 1, 2, 1, 0, 1, 4)"
    )
    db.execute(
        "INSERT INTO changes (id, txn, ord, relation, op, old, new) VALUES"
        " (1, 1, 1, 1, 'I', NULL, '[\"1\"]'), (2, 1, 2, 1, 'U', '[\"1\"]', '[\"2\"]'),"
        " (3, 1, 3, 1, 'U', NULL, '[\"3\"]'), (4, 1, 4, 1, 'D', NULL, NULL)"
    )
    db.conn.commit()
    db.conn.close()
    store = open_store(str(path)).file  # type: ignore[attr-defined]
    assert sorted(store.execute("SELECT * FROM txn_changes").fetchall()) == [
        (1, 1, "D", 1, 1),
        (1, 1, "I", 1, 0),
        (1, 1, "U", 2, 1),
    ]


def test_versions_stored_before_roots_have_none_and_a_root_makes_a_new_version(tmp_path):
    path = tmp_path / "old.db"
    db = Database(sqlite3.connect(path))
    migrations.apply(db, stop_before="m012_relation_roots")
    version = "10, 'public', 'invoices_2026_09', '[\"id\"]', '[\"integer\"]', '[0]', 0"
    db.execute(
        "INSERT INTO relations (oid, schema_name, table_name, columns, types, key_columns,"
        f" partial) VALUES ({version})"
    )
    db.conn.commit()
    db.conn.close()
    store = open_store(str(path)).file  # type: ignore[attr-defined]
    assert store.execute("SELECT root_schema, root_table FROM relations").fetchall() == [
        (None, None)
    ]
    store.execute(  # the partition met again by capture, now with its root
        "INSERT INTO relations (oid, schema_name, table_name, columns, types, key_columns,"
        f" partial, root_schema, root_table) VALUES ({version}, 'public', 'invoices')"
    )
    with pytest.raises(sqlite3.IntegrityError):
        store.execute(
            "INSERT INTO relations (oid, schema_name, table_name, columns, types, key_columns,"
            f" partial, root_schema, root_table) VALUES ({version}, 'public', 'invoices')"
        )


def test_a_store_made_before_sources_holds_one_claimed_by_its_database(tmp_path):
    """m014: a single-source file becomes one source, 'default' with an unknown identity, whose
    keys (slot, position...) are its own; the first database registered claims it and names
    it; a second database is a source beside it, and a name held by another is refused."""
    from undo.core.errors import BadInput

    path = tmp_path / "old.db"
    db = Database(sqlite3.connect(path))
    migrations.apply(db, stop_before="m014_sources")
    db.execute("INSERT INTO meta (key, value) VALUES ('slot', 'undo'), ('position', '42')")
    db.execute("INSERT INTO meta (key, value) VALUES ('pruned_before', '2026-01-01')")
    db.execute(
        "INSERT INTO transactions (id, xid, commit_lsn, end_lsn, commit_time, tag)"
        " VALUES (1, 7, 1, 2, '2026-01-01T00:00:00Z', 'none')"
    )
    db.conn.commit()
    db.conn.close()
    store = open_store(str(path))
    (only,) = store.sources()
    assert (only.name, only.claimed) == ("default", False)
    assert store.source_name == "default"  # the only source: acted for without a name
    assert (store.meta("slot"), store.meta("position")) == ("undo", "42")
    assert store.meta("pruned_before") == "2026-01-01"  # the store's own key stays the store's
    assert store.db.execute("SELECT source, session_id FROM sessions").fetchall() == [
        ("default", None)
    ]
    assert store.register_source(None, "7301", "shop") == "shop"
    assert [(s.name, s.system_identifier, s.database_name) for s in store.sources()] == [
        ("shop", "7301", "shop")
    ]
    assert store.register_source(None, "7301", "billing") == "billing"
    assert store.meta("slot") is None  # billing's keys: none yet
    store.use("shop")
    assert store.meta("slot") == "undo"
    with pytest.raises(BadInput, match=r"'shop' is taken .* by database shop"):
        store.register_source("shop", "7302", "orders")
    with pytest.raises(BadInput, match="database shop is the source 'shop'"):
        store.register_source("shop2", "7301", "shop")
