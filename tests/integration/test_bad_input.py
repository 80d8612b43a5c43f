"""Bad input and a broken environment, through the installed command: one line on stderr
("Error: ..."), never a traceback, and the exit code (README "Exit codes").

Found by a new user timed on a busy machine ("The on-call's page"): each of these printed a
traceback of 40 to 50 lines. The store's faults are real: a store on a 1 MB tmpfs fills up, a
read-only bind mount, pages of a real store overwritten.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import Source, _make_source


@pytest.fixture(scope="module")
def shop(cluster, tmp_path_factory) -> Iterator[Source]:
    """A source with an audited table in public and one in billing whose name has a space and
    capitals, one session's changes captured."""
    for src in _make_source(cluster, tmp_path_factory.mktemp("shop"), "pgoutput"):
        src.sql(
            'CREATE SCHEMA billing; CREATE TABLE billing."Tax Rates" (id int PRIMARY KEY,'
            " rate numeric); CREATE TABLE t (id int PRIMARY KEY, v text)"
        )
        src.init(["public", "billing"])
        src.sql("INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 3000) g")
        src.sql('INSERT INTO billing."Tax Rates" VALUES (1, 0.2)')
        src.capture()
        yield src


def _mount(tmp: Path, size: int) -> Path:
    """A tmpfs of its own of ``size`` bytes (root only), unmounted by the caller."""
    where = tmp / "mnt"
    where.mkdir(exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    return where


def env_of(src: Source, **extra: str) -> dict[str, str]:
    """The environment the installed command runs in: the source's settings, which ``extra``
    may replace (UNDO_STORE: a store elsewhere)."""
    env = dict(
        os.environ,
        UNDO_DSN=src.dsn,
        UNDO_STORE=src.store,
        UNDO_SLOT=src.slot,
        UNDO_DECODER=src.decoder,
    )
    env.update(extra)
    return env


def run_cli(
    src: Source, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed command, as conftest's run_cli runs it, with ``env`` replacing settings."""
    return subprocess.run(
        [sys.executable, "-m", "undo", *args],
        capture_output=True,
        text=True,
        env=env_of(src, **(env or {})),
        timeout=300,
    )


def wait_for(what: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


@dataclass
class Case:
    args: list[str]
    code: int
    says: str
    #: makes the fault; returns env overrides; may push clean-ups
    setup: Callable[[Source, Path, list[Callable[[], None]]], dict[str, str]] | None = None
    #: checks after the command (nothing lost, ...)
    after: Callable[[Source, dict[str, str]], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


def _port_in_use(src: Source, tmp: Path, cleanup: list[Callable[[], None]]) -> dict[str, str]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    cleanup.append(s.close)
    return {"PORT": str(s.getsockname()[1])}


def _full_disk(src: Source, tmp: Path, cleanup: list[Callable[[], None]]) -> dict[str, str]:
    """The store on a tmpfs with 512 KB to spare, and 3 MB of changes to capture."""
    with contextlib.closing(sqlite3.connect(src.store)) as c:
        (size,) = c.execute(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
        ).fetchone()
    where = _mount(tmp, size + 512 * 1024)
    cleanup.append(lambda: subprocess.run(["umount", "-l", str(where)], check=False))
    store = where / "undo.db"
    with sqlite3.connect(src.store) as c, sqlite3.connect(store) as copy:
        c.backup(copy)
    src.sql("INSERT INTO t SELECT g, repeat('y', 200) FROM generate_series(10001, 25000) g")
    return {"UNDO_STORE": str(store)}


def _nothing_lost(src: Source, env: dict[str, str]) -> None:
    """The slot was confirmed no further than what the store committed: the changes it could
    not store are still in the slot, and a copy of the store with room gets them all (and
    becomes the test source's store again)."""
    store = env["UNDO_STORE"]
    with contextlib.closing(sqlite3.connect(store)) as c:
        position = int(
            c.execute("SELECT value FROM source_meta WHERE key = 'position'").fetchone()[0]
        )
    ((confirmed,),) = src.sql(
        "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots"
        " WHERE slot_name = %s",
        (src.slot,),
    )
    assert confirmed <= position
    roomy = Path(src.store).with_name("roomy.db")
    with contextlib.closing(sqlite3.connect(store)) as c, sqlite3.connect(roomy) as copy:
        c.backup(copy)
    again = run_cli(src, "capture", "--once", env={"UNDO_STORE": str(roomy)})
    assert again.returncode == 0, again.stderr
    ((rows,),) = src.sql("SELECT count(*) FROM t")
    with contextlib.closing(sqlite3.connect(roomy)) as c, sqlite3.connect(src.store) as main:
        stored = c.execute(
            "SELECT count(*) FROM changes c JOIN relations r ON r.id = c.relation"
            " WHERE r.table_name = 't' AND c.op = 'I'"
        ).fetchone()
        c.backup(main)
    assert stored == (rows,)


def _read_only(src: Source, tmp: Path, cleanup: list[Callable[[], None]]) -> dict[str, str]:
    """A copy of the store, bind-mounted read-only over itself (its folder stays writable:
    SQLite opens it read-only). As root, a mode of 0444 would not stop a write."""
    store = tmp / "ro.db"
    with sqlite3.connect(src.store) as c, sqlite3.connect(store) as copy:
        c.backup(copy)
    for cmd in (
        ["mount", "--bind", str(store), str(store)],
        ["mount", "-o", "remount,ro,bind", str(store)],
    ):
        done = subprocess.run(cmd, capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
        cleanup.append(lambda: subprocess.run(["umount", "-l", str(store)], check=False))
    src.sql("INSERT INTO t SELECT max(id) + 1, 'z' FROM t")
    return {"UNDO_STORE": str(store)}


def corrupt_copy(src: Source, tmp: Path) -> Path:
    """A copy of the store with 4 pages overwritten: the roots of changes, of its row index,
    of transactions and of activity (SQLite's integrity_check: malformed)."""
    store = tmp / "corrupt.db"
    with sqlite3.connect(src.store) as c, sqlite3.connect(store) as copy:
        c.backup(copy)
    with contextlib.closing(sqlite3.connect(store)) as c:
        size = c.execute("PRAGMA page_size").fetchone()[0]
        roots = [
            r[0]
            for r in c.execute(
                "SELECT rootpage FROM sqlite_master WHERE name IN"
                " ('changes', 'changes_row', 'transactions', 'activity')"
            )
        ]
    assert len(roots) == 4
    with open(store, "r+b") as f:
        for page in roots:
            f.seek((page - 1) * size)
            f.write(b"\xa5" * size)
    # integrity_check reports the damage, or raises "malformed" itself
    with (
        contextlib.closing(sqlite3.connect(store)) as c,
        contextlib.suppress(sqlite3.DatabaseError),
    ):
        assert c.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
    return store


def _corrupt(src: Source, tmp: Path, cleanup: list[Callable[[], None]]) -> dict[str, str]:
    return {"UNDO_STORE": str(corrupt_copy(src, tmp))}


def _no_runuser(src: Source, tmp: Path, cleanup: list[Callable[[], None]]) -> dict[str, str]:
    """A PATH without /usr/sbin, where Debian keeps runuser (a user's login PATH)."""
    return {"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin"}


CASES = {
    "table name with a space": Case(
        ["table", "billing.Tax Rates", "--as-of", "2m"], 2, 'billing."Tax Rates"'
    ),
    "no such table": Case(["table", "billing.nosuch", "--as-of", "2m"], 2, "no table"),
    "undo --table with a space": Case(["session", "ID", "--table", "foo bar"], 2, '"foo bar"'),
    "sessions --table with a space": Case(["sessions", "--table", "a b"], 2, '"a b"'),
    "history of a table with a space": Case(["history", "Tax Rates", "id=1"], 2, "quotes"),
    "history by a column not the key": Case(
        ["history", "public.t", "v=x"], 2, "for each key column: id"
    ),
    "serve on a port in use": Case(
        ["serve", "--port", "{PORT}"], 2, "another process listens there", _port_in_use
    ),
    "serve --port -1": Case(["serve", "--port", "-1"], 2, "0<=x<=65535"),
    "serve --port 99999": Case(["serve", "--port", "99999"], 2, "0<=x<=65535"),
    "serve on an address not ours": Case(
        ["serve", "--host", "192.0.2.1", "--token", "0123456789abcdef01234567"],
        2,
        "not an address of this machine",
    ),
    # a red team: these started, and `--token x` is guessed in a few tries
    "serve --token of a space off loopback": Case(
        ["serve", "--host", "192.0.2.1", "--token", " "], 2, "openssl rand -hex 24"
    ),
    "serve --token x off loopback": Case(
        ["serve", "--host", "192.0.2.1", "--token", "x"], 2, "at least 16 characters"
    ),
    "serve --token with spaces around it": Case(
        ["serve", "--host", "192.0.2.1", "--token", " 0123456789abcdef01234567 "],
        2,
        "no spaces around it",
    ),
    "activity --bucket 0m": Case(["activity", "--bucket", "0m"], 2, "zero"),
    # a new user: 1s gave minute buckets, and 999999999d labelled this year's writes 1970-01-01
    "activity --bucket 1s": Case(["activity", "--bucket", "1s"], 2, "not whole minutes"),
    "activity --bucket 90s": Case(["activity", "--bucket", "90s"], 2, "not whole minutes"),
    "activity --bucket 999999999d": Case(
        ["activity", "--bucket", "999999999d"], 2, "wider than 366d"
    ),
    "activity --bucket 367d": Case(["activity", "--bucket", "367d"], 2, "wider than 366d"),
    "an age before year 1": Case(["sessions", "--since", "99999999d"], 2, "before the year 1"),
    "an xid too big": Case(["show", "xact", "99999999999999999999"], 2, "not in the range"),
    "an xid not a number": Case(["xact", "abc"], 2, "not a valid integer"),
    "a store in a missing folder": Case(
        ["init"], 2, "No such file or directory", env={"UNDO_STORE": "/nonexistent/undo.db"}
    ),
    "a wrong port": Case(
        ["status"],
        2,
        '"127.0.0.1", port 1 failed: Connection refused (is the server running',
        env={"UNDO_DSN": "host=127.0.0.1 port=1 dbname=x connect_timeout=3"},
    ),
    "capture --keep 0d": Case(["capture", "--keep", "0d"], 2, "zero"),
    "capture into a full disk": Case(
        ["capture", "--once"], 2, "is full", _full_disk, after=_nothing_lost
    ),
    "capture into a read-only store": Case(
        ["capture", "--once"], 2, "cannot be written", _read_only, after=_nothing_lost
    ),
    "prune a read-only store": Case(["prune", "--before", "1d"], 2, "read-only", _read_only),
    "capture from a corrupt store": Case(["capture", "--once"], 2, "is corrupt", _corrupt),
    "history from a corrupt store": Case(
        ["history", "public.t", "id=7"], 2, "is corrupt", _corrupt
    ),
    "sessions from a corrupt store": Case(["sessions"], 2, "is corrupt", _corrupt),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_and_an_exit_code(shop, tmp_path, case):
    cleanup: list[Callable[[], None]] = []
    try:
        env = dict(case.env)
        if case.setup is not None:
            env.update(case.setup(shop, tmp_path, cleanup))
        args = [a.format(**env) for a in case.args]
        done = run_cli(shop, *args, env={k: v for k, v in env.items() if k.isupper()})
        lines = done.stderr.splitlines()
        errors = [line for line in lines if line.startswith("Error: ")]
        assert "Traceback" not in done.stderr, done.stderr
        assert len(errors) == 1 and lines[-1] == errors[0], done.stderr
        if args[0] != "capture":  # capture logs its start before it meets a store it cannot use
            assert len(lines) == 1, done.stderr
        assert done.returncode == case.code, done.stderr
        assert case.says in errors[0], errors[0]
        if case.after is not None:
            case.after(shop, env)
    finally:
        for undo in reversed(cleanup):
            undo()


def test_demo_without_runuser_on_path(cluster):
    """As root, the demo runs PostgreSQL as postgres through runuser, which a login PATH
    (no /usr/sbin) does not reach: it is found where Debian keeps it."""
    if os.geteuid() != 0:
        pytest.skip("runuser is only needed as root")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":/usr/bin:/bin")
    done = subprocess.run(
        [sys.executable, "-m", "undo", "-q", "demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tempfile.gettempdir(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_demo_without_runuser_at_all_is_one_line(monkeypatch):
    """Where runuser is nowhere (no util-linux), one line naming it; nothing left behind."""
    from undo.core.errors import NotReady
    from undo.demo import cluster

    if os.geteuid() != 0:
        pytest.skip("runuser is only needed as root")
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)
    monkeypatch.setattr(cluster.os, "access", lambda path, mode: False)
    before = set(Path(tempfile.gettempdir()).glob("undo-pg-*"))
    with pytest.raises(NotReady) as info:
        cluster.TempCluster()
    assert "runuser" in str(info.value) and "\n" not in str(info.value)
    assert set(Path(tempfile.gettempdir()).glob("undo-pg-*")) == before


def test_ctrl_c_during_an_undo_is_one_line_and_nothing_changed(pgo):
    from tests.integration.test_undo import _as_session

    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO t SELECT generate_series(1, 100)")
    sid = _as_session(pgo, "DELETE FROM t WHERE id <= 50")
    pgo.capture()
    with pgo.connect(autocommit=False) as blocker:
        blocker.execute("LOCK TABLE t")  # the undo waits for it (--lock-timeout 0: for ever)
        proc = subprocess.Popen(
            [sys.executable, "-m", "undo", "session", sid, "--apply", "--lock-timeout", "0"],
            # a run started in the background of a shell ignores SIGINT, and so would
            # the child it inherits that from: Ctrl-C's own disposition, as at a terminal
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            env=env_of(pgo),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(
            lambda: (
                pgo.sql(
                    "SELECT count(*) FROM pg_locks WHERE relation = 't'::regclass AND NOT granted"
                )
                == [(1,)]
            )
        )
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        blocker.rollback()
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and err.startswith("Error: interrupted (Ctrl-C): nothing was")
    assert pgo.sql("SELECT count(*) FROM t") == [(50,)]
