"""Which PostgreSQL the test suite runs against (the `cluster` fixture in tests/conftest.py):

- by default (UNDO_TEST_PG unset or ``local``), a throwaway initdb cluster made from this
  machine's server binaries (UNDO_PG_BINDIR, else the newest under /usr/lib/postgresql);
- ``UNDO_TEST_DSN=...``, a server of yours (wal_level=logical, a superuser's DSN);
- ``UNDO_TEST_PG=container``, PostgreSQL built from docker/Dockerfile (wal2json included) and run
  through testcontainers: the ``docker`` extra (``pip install -e '.[test,docker]'``, which
  ``UNDO_TEST_PG=container ./dev test`` does) and a Docker daemon.

``python tests/pg_choice.py`` says what the environment chooses and exits 0, or says why it cannot
be had here and exits 1 (no Docker), or 2 (a setting that makes no sense).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

DOCKERFILE_DIR = Path(__file__).parents[1] / "docker"
IMAGE = "undo-test-postgres:latest"


class BadChoice(ValueError):
    """UNDO_TEST_PG and UNDO_TEST_DSN say something that cannot be run."""


@dataclass(frozen=True)
class Choice:
    kind: str  # "local", "dsn" or "container"
    dsn: str | None = None

    def describe(self) -> str:
        return {
            "local": "a throwaway cluster from this machine's binaries",
            "dsn": "UNDO_TEST_DSN",
            "container": f"a container built from {DOCKERFILE_DIR.name}/Dockerfile",
        }[self.kind]


def choose(env: Mapping[str, str]) -> Choice:
    """The PostgreSQL the environment asks for; BadChoice for an unknown UNDO_TEST_PG or for
    UNDO_TEST_PG and UNDO_TEST_DSN both set (which of them would the suite run against?)."""
    wanted = env.get("UNDO_TEST_PG", "").strip().lower()
    dsn = env.get("UNDO_TEST_DSN", "").strip()
    if wanted not in ("", "local", "container"):
        raise BadChoice(
            f"UNDO_TEST_PG={env['UNDO_TEST_PG']!r}: expected 'local' (the default) or"
            " 'container'; for a server of yours set UNDO_TEST_DSN instead"
        )
    if wanted and dsn:
        raise BadChoice(f"UNDO_TEST_PG={wanted} and UNDO_TEST_DSN are both set: unset one of them")
    if dsn:
        return Choice("dsn", dsn)
    return Choice(wanted or "local")


def docker_problem() -> str | None:
    """Why no container can be started here, or None when Docker answers."""
    try:
        from testcontainers.core.docker_client import DockerClient
    except ImportError:
        return (
            "testcontainers is not installed: pip install -e '.[test,docker]'"
            " (UNDO_TEST_PG=container ./dev test does)"
        )
    problem = None
    # a client that found no daemon leaves its socket to the garbage collector: collected here,
    # not as a ResourceWarning in some later test
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = DockerClient().client
            try:
                client.ping()
            finally:
                client.close()
        except Exception as e:  # docker.errors.DockerException, or what the transport raised
            host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
            if host.startswith("unix://") and not os.path.exists(host.removeprefix("unix://")):
                problem = f"no Docker daemon here ({host} does not exist)"
            else:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                problem = f"Docker does not answer at {host} ({reason})"
        gc.collect()
    return problem


@contextlib.contextmanager
def container(options: Mapping[str, str], timeout: float = 120) -> Iterator[str]:
    """A PostgreSQL container built from docker/Dockerfile with these server options (those of
    the local cluster: wal_level=logical, slots, fsync off...), as initdb makes the local one
    (UTF8, C.UTF-8, trust: the tests log in as roles they make); yields a superuser's DSN and
    removes the container afterwards (the image stays, for the next run)."""
    import psycopg
    from psycopg import conninfo
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.image import DockerImage

    command = ["postgres"]
    for name, value in options.items():
        if name not in ("listen_addresses", "unix_socket_directories", "port"):
            command += ["-c", f"{name}={value}"]
    with DockerImage(path=str(DOCKERFILE_DIR), tag=IMAGE, clean_up=False) as image:
        server = (
            DockerContainer(str(image))
            .with_env("POSTGRES_PASSWORD", "postgres")
            .with_env("POSTGRES_HOST_AUTH_METHOD", "trust")
            .with_env("POSTGRES_INITDB_ARGS", "--encoding=UTF8 --locale=C.UTF-8")
            .with_exposed_ports(5432)
            .with_command(command)
        )
        with server:
            dsn = conninfo.make_conninfo(
                host=server.get_container_host_ip(),
                port=str(server.get_exposed_port(5432)),
                user="postgres",
                password="postgres",
                dbname="postgres",
            )
            # the image's entrypoint runs initdb under a server that listens on no TCP port,
            # then starts the real one: the first TCP connection is the real server's
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with psycopg.connect(dsn, connect_timeout=5) as c:
                        c.execute("SELECT 1")
                    break
                except psycopg.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            yield dsn


def main() -> int:
    try:
        choice = choose(os.environ)
    except BadChoice as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if choice.kind == "container" and (problem := docker_problem()):
        print(problem)
        return 1
    print(choice.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
