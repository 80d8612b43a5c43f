"""The choice of PostgreSQL for the tests (tests/pg_choice.py): local binaries by default,
UNDO_TEST_DSN, or a container with UNDO_TEST_PG=container; and a container asked for where
Docker does not run skips the whole session in one line, no test passed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import pg_choice
from tests.pg_choice import BadChoice, Choice

REPO = Path(__file__).parents[2]
DSN = "host=db.example port=5433 user=postgres"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Choice("local")),
        ({"UNDO_TEST_PG": ""}, Choice("local")),
        ({"UNDO_TEST_PG": "local"}, Choice("local")),
        ({"UNDO_TEST_PG": "container"}, Choice("container")),
        ({"UNDO_TEST_PG": " Container "}, Choice("container")),
        ({"UNDO_TEST_DSN": DSN}, Choice("dsn", DSN)),
        ({"UNDO_TEST_DSN": DSN, "UNDO_TEST_PG": ""}, Choice("dsn", DSN)),
        ({"UNDO_TEST_DSN": "", "UNDO_TEST_PG": "container"}, Choice("container")),
        ({"UNDO_PG_BINDIR": "/opt/pg17/bin"}, Choice("local")),
    ],
)
def test_choose(env, expected):
    assert pg_choice.choose(env) == expected


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"UNDO_TEST_PG": "docker"}, "UNDO_TEST_PG='docker': expected 'local'"),
        ({"UNDO_TEST_PG": "1"}, "UNDO_TEST_PG='1'"),
        ({"UNDO_TEST_PG": "container", "UNDO_TEST_DSN": DSN}, "both set"),
        ({"UNDO_TEST_PG": "local", "UNDO_TEST_DSN": DSN}, "both set"),
    ],
)
def test_choices_that_make_no_sense_are_refused(env, says):
    with pytest.raises(BadChoice, match=says):
        pg_choice.choose(env)


def _pytest(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "UNDO_TEST_DSN")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/unit/test_version.py"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**clean, **env},
        timeout=120,
    )


def test_a_container_where_docker_does_not_run_skips_the_session_in_one_line():
    problem = pg_choice.docker_problem()
    if problem is None:
        pytest.skip("Docker runs here: the session would start a container")
    r = _pytest(UNDO_TEST_PG="container")
    assert r.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, r.stdout + r.stderr
    said = [line for line in (r.stdout + r.stderr).splitlines() if "UNDO_TEST_PG" in line]
    assert said == [f"Exit: UNDO_TEST_PG=container: every test skipped: {problem}"]
    assert "passed" not in r.stdout and "Traceback" not in r.stderr
    # under CI=true a container that cannot run is a failure, not a skip
    assert _pytest(UNDO_TEST_PG="container", CI="true").returncode == pytest.ExitCode.TESTS_FAILED


def test_a_bad_choice_is_one_line_and_a_usage_error():
    r = _pytest(UNDO_TEST_PG="dokcer")
    assert r.returncode == pytest.ExitCode.USAGE_ERROR
    assert r.stderr.strip().splitlines() == [
        "ERROR: UNDO_TEST_PG='dokcer': expected 'local' (the default) or 'container';"
        " for a server of yours set UNDO_TEST_DSN instead"
    ]
