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


#: the kinds of audit store a bench compares (``--stores``)
STORE_KINDS = ("sqlite", "postgres")


def store_cluster() -> TempCluster:
    """A second throwaway cluster holding PostgreSQL stores, as a remote store would be: its
    own server processes, so their CPU is told apart from the source's. Durable (fsync on), as
    the SQLite store is (synchronous FULL)."""
    return cluster(fsync="on", full_page_writes="on", synchronous_commit="on")


def pg_store(c: TempCluster, name: str) -> str:
    """A new database of ``c`` for a PostgreSQL store: its conninfo (undo init makes the store)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(c.admin_dsn, autocommit=True) as a:
        a.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return c.dsn(name)


def pg_store_bytes(location: str) -> tuple[int, int, int, int]:
    """A PostgreSQL store's bytes: (the partitions of changes with their indexes and TOAST,
    every relation of the schema undo_store, the partitions' heap alone, their indexes)."""
    import psycopg

    with psycopg.connect(location, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0),"
            " (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            "  JOIN pg_namespace n ON n.oid = c.relnamespace"
            "  WHERE n.nspname = 'undo_store' AND c.relkind IN ('r', 'm')),"
            " coalesce(sum(pg_relation_size(inhrelid)), 0),"
            " coalesce(sum(pg_indexes_size(inhrelid)), 0)"
            " FROM pg_inherits WHERE inhparent = 'undo_store.changes'::regclass"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def _stat_cpu(fields: list[str]) -> tuple[int, int]:
    """(own utime+stime, reaped children's cutime+cstime) in clock ticks, from /proc stat
    fields after the command name."""
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def cluster_cpu(c: TempCluster) -> float:
    """CPU seconds of every process of a cluster so far: the postmaster's own and its reaped
    children's (backends that ended, autovacuum workers), and each live child's (backends,
    checkpointer, WAL writer, ...). The difference of two readings is the server's CPU in
    between, whatever started or ended (a child that exits moves into the postmaster's
    reaped time)."""
    with open(os.path.join(c.data, "postmaster.pid")) as f:
        postmaster = f.readline().strip()
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if pid == postmaster:
            own, reaped = _stat_cpu(fields)
            total += own + reaped
        elif fields[1] == postmaster:  # ppid
            total += _stat_cpu(fields)[0]
    return total / os.sysconf("SC_CLK_TCK")


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run a command; return (seconds, its own CPU seconds user+sys), the CPU from wait4's
    rusage of that child alone (not of this process, not of other children)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=dict(os.environ, **(env or {})))
    _, status, ru = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise subprocess.CalledProcessError(p.returncode, cmd)
    return elapsed, ru.ru_utime + ru.ru_stime


def run_python_cpu(code: str, env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """Python code in a child: (seconds, the child's own CPU seconds, its peak RSS in MB read
    as run_python does)."""
    fd, hwm_file = tempfile.mkstemp()
    os.close(fd)
    wrapped = code + (
        "\nimport re as _re\n"
        f"_s = open('/proc/self/status').read()\n"
        f"open({hwm_file!r}, 'w').write(_re.search(r'VmHWM:\\s+(\\d+)', _s).group(1))\n"
    )
    secs, cpu = run_child([sys.executable, "-c", wrapped], env)
    with open(hwm_file) as f:
        kb = int(f.read())
    os.remove(hwm_file)
    return secs, cpu, kb // 1024
