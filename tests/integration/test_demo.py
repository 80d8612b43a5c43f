"""`undo demo`, the README's first command, end to end on its own throwaway PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

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
