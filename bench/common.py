"""Shared helpers for the benchmark scripts: a throwaway cluster, timing, medians, RSS."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from undo.tempdb import TempCluster

ROW = (
    "id bigint PRIMARY KEY, name text NOT NULL, payload jsonb, amount numeric(12,2), at timestamptz"
)


def cluster() -> TempCluster:
    return TempCluster(
        {
            "max_wal_size": "4GB",
            "checkpoint_timeout": "30min",
            "shared_buffers": "512MB",
            "wal_sender_timeout": "0",
        }
    ).start()


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def run_python(code: str, env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run Python code in a child; return (seconds, peak RSS in MB) of that child."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, **(env or {})))
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"child failed with status {status}")
    return time.perf_counter() - t, usage.ru_maxrss // 1024
