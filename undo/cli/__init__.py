"""The `undo` command: click only. Options -> Settings -> one library call -> render.

The commands are imported when ``main`` runs (or ``cli`` is first asked for), not when this
package is: Ctrl-C while they load is then one line, as it is once a command runs."""

from __future__ import annotations

import sys
from typing import Any


def _load() -> Any:
    from undo.cli import _operate, _read, _undo  # noqa: F401  (each registers its commands)
    from undo.cli._app import cli

    return cli


def main() -> None:
    try:
        cli = _load()
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted (Ctrl-C) while undo was starting: nothing was done\n")
        raise SystemExit(130) from None
    cli(prog_name="undo")


def __getattr__(name: str) -> Any:
    """``from undo.cli import cli``: the root command, its commands loaded."""
    if name == "cli":
        return _load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
