"""An undo never runs another role's functions or operators through the search_path.

The red team's attack: mallory, who may write to accounts (owned by the tests' superuser, the
on-call) and has CREATE on schema public (every role has, on PostgreSQL 14), defines
public.concat(integer). Its exact type beats pg_catalog.concat(VARIADIC "any"), which undo's SQL
called unqualified, so her function ran as the operator in every undo that compared a row (a
keyless table, a row touched since), in rewinds and 38 times in one `--as-of`. Her function here
does what she wanted (ALTER ROLE ... SUPERUSER) and, to know it ran at all, draws from her
sequence (nextval is not rolled back, so it shows in a rewind rolled back too) and writes a file
on the server (COPY TO runs in a read-only transaction too, as the red team's COPY TO PROGRAM
did in `--as-of`). Every undo pins
search_path = pg_catalog, pg_temp first in its transaction and in the script it prints."""

from __future__ import annotations

import contextlib
import os

import psycopg
from psycopg import sql

from tests.conftest import Source
from tests.integration.test_owner_code import ATTACK, _alice, _plant, _psql, _roles, _super
from undo.source.pg import session_id

#: mallory's function, as found (plus the sequence that says it ran)
CONCAT = """
CREATE FUNCTION public.concat(integer) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  BEGIN PERFORM pg_catalog.nextval('mal.hits'::pg_catalog.regclass);
  EXCEPTION WHEN OTHERS THEN NULL; END;
  BEGIN EXECUTE 'ALTER ROLE {role} SUPERUSER';
  EXCEPTION WHEN OTHERS THEN NULL; END;
  BEGIN EXECUTE 'COPY (SELECT 1) TO ''{hit}''';
  EXCEPTION WHEN OTHERS THEN NULL; END;
  RETURN $1::text;
END $$;
"""


def _mallory(src: Source, keyless: bool = False) -> tuple[str, str]:
    """accounts (the superuser's; 20 rows) that mallory may write, CREATE on public for her,
    her schema mal and sequence mal.hits. Returns (her role, her dsn)."""
    mallory = f"mallory_{src.dbname}"
    with contextlib.suppress(FileNotFoundError):
        os.remove(_hit(src))
    key = "" if keyless else " PRIMARY KEY"
    src.sql(f"CREATE TABLE public.accounts (id int{key}, owner text, balance int)")
    if keyless:
        src.sql("ALTER TABLE accounts REPLICA IDENTITY FULL")
    src.init()
    src.sql("INSERT INTO accounts SELECT i, 'o' || i, 100 + i FROM generate_series(1, 20) i")
    with src.connect() as c:
        role = sql.Identifier(mallory)
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
        c.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON accounts TO {}").format(role))
        c.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(role))  # PG 14's default
        c.execute(sql.SQL("CREATE SCHEMA mal AUTHORIZATION {}").format(role))
    dsn = psycopg.conninfo.make_conninfo(src.dsn, user=mallory)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE SEQUENCE mal.hits")
        c.execute(CONCAT.replace("{role}", mallory).replace("{hit}", _hit(src)).encode())
    return mallory, dsn


def _script(src: Source, dsn: str) -> str:
    """mallory's session (application mal-script), then a same-value touch of row 1 (its xmin
    differs from her transaction's, so the undo compares the row's values); captured."""
    with psycopg.connect(dsn, autocommit=True, application_name="mal-script") as c:
        sid = session_id(c)
        c.execute("UPDATE accounts SET balance = 0 WHERE id <= 3")
        c.execute("DELETE FROM accounts WHERE id = 20")
        c.execute("INSERT INTO accounts VALUES (200, 'x', 1)")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
    src.capture()
    return sid


def _hit(src: Source) -> str:
    """The file mallory's function writes on the server (the cluster is this machine's)."""
    return f"/tmp/{src.dbname}.mallory"


def _ran(src: Source) -> bool:
    """Whether mallory's function ran at all (as anyone; the file: as a superuser)."""
    return src.sql("SELECT is_called FROM mal.hits") == [(True,)] or os.path.exists(_hit(src))


EXPECTED = [(i, f"o{i}", 100 + i) for i in range(1, 21)]


def _rows(src: Source) -> list[tuple[int, str, int]]:
    return src.sql("SELECT id, owner, balance FROM accounts ORDER BY id")  # type: ignore[return-value]


def test_apply_runs_no_function_of_hers(source):
    """The repro: `undo session <mal-script> --apply` as the superuser. Before the fix: exit 0
    and mallory was superuser. Now the undo is the same (rows back) and her function never ran."""
    mallory, dsn = _mallory(source)
    sid = _script(source, dsn)
    got = source.undo_cli("session", sid, "--apply")
    assert got.returncode == 0, got.stderr
    assert _rows(source) == EXPECTED
    assert not _ran(source)
    assert not _super(source, mallory)


def test_printed_script_runs_no_function_of_hers(source):
    """The printed script, run by psql as the superuser (whose search_path has public): it pins
    the path first in its transaction, so neither printing nor running it calls her function."""
    mallory, dsn = _mallory(source)
    sid = _script(source, dsn)
    script = source.undo_cli("session", sid)
    assert script.returncode == 0, script.stderr
    ran = _psql(source, script.stdout)
    assert ran.returncode == 0, ran.stderr
    assert _rows(source) == EXPECTED
    assert not _ran(source)
    assert not _super(source, mallory)
    assert "BEGIN;" + chr(10) + "SET LOCAL search_path = pg_catalog, pg_temp;" in script.stdout


def test_keyless_table(source):
    """A keyless table: every row is compared by its values, on every undo."""
    mallory, dsn = _mallory(source, keyless=True)
    sid = _script(source, dsn)
    got = source.undo_cli("session", sid, "--apply")
    assert got.returncode == 0, got.stderr
    assert _rows(source) == EXPECTED
    assert not _ran(source)
    assert not _super(source, mallory)


def test_rewinds_run_no_function_of_hers(pgo):
    """`undo table --as-of` (a rewind rolled back, then the rows read, read-only) and
    `undo table --to` printed, then applied."""
    mallory, dsn = _mallory(pgo)
    at = pgo.now()
    _script(pgo, dsn)
    shown = pgo.undo_cli("table", "accounts", "--as-of", at, "--json")
    assert shown.returncode == 0, shown.stderr
    assert '"balance": "101"' in shown.stdout
    assert not _ran(pgo)
    printed = pgo.undo_cli("table", "accounts", "--to", at)
    assert printed.returncode == 0, printed.stderr
    assert not _ran(pgo)
    applied = pgo.undo_cli("table", "accounts", "--to", at, "--apply")
    assert applied.returncode == 0, applied.stderr
    assert _rows(pgo) == EXPECTED
    assert not _ran(pgo)
    assert not _super(pgo, mallory)


#: a format() of hers, of the exact argument types of the line undo's trigger check formats:
#: NULL for every line, so string_agg found nothing and the check let her ALWAYS trigger fire
FORMAT = """
CREATE FUNCTION public.format(text, name, name, name, text, name, name, text, name, name, name,
                              name) RETURNS text LANGUAGE sql AS $$ SELECT NULL::text $$;
"""


def test_shadowed_format_does_not_silence_the_trigger_check(pgo):
    """mallory owns notes, plants an ENABLE ALWAYS trigger and a format() that blanks the
    check's lines. Before the fix --apply ran (exit 0) and her trigger made her superuser, and
    a script printed before the attack ran as well. Now both refuse (UN002), naming the
    trigger, and nothing of hers ran."""
    mallory, mdsn, adsn = _roles(pgo)
    pgo.sql(f'GRANT CREATE ON SCHEMA public TO "{mallory}"')
    sid = _alice(pgo, adsn, "DELETE FROM notes WHERE id IN (1, 2)")
    script = pgo.undo_cli("session", sid)
    assert script.returncode == 0, script.stderr
    _plant(pgo, mdsn, mallory, code=ATTACK + FORMAT)
    applied = pgo.undo_cli("session", sid, "--apply")
    assert applied.returncode == 1, applied.stderr
    assert "trigger zz_trojan (ENABLE ALWAYS) runs mal.trojan()" in applied.stderr
    assert not _super(pgo, mallory)
    ran = _psql(pgo, script.stdout)
    assert ran.returncode != 0
    assert "trigger zz_trojan (ENABLE ALWAYS) runs mal.trojan()" in ran.stderr
    assert pgo.sql("SELECT id FROM notes ORDER BY id") == [(3,)]
    assert not _super(pgo, mallory)


#: a citext key (its own =, in schema public), an enum of a user schema, a domain over text
#: and a composite: under the pinned path each still compares with its own equality
TYPES = """
CREATE EXTENSION citext;
CREATE SCHEMA app;
CREATE TYPE app.mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN app.label AS text CHECK (VALUE <> '');
CREATE TYPE app.pair AS (a int, b text);
CREATE TABLE public.people (email citext PRIMARY KEY, mood app.mood, tag app.label,
                            p app.pair);
CREATE TABLE public.pets (name app.label PRIMARY KEY, owner citext REFERENCES people,
                          mood app.mood);
"""


def test_user_types_stay_exact(source):
    """Undo of rows of a citext key (and an enum, a domain, a composite) is exact: the rows
    come back as they were; a key back in another case ('BOB@X' for 'bob@x') is the citext
    conflict it is ("a row with this key exists again"), not a text comparison that misses it;
    a pet left referencing a person the undo would take away stops it (the foreign key's own
    citext equality)."""
    source.sql(TYPES)
    source.init()
    source.sql(
        "INSERT INTO people VALUES ('alice@x', 'ok', 'a', '(1,x)'), ('bob@x', 'sad', 'b', '(2,y)')"
    )
    source.sql("INSERT INTO pets VALUES ('rex', 'Alice@X', 'happy')")
    before = source.snapshot("people"), source.snapshot("pets")
    with source.connect(application_name="s") as c:
        sid = session_id(c)
        c.execute(
            "UPDATE people SET mood = 'happy', tag = 'z', p = '(9,q)' WHERE email = 'ALICE@x'"
        )
        c.execute("DELETE FROM people WHERE email = 'bob@x'")
        c.execute("UPDATE pets SET mood = 'sad' WHERE name = 'rex'")
        c.execute("INSERT INTO people VALUES ('carol@x', 'ok', 'c', NULL)")
    source.capture()
    got = source.undo_cli("session", sid, "--apply")
    assert got.returncode == 0, got.stderr
    assert (source.snapshot("people"), source.snapshot("pets")) == before

    # the key back, in another case: the conflict is named, nothing changed
    with source.connect(application_name="s2") as c:
        sid2 = session_id(c)
        c.execute("DELETE FROM people WHERE email = 'bob@x'")
    source.sql("INSERT INTO people VALUES ('BOB@X', 'ok', 'n', NULL)")
    source.capture()
    again = source.undo_cli("session", sid2, "--apply")
    assert again.returncode == 1, again.stderr
    assert "a row with this key exists again" in again.stderr, again.stderr

    # an insert whose undo would leave a pet without its person (referenced in another case)
    with source.connect(application_name="s3") as c:
        sid3 = session_id(c)
        c.execute("INSERT INTO people VALUES ('dan@x', 'ok', 'd', NULL)")
    source.sql("INSERT INTO pets VALUES ('fido', 'DAN@x', 'ok')")
    source.capture()
    fk = source.undo_cli("session", sid3, "--apply")
    assert fk.returncode == 1, fk.stderr
    assert "foreign key" in fk.stderr and "Traceback" not in fk.stderr, fk.stderr
    assert source.sql("SELECT count(*) FROM people WHERE email = 'dan@x'") == [(1,)]


def test_history_runs_no_function_of_hers(pgo):
    """`undo history accounts id=20` reads the value through the source's own type
    (concat(CAST('20' AS integer))): her exact-type concat ran as the operator."""
    mallory, dsn = _mallory(pgo)
    _script(pgo, dsn)
    got = pgo.undo_cli("history", "public.accounts", "id=20")
    assert got.returncode == 0, got.stderr
    assert "delete" in got.stdout.lower(), got.stdout
    assert not _ran(pgo)
    assert not _super(pgo, mallory)
