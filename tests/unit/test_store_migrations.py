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
    store = open_store(str(path)).db  # type: ignore[attr-defined]
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
    store = open_store(str(path)).db  # type: ignore[attr-defined]
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
