"""DDL on audited schemas is on the record, and DDL that blinds capture is a gap of its table."""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest
from prometheus_client.exposition import generate_latest
from psycopg import sql
from werkzeug.test import Client

from undo.core.wal import lsn_to_int
from undo.source.pg import session_id
from undo.stream.capture import capture
from undo.web.app import make_app
from undo.web.metrics import registry


def _owner(source):
    """A role that owns the audited table and nothing of undo, connected as itself."""
    role = f"owner_{source.dbname}"
    if not source.sql("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)):
        source.sql(
            f"CREATE ROLE {role} LOGIN; ALTER TABLE t OWNER TO {role};"
            f" GRANT CREATE ON SCHEMA public TO {role}"
        )
    return psycopg.connect(
        psycopg.conninfo.make_conninfo(source.dsn, user=role),
        autocommit=True,
        application_name="migrations",
    )


def _as_session_sql(source, query):
    with source.connect() as c:
        sid = session_id(c)
        c.execute(query)
    return sid


def _gaps(source):
    status = source.undo_cli("status", "--json")
    assert status.returncode == 0, status.stderr
    return json.loads(status.stdout)["gaps"]


def test_creating_a_table_in_an_audited_schema_tells_the_user_nothing(pgo):
    """The event trigger prepares the new table without a NOTICE: every CREATE TABLE showed
    `trigger "undo_tag" for relation ... does not exist, skipping` (its DROP TRIGGER IF
    EXISTS). A trigger that is there and not undo's is still made again."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    with _owner(pgo) as c:
        notices: list[str] = []
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        c.execute("CREATE TABLE fresh (id int PRIMARY KEY)")
        c.execute("CREATE TABLE parted (id int) PARTITION BY RANGE (id)")
        c.execute("CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10)")
        assert notices == []
        c.execute("ALTER TABLE fresh DISABLE TRIGGER undo_tag")
    pgo.init()  # undo.audit_table drops it and makes it again
    assert pgo.sql(
        "SELECT tgrelid::regclass::text, tgenabled FROM pg_trigger WHERE tgname = 'undo_tag'"
        " ORDER BY 1"
    ) == [("fresh", "A"), ("parted", "A"), ("parted_1", "A"), ("t", "A")]


def test_ddl_is_recorded_with_its_session(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t VALUES (1, 'a')")
    with _owner(source) as c:
        sid = session_id(c)
        c.execute("ALTER TABLE t ADD COLUMN w int")
        c.execute("CREATE TABLE u (id int PRIMARY KEY)")
        c.execute("INSERT INTO u VALUES (1)")  # a table created later is audited at once
        c.execute("CREATE TABLE v (id int)")
        c.execute("ALTER TABLE v RENAME TO v2")
        c.execute("DROP TABLE v2")
    source.capture()
    rows = source.store_rows(
        "SELECT session_id, application_name, command, object_type, object, statement, tag"
        " FROM ddl WHERE object_type = 'table' AND session_id = ? ORDER BY id",
        (sid,),
    )
    assert [(r[0], r[1], r[2], r[4], r[6]) for r in rows] == [
        (sid, "migrations", "ALTER TABLE", "public.t", "trusted"),
        (sid, "migrations", "CREATE TABLE", "public.u", "trusted"),
        (sid, "migrations", "CREATE TABLE", "public.v", "trusted"),
        (sid, "migrations", "ALTER TABLE", "public.v2", "trusted"),
        (sid, "migrations", "DROP TABLE", "public.v2", "trusted"),
    ]
    assert rows[0][5] == "ALTER TABLE t ADD COLUMN w int"
    assert source.store_rows(
        "SELECT count(*) FROM changes c JOIN relations r"
        " ON r.id = c.relation WHERE r.table_name = 'u'"
    ) == [(1,)]
    shown = source.undo_cli("show", "session", sid)
    assert shown.returncode == 0 and "DDL ALTER TABLE public.t" in shown.stdout, shown.stdout
    history = json.loads(source.undo_cli("history", "public.t", "id=1", "--json").stdout)
    # the row's versions and the table's DDL in order: the test's OWNER TO, the owner's ALTER
    assert [(h["op"], h.get("command")) for h in history] == [
        ("insert", None),
        ("ddl", "ALTER TABLE"),
        ("ddl", "ALTER TABLE"),
    ]
    assert history[-1]["session_id"] == sid
    page = Client(make_app(source.settings)).get(f"/sessions/{sid}", headers={"Host": "localhost"})
    page = page.get_data(as_text=True)
    assert "<h2>DDL</h2>" in page and "ALTER TABLE t ADD COLUMN w int" in page
    assert _gaps(source) == []


def test_ddl_that_blinds_capture_is_a_gap_of_its_table(source):
    source.sql(
        "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE SCHEMA side;"
        " CREATE TABLE side.m (id int PRIMARY KEY)"
    )
    source.init()
    source.sql("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 5) g")
    with _owner(source) as c:
        sid = session_id(c)
        c.execute("DELETE FROM t WHERE id = 5")
        c.execute("ALTER TABLE t ALTER COLUMN v TYPE text USING 'wiped'")  # every value changed
        c.execute("SET undo.in_ddl = '1'")  # what undo's own DDL is marked by: not by this
        c.execute("ALTER TABLE t DISABLE TRIGGER undo_tag")
        c.execute("ALTER TABLE t REPLICA IDENTITY DEFAULT")
    source.capture()
    gaps = _gaps(source)
    assert [(g["kind"], g["table"], g["session_id"], g["to_lsn"] is None) for g in gaps] == [
        ("table", "public.t", sid, False),  # the rewrite: a point in the stream
        ("table", "public.t", sid, True),  # the trigger: open until it is on again
        ("table", "public.t", sid, True),  # replica identity: open
    ]
    assert "rewritten" in gaps[0]["reason"] and "untagged" in gaps[1]["reason"]
    assert all(g["at"] for g in gaps)
    # the session's own undo says what it cannot undo
    refused = source.undo_cli("session", sid)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "public.t in xid" in refused.stderr and "rewritten" in refused.stderr
    skipped = source.undo_cli("session", sid, "--on-conflict", "skip", "--apply")
    assert skipped.returncode == 1  # the rest (the delete) is undone, the rest reported
    assert source.sql("SELECT v FROM t WHERE id = 5") == [("v5",)]

    # a made-up record saying all is well again closes nothing
    with _owner(source) as c, c.transaction():
        c.execute(
            "SELECT pg_logical_emit_message(true, 'undo.ddl', %s)",
            (
                "0" * 64
                + json.dumps({"session_id": sid})
                + "\n"
                + json.dumps(
                    {"xid": 0, "ddl": [], "state": [{"table": "public.t", "problems": []}]}
                ),
            ),
        )
        c.execute("INSERT INTO t VALUES (6, 'x')")
    source.capture()
    assert [g["to_lsn"] is None for g in _gaps(source)] == [False, True, True]
    # putting it right closes the open gaps
    source.sql("ALTER TABLE t ENABLE ALWAYS TRIGGER undo_tag; ALTER TABLE t REPLICA IDENTITY FULL")
    # a table moved into an audited schema is audited from then on
    source.sql("ALTER TABLE side.m SET SCHEMA public")
    source.sql("INSERT INTO m VALUES (1)")
    source.capture()
    assert all(g["to_lsn"] is not None for g in _gaps(source))
    assert source.sql(
        "SELECT c.relreplident, EXISTS (SELECT FROM pg_trigger WHERE tgrelid = c.oid"
        " AND tgname = 'undo_tag') FROM pg_class c WHERE c.oid = 'public.m'::regclass"
    ) == [("f", True)]
    assert source.store_rows(
        "SELECT t.tag FROM transactions t JOIN changes c ON c.txn = t.id"
        " JOIN relations r ON r.id = c.relation WHERE r.table_name = 'm'"
    ) == [("trusted",)]
    assert (
        f'undo_gaps{{source="{source.dbname}"}} 3.0'
        in generate_latest(registry(source.settings)).decode()
    )


def test_set_unlogged_and_back_is_a_closed_gap_where_allowed(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY)")
    source.init()
    if source.decoder == "pgoutput":  # a published table cannot become unlogged
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            source.sql("ALTER TABLE t SET UNLOGGED")
        return
    source.sql("ALTER TABLE t SET UNLOGGED")
    source.sql("INSERT INTO t VALUES (1)")  # not in the WAL: never captured
    source.sql("ALTER TABLE t SET LOGGED")
    source.capture()
    reasons = [(g["reason"].split(":")[0], g["to_lsn"] is None) for g in _gaps(source)]
    assert ("unlogged", False) in reasons  # opened by SET UNLOGGED, closed by SET LOGGED
    assert any(r.startswith("rewritten") for r, _ in reasons)


def test_rows_of_a_table_renamed_before_capture_are_never_lost_silently(source):
    """wal2json names a table, it sends no OID: rows written before a rename (or drop) that
    capture reads after it cannot be matched to the table. pgoutput sends the OID."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY)")
    source.init()
    source.sql("INSERT INTO t VALUES (1), (2)")
    source.sql("ALTER TABLE t RENAME TO t2")
    source.capture()
    stored = source.store_rows("SELECT count(*) FROM changes")[0][0]
    gaps = [g for g in _gaps(source) if g["table"] == "public.t"]
    if source.decoder == "pgoutput":
        assert stored == 2 and gaps == []
    else:
        assert stored == 0
        assert [(g["kind"], g["to_lsn"] is not None) for g in gaps] == [("table", True)]
        assert "renamed or dropped" in gaps[0]["reason"]


def test_a_table_dropped_and_made_again_before_capture_is_never_the_old_ones(source):
    """wal2json names tables: rows of a table dropped and created again under the same name
    before capture read them must not be taken for the new table's (an undo would then write
    the old rows into the new table)."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t VALUES (1, 'old')")
    old = _as_session_sql(source, "DELETE FROM t WHERE id = 1")
    source.sql("DROP TABLE t; CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.sql("INSERT INTO t VALUES (2, 'new')")
    source.capture()
    # the audit trail keeps the old table's row, under the old table
    (dropped,) = source.store_rows(
        "SELECT r.oid FROM changes c JOIN relations r ON r.id = c.relation WHERE c.op = 'D'"
    )[0]
    assert source.store_rows("SELECT old FROM changes WHERE op = 'D'") == [('["1","old"]',)]
    assert source.sql("SELECT 't'::regclass::oid")[0][0] != dropped
    undone = source.undo_cli("session", old, "--apply")
    assert undone.returncode == 1 and "is not the table captured" in undone.stderr
    assert source.sql("SELECT id, v FROM t") == [(2, "new")]


def _mallory(source):
    """The audited tables' owner (`_owner`), with a schema of her own that undo does not audit,
    and nothing of undo."""
    c = _owner(source)
    role = c.info.user
    if not source.sql("SELECT 1 FROM pg_namespace WHERE nspname = 'own'"):
        source.sql(sql.SQL("CREATE SCHEMA own AUTHORIZATION {}").format(sql.Identifier(role)), ())
    return c


def _open_gaps(source, table):
    return [g["reason"] for g in _gaps(source) if g["table"] == table and g["to_lsn"] is None]


def _unprepared(source):
    status = source.undo_cli("status", "--json")
    assert status.returncode == 0, status.stderr
    return json.loads(status.stdout)["unprepared_tables"]


def test_dropping_the_tag_trigger_is_a_gap_of_its_table(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    with _owner(source) as c:
        sid = session_id(c)
        c.execute("DROP TRIGGER undo_tag ON t")
        c.execute("INSERT INTO t VALUES (1, 'unseen')")  # untagged
    source.capture()
    gaps = [g for g in _gaps(source) if g["table"] == "public.t"]
    assert [(g["session_id"], g["to_lsn"] is None) for g in gaps] == [(sid, True)]
    assert "undo_tag" in gaps[0]["reason"] and "untagged" in gaps[0]["reason"]
    assert _unprepared(source) == ["public.t"]


def test_an_impostor_tag_trigger_is_found_and_init_puts_the_real_one_back(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    with _mallory(source) as c:
        sid = session_id(c)
        c.execute(
            "CREATE FUNCTION own.noop() RETURNS trigger LANGUAGE plpgsql"
            " AS $$BEGIN RETURN NULL; END$$"
        )
        # the same name, ENABLE ALWAYS, statement-level: only its function differs
        c.execute(
            "CREATE OR REPLACE TRIGGER undo_tag BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE"
            " ON t FOR EACH STATEMENT EXECUTE FUNCTION own.noop()"
        )
        c.execute("ALTER TABLE t ENABLE ALWAYS TRIGGER undo_tag")
        c.execute("INSERT INTO t VALUES (1, 'unseen')")
    assert _unprepared(source) == ["public.t"]
    source.capture()
    assert [(g["table"], g["session_id"]) for g in _gaps(source) if g["to_lsn"] is None] == [
        ("public.t", sid)
    ]
    again = source.undo_cli("init")
    assert again.returncode == 0, again.stderr
    assert "nothing changed" not in again.stdout and "prepared 1 table(s)" in again.stdout
    assert source.sql(
        "SELECT tgfoid = 'undo.tag()'::regprocedure, tgenabled FROM pg_trigger"
        " WHERE tgrelid = 't'::regclass AND tgname = 'undo_tag'"
    ) == [(True, "A")]
    assert _unprepared(source) == []
    source.sql("INSERT INTO t VALUES (2, 'seen')")
    source.capture()
    assert all(g["to_lsn"] is not None for g in _gaps(source))  # init's DDL closed it
    assert source.store_rows("SELECT tag FROM transactions ORDER BY id DESC LIMIT 1") == [
        ("trusted",)
    ]


def test_tables_put_under_an_audited_table_are_audited_on_the_spot(source):
    source.sql(
        "CREATE TABLE t (id int PRIMARY KEY, v text);"
        " CREATE TABLE p (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);"
        " CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100)"
    )
    source.init()
    with _mallory(source) as c:
        source.sql(sql.SQL("ALTER TABLE p OWNER TO {}").format(sql.Identifier(c.info.user)), ())
        c.execute("CREATE TABLE own.c (id int NOT NULL, v text)")
        c.execute("ALTER TABLE own.c INHERIT t")
        c.execute("INSERT INTO own.c VALUES (10, 'child')")  # now audited: its own trigger
        c.execute("UPDATE t SET v = 'through t' WHERE id = 10")  # through the parent
        c.execute("DELETE FROM t WHERE id = 10")
        c.execute("CREATE TABLE own.pp (id int PRIMARY KEY, v text)")
        c.execute("ALTER TABLE p ATTACH PARTITION own.pp FOR VALUES FROM (100) TO (200)")
        c.execute("CREATE TABLE own.pq PARTITION OF p FOR VALUES FROM (200) TO (300)")
        c.execute("INSERT INTO p VALUES (150, 'attached'), (250, 'created')")
        c.execute("UPDATE p SET v = 'moved' WHERE id = 150")
    source.capture()
    stored = source.store_rows(
        "SELECT r.schema_name || '.' || r.table_name, c.op FROM changes c"
        " JOIN relations r ON r.id = c.relation ORDER BY c.id"
    )
    assert stored == [
        ("own.c", "I"),
        ("own.c", "U"),
        ("own.c", "D"),
        ("own.pp", "I"),
        ("own.pq", "I"),
        ("own.pp", "U"),
    ]
    assert source.store_rows(
        "SELECT DISTINCT t.tag FROM transactions t JOIN changes c ON c.txn = t.id"
    ) == [("trusted",)]
    assert _gaps(source) == [] and _unprepared(source) == []
    # one that cannot be audited (unlogged: not in the WAL) is a gap of the table above it
    with _mallory(source) as c:
        c.execute("CREATE UNLOGGED TABLE own.u (id int NOT NULL, v text)")
        c.execute("ALTER TABLE own.u INHERIT t")
    source.capture()
    assert _open_gaps(source, "public.t") == [
        "rows written through it into own.u are not captured: it is unlogged, not in the WAL"
    ]
    assert _unprepared(source) == ["public.t"]
    with _mallory(source) as c:
        c.execute("ALTER TABLE own.u NO INHERIT t")
    source.capture()
    assert _open_gaps(source, "public.t") == [] and _unprepared(source) == []


def test_a_table_put_under_an_audited_one_while_capture_runs_is_captured(source):
    """With wal2json, capture met the table before it was audited, and remembered that."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    stop = threading.Event()
    worker = threading.Thread(
        target=capture, args=(source.settings,), kwargs={"should_stop": stop.is_set}
    )

    def stored_up_to_now():
        (lsn,) = source.sql("SELECT pg_current_wal_lsn()::text")[0]
        for _ in range(300):
            if int(source.meta("position") or 0) >= (lsn_to_int(lsn)):
                return
            time.sleep(0.1)
        raise AssertionError("capture did not catch up")

    worker.start()
    try:
        with _mallory(source) as c:
            c.execute("CREATE TABLE own.c (id int NOT NULL, v text)")
            c.execute("INSERT INTO own.c VALUES (1, 'before')")  # not audited: not stored
            stored_up_to_now()
            c.execute("ALTER TABLE own.c INHERIT t")
            c.execute("UPDATE t SET v = 'through t'")
        stored_up_to_now()
    finally:
        stop.set()
        worker.join(timeout=30)
    stored = source.store_rows(
        "SELECT r.schema_name || '.' || r.table_name, c.op, c.new FROM changes c"
        " JOIN relations r ON r.id = c.relation"
    )
    assert [(t, op) for t, op, _ in stored] == [("own.c", "U")] and "through t" in stored[0][2]


def test_ddl_on_an_audited_table_is_recorded_whatever_its_object(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    with _mallory(source) as c:
        sid = session_id(c)
        c.execute(
            "CREATE FUNCTION own.noop() RETURNS trigger LANGUAGE plpgsql"
            " AS $$BEGIN RETURN NULL; END$$"
        )
        c.execute(
            "CREATE TRIGGER a AFTER INSERT ON t FOR EACH STATEMENT EXECUTE FUNCTION own.noop()"
        )
        c.execute("CREATE RULE r AS ON UPDATE TO t DO ALSO NOTIFY t")
        c.execute("DROP RULE r ON t")
        c.execute("CREATE TABLE own.c (id int NOT NULL, v text)")
        c.execute("ALTER TABLE own.c INHERIT t")
    source.capture()
    assert source.store_rows(
        "SELECT command, object_type, object, tag FROM ddl WHERE session_id = ?"
        " AND object NOT LIKE 'own.noop%' ORDER BY id",
        (sid,),
    ) == [
        ("CREATE TRIGGER", "trigger", "a on public.t", "trusted"),
        ("CREATE RULE", "rule", "r on public.t", "trusted"),
        ("DROP RULE", "rule", "r on public.t", "trusted"),
        ("ALTER TABLE", "table", "own.c", "trusted"),
    ]
    assert _gaps(source) == []


def test_a_forged_ddl_record_neither_opens_nor_closes_a_gap(source):
    source.sql(
        "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE u (id int PRIMARY KEY);"
        " CREATE TABLE w (id int PRIMARY KEY)"
    )
    source.init()
    with _owner(source) as c:
        sid = session_id(c)
        c.execute("DROP TRIGGER undo_tag ON t")
    source.capture()
    assert len(_open_gaps(source, "public.t")) == 1
    # DDL the event triggers did not see (a superuser turned them off meanwhile): the next DDL
    # record capture reads, whatever it is, has the catalog asked
    source.sql("ALTER EVENT TRIGGER undo_ddl DISABLE; ALTER TABLE w REPLICA IDENTITY DEFAULT")
    source.sql("ALTER EVENT TRIGGER undo_ddl ENABLE")
    # t is right again, u is not, says the record
    body = {
        "ddl": [{"command": "ALTER TABLE", "object_type": "table", "object": "public.t"}],
        "state": [
            {"table": "public.t", "oid": 1, "problems": []},
            {"table": "public.u", "oid": 2, "problems": ["made up"]},
        ],
    }
    with _owner(source) as c:
        with c.transaction():  # with a made-up MAC
            c.execute(
                "SELECT pg_logical_emit_message(true, 'undo.ddl', %s)",
                (
                    "0" * 64
                    + json.dumps({"session_id": "x"})
                    + "\n"
                    + json.dumps({"xid": 0, **body, "signed": json.dumps(body), "mac": "0" * 64}),
                ),
            )
            c.execute("INSERT INTO t VALUES (1, 'x')")
        # the format undo signs now, under a key the session cannot read: a made-up MAC
        with c.transaction():
            c.execute(
                "SELECT pg_logical_emit_message(true, 'undo.ddl', %s)",
                ("0" * 64 + json.dumps({"pid": 1, "backend_start": 1, "xid": 0, **body}),),
            )
            c.execute("INSERT INTO t VALUES (2, 'x')")
    source.capture()
    assert len(_open_gaps(source, "public.t")) == 1 and _open_gaps(source, "public.u") == []
    gaps = [(g["table"], g["session_id"], g["to_lsn"] is None) for g in _gaps(source)]
    assert gaps == [("public.t", sid, True), ("public.w", None, True)]
    assert _open_gaps(source, "public.w")[0].startswith("replica identity is not FULL")
    assert source.store_rows(
        "SELECT command, object, tag, tag_reason FROM ddl WHERE tag = 'untrusted'"
    ) == [
        ("ALTER TABLE", "public.t", "untrusted", "forged"),
        ("ALTER TABLE", "public.t", "untrusted", "forged"),
    ]


def test_ddl_under_the_replica_role_is_on_the_record(source):
    """Found by a hostile probe: undo's event triggers were ENABLE ORIGIN, so a role allowed
    to SET session_replication_role = replica ran blinding DDL with nothing recorded."""
    if source.sql("SHOW server_version_num")[0][0] < "150000":
        pytest.skip("PostgreSQL 14 has no GRANT SET ON PARAMETER: only a superuser sets it")
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t VALUES (1, 'orig')")
    with _owner(source) as c:
        source.sql(f"GRANT SET ON PARAMETER session_replication_role TO {c.info.user}")
        c.execute("SET session_replication_role = replica")
        c.execute("ALTER TABLE t ALTER COLUMN v TYPE text USING 'wiped'")
    source.capture()
    assert [g["table"] for g in _gaps(source) if g["to_lsn"] is not None] == ["public.t"]
    assert ("ALTER TABLE", "trusted") in source.store_rows("SELECT command, tag FROM ddl")


def test_renaming_an_enums_labels_is_a_gap_of_the_tables_using_it(source):
    """Found by a hostile probe: ALTER TYPE ... RENAME VALUE on an enum of another schema
    flipped every audited row's value (paid <-> unpaid) with no DDL record and no gap, while
    history still said `paid`."""
    source.sql(
        "CREATE SCHEMA oms; CREATE TYPE oms.mood AS ENUM ('paid', 'unpaid');"
        " CREATE TABLE et (id int PRIMARY KEY, m oms.mood, ms oms.mood[])"
    )
    source.init()
    source.sql("INSERT INTO et VALUES (1, 'paid', '{paid}')")
    source.sql(
        "ALTER TYPE oms.mood RENAME VALUE 'paid' TO 'tmp';"
        " ALTER TYPE oms.mood RENAME VALUE 'unpaid' TO 'paid';"
        " ALTER TYPE oms.mood RENAME VALUE 'tmp' TO 'unpaid'"
    )
    source.capture()
    gaps = [g for g in _gaps(source) if g["table"] == "public.et"]
    assert gaps and all(g["to_lsn"] is not None for g in gaps), gaps
    assert "enum type oms.mood was altered" in gaps[0]["reason"]


_OLD_ROWS = (
    "SELECT c.op, c.key, c.old FROM changes c JOIN transactions t ON t.id = c.txn"
    " WHERE c.op <> 'I' ORDER BY t.commit_lsn, c.ord"
)


@pytest.mark.parametrize(
    ("ddl", "back"),
    [
        ("ADD COLUMN w int", "DROP COLUMN w"),
        ("DROP COLUMN note", "ADD COLUMN note text"),
        ("RENAME COLUMN v TO v2", "RENAME COLUMN v2 TO v"),
        ("RENAME COLUMN id TO ident", "RENAME COLUMN ident TO id"),
    ],
)
def test_column_ddl_committed_before_capture_reads_the_changes_keeps_their_old_rows(
    source, ddl, back
):
    """Found: ALTER TABLE ... ADD COLUMN committed after updates and deletes, before capture read
    them, stored them without old rows and keys (capture compared the stream's columns with the
    catalog's now), so their session could not be undone and history lost the deletes."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v int, note text)")
    source.init()
    source.sql("INSERT INTO t SELECT g, g, 'n' || g FROM generate_series(1, 4) g")
    with source.connect(application_name="oops") as c:
        sid = session_id(c)
        c.execute("UPDATE t SET v = v * 10 WHERE id <= 2")
        c.execute("DELETE FROM t WHERE id >= 3")
    source.sql("ALTER TABLE t " + ddl)
    source.capture()
    assert source.store_rows(_OLD_ROWS) == [
        ("U", '["1"]', '["1","1","n1"]'),
        ("U", '["2"]', '["2","2","n2"]'),
        ("D", '["3"]', '["3","3","n3"]'),
        ("D", '["4"]', '["4","4","n4"]'),
    ]
    # the table is not as captured: refused for that, not for old rows missing
    refused = source.undo_cli("session", sid, "--apply")
    assert refused.returncode == 1 and "changed since capture" in refused.stderr, refused.stderr
    # as captured again, the session is undone from the old rows
    source.sql("ALTER TABLE t " + back)
    undone = source.undo_cli("session", sid, "--apply")
    assert undone.returncode == 0, undone.stderr
    lost = ddl.startswith("DROP")  # the dropped column's values of the rows left in place
    assert source.sql("SELECT id, v, note FROM t ORDER BY 1") == [
        (g, g, None if lost and g <= 2 else f"n{g}") for g in range(1, 5)
    ]


def test_changes_made_while_identity_was_not_full_stay_without_old_rows(source):
    """The judgement of old rows is the change's own time's: FULL, then DEFAULT, then FULL again
    and a column added, before capture read any of them."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v int)")
    source.init()
    source.sql("INSERT INTO t SELECT g, g FROM generate_series(1, 4) g")
    source.sql("UPDATE t SET v = 10 WHERE id = 1; DELETE FROM t WHERE id = 2")
    source.sql("ALTER TABLE t REPLICA IDENTITY DEFAULT")
    source.sql("UPDATE t SET v = 30 WHERE id = 3; DELETE FROM t WHERE id = 4")
    source.sql("ALTER TABLE t REPLICA IDENTITY FULL; ALTER TABLE t ADD COLUMN w int")
    source.capture()
    rows = source.store_rows(_OLD_ROWS)
    assert rows[:2] == [("U", '["1"]', '["1","1"]'), ("D", '["2"]', '["2","2"]')]
    assert [(op, old) for op, _, old in rows[2:]] == [("U", None), ("D", None)]


def test_a_table_with_unique_indexes_of_different_widths_is_captured(source):
    """pagila's rental: a one-column primary key and a three-column unique index. With
    wal2json, reading whether an update's old row was key-only built an array of the indexes'
    column arrays, which PostgreSQL refuses for arrays of different lengths: capture failed
    ("cannot accumulate arrays of different dimensionality") at the table's first update."""
    source.sql(
        "CREATE TABLE r (id int PRIMARY KEY, a int, b int, c int, note text, UNIQUE (a, b, c))"
    )
    source.sql("INSERT INTO r VALUES (1, 1, 1, 1, 'x')")
    source.init()
    source.sql("UPDATE r SET note = 'y' WHERE id = 1")
    source.capture()
    rows = source.store_rows(_OLD_ROWS)
    assert rows == [("U", '["1"]', '["1","1","1","1","x"]')]
