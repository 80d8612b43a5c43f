"""An undo never runs a table owner's ENABLE ALWAYS / ENABLE REPLICA triggers or rules as the
role undoing. session_replication_role = replica silences ORIGIN triggers only: an ALWAYS one
fires in every mode, a REPLICA one only in replica mode (so during an undo), and rules alike.
Played by real roles: mallory (LOGIN, owns public.notes, her own schema mal), alice (LOGIN, DML
on notes, whose deletes are undone), and the on-call, a superuser (the tests' own role), who
undoes with `--apply` or runs the printed script with psql."""

from __future__ import annotations

import subprocess

import psycopg
import pytest
from psycopg import sql

from tests.conftest import Source
from tests.integration.test_undo import _as_session
from undo.source.pg import session_id

#: the red team's attack, as mallory runs it on her own table ({role}: her role's name)
ATTACK = """
CREATE FUNCTION mal.trojan() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF (SELECT rolsuper FROM pg_roles WHERE rolname=current_user) THEN EXECUTE 'alter role {role} superuser'; END IF; RETURN NULL; END $$;
CREATE TRIGGER zz_trojan AFTER INSERT OR UPDATE OR DELETE ON public.notes FOR EACH STATEMENT EXECUTE FUNCTION mal.trojan();
ALTER TABLE public.notes ENABLE {mode} TRIGGER zz_trojan;
"""  # noqa: E501 (the attack as found)

#: the same through a rule: its action calls her function, which runs as the role writing
RULE = """
CREATE FUNCTION mal.rule_trojan() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN IF (SELECT rolsuper FROM pg_roles WHERE rolname=current_user) THEN EXECUTE 'alter role {role} superuser'; END IF; RETURN true; END $$;
CREATE RULE zz_rule AS ON UPDATE TO public.notes DO ALSO SELECT mal.rule_trojan();
ALTER TABLE public.notes ENABLE {mode} RULE zz_rule;
"""  # noqa: E501


def _roles(src: Source, columns: str = "id int PRIMARY KEY, body text") -> tuple[str, str, str]:
    """mallory owns public.notes (3 rows) and schema mal; alice may write notes. Returns
    (mallory's name, mallory's dsn, alice's dsn)."""
    mallory, alice = f"mallory_{src.dbname}", f"alice_{src.dbname}"
    with src.connect() as c:
        c.execute(sql.SQL("CREATE TABLE public.notes ({})").format(sql.SQL(columns)))
    src.init()
    src.sql("INSERT INTO notes VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    with src.connect() as c:
        for role in (mallory, alice):
            c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        c.execute(sql.SQL("ALTER TABLE notes OWNER TO {}").format(sql.Identifier(mallory)))
        c.execute(sql.SQL("CREATE SCHEMA mal AUTHORIZATION {}").format(sql.Identifier(mallory)))
        # an application role that owns tables in public may make indexes there
        c.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(mallory)))
        c.execute(sql.SQL("GRANT ALL ON notes TO {}").format(sql.Identifier(alice)))
    return mallory, _dsn(src, mallory), _dsn(src, alice)


def _dsn(src: Source, role: str) -> str:
    return psycopg.conninfo.make_conninfo(src.dsn, user=role)


def _plant(src: Source, dsn: str, role: str, code: str = ATTACK, mode: str = "ALWAYS") -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(code.replace("{role}", role).replace("{mode}", mode).encode())


def _alice(src: Source, dsn: str, statement: str) -> str:
    """alice's session, which the on-call undoes."""
    with psycopg.connect(dsn, autocommit=True) as c:
        sid = session_id(c)
        c.execute(statement.encode())
    src.capture()
    return sid


def _super(src: Source, role: str) -> bool:
    return src.sql("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)) == [(True,)]


def _psql(src: Source, script: str) -> subprocess.CompletedProcess[str]:
    return src.psql(script, "-v", "ON_ERROR_STOP=1")


def test_always_trigger_is_refused_by_apply(source):
    """The attack as found: alice deletes notes, on-call (superuser) undoes her session with
    --apply. Before the fix the rows came back and mallory was superuser. Now it refuses
    (exit 1, the trigger named with its function's owner and the fix), printing refuses too
    (nothing on stdout), and --fire-triggers (the opt-in) runs it, her trigger with it."""
    mallory, mdsn, adsn = _roles(source)
    _plant(source, mdsn, mallory)
    sid = _alice(source, adsn, "DELETE FROM notes WHERE id IN (1, 2)")
    applied = source.undo_cli("session", sid, "--apply")
    assert applied.returncode == 1, applied.stderr
    assert "Traceback" not in applied.stderr
    assert (
        f"public.notes: trigger zz_trojan (ENABLE ALWAYS) runs mal.trojan(), owned by {mallory}"
        in applied.stderr
    )
    assert "ALTER TABLE public.notes DISABLE TRIGGER zz_trojan;" in applied.stderr
    assert "--fire-triggers" in applied.stderr
    assert source.sql("SELECT id FROM notes ORDER BY id") == [(3,)]
    assert not _super(source, mallory)
    assert source.sql("SELECT count(*) FROM undo.ledger") == [(0,)]

    printed = source.undo_cli("session", sid)
    assert printed.returncode == 1 and printed.stdout == ""
    assert "trigger zz_trojan (ENABLE ALWAYS)" in printed.stderr

    # the opt-in: user triggers fire, as the role undoing (here: what mallory wanted)
    fired = source.undo_cli("session", sid, "--apply", "--fire-triggers")
    assert fired.returncode == 0, fired.stderr
    assert source.sql("SELECT id FROM notes ORDER BY id") == [(1,), (2,), (3,)]
    assert _super(source, mallory)


def test_always_trigger_is_refused_by_the_printed_script(source):
    """The script is printed before mallory plants her trigger and run later with psql, as
    on-call runs it: its guard refuses before anything is written (before the fix: the rows came
    back and mallory was superuser). Once the trigger is disabled, the same script runs."""
    mallory, mdsn, adsn = _roles(source)
    sid = _alice(source, adsn, "DELETE FROM notes WHERE id IN (1, 2)")
    script = source.undo_cli("session", sid)
    assert script.returncode == 0, script.stderr
    assert "ERRCODE = 'UN002'" in script.stdout
    _plant(source, mdsn, mallory)
    ran = _psql(source, script.stdout)
    assert ran.returncode != 0
    assert "trigger zz_trojan (ENABLE ALWAYS) runs mal.trojan()" in ran.stderr
    assert source.sql("SELECT id FROM notes ORDER BY id") == [(3,)]
    assert not _super(source, mallory)
    assert source.sql("SELECT count(*) FROM undo.ledger") == [(0,)]
    source.sql("ALTER TABLE notes DISABLE TRIGGER zz_trojan")  # the fix the refusal names
    again = _psql(source, script.stdout)
    assert again.returncode == 0, again.stderr
    assert source.sql("SELECT id FROM notes ORDER BY id") == [(1,), (2,), (3,)]
    assert not _super(source, mallory)


def test_replica_trigger_fires_only_in_replica_mode_so_it_is_refused(pgo):
    """ENABLE REPLICA: silent in a plain session, it fires under session_replication_role =
    replica, i.e. in exactly the undo. Refused by --apply and by the script; after the fix the
    refusal names (ALTER TABLE ... DISABLE TRIGGER), the undo runs and nothing of hers ran."""
    mallory, mdsn, adsn = _roles(pgo)
    _plant(pgo, mdsn, mallory, mode="REPLICA")
    sid = _alice(pgo, adsn, "UPDATE notes SET body = 'x'")
    printed = pgo.undo_cli("session", sid)
    assert printed.returncode == 1 and printed.stdout == ""
    assert "trigger zz_trojan (ENABLE REPLICA)" in printed.stderr
    applied = pgo.undo_cli("session", sid, "--apply")
    assert applied.returncode == 1
    assert "trigger zz_trojan (ENABLE REPLICA)" in applied.stderr
    assert pgo.sql("SELECT DISTINCT body FROM notes") == [("x",)]
    assert not _super(pgo, mallory)
    # --fire-triggers: no replica mode, so a REPLICA trigger stays quiet
    script = pgo.undo_cli("session", sid, "--fire-triggers")
    assert script.returncode == 0, script.stderr
    assert "--fire-triggers, user triggers fire" in script.stdout  # its guard skips triggers
    pgo.sql("ALTER TABLE notes DISABLE TRIGGER zz_trojan")  # the fix the refusal names
    ok = pgo.undo_cli("session", sid, "--apply")
    assert ok.returncode == 0, ok.stderr
    assert pgo.sql("SELECT body FROM notes ORDER BY id") == [("a",), ("b",), ("c",)]
    assert not _super(pgo, mallory)


def test_always_rule_is_refused(pgo):
    """A rule ENABLE ALWAYS whose action calls her function: an UPDATE's undo rewritten to run
    it as the role undoing. Refused by --apply and by printing, and a script printed before the
    rule refuses in psql."""
    mallory, mdsn, adsn = _roles(pgo)
    sid = _alice(pgo, adsn, "UPDATE notes SET body = 'x' WHERE id = 1")
    script = pgo.undo_cli("session", sid)
    assert script.returncode == 0, script.stderr
    _plant(pgo, mdsn, mallory, code=RULE)
    applied = pgo.undo_cli("session", sid, "--apply")
    assert applied.returncode == 1, applied.stderr
    assert (
        f"public.notes: rule zz_rule (ENABLE ALWAYS), owned by {mallory} (the table's owner)"
        in applied.stderr
    )
    assert "ALTER TABLE public.notes DISABLE RULE zz_rule;" in applied.stderr
    assert not _super(pgo, mallory)
    printed = pgo.undo_cli("session", sid)
    assert printed.returncode == 1 and "rule zz_rule (ENABLE ALWAYS)" in printed.stderr
    ran = _psql(pgo, script.stdout)
    assert ran.returncode != 0 and "rule zz_rule (ENABLE ALWAYS)" in ran.stderr
    assert pgo.sql("SELECT body FROM notes WHERE id = 1") == [("x",)]
    assert not _super(pgo, mallory)
    pgo.sql("ALTER TABLE notes ENABLE REPLICA RULE zz_rule")
    replica = pgo.undo_cli("session", sid, "--apply")
    assert replica.returncode == 1 and "rule zz_rule (ENABLE REPLICA)" in replica.stderr
    assert not _super(pgo, mallory)


def test_rewinds_refuse_too(pgo):
    """undo table --to (apply and print) and --as-of (a rewind rolled back) write the table:
    refused the same way; --fire-triggers is the opt-in for each."""
    mallory, mdsn, adsn = _roles(pgo)
    at = pgo.now()
    _alice(pgo, adsn, "DELETE FROM notes WHERE id = 1")
    _plant(pgo, mdsn, mallory)
    for args in (("--to", at, "--apply"), ("--to", at), ("--as-of", at)):
        got = pgo.undo_cli("table", "public.notes", *args)
        assert got.returncode == 1, (args, got.stderr)
        assert "trigger zz_trojan (ENABLE ALWAYS)" in got.stderr, args
        assert "Traceback" not in got.stderr
        assert not _super(pgo, mallory), args
    assert pgo.sql("SELECT id FROM notes ORDER BY id") == [(2,), (3,)]
    seen = pgo.undo_cli("table", "public.notes", "--as-of", at, "--fire-triggers")
    assert seen.returncode == 0, seen.stderr
    assert pgo.sql("SELECT id FROM notes ORDER BY id") == [(2,), (3,)]  # rolled back


def test_a_name_holding_the_guards_quote_tag_cannot_end_it(pgo):
    """The guard is dollar-quoted and names the tables: a table named with the tag in it
    ($undo$, then $undo_$) gets a longer tag, so the script still runs as printed."""
    pgo.sql('CREATE TABLE "t$undo$ $undo_$" (id int PRIMARY KEY)')
    pgo.init()
    pgo.sql('INSERT INTO "t$undo$ $undo_$" VALUES (1)')
    sid = _as_session(pgo, 'DELETE FROM "t$undo$ $undo_$"')
    pgo.capture()
    script = pgo.undo_cli("session", sid)
    assert script.returncode == 0, script.stderr
    assert "DO $undo__$" in script.stdout
    ran = _psql(pgo, script.stdout)
    assert ran.returncode == 0, ran.stderr
    assert pgo.sql('SELECT id FROM "t$undo$ $undo_$"') == [(1,)]


# -- the table owner's own code in what PostgreSQL evaluates as the undo writes ---------------

#: her function: as a superuser it makes her one; as anyone it notes who ran it (mal.seen)
OK = """
CREATE TABLE mal.seen (who text);
GRANT INSERT ON mal.seen TO PUBLIC;
GRANT USAGE ON SCHEMA mal TO PUBLIC;
CREATE FUNCTION mal.act() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN INSERT INTO mal.seen VALUES (current_user);
IF (SELECT rolsuper FROM pg_roles WHERE rolname=current_user) THEN EXECUTE 'alter role {role} superuser'; END IF; RETURN true; END $$;
CREATE FUNCTION mal.ok(v text) RETURNS boolean IMMUTABLE LANGUAGE plpgsql AS $$ BEGIN RETURN mal.act(); END $$;
"""  # noqa: E501

#: where she puts it: (what the refusal calls it, the SQL that puts it there)
PLACES = {
    "check": (
        "check constraint body_ok calls mal.ok(v text)",
        "ALTER TABLE public.notes ADD CONSTRAINT body_ok CHECK (mal.ok(body))",
    ),
    "operator": (
        "check constraint body_eq calls mal.eq(text, text) (operator mal.===(text,text))",
        "CREATE FUNCTION mal.eq(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT mal.ok($1)';"
        " CREATE OPERATOR mal.=== (FUNCTION = mal.eq, LEFTARG = text, RIGHTARG = text);"
        " ALTER TABLE public.notes ADD CONSTRAINT body_eq CHECK (body OPERATOR(mal.===) body)",
    ),
    "generated": (
        "generated column g calls mal.ok(v text)",
        "ALTER TABLE public.notes ADD COLUMN g boolean GENERATED ALWAYS AS (mal.ok(body)) STORED",
    ),
    "index": (
        "index notes_ok calls mal.ok(v text)",
        "CREATE INDEX notes_ok ON public.notes ((mal.ok(body)))",
    ),
    "partial index": (
        "index notes_part calls mal.ok(v text)",
        "CREATE INDEX notes_part ON public.notes (id) WHERE mal.ok(body)",
    ),
}


@pytest.mark.parametrize("place", sorted(PLACES))
def test_her_function_in_what_an_insert_evaluates_is_refused(pgo, place):
    """mallory puts her function in a CHECK, an operator of hers in a CHECK, a generated
    column, an index expression, a partial index's predicate: PostgreSQL runs it as the role
    writing, so the on-call's undo of alice's delete (a superuser) would make her superuser.
    --apply, printing and a script printed before she planted it refuse (one line: table, what,
    the function and its owner, the opt-in); --trust-owner mallory is the opt-in, and with it
    her function does run as the on-call (what PostgreSQL does: pinned here)."""
    said, plant = PLACES[place]
    mallory, mdsn, adsn = _roles(pgo)
    sid = _alice(pgo, adsn, "DELETE FROM notes WHERE id IN (1, 2)")
    script = pgo.undo_cli("session", sid)
    assert script.returncode == 0, script.stderr
    _plant(pgo, mdsn, mallory, code=OK + plant)
    line = f"public.notes: {said}, owned by {mallory}, as the role undoing: review it, then"
    line += f" undo with --trust-owner {mallory}"
    applied = pgo.undo_cli("session", sid, "--apply")
    assert applied.returncode == 1, applied.stderr
    assert line in applied.stderr, applied.stderr
    assert "Traceback" not in applied.stderr
    printed = pgo.undo_cli("session", sid)
    assert printed.returncode == 1 and printed.stdout == ""
    assert line in printed.stderr
    ran = _psql(pgo, script.stdout)
    assert ran.returncode != 0 and line in ran.stderr, ran.stderr
    assert pgo.sql("SELECT id FROM notes ORDER BY id") == [(3,)]
    assert not _super(pgo, mallory)
    assert pgo.sql("SELECT count(*) FROM undo.ledger") == [(0,)]
    # --fire-triggers is no opt-in for this
    fired = pgo.undo_cli("session", sid, "--apply", "--fire-triggers")
    assert fired.returncode == 1 and line in fired.stderr
    assert not _super(pgo, mallory)
    # the opt-in: her function runs, as the on-call (PostgreSQL's doing)
    trusted = pgo.undo_cli("session", sid, "--apply", "--trust-owner", mallory)
    assert trusted.returncode == 0, trusted.stderr
    assert pgo.sql("SELECT id FROM notes ORDER BY id") == [(1,), (2,), (3,)]
    assert _super(pgo, mallory)


def test_a_domain_deep_in_a_columns_type_is_refused(pgo):
    """Her CHECK on a domain (NOT VALID: no row is checked when she adds it) that another domain
    is over, an attribute of a composite type of which the column is an array: the undo's insert
    of the row (its text cast back to public.pair[]) runs it, as the role undoing. Refused,
    naming the column, the domain and the constraint; --trust-owner runs it (pinned: she is
    superuser after)."""
    pgo.sql(
        "CREATE DOMAIN public.inner_d AS text; CREATE DOMAIN public.outer_d AS public.inner_d;"
        " CREATE TYPE public.pair AS (a public.outer_d, b int)"
    )
    mallory, mdsn, adsn = _roles(pgo, "id int PRIMARY KEY, body text, tag public.pair[]")
    pgo.sql("UPDATE notes SET tag = ARRAY[ROW('x', 1)]::public.pair[]")
    with pgo.connect() as c:
        c.execute(
            sql.SQL("ALTER DOMAIN public.inner_d OWNER TO {}").format(sql.Identifier(mallory))
        )
    sid = _alice(pgo, adsn, "DELETE FROM notes WHERE id IN (1, 2)")
    plant = "ALTER DOMAIN public.inner_d ADD CONSTRAINT inner_ok CHECK (mal.ok(VALUE)) NOT VALID"
    _plant(pgo, mdsn, mallory, code=OK + plant)
    line = (
        "public.notes: column tag's type public.inner_d, constraint inner_ok calls mal.ok(v text),"
        f" owned by {mallory}, as the role undoing: review it, then undo with --trust-owner"
        f" {mallory}"
    )
    for args in (("--apply",), ()):
        got = pgo.undo_cli("session", sid, *args)
        assert got.returncode == 1 and line in got.stderr, (args, got.stderr)
    assert pgo.sql("SELECT count(*) FROM mal.seen") == [(0,)]
    assert not _super(pgo, mallory)
    trusted = pgo.undo_cli("session", sid, "--apply", "--trust-owner", mallory)
    assert trusted.returncode == 0, trusted.stderr
    assert pgo.sql("SELECT count(*) FROM notes WHERE (tag[1]).a = 'x'") == [(3,)]
    assert _super(pgo, mallory)


def test_her_policy_runs_as_an_operator_it_applies_to(pgo):
    """Row security: her policy's WITH CHECK calls her function. A superuser bypasses row
    security (nothing of hers runs: not refused), but an on-call who is no superuser, no
    BYPASSRLS and not the table's owner runs the policy as herself (pinned with --trust-owner:
    mal.seen records oncall): refused."""
    mallory, mdsn, adsn = _roles(pgo)
    oncall = f"oncall_{pgo.dbname}"
    dsn = _oncall(pgo)
    sid = _alice(pgo, adsn, "DELETE FROM notes WHERE id IN (1, 2)")
    policy = (
        "ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;"
        " CREATE POLICY p ON public.notes USING (true) WITH CHECK (mal.ok(body))"
    )
    _plant(pgo, mdsn, mallory, code=OK + policy)
    assert pgo.undo_cli("session", sid).returncode == 0  # the superuser: no row security
    line = (
        f"public.notes: policy p calls mal.ok(v text), owned by {mallory}, as the role undoing:"
        f" review it, then undo with --trust-owner {mallory}"
    )
    for args in (("--apply",), ()):
        got = pgo.undo_cli("--dsn", dsn, "session", sid, "--fire-triggers", *args)
        assert got.returncode == 1 and line in got.stderr, (args, got.stderr)
    assert pgo.sql("SELECT count(*) FROM mal.seen") == [(0,)]
    trusted = pgo.undo_cli(
        "--dsn", dsn, "session", sid, "--apply", "--fire-triggers", "--trust-owner", mallory
    )
    assert trusted.returncode == 0, trusted.stderr
    assert pgo.sql("SELECT DISTINCT who FROM mal.seen") == [(oncall,)]
    assert pgo.sql("SELECT id FROM notes ORDER BY id") == [(1,), (2,), (3,)]


def test_rewinds_refuse_her_check_too(pgo):
    """undo table --to (apply and print) and --as-of run the same check; --trust-owner is the
    opt-in for each."""
    mallory, mdsn, adsn = _roles(pgo)
    at = pgo.now()
    _alice(pgo, adsn, "DELETE FROM notes WHERE id = 1")
    _plant(pgo, mdsn, mallory, code=OK + PLACES["check"][1])
    for args in (("--to", at, "--apply"), ("--to", at), ("--as-of", at)):
        got = pgo.undo_cli("table", "public.notes", *args)
        assert got.returncode == 1, (args, got.stderr)
        assert "check constraint body_ok calls mal.ok(v text)" in got.stderr, args
        assert "Traceback" not in got.stderr
    assert not _super(pgo, mallory)
    assert pgo.sql("SELECT id FROM notes ORDER BY id") == [(2,), (3,)]
    seen = pgo.undo_cli("table", "public.notes", "--as-of", at, "--trust-owner", mallory)
    assert seen.returncode == 0, seen.stderr
    assert pgo.sql("SELECT id FROM notes ORDER BY id") == [(2,), (3,)]  # rolled back


def test_a_default_of_a_column_the_undo_writes_never_runs(pgo):
    """The undo names every column the captured table had in its inserts: her function as the
    default of one of them is never evaluated (pinned: she is no superuser after the undo), so
    it is not refused; one added since (PLACES["default"]) is."""
    mallory, mdsn, adsn = _roles(pgo)
    sid = _alice(pgo, adsn, "DELETE FROM notes WHERE id IN (1, 2)")
    _plant(pgo, mdsn, mallory, code=OK + "ALTER TABLE notes ALTER body SET DEFAULT mal.ok('x')")
    for args in ((), ("--apply",)):
        got = pgo.undo_cli("session", sid, *args)
        assert got.returncode == 0, (args, got.stderr)
    assert pgo.sql("SELECT id, body FROM notes ORDER BY id") == [(1, "a"), (2, "b"), (3, "c")]
    assert pgo.sql("SELECT count(*) FROM mal.seen") == [(0,)]
    assert not _super(pgo, mallory)


def test_a_default_of_a_column_added_after_printing_is_refused_by_the_script(pgo):
    """A script printed before she adds a column whose default calls her function: its inserts
    leave that column to its default (--apply refuses a table whose columns changed since
    capture; the script, printed before, cannot know). Its guard refuses; once she drops the
    default, it runs."""
    mallory, mdsn, adsn = _roles(pgo)
    sid = _alice(pgo, adsn, "DELETE FROM notes WHERE id IN (1, 2)")
    script = pgo.undo_cli("session", sid)
    assert script.returncode == 0, script.stderr
    _plant(
        pgo, mdsn, mallory, code=OK + "ALTER TABLE notes ADD COLUMN d boolean DEFAULT mal.ok('x')"
    )
    ran = _psql(pgo, script.stdout)
    line = f"public.notes: default of column d calls mal.ok(v text), owned by {mallory},"
    assert ran.returncode != 0 and line in ran.stderr, ran.stderr
    assert f"review it, then undo with --trust-owner {mallory}" in ran.stderr
    assert not _super(pgo, mallory)
    assert pgo.sql("SELECT id FROM notes ORDER BY id") == [(3,)]
    pgo.sql("ALTER TABLE notes ALTER d DROP DEFAULT")
    again = _psql(pgo, script.stdout)
    assert again.returncode == 0, again.stderr
    assert pgo.sql("SELECT id, d FROM notes ORDER BY id") == [(1, None), (2, None), (3, True)]
    assert not _super(pgo, mallory)


#: her function reached with no dependency on it: through SQL text a pg_catalog function runs
SQL_TEXT = "pg_catalog.query_to_xml('select mal.ok(''x'')', true, true, '') IS NOT NULL"


@pytest.mark.parametrize(
    ("place", "said"),
    [
        (
            f"ALTER TABLE public.notes ADD CONSTRAINT body_qx CHECK ({SQL_TEXT})",
            "check constraint body_qx calls pg_catalog.query_to_xml(query text, nulls boolean,"
            " tableforest boolean, targetns text), which runs SQL given as text or sets what"
            " later statements run, written by {mallory}",
        ),
        (
            "ALTER TABLE public.notes ADD CONSTRAINT body_tsr CHECK (pg_catalog.ts_rewrite("
            "'a'::tsquery, 'select ''a''::tsquery, mal.ok(''x'')::text::tsquery') IS NOT NULL)",
            "check constraint body_tsr calls pg_catalog.ts_rewrite(tsquery, text), which runs SQL",
        ),
        (
            "ALTER TABLE public.notes ADD CONSTRAINT body_path CHECK"
            " (pg_catalog.set_config('search_path', 'mal, pg_catalog', true) IS NOT NULL)",
            "check constraint body_path calls pg_catalog.set_config(",
        ),
        (
            f"ALTER DOMAIN public.qx ADD CONSTRAINT qx_ok CHECK ({SQL_TEXT}) NOT VALID",
            "column tag's type public.qx, constraint qx_ok calls pg_catalog.query_to_xml(",
        ),
    ],
)
def test_her_function_through_sql_text_is_refused(pgo, place, said):
    """Red team 6: her function reached through pg_catalog.query_to_xml('select mal.ok(...)'),
    whose owner is a superuser and which has no dependency on hers, in a CHECK or a domain's
    CHECK: not refused, and the printed script run by a superuser made her one. A set_config of
    search_path in a CHECK would make undo's later statements resolve her operators first.
    Whoever wrote the call is what is trusted or not."""
    pgo.sql("CREATE DOMAIN public.qx AS text")
    mallory, mdsn, adsn = _roles(pgo, "id int PRIMARY KEY, body text, tag public.qx")
    with pgo.connect() as c:
        c.execute(sql.SQL("ALTER DOMAIN public.qx OWNER TO {}").format(sql.Identifier(mallory)))
    sid = _alice(pgo, adsn, "DELETE FROM notes WHERE id IN (1, 2)")
    _plant(pgo, mdsn, mallory, code=OK + place)
    for args in (("--apply",), ()):
        got = pgo.undo_cli("session", sid, *args)
        assert got.returncode == 1, (args, got.stderr)
        assert said.format(mallory=mallory) in got.stderr, got.stderr
    # (her CHECK ran once as herself when she added it)
    assert pgo.sql("SELECT count(*) FROM mal.seen WHERE who <> %s", (mallory,)) == [(0,)]
    assert not _super(pgo, mallory)
    assert pgo.sql("SELECT id FROM notes ORDER BY id") == [(3,)]


def test_her_function_through_a_view_her_policy_reads_is_refused(pgo):
    """Red team 6: her policy reads her view, which calls her function: the policy depends on
    the view only, and a view's functions run as the role reading it. An on-call to whom row
    security applies ran it (mal.seen: oncall)."""
    mallory, mdsn, adsn = _roles(pgo)
    dsn = _oncall(pgo)
    sid = _alice(pgo, adsn, "DELETE FROM notes WHERE id IN (1, 2)")
    policy = (
        "CREATE VIEW mal.v AS SELECT mal.ok('v') AS ok; GRANT SELECT ON mal.v TO PUBLIC;"
        " ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;"
        " CREATE POLICY p ON public.notes USING (true)"
        " WITH CHECK (EXISTS (SELECT 1 FROM mal.v WHERE ok))"
    )
    _plant(pgo, mdsn, mallory, code=OK + policy)
    said = f"public.notes: policy p calls mal.ok(v text), owned by {mallory}, as the role undoing"
    for args in (("--apply",), ()):
        got = pgo.undo_cli("--dsn", dsn, "session", sid, "--fire-triggers", *args)
        assert got.returncode == 1 and said in got.stderr, (args, got.stderr)
    assert pgo.sql("SELECT count(*) FROM mal.seen") == [(0,)]
    assert pgo.sql("SELECT id FROM notes ORDER BY id") == [(3,)]


def _oncall(src: Source) -> str:
    """A member of undo_operator who is no superuser, to whom row security applies: its dsn."""
    oncall = f"oncall_{src.dbname}"
    with src.connect() as c:
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(oncall)))
        c.execute(sql.SQL("GRANT undo_operator TO {}").format(sql.Identifier(oncall)))
        c.execute(sql.SQL("GRANT ALL ON notes TO {}").format(sql.Identifier(oncall)))
    return _dsn(src, oncall)


def test_a_trusted_extensions_sql_runner_in_her_policy_is_refused(pgo):
    """Red team 7: tablefunc is a trusted extension, so she installs it with CREATE on the
    database; its crosstab(text), owned by the bootstrap superuser, runs her SQL, here from her
    policy, as an on-call to whom row security applies."""
    mallory, mdsn, adsn = _roles(pgo)
    with pgo.connect() as c:
        c.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(pgo.dbname), sql.Identifier(mallory)
            )
        )
    dsn = _oncall(pgo)
    sid = _alice(pgo, adsn, "DELETE FROM notes WHERE id IN (1, 2)")
    policy = (
        "CREATE EXTENSION tablefunc SCHEMA mal;"
        " ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;"
        " CREATE POLICY p ON public.notes USING (true) WITH CHECK ((SELECT count(*) FROM"
        " mal.crosstab('select 1::text, 1::text, mal.ok(''x'')::text') AS ct(a text, b text))"
        " >= 0)"
    )
    _plant(pgo, mdsn, mallory, code=OK + policy)
    said = "public.notes: policy p calls mal.crosstab(text), which runs SQL given as text"
    for args in (("--apply",), ()):
        got = pgo.undo_cli("--dsn", dsn, "session", sid, "--fire-triggers", *args)
        assert got.returncode == 1 and said in got.stderr, (args, got.stderr)
    assert pgo.sql("SELECT count(*) FROM mal.seen") == [(0,)]


def test_as_of_a_table_with_no_change_since_refuses_her_policy_too(pgo):
    """Red team 7: --as-of of a table the store has no change of since the time reads it as it
    is, with no rewind, and so with no check: her policy's function ran as the on-call."""
    mallory, mdsn, adsn = _roles(pgo)
    dsn = _oncall(pgo)
    _alice(pgo, adsn, "DELETE FROM notes WHERE id = 1")
    at = pgo.now()
    policy = (
        "ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;"
        " CREATE POLICY p ON public.notes USING (mal.ok(body))"
    )
    _plant(pgo, mdsn, mallory, code=OK + policy)
    got = pgo.undo_cli("--dsn", dsn, "table", "public.notes", "--as-of", at)
    assert got.returncode == 1, got.stderr
    assert "policy p calls mal.ok(v text)" in got.stderr
    assert pgo.sql("SELECT count(*) FROM mal.seen") == [(0,)]


def test_apply_writes_a_table_with_row_security_as_the_script_does(pgo):
    """Red team 7: --apply of deletes by an on-call to whom row security applies failed with
    "COPY FROM not supported with row-level security" (its COPY straight into the table),
    where the printed script, which inserts, committed."""
    if pgo.sql("SELECT current_setting('server_version_num')::int")[0][0] < 150000:
        pytest.skip(
            "GRANT SET ON PARAMETER, which lets a non-superuser undo without"
            " --fire-triggers (the COPY path), is PostgreSQL 15+"
        )
    _mallory, _mdsn, adsn = _roles(pgo)
    dsn = _oncall(pgo)
    pgo.sql(
        "ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;"
        " CREATE POLICY p ON public.notes USING (true) WITH CHECK (true);"
        f" GRANT SET ON PARAMETER session_replication_role TO oncall_{pgo.dbname}"
    )
    sid = _alice(pgo, adsn, "DELETE FROM notes WHERE id IN (1, 2)")
    got = pgo.undo_cli("--dsn", dsn, "session", sid, "--apply")
    assert got.returncode == 0, got.stderr
    assert pgo.sql("SELECT id FROM notes ORDER BY id") == [(1,), (2,), (3,)]
