"""`undo demo`, the README's first command, end to end on its own throwaway PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

import undo.demo as demo
from undo.cli.render import table
from undo.demo import run_demo


def test_demo_restores_every_row_and_keeps_the_web_writes(cluster):
    # `cluster` only makes this skip (or fail under CI) where PostgreSQL is missing;
    # the demo starts a server of its own.
    lines: list[str] = []
    assert run_demo(lines.append, table) is True
    text = "\n".join(lines)
    assert "deleted rows restored exactly: yes" in text
    assert "web writes intact: yes" in text
    assert "usage-metrics" in text and "applied atomically" in text


class _Racing:
    """The script's connection, and the web's registration for an event the script deletes
    arriving, from a connection of its own, right after the demo read the rows it is about to
    delete (a busy machine: the demo said "2109 rows" restored after undoing 2110 deletes)."""

    def __init__(self, conn: psycopg.Connection, dsn: str) -> None:
        self.conn, self.dsn = conn, dsn
        self.web: threading.Thread | None = None

    def __enter__(self) -> _Racing:
        self.conn.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.__exit__(*exc)  # type: ignore[arg-type]
        if self.web is not None:
            self.web.join(timeout=30)

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)

    def _register(self) -> None:
        with (
            REAL_CONNECT(self.dsn, autocommit=True, application_name="web") as c,
            contextlib.suppress(psycopg.errors.ForeignKeyViolation),
        ):
            c.execute(
                "INSERT INTO registrations (event_id, email) SELECT min(id),"
                " 'race@example.net' FROM events WHERE account_id % 100 < 7"
            )

    def execute(self, query: str, *args: object) -> object:
        cursor = self.conn.execute(query, *args)
        if query == demo.AFFECTED:
            self.web = threading.Thread(target=self._register, daemon=True)
            self.web.start()
            self.web.join(timeout=3)  # committed at once, unless the script holds a lock
        return cursor


REAL_CONNECT = psycopg.connect


def test_the_rows_restored_are_the_rows_deleted(cluster, monkeypatch):
    def connect(*args: Any, **kwargs: Any) -> Any:
        conn = REAL_CONNECT(*args, **kwargs)
        if kwargs.get("application_name") == "usage-metrics":
            return _Racing(conn, args[0])
        return conn

    monkeypatch.setattr(psycopg, "connect", connect)
    lines: list[str] = []
    assert run_demo(lines.append, table) is True
    text = "\n".join(lines)
    undone = sum(int(n) for n in re.findall(r"^   (\d+) delete\(s\) of \S+ undone$", text, re.M))
    restored = re.search(r"deleted rows restored exactly: yes \((\d+) rows\)", text)
    assert restored is not None and undone > 0, text
    assert int(restored.group(1)) == undone, text


def test_guarded_demo_loses_nothing_and_records_the_refusal(cluster):
    lines: list[str] = []
    assert run_demo(lines.append, table, guard=True) is True
    text = "\n".join(lines)
    assert "ERROR: undo guard usage-metrics*" in text
    assert "the rows the script meant to delete are all there: yes" in text
    assert "the refusal is stored and on the dashboard: yes" in text


@pytest.mark.slow
def test_dev_demo_installs_only_what_the_demo_needs(cluster, tmp_path):
    """`./dev demo` in a copy of this checkout (a fresh clone's files): the demo runs, from a
    venv holding undo and its dependencies, without the test tools (issue #20 item 8: mypy,
    ruff, playwright and hypothesis made a 332 MB venv to run a demo)."""
    repo = Path(__file__).parents[2]
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    clone = tmp_path / "clone"
    for name in filter(None, files):
        source = repo / os.fsdecode(name)
        if source.is_file():  # a file deleted but not yet committed is listed too
            (clone / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / os.fsdecode(name))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNDO_", "PYTHON", "VIRTUAL"))}
    r = subprocess.run(
        ["./dev", "demo"], cwd=clone, capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "deleted rows restored exactly: yes" in r.stdout
    tools = subprocess.run(
        [
            str(clone / ".venv/bin/python"),
            "-c",
            "import importlib.util as u;"
            " print(*[m for m in ('mypy', 'ruff', 'playwright', 'hypothesis', 'pytest',"
            " 'importlinter', 'testcontainers') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert tools == []
    assert (clone / ".venv/bin/undo").exists()


@pytest.mark.parametrize("after", ["1. Starting", "3. undo capture is streaming"])
def test_ctrl_c_leaves_no_server_no_folder_and_no_traceback(cluster, after):
    """Ctrl-C (SIGINT to the whole foreground group, the server's processes too) while the
    throwaway server starts, or while capture and the web app run: a thread's traceback (16-18
    lines), /tmp/undo-demo-* or /tmp/undo-pg-* left behind, twice a running PostgreSQL."""
    import signal
    import sys
    import tempfile
    import time

    tmp = tempfile.mkdtemp(prefix="undo-demo-test-", dir="/tmp")
    os.chmod(tmp, 0o755)  # the server's user reaches its folder inside
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "undo", "demo"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": tmp},
            start_new_session=True,  # a group of its own, as a terminal's foreground job
        )
        assert proc.stdout is not None
        seen = ""
        while after not in seen:
            line = proc.stdout.readline()
            assert line, seen
            seen += line
        if after.startswith("1."):
            deadline = time.monotonic() + 30  # initdb and pg_ctl under way
            while not os.listdir(tmp) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)
        else:
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (proc.returncode, err)
        assert "Traceback" not in err and "Exception in thread" not in err, err
        assert err.splitlines()[-1] == "Error: interrupted (Ctrl-C)", err
        assert os.listdir(tmp) == [], os.listdir(tmp)
        left = subprocess.run(["pgrep", "-f", tmp], capture_output=True, text=True).stdout
        assert left == "", left
    finally:
        subprocess.run(["pkill", "-9", "-f", tmp], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
