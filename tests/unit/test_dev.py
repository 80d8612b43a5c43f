"""./dev test's stages (the functions of ./dev, sourced): every stage runs whatever the others
did, a failing step ends its own stage only, and the summary gives each stage with pass or fail
and its time, then exits 1 naming every stage that failed (issue #20 item 10: the first failure
stopped the run, so the pure-Python pass and the majors never ran)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).parents[2]


def dev(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", "source ./dev\n" + script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def summary_of(stderr: str) -> dict[str, str]:
    """{stage: status} from the summary's lines, each of which ends with the stage's time."""
    lines = stderr.split("dev: summary", 1)[1].splitlines()[1:]
    found = {}
    for line in lines:
        m = re.fullmatch(r"dev:   (.+?) +(pass|skipped|FAIL \(exit \d+\)) +\d+m\d\ds", line)
        if m:
            found[m[1]] = m[2]
    return found


def test_every_stage_runs_and_every_failure_is_listed():
    r = dev(
        """
        half() { echo first >&2; false; echo never >&2; }
        stage one true
        stage "two words" false
        stage three half
        stage four sh -c 'exit 3'
        stage five true
        summary
        echo not reached >&2
        """
    )
    assert r.returncode == 1, r.stderr
    assert summary_of(r.stderr) == {
        "one": "pass",
        "two words": "FAIL (exit 1)",
        "three": "FAIL (exit 1)",
        "four": "FAIL (exit 3)",
        "five": "pass",
    }
    assert "dev: FAILED: two words, three, four" in r.stderr.splitlines()
    assert "first" in r.stderr and "never" not in r.stderr and "not reached" not in r.stderr


def test_all_passed_exits_0():
    r = dev("stage one true\nstage two true\nsummary\necho after >&2")
    assert r.returncode == 0, r.stderr
    assert summary_of(r.stderr) == {"one": "pass", "two": "pass"}
    assert "FAILED" not in r.stderr and "after" in r.stderr


def test_no_docker_skips_the_postgresql_stages_saying_why_but_fails_under_ci():
    script = """
        pg_skip="Docker is not reachable here (no socket)"
        stage mypy true
        pg_stage pytest false
        summary
        """
    r = dev(script)
    assert r.returncode == 0, r.stderr
    assert summary_of(r.stderr) == {"mypy": "pass", "pytest": "skipped"}
    assert "dev: skipped: Docker is not reachable here (no socket)" in r.stderr.splitlines()

    r = dev(script, CI="true")
    assert r.returncode == 1
    assert summary_of(r.stderr) == {"mypy": "pass", "pytest": "FAIL (exit 1)"}
