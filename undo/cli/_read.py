"""Reading the audit trail: sessions, show, history, activity."""

from __future__ import annotations

import json
from typing import Any

import click

from undo.cli import render
from undo.cli._app import (
    XID,
    cli,
    echo_err,
    json_option,
    pass_settings,
)
from undo.core import words
from undo.core.config import Settings
from undo.core.times import parse_time
from undo.store import queries
from undo.store.schema import open_store


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
@json_option
@pass_settings
def sessions_cmd(
    settings: Settings,
    since: str | None,
    until: str | None,
    app: str | None,
    user: str | None,
    tables: tuple[str, ...],
    undone: bool | None,
    as_json: bool,
) -> None:
    """One row per session that wrote, newest first.

    Example: undo sessions --app usage-metrics --since 4h
    """
    db = open_store(settings.store)
    rows = queries.sessions(
        db,
        since=parse_time(since) if since else None,
        until=parse_time(until) if until else None,
        app=app,
        user=user,
        tables=list(tables),
        undone_filter=undone,
    )
    if as_json:
        click.echo(render.to_json(rows))
        return
    for r in rows:
        r["undone"] = words.undone(r["undone"])
    click.echo(
        render.table(
            rows,
            [
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
            ],
        )
    )


@cli.group("show")
def show_group() -> None:
    """Show what a session or a transaction changed."""


def _show_options(f: Any) -> Any:
    f = click.option("--all", "show_all", is_flag=True, help="Every change (no --limit).")(f)
    return click.option(
        "--limit",
        default=100,
        show_default=True,
        type=click.IntRange(min=0),
        help="Print at most this many changes.",
    )(f)


@show_group.command("session")
@click.argument("session_id")
@_show_options
@json_option
@pass_settings
def show_session(
    settings: Settings, session_id: str, limit: int, show_all: bool, as_json: bool
) -> None:
    """A session's transactions and row changes.

    Example: undo show session 6b071524.9d7
    """
    result = queries.show(open_store(settings.store), session_id=session_id)
    if as_json:
        click.echo(render.to_json(result))
        return
    for line in render.show(result, None if show_all else limit):
        click.echo(line)


@show_group.command("xact")
@click.argument("xid", type=XID)
@_show_options
@json_option
@pass_settings
def show_xact(settings: Settings, xid: int, limit: int, show_all: bool, as_json: bool) -> None:
    """A transaction's row changes.

    Example: undo show xact 7341
    """
    result = queries.show(open_store(settings.store), xid=xid)
    if as_json:
        click.echo(render.to_json(result))
        return
    for line in render.show(result, None if show_all else limit):
        click.echo(line)


@cli.command("history")
@click.argument("table")
@click.argument("key", nargs=-1, required=True)
@json_option
@pass_settings
def history_cmd(settings: Settings, table: str, key: tuple[str, ...], as_json: bool) -> None:
    """Every recorded version of one row, oldest first, with who changed it.

    Example: undo history public.invoices id=150 issued_at=2026-10-20

    Values are compared in their column type's text form: read by the source's own type
    (--dsn, when it answers), else in the forms the README lists.
    """
    from undo.core.errors import DatabaseUnreachable
    from undo.source import pg
    from undo.store import keyforms

    db = open_store(settings.store)
    pairs = queries.parse_key(list(key))
    conn = None
    normalise: keyforms.Normalise = keyforms.offline
    if settings.dsn:
        try:
            conn = pg.connect(settings.dsn, **_connect_timeout(settings.dsn, 5))
            normalise = keyforms.through_source(conn)
        except DatabaseUnreachable as e:
            echo_err(f"warning: {e}; values compared in the forms the README lists (history)")
    try:
        rows = queries.history(db, table, pairs, normalise)
    finally:
        if conn is not None:
            conn.close()
    if as_json:
        click.echo(render.to_json(rows))
        return
    for r in rows:
        if r["op"] == "ddl":
            click.echo(
                f"{r['commit_time']}  {r['command']}  xid {r['xid']}"
                f"  session {r['session_id'] or '(untagged)'}  {r['application_name'] or ''}"
                f"  {r['user'] or ''}  tag {r['tag']}\n  statement: {r['statement']}"
            )
            continue
        click.echo(
            f"{r['commit_time']}  {r['op']:6}  xid {r['xid']}"
            f"  session {r['session_id'] or '(untagged)'}  {r['application_name'] or ''}"
            f"  {r['user'] or ''}  tag {r['tag']}"
        )
        if r["moved_from"] is not None:
            click.echo(f"  moved from {r['moved_from']} to {r['table']}")
        elif len({x["table"] for x in rows}) > 1:
            click.echo(f"  in {r['table']}")
        if r["undo_of"] is not None:  # its statement is only the undo's first one
            click.echo(f"  undo of: {json.dumps(r['undo_of'], ensure_ascii=False)}")
        else:
            click.echo(f"  statement: {r['statement']}")
        for line in render.images(r, "  "):
            click.echo(line)


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

    rows = queries.activity(
        open_store(settings.store),
        by=by,
        since=parse_time(since) if since else None,
        bucket_seconds=parse_bucket(bucket),
    )
    if as_json:
        click.echo(render.to_json(rows))
        return
    click.echo(render.table(rows, ["bucket", by, "inserts", "updates", "deletes", "truncates"]))
