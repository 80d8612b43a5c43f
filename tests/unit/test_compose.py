"""docker/compose.yml (issue 22): a PostgreSQL audit store as a service, with capture and serve
pointed at it, no password in any command line or in the file, and every undo command line in
it one the real CLI parses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from psycopg import conninfo

from undo.cli import cli

DOCKER = Path(__file__).resolve().parents[2] / "docker"
#: the services that run undo, and the command each runs
UNDO = {"init": "init", "capture": "capture", "serve": "serve"}


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DOCKER / "compose.yml").read_text()))


def _parsed(args: list[str]) -> tuple[click.Context, click.Context]:
    """The root's context and the command's, as `undo ARGS` parses them (nothing runs)."""
    root = cli.make_context("undo", list(args))
    name = args[len(args) - len(root.args) - 1]  # the command: what the root left, first
    found = cli.get_command(root, name)
    assert found is not None, args
    return root, found.make_context(name, list(root.args), parent=root)


def test_the_store_is_a_postgresql_service_with_a_volume_and_a_healthcheck():
    doc = _compose()
    store = doc["services"]["store"]
    assert store["image"].startswith("postgres:")
    (volume,) = store["volumes"]
    name, _, path = volume.partition(":")
    assert path == "/var/lib/postgresql/data" and name in doc["volumes"]
    assert store["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    # its password from a secret file, not from the file or a command line
    env = store["environment"]
    assert "POSTGRES_PASSWORD" not in env
    (secret,) = store["secrets"]
    assert env["POSTGRES_PASSWORD_FILE"] == f"/run/secrets/{secret}"
    assert doc["secrets"][secret]["file"]


@pytest.mark.parametrize("service", UNDO)
def test_undo_services_run_undo_against_the_store_without_a_password(service):
    doc = _compose()
    svc = doc["services"][service]
    dockerfile = DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]
    assert 'ENTRYPOINT ["undo"]' in dockerfile.read_text().splitlines()
    args = svc["command"]
    root, command = _parsed(args)
    assert command.info_name == UNDO[service]
    store = root.params["store"]
    assert store.startswith("postgresql://")
    parts = conninfo.conninfo_to_dict(store)
    assert "password" not in parts and parts["host"] == "store"
    assert "password" not in str(args).lower()
    # the passwords come from libpq's password file, a secret: none in the environment
    env = svc["environment"]
    assert "PGPASSWORD" not in env
    assert "password" not in conninfo.conninfo_to_dict(env["UNDO_DSN"])
    assert env["PGPASSFILE"] in {f"/run/secrets/{s}" for s in svc["secrets"]}
    assert set(svc["secrets"]) <= set(doc["secrets"])
    # started once the store answers (and, but for init, once init is done)
    deps = svc["depends_on"]
    assert deps["store"]["condition"] == "service_healthy"
    if service == "init":
        assert deps["postgres"]["condition"] == "service_healthy"
    else:
        assert deps["init"]["condition"] == "service_completed_successfully"


def test_serve_listens_beyond_loopback_with_a_token_from_an_env_file():
    svc = _compose()["services"]["serve"]
    _, command = _parsed(svc["command"])
    assert command.params["host"] == "0.0.0.0"
    assert svc["env_file"] == "undo.env"  # UNDO_TOKEN: required off loopback


def test_a_command_line_the_cli_refuses_is_caught():
    with pytest.raises(click.ClickException, match="no-such-option"):
        _parsed(["--store", "postgresql://undo@store/undo", "capture", "--no-such-option"])
