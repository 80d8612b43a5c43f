"""What users install: the wheel built from this checkout, installed (not editable) into a fresh
venv, runs every command against a real PostgreSQL. An editable install hides packaging faults
(a module or a data file left out of the wheel); this test runs nothing from the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import venv
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

from undo.demo.cluster import free_port
from undo.source.pg import session_id

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root), str(REPO)],
        check=True,
        capture_output=True,
    )
    (built,) = root.glob("undo-*.whl")
    return built


@pytest.fixture(scope="session")
def installed(wheel: Path) -> Path:
    """The bin folder of a fresh venv holding the wheel built from this checkout."""
    root = wheel.parent
    venv.create(root / "venv", with_pip=True)
    bin_dir = root / "venv" / "bin"
    subprocess.run(
        [str(bin_dir / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True,
        capture_output=True,
    )
    return bin_dir


def test_the_installed_wheel_runs_every_command(installed, pgo, tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("UNDO_", "PYTHON"))},
        "UNDO_DSN": pgo.dsn,
        "UNDO_STORE": str(tmp_path / "store.db"),
        "UNDO_SLOT": pgo.slot,
    }

    def undo(*args: str, code: int = 0) -> str:
        r = subprocess.run(
            [str(installed / "undo"), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,  # nothing of the checkout on sys.path
            timeout=120,
        )
        assert r.returncode == code, (args, r.stdout, r.stderr)
        return r.stdout

    where = subprocess.run(
        # the wheel carries capture's C hot path, built for this Python
        [str(installed / "python"), "-c", "import undo, undo._speedups; print(undo.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=True,
    ).stdout
    assert "site-packages" in where and str(REPO) not in where

    pgo.sql("CREATE TABLE accounts (id int PRIMARY KEY, email text)")
    undo("init", "--schema", "public")
    pgo.sql("INSERT INTO accounts SELECT g, 'a' || g FROM generate_series(1, 20) g")
    with pgo.connect(application_name="usage-metrics") as c:
        sid = session_id(c)
        c.execute("DELETE FROM accounts WHERE id % 3 = 0")
    undo("capture", "--once")
    sessions = json.loads(undo("sessions", "--app", "usage-metrics", "--json"))
    assert [s["session_id"] for s in sessions] == [sid]
    assert "BEGIN" in undo("session", sid) and pgo.sql("SELECT count(*) FROM accounts") == [(14,)]
    undo("session", sid, "--apply")
    assert pgo.sql("SELECT count(*) FROM accounts") == [(20,)]
    undo("capture", "--once")
    assert json.loads(undo("history", "public.accounts", "id=3", "--json"))[0]["op"] == "insert"
    assert undo("show", "session", sid)
    assert json.loads(undo("activity", "--json"))
    assert json.loads(undo("status", "--json"))["slot"] is not None

    port = free_port()
    server = subprocess.Popen(
        [str(installed / "undo"), "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pages = {}
        for path in ("/", "/metrics"):
            for _ in range(100):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}") as resp:
                        pages[path] = (resp.status, resp.read().decode())
                    break
                except OSError:
                    time.sleep(0.1)
        assert pages["/"][0] == 200 and "usage-metrics" in pages["/"][1]
        assert pages["/metrics"][0] == 200 and "undo_changes_total" in pages["/metrics"][1]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_wheel_carries_the_licence(wheel):
    """pyproject.toml says MIT: the wheel says so in its metadata and carries the text."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        headers = HeaderParser().parsestr(z.read(metadata).decode())
        licences = [n for n in names if ".dist-info/licenses/" in n]
        assert headers["License-Expression"] == "MIT"
        assert headers.get_all("License-File") == ["LICENSE"]
        assert [n.rpartition("/")[2] for n in licences] == ["LICENSE"]
        text = z.read(licences[0]).decode()
    assert text == (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) ") and "the undo authors" in text
