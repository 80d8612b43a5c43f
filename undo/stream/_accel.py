"""Capture's hot path in C (undo/_speedups.c), where it was built.

``native`` is that module, or None: built without a C compiler, or ``UNDO_PURE_PYTHON`` set.
Without it every change takes the Python path, which stays the reference
(tests/unit/test_speedups.py holds the two equal).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

native: ModuleType | None
if os.environ.get("UNDO_PURE_PYTHON"):
    native = None
else:
    try:
        from undo import _speedups as native
    except ImportError:
        native = None


def no_stage(*_: Any) -> int:
    """The stage of a capture without the C module: every change takes the Python path."""
    return 0
