"""The `undo` command: click only. Options -> Settings -> one library call -> render."""

from __future__ import annotations

from undo.cli import _operate, _read, _undo  # noqa: F401  (each registers its commands)
from undo.cli._app import cli


def main() -> None:
    cli(prog_name="undo")
