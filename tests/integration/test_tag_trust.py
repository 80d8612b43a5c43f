"""Nothing that signs is readable or writable by code running in a session, and each change
carries the statement that made it.

Played by real roles against a real server, both decoders: a table owner whose trigger runs in
another role's session (key theft, an overwritten cache), a poisoned setting before blinding
DDL, replayed and forged refusals, an operator hijack on the search path, and the statements of
multi-statement transactions.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re

import psycopg
import pytest
from prometheus_client.exposition import generate_latest

from tests.conftest import erase_own_tag
from undo.source.pg import session_id
from undo.web.metrics import registry


def _role(source, name, *grants):
    """A LOGIN role with nothing of undo's; returns its conninfo."""
    role = f"{name}_{source.dbname}"
    source.sql(f"CREATE ROLE {role} LOGIN")
    for grant in grants:
        source.sql(grant.format(role=role))
    return psycopg.conninfo.make_conninfo(source.dsn, user=role), role


def _facts(source, conn):
    """A connection's pid and backend start in µs, as the server knows them."""
    (row,) = source.sql(
        "SELECT pid, (extract(epoch FROM backend_start) * 1000000)::bigint FROM pg_stat_activity"
        " WHERE pid = %s",
        (conn.info.backend_pid,),
    )
    return row


#: mallory's own schema: a table anyone may write, whose trigger runs her SECURITY DEFINER
#: function in the writer's session. It keeps every setting of that session, and what each of
#: undo's functions and objects gives her there, in m.loot; and, when asked (m.poison), writes
#: settings for the rest of that session.
MALLORY = """
CREATE TABLE m.notes (x int);
CREATE TABLE m.loot (what text, got text);
CREATE TABLE m.poison (name text, value text);
GRANT USAGE ON SCHEMA m TO PUBLIC;
GRANT INSERT ON m.notes TO PUBLIC;
CREATE FUNCTION m.steal() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    r record;
    q text;
    got text;
BEGIN
    FOR r IN SELECT name, setting FROM pg_settings LOOP
        INSERT INTO m.loot VALUES ('setting ' || r.name, r.setting);
    END LOOP;
    FOREACH q IN ARRAY ARRAY['undo.session', 'undo.tagged', 'undo.stmt', 'undo.undoing',
                             'undo.in_ddl', 'undo.key', 'undo.secret'] LOOP
        INSERT INTO m.loot VALUES (q, current_setting(q, true));
    END LOOP;
    FOREACH q IN ARRAY ARRAY[
        'SELECT undo.session_tag()', 'SELECT undo.sign(''undo'', ''{}'')',
        'SELECT undo.session_fields()', 'SELECT undo.note_session_start()::text',
        'SELECT currval(''undo.session_start'')::text', 'SELECT key::text FROM undo.secret',
        'SELECT ipad::text || opad::text FROM undo.secret',
        'SELECT undo.undoing_json(''1'', ''1'')', 'SELECT undo.emit_ddl(''{}'')::text',
        'SELECT undo.guarded(''x'')'
    ] LOOP
        BEGIN
            EXECUTE q INTO got;
            INSERT INTO m.loot VALUES (q, got);
        EXCEPTION WHEN others THEN
            INSERT INTO m.loot VALUES (q, 'error ' || SQLSTATE);
        END;
    END LOOP;
    FOR r IN SELECT name, value FROM m.poison LOOP
        PERFORM set_config(r.name, r.value, false);
    END LOOP;
    RETURN NULL;
END
$$;
CREATE TRIGGER steal AFTER INSERT ON m.notes FOR EACH STATEMENT EXECUTE FUNCTION m.steal();
"""


def _mallory(source):
    """owner_mallory: her own schema m (not audited), the trigger above, and INSERT on t."""
    dsn, role = _role(source, "owner_mallory", "GRANT INSERT, SELECT ON t TO {role}")
    source.sql(f"CREATE SCHEMA m AUTHORIZATION {role}")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(MALLORY)
    return dsn, role


def _candidates(loot):
    """Every byte string in what she kept that could be a key: the text, and it decoded as
    hex (whole, or in 64-byte pieces)."""
    out = set()
    for got in loot:
        if not got:
            continue
        out.add(got.encode())
        for digits in re.findall(r"[0-9a-fA-F]{64,}", got):
            raw = bytes.fromhex(digits[: len(digits) // 2 * 2])
            out.add(raw)
            out.update(raw[i : i + 64] for i in range(0, len(raw), 64))
    return out


def _forgeries(loot, claim, xid):
    """Tags claiming ``claim`` (the victim's session facts) for transaction ``xid``, signed
    with everything she has: as a session cache of the format before (pads, then the session
    part), and as a key of today's format."""
    body = {"application_name": "cron", "xid": xid, "statement": "DELETE FROM t"}
    for got in loot:
        if got and len(got) > 256 and re.fullmatch(r"[0-9a-f]{256}", got[:256]):
            ipad, opad = bytes.fromhex(got[:128]), bytes.fromhex(got[128:256])
            msg = (got[256:] + "\n" + json.dumps(body)).encode()
            inner = hashlib.sha256(ipad + msg).digest()
            yield hashlib.sha256(opad + inner).hexdigest().encode() + msg
    payload = json.dumps({**claim, **body}).encode()
    for key in _candidates(loot):
        mac = hmac.new(key, b"undo\n" + payload, hashlib.sha256).hexdigest().encode()
        yield mac + payload
    yield b"0" * 64 + payload


def test_a_table_owners_trigger_in_the_victims_session_gets_nothing_to_sign_with(source):
    """Key theft: owner_mallory's SECURITY DEFINER trigger runs in the victim's transaction
    (next to a write to an audited table) and keeps everything it can read or call. Then, in
    her own session and after the victim has gone, she signs tags claiming the victim's
    session with all of it: none is trusted, none counts as the victim's."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    mallory_dsn, _ = _mallory(source)
    victim_dsn, victim_role = _role(source, "victim", "GRANT INSERT, SELECT ON t TO {role}")
    with psycopg.connect(victim_dsn, autocommit=False, application_name="cron") as v:
        victim = session_id(v)
        pid, start = _facts(source, v)
        v.execute("INSERT INTO t VALUES (1, 'victim')")
        v.execute("INSERT INTO m.notes VALUES (1)")  # her trigger, after the tag
        v.commit()
        v.execute("INSERT INTO m.notes VALUES (2)")  # and before it
        v.execute("INSERT INTO t VALUES (2, 'victim')")
        v.commit()
    claim = {"pid": pid, "backend_start": start, "user": victim_role, "client_addr": None}
    claim |= {"client_port": None, "session_id": victim}
    with psycopg.connect(mallory_dsn, autocommit=True, application_name="cron") as c:
        loot = [r[1] for r in c.execute("SELECT what, got FROM m.loot").fetchall()]
        assert len(loot) > 100
        mallory = session_id(c)
        for n, erase in ((10, False), (11, True)):
            with c.transaction():
                if erase:  # her own tag erased: the forgery is the transaction's only tag
                    erase_own_tag(c)
                (xid,) = c.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
                for content in _forgeries(loot, claim, xid):  # before her write, her real tag
                    c.execute("SELECT pg_logical_emit_message(true, 'undo', %s)", (content,))
                c.execute("INSERT INTO t VALUES (%s, 'mallory')", (n,))
    source.capture()
    rows = source.store_rows(
        "SELECT json_extract(c.new, '$[1]'), t.session_id, t.tag, t.tag_reason FROM changes c"
        " JOIN transactions t ON t.id = c.txn ORDER BY c.id"
    )
    assert rows[:2] == [("victim", victim, "trusted", None)] * 2
    for who, sid, tag, reason in rows[2:]:
        assert who == "mallory"
        assert (sid, tag, reason) in ((mallory, "trusted", None), (victim, "untrusted", "forged"))
    assert ("mallory", victim, "untrusted", "forged") in rows  # the forgery, once it is alone
    assert source.store_rows(
        "SELECT count(*) FROM transactions WHERE session_id = ? AND tag = 'trusted'", (victim,)
    ) == [(2,)]


def test_a_table_owners_trigger_cannot_overwrite_the_victims_later_tags(source):
    """An overwritten cache: her trigger sets undo's settings (and more) for the rest of the
    victim's session, a pooled connection: the victim's later writes on it still succeed,
    trusted, under the victim's session."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    mallory_dsn, _ = _mallory(source)
    victim_dsn, _ = _role(source, "victim", "GRANT INSERT, SELECT ON t TO {role}")
    with psycopg.connect(mallory_dsn, autocommit=True, application_name="cron") as c:
        c.execute("INSERT INTO t VALUES (0, 'mallory')")  # her own session's settings, to copy
        (xid,) = c.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        poison = [
            (name, value)
            for name in ("undo.session", "undo.tagged", "undo.stmt")
            for (value,) in c.execute("SELECT current_setting(%s, true)", (name,))
            if value
        ]
        poison += [(f"undo.{n}", "1") for n in ("tagged", "stmt", "session", "in_ddl")]
        poison += [("undo.tagged", str(xid + k)) for k in range(1, 4)]  # an xid guessed
        poison += [("undo.session", "0" * 256 + '{"session_id":"x.1"}')]
        poison += [("undo.session", "zz" * 128 + "{")]
        poison += [("undo.undoing", '{"session": "x.1"}')]  # no undo claim either
        c.cursor().executemany("INSERT INTO m.poison VALUES (%s, %s)", poison)
    with psycopg.connect(victim_dsn, autocommit=False, application_name="cron") as v:
        victim = session_id(v)
        v.execute("INSERT INTO t VALUES (1, 'victim')")
        v.execute("INSERT INTO m.notes VALUES (1)")  # her trigger poisons the session
        v.commit()
        for i in range(2, 6):
            v.execute("INSERT INTO t VALUES (%s, 'victim')", (i,))
            v.commit()
    source.capture()
    assert source.store_rows(
        "SELECT json_extract(c.new, '$[0]'), t.session_id, t.tag, t.undo_of FROM changes c"
        " JOIN transactions t ON t.id = c.txn WHERE json_extract(c.new, '$[1]') = 'victim'"
        " ORDER BY c.id"
    ) == [(str(i), victim, "trusted", None) for i in range(1, 6)]


def test_a_table_owner_cannot_attach_undos_trigger_and_undos_fire_for_everyone(source):
    """undo.tag() (and every function that signs) is not PUBLIC's to execute: a table owner
    cannot attach it to a table of hers; the triggers init made fire for every role."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY)")
    source.init()
    dsn, role = _mallory(source)
    with psycopg.connect(dsn, autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(
                "CREATE TRIGGER t BEFORE INSERT ON m.notes FOR EACH STATEMENT"
                " EXECUTE FUNCTION undo.tag()"
            )
        c.execute("INSERT INTO t VALUES (1)")  # undo's trigger fires for her
        sid = session_id(c)
    signers = ("tag", "sign", "session_fields", "note_session_start", "emit_ddl", "refuse")
    signers += ("on_ddl", "audit_table", "session_tag", "undoing_json", "guarded")
    assert (
        source.sql(
            "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'undo'::regnamespace"
            " AND p.proname = ANY (%s) AND has_function_privilege(%s, p.oid, 'EXECUTE')",
            (list(signers), role),
        )
        == []
    )
    source.capture()
    assert source.store_rows("SELECT session_id, tag FROM transactions") == [(sid, "trusted")]


def test_settings_poisoned_before_blinding_ddl_leave_it_on_the_record(source):
    """The DDL record is signed by undo's owner from the server's facts: a table owner who sets
    undo's settings (the session cache of before, among them) before a rewrite that changes
    every value still gets a trusted record and a gap of the table."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    source.init()
    source.sql("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3) g")
    dsn, role = _role(source, "owner")
    source.sql(f"ALTER TABLE t OWNER TO {role}")
    with psycopg.connect(dsn, autocommit=True, application_name="migrations") as c:
        sid = session_id(c)
        for name, value in [
            ("undo.session", "0" * 256 + json.dumps({"session_id": sid})),
            ("undo.tagged", "1"),
            ("undo.stmt", "1"),
            ("undo.in_ddl", "1"),
        ]:
            c.execute("SELECT set_config(%s, %s, false)", (name, value))
        c.execute("ALTER TABLE t ALTER COLUMN v TYPE text USING 'wiped'")
    source.capture()
    assert source.store_rows(
        "SELECT command, tag, tag_reason FROM ddl WHERE session_id = ?", (sid,)
    ) == [("ALTER TABLE", "trusted", None)]
    status = json.loads(source.undo_cli("status", "--json").stdout)
    assert [(g["table"], g["session_id"], "rewritten" in g["reason"]) for g in status["gaps"]] == [
        ("public.t", sid, True)
    ]


def _peek_messages(source, slot, prefix):
    """The contents of the messages with this prefix a test_decoding slot has seen."""
    source.sql("SELECT pg_logical_emit_message(true, 'flush', '')")  # a commit flushes the WAL
    rows = source.sql("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (slot,))
    found = []
    for (data,) in rows:
        m = re.match(r"message: transactional: \d prefix: (\S+), sz: \d+ content:(.*)", data, re.S)
        if m and m.group(1) == prefix:
            found.append(m.group(2))
    return found


def test_a_refusal_is_stored_once_and_a_forged_one_is_not_counted(source):
    """A refusal is signed by undo's owner, with the server's clock and a nonce: emitted again
    by another role (copied from the stream), it is stored untrusted, replayed; one with a
    made-up MAC is forged; /metrics counts the one real refusal."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY)")
    source.init()
    assert source.undo_cli("guard", "add", "report*").returncode == 0
    peek = "peek_" + source.slot
    source.sql("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (peek,))
    dsn, _ = _role(source, "eve", "GRANT INSERT ON t TO {role}")
    with (
        psycopg.connect(dsn, autocommit=True, application_name="report-x") as c,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
    ):
        c.execute("INSERT INTO t VALUES (1)")
    (refusal,) = _peek_messages(source, peek, "undo.guard")
    doc = json.loads(refusal[64:].splitlines()[-1])
    with psycopg.connect(dsn, autocommit=True, application_name="web") as c:
        for _ in range(2):  # the same refusal again
            c.execute("SELECT pg_logical_emit_message(false, 'undo.guard', %s)", (refusal,))
        made_up = json.dumps({**doc, "at": "2099-01-01T00:00:00.000000Z", "nonce": "n"})
        c.execute("SELECT pg_logical_emit_message(false, 'undo.guard', %s)", ("0" * 64 + made_up,))
    source.capture()
    assert source.store_rows(
        "SELECT guard, application_name, tag, tag_reason FROM guard_refusals ORDER BY lsn"
    ) == [
        ("report*", "report-x", "trusted", None),
        ("report*", "report-x", "untrusted", "replayed"),
        ("report*", "report-x", "untrusted", "replayed"),
        ("report*", "report-x", "untrusted", "forged"),
    ]
    metrics = generate_latest(registry(source.settings)).decode()
    assert (
        'undo_guard_refusals_total{application="report-x",guard="report*",'
        f'source="{source.dbname}"}} 1.0' in metrics
    )
    assert len(doc["nonce"]) == 36 and doc["at"] < "2099"


HIJACK = """
CREATE SCHEMA ms;
CREATE FUNCTION ms.never(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT false';
CREATE FUNCTION ms.always(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE OPERATOR ms.~~ (LEFTARG = text, RIGHTARG = text, FUNCTION = ms.never);
CREATE OPERATOR ms.= (LEFTARG = text, RIGHTARG = text, FUNCTION = ms.always);
"""
#: and look-alikes of the rest: ||, a type named text, functions of pg_catalog's names
LOOK_ALIKES = """
CREATE FUNCTION ms.textcat(text, text) RETURNS text LANGUAGE sql AS 'SELECT ''''';
CREATE OPERATOR ms.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = ms.textcat);
CREATE DOMAIN ms.text AS pg_catalog.text CHECK (false);
CREATE FUNCTION ms.current_setting(text, boolean) RETURNS text LANGUAGE sql AS 'SELECT ''1''';
CREATE FUNCTION ms.sha256(bytea) RETURNS bytea LANGUAGE sql AS 'SELECT ''\\x00''::bytea';
"""


def test_a_role_s_own_operators_first_on_its_path_change_nothing(source):
    """The operator hijack: a role's own ~~ (always false), = (always true), ||, a domain
    named text and look-alike functions, first on its search_path: a guarded application's
    write is still refused, and an unguarded one's still tagged and trusted."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY)")
    source.init()
    assert source.undo_cli("guard", "add", "report*").returncode == 0
    dsn, role = _role(source, "eve", "GRANT INSERT ON t TO {role}")
    source.sql(f"GRANT CREATE ON DATABASE {source.dbname} TO {role}")
    options = "-c search_path=ms,pg_catalog,public"
    for hijack in (HIJACK, LOOK_ALIKES):
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(hijack)
        with psycopg.connect(
            dsn, autocommit=True, application_name="report-x", options=options
        ) as c:
            assert c.execute("SELECT 'a' = 'b', 'report-x' LIKE 'report%'").fetchone() == (
                True,
                False,
            )
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                c.execute("INSERT INTO t VALUES (1)")
    with psycopg.connect(dsn, autocommit=True, application_name="web", options=options) as c:
        sid = session_id(c)  # in her session, on her path: what she sees, not what undo records
        assert sid == ""
        (sid,) = source.sql(  # on the admin's
            "SELECT to_hex(trunc(extract(epoch FROM backend_start))::bigint) || '.' || to_hex(pid)"
            " FROM pg_stat_activity WHERE pid = %s",
            (c.info.backend_pid,),
        )[0]
        c.execute("INSERT INTO t VALUES (2)")
        with c.transaction():
            c.execute("INSERT INTO t VALUES (3)")
            c.execute("INSERT INTO t VALUES (4)")
    source.capture()
    assert (
        source.store_rows("SELECT application_name, tag FROM guard_refusals")
        == [("report-x", "trusted")] * 2
    )
    assert source.store_rows(
        "SELECT t.session_id, t.tag, c.statement FROM change_log c JOIN transactions t"
        " ON t.xid = c.xid ORDER BY c.id"
    ) == [
        (sid, "trusted", "INSERT INTO t VALUES (2)"),
        (sid, "trusted", "INSERT INTO t VALUES (3)"),
        (sid, "trusted", "INSERT INTO t VALUES (4)"),
    ]


def test_each_change_carries_the_statement_that_made_it(source):
    """UPDATE a; INSERT b; DELETE c in one transaction: each change shows its own statement
    (show, history, change_log); a statement rolled back to a savepoint leaves none, and one
    that held the tag has it emitted again by the next."""
    source.sql(
        "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY);"
        " CREATE TABLE c (id int PRIMARY KEY); INSERT INTO a VALUES (1, 'x'), (2, 'y');"
        " INSERT INTO c VALUES (1), (2)"
    )
    source.init()
    with source.connect(autocommit=False, application_name="app") as conn:
        sid = session_id(conn)
        conn.execute("UPDATE a SET v = 'z'")
        conn.execute("INSERT INTO b VALUES (1)")
        conn.execute("DELETE FROM c WHERE id = 1")
        conn.commit()
        conn.execute("SAVEPOINT s")
        conn.execute("INSERT INTO b VALUES (2)")  # held the tag: rolled back with it
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute("INSERT INTO b VALUES (3)")
        conn.execute("SAVEPOINT s2")
        conn.execute("UPDATE a SET v = 'gone' WHERE id = 1")
        conn.execute("ROLLBACK TO SAVEPOINT s2")
        conn.execute("UPDATE a SET v = 'kept' WHERE id = 2")
        conn.execute("DELETE FROM b WHERE id = 1; DELETE FROM c")  # one query string
        conn.commit()
    source.capture()
    rows = source.store_rows("SELECT xid, table_name, op, statement FROM change_log ORDER BY id")
    first, second = rows[0][0], rows[-1][0]
    assert [r[1:] for r in rows] == [
        ("a", "U", "UPDATE a SET v = 'z'"),
        ("a", "U", "UPDATE a SET v = 'z'"),
        ("b", "I", "INSERT INTO b VALUES (1)"),
        ("c", "D", "DELETE FROM c WHERE id = 1"),
        ("b", "I", "INSERT INTO b VALUES (3)"),
        ("a", "U", "UPDATE a SET v = 'kept' WHERE id = 2"),
        ("b", "D", "DELETE FROM b WHERE id = 1; DELETE FROM c"),
        ("c", "D", "DELETE FROM b WHERE id = 1; DELETE FROM c"),
    ]
    assert [r[0] for r in rows] == [first] * 4 + [second] * 4
    assert source.store_rows("SELECT tag, statement FROM transactions ORDER BY id") == [
        ("trusted", "UPDATE a SET v = 'z'"),
        ("trusted", "INSERT INTO b VALUES (3)"),
    ]
    shown = json.loads(source.undo_cli("show", "session", sid, "--json").stdout)
    assert [[c["statement"] for c in t["changes"]] for t in shown["transactions"]] == [
        [r[3] for r in rows[:4]],
        [r[3] for r in rows[4:]],
    ]
    text = source.undo_cli("show", "session", sid).stdout
    # listed once among the statements, and again where its changes start
    assert text.count("statement: DELETE FROM c WHERE id = 1\n") == 2
    statements = text[text.index("statements:") : text.index("changes:")]
    for statement in (
        "UPDATE a SET v = 'z'",
        "INSERT INTO b VALUES (1)",
        "DELETE FROM c WHERE id = 1",
    ):
        assert f"statement: {statement}\n" in statements, statements
    history = json.loads(source.undo_cli("history", "public.c", "id=1", "--json").stdout)
    assert [h["statement"] for h in history] == ["DELETE FROM c WHERE id = 1"]


def test_markers_count_only_in_a_trusted_transaction(source):
    """A marker is unsigned: in a transaction without a trusted tag, markers name nothing; in a
    trusted one a role's own marker is superseded by its next statement's; one that is not
    UTF-8 is kept as malformed."""
    source.sql("CREATE TABLE t (id int PRIMARY KEY)")
    source.init()
    with source.connect() as c:
        with c.transaction():  # no tag at all: its own markers count for nothing
            erase_own_tag(c)
            c.execute("SELECT pg_logical_emit_message(true, 'undo.stmt', 'SELECT 1')")
            c.execute("INSERT INTO t VALUES (1)")
        with c.transaction():  # a trusted transaction mislabelling its own statement
            c.execute("INSERT INTO t VALUES (2)")
            c.execute("SELECT pg_logical_emit_message(true, 'undo.stmt', %s)", (b"\xff",))
            c.execute("SELECT pg_logical_emit_message(true, 'undo.stmt', 'SELECT 1')")
            c.execute("INSERT INTO t VALUES (3)")
    source.capture()
    assert source.store_rows(
        "SELECT json_extract(c.new, '$[0]'), t.tag, c.statement FROM change_log c"
        " JOIN transactions t ON t.xid = c.xid ORDER BY c.id"
    ) == [
        ("1", "none", None),
        ("2", "trusted", "INSERT INTO t VALUES (2)"),
        ("3", "trusted", "INSERT INTO t VALUES (3)"),
    ]
    assert source.store_rows("SELECT prefix, problem FROM malformed") == [
        ("undo.stmt", "the statement is not UTF-8")
    ]
