"""undo table: rewind tables to a time (--to), or read them as they were (--as-of)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import psycopg
import pytest

from tests.conftest import STORES, erase_own_tag
from tests.integration.test_undo import _as_session
from undo.stream.capture import capture

SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, name text, last_login timestamptz);
CREATE TABLE events (id int PRIMARY KEY, account_id int REFERENCES accounts ON DELETE CASCADE,
                     title text, details jsonb);
CREATE TABLE seen (account_id int, at timestamptz);  -- keyless, with duplicates
"""


def _web(source, n: int) -> None:
    with source.connect(application_name="web") as c:
        c.execute(
            "UPDATE accounts SET last_login = now() + %s * interval '1 s' WHERE id %% 5 = 0", (n,)
        )
        c.execute(
            "INSERT INTO events VALUES (%s, %s, 'web event', '{\"n\": 1}')", (1000 + n, 7 + n % 3)
        )
        c.execute("INSERT INTO seen VALUES (1, '2026-01-01'), (1, '2026-01-01')")


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_rewind_to_a_time_between_the_webs_writes_and_the_scripts_delete(source):
    source.sql(SCHEMA)
    source.init()
    source.sql(
        "INSERT INTO accounts SELECT g, 'acct ' || g, NULL FROM generate_series(1, 10) g;"
        "INSERT INTO events SELECT g, 1 + g % 10, 'event ' || g, jsonb_build_object('g', g)"
        " FROM generate_series(1, 30) g"
    )
    _web(source, 1)
    tables = ("accounts", "events", "seen")
    at = source.now()
    then = {t: source.snapshot(t) for t in tables}
    events_then = source.sql(
        "SELECT concat(id), concat(account_id), title, concat(details) FROM events ORDER BY id"
    )
    _web(source, 2)
    with source.connect(application_name="usage-metrics") as c:
        c.execute("DELETE FROM accounts WHERE id % 100 < 7")  # and their events, by cascade
    with source.connect() as c, c.transaction():  # its tag erased: untagged, rewound too
        erase_own_tag(c, "events")
        c.execute("UPDATE events SET title = 'who?' WHERE id = 29")
    _web(source, 3)
    source.capture()

    shown = source.undo_cli("table", "public.events", "--as-of", at, "--json")
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert [(r["id"], r["account_id"], r["title"], r["details"]) for r in rows] == events_then
    some = source.undo_cli("table", "events", "--as-of", at, "--where", "account_id = 2")
    assert some.returncode == 0 and some.stdout.count("event ") == 3, some.stdout
    assert {t: source.snapshot(t) for t in tables} != then  # --as-of changed nothing

    printed = source.undo_cli("table", *tables, "--to", at)
    assert printed.returncode == 0, printed.stderr
    assert "includes 1 untagged and 0 untrusted transaction(s)" in printed.stderr
    ran = source.psql(printed.stdout, "-v", "ON_ERROR_STOP=1")
    assert ran.returncode == 0, ran.stderr
    assert {t: source.snapshot(t) for t in tables} == then
    # the printed script is in the ledger: --apply of the same rewind is refused
    again = source.undo_cli("table", *tables, "--to", at, "--apply")
    assert again.returncode == 1 and "already undone" in again.stderr


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_rewind_applies_and_refuses_what_it_cannot_reach(pgo, tmp_path):
    pgo.sql(SCHEMA)
    early = pgo.now()
    pgo.init()
    pgo.sql("INSERT INTO accounts SELECT g, 'a' || g FROM generate_series(1, 5) g")
    at = pgo.now()
    then = pgo.snapshot("accounts")
    pgo.sql("UPDATE accounts SET name = 'x'")
    pgo.capture()

    before = pgo.undo_cli("table", "accounts", "--to", early)
    assert before.returncode == 1 and "earliest time it can rewind to is" in before.stderr
    assert before.stdout == ""
    assert pgo.undo_cli("table", "accounts", "--as-of", early).returncode == 1
    both = pgo.undo_cli("table", "accounts", "--to", at, "--as-of", at)
    assert both.returncode == 2
    assert pgo.undo_cli("table", "accounts", "--to", "10 past").returncode == 2

    applied = pgo.undo_cli("table", "accounts", "--to", at, "--apply")
    assert applied.returncode == 0, applied.stderr
    assert "5 update(s) of public.accounts undone" in applied.stderr
    assert pgo.snapshot("accounts") == then
    nothing = pgo.undo_cli("table", "seen", "--to", at)
    assert nothing.returncode == 0 and "nothing to rewind" in nothing.stderr

    # a TRUNCATE after the time cannot be rewound
    mark = pgo.now()
    pgo.sql("INSERT INTO seen VALUES (1, now()); TRUNCATE seen")
    pgo.capture()
    refused = pgo.undo_cli("table", "seen", "--to", mark, "--apply")
    assert refused.returncode == 1 and "TRUNCATE" in refused.stderr

    # an unaudited table has no past to show
    pgo.sql("CREATE SCHEMA other; CREATE TABLE other.t (id int)")
    unaudited = pgo.undo_cli("table", "other.t", "--as-of", at)
    assert unaudited.returncode == 1 and "not audited" in unaudited.stderr

    # a table rewritten after the time (every value changed, no row change in the stream) is
    # refused even when the store holds no change of it
    pgo.sql("CREATE UNLOGGED TABLE quiet (id int PRIMARY KEY, v text)")
    pgo.sql("INSERT INTO quiet SELECT g, 'v' FROM generate_series(1, 3) g")  # not in the WAL
    pgo.sql("ALTER TABLE quiet SET LOGGED")  # audited from here on
    mark = pgo.now()
    pgo.sql("ALTER TABLE quiet ALTER COLUMN v TYPE text USING 'wiped'")
    pgo.capture()
    rewritten = pgo.undo_cli("table", "quiet", "--to", mark)
    assert rewritten.returncode == 1 and "rewritten" in rewritten.stderr, rewritten.stderr
    for name in ('"unterminated', "a.b.c", "nosuch"):  # bad names: one line, exit 2
        for mode in ("--to", "--as-of"):
            named = pgo.undo_cli("table", name, mode, at)
            assert named.returncode == 2 and named.stderr.count("\n") == 1, (name, named.stderr)
    # a condition that does not parse is bad input, one line
    bad = pgo.undo_cli("table", "accounts", "--as-of", at, "--where", "nosuch = 1")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nosuch" in bad.stderr

    # nor across a gap in the audit trail (the slot was lost and made again)
    mark = pgo.now()
    pgo.sql("SELECT pg_drop_replication_slot(%s)", (pgo.slot,))
    pgo.sql("UPDATE accounts SET name = 'lost'")
    pgo.init()
    capture(pgo.settings, once=True)
    gap = pgo.undo_cli("table", "accounts", "--to", mark)
    assert gap.returncode == 1 and "gap" in gap.stderr


def test_prune_moves_the_earliest_reachable_time(pgo):
    pgo.sql(SCHEMA)
    pgo.init()
    pgo.sql("INSERT INTO accounts VALUES (1, 'a')")
    at = pgo.now()
    pgo.sql("UPDATE accounts SET name = 'b'")
    pgo.capture()
    pruned = pgo.undo_cli("prune", "--before", pgo.now())
    assert pruned.returncode == 0, pruned.stderr
    late = pgo.undo_cli("table", "accounts", "--to", at)
    assert late.returncode == 1 and "earliest" in late.stderr
    with psycopg.connect(pgo.dsn) as c:
        assert c.execute("SELECT name FROM accounts").fetchall() == [("b",)]


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_a_partitioned_table_is_rewound_through_its_partitions(source):
    """The stream carries a partitioned table's changes under its partitions' names: the table's
    name covers them all (pagila's payment is such a table)."""
    source.sql(
        "CREATE TABLE pay (id int, month int, amount numeric, PRIMARY KEY (id, month))"
        " PARTITION BY LIST (month);"
        " CREATE TABLE pay_1 PARTITION OF pay FOR VALUES IN (1);"
        " CREATE TABLE pay_2 PARTITION OF pay FOR VALUES IN (2);"
    )
    source.init()
    source.sql("INSERT INTO pay SELECT g, 1 + g % 2, g * 1.5 FROM generate_series(1, 20) g")
    at = source.now()
    then = source.snapshot("pay")
    source.sql("DELETE FROM pay WHERE amount < 10; UPDATE pay SET month = 1 WHERE id = 19")
    source.capture()
    shown = json.loads(source.undo_cli("table", "pay", "--as-of", at, "--json").stdout)
    assert len(shown) == 20 and shown[0] == {"id": "1", "month": "2", "amount": "1.5"}
    applied = source.undo_cli("table", "public.pay", "--to", at, "--apply")
    assert applied.returncode == 0, applied.stderr
    assert source.snapshot("pay") == then
    # and --table of undo session names it the same way
    sid = _as_session(source, "DELETE FROM pay WHERE id > 15")
    source.capture()
    filtered = source.undo_cli("session", sid, "--table", "pay", "--apply")
    assert filtered.returncode == 0, filtered.stderr
    assert "delete(s) of public.pay_1 undone" in filtered.stderr
    assert source.snapshot("pay") == then


# two conditions a hostile probe ran through --where: each ended undo's transaction and ran
# statements of its own after it (the first committed the rewind, the second created a table)
WHERE_ATTACKS = (
    "id = 43; COMMIT; SELECT 1 FROM (SELECT 1 AS id) t WHERE true",
    "id = 43; ROLLBACK; CREATE TABLE public.pwned_by_where(); COMMIT;"
    " SELECT 1 FROM (SELECT 1 AS id) t WHERE true",
    # and, in one expression, writes the read-only transaction refuses
    "public.evil() IS NULL",
    "set_config('transaction_read_only', 'off', true) = 'off'",
    "id IN (SELECT id FROM public.plain FOR UPDATE)",
)


def test_where_is_one_read_only_condition_that_cannot_end_the_transaction(pgo):
    """--where is one expression in undo's read-only transaction: a second statement is refused
    by the server (extended query protocol), on the rewind's path as on the plain read's."""
    pgo.sql(SCHEMA)
    pgo.sql("CREATE TABLE plain (id int PRIMARY KEY, name text)")
    pgo.sql(
        "CREATE FUNCTION evil() RETURNS void LANGUAGE plpgsql AS"
        " $$BEGIN DELETE FROM public.accounts; CREATE TABLE public.pwned_by_where(); END$$"
    )
    pgo.sql("INSERT INTO plain SELECT g, 'p' || g FROM generate_series(40, 45) g")  # not captured
    pgo.init()
    pgo.sql("INSERT INTO accounts SELECT g, 'a' || g FROM generate_series(40, 45) g")
    at = pgo.now()
    pgo.sql("UPDATE accounts SET name = 'changed' WHERE id IN (41, 43, 45)")
    pgo.capture()
    tables = ("accounts", "plain")
    then = {t: pgo.snapshot(t) for t in tables}

    def ledger() -> int:
        return pgo.sql("SELECT count(*) FROM undo.ledger")[0][0]

    # the rewind's path (accounts changed after `at`) and the plain read's (no change recorded)
    for table in tables:
        for condition in WHERE_ATTACKS:
            shown = pgo.undo_cli("table", table, "--as-of", at, "--where", condition)
            assert shown.returncode == 2, (table, condition, shown.stdout, shown.stderr)
            assert shown.stderr.count("\n") == 1 and shown.stdout == "", shown.stderr
            assert {t: pgo.snapshot(t) for t in tables} == then, (table, condition)
            assert pgo.sql("SELECT to_regclass('public.pwned_by_where')") == [(None,)]
            assert ledger() == 0, (table, condition)
        # a condition is still any one expression, a % in it included
        condition = "name LIKE '%3' OR id IN (SELECT 45)"
        some = pgo.undo_cli("table", table, "--as-of", at, "--where", condition, "--json")
        assert some.returncode == 0, some.stderr
        assert [r["id"] for r in json.loads(some.stdout)] == ["43", "45"]
        assert json.loads(some.stdout)[0]["name"] in ("a43", "p43")  # accounts: as it was
    assert {t: pgo.snapshot(t) for t in tables} == then and ledger() == 0


def test_as_of_a_read_that_fails_says_so_without_naming_where(pgo):
    """A row security policy whose function writes (an access log) fails in --as-of's
    read-only transaction: the error says the read failed; no --where was given, so it names
    none (it said `--where None: ...`)."""
    role = f"owner_{pgo.dbname}"
    pgo.sql(f"CREATE ROLE {role} LOGIN")
    pgo.sql(
        f"CREATE TABLE notes (id int PRIMARY KEY, v text); ALTER TABLE notes OWNER TO {role};"
        f" CREATE TABLE reads (at timestamptz); ALTER TABLE reads OWNER TO {role};"
        " CREATE FUNCTION logged() RETURNS boolean LANGUAGE sql"
        " AS 'INSERT INTO public.reads VALUES (now()); SELECT true';"
        " ALTER TABLE notes ENABLE ROW LEVEL SECURITY; ALTER TABLE notes FORCE ROW LEVEL SECURITY;"
        " CREATE POLICY everyone ON notes USING (logged())"
    )
    pgo.init()
    pgo.sql(f"GRANT undo_operator TO {role}")
    pgo.sql("INSERT INTO notes VALUES (1, 'a')")
    pgo.capture()
    at = pgo.now()
    params = dict(psycopg.conninfo.conninfo_to_dict(pgo.dsn), user=role)
    dsn = psycopg.conninfo.make_conninfo("", **params)
    shown = pgo.undo_cli("--dsn", dsn, "table", "notes", "--as-of", at)
    assert shown.returncode == 2 and shown.stderr.count("\n") == 1, shown.stderr
    assert "--where" not in shown.stderr and "None" not in shown.stderr, shown.stderr
    assert "public.notes" in shown.stderr and "read-only" in shown.stderr, shown.stderr


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_a_gap_from_another_server_is_found_by_time(pgo):
    """After `init --reregister` the source is a new cluster whose LSNs may be lower than the
    old one's: the gap init records ends below where it starts, and comparing its end with the
    old server's positions found no gap after any time (red team: --as-of and --to --apply of
    a time before it ran, exit 0, a state that never existed)."""
    from undo.store import open_store

    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1, 'a')")
    pgo.capture()
    at = pgo.now()
    pgo.sql("UPDATE t SET v = 'b'")
    pgo.capture()
    (high,) = pgo.store_rows("SELECT max(end_lsn) FROM transactions")[0]
    db = open_store(pgo.store, source=pgo.dbname)
    try:  # as init --reregister records it: the old server's position, the new slot's (lower)
        db.record_gap(int(high), 0x1000, f"slot {pgo.slot} re-created")
    finally:
        db.close()
    for args in (("--as-of", at), ("--to", at, "--apply")):
        refused = pgo.undo_cli("table", "t", *args)
        assert refused.returncode == 1, (args, refused.stdout, refused.stderr)
        assert "the audit trail has a gap after" in refused.stderr
    assert pgo.sql("SELECT v FROM t") == [("b",)]


def _store_exec(src: Any, query: str, params: list[Any]) -> None:
    """A statement on the store's tables (SQLite's names; on a PostgreSQL store, undo_store's;
    placeholders ``?``)."""
    if src.pg_store:
        with psycopg.connect(src.store, options="-c search_path=undo_store") as c:
            c.execute(query.replace("?", "%s"), params)
        return
    import sqlite3

    with contextlib.closing(sqlite3.connect(src.store)) as c, c:
        c.execute(query, params)


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_a_gap_on_the_new_server_is_found_after_the_old_servers_positions(pgo):
    """After --reregister the old server's stored positions may be above the new one's: where
    the store was at a time is its latest commit's position then, not the highest of all (which
    was the old server's, and hid a later gap of the new one)."""
    from undo.store import open_store

    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1, 'a')")
    pgo.capture()
    (old,) = pgo.store_rows("SELECT max(end_lsn) FROM transactions")[0]
    pgo.sql("UPDATE t SET v = 'b'")  # the new server's
    pgo.capture()
    at = pgo.now()
    pgo.sql("UPDATE t SET v = 'c'")
    pgo.capture()
    (new,) = pgo.store_rows("SELECT max(end_lsn) FROM transactions")[0]
    # the old server was far ahead: its transaction's positions above all of the new one's
    up = 1 << 40
    _store_exec(
        pgo,
        "UPDATE transactions SET commit_lsn = commit_lsn + ?, end_lsn = end_lsn + ?"
        " WHERE end_lsn = ?",
        [up, up, int(old)],
    )
    db = open_store(pgo.store, source=pgo.dbname)
    try:  # the new server's slot re-created after ``at``
        db.record_gap(int(new), int(new) + 0x100, f"slot {pgo.slot} re-created")
    finally:
        db.close()
    refused = pgo.undo_cli("table", "t", "--as-of", at)
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    assert "the audit trail has a gap after" in refused.stderr
