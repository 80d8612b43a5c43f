"""A throwaway PostgreSQL cluster: initdb in a temp folder, a free port, removed afterwards.

Used by `undo demo` and by the test suite. As root, initdb and pg_ctl run as the postgres
user (initdb refuses root) on a folder that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from types import TracebackType

from psycopg import conninfo

from undo.core.errors import NotReady

SERVER_OPTIONS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "fsync": "off",
    "full_page_writes": "off",
    "listen_addresses": "''",
    "max_prepared_transactions": "5",
}


def find_bindir() -> str | None:
    """The PostgreSQL server binaries to use: UNDO_PG_BINDIR if set, else the newest on this
    machine."""
    if os.environ.get("UNDO_PG_BINDIR"):
        return os.environ["UNDO_PG_BINDIR"]
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _runuser() -> str:
    """util-linux's runuser, which runs initdb and pg_ctl as postgres when undo runs as root;
    looked for on PATH and where Debian keeps it (/usr/sbin, which a user's PATH may lack)."""
    found = shutil.which("runuser") or next(
        (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise NotReady(
            "as root, initdb and pg_ctl run as the user postgres through runuser, which is not"
            " installed: apt-get install util-linux, or run as another user"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _no_ctrl_c() -> Iterator[None]:
    """A second Ctrl-C while the server stops would leave it running, and its folder: SIGINT
    is ignored meanwhile (in the main thread, the only one that may set a handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


class TempCluster:
    """``with TempCluster() as c: c.dsn("postgres")``; stopped and removed on exit."""

    def __init__(self, extra: dict[str, str] | None = None) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise NotReady(
                "PostgreSQL server binaries not found: run apt-get install postgresql"
                " (and postgresql-<major>-wal2json for the wal2json decoder)"
            )
        self.bindir = bindir
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:
            self.as_postgres = [_runuser(), "-u", "postgres", "--"]
        self.root = tempfile.mkdtemp(prefix="undo-pg-")
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        self.port = free_port()
        if self.as_postgres:
            try:
                shutil.chown(self.root, "postgres", "postgres")
            except LookupError:
                shutil.rmtree(self.root, ignore_errors=True)
                raise NotReady(
                    "as root, PostgreSQL runs as the user postgres (initdb refuses root), and"
                    " there is none: apt-get install postgresql makes it, or run as another user"
                ) from None
        opts = dict(
            SERVER_OPTIONS, unix_socket_directories=self.root, port=str(self.port), **(extra or {})
        )
        self.options = " ".join(f"-c {k}={v}" for k, v in opts.items())
        self.admin_dsn = f"host={self.root} port={self.port} user=postgres dbname=postgres"

    def pg_ctl(self, *args: str) -> list[str]:
        return [
            *self.as_postgres,
            f"{self.bindir}/pg_ctl",
            "-D",
            self.data,
            "-o",
            self.options,
            "-l",
            os.path.join(self.root, "log"),
            *args,
        ]

    def start(self) -> TempCluster:
        try:
            subprocess.run(
                [
                    *self.as_postgres,
                    f"{self.bindir}/initdb",
                    "-D",
                    self.data,
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ],
                check=True,
                capture_output=True,
            )
            subprocess.run(self.pg_ctl("-w", "start"), check=True, capture_output=True)
        except FileNotFoundError as e:
            self.stop()
            raise NotReady(
                f"could not start a throwaway PostgreSQL: {e.filename} not found"
            ) from None
        except subprocess.CalledProcessError as e:
            self.stop()
            raise NotReady(
                f"could not start a throwaway PostgreSQL: "
                f"{e.stderr.decode(errors='replace').strip()[-300:]}"
            ) from None
        except BaseException:  # Ctrl-C while initdb or pg_ctl ran: no server, no folder left
            self.stop()
            raise
        return self

    def stop(self) -> None:
        with _no_ctrl_c():
            with contextlib.suppress(FileNotFoundError):  # nothing started: nothing to stop
                subprocess.run(
                    [
                        *self.as_postgres,
                        f"{self.bindir}/pg_ctl",
                        "-D",
                        self.data,
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ],
                    capture_output=True,
                )
            # an initdb interrupted by the same Ctrl-C (a grandchild, as postgres) may still
            # make its folder again as it ends: removed until it stays gone
            deadline = time.monotonic() + 5
            while True:
                shutil.rmtree(self.root, ignore_errors=True)
                time.sleep(0.2)
                if not os.path.exists(self.root) or time.monotonic() > deadline:
                    break

    def dsn(self, dbname: str) -> str:
        params = conninfo.conninfo_to_dict(self.admin_dsn)
        params["dbname"] = dbname
        return conninfo.make_conninfo("", **params)

    def __enter__(self) -> TempCluster:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
