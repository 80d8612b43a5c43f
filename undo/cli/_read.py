"""Reading the audit trail: sessions, show, history, activity."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from typing import Any

import click

from undo.cli import render
from undo.cli._app import (
    XID,
    UserError,
    cli,
    echo_err,
    json_option,
    pass_settings,
)
from undo.core.config import Settings
from undo.core.times import parse_time
from undo.source import sources
from undo.store import across, open_store
from undo.store.api import Shown, parse_key


def output_options(f: Any) -> Any:
    """--format, --json (the same as --format json) and -x, as psql's --csv and \\x."""
    f = click.option(
        "-x",
        "--expanded",
        "expand",
        is_flag=True,
        help="One field a line for each row, as psql's \\x (table format).",
    )(f)
    f = click.option(
        "--format",
        "fmt",
        type=click.Choice(["table", "csv", "json"]),
        default=None,
        help="table (aligned, times to the second), csv or json (times whole).  [default: table]",
    )(f)
    return json_option(f)


def _format(fmt: str | None, as_json: bool) -> str:
    if as_json and fmt not in (None, "json"):
        raise UserError(f"--json is --format json: give --format {fmt} or --json, not both", 2)
    return "json" if as_json else fmt or "table"


def _limit(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise UserError(f"--limit {value}: give a number of rows, 0 or more", 2)
    return value


def emit(text: str) -> None:
    """Print a command's output; on a terminal too short for it, through a pager as psql does:
    $PAGER (empty: none), else less (with LESS=FRSX unless LESS is set) or more. Never when
    stdout is not a terminal (a pipe, a file, tests)."""
    out = sys.stdout
    if out.isatty():
        rows = shutil.get_terminal_size().lines
        pager = os.environ.get("PAGER")
        if pager is None:
            pager = "less" if shutil.which("less") else "more" if shutil.which("more") else ""
        if pager.strip() and text.count("\n") + 1 >= rows:
            env = dict(os.environ)
            env.setdefault("LESS", "FRSX")
            try:
                # the user's own $PAGER, run by the shell as psql runs it
                proc = subprocess.Popen(pager, shell=True, stdin=subprocess.PIPE, env=env)
            except OSError:
                pass
            else:
                try:
                    proc.communicate((text + "\n").encode(out.encoding or "utf-8", "replace"))
                except KeyboardInterrupt:  # the pager has the terminal: let it end
                    proc.wait()
                return
    click.echo(text)


@cli.command("sessions")
@click.option("--since", help="ISO 8601 time or age (90m, 4h, 2d).")
@click.option("--until", help="ISO 8601 time or age.")
@click.option("--app", help="application_name.")
@click.option("--user", help="Role name.")
@click.option("--table", "tables", multiple=True, help="Touched this table (schema.table).")
@click.option(
    "--undone/--not-undone",
    default=None,
    help="Only sessions an undo undid (all or part), or only those none did.",
)
@click.option("--limit", type=int, default=None, help="At most this many sessions (the newest).")
@output_options
@pass_settings
def sessions_cmd(
    settings: Settings,
    since: str | None,
    until: str | None,
    app: str | None,
    user: str | None,
    tables: tuple[str, ...],
    undone: bool | None,
    limit: int | None,
    fmt: str | None,
    as_json: bool,
    expand: bool,
) -> None:
    """One row per session that wrote, newest first.

    Example: undo sessions --app usage-metrics --since 4h --limit 20
    """
    fmt, limit = _format(fmt, as_json), _limit(limit)
    with open_store(settings.store) as db:
        several = len(db.sources()) > 1
        rows = across.sessions(
            db,
            sources.selected(db, settings),
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
            app=app,
            user=user,
            tables=list(tables),
            # one more than shown says whether there are more (--undone filters after the query)
            limit=None if limit is None or undone is not None else limit + 1,
            undone_filter=undone,
        )
    more = limit is not None and len(rows) > limit
    rows = rows[:limit] if limit is not None else rows
    docs = [r.to_json() for r in rows]
    if fmt == "table":  # what undid it, in a few words
        for doc, r in zip(docs, rows, strict=True):
            doc["undone"] = render.undone(r.undone)
    emit(render.listing(docs, _sourced(several, _SESSION_COLUMNS), fmt, expand, more))


def _sourced(several: bool, columns: list[str]) -> list[str]:
    """A listing's columns, ``source`` first where the store holds more than one source
    (--json always carries it)."""
    return ["source", *columns] if several else columns


_SESSION_COLUMNS = [
    "session_id",
    "application_name",
    "user",
    "client_addr",
    "first_change_at",
    "last_change_at",
    "transactions",
    "inserts",
    "updates",
    "deletes",
    "guard_refusals",
    "tables",
    "tag",
    "tag_reason",
    "undone",
]


@cli.group("show")
def show_group() -> None:
    """Show what a session or a transaction changed."""


def _show_options(f: Any) -> Any:
    f = click.option("--all", "show_all", is_flag=True, help="Every change (no --limit).")(f)
    f = click.option(
        "--limit",
        type=int,
        default=None,
        help="Print at most this many changes (every statement is printed; 0: statements"
        " only).  [default: 100; csv and json: all]",
    )(f)
    return output_options(f)


def _show(
    result: Shown, limit: int | None, show_all: bool, fmt: str, expand: bool, sourced: bool
) -> None:
    if show_all:
        limit = None
    elif limit is None and fmt == "table":
        limit = 100
    if fmt == "json":
        emit(render.show_json(result, limit))
    elif fmt == "csv":
        emit(render.show_csv(result, limit))
    else:
        emit("\n".join(render.show(result, limit, expand, sourced)))


@show_group.command("session")
@click.argument("session_id")
@_show_options
@pass_settings
def show_session(
    settings: Settings,
    session_id: str,
    limit: int | None,
    show_all: bool,
    fmt: str | None,
    as_json: bool,
    expand: bool,
) -> None:
    """A session's transactions with their statements, then its row changes.

    Example: undo show session 6b071524.9d7
    """
    fmt, limit = _format(fmt, as_json), _limit(limit)
    with open_store(settings.store) as db:
        several = len(db.sources()) > 1
        result = across.show(db, sources.selected(db, settings), session_id=session_id)
    _show(result, limit, show_all, fmt, expand, several)


@show_group.command("xact")
@click.argument("xid", type=XID)
@_show_options
@pass_settings
def show_xact(
    settings: Settings,
    xid: int,
    limit: int | None,
    show_all: bool,
    fmt: str | None,
    as_json: bool,
    expand: bool,
) -> None:
    """A transaction's statement and row changes.

    Example: undo show xact 7341
    """
    fmt, limit = _format(fmt, as_json), _limit(limit)
    with open_store(settings.store) as db:
        several = len(db.sources()) > 1
        result = across.show(db, sources.selected(db, settings), xid=xid)
    _show(result, limit, show_all, fmt, expand, several)


@cli.command("history")
@click.argument("table")
@click.argument("key", nargs=-1, required=True)
@click.option("--limit", type=int, default=None, help="At most this many versions (the oldest).")
@output_options
@pass_settings
def history_cmd(
    settings: Settings,
    table: str,
    key: tuple[str, ...],
    limit: int | None,
    fmt: str | None,
    as_json: bool,
    expand: bool,
) -> None:
    """Every recorded version of one row, oldest first, with who changed it.

    Example: undo history public.invoices id=150 issued_at=2026-10-20

    Values are compared in their column type's text form: read by the source's own type
    (--dsn, or libpq's PGHOST, PGDATABASE, ..., when it answers), else in the forms
    docs/reference.md lists.
    """
    from undo.core.config import names_source
    from undo.core.errors import DatabaseUnreachable
    from undo.source import keyforms, pg

    fmt, limit = _format(fmt, as_json), _limit(limit)
    with open_store(settings.store) as db:
        pairs = parse_key(list(key))
        conn = None
        normalise: keyforms.Normalise = keyforms.offline
        if names_source(settings):
            try:
                conn = pg.connect(settings.dsn, **_connect_timeout(settings.dsn, 5))
                normalise = keyforms.through_source(conn)
            except DatabaseUnreachable as e:
                echo_err(
                    f"{e}; values compared in the forms docs/reference.md lists (history)",
                    logging.WARNING,
                )
        try:
            several = len(db.sources()) > 1
            rows = across.history(db, sources.selected(db, settings), table, pairs, normalise)
        finally:
            if conn is not None:
                conn.close()
    more = limit is not None and len(rows) > limit
    rows = rows[:limit] if limit is not None else rows
    if fmt != "table" or expand:
        emit(
            render.listing(
                [render.history_record(r) if fmt != "json" else r.to_json() for r in rows],
                _sourced(several, render.HISTORY_FIELDS),
                fmt,
                expand,
                more,
            )
        )
        return
    emit("\n".join(render.history(rows, more, sourced=several)))


def _connect_timeout(dsn: str, seconds: int) -> dict[str, Any]:
    """connect_timeout for a connection that may fail over to something else, unless the DSN
    sets its own."""
    from psycopg import conninfo

    return (
        {} if "connect_timeout" in conninfo.conninfo_to_dict(dsn) else {"connect_timeout": seconds}
    )


@cli.command("activity")
@click.option(
    "--by", type=click.Choice(["app", "session", "table"]), default="app", show_default=True
)
@click.option("--since", help="ISO 8601 time or age (90m, 4h, 2d).")
@click.option("--bucket", default="1m", show_default=True, help="Bucket width: 1m, 15m, 1h, 1d.")
@json_option
@pass_settings
def activity_cmd(
    settings: Settings, by: str, since: str | None, bucket: str, as_json: bool
) -> None:
    """Inserts, updates and deletes per time bucket and per script, session or table.

    Example: undo activity --by app --since 1d --bucket 1h
    """
    from undo.core.times import parse_bucket

    with open_store(settings.store) as db:
        several = len(db.sources()) > 1
        rows = across.activity(
            db,
            sources.selected(db, settings),
            by=by,
            since=parse_time(since) if since else None,
            bucket_seconds=parse_bucket(bucket),
        )
    docs = [r.to_json() for r in rows]
    if as_json:
        click.echo(render.to_json(docs))
        return
    click.echo(
        render.table(
            docs, _sourced(several, ["bucket", by, "inserts", "updates", "deletes", "truncates"])
        )
    )
