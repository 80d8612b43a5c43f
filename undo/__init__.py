"""undo: an audit log and undo for PostgreSQL, built on change-data capture."""

from __future__ import annotations

import logging

from .config import Settings
from .errors import UndoError

__all__ = ["Settings", "UndoError"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
