"""One version: pyproject.toml writes it, the package metadata carries it, `undo --version` and
`undo.__version__` read it from there, and CHANGELOG.md's newest entry names it."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import undo

REPO = Path(__file__).parents[2]


def test_the_version_is_one_everywhere():
    written = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    installed = importlib.metadata.version("undo")
    printed = subprocess.run(
        [sys.executable, "-m", "undo", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    heading = re.search(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert heading is not None, "CHANGELOG.md has no '## <version>' entry"
    assert printed.split()[-1] == installed == undo.__version__ == written == heading[1]
