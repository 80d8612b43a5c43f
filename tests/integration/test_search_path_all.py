"""No SQL undo runs on the source resolves a name through the caller's search_path.

mallory (LOGIN, CREATE on schema public: every role's on PostgreSQL 14) defines functions in
public that beat pg_catalog's by an exact argument type: public.quote_ident(name) (undo init's
and status's table names), public.format(text, name, name) (health's '%I.%I'),
public.unnest(text[]) (init's publication schemas); and the operator public.=(oid, integer)
(and smallint, bigint: psycopg sends a Python int as the smallest type that holds it), which
beats pg_catalog's oid = oid wherever an OID is compared with a parameter (capture's catalog
reads). Each draws from her sequence (nextval is not rolled back) and returns what pg_catalog's
would, so nothing else shows. Every connection undo opens to the source pins search_path =
pg_catalog, pg_temp as soon as it is open (undo/source/pg.py, connect), so none of them runs in
`undo init`, `capture`, `check` or `status`, whoever runs them."""

from __future__ import annotations

import psycopg
from psycopg import sql

from tests.conftest import Source

#: mallory's functions: each notes that it ran, then does what pg_catalog's does
SHADOWS = """
CREATE SEQUENCE mal.hits;
GRANT USAGE ON SCHEMA mal TO PUBLIC;
GRANT USAGE, UPDATE ON SEQUENCE mal.hits TO PUBLIC;
CREATE FUNCTION public.quote_ident(name) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_catalog.nextval('mal.hits'::pg_catalog.regclass);
  RETURN pg_catalog.quote_ident($1::pg_catalog.text); END $$;
CREATE FUNCTION public.format(text, name, name) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_catalog.nextval('mal.hits'::pg_catalog.regclass);
  RETURN pg_catalog.format($1, $2, $3); END $$;
CREATE FUNCTION public.unnest(text[]) RETURNS SETOF text LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_catalog.nextval('mal.hits'::pg_catalog.regclass);
  RETURN QUERY SELECT pg_catalog.unnest($1); END $$;
CREATE FUNCTION mal.oid_eq(oid, bigint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_catalog.nextval('mal.hits'::pg_catalog.regclass);
  RETURN $1 OPERATOR(pg_catalog.=) $2::pg_catalog.oid; END $$;
CREATE OPERATOR public.= (FUNCTION = mal.oid_eq, LEFTARG = oid, RIGHTARG = bigint);
CREATE FUNCTION mal.oid_eq(oid, integer) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_catalog.nextval('mal.hits'::pg_catalog.regclass);
  RETURN $1 OPERATOR(pg_catalog.=) $2::pg_catalog.oid; END $$;
CREATE OPERATOR public.= (FUNCTION = mal.oid_eq, LEFTARG = oid, RIGHTARG = integer);
CREATE FUNCTION mal.oid_eq(oid, smallint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_catalog.nextval('mal.hits'::pg_catalog.regclass);
  RETURN $1 OPERATOR(pg_catalog.=) $2::pg_catalog.oid; END $$;
CREATE OPERATOR public.= (FUNCTION = mal.oid_eq, LEFTARG = oid, RIGHTARG = smallint);
"""


def _mallory(src: Source) -> str:
    """Her role (CREATE on public, her schema mal) and her shadowing functions; accounts (a
    table of public, audited) and scratch (unlogged: init and status name it) exist. Returns
    her dsn."""
    mallory = f"mallory_{src.dbname}"
    src.sql("CREATE TABLE IF NOT EXISTS public.accounts (id int PRIMARY KEY, balance int)")
    src.sql("CREATE UNLOGGED TABLE IF NOT EXISTS public.scratch (id int PRIMARY KEY)")
    with src.connect() as c:
        role = sql.Identifier(mallory)
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
        c.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(role))  # PG 14's default
        c.execute(sql.SQL("CREATE SCHEMA mal AUTHORIZATION {}").format(role))
    dsn = psycopg.conninfo.make_conninfo(src.dsn, user=mallory)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(SHADOWS.encode())
    return dsn


def _ran(src: Source) -> bool:
    """Whether any of her functions ran (as anyone)."""
    return src.sql("SELECT is_called FROM mal.hits") == [(True,)]


def _her_functions_work(src: Source) -> None:
    """They are found where the search_path has public (the attack is live), then reset."""
    assert src.sql("SELECT quote_ident('x'::name)") == [("x",)]
    assert _ran(src)
    src.sql("SELECT setval('mal.hits', 1, false)")
    assert not _ran(src)


def test_init_runs_no_function_of_hers(source):
    """`undo init` as the superuser, on a database where she planted them first (and again:
    the second init finds everything in place)."""
    _mallory(source)
    _her_functions_work(source)
    for _ in range(2):
        got = source.undo_cli("init")
        assert got.returncode == 0, got.stderr
        assert not _ran(source)
    assert "scratch" in got.stderr + got.stdout  # the unlogged table was named (quote_ident)


def test_capture_runs_no_function_of_hers(source):
    """`undo capture --once` after init: its catalog reads, the slot checks, the stream."""
    source.init()
    _mallory(source)
    _her_functions_work(source)
    source.sql("INSERT INTO accounts SELECT i, i FROM generate_series(1, 5) i")
    got = source.undo_cli("capture", "--once")
    assert got.returncode == 0, got.stderr
    assert not _ran(source)
    assert source.store_rows("SELECT count(*) FROM changes") == [(5,)]


def test_check_runs_no_function_of_hers(source):
    """`undo check` after init and capture."""
    source.init()
    source.capture()
    _mallory(source)  # scratch, made now: an unaudited, unlogged table check names
    _her_functions_work(source)
    got = source.undo_cli("check")
    assert got.returncode in (0, 1), got.stderr  # 1: check found scratch
    assert "scratch" in got.stdout + got.stderr
    assert "Traceback" not in got.stderr
    assert not _ran(source)


def test_status_runs_no_function_of_hers(pgo):
    """`undo status`, text and JSON, after init and capture."""
    pgo.init()
    pgo.capture()
    _mallory(pgo)
    _her_functions_work(pgo)
    for args in (["status"], ["status", "--json"]):
        got = pgo.undo_cli(*args)
        assert got.returncode in (0, 1), got.stderr
        assert "Traceback" not in got.stderr
        assert not _ran(pgo), args
