"""What an operator sees of long work: capture's log lines (text and JSON), --quiet, and the
undo's progress bars on a terminal."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import struct
import subprocess
import sys
import termios

from tests.integration.test_undo import _as_session
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
    seen = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    assert proc.returncode == 0
    assert b"undo: statements:" in seen and b"/1 [" in seen  # the bar (done/total), cleared
    piped = pgo.undo_cli("session", sid)  # stderr is a pipe here: no bar
    assert "statements" not in piped.stderr
