"""The tag's own state (this transaction is tagged, this statement is marked) cannot be forged by
code running in the session: a table owner whose trigger or default runs in another role's
transaction can at worst have a genuine tag or marker emitted again, never skip one.

Played by real roles against a real server, both decoders: owner_mallory owns an audited table
(notes), whose BEFORE STATEMENT trigger sorts before undo_tag, and an unaudited one whose
default runs her function; alice writes notes and a table mallory does not own (customer) in one
transaction.
"""

from __future__ import annotations

import psycopg
import pytest

from undo.source.pg import session_id

#: mallory's code, run in alice's session. Each attack writes the settings of undo's state before
#: undo's trigger reads them:
#: - erase: the transaction's start (what the tag compared before);
#: - relabel: emits her own marker and marks the running statement (the hex of its start);
#: - restore: writes to notes (audited) in a subtransaction, so that undo's trigger sets the
#:   state there, keeps the values, rolls the subtransaction back (the tag with it), and writes
#:   the values back: undo's own digests, for this transaction and statement.
MALLORY = """
CREATE TABLE mal.attack (kind text);
CREATE FUNCTION mal.poison() RETURNS void LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    kind text := (SELECT a.kind FROM mal.attack a);
    t text;
    s text;
BEGIN
    IF kind = 'erase' THEN
        PERFORM pg_catalog.set_config('undo.tagged', pg_catalog.transaction_timestamp()::text,
                                      true);
    ELSIF kind = 'relabel' THEN
        PERFORM pg_catalog.pg_logical_emit_message(true, 'undo.stmt', 'SELECT 1 -- harmless read');
        PERFORM pg_catalog.set_config('undo.stmt', pg_catalog.encode(pg_catalog.timestamptz_send(
            pg_catalog.statement_timestamp()), 'hex'), true);
    ELSIF kind = 'restore' THEN
        BEGIN
            INSERT INTO public.notes VALUES (-1, 'decoy');
            t := pg_catalog.current_setting('undo.tagged', true);
            s := pg_catalog.current_setting('undo.stmt', true);
            RAISE EXCEPTION 'rolled back';
        EXCEPTION WHEN raise_exception THEN
            NULL;
        END;
        PERFORM pg_catalog.set_config('undo.tagged', t, true);
        PERFORM pg_catalog.set_config('undo.stmt', s, true);
    END IF;
END
$$;
CREATE FUNCTION mal.pre() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF pg_catalog.pg_trigger_depth() = 1 THEN
        PERFORM mal.poison();
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER aaa_pre BEFORE INSERT OR UPDATE OR DELETE ON public.notes
    FOR EACH STATEMENT EXECUTE FUNCTION mal.pre();
CREATE FUNCTION mal.stamp() RETURNS int LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM mal.poison();
    RETURN 1;
END
$$;
CREATE TABLE mal.visits (n int DEFAULT mal.stamp());
GRANT USAGE ON SCHEMA mal TO PUBLIC;
GRANT INSERT ON mal.visits TO PUBLIC;
"""

ALICE_NOTES = [
    "INSERT INTO notes VALUES (2, 'x')",
    "UPDATE customer SET last_name = last_name || '' WHERE customer_id = 2",
]
#: her default runs before alice's first write to an audited table
ALICE_VISITS = ["INSERT INTO mal.visits DEFAULT VALUES", *ALICE_NOTES]


def _setup(source):
    """notes (owned by mallory, with her trigger), customer, and the LOGIN roles."""
    source.sql(
        "CREATE TABLE notes (id int PRIMARY KEY, v text);"
        " CREATE TABLE customer (customer_id int PRIMARY KEY, last_name text);"
        " INSERT INTO customer VALUES (1, 'a'), (2, 'b')"
    )
    source.init()
    mallory, alice = (f"{n}_{source.dbname}" for n in ("owner_mallory", "alice"))
    source.sql(f"CREATE ROLE {mallory} LOGIN; CREATE ROLE {alice} LOGIN")
    source.sql(f"ALTER TABLE notes OWNER TO {mallory}; CREATE SCHEMA mal AUTHORIZATION {mallory}")
    source.sql(f"GRANT INSERT ON notes TO {alice}; GRANT SELECT, UPDATE ON customer TO {alice}")
    dsn = psycopg.conninfo.make_conninfo(source.dsn, user=mallory)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(MALLORY)
    return dsn, psycopg.conninfo.make_conninfo(source.dsn, user=alice), alice


@pytest.mark.parametrize(
    ("attack", "statements"),
    [
        ("erase", ALICE_NOTES),
        ("relabel", ALICE_NOTES),
        ("restore", ALICE_NOTES),
        ("restore", ALICE_VISITS),
    ],
    ids=["erase", "relabel", "restore-in-trigger", "restore-in-default"],
)
def test_a_table_owners_code_cannot_skip_the_victims_tag_or_marker(source, attack, statements):
    """Her code sets undo's state in alice's transaction before undo's trigger reads it: alice's
    transaction stays trusted, with her session, user and application, each change with her
    own statement; mallory's marker labels nothing."""
    mallory_dsn, alice_dsn, alice = _setup(source)
    with psycopg.connect(mallory_dsn, autocommit=True) as c:
        c.execute("INSERT INTO mal.attack VALUES (%s)", (attack,))
    with psycopg.connect(alice_dsn, application_name="billing") as a:
        sid = session_id(a)
        a.commit()
        for statement in statements:
            a.execute(statement)
        a.commit()
        # and a transaction after it: the state of one is nothing in the next
        a.execute(ALICE_NOTES[1])
        a.commit()
    source.capture()
    assert source.store_rows(
        "SELECT t.session_id, t.user_name, t.application_name, t.tag, t.tag_reason, c.table_name,"
        " c.statement FROM change_log c JOIN transactions t ON t.xid = c.xid ORDER BY c.id"
    ) == [
        (sid, alice, "billing", "trusted", None, "notes", ALICE_NOTES[0]),
        (sid, alice, "billing", "trusted", None, "customer", ALICE_NOTES[1]),
        (sid, alice, "billing", "trusted", None, "customer", ALICE_NOTES[1]),
    ]
    script = source.undo_cli("session", sid)  # selectable: her session's undo covers both
    assert script.returncode == 0 and "notes" in script.stdout, script.stderr
    assert "customer" in script.stdout


@pytest.mark.parametrize("attack", ["erase", "relabel", "restore"])
def test_a_guarded_application_is_refused_whatever_her_trigger_sets(source, attack):
    """A guard is checked before any state is trusted: alice's guarded application is refused at
    her write to notes, whatever mallory's trigger set before undo's."""
    mallory_dsn, alice_dsn, _ = _setup(source)
    assert source.undo_cli("guard", "add", "billing*").returncode == 0
    with psycopg.connect(mallory_dsn, autocommit=True) as c:
        c.execute("INSERT INTO mal.attack VALUES (%s)", (attack,))
    with psycopg.connect(alice_dsn, application_name="billing-job") as a:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            a.execute(ALICE_NOTES[0])
        a.rollback()
    assert source.sql("SELECT count(*) FROM notes") == [(0,)]


def test_a_forged_state_in_a_session_that_never_tagged_fails_nothing(source):
    """Values of any shape in undo's settings, set for the session before its first write:
    every write succeeds, tagged and trusted."""
    _, alice_dsn, _ = _setup(source)
    with psycopg.connect(alice_dsn, autocommit=True, application_name="web") as a:
        sid = session_id(a)
        for value in ("", "x", "1" + "0" * 32, "d" + "f" * 32, "t" + "0" * 32, "\u00e9" * 40):
            for name in ("undo.tagged", "undo.stmt"):
                a.execute("SELECT set_config(%s, %s, false)", (name, value))
            a.execute(ALICE_NOTES[1])
    source.capture()
    assert source.store_rows(
        "SELECT session_id, tag, count(*) FROM transactions GROUP BY 1, 2"
    ) == [(sid, "trusted", 6)]


def test_a_second_genuine_tag_in_a_transaction_keeps_it_trusted(source):
    """Code in the session that clears undo's state between statements only has a second,
    genuine tag emitted: the transaction stays trusted, its session, application and first
    statement the first tag's, each change with its own statement."""
    _, alice_dsn, alice = _setup(source)
    with psycopg.connect(alice_dsn, application_name="web") as a:
        sid = session_id(a)
        a.commit()
        a.execute("UPDATE customer SET last_name = 'c' WHERE customer_id = 1")
        a.execute(
            "SELECT set_config('undo.tagged', '', true), set_config('application_name',"
            " 'other', true), set_config('undo.undoing', 'x', true)"
        )
        a.execute("UPDATE customer SET last_name = 'd' WHERE customer_id = 2")
        a.execute("UPDATE customer SET last_name = 'e' WHERE customer_id = 1")
        a.commit()
    source.capture()
    assert source.store_rows(
        "SELECT session_id, user_name, application_name, tag, statement, undo_of FROM transactions"
    ) == [
        (
            sid,
            alice,
            "web",
            "trusted",
            "UPDATE customer SET last_name = 'c' WHERE customer_id = 1",
            None,
        )
    ]
    assert source.store_rows("SELECT statement FROM change_log ORDER BY id") == [
        ("UPDATE customer SET last_name = 'c' WHERE customer_id = 1",),
        ("UPDATE customer SET last_name = 'd' WHERE customer_id = 2",),
        ("UPDATE customer SET last_name = 'e' WHERE customer_id = 1",),
    ]


def test_the_state_key_is_read_by_undos_owner_alone(pgo):
    """The key of the state's digests: a role without privileges on undo can neither read nor
    set it, however it asks."""
    mallory_dsn, _, _ = _setup(pgo)
    with psycopg.connect(mallory_dsn, autocommit=True) as c:
        for seq in ("undo.state_key_a", "undo.state_key_b"):
            for query in (
                f"SELECT last_value::text FROM {seq}",
                f"SELECT currval('{seq}')::text",
                f"SELECT nextval('{seq}')::text",
                f"SELECT setval('{seq}', 1)::text",
                f"SELECT pg_sequence_last_value('{seq}')::text",
                f"SELECT last_value::text FROM pg_sequences WHERE sequencename = '{seq[5:]}'",
            ):
                try:
                    got = c.execute(query).fetchall()
                except psycopg.errors.InsufficientPrivilege:
                    continue
                assert got in ([(None,)], []), (query, got)
    assert pgo.sql("SELECT pg_sequence_last_value('undo.state_key_a') IS NOT NULL") == [(True,)]
