"""The audit store on PostgreSQL (issue #22): its schema and migrations, its documented views
against the SQLite store's, and its writer against StoreWriter, in a database of the test
cluster."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import struct
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

from tests.conftest import Cluster
from undo import _speedups as speedups
from undo.core.errors import BadInput, StoreUnreadable
from undo.core.records import Begin, Change, Commit, Relation
from undo.core.times import iso
from undo.source.pg import session_id
from undo.store._schema import open_database as open_store
from undo.store._writer import StoreWriter
from undo.store.postgres import _schema, _store, _writer
from undo.store.postgres._store import _FLAT, _dumps, _JsonText
from undo.store.postgres._writer import PgStoreWriter

_counter = itertools.count(1)
_TEXT = st.characters(exclude_categories=("Cs",), exclude_characters="\0")


@pytest.fixture
def pg_store(cluster: Cluster) -> Iterator[str]:
    """A database of the test cluster for a PostgreSQL store; its conninfo."""
    name = f"undo_store_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield cluster.dsn(name)
    finally:
        with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
            c.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# -- schema ----------------------------------------------------------------------------------
def test_the_schema_installs_and_migrates_idempotently(pg_store):
    with pytest.raises(StoreUnreadable, match="holds no undo audit store: run `undo init`"):
        _schema.open_connection(pg_store)
    with _schema.open_connection(pg_store, create=True) as conn:
        assert _schema.applied(conn) == [v for v, _, _ in _schema.MIGRATIONS]
        assert _schema.migrate(conn) == []  # nothing left to apply
        parts = _schema.partitions(conn)
        assert len(parts) == 1 + _schema.AHEAD  # today's, and the ones ahead
        (n,) = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'undo_store.changes'::regclass"
        ).fetchone() or (0,)
        assert n == len(parts)
    with _schema.open_connection(pg_store, create=True) as conn:  # init again: the same store
        assert _schema.applied(conn) == [v for v, _, _ in _schema.MIGRATIONS]
        assert len(_schema.partitions(conn)) == len(parts)
        conn.execute("INSERT INTO undo_store.migrations (version, name) VALUES (999, 'future')")
    with pytest.raises(StoreUnreadable, match=r"made by a newer undo .* upgrade undo"):
        _schema.open_connection(pg_store)


def test_a_wrong_password_is_one_line_with_the_password_masked(pg_store, cluster):
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
        c.execute("DROP ROLE IF EXISTS undo_pw_test")
        c.execute("CREATE ROLE undo_pw_test LOGIN PASSWORD 'right-one'")
    try:
        params = psycopg.conninfo.conninfo_to_dict(pg_store)
        params.update(user="undo_pw_test", password="wrong-secret", host="127.0.0.1")
        params.pop("port", None)
        params["port"] = psycopg.conninfo.conninfo_to_dict(pg_store).get("port") or "5432"
        with pytest.raises(StoreUnreadable) as e:
            _schema.open_connection(psycopg.conninfo.make_conninfo("", **params))
        assert "wrong-secret" not in str(e.value)
        assert "\n" not in str(e.value)
    finally:
        with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
            c.execute("DROP ROLE IF EXISTS undo_pw_test")


def _sqlite_columns(db: Any, view: str) -> list[str]:
    return [r[1] for r in db.execute(f"PRAGMA table_info({view})").fetchall()]


@pytest.mark.parametrize("view", ["change_log", "sessions", "table_changes"])
def test_the_views_have_the_sqlite_stores_columns_and_source(pg_store, tmp_path, view):
    db = open_store(str(tmp_path / "s.db"), create=True)
    with _schema.open_connection(pg_store, create=True) as conn:
        cols = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = 'undo_store' AND table_name = %s ORDER BY ordinal_position",
                (view,),
            )
        ]
    assert cols[0] == "source" and cols == _sqlite_columns(db, view)


def test_a_source_name_belongs_to_one_database(pg_store):
    with _schema.open_connection(pg_store, create=True) as conn:
        a = _schema.register_source(conn, "shop", "7300000000000000001", "shop")
        assert _schema.register_source(conn, "shop", "7300000000000000001", "shop") == a
        b = _schema.register_source(conn, "billing", "7300000000000000001", "billing")
        assert _schema.id_base(conn, b) - _schema.id_base(conn, a) == _schema.ID_SPAN
        with pytest.raises(
            BadInput, match="the source 'shop' of the audit store here is database shop"
        ):
            _schema.register_source(conn, "shop", "7300000000000000002", "shop")


def test_the_reader_role_reads_and_cannot_write(pg_store, cluster):
    with _schema.open_connection(pg_store, create=True) as conn:
        _schema.register_source(conn, "shop", "1", "shop")
        conn.execute("DROP ROLE IF EXISTS undo_auditor")
        conn.execute("CREATE ROLE undo_auditor LOGIN IN ROLE undo_store_reader")
    try:
        auditor = psycopg.conninfo.make_conninfo(pg_store, user="undo_auditor")
        with _schema.open_connection(auditor) as conn:
            assert conn.execute("SELECT name FROM undo_store.sources").fetchall() == [("shop",)]
            for view in ("change_log", "sessions", "table_changes"):
                conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier("undo_store", view)))
            (part,) = conn.execute(
                "SELECT name FROM undo_store.change_partitions LIMIT 1"
            ).fetchone() or ("",)
            for attack in (
                "DELETE FROM undo_store.transactions",
                "UPDATE undo_store.meta SET value = '0'",
                "INSERT INTO undo_store.gaps (source, detected_at, reason) VALUES (1, now(), 'x')",
                "TRUNCATE undo_store.changes",
                "DROP VIEW undo_store.change_log",
                "CREATE TABLE undo_store.mine (x int)",
                "ALTER TABLE undo_store.changes DETACH PARTITION undo_store." + part,
                "INSERT INTO undo_store." + part + " (id, txn, ord, relation, op, commit_time)"
                " VALUES (1, 1, 1, 1, 'I', now())",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(attack.encode())
    finally:
        with psycopg.connect(pg_store, autocommit=True) as c:
            c.execute("DROP ROLE IF EXISTS undo_auditor")


# -- the writer against StoreWriter -----------------------------------------------------------
RELID = 16384
T0 = "2026-03-01T10:00:00.000000Z"


def _tuple(values: list[str | None]) -> bytes:
    out = bytearray(struct.pack(">h", len(values)))
    for v in values:
        if v is None:
            out += b"n"
        else:
            raw = v.encode()
            out += b"t" + struct.pack(">i", len(raw)) + raw
    return bytes(out)


def _frame(op: str, old: list[str | None] | None, new: list[str | None] | None) -> memoryview:
    """A pgoutput change frame as capture's C stage takes it (full old rows)."""
    m = op.encode() + struct.pack(">I", RELID)
    if old is not None:
        m += b"O" + _tuple(old)
    if new is not None:
        m += b"N" + _tuple(new)
    return memoryview(b"w" + bytes(24) + m)


def _time(i: int, day: int = 0) -> str:
    return iso(datetime(2026, 3, 1 + day, 10, 0, i % 60, i, tzinfo=UTC))


def _play(writer: Any) -> None:
    """The same calls capture makes, into either writer: the Python path (add), the C
    stage (add_staged), truncates, tags and statements, TOAST left unchanged, an aborted
    transaction, a transaction with no change, values needing escapes in COPY, an undo mirror,
    DDL opening a gap, malformed messages and a guard refusal, two days (two partitions)."""
    rel = Relation(RELID, "public", "items", ("id", "v"), types=("integer", "text"))
    other = Relation(16390, "shop", "Odd Name", ("k",), types=("text",))
    rid = writer.relation_id(rel, (0,), False)
    oid_ = writer.relation_id(other, None, True)
    assert writer.relation_id(rel, (0,), False) == rid
    resolved = {RELID: (rid, (0,))}  # as PgOutputDecoder.resolved_key names it
    lsn = 1000
    for i in range(1, 40):
        lsn += 100
        at = _time(i, day=i // 20)
        writer.begin(Begin(500 + i, lsn, at))
        tag = {
            "session": {"session_id": f"s{i % 3}", "user": "alice", "pid": 4242},
            "application_name": "shop-app",
            "statement": f"UPDATE items SET v = 'x' -- {i}",
        }
        if i % 4 == 0:
            writer.set_tag(tag, None)
        elif i % 4 == 1:
            writer.set_tag(dict(tag, statement="forged\x00nul"), "forged")
        for j in range(i % 5):
            values = [str(i * 10 + j), f'tab\there\\back"quote\nline é {j}']
            if j % 2:
                writer.add(
                    Change(rel, "U", [json.dumps(v) for v in values], ['"1"', "null"], [1]),
                    rid,
                    (0,),
                )
            else:
                txn = writer.txn
                staged = speedups.stage(
                    _frame("I", None, values),
                    resolved,
                    writer.rows,
                    txn.counts,
                    writer.next_change,
                    txn.id,
                    txn.ord + 1,
                )
                assert staged == 1
                writer.add_staged()
            if i % 4 == 0 and j == 1:
                writer.add_statement(f"DELETE FROM items -- {i}")
        if i % 6 == 0:
            writer.add(Change(other, "D", None, None), oid_, None)
            writer.add_truncate(oid_)
        if i == 7:
            writer.set_ledger(
                {"target": '{"xids":[501]}', "entries": [["0/44C", "public", "items", "I", "501"]]},
                b"{}",
                None,
            )
        if i == 9:
            writer.add_ddl(
                {
                    "ddl": [{"command": "ALTER TABLE", "object_type": "table", "object": "items"}],
                    "state": [{"table": "public.items", "problems": ["replica identity"]}],
                    "session": {"session_id": "s0"},
                },
                None,
            )
            writer.add_malformed(lsn + 1, "undo.tag", "s9", "bad json", b"\x00{")
        if i == 11:
            writer.add_gap("public.items", "renamed")
        if i in (5, 13):
            writer.abort()  # the connection lost: the server sends it again
            writer.begin(Begin(500 + i, lsn, at))
            writer.add(Change(rel, "I", None, ['"77"', '"again"']), rid, (0,))
        writer.commit(Commit(lsn, lsn + 50, at))
        if i % 8 == 0:
            writer.flush()
        if i == 15:
            writer.add_refusal(
                lsn + 60,
                {"guard": "g", "reason": "r", "at": at, "session": {"session_id": "s1"}},
                "forged",
            )
            writer.add_malformed(lsn + 61, "undo.guard", None, "not usable", b"zz")
    writer.flush()


def _norm(v: Any) -> Any:
    if isinstance(v, datetime):
        return iso(v)
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, memoryview | bytes):
        return bytes(v)
    return v


def _sqlite_rows(db: Any, query: str, json_cols: tuple[int, ...] = ()) -> list[tuple[Any, ...]]:
    out = []
    for r in db.execute(query).fetchall():
        out.append(
            tuple(json.loads(v) if i in json_cols and v is not None else v for i, v in enumerate(r))
        )
    return out


def _pg_rows(conn: Any, query: str) -> list[tuple[Any, ...]]:
    return [tuple(_norm(v) for v in r) for r in conn.execute(query.encode()).fetchall()]


COMPARED = [
    (
        "SELECT id, xid, commit_time, session_id, application_name, user_name, schema_name,"
        " table_name, op, key, columns, old, new, unchanged, statement FROM {}change_log"
        " ORDER BY id",
        (9, 10, 11, 12, 13),
    ),
    (
        "SELECT session_id, application_name, user_name, client_addr, first_change_at,"
        " last_change_at, transactions, inserts, updates, deletes FROM {}sessions"
        " ORDER BY session_id NULLS FIRST",
        (),
    ),
    (
        "SELECT schema_name, table_name, inserts, updates, deletes, truncates FROM {}table_changes"
        " ORDER BY 1, 2",
        (),
    ),
    (
        "SELECT id, xid, commit_lsn, end_lsn, commit_time, session_id, application_name, user_name,"
        " backend_pid, statement, tag, inserts, updates, deletes, truncates, first_change,"
        " last_change, full_xid, tag_reason FROM {}transactions ORDER BY id",
        (),
    ),
    ("SELECT txn, relation, op, n, without_old FROM {}txn_changes ORDER BY 1, 2, 3", ()),
    ("SELECT txn, first_ord, statement FROM {}statements ORDER BY 1, 2", ()),
    (
        "SELECT minute, application_name, session_id, relation, inserts, updates, deletes,"
        " truncates, transactions FROM {}activity ORDER BY 1, 2, 3, 4",
        (),
    ),
    (
        "SELECT from_lsn, to_lsn, reason, kind, table_name, session_id, xid FROM {}gaps"
        " ORDER BY id",
        (),
    ),
    (
        "SELECT commit_lsn, commit_time, xid, session_id, command, object_type, object, tag,"
        " tag_reason FROM {}ddl ORDER BY id",
        (),
    ),
    ("SELECT target, selection, undo_xid, entries, tag, tag_reason FROM {}undos ORDER BY id", ()),
    (
        "SELECT lsn, guard, reason, session_id, tag, tag_reason FROM {}guard_refusals ORDER BY id",
        (),
    ),
    (
        "SELECT lsn, prefix, xid, session_id, problem, size, content FROM {}malformed ORDER BY id",
        (),
    ),
    ("SELECT key, value FROM {}meta WHERE key = 'position'", ()),
]


def test_the_writer_writes_what_store_writer_writes(pg_store, tmp_path, monkeypatch):
    # a transaction of more than 3 changes is written as it goes, after a savepoint
    monkeypatch.setattr(_writer, "SPILL_CHANGES", 3)
    db = open_store(str(tmp_path / "s.db"), create=True)
    db.execute(
        "INSERT INTO sources (id, name, system_identifier, database_name, registered_at)"
        " VALUES (1, 'shop', '1', 'shop', '')"
    )
    _play(StoreWriter(db, 1))
    with _schema.open_connection(pg_store, create=True) as conn:
        source = _schema.register_source(conn, "shop", "1", "shop")
        _play(PgStoreWriter(conn, source))
        assert len(_schema.partitions(conn)) >= 2 + _schema.AHEAD
        for query, json_cols in COMPARED:
            # text from messages keeps everything but U+0000, which PostgreSQL's text refuses
            want = [
                tuple(_nul(v) for v in r)
                # the SQLite store keeps a source's keys apart from its own
                for r in _sqlite_rows(
                    db, query.format("").replace("FROM meta", "FROM source_meta"), json_cols
                )
            ]
            got = _pg_rows(conn, query.format("undo_store."))
            assert got == want, query
        # the changes are in their days' partitions: the first day's holds 19 transactions'
        (n,) = conn.execute(
            "SELECT count(DISTINCT tableoid) FROM undo_store.changes"
        ).fetchone() or (0,)
        assert n == 2


def _nul(v: Any) -> Any:
    return v.replace("\x00", "\ufffd") if isinstance(v, str) else v


def test_a_second_writer_goes_on_after_the_first(pg_store):
    """A restarted capture takes ids and the position where the store left them, and another
    source's ids never meet its own."""
    with _schema.open_connection(pg_store, create=True) as conn:
        a = _schema.register_source(conn, "a", "1", "a")
        b = _schema.register_source(conn, "b", "1", "b")
        rel = Relation(RELID, "public", "items", ("id",), types=("integer",))
        for source, rounds in ((a, 2), (b, 1), (a, 1)):
            w = PgStoreWriter(conn, source)
            rid = w.relation_id(rel, (0,), False)
            for i in range(rounds):
                lsn = w.position + 100
                w.begin(Begin(7, lsn, _time(i)))
                w.add(Change(rel, "I", None, [f'"{i}"']), rid, (0,))
                w.add(Change(rel, "I", None, [f'"{i + 100}"']), rid, (0,))
                w.commit(Commit(lsn, lsn + 1, _time(i)))
                w.flush()
        rows = conn.execute(
            "SELECT t.source, t.id, t.first_change, t.last_change FROM undo_store.transactions t"
            " ORDER BY t.source, t.id"
        ).fetchall()
        base_b = _schema.ID_SPAN
        assert rows == [
            (a, 1, 1, 2),
            (a, 2, 3, 4),
            (a, 3, 5, 6),
            (b, base_b + 1, base_b + 1, base_b + 2),
        ]
        assert _schema.get_meta(conn, a, "position") == "303"  # 100+1, then +101, +101
        assert _schema.get_meta(conn, b, "position") == "101"


def test_a_rows_history_is_read_by_an_index_on_its_key(pg_store):
    """history and undo's check for later writers ask ``relation = ? AND key = ?``: an index
    must answer the key, not only the relation (every change of the table read and filtered:
    150 ms at 600,000 changes, bench/serve)."""
    with _schema.open_connection(pg_store, create=True) as conn:
        conn.execute("SET enable_seqscan = off")  # a plan for a big store, on a small one
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN SELECT c.op FROM undo_store.changes c"
                " WHERE c.relation = %s AND c.key = %s",
                (1, '["42"]'),
            )
        )
        assert "Index Cond: (key = " in plan, plan


#: text that jsonb escapes or that looks like its syntax: quotes, backslashes, control
#: characters, "null, " and ", " inside a string, non-BMP characters
_TRICKY = st.lists(
    st.sampled_from(['"', "\\", "null", ", ", '", "', "\n", "\x01", "\x1f", "\x7f", "/"])
    | st.sampled_from(["\u2028", "\ufeff", "é", "\U0001f600", "\\u0041", "[", "]", "{"]),
    max_size=6,
).map("".join)
_ELEMENT = st.none() | _TRICKY | st.text(_TEXT, max_size=8)


@settings(max_examples=300)  # deadline and health checks: the profile in tests/conftest.py
@given(values=st.lists(_ELEMENT, max_size=6))
def test_an_image_loads_as_the_sqlite_stores_text(pg_store, values):
    """A reader loads a flat jsonb array of strings and nulls (an image, a key) by compacting
    jsonb's text, not by json.loads + dumps (36% of an undo's time): the same text, built by the
    server from arbitrary strings, and the fast path taken."""
    with psycopg.connect(pg_store) as conn:
        raw = conn.execute("SELECT to_jsonb(CAST(%s AS text[]))::text", (values,)).fetchone()[0]
        assert _FLAT.fullmatch(raw.encode()), raw  # the compacting, not the old path
        cur = conn.cursor()
        cur.adapters.register_loader("jsonb", _JsonText)
        got = cur.execute("SELECT to_jsonb(CAST(%s AS text[]))", (values,)).fetchone()[0]
    assert got == _dumps(json.loads(raw)) == _dumps(values)


@pytest.mark.parametrize(
    "text",
    ['[1, "a, b", null]', '[["a", "b"], "c"]', '{"a": "b, c", "d": null}', '"x"', "[]", "null"],
)
def test_any_other_jsonb_loads_as_before(pg_store, text):
    with psycopg.connect(pg_store) as conn:
        cur = conn.cursor()
        cur.adapters.register_loader("jsonb", _JsonText)
        got = cur.execute("SELECT CAST(%s AS jsonb)", (text,)).fetchone()[0]
    assert got == _dumps(json.loads(text))


def _one_bulk_insert(pgo: Any, rows: int, value: str) -> tuple[int, int, int]:
    """A table ``many`` and one statement inserting ``rows`` rows of ``value`` (SQL), captured:
    the store's relation id of it and the transaction's first and last change ids."""
    pgo.init()
    pgo.sql("CREATE TABLE many (id int PRIMARY KEY, v text)")
    pgo.sql(f"INSERT INTO many SELECT g, {value} FROM generate_series(1, {rows}) g")
    pgo.capture()
    (rel,) = pgo.store_rows("SELECT id FROM relations WHERE table_name = 'many'")[0]
    first, last = pgo.store_rows(
        "SELECT first_change, last_change FROM transactions WHERE first_change IS NOT NULL"
        " ORDER BY id DESC LIMIT 1"
    )[0]
    return int(rel), int(first), int(last)


@pytest.mark.parametrize("store_kind", ["postgresql"], indirect=True)
def test_the_changes_an_undo_reads_from_a_postgresql_store_are_streamed(pgo):
    """A table's changes are read as they arrive, not the whole result before the first is
    used (peak RSS 113-153 MB against SQLite's 45-49 for 300,000 changes, bench/undo): after
    the first the query still runs; one closed early leaves the connection usable."""
    from psycopg.pq import TransactionStatus

    from undo.store import open_store as open_any

    rel, first, last = _one_bulk_insert(pgo, 5000, "repeat('x', 50)")
    store = open_any(pgo.store)
    try:
        read = store.changes(first, last, rel, None)
        assert next(read).id == first
        assert store.conn.pgconn.transaction_status == TransactionStatus.ACTIVE
        del read  # closed early: its query cancelled
        assert store.conn.execute("SELECT 1").fetchone() == (1,)
        assert [c.id for c in store.changes(first, last, rel, None)] == list(range(first, last + 1))
    finally:
        store.close()


@pytest.mark.parametrize("store_kind", ["postgresql"], indirect=True)
def test_a_bulk_statements_changes_are_read_in_id_order_never_sorted(pgo):
    """An undo reads a table's changes of a large transaction in id order from the primary key,
    whatever the planner estimates: it took `+relation = ?` for 0.5% of the range and sorted
    them after a bitmap scan (300,000 changes: 0.42 s spilled to disk before the first row,
    bench/undo). The plan as the server ran it, from auto_explain; the setting then undone."""
    import re

    from undo.store import open_store as open_any

    rel, first, last = _one_bulk_insert(pgo, 12000, "'x'")
    store = open_any(pgo.store)
    try:
        plans: list[str] = []
        store.conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
        store.conn.execute("LOAD 'auto_explain'")
        store.conn.execute("SET auto_explain.log_min_duration = 0")
        store.conn.execute("SET auto_explain.log_level = notice")
        assert [c.id for c in store.changes(first, last, rel, None)] == list(range(first, last + 1))
        (plan,) = [p for p in plans if "FROM changes" in p]
        assert not re.search(r"(?m)^[ \t>-]*Sort +\(", plan), plan
        assert store.conn.execute("SHOW enable_sort").fetchone() == ("on",)
        read = store.changes(first, last, rel, None)
        assert next(read).id == first
        del read  # closed early: its query cancelled, the setting undone as well
        assert store.conn.execute("SHOW enable_sort").fetchone() == ("on",)
    finally:
        store.close()


def test_table_names_are_computed_inline_whatever_the_search_path(pg_store, cluster):
    """qualified_name() runs for every activity row of /metrics, `activity --by table` and
    `sessions --table`: PostgreSQL inlines it (a SET or STRICT function is called, 70 µs a
    row on a busy store); with no SET search_path of its own, every name in it is qualified, so
    a reader's search_path cannot change what it gives."""
    with _schema.open_connection(pg_store, create=True) as conn:
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN VERBOSE SELECT undo_store.qualified_name(r.schema_name, r.table_name)"
                " FROM undo_store.relations r"
            )
        )
        assert "qualified_name" not in plan and "quote_part" not in plan, plan
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
        c.execute("DROP ROLE IF EXISTS undo_evil_reader")
        c.execute("CREATE ROLE undo_evil_reader LOGIN IN ROLE undo_store_reader")
    try:
        with psycopg.connect(pg_store, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA evil AUTHORIZATION undo_evil_reader")
        params = psycopg.conninfo.conninfo_to_dict(pg_store)
        params["user"] = "undo_evil_reader"
        with psycopg.connect(**params, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION evil.replace(text, text, text) RETURNS text"
                " LANGUAGE sql AS $$ SELECT 'pwned' $$;"
                " CREATE FUNCTION evil.cat(text, text) RETURNS text"
                " LANGUAGE sql AS $$ SELECT 'pwned' $$;"
                " CREATE OPERATOR evil.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.cat);"
                " SET search_path = evil, pg_catalog"
            )
            row = conn.execute("SELECT undo_store.qualified_name('My \"App\"', 'items')").fetchone()
            assert row == ('"My ""App"""' + ".items",)
    finally:
        with psycopg.connect(pg_store, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS evil CASCADE")
        with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
            c.execute("DROP ROLE IF EXISTS undo_evil_reader")


def test_a_reader_scopes_its_source_in_one_transaction_and_runs_no_parallel_workers(pg_store):
    """The temporary views that scope a reader to its source (made by every listing and every
    dashboard request) are one transaction, not one commit each: each commit of a catalog
    change waited for the store's WAL flush, a dozen per request (up to 200 ms of a 200 ms
    budget on a busy store, bench/serve)."""
    from undo.store import open_store as open_any

    store = open_any(pg_store, create=True)
    try:
        store.register_source("shop", "1", "shop")

        def xid() -> int:
            (x,) = store.conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
            return int(x)

        before = xid()
        store.sessions()  # the first read makes the views
        assert xid() - before - 1 <= 1  # transactions that wrote, between the two readings
        # and its queries start no parallel workers (their start cost more than they saved)
        assert store.conn.execute("SHOW max_parallel_workers_per_gather").fetchone() == ("0",)
        assert store.sessions() == []
    finally:
        store.close()


def test_the_listings_answer_as_on_sqlite(pg_store, tmp_path):
    """The store's reads, one SQL text run on both engines (PostgreSQL through its Runner: the
    placeholders, the few fragments, the source's rows), give the same documents for the same
    history, and an undo's reads the same records."""
    from undo.store import open_store as open_any
    from undo.store.sqlite import SqliteStore

    lite = SqliteStore(str(tmp_path / "s.db"), create=True)
    lite.register_source("shop", "1", "shop")
    _play(lite.writer())
    with _schema.open_connection(pg_store, create=True) as conn:
        source = _schema.register_source(conn, "shop", "1", "shop")
        _play(PgStoreWriter(conn, source))
    pg = open_any(pg_store)
    assert pg.engine == "PostgreSQL"
    try:
        for ask in (
            lambda d: d.sessions(),
            lambda d: d.sessions(since=_time(3), app="shop-app", tables=["items"]),
            lambda d: d.sessions(limit=2, offset=1, undone_filter=False),
            lambda d: d.show(session_id="s0"),
            lambda d: d.show(session_id="s1"),
            lambda d: d.show(xid=509),
            lambda d: d.status(),
            lambda d: d.activity(by="table"),
            lambda d: d.activity(by="session", bucket_seconds=3600),
            lambda d: d.history("items", {"id": "30"}, lambda c, t, v: v),
            lambda d: d.guard_refusals(),
            lambda d: d.ddl_of(xid=509),
            lambda d: sorted(d.undone_sessions().items(), key=str),
            lambda d: d.transactions(session_id="s0", since=_time(0)),
            lambda d: [d.txn_changes(t.id) for t in d.transactions()],
            lambda d: d.changes_page([t.id for t in d.transactions()], 5, 2),
            lambda d: d.guard_refusal_counts(),
            lambda d: d.metrics(),
            lambda d: d.history_start(),
        ):
            got, want = _json(ask(pg)), _json(ask(lite))
            assert got == want
            assert got not in ([], {}, None)
    finally:
        pg.close()


def _json(doc: Any) -> Any:
    """A document as its JSON says it (JSON text inside compared as values)."""

    def norm(v: Any) -> Any:
        if isinstance(v, dict):
            # when capture met a gap is now for each of the two writers
            return {k: norm(x) for k, x in v.items() if k not in ("at", "detected_at")}
        if isinstance(v, list | tuple):
            return [norm(x) for x in v]
        if isinstance(v, str):
            v = _nul(v)
            if v[:1] in "[{":
                try:
                    return json.loads(v)
                except ValueError:
                    return v
        return v

    def plain(o: Any) -> Any:  # the store's records as their fields
        return dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)

    return norm(json.loads(json.dumps(doc, default=plain)))


# -- the commands, end to end ----------------------------------------------------------------
def _uri(conninfo: str) -> str:
    """A store's conninfo as a postgresql:// URI (a socket folder as the host parameter), with
    a password (the cluster trusts its socket: never needed, never to be printed)."""
    from urllib.parse import quote

    p = psycopg.conninfo.conninfo_to_dict(conninfo)
    return (
        f"postgresql://{p.get('user', '')}:s3cret-pw@/{p['dbname']}"
        f"?host={quote(str(p.get('host', '')), safe='')}&port={p.get('port', '')}"
    )


_SLOT_AND_STORE = (
    "slot",
    "publication",
    "store_position",
    "lag_bytes",
    "store_bytes",
    "store",
    "notes",
)


def _same(doc: Any) -> Any:
    """A listing without what differs between two captures of one stream into two stores:
    the slot, how far each is, and the bytes each engine takes."""
    if isinstance(doc, dict):
        return {k: _same(v) for k, v in doc.items() if k not in _SLOT_AND_STORE}
    if isinstance(doc, list):
        return [_same(v) for v in doc]
    return doc


def test_every_command_on_a_postgresql_store_answers_as_on_sqlite(pgo, pg_store):
    """init --store postgresql://..., capture, status, sessions, show, history, activity, guard
    list and an undo, through the CLI: the same documents as a SQLite store that captured the
    same stream with a slot of its own."""
    from tests.conftest import run_cli
    from undo.source.pg import session_id

    pgo.sql("CREATE TABLE accounts (id int PRIMARY KEY, name text)")
    uri = _uri(pg_store)
    pg_env = {"UNDO_STORE": uri, "UNDO_SLOT": pgo.slot + "_pg"}
    made = run_cli(pgo, "init", "--source", "shop", env=pg_env)
    assert made.returncode == 0, made.stderr
    assert pgo.undo_cli("init", "--source", "shop").returncode == 0
    with psycopg.connect(pg_store) as c:
        assert c.execute("SELECT name, database_name FROM undo_store.sources").fetchall() == [
            ("shop", pgo.dbname)
        ]
    assert run_cli(pgo, "guard", "add", "reporting*", env=pg_env).returncode == 0
    with pgo.connect(application_name="signup") as c:
        c.execute("INSERT INTO accounts VALUES (42, 'Ada'), (43, 'Bob')")
    with pgo.connect(application_name="support") as c:
        sid = session_id(c)
        c.execute("UPDATE accounts SET name = 'Ada L.' WHERE id = 42")
        c.execute("DELETE FROM accounts WHERE id = 43")
    with pytest.raises(psycopg.Error), pgo.connect(application_name="reporting-1") as c:
        c.execute("DELETE FROM accounts")
    for env in (pg_env, {}):
        done = run_cli(pgo, "capture", "--once", env=env)
        assert done.returncode == 0, done.stderr
    (support,) = [
        s
        for s in json.loads(run_cli(pgo, "sessions", "--json", env=pg_env).stdout)
        if s["application_name"] == "support"
    ]
    assert support["session_id"] == sid
    asked = [
        ("status", "--json"),
        ("sessions", "--json"),
        ("sessions", "--table", "accounts", "--json"),
        ("show", "session", support["session_id"], "--json"),
        ("history", "accounts", "id=42", "--json"),
        ("activity", "--by", "table", "--json"),
        ("guard", "list", "--json"),
        ("check", "--json"),
        ("session", support["session_id"]),  # the undo script, printed
    ]
    for args in asked:
        on_pg = run_cli(pgo, *args, env=pg_env)
        on_lite = pgo.undo_cli(*args)
        assert (on_pg.returncode, on_pg.stderr) == (0, on_lite.stderr), args
        assert "s3cret-pw" not in on_pg.stdout + on_pg.stderr, args
        if "--json" in args:
            assert _same(json.loads(on_pg.stdout)) == _same(json.loads(on_lite.stdout)), args
        else:
            assert on_pg.stdout == on_lite.stdout, args
    undone = run_cli(pgo, "session", support["session_id"], "--apply", env=pg_env)
    assert undone.returncode == 0, undone.stderr
    assert pgo.sql("SELECT id, name FROM accounts ORDER BY id") == [(42, "Ada"), (43, "Bob")]
    assert run_cli(pgo, "capture", "--once", env=pg_env).returncode == 0
    (row,) = [
        s
        for s in json.loads(run_cli(pgo, "sessions", "--json", env=pg_env).stdout)
        if s["session_id"] == support["session_id"]
    ]
    assert row["undone"] is not None and row["undone"]["all"] is True
    again = run_cli(pgo, "session", support["session_id"], "--apply", env=pg_env)
    assert again.returncode == 1 and "already undone" in again.stderr, again.stderr


def _newer(pg_store: str) -> None:
    with _schema.open_connection(pg_store, create=True) as conn:
        conn.execute("INSERT INTO undo_store.migrations (version, name) VALUES (999, 'future')")


STORE_REFUSALS = {
    # (the store: {host}, {port} the cluster's socket folder and port, {db} the store's
    # database; what to make there first; what the one line says)
    "unreachable": (
        "postgresql://undo_pw_test:s3cret-pw@127.0.0.1:1/x?connect_timeout=3",
        None,
        "cannot connect to the audit store",
    ),
    "wrong password": (
        "postgresql://undo_pw_test:s3cret-pw@/{db}?host={host}&port={port}",
        None,
        "password authentication failed",
    ),
    "not a store": (
        "host={host} port={port} dbname={db} user=undo_pw_test password=right-one",
        None,
        "holds no undo audit store",
    ),
    "made by a newer undo": (
        "postgresql://undo_pw_test:right-one@/{db}?host={host}&port={port}",
        _newer,
        "made by a newer undo",
    ),
}


@contextlib.contextmanager
def _password_role(cluster: Cluster) -> Iterator[None]:
    """The role undo_pw_test, whose logins need its password (right-one): a line of its own
    first in the throwaway cluster's pg_hba.conf, taken out again after."""
    if cluster.temp is None:
        pytest.skip("needs the throwaway cluster (its pg_hba.conf)")
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
        (hba,) = c.execute("SHOW hba_file").fetchone() or ("",)
        c.execute("DROP ROLE IF EXISTS undo_pw_test")
        c.execute("SET password_encryption = 'scram-sha-256'")
        c.execute("CREATE ROLE undo_pw_test SUPERUSER LOGIN PASSWORD 'right-one'")
        with open(hba) as f:
            before = f.read()
        with open(hba, "w") as f:
            f.write("local all undo_pw_test scram-sha-256\n" + before)
        c.execute("SELECT pg_reload_conf()")
        time.sleep(0.2)
    try:
        yield
    finally:
        with open(hba, "w") as f:
            f.write(before)
        with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
            c.execute("SELECT pg_reload_conf()")
            c.execute("DROP ROLE IF EXISTS undo_pw_test")


@pytest.mark.parametrize("case", STORE_REFUSALS.values(), ids=STORE_REFUSALS.keys())
@pytest.mark.parametrize("command", [["sessions"], ["capture", "--once"]])
def test_a_store_undo_cannot_use_is_one_line_exit_2_password_masked(
    pgo, pg_store, cluster, case, command
):
    from urllib.parse import quote

    from tests.conftest import run_cli

    store, prepare, says = case
    with _password_role(cluster):
        if prepare is not None:
            prepare(pg_store)
        p = psycopg.conninfo.conninfo_to_dict(pg_store)
        host = str(p.get("host") or "")
        store = store.format(
            host=quote(host, safe="") if store.startswith("postgresql:") else host,
            port=p.get("port") or 5432,
            db=p["dbname"],
        )
        done = run_cli(pgo, *command, env={"UNDO_STORE": store})
        lines = done.stderr.splitlines()
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert lines[-1].startswith("Error: ") and says in lines[-1], done.stderr
        assert [x for x in lines if x.startswith("Error")] == [lines[-1]]
        assert "s3cret-pw" not in done.stderr + done.stdout
        assert "right-one" not in done.stderr + done.stdout


def test_a_store_holds_many_sources_and_acts_for_the_one_chosen(pg_store):
    """A second database registers beside the first (its ids a span of their own); a store
    opened without a name acts for no source while it holds two: what acts on one asks which."""
    from undo.store import open_store as open_any

    first = open_any(pg_store, create=True)
    assert first.register_source(None, "7300000000000000001", "shop") == "shop"
    assert first.register_source("shop", "7300000000000000001", "shop") == "shop"  # again
    first.set_meta({"slot": "undo"})
    first.close()
    second = open_any(pg_store, create=True, source="billing")
    try:
        assert second.register_source("billing", "7300000000000000001", "billing") == "billing"
        second.set_meta({"slot": "undo_billing"})
        assert [s.name for s in second.sources()] == ["shop", "billing"]
    finally:
        second.close()
    store = open_any(pg_store)
    try:
        assert store.source_name is None
        with pytest.raises(BadInput, match=r"several sources \(shop, billing\)"):
            store.set_meta({"slot": "x"})
        assert store.use("shop").database_name == "shop" and store.meta("slot") == "undo"
        assert store.use("billing").name == "billing" and store.meta("slot") == "undo_billing"
        with pytest.raises(BadInput, match=r"no source 'nope'.*its sources: shop, billing"):
            store.use("nope")
    finally:
        store.close()


def _pg_count(store: str) -> tuple[int, int]:
    with psycopg.connect(store) as c:
        row = c.execute("SELECT count(*), count(DISTINCT key) FROM undo_store.changes").fetchone()
        return (row[0], row[1]) if row else (0, 0)


def test_a_capture_that_loses_its_store_stops_and_the_restart_loses_nothing(pgo, pg_store):
    """The store's server going away mid-stream (its backends terminated): capture stops with
    one line naming the store (75: a restart does it), having confirmed nothing the store does
    not hold; the next capture stores every change once."""
    import signal
    import subprocess
    import sys

    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    env = dict(os.environ, UNDO_DSN=pgo.dsn, UNDO_STORE=_uri(pg_store), UNDO_SLOT=pgo.slot)
    made = subprocess.run(
        [sys.executable, "-m", "undo", "init"], env=env, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "undo", "capture"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pgo.sql("INSERT INTO t SELECT generate_series(1, 1000)")
        for _ in range(100):
            if _pg_count(pg_store) == (1000, 1000):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("capture stored nothing")
        with psycopg.connect(pg_store, autocommit=True) as c:
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'undo store' AND pid <> pg_backend_pid()"
            )
        pgo.sql("INSERT INTO t SELECT generate_series(1001, 2000)")
        code = proc.wait(timeout=60)
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    last = err.strip().splitlines()[-1]
    assert code == 75, err
    assert last.startswith("Error: capture stopped: lost the audit store"), err
    assert "Traceback" not in err
    again = subprocess.run(
        [sys.executable, "-m", "undo", "capture", "--once"], env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert _pg_count(pg_store) == (2000, 2000)


#: store-side errors raised in the store while capture writes a batch: (ERRCODE, what the one
#: line says); each is the store's, never "the source database refused"
STORE_SIDE = {
    "disk-full": ("disk_full", "the disk holding the audit store"),
    "read-only": ("read_only_sql_transaction", "cannot be written"),
    "timeout": ("query_canceled", "the audit store"),
}


@pytest.mark.parametrize("store_kind", ["postgresql"], indirect=True)
@pytest.mark.parametrize("case", STORE_SIDE.values(), ids=STORE_SIDE.keys())
def test_a_store_side_error_during_capture_is_the_stores_exit_2(pgo, case):
    """A PostgreSQL store that refuses a batch (its disk full: SQLSTATE 53100, raised here by a
    trigger on the store as the server raises it) stops capture with one line naming the store,
    exit 2 (a person frees space), nothing confirmed to the source; on b6ddbd6 it was taken for
    the source going away (reconnects, then "lost the source database", exit 75)."""
    from tests.conftest import run_cli

    errcode, says = case
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    with psycopg.connect(pgo.store, autocommit=True) as c:
        c.execute(
            sql.SQL(
                "CREATE FUNCTION public.store_refuses() RETURNS trigger LANGUAGE plpgsql AS"
                " $$BEGIN RAISE EXCEPTION 'refused by the test''s trigger'"
                " USING ERRCODE = {}; END$$"
            ).format(sql.Literal(errcode))
        )
        c.execute(
            "CREATE TRIGGER refuses BEFORE INSERT ON undo_store.transactions"
            " FOR EACH STATEMENT EXECUTE FUNCTION public.store_refuses()"
        )
    confirmed = "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s"
    before = pgo.sql(confirmed, (pgo.slot,))
    pgo.sql("INSERT INTO t SELECT generate_series(1, 10)")
    done = run_cli(pgo, "capture", "--once")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "source database" not in done.stderr
    assert [x for x in lines if x.startswith("Error")] == [lines[-1]]
    assert lines[-1].startswith("Error: capture stopped: ") and says in lines[-1], done.stderr
    assert "so the slot keeps those changes" in lines[-1]
    assert pgo.sql(confirmed, (pgo.slot,)) == before
    with psycopg.connect(pgo.store, autocommit=True) as c:
        c.execute("DROP TRIGGER refuses ON undo_store.transactions")
    again = run_cli(pgo, "capture", "--once")
    assert again.returncode == 0, again.stderr
    assert _pg_count(pgo.store) == (10, 10)


def _store_connections(store: str) -> int:
    """The backends of undo's store connections to the store's database, once those closed
    have gone (a backend ends a moment after its client says goodbye)."""
    n = 0
    with psycopg.connect(store, autocommit=True) as c:
        for _ in range(50):
            (n,) = c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'undo store'"
            ).fetchone() or (0,)
            if n == 0:
                break
            time.sleep(0.05)
    return int(n)


@pytest.mark.parametrize("store_kind", ["postgresql"], indirect=True)
def test_commands_called_in_process_close_the_store(pgo):
    """A command (or an engine function) run as a library in a long-lived process lets go of
    the store's connection when it returns or fails, whatever still holds its exception (a
    test's CliRunner result, a caller's except): on b6ddbd6 every failed listing or undo left
    its connection open while the error lived."""
    from click.testing import CliRunner

    from undo.cli import cli
    from undo.core.errors import NotFound, NotRecorded
    from undo.engine.apply import undo
    from undo.engine.plan import Target
    from undo.source.status import status
    from undo.store import open_store as open_any

    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    pgo.capture()
    assert _store_connections(pgo.store) == 0
    args = ["--dsn", pgo.dsn, "--store", pgo.store, "--slot", pgo.slot]
    kept = []  # each result, its exception and what that holds, alive while the store is asked
    for command, code in (
        (["sessions", "--json"], 0),
        (["sessions", "--table", "public.nope"], 2),
        (["show", "session", "nope.1"], 2),
        (["show", "xact", "1"], 2),
        (["history", "public.t", "id=3"], 1),
        (["activity", "--json"], 0),
        (["session", "nope.1"], 2),
        (["table", "t", "--to", "2000-01-01T00:00:00Z"], 1),
    ):
        result = CliRunner().invoke(cli, [*args, *command])
        assert result.exit_code == code, (command, result.output)
        kept.append(result)
        assert _store_connections(pgo.store) == 0, command
    with pytest.raises(NotFound) as failed:
        undo(pgo.settings, Target(session="nope.1"))
    assert _store_connections(pgo.store) == 0
    with pytest.raises(NotRecorded) as unknown, open_any(pgo.store) as store:
        store.history("public.t", {"id": "3"}, lambda column, type_, value: value)
    assert _store_connections(pgo.store) == 0
    assert status(pgo.settings)["store_position"]
    assert _store_connections(pgo.store) == 0
    assert failed.value and unknown.value and kept


@pytest.mark.parametrize("how", ["capture --keep", "undo prune"])
def test_a_prune_that_meets_a_write_to_what_it_counts_counts_it_once(pg_store, how):
    """A prune adds the activity before the cut to pruned_counts and deletes it in one
    snapshot: a row written in between (here, held by an open transaction until the prune
    waits on it) is not deleted uncounted; the prune does not fail (a step of --keep gives up
    its turn, capture goes on; `undo prune` counts again) and the row is counted, as written,
    once."""
    import threading

    from undo.store.postgres import _prune

    rel = Relation(RELID, "public", "items", ("id",), types=("integer",))
    with _schema.open_connection(pg_store, create=True) as conn:
        source = _schema.register_source(conn, "a", "1", "a")
        w = PgStoreWriter(conn, source)
        rid = w.relation_id(rel, (0,), False)
        for day in (0, 1):  # stored up to day 1: the cut falls at its partition's start
            lsn = w.position + 100
            w.begin(Begin(7 + day, lsn, _time(0, day)))
            w.add(Change(rel, "I", None, [f'"{day}"']), rid, (0,))
            w.commit(Commit(lsn, lsn + 1, _time(0, day)))
            w.flush()
        before = iso(datetime(2026, 3, 2, 12, tzinfo=UTC))
        minute = int(datetime(2026, 3, 1, 10, tzinfo=UTC).timestamp())

        def prune() -> Any:
            if how == "undo prune":
                return _prune.prune(conn, before, lambda: 0)
            return _prune.prune_step(conn, before)

        with psycopg.connect(pg_store) as writer:
            writer.execute(
                "UPDATE undo_store.activity SET inserts = inserts + 1,"
                " transactions = transactions + 1 WHERE minute = %s",
                (minute,),
            )
            done: list[Any] = []
            pruning = threading.Thread(target=lambda: done.append(prune()), daemon=True)
            pruning.start()
            deadline = time.monotonic() + 30
            with psycopg.connect(pg_store, autocommit=True) as watch:
                while not watch.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'undo store'"
                    " AND wait_event_type = 'Lock'"
                ).fetchone():
                    assert time.monotonic() < deadline and pruning.is_alive(), done
                    time.sleep(0.05)
            writer.commit()
        pruning.join(30)
        assert done, "the prune failed"  # (and capture --keep with it)
        while how == "capture --keep" and _prune.prune_step(conn, before).more:
            pass
        counted = conn.execute(
            "SELECT kind, inserts, n FROM undo_store.pruned_counts WHERE kind = 'activity'"
        ).fetchall()
        assert counted == [("activity", 2, 2)]
        assert conn.execute(
            "SELECT count(*) FROM undo_store.activity WHERE minute = %s", (minute,)
        ).fetchone() == (0,)


@pytest.mark.parametrize("store_kind", ["postgresql"], indirect=True)
def test_the_store_is_on_the_server_the_run_says(pgo):
    """The premise of ./dev test's stage with UNDO_TEST_STORE_SERVER=second: there the store
    is on another server than the source, as a remote store would be; else on the same."""
    pgo.init()

    def server(dsn: str) -> str:
        with psycopg.connect(dsn) as c:
            return str(c.execute("SELECT system_identifier FROM pg_control_system()").fetchone())

    apart = server(pgo.store) != server(pgo.dsn)
    assert apart == (os.environ.get("UNDO_TEST_STORE_SERVER") == "second")


@pytest.mark.parametrize("store_kind", ["postgresql"], indirect=True)
def test_a_transactions_changes_are_read_from_its_partition_only(pgo, monkeypatch):
    """`show` reads each transaction's changes by its id range; by that alone PostgreSQL
    scanned every partition of changes, 20-80 ms a transaction at 5,000,000 changes (250 ms
    for a session of 5): with the transaction's commit time, the partition key, one."""
    from tests.integration.test_prune import _narrow_partitions
    from undo.store import open_store
    from undo.store.postgres import _store

    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    _narrow_partitions(pgo)
    with pgo.connect() as c:
        sid = session_id(c)
        for i in range(3):  # a transaction a partition
            c.execute("INSERT INTO t VALUES (%s)", (i,))
            time.sleep(1.1)
    pgo.capture()
    seen: list[tuple[str, Any]] = []
    execute = _store.Runner.execute

    def recording(self: Any, query: str, parameters: Any = ()) -> Any:
        if query.startswith("SELECT c.txn, c.ord"):
            seen.append((query, parameters))
        return execute(self, query, parameters)

    monkeypatch.setattr(_store.Runner, "execute", recording)
    db = open_store(pgo.store)
    try:
        assert len(db.show(session_id=sid).transactions) == 3
        assert len(seen) == 3
        for query, parameters in seen:
            plan = [
                r[0] for r in execute(db.db, "EXPLAIN (ANALYZE, COSTS OFF) " + query, parameters)
            ]
            scans = [line for line in plan if " on changes_" in line]
            read = [line for line in scans if "never executed" not in line]
            assert len(scans) >= 3 and len(read) == 1, "\n".join(plan)
    finally:
        db.close()


# -- a change's images as text (migration 4) --------------------------------------------------
#: strings jsonb escapes or that look like its syntax, as capture's tokens (encode_basestring)
_ODD_STRINGS = ['"', "\\", "null", ", ", '", "', "\n\t\r\b\f", "\x01\x1f", "\x7f", "/", "\u2028",
                "\ufeff", "é", "\U0001f600", "\\u0041", "[", "]", "{", "", "a, b"]  # fmt: skip


def _previous_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """_schema as the undo before migration 4 had it: what it opens or makes is that version."""
    monkeypatch.setattr(_schema, "MIGRATIONS", [m for m in _schema.MIGRATIONS if m[0] < 4])
    monkeypatch.setattr(_schema, "LATEST", 3)


def _play_odd(writer: Any, day: int = 0, first_xid: int = 900) -> None:
    """Changes whose images hold every odd string, as capture's stage writes them."""
    from json.encoder import encode_basestring

    rel = Relation(16400, "public", "odd", ("id", "v", "w"), types=("text", "text", "text"))
    rid = writer.relation_id(rel, (0,), False)
    lsn = 50_000 + 1000 * day
    for i, s in enumerate(_ODD_STRINGS):
        lsn += 10
        at = _time(i, day=day)
        writer.begin(Begin(first_xid + i, lsn, at))
        a = [encode_basestring(f"{s}{i}"), encode_basestring(s), "null"]
        b = [encode_basestring(f"{s}{i}"), encode_basestring(s + s), encode_basestring(s)]
        writer.add(Change(rel, "I", None, a), rid, (0,))
        writer.add(Change(rel, "U", a, b, [2] if i % 2 else None), rid, (0,))
        writer.add(Change(rel, "D", b, None), rid, (0,))
        writer.commit(Commit(lsn, lsn + 5, at))
    writer.flush()


_IMAGES = "SELECT id, key, old, new, unchanged FROM changes ORDER BY id"


def _asks() -> list[Any]:
    """What listings, history and an undo read from a store (as the listings test asks)."""
    return [
        lambda d: d.sessions(),
        lambda d: d.show(session_id="s0"),
        lambda d: d.show(xid=509),
        lambda d: d.show(xid=905),
        lambda d: d.activity(by="table"),
        lambda d: d.history("items", {"id": "30"}, lambda c, t, v: v),
        lambda d: [
            d.history("odd", {"id": f"{s}{i}"}, lambda c, t, v: v)
            for i, s in enumerate(_ODD_STRINGS)
        ],
        lambda d: d.transactions(session_id="s0", since=_time(0)),
        lambda d: [d.txn_changes(t.id) for t in d.transactions()],
        lambda d: d.changes_page([t.id for t in d.transactions()], 5, 2),
        lambda d: [
            list(d.changes(t.first_change, t.last_change, r.relation, t.xid))
            for t in d.transactions()
            for r in d.txn_changes(t.id)
        ],
        lambda d: [
            d.later_writer(16400, 0, k, None)
            for k in sorted(
                r[0] for r in d.db.execute("SELECT key FROM changes WHERE key IS NOT NULL")
            )
        ],
        lambda d: d.db.execute(_IMAGES).fetchall(),
    ]


def _types(conn: Any) -> list[tuple[str, str]]:
    return conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'undo_store' AND table_name = %s"
        " AND column_name IN ('key', 'old', 'new', 'unchanged') ORDER BY column_name",
        ("changes",),
    ).fetchall()


def test_a_store_of_the_previous_version_keeps_its_answers_with_images_as_text(
    pg_store, tmp_path, monkeypatch
):
    """Migration 4 makes a change's key and images text: the rows a store of the previous
    version holds (jsonb) become the text the reader gave for them, which is the SQLite store's
    text byte for byte, and every listing, history and undo read answers as before."""
    from undo.store import open_store as open_any
    from undo.store.sqlite import SqliteStore

    lite = SqliteStore(str(tmp_path / "s.db"), create=True)
    lite.register_source("shop", "1", "shop")
    _play_odd(lite.writer())
    _previous_version(monkeypatch)
    with _schema.open_connection(pg_store, create=True) as conn:
        assert _types(conn) == [(c, "jsonb") for c in ("key", "new", "old", "unchanged")]
        source = _schema.register_source(conn, "shop", "1", "shop")
        _play(PgStoreWriter(conn, source))
        _play_odd(PgStoreWriter(conn, source))
    old = open_any(pg_store)
    try:
        before = [ask(old) for ask in _asks()]
        odd_ids = [
            r[0] for r in old.db.execute("SELECT id FROM relations WHERE table_name = 'odd'")
        ]
    finally:
        old.close()
    monkeypatch.undo()
    new = open_any(pg_store)
    try:
        assert [ask(new) for ask in _asks()] == before
        assert _types(new.conn) == [(c, "text") for c in ("key", "new", "old", "unchanged")]
        # what the migration wrote is the SQLite store's text, to the byte
        stored = new.conn.execute(
            "SELECT key, old, new, unchanged FROM undo_store.changes WHERE relation = ANY(%s)"
            " ORDER BY id",
            (odd_ids,),
        ).fetchall()
        assert (
            stored
            == lite.db.execute(
                "SELECT key, old, new, unchanged FROM changes ORDER BY id"
            ).fetchall()
        )
        # the view still shows jsonb, and its readers may read it again
        assert new.conn.execute(
            "SELECT pg_typeof(old)::text, has_table_privilege(%s, 'undo_store.change_log',"
            " 'SELECT') FROM undo_store.change_log LIMIT 1",
            (_schema.READER_ROLE,),
        ).fetchone() == ("jsonb", True)
        # a new row of the same change is the old one's text
        with _schema.open_connection(pg_store) as conn:
            _play_odd(PgStoreWriter(conn, new.source), day=1, first_xid=2000)
        days = [
            new.conn.execute(
                "SELECT key, old, new, unchanged FROM undo_store.changes WHERE relation = ANY(%s)"
                " AND (commit_time >= %s) = %s ORDER BY id",
                (odd_ids, _time(0, day=1), later),
            ).fetchall()
            for later in (False, True)
        ]
        assert days[0] == days[1] == stored
    finally:
        new.close()


def test_the_migration_makes_any_other_json_as_the_reader_read_it(pg_store, monkeypatch):
    """Images capture never writes (not a flat array of strings and nulls, or of integers):
    the migration gives them the text the reader gave (json.loads + dumps), not its own."""
    _previous_version(monkeypatch)
    odd = ['[1, "a, b", null]', '[["a", "b"], "c"]', '{"a": "b, c", "d": null}', '"x"', "null",
           "[1.5, 10]", '["\\u00e9\\n", 1]', "[]", "[-3, 0]", '["a", "b, c"]']  # fmt: skip
    with _schema.open_connection(pg_store, create=True) as conn:
        source = _schema.register_source(conn, "shop", "1", "shop")
        _play(PgStoreWriter(conn, source))
        ids = [r[0] for r in conn.execute("SELECT id FROM undo_store.changes ORDER BY id")]
        for i, text in zip(ids, odd, strict=False):
            conn.execute(
                "UPDATE undo_store.changes SET key = %s::jsonb, old = %s::jsonb,"
                " new = %s::jsonb, unchanged = %s::jsonb WHERE id = %s",
                (text, text, text, text, i),
            )
        runner = _store.Runner(conn, (source,))
        before = runner.execute(_IMAGES).fetchall()
        assert [r[1] for r in before[: len(odd)]] == [_dumps(json.loads(t)) for t in odd]
    monkeypatch.undo()
    with _schema.open_connection(pg_store) as conn:
        assert _schema.applied(conn) == [v for v, _, _ in _schema.MIGRATIONS]
        assert _store.Runner(conn, (source,)).execute(_IMAGES).fetchall() == before


def _waiting_on_a_lock(store: str, n: int) -> bool:
    with psycopg.connect(store) as c:
        (waiting,) = c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        ).fetchone() or (0,)
    return int(waiting) >= n


def test_captures_writing_while_the_store_is_migrated_lose_and_mangle_nothing(
    pg_store, monkeypatch
):
    """Migration 4 locks changes first: a batch a capture has written and not yet committed
    is waited for and migrated with the rest; a capture's COPY sent meanwhile waits for the
    migration's commit and is stored as text, its bytes as they were sent."""
    import threading
    from json.encoder import encode_basestring

    _previous_version(monkeypatch)
    rel = Relation(16500, "public", "t", ("id", "v"), types=("text", "text"))
    with _schema.open_connection(pg_store, create=True) as conn:
        sources = [_schema.register_source(conn, n, "1", n) for n in ("a", "b")]
    writers = [PgStoreWriter(_schema.open_connection(pg_store), s) for s in sources]
    images = []

    def write(w: PgStoreWriter, i: int) -> None:
        rid = w.relation_id(rel, (0,), False)
        lsn = w.position + 100
        w.begin(Begin(100 + i, lsn, _time(i)))
        for j in range(50):
            new = [
                encode_basestring(f"{i}.{j}"),
                encode_basestring(f'a, "b"\n{_ODD_STRINGS[j % 19]}'),
            ]
            w.add(Change(rel, "I", None, new), rid, (0,))
            images.append(("[" + ",".join(new) + "]", "[" + new[0] + "]"))
        w.commit(Commit(lsn, lsn + 1, _time(i)))

    try:
        write(writers[0], 1)
        writers[0]._push()  # in the store's transaction, not committed
        monkeypatch.undo()
        migration = threading.Thread(target=lambda: _schema.open_connection(pg_store).close())
        migration.start()
        _wait(lambda: _waiting_on_a_lock(pg_store, 1))
        write(writers[1], 2)
        second = threading.Thread(target=writers[1].flush)
        second.start()
        _wait(lambda: _waiting_on_a_lock(pg_store, 2))  # its COPY behind the migration
        writers[0].flush()
        migration.join(60)
        second.join(60)
        assert not migration.is_alive() and not second.is_alive()
        with psycopg.connect(pg_store) as c:
            assert _schema.applied(c) == [v for v, _, _ in _schema.MIGRATIONS]
            assert _types(c) == [(x, "text") for x in ("key", "new", "old", "unchanged")]
            got = c.execute("SELECT new, key FROM undo_store.changes ORDER BY id").fetchall()
        assert sorted(got) == sorted(images) and len(got) == 100
    finally:
        for w in writers:
            w.conn.close()


def _wait(done: Any, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_the_migration_waits_for_no_earlier_reader_and_says_which_views_hold_it(
    pg_store, monkeypatch
):
    """A session of an earlier undo reading the store (undo serve, a listing) has views of
    changes in pg_temp, which an ALTER of its columns fails on: the migration says so in one
    line and changes nothing; once the reader is gone it goes through."""
    from undo.core.errors import StoreBusy

    _previous_version(monkeypatch)
    with _schema.open_connection(pg_store, create=True) as conn:
        source = _schema.register_source(conn, "shop", "1", "shop")
        _play(PgStoreWriter(conn, source))
    reader = _schema.open_connection(pg_store)
    before = _store.Runner(reader, (source,)).execute(_IMAGES).fetchall()
    monkeypatch.undo()
    try:
        with pytest.raises(StoreBusy, match=r"views depend on its changes: pg_temp_\d+\.changes"):
            _schema.open_connection(pg_store)
        with psycopg.connect(pg_store) as c:
            assert _schema.applied(c) == [1, 2, 3]
            assert _types(c) == [(x, "jsonb") for x in ("key", "new", "old", "unchanged")]
    finally:
        reader.close()
    with _schema.open_connection(pg_store) as conn:
        assert _types(conn) == [(x, "text") for x in ("key", "new", "old", "unchanged")]
        assert _store.Runner(conn, (source,)).execute(_IMAGES).fetchall() == before
