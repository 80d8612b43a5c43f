"""What an operator sees of long work: capture's log lines (text and JSON), --quiet, and the
undo's progress bars on a terminal."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time

from tests.fixtures import read_terminal
from tests.integration.test_undo import _as_session
from undo.engine.apply import undo
from undo.engine.plan import Target
from undo.stream import capture as capture_module


def test_capture_says_where_it_starts_in_text_and_json_and_quiet_silences_it(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO t VALUES (1)")
    text = pgo.undo_cli("capture", "--once")
    assert text.returncode == 0
    assert f"undo: capturing slot {pgo.slot} (pgoutput) from " in text.stderr
    quiet = pgo.undo_cli("--quiet", "capture", "--once")
    assert "capturing" not in quiet.stderr
    pgo.sql("INSERT INTO t VALUES (2)")
    as_json = pgo.undo_cli("--log-format", "json", "capture", "--once")
    lines = [json.loads(line) for line in as_json.stderr.splitlines() if line.startswith("{")]
    start = next(d for d in lines if d["message"].startswith("capturing slot"))
    assert start["slot"] == pgo.slot and start["decoder"] == "pgoutput"
    assert start["level"] == "info" and start["lag_bytes"] >= 0 and start["time"].endswith("Z")


def test_capture_reports_rate_and_lag_while_it_works(pgo, monkeypatch, caplog):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO t SELECT g FROM generate_series(1, 1000) g")
    monkeypatch.setattr(capture_module, "REPORT_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="undo.stream.capture"):
        pgo.capture()
    reports = [r for r in caplog.records if "changes stored" in r.getMessage()]
    assert reports and reports[-1].fields["changes"] == 1000
    assert {"changes_per_second", "lag_bytes", "lag_seconds"} <= set(reports[-1].fields)


def test_undo_shows_a_progress_bar_on_a_terminal_only(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    pgo.sql("INSERT INTO t SELECT g FROM generate_series(1, 10) g")
    sid = _as_session(pgo, "DELETE FROM t", app="metrics")
    pgo.capture()
    env = dict(os.environ, UNDO_DSN=pgo.dsn, UNDO_STORE=pgo.store, UNDO_SLOT=pgo.slot)
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a real width
    proc = subprocess.run(
        [sys.executable, "-m", "undo", "session", sid, "--apply"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=side,
        timeout=120,
    )
    os.close(side)
    seen = read_terminal(main)
    assert proc.returncode == 0
    assert b"undo: writing:" in seen and b"/1 [" in seen  # the bar (done/total), cleared
    assert b"undo: committing:" in seen
    piped = pgo.undo_cli("session", sid)  # stderr is a pipe here: no bar
    assert "writing" not in piped.stderr


def test_undo_reports_each_phase_staging_writing_checking_committing(pgo):
    """The on-call's page: the bar stood at 98% for 8 of 15 s while the server ran the
    UPDATE. Each phase is reported on its own, as it starts and as it moves."""
    pgo.sql(
        "CREATE TABLE parent (id int PRIMARY KEY);"
        " CREATE TABLE child (id int PRIMARY KEY, parent int REFERENCES parent, n int);"
        " INSERT INTO parent SELECT g FROM generate_series(1, 3) g;"
        " INSERT INTO child SELECT g, 1 + g % 3, 0 FROM generate_series(1, 30) g"
    )
    pgo.init()
    sid = _as_session(
        pgo,
        "UPDATE child SET n = n + 1 WHERE id <= 10",
        "DELETE FROM child WHERE id > 25",
        "INSERT INTO child VALUES (100, 2, 0)",
        app="metrics",
    )
    pgo.capture()
    seen: list[tuple[str, int, int]] = []
    undo(pgo.settings, Target(session=sid), apply=True, progress=lambda *p: seen.append(p))
    phases = [p for i, (p, _, _) in enumerate(seen) if i == 0 or seen[i - 1][0] != p]
    assert phases == ["staging", "writing", "checking", "committing"], seen
    last = {p: (done, total) for p, done, total in seen}
    assert last["staging"] == (16, 16)  # every change staged: the bar ends full
    assert last["writing"][0] == last["writing"][1] > 0 and last["committing"] == (1, 1)
    first = {p: done for p, done, _ in reversed(seen)}
    assert first["writing"] == 0 and first["checking"] == 0  # shown as the phase starts


def test_a_phase_shows_its_time_while_the_server_works(pgo):
    """A statement that runs long (here: waiting for a row lock) still shows its phase and
    the time spent in it, redrawn while it runs."""
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY, n int); INSERT INTO t VALUES (1, 0)")
    pgo.init()
    sid = _as_session(pgo, "UPDATE t SET n = 1", app="metrics")
    pgo.capture()
    env = dict(os.environ, UNDO_DSN=pgo.dsn, UNDO_STORE=pgo.store, UNDO_SLOT=pgo.slot)
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    seen = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with pgo.connect() as holder:
        holder.autocommit = False
        holder.execute("SELECT * FROM t WHERE id = 1 FOR UPDATE")
        proc = subprocess.Popen(
            [sys.executable, "-m", "undo", "session", sid, "--apply"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=side,
        )
        for _ in range(300):  # until the undo's UPDATE waits for the row
            waiting = pgo.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'undo'"
                " AND wait_event_type = 'Lock'"
            )
            if waiting == [(1,)]:
                break
            time.sleep(0.1)
        assert waiting == [(1,)]
        time.sleep(3.0)  # under --lock-timeout (5s)
        while_waiting = bytes(seen)
        holder.rollback()
    assert proc.wait(timeout=120) == 0
    os.close(side)
    reader.join(timeout=10)
    os.close(main)
    shown = re.findall(rb"undo: writing:[^\r\n]*?\[(\d\d:\d\d)", while_waiting)
    assert any(t >= b"00:02" for t in shown), shown
