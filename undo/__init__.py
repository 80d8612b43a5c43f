"""undo: an audit log and undo for PostgreSQL, built on change-data capture."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

from undo.core.config import Settings
from undo.core.errors import UndoError

__all__ = ["Settings", "UndoError"]
try:
    # pyproject.toml is the one place the version is written (CHANGELOG.md's newest entry)
    __version__ = version("undo")
except PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"

logging.getLogger(__name__).addHandler(logging.NullHandler())
