"""Under --log-format json every line on stderr is one JSON object: a service's log collector
reads one format. The red team found text lines among them: progress, summaries, warnings,
the serve banner, click's own refusals and Ctrl-C while undo starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Source, run_cli
from undo.demo.cluster import free_port

JSON = ["--log-format", "json"]
AWAY = "host=127.0.0.1 port=1 connect_timeout=2"


def _recorded(src: Source) -> None:
    src.sql("CREATE TABLE items (id int PRIMARY KEY, note text)")
    src.init(tables=["public.items"])
    src.sql("INSERT INTO items VALUES (1, 'a'), (2, 'b')")


def _serve(src: Source, tmp_path: Path) -> str:
    """serve's banner, then stopped (it serves until Ctrl-C)."""
    _recorded(src)
    env = {**os.environ, "UNDO_DSN": src.dsn, "UNDO_STORE": src.store, "UNDO_SLOT": src.slot}
    port = str(free_port())
    server = subprocess.Popen(
        [sys.executable, "-m", "undo", *JSON, "serve", "--port", port],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        banner = server.stderr.readline()
        assert "serving" in banner, banner
    finally:
        server.terminate()
        rest = server.communicate(timeout=10)[1]
    return banner + rest


def _interrupted_at(module: str, tmp_path: Path, *args: str) -> str:
    """Ctrl-C as ``module`` is imported (a sitecustomize makes the moment certain)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {module!r}:\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "undo", *args], env=env, capture_output=True, text=True
    )
    assert result.returncode == 130, result.stderr
    return result.stderr


def _cli(*args: str, stage: Callable[[Source], None] | None = _recorded) -> Any:
    def run(src: Source, tmp_path: Path) -> str:
        if stage is not None:
            stage(src)
        args_ = [a.replace("{TMP}", str(tmp_path)) for a in args]
        return run_cli(src, *args_).stderr

    return run


def _captured(src: Source) -> None:
    _recorded(src)
    src.capture()


def _guarded(src: Source) -> None:
    _recorded(src)
    run_cli(src, "guard", "add", "zz*")


CASES: dict[str, Any] = {
    "store copy": _cli(*JSON, "store", "copy", "--to", "{TMP}/copy.db", stage=_captured),
    "capture --once": _cli(*JSON, "capture", "--once"),
    "guard add": _cli(*JSON, "guard", "add", "zz*"),
    "guard remove": _cli(*JSON, "guard", "remove", "zz*", stage=_guarded),
    "serve": _serve,
    "history, the source unreachable": _cli(
        *JSON, "history", "items", "id=1", "--dsn", AWAY, stage=_captured
    ),
    "unknown option before --log-format": _cli("--bogus", *JSON, stage=None),
    "unknown option after --log-format": _cli(*JSON, "--bogus", stage=None),
    "--log-format=json, unknown option": _cli("--log-format=json", "--bogus", stage=None),
    "Ctrl-C while the commands load": lambda src, tmp_path: _interrupted_at(
        "undo.cli._app", tmp_path, *JSON, "sessions"
    ),
    "Ctrl-C while undo itself loads": lambda src, tmp_path: _interrupted_at(
        "undo.core.config", tmp_path, *JSON, "sessions"
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_every_stderr_line_is_one_json_object(pgo: Source, tmp_path: Path, case: str) -> None:
    stderr = CASES[case](pgo, tmp_path)
    lines = stderr.splitlines()
    assert lines, f"{case}: nothing on stderr"
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            pytest.fail(f"{case}: a text line on stderr: {line!r}\n{stderr}")
        assert isinstance(doc, dict) and {"time", "level", "message"} <= doc.keys(), line
