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


def json_asked(args: list[str]) -> bool:
    """``--log-format json`` among the arguments, for a line written before (or instead of)
    click parsing them: the commands not loaded yet, or the arguments refused."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--log-format=json" or (
            arg == "--log-format" and args[i + 1 : i + 2] == ["json"]
        ):
            return True
    return False


def json_line(level: str, message: str, created: float | None = None, **fields: Any) -> str:
    """A line on stderr under --log-format json: time (UTC), level, message and the line's
    fields (render.JsonLogFormatter's every line; here, as main writes one before the commands
    load)."""
    import json
    import time

    at = time.time() if created is None else created
    doc = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z",
        "level": level,
        "message": message,
        **fields,
    }
    return json.dumps(doc, ensure_ascii=False, default=str)


def main() -> None:
    try:
        cli = _load()
    except KeyboardInterrupt:
        message = "interrupted (Ctrl-C) while undo was starting: nothing was done"
        sys.stderr.write(
            json_line("error", message, exit_code=130)
            if json_asked(sys.argv[1:])
            else f"Error: {message}"
        )
        sys.stderr.write("\n")
        raise SystemExit(130) from None
    cli(prog_name="undo")


def __getattr__(name: str) -> Any:
    """``from undo.cli import cli``: the root command, its commands loaded."""
    if name == "cli":
        return _load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
