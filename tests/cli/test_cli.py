"""The CLI's wiring: help, exit codes, one-line errors, stdout vs stderr, no passwords."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.fixtures import read_terminal
from undo.cli import cli

COMMANDS = [
    ["init"],
    ["capture"],
    ["check"],
    ["status"],
    ["sessions"],
    ["show", "session"],
    ["show", "xact"],
    ["history"],
    ["activity"],
    ["session"],
    ["xact"],
    ["app"],
    ["table"],
    ["guard", "add"],
    ["guard", "list"],
    ["guard", "remove"],
    ["prune"],
    ["demo"],
    ["serve"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_and_is_in_the_reference(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output or command == ["show"]
    reference = (Path(__file__).parents[2] / "docs" / "reference.md").read_text()
    assert f"undo {' '.join(command)}" in reference


def _run(tmp_path, *args, env=None):
    return CliRunner().invoke(cli, ["--store", str(tmp_path / "x.db"), *args], env=env or {})


def test_missing_store_is_bad_input(tmp_path):
    result = _run(tmp_path, "sessions")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "undo init" in result.stderr
    assert result.stdout == ""


def test_malformed_time_is_bad_input(tmp_path):
    result = _run(tmp_path, "app", "x", "--since", "yesterday-ish")
    assert result.exit_code == 2 and "malformed time" in result.stderr


def test_unreachable_database_is_bad_input_and_hides_the_password(tmp_path):
    dsn = "host=127.0.0.1 port=1 user=u password=hunter2 connect_timeout=2"
    result = _run(tmp_path, "--dsn", dsn, "init")
    assert result.exit_code == 2
    assert "hunter2" not in result.output and "password=***" in result.stderr
    assert "Traceback" not in result.output
    for path in tmp_path.iterdir():
        assert b"hunter2" not in path.read_bytes()


def test_bad_slot_name_is_bad_input(tmp_path):
    result = _run(tmp_path, "--slot", "Bad-Slot", "status")
    assert result.exit_code == 2 and re.search("invalid slot name", result.stderr)


def test_connection_options_work_after_the_command_name(tmp_path):
    before, after = tmp_path / "before.db", tmp_path / "after.db"
    result = CliRunner().invoke(cli, ["--store", str(before), "sessions", "--store", str(after)])
    assert result.exit_code == 2 and str(after) in result.stderr and "before" not in result.stderr
    result = _run(tmp_path, "status", "--slot", "Bad-Slot")
    assert result.exit_code == 2 and "invalid slot name" in result.stderr
    result = _run(tmp_path, "init", "--decoder", "wal2json", "--dsn", "host=127.0.0.1 port=1")
    assert result.exit_code == 2 and "No such option" not in result.output


@pytest.mark.parametrize("option", ["--lock-timeout", "--statement-timeout"])
@pytest.mark.parametrize("value", ["abc", "5 parsecs", "-1s", ""])
def test_malformed_timeout_is_one_line_before_anything_connects(tmp_path, option, value):
    result = _run(tmp_path, "--dsn", "host=127.0.0.1 port=1", "session", "S", option, value)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "PostgreSQL duration" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("value", ["5s", "500ms", "2min", "0", "1.5 s", "250"])
def test_well_formed_timeouts_pass_the_check(tmp_path, value):
    result = _run(tmp_path, "session", "S", "--lock-timeout", value)
    assert result.exit_code == 2 and "no audit store" in result.stderr  # got past the check


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://user:PASSWORD@[bad/db",
        "host=db password=PASSWORD user",
        "host='db password=PASSWORD",
        "postgresql://user:PASSWORD@db/x?nonsense=PASSWORD",
    ],
)
@pytest.mark.parametrize("command", [["status"], ["init"], ["capture", "--once"], ["sessions"]])
def test_malformed_dsn_is_one_line_without_the_password(tmp_path, dsn, command):
    for args in (["--dsn", dsn, *command], [*command, "--dsn", dsn]):
        result = _run(tmp_path, *args, env={"UNDO_DSN": ""})
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and "malformed DSN" in result.stderr
        assert "PASSWORD" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "store",
    [
        "postgresql://u:Hunter2Pw@[::1/undo",
        "host=db password=Hunter2Pw user",
        "host='db password=Hunter2Pw",
    ],
)
@pytest.mark.parametrize(
    "command", [["sessions"], ["status"], ["capture", "--once"], ["--log-format", "json", "status"]]
)
def test_malformed_store_uri_is_one_line_without_the_password(store, command):
    """The same masking as --dsn: libpq's complaint quotes the whole URI, password and all."""
    for args in (["--store", store, *command], [*command, "--store", store]):
        result = CliRunner().invoke(cli, args, env={"UNDO_DSN": "", "UNDO_STORE": ""})
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and "malformed" in result.stderr, result.stderr
        assert "Hunter2Pw" not in result.output and "Traceback" not in result.output


def _listing_store(tmp_path: Path) -> str:
    from undo.store import open_store

    path = str(tmp_path / "empty.db")
    open_store(path, create=True).close()
    return path


def _on_a_terminal(store: str, rows: int, env: dict[str, str]) -> tuple[bytes, int]:
    """`undo sessions` with stdout on a terminal ``rows`` lines tall: what the terminal got."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", rows, 200, 0, 0))
    e = {k: v for k, v in os.environ.items() if k not in ("LINES", "COLUMNS")}
    proc = subprocess.run(
        [sys.executable, "-m", "undo", "--store", store, "sessions"],
        stdout=side,
        stderr=subprocess.PIPE,
        env={**e, **env},
        timeout=60,
    )
    os.close(side)
    seen = read_terminal(main)
    return seen, proc.returncode


def test_listings_page_on_a_terminal_too_short_for_them_only(tmp_path):
    """psql's pager: $PAGER when stdout is a terminal and the output is taller than it; never
    on a pipe (CliRunner, tests) nor when it fits."""
    store = _listing_store(tmp_path)
    paged = tmp_path / "paged.txt"
    pager = {"PAGER": f"cat > {paged}"}
    seen, code = _on_a_terminal(store, 2, pager)  # header, rule, (0 rows): 3 lines
    assert code == 0 and paged.read_text().endswith("(0 rows)\n") and b"(0 rows)" not in seen
    paged.unlink()
    seen, code = _on_a_terminal(store, 40, pager)
    assert code == 0 and not paged.exists() and b"(0 rows)" in seen
    seen, code = _on_a_terminal(store, 2, {"PAGER": ""})  # empty: no pager, as psql
    assert code == 0 and b"(0 rows)" in seen
    piped = CliRunner().invoke(cli, ["--store", store, "sessions"], env=pager)
    assert piped.exit_code == 0 and piped.stdout.endswith("(0 rows)\n") and not paged.exists()


def test_listings_say_0_rows_and_check_format_and_limit(tmp_path):
    store = _listing_store(tmp_path)

    def run(*args):
        return CliRunner().invoke(cli, ["--store", store, *args])

    empty = run("sessions")
    assert empty.exit_code == 0 and empty.stdout.splitlines()[-1] == "(0 rows)"
    assert run("sessions", "-x").stdout == "(0 rows)\n"
    assert run("sessions", "--json").stdout == run("sessions", "--format", "json").stdout == "[]\n"
    assert run("sessions", "--format", "csv").stdout.startswith("session_id,application_name,")
    both = run("sessions", "--json", "--format", "csv")
    assert both.exit_code == 2 and both.stderr.count("\n") == 1 and both.stdout == ""
    for command in (["sessions"], ["history", "t", "id=1"], ["show", "xact", "7"]):
        bad = run(*command, "--limit", "-1")
        assert bad.exit_code == 2 and "--limit -1" in bad.stderr, command


def test_init_help_says_the_default_schema():
    """`billing` was left out silently: nothing said that init audits `public` alone."""
    result = CliRunner().invoke(cli, ["init", "--help"])
    assert result.exit_code == 0
    assert "default: public" in result.output and "tables of other schemas" in result.output


def test_usage_errors_are_one_line(tmp_path):
    for args in (["xact", "abc"], ["history", "t"], ["nosuch"], ["--nosuch", "status"]):
        result = _run(tmp_path, *args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "--help`)" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--log-format", "json", "sessions"],  # the store's error
        ["--log-format", "json", "sessions", "--bogus"],  # a usage error
        ["--log-format", "json", "app", "x", "--since", "yesterday-ish"],  # a malformed value
    ],
)
def test_an_error_under_log_format_json_is_one_json_object(tmp_path, args):
    """A service's log collector reads stderr as JSON lines: the error too (it was
    `Error: ...` text)."""
    import json

    result = _run(tmp_path, *args)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    doc = json.loads(line)
    assert doc["level"] == "error" and doc["exit_code"] == 2 and doc["message"], doc
    assert "Error:" not in doc["message"]
    # without it, the line stays text
    text = _run(tmp_path, *args[2:])
    assert text.stderr.startswith("Error: ") and text.stderr.count("\n") == 1


def test_ctrl_c_while_the_commands_load_is_one_line(tmp_path):
    """Ctrl-C right after Enter lands while Python imports the commands: it was a traceback
    of the import machinery. A sitecustomize makes that moment certain: the import of the
    commands raises KeyboardInterrupt, as SIGINT there does."""
    import os
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'undo.cli._app':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "undo", "sessions"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: interrupted (Ctrl-C)")
