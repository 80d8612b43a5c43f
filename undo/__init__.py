"""undo: an audit log and undo for PostgreSQL, built on change-data capture."""

from __future__ import annotations

import logging

from undo.core.config import Settings
from undo.core.errors import UndoError

__all__ = ["Settings", "UndoError"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
