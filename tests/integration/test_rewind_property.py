"""Property: rewinding tables to a time puts back exactly the rows they held then. Random
tables (keyed, keyless with duplicates, inheritance, partitioned) and types, random writes by
several sessions before and after the time; the reference is the tables read at that time."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from psycopg import sql

from tests.integration.test_undo_property import make_tables, scenario


@settings(max_examples=25)  # deadline and health checks: the profile in tests/conftest.py
@given(case=scenario(), cut=st.integers(0, 14), by_script=st.booleans())
def test_rewind_puts_back_the_rows_as_they_were(source, case, cut, by_script):
    rewind_round_trip(source, case, cut, by_script)


# the same rewind read from a PostgreSQL store (issue #22), fewer examples
@pytest.mark.parametrize("store_kind", ["postgresql"], indirect=True)
@settings(max_examples=8)
@given(case=scenario(), cut=st.integers(0, 14), by_script=st.booleans())
def test_rewind_puts_back_the_rows_as_they_were_from_a_postgresql_store(
    source, case, cut, by_script
):
    rewind_round_trip(source, case, cut, by_script)


def rewind_round_trip(source, case, cut, by_script):
    shape, types, seed, _duplicates, ops = case
    if source.sql("SELECT to_regclass('undo.config')") == [(None,)]:
        source.init()
    values = [v for row in seed for v in row] + [v for op in ops for v in op[3]]
    if not source.nan_restorable():
        assume(not any(isinstance(v, float) and math.isinf(v) for v in values))
    if '"char"' in types and int(source.sql("SHOW server_version_num")[0][0]) < 150000:
        assume(all(not isinstance(v, str) or v.isascii() for v in values))
    tables, all_cols, only, _keyed = make_tables(source, shape, types)
    cols = sql.SQL(", ").join(map(sql.Identifier, all_cols))
    partitioned = shape == "partitioned"

    def write(conn, table, kind, pick, row, key):
        target = sql.SQL("{}{}").format(only, sql.Identifier(table))
        vals = (key, *([key % 4] if partitioned else []), *row)
        one = sql.SQL("(tableoid, ctid) = (SELECT tableoid, ctid FROM {} OFFSET %s LIMIT 1)")
        n = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target)).fetchone()[0]
        if kind == "insert" or n == 0:
            conn.execute(
                sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                    sql.Identifier(table), cols, sql.SQL(", ").join(sql.Placeholder() * len(vals))
                ),
                vals,
            )
        elif kind == "delete":
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE {}").format(target, one.format(target)),
                (pick % n,),
            )
        else:  # every column but the key (the key of a keyed table stays unique)
            settable = all_cols[2 if partitioned else 1 :]
            conn.execute(
                sql.SQL("UPDATE {} SET ({}) = ROW({}) WHERE {}").format(
                    target,
                    sql.SQL(", ").join(map(sql.Identifier, settable)),
                    sql.SQL(", ").join(sql.Placeholder() * len(row)),
                    one.format(target),
                ),
                (*row, pick % n),
            )

    def state():
        with source.connect() as c:
            return {
                t: Counter(
                    r[0]
                    for r in c.execute(
                        sql.SQL("SELECT (SELECT r::text FROM (SELECT {}) r) FROM {}{} x").format(
                            sql.SQL(", ").join(
                                sql.SQL("x.{}").format(sql.Identifier(c)) for c in all_cols
                            ),
                            only,
                            sql.Identifier(t),
                        )
                    )
                )
                for t in tables
            }

    conns = [source.connect(application_name=f"s{i}") for i in range(3)]
    cut %= len(ops) + 1  # the time: before op number cut (after them all: nothing to rewind)
    try:
        key = 0
        for row in seed:
            key += 1
            write(conns[1], tables[0], "insert", 0, row, key)
        for i, op in enumerate([*ops, None]):
            if i == cut:
                at, then = source.now(0.002), state()
            if op is None:
                break
            sess, kind, pick, row, _change_key, _copy = op
            key += 1
            write(conns[sess], tables[pick % len(tables)], kind, pick, row, key)
    finally:
        for c in conns:
            c.close()
    source.capture()
    names = [f"public.{t}" for t in tables]
    if by_script:
        script = source.undo_cli("table", *names, "--to", at)
        assert script.returncode == 0, script.stderr
        run = source.psql(script.stdout, "-v", "ON_ERROR_STOP=1")
        assert run.returncode == 0, run.stderr
    else:
        applied = source.undo_cli("table", *names, "--to", at, "--apply")
        assert applied.returncode == 0, applied.stderr
    assert state() == then
