"""A real PostgreSQL for the tests: a throwaway initdb cluster, UNDO_TEST_DSN, or a container
built from docker/Dockerfile with UNDO_TEST_PG=container (the choice: tests/pg_choice.py).

The cluster has wal_level=logical, wal2json (when installed), 20 slots and WAL senders, and
lives in a temp folder owned by the postgres user (initdb refuses to run as root). Each test
gets a fresh database, slot and store. Without PostgreSQL the tests skip, except under CI=true;
so does the whole session, at its start, when a container is asked for where Docker does not run.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import psycopg
import pytest
from psycopg import conninfo, sql

from tests import pg_choice
from undo.core.config import Settings
from undo.core.errors import NotReady
from undo.demo.cluster import SERVER_OPTIONS, TempCluster, find_bindir

_counter = itertools.count(1)

# Every property test's settings but its number of examples, in one profile (a test's own
# `suppress_health_check` would replace this list, not add to it: a test in
# tests/unit/test_hypothesis_profile.py keeps them out). On two cores shared by several runs,
# how long an example takes says nothing of the code under test: no deadline, no too_slow.
# The property tests reuse their database, slot or writer across examples on purpose (one
# database per example would cost seconds) and are written for it: function_scoped_fixture.
# The recursive JSON strategies (test_messages) throw away many oversized examples:
# filter_too_much.
hypothesis.settings.register_profile(
    "undo",
    deadline=None,
    suppress_health_check=[
        hypothesis.HealthCheck.too_slow,
        hypothesis.HealthCheck.function_scoped_fixture,
        hypothesis.HealthCheck.filter_too_much,
    ],
)
hypothesis.settings.load_profile("undo")


@dataclass
class Cluster:
    admin_dsn: str
    temp: TempCluster | None = None

    def dsn(self, dbname: str) -> str:
        params = conninfo.conninfo_to_dict(self.admin_dsn)
        params["dbname"] = dbname
        return conninfo.make_conninfo("", **params)

    @property
    def pg_ctl(self) -> list[str]:
        assert self.temp is not None
        return self.temp.pg_ctl()


#: server options beyond undo.demo.cluster.SERVER_OPTIONS
EXTRA_OPTIONS = {"wal_sender_timeout": "60s"}


def pytest_configure(config: pytest.Config) -> None:
    """A bad UNDO_TEST_PG is a usage error; a container where Docker does not run skips the
    whole session in one line (no test ran, none passed), or fails it under CI=true."""
    try:
        choice = pg_choice.choose(os.environ)
    except pg_choice.BadChoice as e:
        raise pytest.UsageError(str(e)) from None
    if choice.kind == "container" and (problem := pg_choice.docker_problem()):
        if os.environ.get("CI") == "true":
            pytest.exit(f"UNDO_TEST_PG=container: {problem}", pytest.ExitCode.TESTS_FAILED)
        pytest.exit(
            f"UNDO_TEST_PG=container: every test skipped: {problem}",
            pytest.ExitCode.NO_TESTS_COLLECTED,
        )


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    choice = pg_choice.choose(os.environ)
    if choice.dsn is not None:
        yield Cluster(choice.dsn)
        return
    if choice.kind == "container":
        with pg_choice.container({**SERVER_OPTIONS, **EXTRA_OPTIONS}) as dsn:
            yield Cluster(dsn)
        return
    try:
        temp = TempCluster(EXTRA_OPTIONS).start()
    except NotReady as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no PostgreSQL for the tests: {e}")
        pytest.skip(f"no PostgreSQL for the tests: {e}")
    try:
        yield Cluster(temp.admin_dsn, temp)
    finally:
        temp.stop()


def pytest_report_header(config: Any) -> list[str]:
    choice = pg_choice.choose(os.environ)
    if choice.kind != "local":
        return [f"postgresql: {choice.describe()}"]
    bindir = find_bindir()
    lines = [f"postgresql binaries: {bindir}"]
    if bindir:
        lib = (
            subprocess.run(
                [f"{bindir}/pg_config", "--pkglibdir"], capture_output=True, text=True
            ).stdout.strip()
            if os.path.exists(f"{bindir}/pg_config")
            else ""
        )
        lines.append(f"wal2json: {'yes' if glob.glob(lib + '/wal2json.so') else 'not found'}")
    return lines


def erase_own_tag(conn: psycopg.Connection[Any], table: str = "t") -> None:
    """Leave the rest of this transaction untagged, as a role can in its own session (a
    client's savepoint; docs/security.md): write to an audited table inside a savepoint, keep
    the state undo's trigger set, roll the savepoint back (the tag with it) and set the state
    again. The transaction's later writes are stored untagged ('missing')."""
    conn.execute("SAVEPOINT erase_own_tag")
    conn.execute(sql.SQL("INSERT INTO {} SELECT WHERE false").format(sql.Identifier(table)))
    row = conn.execute("SELECT current_setting('undo.tagged')").fetchone()
    assert row is not None
    conn.execute("ROLLBACK TO SAVEPOINT erase_own_tag")
    conn.execute("SELECT set_config('undo.tagged', %s, true)", (row[0],))


@dataclass
class Source:
    """One test's database, slot and store, and helpers to drive undo on them."""

    dsn: str
    dbname: str
    store: str
    slot: str
    decoder: str
    cluster: Cluster

    @property
    def settings(self) -> Settings:
        return Settings(dsn=self.dsn, store=self.store, slot=self.slot, decoder=self.decoder)

    def connect(self, **kw: Any) -> psycopg.Connection[Any]:
        kw.setdefault("autocommit", True)
        return psycopg.connect(self.dsn, **kw)

    def sql(self, query: str, params: Any = None, **kw: Any) -> list[tuple[Any, ...]]:
        with self.connect(**kw) as c:
            cur = c.execute(query.encode() if params is None else query, params)
            return cur.fetchall() if cur.description else []

    def init(self, schemas: list[str] | None = None, tables: list[str] | None = None) -> Any:
        from undo.source.install import init

        return init(self.settings, schemas or [], tables or [])

    def capture(self, **kw: Any) -> Any:
        from undo.stream.capture import capture

        return capture(self.settings, once=True, **kw)

    def now(self, apart: float = 0.01) -> str:
        """The server's time as the store writes times, strictly between what committed before
        and what commits after (``apart`` seconds either side)."""
        time.sleep(apart)
        (t,) = self.sql(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC',"
            ' \'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\')'
        )[0]
        time.sleep(apart)
        return str(t)

    def snapshot(self, table: str, order: str = "1") -> list[str]:
        """Every row of a table as its text form, sorted: what a round trip must restore."""
        with self.connect(
            options="-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3"
            " -c bytea_output=hex -c IntervalStyle=postgres"
        ) as c:
            return sorted(
                r[0]
                for r in c.execute(
                    sql.SQL("SELECT snapshot_row::text FROM {} snapshot_row").format(sql.SQL(table))
                ).fetchall()
            )

    def nan_restorable(self) -> bool:
        """pgoutput always; wal2json only where it can send numbers as strings (2.6+)."""
        return self.decoder == "pgoutput" or self.meta("numbers_as_strings") == "1"

    def meta(self, key: str) -> str | None:
        """One of the store's keys of this source (the slot, the position...): in meta on a
        PostgreSQL store (one source here), in source_meta on SQLite."""
        table = "meta" if self.pg_store else "source_meta"
        rows = self.store_rows(f"SELECT value FROM {table} WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def load_types(self) -> int:
        """Fill `everything` (tests.fixtures) after init; returns how many rows it holds."""
        from tests.fixtures import NAN_ROWS, TYPES_ROWS

        rows = TYPES_ROWS + (NAN_ROWS if self.nan_restorable() else [])
        for stmt in rows:
            self.sql(stmt)
        return len(rows)

    @property
    def pg_store(self) -> bool:
        """The store is a PostgreSQL database (store_kind "postgresql"), not a file."""
        return "=" in self.store

    def store_rows(self, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
        """A query of the store's tables as the SQLite store names them (on a PostgreSQL
        store: in its schema undo_store, the one source's rows; placeholders ``?``)."""
        if self.pg_store:
            with psycopg.connect(self.store, options="-c search_path=undo_store") as c:
                return c.execute(query.replace("?", "%s"), list(params) or None).fetchall()
        import sqlite3

        with sqlite3.connect(self.store) as c:
            return c.execute(query, params).fetchall()

    def psql(self, script: str, *options: str) -> subprocess.CompletedProcess[str]:
        """Run a script through psql, as on-call would run a printed undo."""
        return subprocess.run(
            ["psql", "-X", "-q", *options, "-d", self.dsn, "-f", "-"],
            input=script,
            capture_output=True,
            text=True,
        )

    def undo_cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(self, *args, input=input)


def run_cli(
    src: Source, *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    e = {
        **os.environ,
        "UNDO_DSN": src.dsn,
        "UNDO_STORE": src.store,
        "UNDO_SLOT": src.slot,
        "UNDO_DECODER": src.decoder,
        **(env or {}),  # over the source's own
    }
    return subprocess.run(
        [sys.executable, "-m", "undo", *args],
        capture_output=True,
        text=True,
        env=e,
        input=input,
        timeout=300,
    )


@pytest.fixture(scope="session")
def store_server(cluster: Cluster) -> Iterator[Cluster]:
    """Where a PostgreSQL store's database is made: the suite's cluster, or, with
    UNDO_TEST_STORE_SERVER=second, a second throwaway cluster, as a store on another server
    would be (./dev test runs the store-facing core so once)."""
    if os.environ.get("UNDO_TEST_STORE_SERVER", "") != "second":
        yield cluster
        return
    temp = TempCluster(EXTRA_OPTIONS).start()
    try:
        yield Cluster(temp.admin_dsn, temp)
    finally:
        temp.stop()


def _make_source(
    cluster: Cluster,
    tmp_path: Path,
    decoder: str,
    store_kind: str = "sqlite",
    store_server: Cluster | None = None,
) -> Iterator[Source]:
    n = next(_counter)
    dbname = f"undo_test_{os.getpid()}_{n}"
    slot = f"undo_t{os.getpid()}_{n}"
    store = str(tmp_path / "undo.db")
    server = store_server or cluster
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    if store_kind == "postgresql":  # the store in a database of its own
        with psycopg.connect(server.admin_dsn, autocommit=True) as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname + "_store")))
        store = server.dsn(dbname + "_store")
    src = Source(cluster.dsn(dbname), dbname, store, slot, decoder, cluster)
    try:
        yield src
    finally:
        if store_kind == "postgresql" and server is not cluster:
            with psycopg.connect(server.admin_dsn, autocommit=True) as c:
                c.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(dbname + "_store")
                    )
                )
        with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
            _drop_slots_and_databases(c, dbname)


def _drop_slots_and_databases(c: psycopg.Connection[Any], dbname: str) -> None:
    """A test's slots and databases gone, whatever still holds them. A terminated walsender
    lets go of its slot a moment later: until then the slot stays and DROP DATABASE refuses
    (ObjectInUse), and a database left behind keeps undo installed in the cluster, which later
    tests of the same cluster see (uninstall keeps a role another database uses)."""
    deadline = time.monotonic() + 30
    while True:
        slots = c.execute(
            "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s",
            (dbname,),
        ).fetchall()
        for name, pid in slots:
            if pid is not None:
                c.execute("SELECT pg_terminate_backend(%s)", (pid,))
                continue
            with contextlib.suppress(psycopg.Error):
                c.execute("SELECT pg_drop_replication_slot(%s)", (name,))
        if not slots or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for name in (dbname, dbname + "_store"):
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


#: the kinds of audit store; a test runs on both with
#: ``@pytest.mark.parametrize("store_kind", STORES, indirect=True)``
STORES = ["sqlite", "postgresql"]


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """The store the ``source`` and ``pgo`` fixtures use: SQLite unless a test asks for both."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture(params=["pgoutput", "wal2json"])
def source(
    request: pytest.FixtureRequest,
    cluster: Cluster,
    tmp_path: Path,
    store_kind: str,
    store_server: Cluster,
) -> Iterator[Source]:
    """A fresh database for each decoder."""
    yield from _make_source(cluster, tmp_path, request.param, store_kind, store_server)


@pytest.fixture
def pgo(
    cluster: Cluster, tmp_path: Path, store_kind: str, store_server: Cluster
) -> Iterator[Source]:
    """A fresh database, pgoutput only (for tests about one decoder's behaviour or the CLI)."""
    yield from _make_source(cluster, tmp_path, "pgoutput", store_kind, store_server)
