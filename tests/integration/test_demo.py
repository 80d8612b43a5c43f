"""`undo demo`, the README's first command, end to end on its own throwaway PostgreSQL."""

from __future__ import annotations

from undo.cli.render import table
from undo.demo import run_demo


def test_demo_restores_every_row_and_keeps_the_web_writes(cluster):
    # `cluster` only makes this skip (or fail under CI) where PostgreSQL is missing;
    # the demo starts a server of its own.
    lines: list[str] = []
    assert run_demo(lines.append, table) is True
    text = "\n".join(lines)
    assert "deleted rows restored exactly: yes" in text
    assert "web writes intact: yes" in text
    assert "usage-metrics" in text and "applied atomically" in text


def test_guarded_demo_loses_nothing_and_records_the_refusal(cluster):
    lines: list[str] = []
    assert run_demo(lines.append, table, guard=True) is True
    text = "\n".join(lines)
    assert "ERROR: undo guard usage-metrics*" in text
    assert "the rows the script meant to delete are all there: yes" in text
    assert "the refusal is stored and on the dashboard: yes" in text
