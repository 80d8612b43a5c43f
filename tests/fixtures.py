"""Shared schemas for the integration tests: every type in SPEC, and hostile names."""

from __future__ import annotations

TYPES_SCHEMA = r"""
CREATE EXTENSION IF NOT EXISTS hstore;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'it''s "fine"');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TYPE pair AS (a integer, b text);
CREATE TABLE everything (
    id integer PRIMARY KEY,
    b boolean, i2 smallint, i4 integer, i8 bigint,
    n numeric, n2 numeric(30, 4), f4 real, f8 double precision, m money,
    t text, vc varchar(10), c char(5), bt bytea,
    d date, ts timestamp, tz timestamptz, tm time, ttz timetz, iv interval,
    u uuid, js json, jb jsonb, x xml, ip inet, cid cidr, mac macaddr,
    bits bit(4), vb varbit, pt point, bx box, arr integer[], tarr text[], jarr jsonb[],
    rng int4range, tsr tstzrange, en mood, dom posint, comp pair, hs hstore, tsv tsvector,
    big text
);
"""

_COMMON = (
    "true, 32767, -2147483648, 9223372036854775807, "
    "{n}, 1234567890123456789012345.0100, {f4}, {f8}, '$1,234.56', "
    "E'line\\nbreak\\ttab \"quote\" ''single'' back\\\\slash ü €', 'short', 'ab', "
    "'\\x00ff5461706972'::bytea, "
    "'2013-04-02', '2024-02-29 13:14:15.123456', '2024-02-29 13:14:15.5+05:30', '23:59:59.999999', "
    "'10:00+02', '1 year 2 mons 3 days 04:05:06.789', "
    "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{\"b\": 1,  \"a\": [1, 2.50]}}', "
    "'{{\"b\": 1, \"a\": [1, 2.50, null]}}', '<a x=\"1\">t&amp;</a>', '192.168.0.1/24', "
    "'10.0.0.0/8', '08:00:2b:01:02:03', B'1010', B'101', '(1.5,-2)', '((0,0),(1,1))', "
    "'{{1,NULL,3}}', ARRAY['a b', NULL, 'c\"d', 'e,f', ''], ARRAY['{{\"k\": 1}}'::jsonb], "
    "'[1,10)', '[2024-01-01 00:00+00,infinity)', '{en}', 7, ROW(1, 'x,y \"z\"'), "
    "'a=>1, \"b c\"=>NULL', 'the quick brown fox', {big}"
)

TYPES_ROWS = [
    "INSERT INTO everything VALUES (1, "
    + _COMMON.format(n="1.10", f4="'3.4028235e+38'", f8="0.1", en="happy", big="'small'")
    + ")",
    "INSERT INTO everything VALUES (2, "
    + _COMMON.format(
        n="'-0.000000000000000000001'",
        f4="'-1.17549435e-38'",
        f8="'1e+308'",
        en="it''s \"fine\"",
        big="repeat('toast me ', 300000)",
    )
    + ")",
    "INSERT INTO everything (id) VALUES (3)",
]

NAN_ROWS = [
    "INSERT INTO everything (id, n, f4, f8, ts, d) VALUES (4, 'NaN', 'Infinity', '-Infinity',"
    " 'infinity', '-infinity')",
    "INSERT INTO everything (id, n, f8) VALUES (5, 'Infinity', 'NaN')",
]

HOSTILE_SCHEMA = r"""
CREATE SCHEMA "Odd Schema";
CREATE TABLE "Odd Schema"."we""ird.x]" (
    "Foo Bar" integer PRIMARY KEY,
    "ü" text,
    "a.b" text,
    "select" text,
    "x]" integer
);
"""


def read_terminal(fd: int) -> bytes:
    """Everything a pseudo-terminal's main side got until its other side closed; closes it."""
    import os

    seen = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(fd)
    return seen
