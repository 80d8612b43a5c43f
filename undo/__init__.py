"""undo: an audit log and undo for PostgreSQL, built on change-data capture.

Importing the package costs nothing (``Settings``, ``UndoError`` and ``__version__`` load when
first asked for): Ctrl-C while the ``undo`` command starts then lands in Python's own start-up
or in ``undo.cli.main``, which makes it one line, never a traceback of these imports."""

from __future__ import annotations

import logging

TYPE_CHECKING = False  # typing itself is not imported: each import here is a moment Ctrl-C hits
if TYPE_CHECKING:
    from typing import Any

    from undo.core.config import Settings
    from undo.core.errors import UndoError

__all__ = ["Settings", "UndoError"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    if name == "Settings":
        from undo.core.config import Settings

        return Settings
    if name == "UndoError":
        from undo.core.errors import UndoError

        return UndoError
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            # pyproject.toml is the one place the version is written (CHANGELOG.md's newest entry)
            found = version("undo")
        except PackageNotFoundError:  # a checkout on sys.path, not installed
            found = "0+unknown"
        globals()["__version__"] = found
        return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
