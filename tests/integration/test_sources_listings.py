"""Listings of several sources of one store in one query (#22: every listing under 200 ms): the
store's store-wide reader (``sources=``) gives the same rows, order and paging as each source's
listing read in turn and merged, which is what undo.store.across did before (page 50 of the
dashboard read 2,550 sessions of each source to merge them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.integration.test_pg_store import _time, pg_store  # noqa: F401 (a fixture)
from undo.core.errors import BadInput, NotFound, NotRecorded, UndoError
from undo.core.records import Begin, Change, Commit, Relation
from undo.store import across, open_store
from undo.store.api import Store

NAMES = ["a", "b", "c"]


def _fill(writer: Any, k: int) -> None:
    """Source ``k``'s history: 12 transactions whose times interleave with the other sources',
    two applications and users, a table of its own and one all share (source 0: a second
    ``items`` in another schema, so that ``items`` is ambiguous there only), a session id every
    source has ("shared"), a forged tag, a guard refusal, and in source 1 an undo of part of
    its "shared" session."""
    items = Relation(16384, "public", "items", ("id", "v"), types=("integer", "text"))
    own = Relation(16385 + k, "public", f"only{k}", ("id",), types=("integer",))
    other = Relation(16390, "shop", "items", ("id",), types=("integer",))
    rels = [
        (items, writer.relation_id(items, (0,), False)),
        (own, writer.relation_id(own, (0,), False)),
    ]
    if k == 0:
        rels.append((other, writer.relation_id(other, (0,), False)))
    lsn = 1000
    for i in range(12):
        lsn += 100
        at = _time(i * 3 + k)
        writer.begin(Begin(500 + i, lsn, at))
        sid = "shared" if i in (0, 5) else f"s{k}-{i % 5}"
        writer.set_tag(
            {
                "session": {"session_id": sid, "user": f"u{i % 2}", "pid": 40 + k},
                "application_name": f"app{i % 2}",
                "statement": f"UPDATE -- {k} {i}",
            },
            "forged" if i == 7 else None,
        )
        rel, rid = rels[i % len(rels)] if i else rels[1]
        new = [json.dumps(str(i))] + ([json.dumps("x")] if rel is items else [])
        writer.add(Change(rel, "I", None, new), rid, (0,))
        if k == 1 and i == 9:  # undoes the insert into only1 of source 1's "shared" (at 0/44C)
            writer.set_ledger(
                {"target": '{"xids":[500]}', "entries": [["0/44C", "public", "only1", "I", "500"]]},
                b"{}",
                None,
            )
        if k == 1 and i == 4:
            writer.add_gap("public.items", "renamed")
        writer.commit(Commit(lsn, lsn + 50, at))
    if k != 2:
        writer.add_malformed(lsn + 61, "undo.guard", None, "not usable", b"zz")
    writer.add_refusal(
        lsn + 60,
        {"guard": "g", "reason": "r", "at": _time(40 + k), "session": {"session_id": f"s{k}-1"}},
        None,
    )
    writer.flush()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    """A store of either kind holding the three sources' histories."""
    location = (
        str(tmp_path / "s.db") if request.param == "sqlite" else request.getfixturevalue("pg_store")
    )
    db = open_store(location, create=True)
    try:
        for k, name in enumerate(NAMES):
            db.register_source(name, str(k + 1), name)
            _fill(db.writer(), k)
            db.set_meta({"slot": f"undo_{name}", "decoder": "pgoutput"})
            if k == 0:
                db.record_gap(100, 200, "slot lost")
    finally:
        db.close()
    with open_store(location) as db:
        yield db


def _each_merged(
    store: Store, names: list[str], limit: int | None = None, offset: int = 0, **kw: Any
) -> Any:
    """`undo sessions` of these sources as across.sessions read them before: each source's
    listing in turn, merged newest first; a source whose read failed on what was asked left
    out, and the error when every source's failed."""
    wanted = None if limit is None else limit + offset
    rows: list[Any] = []
    errors: list[UndoError] = []
    for name in names:
        store.use(name)
        try:
            rows += store.sessions(limit=wanted, **kw)
        except (BadInput, NotRecorded) as e:
            errors.append(e)
    if len(errors) == len(names):
        raise next((e for e in errors if not isinstance(e, NotFound)), errors[0])
    rows.sort(key=lambda r: r.last_change_at, reverse=True)
    return rows[offset : None if limit is None else offset + limit]


def _answer(ask: Any) -> Any:
    try:
        return [r.to_json() for r in ask()]
    except UndoError as e:
        return type(e).__name__, str(e)


ASKS: list[dict[str, Any]] = [
    {},
    {"limit": 4},
    {"limit": 4, "offset": 4},
    {"limit": 5, "offset": 12},
    {"limit": 5, "offset": 60},  # past the end
    {"limit": 100, "offset": 3},
    {"since": _time(10)},
    {"until": _time(20), "limit": 3, "offset": 2},
    {"app": "app1"},
    {"user": "u0", "limit": 2, "offset": 1},
    {"tables": ["items"]},  # ambiguous in a: b's and c's sessions
    {"tables": ["only2"], "app": "app0"},  # c's only
    {"tables": ["public.items", "only1"]},
    {"tables": ["shop.items"], "limit": 2},
    {"tables": ["nope"]},  # nowhere: the error of one source's listing
    {"tables": ["items", "shop.items"]},  # a's "items" ambiguous, b and c lack shop.items
    {"undone_filter": True},
    {"undone_filter": False, "limit": 3, "offset": 3},
]


@pytest.mark.parametrize("names", [NAMES, ["a", "c"]])
def test_a_listing_of_several_sources_is_each_sources_listing_merged(store, names):
    for kw in ASKS:
        one = _answer(lambda kw=kw: store.sessions(sources=names, **kw))
        each = _answer(lambda kw=kw: _each_merged(store, names, **kw))
        assert one == each, kw
        assert one not in ([], ()) or kw.get("offset") == 60 or names != NAMES, kw
        if isinstance(one, list):
            assert {r["source"] for r in one} <= set(names)
    # across reads several sources in one query, and leaves the source the store acts for
    store.use("b")
    assert [r.to_json() for r in across.sessions(store, names, limit=4, offset=2)] == (
        [r.to_json() for r in _each_merged(store, names, limit=4, offset=2)]
    )
    store.use("b")
    across.sessions(store, names)
    assert store.source_name == "b"


def test_a_session_id_of_two_sources_is_a_row_each_with_its_own_tables_and_undo(store):
    rows = {r.source: r for r in store.sessions(sources=NAMES) if r.session_id == "shared"}
    assert sorted(rows) == NAMES
    for name, r in rows.items():
        own = f"only{NAMES.index(name)}"
        held = {t.split(".")[-1] for t in r.tables}
        assert own in held and held <= {"items", own}  # never another source's
        assert r.transactions == 2
    # only b undid (part of) its "shared": not a's, not c's, whose LSNs are the same
    assert rows["b"].undone is not None and not rows["b"].undone.all
    assert rows["a"].undone is None and rows["c"].undone is None


@pytest.mark.parametrize("by", ["app", "session", "table"])
def test_activity_of_several_sources_is_one_query_equal_to_each_merged(store, by):
    for bucket in (60, 3600):
        each: list[Any] = []
        for name in NAMES:
            store.use(name)
            each += store.activity(by=by, bucket_seconds=bucket)
        each.sort(key=lambda r: (r.bucket, r.source or "", r.name or ""))
        one = store.activity(by=by, bucket_seconds=bucket, sources=NAMES)
        one.sort(key=lambda r: (r.bucket, r.source or "", r.name or ""))
        assert [r.to_json() for r in one] == [r.to_json() for r in each]
        merged = across.activity(store, NAMES, by=by, bucket_seconds=bucket)
        assert [r.to_json() for r in merged] == [r.to_json() for r in each]
        assert {r.source for r in one} == set(NAMES)


def test_an_unknown_source_in_a_store_wide_listing_is_bad_input(store):
    with pytest.raises(BadInput, match="no source 'nope'"):
        store.sessions(sources=["a", "nope"])


def test_status_and_metrics_of_several_sources_are_each_sources(store):
    """The dashboard's overview and /metrics read every source at once."""
    statuses, figures = [], {}
    for name in NAMES:
        store.use(name)
        statuses.append(store.status())
        figures[name] = store.metrics()
    assert [s.source for s in statuses] == NAMES
    assert statuses[0].gaps and statuses[1].gaps and not statuses[2].gaps
    assert statuses[0].malformed_messages and not statuses[2].malformed_messages
    assert statuses[1].slot == "undo_b" and statuses[1].untrusted_writes
    assert store.statuses(NAMES) == statuses
    assert store.statuses(["c", "a"]) == [statuses[0], statuses[2]]
    assert store.metrics_by_source(NAMES) == figures
    assert list(store.metrics_by_source(["c", "a"])) == ["a", "c"]
    assert store.guard_refusals(sources=NAMES) == [
        g for name in NAMES for g in (store.use(name), store.guard_refusals())[1]
    ]


@pytest.fixture
def time_reader(pg_store):  # noqa: F811
    """A PostgreSQL store's reader, to load times through."""
    db = open_store(pg_store, create=True)
    try:
        db.register_source("a", "1", "a")
        yield db.db  # type: ignore[attr-defined]
    finally:
        db.close()


def test_a_time_loads_as_the_stores_time_text_by_its_pieces(time_reader):
    """timestamptz read by its text's pieces (the listings' 20,000 times of 10,000 sessions: 70
    ms parsed into datetimes and formatted again) gives what the datetime path gives."""
    from undo.core.times import iso

    fixed = [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        datetime(2026, 3, 1, 10, 0, 0, 500000, tzinfo=UTC),
        datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 3, 1, 1, 2, 3, 4, tzinfo=UTC).astimezone(),  # any zone: as UTC
    ]
    for t in fixed:
        assert time_reader.execute("SELECT CAST(? AS timestamptz)", [t]).fetchone() == (iso(t),)


@settings(max_examples=300)  # deadline and health checks: the profile in tests/conftest.py
@given(t=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
def test_any_time_loads_as_the_stores_time_text(time_reader, t):
    from undo.core.times import iso

    t = t.replace(tzinfo=UTC)
    assert time_reader.execute("SELECT CAST(? AS timestamptz)", [t]).fetchone() == (iso(t),)
    late = t + timedelta(microseconds=1)
    assert time_reader.execute("SELECT CAST(? AS timestamptz)", [late]).fetchone() == (iso(late),)
