"""Shared helpers for the benchmark scripts: a throwaway cluster, timing, medians, RSS."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from undo.demo.cluster import TempCluster

ROW = (
    "id bigint PRIMARY KEY, name text NOT NULL, payload jsonb, amount numeric(12,2), at timestamptz"
)


def cluster(**extra: str) -> TempCluster:
    return TempCluster(
        {
            "max_wal_size": "4GB",
            "checkpoint_timeout": "30min",
            "shared_buffers": "512MB",
            "wal_sender_timeout": "0",
            **extra,
        }
    ).start()


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def run_python(code: str, env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run Python code in a child; return (seconds, peak RSS in MB) of that child.

    The peak is the child's own VmHWM, read by the child at exit: getrusage's ru_maxrss
    would count the RSS the child inherited from this (larger) process at fork.
    """
    fd, hwm_file = tempfile.mkstemp()
    os.close(fd)
    wrapped = code + (
        "\nimport re as _re\n"
        f"_s = open('/proc/self/status').read()\n"
        f"open({hwm_file!r}, 'w').write(_re.search(r'VmHWM:\\s+(\\d+)', _s).group(1))\n"
    )
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", wrapped], env=dict(os.environ, **(env or {})), check=True)
    elapsed = time.perf_counter() - t
    with open(hwm_file) as f:
        kb = int(f.read())
    os.remove(hwm_file)
    return elapsed, kb // 1024
