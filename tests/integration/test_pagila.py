"""On a schema nobody here wrote: pagila (partitions, domains, arrays, tsvector, triggers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.test_undo import _as_session

PAGILA = Path(
    os.environ.get("UNDO_PAGILA_DIR") or Path(__file__).parents[3] / "shared/datasets/pagila"
)


@pytest.fixture
def pagila(source):
    if not PAGILA.is_dir():
        pytest.skip(f"no pagila dataset at {PAGILA}")
    for name in ("pagila-schema.sql", "pagila-data.sql"):
        loaded = source.psql((PAGILA / name).read_text(), "-v", "ON_ERROR_STOP=0")
        assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert source.sql("SELECT count(*) FROM payment")[0][0] > 10_000
    source.init()
    return source


def test_the_incident_on_pagila_guarded_undone_and_rewound(pagila):
    src = pagila
    tables = ("payment", "customer", "rental")
    added = src.undo_cli("guard", "add", "report*", "--reason", "reporting only")
    assert added.returncode == 0, added.stderr
    src.sql("UPDATE customer SET email = lower(email) WHERE customer_id < 50")  # the web, before
    at = src.now()
    then = {t: src.snapshot(t) for t in tables}

    # the guarded script cannot delete; the buggy one (not guarded) can, through partitions
    refused = src.undo_cli("guard", "list", "--json")
    assert json.loads(refused.stdout)[0]["pattern"] == "report*"
    with (
        src.connect(application_name="report-nightly") as c,
        pytest.raises(Exception, match="undo guard report"),
    ):
        c.execute("DELETE FROM payment WHERE amount < 1")
    sid = _as_session(
        src,
        "DELETE FROM rental WHERE rental_id % 50 = 0 AND rental_id NOT IN"
        " (SELECT rental_id FROM payment WHERE rental_id IS NOT NULL)",
        "DELETE FROM payment WHERE amount < 1",
        "UPDATE customer SET active = 0 WHERE customer_id % 7 = 0",
        app="buggy",
    )
    src.capture()

    shown = src.undo_cli("table", "payment", "--as-of", at, "--json")
    assert shown.returncode == 0, shown.stderr
    assert len(json.loads(shown.stdout)) == len(then["payment"])

    undone = src.undo_cli("session", sid, "--table", "public.payment", "--apply")
    assert undone.returncode == 0, undone.stderr
    assert src.snapshot("payment") == then["payment"]
    assert src.snapshot("customer") != then["customer"]  # --table left the rest

    # the rewind takes in the undo above once capture has it; until then the ledger refuses
    early = src.undo_cli("table", *tables, "--to", at, "--apply")
    assert early.returncode == 1 and "run `undo capture` first" in early.stderr
    src.capture()
    rewound = src.undo_cli("table", *tables, "--to", at, "--apply")
    assert rewound.returncode == 0, rewound.stderr
    assert {t: src.snapshot(t) for t in tables} == then
    sessions = json.loads(src.undo_cli("sessions", "--app", "report-nightly", "--json").stdout)
    assert [r["guard_refusals"] for r in sessions] == [1]


def test_pagila_owned_by_the_operator_undoes_with_no_refusal_of_owner_code(pagila):
    """pagila's defaults (nextval, now), domain (year's CHECK), fulltext index, trigger-kept
    column and partitions call only pg_catalog's functions and its owner's (the superuser
    undoing): its undo is not refused. A CHECK on payment calling a function of another role
    (app) is refused on every partition the undo writes, until --trust-owner app."""
    src = pagila
    tables = ("film", "customer", "address", "payment", "inventory")
    at = src.now()
    then = {t: src.snapshot(t) for t in tables}
    sid = _as_session(
        src,
        "UPDATE film SET release_year = 2001, title = title || '!' WHERE film_id < 40",
        "UPDATE customer SET email = upper(email) WHERE customer_id < 30",
        "UPDATE address SET phone = '0' WHERE address_id < 30",
        "DELETE FROM payment WHERE amount < 1",
        "INSERT INTO inventory (film_id, store_id) VALUES (1, 1)",
    )
    src.capture()
    printed = src.undo_cli("session", sid)
    assert printed.returncode == 0, printed.stderr
    undone = src.undo_cli("session", sid, "--apply")
    assert undone.returncode == 0, undone.stderr
    assert {t: src.snapshot(t) for t in tables} == then

    app = f"app_{src.dbname}"
    src.sql(
        f"CREATE ROLE {app}; CREATE FUNCTION public.sane(numeric) RETURNS boolean"
        f" LANGUAGE sql AS 'SELECT $1 >= 0'; ALTER FUNCTION public.sane(numeric) OWNER TO {app};"
        " ALTER TABLE payment ADD CONSTRAINT amount_sane CHECK (public.sane(amount))"
    )
    src.capture()  # the undo above, which the rewind takes in
    rewound = src.undo_cli("table", "payment", "--to", at, "--apply")
    assert rewound.returncode == 1, rewound.stderr
    lines = [ln for ln in rewound.stderr.splitlines() if "amount_sane" in ln]
    assert lines and all(
        ln.strip().startswith("public.payment_p2022_")
        and f"check constraint amount_sane calls public.sane(numeric), owned by {app}," in ln
        and ln.endswith(f"review it, then undo with --trust-owner {app}")
        for ln in lines
    ), rewound.stderr
    trusted = src.undo_cli("table", "payment", "--to", at, "--apply", "--trust-owner", app)
    assert trusted.returncode == 0, trusted.stderr


def test_a_row_of_every_pagila_table_updated_and_deleted_is_undone_exactly(pagila):
    """Every table of a schema nobody here wrote, through both decoders: one row of each
    updated in place (its triggers fire: last_update moves), and the rows of a table no foreign
    key points at deleted. wal2json stopped capture at rental's first update (its one-column key
    beside a three-column unique index)."""
    src = pagila
    tables = [
        r[0]
        for r in src.sql(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
            " ORDER BY 1"
        )
    ]
    assert "rental" in tables and len(tables) >= 15
    then = {t: src.snapshot(t) for t in tables}
    statements = [
        f"UPDATE {t} SET last_update = last_update"
        f" WHERE ctid = (SELECT ctid FROM {t} ORDER BY 1 LIMIT 1)"
        for t in tables
        if src.sql(
            "SELECT 1 FROM information_schema.columns WHERE table_name = %s"
            " AND column_name = 'last_update'",
            (t,),
        )
    ]
    statements.append("DELETE FROM payment WHERE payment_id % 97 = 0")
    sid = _as_session(src, *statements, app="every-table")
    src.capture()
    undone = src.undo_cli("session", sid, "--apply")
    assert undone.returncode == 0, undone.stderr
    assert {t: src.snapshot(t) for t in tables} == then
