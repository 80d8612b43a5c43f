"""The undo on the schema shapes a trial on a third-party schema broke: inheritance, partitions,
keyless duplicates, filters, hostile names, and an undo run two ways. Both decoders where the
decoder matters."""

from __future__ import annotations

import pytest

from tests.integration.test_undo import _as_session
from undo.core.errors import BadInput, NotFound, Refused
from undo.engine.apply import undo
from undo.engine.plan import Target
from undo.source.pg import session_id


def _apply(src, **kw):
    on_conflict = kw.pop("on_conflict", "abort")
    return undo(src.settings, Target(**kw), apply=True, on_conflict=on_conflict)


def test_update_only_parent_leaves_child_rows_alone(source):
    """A ctid is unique only inside one relation: the child's identical row must stay."""
    source.sql(
        "CREATE TABLE p (a int, b text); CREATE TABLE c () INHERITS (p);"
        "CREATE TABLE g () INHERITS (c)"
    )
    source.init()
    source.sql(
        "INSERT INTO p VALUES (1, 'parent'); INSERT INTO c VALUES (1, 'parent');"
        "INSERT INTO g VALUES (1, 'parent'), (1, 'parent')"
    )
    before = {t: source.snapshot(f"ONLY {t}") for t in "pcg"}
    sid = _as_session(
        source,
        "UPDATE ONLY p SET b = NULL",
        "DELETE FROM ONLY c",
        "UPDATE g SET b = 'grand' WHERE ctid = (SELECT min(ctid) FROM g)",
    )
    source.sql("UPDATE ONLY c SET b = 'x'")  # no row left in c: touches nothing
    source.capture()
    report = _apply(source, session=sid)
    assert not report.conflicts
    assert {t: source.snapshot(f"ONLY {t}") for t in "pcg"} == before


def test_inheritance_conflict_is_reported_not_written_to_the_child(source):
    source.sql("CREATE TABLE p (a int PRIMARY KEY, b text); CREATE TABLE c () INHERITS (p)")
    source.init()
    source.sql("INSERT INTO p VALUES (1, 'p'); INSERT INTO c VALUES (1, 'c')")
    sid = _as_session(source, "UPDATE ONLY p SET b = 'session'")
    source.sql("UPDATE ONLY p SET b = 'later'")
    source.capture()
    with pytest.raises(Refused, match="1 conflict"):
        _apply(source, session=sid)
    report = _apply(source, session=sid, on_conflict="skip")
    assert len(report.conflicts) == 1
    assert source.sql("SELECT b FROM ONLY c") == [("c",)]
    assert source.sql("SELECT b FROM ONLY p") == [("later",)]


def test_rows_moved_across_partitions_come_back(source):
    source.sql(
        "CREATE TABLE m (id int, k int, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);"
        "CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10);"
        "CREATE TABLE m2 PARTITION OF m FOR VALUES FROM (10) TO (20)"
        " PARTITION BY RANGE (k);"
        "CREATE TABLE m2a PARTITION OF m2 FOR VALUES FROM (10) TO (15);"
        "CREATE TABLE m2b PARTITION OF m2 FOR VALUES FROM (15) TO (20)"
    )
    source.init()
    source.sql("INSERT INTO m SELECT g, g % 20, 'v' || g FROM generate_series(1, 60) g")
    before = source.snapshot("m")
    sid = _as_session(
        source,
        "UPDATE m SET k = 19 - k WHERE id % 3 = 0",
        "UPDATE m SET k = 12 WHERE id % 5 = 0 AND k < 10",
        "DELETE FROM m WHERE id % 7 = 0",
        "INSERT INTO m VALUES (100, 1, 'new'), (101, 16, 'new')",
    )
    source.capture()
    report = _apply(source, session=sid)
    assert not report.conflicts
    assert source.snapshot("m") == before


def test_keyless_duplicates_restored_with_their_multiplicity(source):
    source.sql("CREATE TABLE d (a int, b text)")
    source.init()
    source.sql("INSERT INTO d VALUES (1, 'x'), (1, 'x'), (1, 'x'), (2, NULL), (2, NULL)")
    before = source.snapshot("d")
    sid = _as_session(
        source,
        "DELETE FROM d WHERE ctid IN (SELECT ctid FROM d WHERE a = 1 LIMIT 2)",
        "UPDATE d SET b = 'y' WHERE ctid = (SELECT min(ctid) FROM d WHERE a = 2)",
        "INSERT INTO d VALUES (1, 'x'), (3, 'z')",
    )
    # a copy of a row the session inserted (one of a row it deleted would be a conflict)
    later = _as_session(source, "INSERT INTO d VALUES (3, 'z')", app="web")
    source.capture()
    _apply(source, session=sid)
    assert source.snapshot("d") == sorted([*before, "(3,z)"])
    # the later session's duplicate is its own: undoing it removes exactly one row
    _apply(source, session=later)
    assert source.snapshot("d") == before


def test_keyless_row_gone_since_is_a_conflict(pgo):
    pgo.sql("CREATE TABLE d (a int, b text)")
    pgo.init()
    pgo.sql("INSERT INTO d VALUES (1, 'x')")
    sid = _as_session(pgo, "INSERT INTO d VALUES (1, 'x'), (1, 'x')")
    pgo.sql("DELETE FROM d WHERE ctid IN (SELECT ctid FROM d LIMIT 2)")
    pgo.capture()
    with pytest.raises(Refused, match="fewer identical rows"):
        _apply(pgo, session=sid)
    assert pgo.sql("SELECT count(*) FROM d") == [(1,)]


def test_key_changing_updates_and_reused_keys(source):
    source.sql("CREATE TABLE k (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO k VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    before = source.snapshot("k")
    sid = _as_session(
        source,
        "UPDATE k SET id = 10 WHERE id = 1",
        "INSERT INTO k VALUES (1, 'reused')",
        "UPDATE k SET id = 4 WHERE id = 2",
        "UPDATE k SET id = 2 WHERE id = 3",
        "DELETE FROM k WHERE id = 10",
        "UPDATE k SET v = 'twice' WHERE id = 1",
    )
    source.capture()
    _apply(source, session=sid)
    assert source.snapshot("k") == before


def test_key_change_after_every_column_changed(source):
    """Once every column is known changed, an update is read without parsing its new image
    unless its key moved: a key change then must still make two rows (1 -> 11, 2 -> 1)."""
    source.sql("CREATE TABLE k (id int PRIMARY KEY, v text, w int)")
    source.init()
    source.sql("INSERT INTO k VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3)")
    before = source.snapshot("k")
    sid = _as_session(
        source,
        "UPDATE k SET v = v || '!', w = w + 1",
        "UPDATE k SET id = 11 WHERE id = 1",
        "UPDATE k SET id = 1, v = 'moved' WHERE id = 2",
        "UPDATE k SET v = 'again' WHERE id = 3",
    )
    source.capture()
    _apply(source, session=sid)
    assert source.snapshot("k") == before


def test_table_filter_parses_quotes_and_keeps_refusals(pgo):
    pgo.sql(
        'CREATE SCHEMA "Odd.S"; CREATE TABLE "Odd.S"."T.x" (id int PRIMARY KEY);'
        "CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE u (id int PRIMARY KEY)"
    )
    pgo.init(schemas=["public", "Odd.S"])
    pgo.sql(
        'INSERT INTO t VALUES (1); INSERT INTO u VALUES (1); INSERT INTO "Odd.S"."T.x" VALUES (1)'
    )
    sid = _as_session(pgo, "DELETE FROM u", 'DELETE FROM "Odd.S"."T.x"', "TRUNCATE t")
    pgo.capture()
    for name in ("t", "public.t", "PUBLIC.T"):
        with pytest.raises(Refused, match="TRUNCATE"):
            _apply(pgo, session=sid, tables=(name,))
        result = pgo.undo_cli("session", sid, "--table", name)
        assert result.returncode == 1 and result.stdout == "", name
    with pytest.raises(Refused, match="TRUNCATE"):  # of t, which these tables leave out
        _apply(pgo, session=sid, tables=('"Odd.S"."T.x"', "u"))
    report = _apply(pgo, session=sid, tables=('"Odd.S"."T.x"', "u"), on_conflict="skip")
    assert len(report.not_undoable) == 1 and "public.t in xid" in report.not_undoable[0]
    assert report.rows == {('"Odd.S"."T.x"', "D"): 1, ("public.u", "D"): 1}
    with pytest.raises(NotFound):
        _apply(pgo, session=sid, tables=("nosuch",))
    with pytest.raises(BadInput):
        _apply(pgo, session=sid, tables=('"unterminated',))
    assert pgo.undo_cli("session", sid, "--table", "nosuch").returncode == 2


def test_script_then_apply_is_refused_by_the_source_ledger(source):
    """The psql script records the undo in the source: --apply refuses it, before capture."""
    source.sql("CREATE TABLE n (a int, b text)")
    source.init()
    source.sql("INSERT INTO n VALUES (1, 'x'), (1, 'x')")
    sid = _as_session(source, "DELETE FROM n")
    source.capture()
    script = source.undo_cli("session", sid)
    assert script.returncode == 0, script.stderr
    assert source.psql(script.stdout, "-v", "ON_ERROR_STOP=1").returncode == 0
    with pytest.raises(Refused, match="already undone"):
        _apply(source, session=sid)
    again = source.psql(script.stdout, "-v", "ON_ERROR_STOP=1")
    assert again.returncode != 0 and "already undone" in again.stderr
    assert source.sql("SELECT count(*) FROM n") == [(2,)]
    source.capture()
    undos = source.store_rows("SELECT target, entries FROM undos")
    assert len(undos) == 1 and sid in undos[0][0] and '"n"' in undos[0][1]


def test_undoing_table_a_does_not_block_table_b(pgo):
    pgo.sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO a VALUES (1); INSERT INTO b VALUES (1)")
    sid = _as_session(pgo, "DELETE FROM a; DELETE FROM b")
    pgo.capture()
    _apply(pgo, session=sid, tables=("a",))
    with pytest.raises(Refused, match="already undone"):
        _apply(pgo, session=sid, tables=("a",))
    _apply(pgo, session=sid, tables=("b",))
    assert pgo.sql("SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b)") == [(1, 1)]


def test_refused_undo_prints_no_script(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1, 'a')")
    sid = _as_session(pgo, "DELETE FROM t", "TRUNCATE t")
    pgo.capture()
    result = pgo.undo_cli("session", sid)
    assert result.returncode == 1 and result.stdout == ""
    pgo.sql("ALTER TABLE t ADD COLUMN w int")
    result = pgo.undo_cli("session", sid, "--on-conflict", "skip")
    assert (
        result.returncode == 1 and result.stdout == "" and "changed since capture" in result.stderr
    )


def test_script_conflict_stops_psql_even_without_on_error_stop(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    sid = _as_session(pgo, "UPDATE t SET v = 'bad'")
    pgo.capture()
    script = pgo.undo_cli("session", sid).stdout  # printed before the later change
    pgo.sql("UPDATE t SET v = 'later' WHERE id = 2")
    run = pgo.psql(script)  # no -v ON_ERROR_STOP=1: the script sets it itself
    assert run.returncode != 0 and "id=2" in run.stderr and "changed since" in run.stderr
    assert pgo.sql("SELECT id, v FROM t ORDER BY id") == [(1, "bad"), (2, "later")]


HOSTILE = "it's %s {0} $1 ?"


def test_column_names_with_placeholders_on_every_path(source):
    source.sql(
        f'CREATE TABLE "we%s ird" (id int PRIMARY KEY, "{HOSTILE.replace(chr(34), 2 * chr(34))}"'
        ' text, "{x}" int); CREATE TABLE "kl%%s" ("%s" int, "$1" text)'
    )
    source.init()
    source.sql(
        "INSERT INTO \"we%s ird\" VALUES (1, 'a', 1), (2, 'b', 2);"
        " INSERT INTO \"kl%%s\" VALUES (1, '?')"
    )
    before = (source.snapshot('"we%s ird"'), source.snapshot('"kl%%s"'))
    statements = (
        "INSERT INTO \"we%s ird\" VALUES (3, '%s', 3)",
        'UPDATE "we%s ird" SET "{x}" = 9 WHERE id = 1',
        'DELETE FROM "we%s ird" WHERE id = 2',
        'INSERT INTO "kl%%s" VALUES (2, \'%s\'); UPDATE "kl%%s" SET "$1" = \'$2\' WHERE "%s" = 1',
    )
    sid = _as_session(source, *statements)
    source.capture()
    script = source.undo_cli("session", sid)
    assert script.returncode == 0, script.stderr
    assert source.psql(script.stdout, "-v", "ON_ERROR_STOP=1").returncode == 0
    assert (source.snapshot('"we%s ird"'), source.snapshot('"kl%%s"')) == before
    again = _as_session(source, *statements)
    source.capture()
    _apply(source, session=again)
    assert (source.snapshot('"we%s ird"'), source.snapshot('"kl%%s"')) == before


def test_char_type_name_is_the_same_from_both_decoders(source):
    source.sql(
        'CREATE DOMAIN onechar AS "char"; CREATE TABLE ch (id int PRIMARY KEY, c "char",'
        ' ca "char"[], cd onechar, v varchar(7), n numeric(9, 3), t timestamp(2) with time zone)'
    )
    source.init()
    source.sql("INSERT INTO ch VALUES (1, 'x', '{a,b}', 'd', 'vv', 1.5, now())")
    before = source.snapshot("ch")
    sid = _as_session(source, "UPDATE ch SET c = 'y', ca = '{c}', cd = 'e'", "DELETE FROM ch")
    source.capture()
    types = source.store_rows("SELECT types FROM relations WHERE table_name = 'ch'")
    assert types == [
        (
            '["integer","\\"char\\"","\\"char\\"[]","onechar","character varying(7)",'
            '"numeric(9,3)","timestamp(2) with time zone"]',
        )
    ]
    _apply(source, session=sid)
    assert source.snapshot("ch") == before


def test_init_skips_unlogged_tables_with_a_warning(pgo):
    pgo.sql(
        "CREATE TABLE t (id int PRIMARY KEY); CREATE UNLOGGED TABLE scratch (id int);"
        "CREATE TEMP TABLE tmp (id int)"
    )
    report = pgo.init()
    assert any("scratch" in w and "SET LOGGED" in w for w in report.warnings)
    assert pgo.sql("SELECT relid::regclass::text FROM undo.audited ORDER BY 1") == [("t",)]
    status = pgo.undo_cli("status", "--json")
    assert status.returncode == 0 and "scratch" in status.stdout


def test_refused_init_leaves_no_store(pgo, tmp_path):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    result = pgo.undo_cli("--store", str(tmp_path / "new.db"), "--decoder", "nosuch", "init")
    assert result.returncode == 2
    assert not (tmp_path / "new.db").exists()


def test_pure_delete_session_skips_a_reinserted_key(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 5) g")
    sid = _as_session(source, "DELETE FROM t")
    source.sql("INSERT INTO t VALUES (3, 'reborn')")
    source.capture()
    with pytest.raises(Refused, match="id=3"):
        _apply(source, session=sid)
    report = _apply(source, session=sid, on_conflict="skip")
    assert [str(c).split(":")[0] for c in report.conflicts] == ["public.t (id=3)"]
    assert source.sql("SELECT id, v FROM t ORDER BY id") == [
        (1, "v1"),
        (2, "v2"),
        (3, "reborn"),
        (4, "v4"),
        (5, "v5"),
    ]


def test_a_change_between_two_undone_ones_is_a_conflict(source):
    """Undone newest first, the older change meets the other session's write: a conflict,
    never a collapse that overwrites it."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t VALUES (1, 'a'), (2, 'a'), (3, 'a')")
    with source.connect(application_name="metrics") as metrics:
        sid = session_id(metrics)
        metrics.execute("UPDATE t SET v = 'b' WHERE id = 1; DELETE FROM t WHERE id = 2")
        source.sql("UPDATE t SET v = 'web' WHERE id = 1; INSERT INTO t VALUES (2, 'web')")
        metrics.execute("UPDATE t SET v = 'd' WHERE id = 1; DELETE FROM t WHERE id = 2")
        metrics.execute("UPDATE t SET v = 'e' WHERE id = 3")
    source.capture()
    with pytest.raises(Refused, match="2 conflict") as e:
        _apply(source, session=sid)
    assert "id=1" in str(e.value) and "id=2" in str(e.value)
    assert "between the undone changes" in str(e.value)
    report = _apply(source, session=sid, on_conflict="skip")
    assert len(report.conflicts) == 2
    assert source.sql("SELECT id, v FROM t ORDER BY id") == [(1, "d"), (3, "a")]


def test_foreign_keys_the_undo_would_break_are_refused(pgo):
    pgo.sql(
        "CREATE TABLE p (id int PRIMARY KEY); CREATE TABLE c (id int PRIMARY KEY,"
        " p int REFERENCES p)"
    )
    pgo.init()
    pgo.sql("INSERT INTO p VALUES (1); INSERT INTO c VALUES (10, 1)")
    sid = _as_session(pgo, "INSERT INTO p VALUES (2)", "DELETE FROM c WHERE id = 10")
    pgo.capture()
    script = pgo.undo_cli("session", sid)  # printed before the later changes
    assert script.returncode == 0, script.stderr
    pgo.sql("INSERT INTO c VALUES (20, 2); DELETE FROM p WHERE id = 1")
    with pytest.raises(Refused, match="foreign key would be violated") as e:
        _apply(pgo, session=sid)
    assert "public.c -> public.p" in str(e.value) and str(e.value).count("foreign key") == 2
    printed = pgo.undo_cli("session", sid)  # printed now: refused as --apply is
    assert printed.returncode == 1 and printed.stdout == ""
    assert printed.stderr.count("foreign key would be violated") == 2
    run = pgo.psql(script.stdout, "-v", "ON_ERROR_STOP=1")
    assert run.returncode != 0 and "foreign key would be violated" in run.stderr
    assert pgo.sql("SELECT id FROM p ORDER BY id") == [(2,)]
    assert pgo.sql("SELECT id FROM c ORDER BY id") == [(20,)]


def test_a_constraint_the_undo_would_break_is_one_line_and_changes_nothing(pgo):
    pgo.sql("CREATE TABLE u (id int PRIMARY KEY, email text UNIQUE)")
    pgo.init()
    pgo.sql("INSERT INTO u VALUES (1, 'a'), (2, 'b')")
    sid = _as_session(
        pgo,
        "UPDATE u SET email = 'tmp' WHERE id = 1",
        "UPDATE u SET email = 'a' WHERE id = 2",
        "UPDATE u SET email = 'b' WHERE id = 1",
    )
    pgo.capture()
    result = pgo.undo_cli("session", sid, "--apply")
    assert result.returncode == 1 and "would break a constraint" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert pgo.sql("SELECT id, email FROM u ORDER BY id") == [(1, "b"), (2, "a")]


def test_a_key_deleted_twice_is_a_conflict_not_a_duplicate(pgo):
    """Delete-only sessions are undone by a COPY into the table; a key the session deleted twice
    (someone re-inserted it in between) must come out as a conflict, not as a unique-violation
    or a row restored from the older image."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1, 'a'), (2, 'a')")
    with pgo.connect(application_name="metrics") as metrics:
        sid = session_id(metrics)
        metrics.execute("DELETE FROM t WHERE id = 1")
        pgo.sql("INSERT INTO t VALUES (1, 'web')")
        metrics.execute("DELETE FROM t")
    pgo.capture()
    with pytest.raises(Refused, match=r"public.t \(id=1\): another transaction changed the row"):
        _apply(pgo, session=sid)
    assert pgo.sql("SELECT count(*) FROM t") == [(0,)]
    report = _apply(pgo, session=sid, on_conflict="skip")
    assert len(report.conflicts) == 1
    assert pgo.sql("SELECT id, v FROM t") == [(2, "a")]


def test_rows_written_inside_a_savepoint_are_undone(source):
    """A row version written in a subtransaction carries the subtransaction's xid, not the one
    the stream names: undo must still recognise it as the session left it."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t VALUES (1, 'a'), (2, 'a'), (3, 'a')")
    with source.connect(application_name="metrics", autocommit=False) as c:
        sid = session_id(c)
        c.execute("UPDATE t SET v = 'top' WHERE id = 1")
        c.execute("SAVEPOINT s")
        c.execute("UPDATE t SET v = 'sub' WHERE id = 2")
        c.execute("INSERT INTO t VALUES (4, 'sub')")
        c.execute("RELEASE SAVEPOINT s")
        c.commit()
    source.capture()
    report = _apply(source, session=sid)
    assert report.applied and not report.conflicts
    assert source.sql("SELECT id, v FROM t ORDER BY id") == [(1, "a"), (2, "a"), (3, "a")]


def test_only_one_operation_of_a_transaction_compares_values(pgo):
    """With --only, the transaction's last write to a row may be left out of the selection: the
    row then still carries its xid but not the image undone, and that is a conflict."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    sid = _as_session(pgo, "BEGIN; INSERT INTO t VALUES (1, 'new'); UPDATE t SET v = 'x'; COMMIT")
    pgo.capture()
    with pytest.raises(Refused, match=r"public.t \(id=1\): the row was changed since"):
        _apply(pgo, session=sid, only=frozenset("I"))
    _apply(pgo, session=sid)
    assert pgo.sql("SELECT count(*) FROM t") == [(0,)]


def test_capture_keeps_the_full_xid_of_a_trusted_transaction(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    with pgo.connect(autocommit=False) as c:
        c.execute("INSERT INTO t VALUES (1)")
        (full,) = c.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        c.commit()
    pgo.capture()
    assert pgo.store_rows("SELECT xid, full_xid FROM transactions") == [(full % 2**32, full)]


SHOP = (
    "CREATE TABLE orders (id int PRIMARY KEY, customer text);"
    "CREATE TABLE order_items (id int PRIMARY KEY, order_id int NOT NULL REFERENCES orders"
    " ON DELETE CASCADE, sku text);"
    "CREATE TABLE invoices (id int PRIMARY KEY, order_id int REFERENCES orders ON DELETE CASCADE,"
    " total numeric);"
    "CREATE TABLE shipments (id int PRIMARY KEY, order_id int REFERENCES orders"
    " ON DELETE SET NULL)"
)


def _shop(src):
    """Orders 20 and 21 deleted by a script (cascading to their items and invoices, setting
    their shipments' order to NULL), then the web inserts an unrelated order 21."""
    src.sql(SHOP)
    src.init()
    src.sql(
        "INSERT INTO orders VALUES (20, 'ann'), (21, 'bob'), (22, 'cy');"
        "INSERT INTO order_items VALUES (1, 20, 'a'), (2, 21, 'b'), (3, 21, 'c'), (4, 21, 'd'),"
        " (5, 22, 'e');"
        "INSERT INTO invoices VALUES (1, 20, 10), (2, 21, 30);"
        "INSERT INTO shipments VALUES (1, 21), (2, 20)"
    )
    sid = _as_session(src, "DELETE FROM orders WHERE id IN (20, 21)")
    _as_session(src, "INSERT INTO orders VALUES (21, 'web')", app="web")
    src.capture()
    return sid


def _shop_state(src):
    return {
        "orders": src.sql("SELECT * FROM orders ORDER BY id"),
        "order_items": src.sql("SELECT * FROM order_items ORDER BY id"),
        "invoices": src.sql("SELECT * FROM invoices ORDER BY id"),
        "shipments": src.sql("SELECT * FROM shipments ORDER BY id"),
    }


SHOP_SKIPPED = {
    "orders": [(20, "ann"), (21, "web"), (22, "cy")],
    "order_items": [(1, 20, "a"), (5, 22, "e")],
    "invoices": [(1, 20, 10)],
    "shipments": [(1, None), (2, 20)],
}


def test_skip_never_reparents_the_rows_of_a_skipped_parent(source):
    """The web's order 21 is not the order the script deleted: with skip, the old order 21's
    items, invoice and shipment stay out with it (a cascade, and a SET NULL undone by an update
    that runs before the orders are re-inserted), through --apply and the printed script."""
    sid = _shop(source)
    damaged = _shop_state(source)
    with pytest.raises(Refused, match="orders \\(id=21\\)"):
        _apply(source, session=sid)
    printed = source.undo_cli("session", sid)
    assert printed.returncode == 1 and printed.stdout == "", printed.stderr
    assert "orders (id=21)" in printed.stderr
    assert _shop_state(source) == damaged

    script = source.undo_cli("session", sid, "--on-conflict", "skip")
    assert script.returncode == 1 and script.stdout.startswith("-- undo of"), script.stderr
    for row in ("orders (id=21)", "order_items (id=2)", "order_items (id=4)", "invoices (id=2)"):
        assert row in script.stderr, row
    assert "shipments (id=1)" in script.stderr
    ran = source.psql(script.stdout, "-v", "ON_ERROR_STOP=1")
    assert ran.returncode == 0, ran.stderr
    assert _shop_state(source) == SHOP_SKIPPED


def test_skip_never_reparents_through_apply(source):
    sid = _shop(source)
    report = _apply(source, session=sid, on_conflict="skip")
    named = sorted(str(c).split(":")[0] for c in report.conflicts)
    assert named == [
        "public.invoices (id=2)",
        "public.order_items (id=2)",
        "public.order_items (id=3)",
        "public.order_items (id=4)",
        "public.orders (id=21)",
        "public.shipments (id=1)",
    ]
    assert _shop_state(source) == SHOP_SKIPPED


def test_skip_keeps_a_parent_its_children_still_reference(pgo):
    """Undoing an insert of a parent whose child's undo is skipped (changed since), or that a
    later session's child references, would orphan the child: the parent stays, reported."""
    pgo.sql(
        "CREATE TABLE p (id int PRIMARY KEY); CREATE TABLE c (id int PRIMARY KEY,"
        " p int REFERENCES p, v text)"
    )
    pgo.init()
    sid = _as_session(
        pgo,
        "INSERT INTO p VALUES (1), (2), (3)",
        "INSERT INTO c VALUES (10, 1, 's'), (30, 3, 's')",
    )
    _as_session(pgo, "UPDATE c SET v = 'web' WHERE id = 10; INSERT INTO c VALUES (20, 2, 'w')")
    pgo.capture()
    with pytest.raises(Refused) as e:
        _apply(pgo, session=sid)
    assert "c (id=10)" in str(e.value) and "p (id=2)" in str(e.value)
    report = _apply(pgo, session=sid, on_conflict="skip")
    named = sorted(str(c).split(":")[0] for c in report.conflicts)
    assert named == ["public.c (id=10)", "public.p (id=1)", "public.p (id=2)"]
    assert pgo.sql("SELECT id FROM p ORDER BY id") == [(1,), (2,)]
    assert pgo.sql("SELECT id, p FROM c ORDER BY id") == [(10, 1), (20, 2)]


def test_keyless_row_inserted_again_since_is_a_conflict(source):
    """A session deleted the only ('z', 'solo', 5); another inserted an identical row since:
    putting it back would leave two. Through --apply (a COPY straight into the table), the
    printed script, and a script printed before the other insert."""
    source.sql("CREATE TABLE page_views (path text, who text, n int)")
    source.init()
    source.sql(
        "INSERT INTO page_views VALUES ('z', 'solo', 5), ('a', 'dup', 1), ('a', 'dup', 1),"
        " ('a', 'dup', 1)"
    )
    sid = _as_session(
        source,
        "DELETE FROM page_views WHERE who = 'solo'",
        "DELETE FROM page_views WHERE ctid = (SELECT min(ctid) FROM page_views)",
    )
    source.capture()
    early = source.undo_cli("session", sid)
    assert early.returncode == 0, early.stderr
    _as_session(source, "INSERT INTO page_views VALUES ('z', 'solo', 5)", app="web")
    source.capture()
    damaged = source.snapshot("page_views")
    ran = source.psql(early.stdout, "-v", "ON_ERROR_STOP=1")
    assert ran.returncode != 0 and "who=solo" in ran.stderr
    with pytest.raises(Refused, match="who=solo"):
        _apply(source, session=sid)
    printed = source.undo_cli("session", sid)
    assert printed.returncode == 1 and printed.stdout == "" and "who=solo" in printed.stderr
    assert source.snapshot("page_views") == damaged
    report = _apply(source, session=sid, on_conflict="skip")
    assert [str(c).split(":")[0] for c in report.conflicts] == [
        "public.page_views (path=z, who=solo, n=5)"
    ]
    assert source.snapshot("page_views") == ["(a,dup,1)"] * 3 + ["(z,solo,5)"]


def test_table_filter_does_not_hide_a_truncate_of_another_table(pgo):
    """The session truncated a in one transaction and deleted from b in another: --table b
    (or a time that leaves the TRUNCATE out) still refuses, and with skip undoes b and says so."""
    pgo.sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO a VALUES (1); INSERT INTO b VALUES (1), (2)")
    with pgo.connect(application_name="script") as c:
        sid = session_id(c)
        c.execute("DELETE FROM b")
        between = pgo.now()
        c.execute("TRUNCATE a")
    pgo.capture()
    for narrowed in (("--table", "b"), ("--until", between), ("--table", "b", "--only", "delete")):
        refused = pgo.undo_cli("session", sid, *narrowed)
        assert refused.returncode == 1 and refused.stdout == "", narrowed
        assert "TRUNCATE" in refused.stderr and "public.a" in refused.stderr, refused.stderr
        applied = pgo.undo_cli("session", sid, *narrowed, "--apply")
        assert applied.returncode == 1 and "TRUNCATE" in applied.stderr
    assert pgo.sql("SELECT count(*) FROM b") == [(0,)]
    printed = pgo.undo_cli("session", sid, "--table", "b", "--on-conflict", "skip")
    assert printed.returncode == 1 and "TRUNCATE" in printed.stderr
    assert printed.stdout.startswith("-- undo of")
    applied = pgo.undo_cli("session", sid, "--table", "b", "--on-conflict", "skip", "--apply")
    assert applied.returncode == 1 and "TRUNCATE" in applied.stderr, applied.stderr
    assert pgo.sql("SELECT count(*) FROM b") == [(2,)]


def test_script_of_deletes_runs_on_a_table_keyed_by_an_identity_always_column(source):
    """The printed script of a session that only deleted, from a table whose key is GENERATED
    ALWAYS AS IDENTITY, runs under psql: its update step (no row to set back) must not assign
    that column, which PostgreSQL refuses when it parses the statement, whatever rows match
    (found on the demo's tickets by the docs' runbook)."""
    source.sql("CREATE TABLE t (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t (v) SELECT 'v' || g FROM generate_series(1, 5) g")
    before = source.snapshot("t")
    sid = _as_session(source, "DELETE FROM t WHERE id <= 3")
    source.capture()
    script = source.undo_cli("session", sid)
    assert script.returncode == 0, script.stderr
    ran = source.psql(script.stdout, "-v", "ON_ERROR_STOP=1")
    assert ran.returncode == 0, ran.stderr
    assert source.snapshot("t") == before
