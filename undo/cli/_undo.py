"""The undo: session, xact, app, and rewinding tables (table --to / --as-of)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from undo.cli import render
from undo.cli._app import (
    XID,
    UserError,
    cli,
    duration,
    echo_err,
    json_option,
    pass_settings,
)
from undo.core.config import Settings
from undo.core.times import parse_time

if TYPE_CHECKING:
    from undo.engine.apply import UndoReport


_APPLYING = [
    click.option("--apply", is_flag=True, help="Run it, in one transaction."),
    click.option(
        "--on-conflict",
        type=click.Choice(["abort", "skip"]),
        default="abort",
        show_default=True,
        help="abort: change nothing; skip: undo the rest.",
    ),
    click.option(
        "--fire-triggers",
        is_flag=True,
        help="Let user triggers and rules fire, as you (no session_replication_role ="
        " replica); without it, an undo refuses tables with ENABLE ALWAYS/REPLICA ones.",
    ),
    click.option(
        "--trust-owner",
        "trust_owners",
        multiple=True,
        metavar="ROLE",
        help="Run the functions ROLE owns that the tables' constraints, defaults, indexes,"
        " policies or domains call, as you (reviewed); without it, an undo refuses them."
        " Repeatable.",
    ),
    click.option("--lock-timeout", default="5s", show_default=True, callback=duration),
    click.option("--statement-timeout", default="0", show_default=True, callback=duration),
]


def applying_options(f: Any) -> Any:
    """How an undo runs: --apply or print, conflicts, triggers, timeouts."""
    for opt in reversed(_APPLYING):
        f = opt(f)
    return f


def undo_options(f: Any) -> Any:
    """What an undo selects (--only, --table, --since, --until), and how it runs."""
    for opt in reversed(
        [
            click.option("--only", help="Comma-separated: delete,update,insert."),
            click.option(
                "--table", "tables", multiple=True, help="Only this table (schema.table)."
            ),
            click.option("--since", help="Only changes committed at or after this time."),
            click.option("--until", help="Only changes committed before this time."),
        ]
    ):
        f = opt(f)
    return applying_options(f)


class _Bars:
    """Progress on stderr (a terminal, not --quiet), one indicator per phase (staging,
    writing, checking, committing): done/total, rate and ETA, and the time spent in the
    phase, which keeps moving while the server runs one long statement."""

    TICK = 0.5  # seconds between redraws of the phase's elapsed time

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.phase = ""
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.ticker: threading.Thread | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        with self.lock:
            if phase != self.phase:
                from tqdm import tqdm

                self._close()
                self.phase = phase
                self.bar = tqdm(
                    total=total, desc=f"undo: {phase}", unit="", file=sys.stderr, leave=False
                )
            self.bar.update(done - self.bar.n)
        if self.ticker is None:
            self.ticker = threading.Thread(target=self._tick, daemon=True)
            self.ticker.start()

    def _tick(self) -> None:
        while not self.stop.wait(self.TICK):
            with self.lock:
                if self.bar is not None:
                    self.bar.refresh()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.stop.set()
        if self.ticker is not None:
            self.ticker.join()
        with self.lock:
            self._close()


def _run_undo(
    settings: Settings,
    target_kwargs: dict[str, Any],
    only: str | None,
    tables: tuple[str, ...],
    since: str | None,
    until: str | None,
    apply: bool,
    on_conflict: str,
    fire_triggers: bool,
    trust_owners: tuple[str, ...],
    lock_timeout: str,
    statement_timeout: str,
) -> None:
    from undo.engine.apply import undo
    from undo.engine.plan import Target, parse_only

    target = Target(
        only=parse_only(only),
        tables=tables,
        since=parse_time(since) if since else None,
        until=parse_time(until) if until else None,
        **target_kwargs,
    )
    _report(
        lambda progress: undo(
            settings,
            target,
            apply=apply,
            on_conflict=on_conflict,
            fire_triggers=fire_triggers,
            trust_owners=trust_owners,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
            out=sys.stdout,
            progress=progress,
        )
    )


def _report(run: Callable[[Any], UndoReport]) -> None:
    """Run an undo with progress bars, then its summary on stderr; exit 1 where it left
    something undone (conflicts, what cannot be undone)."""
    bars = _Bars(click.get_current_context().find_root().meta.get("undo.progress", False))
    try:
        report = run(bars)
    finally:
        bars.close()
    for line in report.summary():
        echo_err(line)
    if report.applied:
        echo_err(f"applied in xid {report.undo_xid}")
    if report.conflicts or report.not_undoable:
        sys.exit(1)


@cli.command("session")
@click.argument("session_id")
@undo_options
@pass_settings
def undo_session(settings: Settings, /, session_id: str, **kw: Any) -> None:
    """Undo what a session did: print the SQL (review it), or --apply it.

    Example: undo session 6b071524.9d7 --apply
    """
    _run_undo(settings, {"session": session_id}, **kw)


@cli.command("xact")
@click.argument("xids", nargs=-1, required=True, type=XID)
@undo_options
@pass_settings
def undo_xact(settings: Settings, /, xids: tuple[int, ...], **kw: Any) -> None:
    """Undo transactions by xid.

    Example: undo xact 7341 7342 --apply
    """
    _run_undo(settings, {"xids": xids}, **kw)


@cli.command("app")
@click.argument("name")
@undo_options
@pass_settings
def undo_app(settings: Settings, /, name: str, **kw: Any) -> None:
    """Undo what an application did in a time range (--since is required).

    Example: undo app usage-metrics --since 2026-01-19T10:00:00Z --until 2026-01-19T11:00:00Z
    """
    if not kw.get("since"):
        raise UserError("undo app needs --since (a time or an age such as 4h)", 2)
    _run_undo(settings, {"app": name}, **kw)


@cli.command("table")
@click.argument("tables", nargs=-1, required=True)
@click.option("--to", "to", help="Undo every change committed after this time (a rewind).")
@click.option("--as-of", "as_of", help="Print the rows as they were at this time; change nothing.")
@click.option("--where", help='With --as-of: an SQL condition on those rows (e.g. "id = 7").')
@applying_options
@json_option
@pass_settings
def table_cmd(
    settings: Settings,
    /,
    tables: tuple[str, ...],
    to: str | None,
    as_of: str | None,
    where: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Rewind tables to a time (--to), or show a table as it was then (--as-of).

    --to undoes every captured change to the tables committed after the time, whoever made it,
    with the guarantees of `undo session`: prints the script to review, or --apply.

    Example: undo table public.accounts public.events --to 2026-01-19T10:25:00Z

    Example: undo table public.accounts --as-of 90m --where "id = 7"
    """
    from undo.engine import rewind

    if (to is None) == (as_of is None):
        raise UserError("undo table needs exactly one of --to TIME and --as-of TIME", 2)
    if as_of is not None:
        if len(tables) != 1 or options["apply"]:
            raise UserError("--as-of takes one table and changes nothing (no --apply)", 2)
        columns, rows = rewind.as_of(
            settings,
            tables[0],
            parse_time(as_of),
            where,
            fire_triggers=options["fire_triggers"],
            trust_owners=options["trust_owners"],
            lock_timeout=options["lock_timeout"],
            statement_timeout=options["statement_timeout"],
        )
        click.echo(render.to_json(rows) if as_json else render.table(rows, columns))
        return
    if where is not None or as_json:
        raise UserError("--where and --json go with --as-of", 2)
    assert to is not None
    at = parse_time(to)
    _report(
        lambda progress: rewind.rewind(
            settings, tables, at, out=sys.stdout, progress=progress, **options
        )
    )
