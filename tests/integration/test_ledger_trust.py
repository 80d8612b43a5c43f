"""The ledger of undos is written only by undos, and its mirror in the change stream is trusted
only when undo.record_undo signed it in its own transaction. Played by real roles on a real
server: mallory (LOGIN, DML on the app's tables, nothing of undo), bob (the same, asking to
undo), alice (a member of undo_operator)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.conftest import Source, _make_source
from tests.integration.test_undo import _as_session
from undo.engine.apply import undo
from undo.engine.plan import Target
from undo.source.install import init, uninstall
from undo.source.pg import session_id
from undo.store import _queries as queries
from undo.store import open_store

OPERATOR = "undo_operator"


def _role(src: Source, name: str, *tables: str, operator: bool = False) -> str:
    """A LOGIN role with DML on the tables (and membership of undo_operator if asked)."""
    role = f"{name}_{src.dbname}"
    with src.connect() as c:
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        for t in tables:
            c.execute(
                sql.SQL("GRANT ALL ON {} TO {}").format(sql.Identifier(t), sql.Identifier(role))
            )
        if operator:
            c.execute(
                sql.SQL("GRANT {} TO {}").format(sql.Identifier(OPERATOR), sql.Identifier(role))
            )
    return role


def _dsn(src: Source, role: str) -> str:
    return psycopg.conninfo.make_conninfo(
        "", **dict(psycopg.conninfo.conninfo_to_dict(src.dsn), user=role)
    )


def _psql(dsn: str, script: str) -> subprocess.CompletedProcess[str]:
    """A printed undo run as on-call runs it."""
    return subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
    )


def _json(src: Source, *args: str) -> Any:
    result = src.undo_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _undone(src: Source, sid: str, *flags: str) -> list[Any]:
    """`undone` of the session's rows in `undo sessions [flags]`."""
    return [r["undone"] for r in _json(src, "sessions", *flags) if r["session_id"] == sid]


def test_mallory_cannot_write_the_ledger(pgo):
    """Issue: record_undo was PUBLIC. Mallory recorded entries for her own delete, so undoing
    her session was refused as already undone by her; and recording a revert of a real undo's
    entry let a second undo restore two keyless rows again (2 -> 4)."""
    pgo.sql("CREATE TABLE k (v text)")  # keyless
    pgo.init()
    mallory = _role(pgo, "mallory", "k")
    pgo.sql("INSERT INTO k VALUES ('a'), ('a')")
    with psycopg.connect(_dsn(pgo, mallory), autocommit=True) as c:
        hers = session_id(c)
        c.execute("DELETE FROM k")
        pgo.capture()
        (lsn, xid), *_ = pgo.store_rows(
            "SELECT commit_lsn, xid FROM transactions WHERE session_id = ?", (hers,)
        )
        (oid,) = pgo.sql("SELECT 'k'::regclass::oid")[0]
        lsn_text = f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
        assert c.execute(
            "SELECT has_function_privilege('undo.record_undo(jsonb,jsonb)', 'EXECUTE')"
        ).fetchone() == (False,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(
                'SELECT undo.record_undo(\'{"session": "x"}\', %s::jsonb)',
                (json.dumps([[lsn_text, oid, "D", str(xid)]]),),
            )
        assert pgo.sql("SELECT count(*) FROM undo.ledger") == [(0,)]
        pgo.capture()
        assert _undone(pgo, hers) == [None] and _undone(pgo, hers, "--not-undone") == [None]
        # so the real undo is not refused
        applied = pgo.undo_cli("session", hers, "--apply")
        assert applied.returncode == 0, applied.stderr
        assert pgo.sql("SELECT count(*) FROM k") == [(2,)]
        pgo.capture()
        (undo_lsn, undo_xid), *_ = pgo.store_rows(
            "SELECT commit_lsn, xid FROM transactions WHERE application_name = 'undo'"
        )
        # a revert of the real undo's entry (what an undo of that undo records): refused too
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(
                "SELECT undo.record_undo('{\"xids\": [1]}', %s::jsonb)",
                (
                    json.dumps(
                        [[f"{undo_lsn >> 32:X}/{undo_lsn & 0xFFFFFFFF:X}", oid, "I", str(undo_xid)]]
                    ),
                ),
            )
    again = pgo.undo_cli("session", hers, "--apply")
    assert again.returncode == 1 and "already undone" in again.stderr
    assert pgo.sql("SELECT count(*) FROM k") == [(2,)]
    assert pgo.sql("SELECT undone_by::text, reverted_by FROM undo.ledger") == [
        (pgo.sql("SELECT current_user::text")[0][0], None)
    ]


def _ledger_messages(src: Source, slot: str) -> dict[int, str]:
    """xid -> content of the undo.ledger messages a test_decoding slot saw (what a replication
    role could read off the stream)."""
    head = "message: transactional: 1 prefix: undo.ledger, sz: "
    out = {}
    for xid, data in src.sql(
        "SELECT xid::text::bigint, data FROM pg_logical_slot_peek_changes(%s, NULL, NULL)",
        (slot,),
    ):
        if data.startswith(head):
            out[int(xid)] = data.split(" content:", 1)[1]
    return out


FORGED = [  # the issue's: each broke `undo sessions`, `show session`, /sessions, or capture
    """SELECT pg_logical_emit_message(true,'undo.ledger',"""
    """'{"entries":[["0/0","public","x","D","abc"]]}')""",
    """SELECT pg_logical_emit_message(true,'undo.ledger','[1]')""",
    """SELECT pg_logical_emit_message(true,'undo.ledger','{"entries":[["zz"]]}')""",
]


def test_forged_malformed_and_replayed_mirrors_are_kept_untrusted_and_change_nothing(source):
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 6) g")
    probe = f"probe_{source.slot}"
    source.sql("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (probe,))
    victim = _as_session(source, "DELETE FROM t WHERE id = 1")
    source.capture()
    first = undo(source.settings, Target(session=victim), apply=True)
    source.capture()
    undo(source.settings, Target(xids=(first.undo_xid,)), apply=True)  # the victim is back
    source.capture()
    genuine = _ledger_messages(source, probe)[first.undo_xid]
    source.sql("SELECT pg_drop_replication_slot(%s)", (probe,))
    assert _undone(source, victim) == [None]
    mallory = _role(source, "mallory", "t")
    with psycopg.connect(_dsn(source, mallory), autocommit=True) as c:
        hers = session_id(c)
        c.execute("DELETE FROM t WHERE id = 2")
        source.capture()
        ((lsn, xid),) = source.store_rows(
            "SELECT commit_lsn, xid FROM transactions WHERE session_id = ?", (hers,)
        )
        for forged in FORGED:
            c.execute(forged.encode())
        with c.transaction():  # a well-made mirror of an undo of her delete, MAC made up
            (full,) = c.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
            claim = {
                "undo_xid": full % 2**32,
                "xid": full,
                "target": {"session": hers},
                "entries": [[f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}", "public", "t", "D", str(xid)]],
            }
            c.execute(
                "SELECT pg_logical_emit_message(true, 'undo.ledger', %s)",
                ("0" * 64 + json.dumps(claim),),
            )
        with c.transaction():  # the real first undo's mirror, again: the victim undone again
            c.execute("SELECT pg_logical_emit_message(true, 'undo.ledger', %s)", (genuine,))
        if source.decoder == "pgoutput":  # wal2json's decoder fails on any such message
            c.execute(b"SELECT pg_logical_emit_message(true, 'undo.ledger', '\\xff00'::bytea)")
    report = source.capture()  # capture goes on, and on again
    source.sql("INSERT INTO t VALUES (100, 'later')")
    assert source.capture().transactions == 1
    assert source.store_rows('SELECT count(*) FROM changes WHERE new = \'["100","later"]\'') == [
        (1,)
    ]
    assert report is not None
    assert source.store_rows("SELECT tag, tag_reason FROM undos ORDER BY id") == [
        ("trusted", None),
        ("trusted", None),
        ("untrusted", "malformed"),
        ("untrusted", "malformed"),
        ("untrusted", "malformed"),
        ("untrusted", "forged"),
        ("untrusted", "replayed"),
    ] + [("untrusted", "malformed")] * (source.decoder == "pgoutput")
    (kept,) = source.store_rows("SELECT message FROM undos WHERE tag_reason = 'replayed'")
    assert kept == (genuine,)  # kept as it came, for whoever looks into it
    for sid in (hers, victim):
        assert _undone(source, sid) == [None]
        assert _undone(source, sid, "--not-undone") == [None]
        assert _undone(source, sid, "--undone") == []
        assert _json(source, "show", "session", sid)["undone"] is None
    from undo.web import serve

    server = serve(source.settings, "127.0.0.1", 0, None, ())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/sessions") as r:
            assert r.status == 200 and hers in r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    applied = source.undo_cli("session", hers, "--apply")
    assert applied.returncode == 0, applied.stderr
    assert source.sql("SELECT id FROM t WHERE id <= 2") == [(2,)]  # 1: the victim's, undone
    source.capture()
    assert _undone(source, hers)[0]["all"] is True


def test_a_role_outside_undo_operator_is_told_the_grant(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1), (2)")
    sid = _as_session(pgo, "DELETE FROM t WHERE id = 1")
    pgo.capture()
    bob = _role(pgo, "bob", "t")
    dsn = _dsn(pgo, bob)
    grant = f"GRANT {OPERATOR} TO {bob};"
    # --fire-triggers: bob may not set session_replication_role either, asked first
    applied = pgo.undo_cli("--dsn", dsn, "session", sid, "--apply", "--fire-triggers")
    assert applied.returncode == 1, applied.stderr
    assert grant in applied.stderr and applied.stderr.count("\n") == 1, applied.stderr
    script = pgo.undo_cli("--dsn", dsn, "session", sid, "--fire-triggers")
    assert script.returncode == 0, script.stderr
    ran = _psql(dsn, script.stdout)
    assert ran.returncode != 0
    assert grant in ran.stderr and ran.stderr.count("\n") == 1, ran.stderr
    assert "may not record undos" in ran.stderr
    assert pgo.sql("SELECT id FROM t") == [(2,)]
    assert pgo.sql("SELECT count(*) FROM undo.ledger") == [(0,)]
    # the role that ran init may (the owner of undo.record_undo)
    assert _psql(pgo.dsn, script.stdout).returncode == 0
    assert pgo.sql("SELECT id FROM t ORDER BY id") == [(1,), (2,)]


def test_a_member_of_undo_operator_undoes_and_undoes_the_undo(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgo.init()
    alice = _role(pgo, "alice", "t", operator=True)
    dsn = _dsn(pgo, alice)
    pgo.sql("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    original = pgo.snapshot("t")
    sid = _as_session(pgo, "DELETE FROM t WHERE id = 1", "UPDATE t SET v = 'z'")
    damaged = pgo.snapshot("t")
    pgo.capture()
    applied = pgo.undo_cli("--dsn", dsn, "session", sid, "--apply", "--fire-triggers")
    assert applied.returncode == 0, applied.stderr
    assert pgo.snapshot("t") == original
    assert pgo.sql("SELECT DISTINCT undone_by::text FROM undo.ledger") == [(alice,)]
    pgo.capture()
    assert pgo.store_rows("SELECT tag, tag_reason FROM undos") == [("trusted", None)]
    (done,) = _undone(pgo, sid)
    assert done["all"] is True
    again = pgo.undo_cli("--dsn", dsn, "session", sid, "--apply", "--fire-triggers")
    assert again.returncode == 1 and "already undone" in again.stderr
    undo_of_undo = pgo.undo_cli(
        "--dsn", dsn, "xact", str(done["undo_xid"]), "--apply", "--fire-triggers"
    )
    assert undo_of_undo.returncode == 0, undo_of_undo.stderr
    assert pgo.snapshot("t") == damaged
    pgo.capture()
    assert pgo.store_rows("SELECT tag FROM undos") == [("trusted",), ("trusted",)]
    assert _undone(pgo, sid) == [None]
    # and the printed script, run by alice through psql, undoes the session again
    script = pgo.undo_cli("--dsn", dsn, "session", sid, "--fire-triggers")
    assert script.returncode == 0, script.stderr
    ran = _psql(dsn, script.stdout)
    assert ran.returncode == 0, ran.stderr
    assert pgo.snapshot("t") == original
    pgo.capture()
    assert pgo.store_rows("SELECT tag FROM undos") == [("trusted",)] * 3
    assert _undone(pgo, sid)[0]["all"] is True


@contextlib.contextmanager
def _second_source(cluster, tmp_path) -> Iterator[Source]:
    folder = tmp_path / "second"
    folder.mkdir()
    gen = _make_source(cluster, folder, "pgoutput")
    try:
        yield next(gen)
    finally:
        gen.close()


def test_uninstall_keeps_undo_operator_while_another_database_uses_it(pgo, cluster, tmp_path):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    with _second_source(cluster, tmp_path) as other:
        other.sql("CREATE TABLE t (id int PRIMARY KEY)")
        init(pgo.settings, ["public"], [])
        init(other.settings, ["public"], [])
        member = _role(pgo, "carol", operator=True)
        done = uninstall(pgo.settings)
        assert any(line.startswith(f"kept role {OPERATOR}") for line in done), done
        exists = "SELECT count(*) FROM pg_roles WHERE rolname = %s"
        assert pgo.sql(exists, (OPERATOR,)) == [(1,)]
        assert pgo.sql("SELECT pg_has_role(%s, %s, 'MEMBER')", (member, OPERATOR)) == [(True,)]
        assert other.sql(
            "SELECT has_function_privilege(%s, 'undo.record_undo(jsonb,jsonb)', 'EXECUTE')",
            (member,),
        ) == [(True,)]
        done = uninstall(other.settings)
        assert f"dropped role {OPERATOR}" in done, done
        assert pgo.sql(exists, (OPERATOR,)) == [(0,)]
        init(pgo.settings, ["public"], [])  # and init makes it again
        assert pgo.sql(exists, (OPERATOR,)) == [(1,)]


def test_no_mirror_content_makes_capture_or_a_reader_fail(tmp_path):
    """read_ledger answers for any bytes; the readers of undos for any row."""
    from undo.stream.messages import read_ledger as verify_ledger

    key = os.urandom(32)
    rng = random.Random(7)
    samples = [
        b"",
        b"\xff\xfe\x00",
        b"0" * 64 + b"\xff",
        b"0" * 64 + b"[1]",
        b"0" * 64 + b'{"xid": true, "entries": []}',
        b"0" * 64 + b'{"xid": 1, "entries": {"a": 1}}',
        b"0" * 64 + b'{"xid": 1, "entries": [["zz", "s", "t", "D", "1"]]}',
        b"0" * 64 + b'{"xid": 1, "entries": [["0/0", "s", "t", "X", "1"]]}',
        b"0" * 64 + b'{"xid": 1, "entries": [["0/0", "s", "t", "D", "' + b"9" * 5000 + b'"]]}',
        b"0" * 64 + b'{"xid": 1, "entries": [["0/0", ["s"], "t", "D", "1"]]}',
        b"0" * 64 + b'{"xid": 1e400, "entries": []}',
        b"0" * 64 + b"[" * 100_000,
    ]
    samples += [rng.randbytes(rng.randrange(200)) for _ in range(2000)]
    for content in samples:
        _doc, why = verify_ledger(content, key, 5)
        assert why is not None
    db = open_store(str(tmp_path / "s.db"), create=True).db  # type: ignore[attr-defined]
    for entries in [None, "not json", "[1]", '{"a": 1}', '[["zz"]]', '[["0/0","s","t","D","x"]]']:
        db.execute(
            "INSERT INTO undos (applied_at, target, selection, undo_xid, entries, tag)"
            " VALUES ('2026-01-01T00:00:00.000000Z', 'null', '[]', 7, ?, 'trusted')",
            [entries],
        )
    assert (
        queries.live_undos(db)
        == [{"applied_at": "2026-01-01T00:00:00.000000Z", "undo_xid": 7, "pieces": set()}] * 6
    )
    assert queries.sessions(db) == [] and queries.undone_sessions(db) == {}


def test_mirrors_stored_before_they_were_signed_count_as_untrusted(tmp_path):
    """A store's undos from before the mirror was signed cannot be told from forged ones (the
    issue's forged rows among them): after the migration they are kept, untrusted, 'unsigned'."""
    import sqlite3

    from sqlite_utils import Database

    from undo.store._schema import migrations

    path = tmp_path / "old.db"
    db = Database(sqlite3.connect(path))
    migrations.apply(db, stop_before="m011_undo_trust")
    db.execute(
        "INSERT INTO undos (applied_at, target, selection, undo_xid, entries) VALUES"
        " ('2026-01-01T00:00:00.000000Z', '{}', '[]', 9, ?)",
        [json.dumps([["0/0", "public", "x", "D", "abc"]])],
    )
    db.conn.commit()
    db.conn.close()
    store = open_store(str(path)).db  # type: ignore[attr-defined]
    assert store.execute("SELECT tag, tag_reason FROM undos").fetchall() == [
        ("untrusted", "unsigned")
    ]
    assert queries.live_undos(store) == [] and queries.sessions(store) == []


def test_an_owners_code_in_an_operators_session_cannot_record_undos(pgo):
    """Found by a hostile probe of the branch that made record_undo non-PUBLIC: record_undo is
    SECURITY DEFINER, so a table owner's function that an operator's session runs (an ENABLE
    ALWAYS trigger, which fires under --apply too; a CHECK constraint) recorded any entries,
    signed and trusted: a session shown undone and its undo refused, or an undo undone twice.
    Only undo's own top-level `SELECT undo.record_undo(...)` records, once per transaction."""
    pgo.sql(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b');"
        " CREATE TABLE om (id int PRIMARY KEY, v text); INSERT INTO om VALUES (1, 'x')"
    )
    pgo.init()
    alice = _role(pgo, "alice", "t", "om", operator=True)
    owner = f"owner_{pgo.dbname}"
    pgo.sql(
        f"CREATE ROLE {owner} LOGIN; ALTER TABLE om OWNER TO {owner};"
        f" CREATE SCHEMA oms AUTHORIZATION {owner}"
    )
    sid = _as_session(pgo, "DELETE FROM t WHERE id = 1", app="evil-script")
    pgo.capture()
    (lsn,) = pgo.store_rows("SELECT commit_lsn FROM transactions")[0]
    planted = (
        "jsonb_build_array(jsonb_build_array("
        f"'{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}', 't'::regclass::oid, 'D', 0))"
    )
    with psycopg.connect(_dsn(pgo, owner), autocommit=True) as c:
        for definer in ("SECURITY DEFINER", ""):  # her rights, or the operator's
            name = "evil_d" if definer else "evil_i"
            c.execute(
                f"CREATE FUNCTION oms.{name}() RETURNS trigger LANGUAGE plpgsql {definer} AS"
                f' $f$ BEGIN PERFORM undo.record_undo(\'{{"session": "{sid}"}}\', {planted});'
                " RETURN NULL; END $f$"
            )
            c.execute(
                f"CREATE TRIGGER {name} AFTER UPDATE ON om FOR EACH STATEMENT"
                f" EXECUTE FUNCTION oms.{name}()"
            )
            c.execute(f"ALTER TABLE om ENABLE ALWAYS TRIGGER {name}")
        c.execute(
            "CREATE FUNCTION oms.chk(int) RETURNS boolean LANGUAGE plpgsql AS $f$ BEGIN"
            f' PERFORM undo.record_undo(\'{{"session": "{sid}"}}\', {planted});'
            " RETURN true; EXCEPTION WHEN others THEN RETURN true; END $f$"
        )
        c.execute("ALTER TABLE om ADD CONSTRAINT c CHECK (oms.chk(id)) NOT VALID")
    with psycopg.connect(_dsn(pgo, alice), autocommit=True) as c:
        for other in ("evil_i", "evil_d"):  # each trigger alone
            pgo.sql(f"ALTER TABLE om DISABLE TRIGGER {other}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("UPDATE om SET v = 'y'")  # her trigger runs in alice's session
            pgo.sql(f"ALTER TABLE om ENABLE ALWAYS TRIGGER {other}")
        pgo.sql("ALTER TABLE om DISABLE TRIGGER evil_d; ALTER TABLE om DISABLE TRIGGER evil_i")
        c.execute("INSERT INTO om VALUES (2, 'z')")  # the CHECK runs it, and swallows the refusal
    assert pgo.sql("SELECT count(*) FROM undo.ledger") == [(0,)]
    pgo.capture()
    assert _undone(pgo, sid) == [None]
    applied = pgo.undo_cli("--dsn", _dsn(pgo, alice), "session", sid, "--apply", "--fire-triggers")
    assert applied.returncode == 0, applied.stderr
    assert pgo.sql("SELECT id FROM t ORDER BY id") == [(1,), (2,)]
    assert pgo.sql("SELECT count(*) FROM undo.ledger") == [(1,)]  # the undo's own entry only
