"""The `undo` command: click only. Options -> Settings -> one library call -> render."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from . import render
from .config import Settings
from .errors import UndoError
from .store import queries
from .store.schema import open_store
from .timespec import parse_time

if TYPE_CHECKING:
    from .apply import UndoReport


class _UserError(click.ClickException):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]


class Command(click.Command):
    """Turns an UndoError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UndoError as e:
            raise _UserError(str(e), e.exit_code) from None


class Group(click.Group):
    """Every command under it, nested groups' included, translates UndoError (Command)."""

    command_class = Command


Group.group_class = Group


@click.group(cls=Group)
@click.option(
    "--dsn",
    envvar="UNDO_DSN",
    show_envvar=True,
    default="",
    help="Source database: libpq conninfo or postgresql:// URI.",
)
@click.option(
    "--store",
    envvar="UNDO_STORE",
    show_envvar=True,
    default="undo.db",
    show_default=True,
    help="The audit store (SQLite file).",
)
@click.option(
    "--slot",
    envvar="UNDO_SLOT",
    show_envvar=True,
    default="undo",
    show_default=True,
    help="Logical replication slot (and publication, for pgoutput).",
)
@click.option(
    "--decoder",
    envvar="UNDO_DECODER",
    show_envvar=True,
    type=click.Choice(["pgoutput", "wal2json"]),
    default=None,
    help="Decoder, chosen at init and remembered in the store.  [default: pgoutput]",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debugging detail too.")
@click.option("-q", "--quiet", is_flag=True, help="No progress: only warnings and errors.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per line on stderr (for capture run as a service).",
)
@click.version_option(package_name="undo")
@click.pass_context
def cli(
    ctx: click.Context,
    dsn: str,
    store: str,
    slot: str,
    decoder: str | None,
    verbose: bool,
    quiet: bool,
    log_format: str,
) -> None:
    """Audit log and undo for PostgreSQL, built on change-data capture.

    \b
    undo init                  prepare the source database
    undo capture               stream changes into the audit store
    undo sessions --app NAME   find the session that did it
    undo session ID            print the SQL that reverts it (--apply to run it)
    """
    handler = logging.StreamHandler(sys.stderr)
    text = logging.Formatter("undo: %(message)s")
    handler.setFormatter(render.JsonLogFormatter() if log_format == "json" else text)
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO,
        handlers=[handler],
        force=True,
    )
    ctx.meta["undo.progress"] = not quiet and log_format == "text" and sys.stderr.isatty()
    try:
        ctx.obj = Settings(dsn=dsn, store=store, slot=slot, decoder=decoder)
    except UndoError as e:
        raise _UserError(str(e), e.exit_code) from None


#: --dsn, --store, --slot, --decoder also after the command name (`undo init --decoder wal2json`);
#: there they win over the same option before it, which wins over the environment.
_AFTER = [
    click.option("--dsn", default=None, help="Source database (as before the command)."),
    click.option("--store", default=None, help="The audit store (as before the command)."),
    click.option("--slot", default=None, help="Slot (as before the command)."),
    click.option(
        "--decoder",
        type=click.Choice(["pgoutput", "wal2json"]),
        default=None,
        help="Decoder (as before the command).",
    ),
]


def pass_settings(f: Any) -> Any:
    """Like click.pass_obj for the Settings, with the connection options taken after the
    command name too."""

    @click.pass_context
    @functools.wraps(f)
    def wrapper(ctx: click.Context, /, *args: Any, **kw: Any) -> Any:
        given = {k: kw.pop(k) for k in ("dsn", "store", "slot", "decoder")}
        settings = dataclasses.replace(ctx.obj, **{k: v for k, v in given.items() if v is not None})
        return f(settings, *args, **kw)

    for opt in reversed(_AFTER):
        wrapper = opt(wrapper)
    return wrapper


_DURATION = re.compile(r"^\s*\d+(\.\d+)?\s*(us|ms|s|min|h|d)?\s*$")


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A timeout as PostgreSQL reads one (5s, 500ms, 2min, 0 = none), checked before anything
    connects."""
    if not _DURATION.match(value):
        raise _UserError(
            f"malformed --{param.name.replace('_', '-') if param.name else 'timeout'}"
            f" {value!r}: use a PostgreSQL duration such as 5s, 500ms, 2min, or 0 for none",
            2,
        )
    return value.strip()


def json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")(f)


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


@cli.command("init")
@click.option("--schema", "schemas", multiple=True, help="Audit every table of this schema.")
@click.option("--table", "tables", multiple=True, help="Audit this table (schema.table).")
@click.option(
    "--uninstall",
    is_flag=True,
    help="Remove this slot and its publication; and everything init installed, once no other"
    " slot of undo is left.",
)
@click.option(
    "--failover",
    is_flag=True,
    help="PostgreSQL 17+: a failover slot, kept in step on standbys (see README).",
)
@pass_settings
def init_cmd(
    settings: Settings,
    schemas: tuple[str, ...],
    tables: tuple[str, ...],
    uninstall: bool,
    failover: bool,
) -> None:
    """Make the source database ready: trigger, replica identity, publication, slot, store.

    Example: undo --dsn postgresql://admin@db/shop init --schema public
    """
    from .tagging import init
    from .tagging import uninstall as do_uninstall

    if uninstall:
        done = do_uninstall(settings)
        click.echo("\n".join(done) if done else "nothing to remove")
        return
    report = init(settings, list(schemas), list(tables), failover=failover)
    for w in report.warnings:
        _echo_err(f"warning: {w}")
    if report.nothing_to_do:
        click.echo("already initialised: nothing changed")
    else:
        click.echo("\n".join(report.changed))


@cli.command("capture")
@click.option("--once", is_flag=True, help="Stop after storing what was committed before start.")
@click.option(
    "--accept-gap",
    is_flag=True,
    help="Go on from a slot that is ahead of the store (records the gap).",
)
@pass_settings
def capture_cmd(settings: Settings, once: bool, accept_gap: bool) -> None:
    """Stream committed changes from the slot into the store, until SIGINT/SIGTERM.

    Example: undo capture --once
    """
    from .stream.capture import capture

    stopping = {"flag": False}

    def stop(signum: int, frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    report = capture(
        settings, once=once, accept_gap=accept_gap, should_stop=lambda: stopping["flag"]
    )
    _echo_err(f"captured {report.transactions} transaction(s), {report.changes} change(s)")


@cli.command("status")
@json_option
@pass_settings
def status_cmd(settings: Settings, as_json: bool) -> None:
    """Slot position, WAL held back, last capture and its lag, store size, unprepared tables.

    Example: undo status --json
    """
    from .status import status

    result = status(settings)
    if as_json:
        click.echo(render.to_json(result))
        return
    click.echo(render.fields(result))


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
        r["undone"] = render.undone(r["undone"])
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


def _echo_images(change: dict[str, Any], indent: str) -> None:
    """Old and new values as col=value (NULL for null; long values shortened: --json has them
    whole); for an update, the new row shows only what changed."""
    old, new = change["old"], change["new"]
    if old is not None:
        click.echo(f"{indent}old: {render.pairs(old)}")
    if new is not None:
        if old is not None:
            new = {k: v for k, v in new.items() if old.get(k) != v}
        click.echo(f"{indent}new: {render.pairs(new) if new else '(no value changed)'}")


def _print_show(result: dict[str, Any], as_json: bool, limit: int | None) -> None:
    if as_json:
        click.echo(render.to_json(result))
        return
    txns, totals = result["transactions"], result["totals"]
    click.echo(
        f"session {result['session_id']}: {totals['transactions']} transaction(s),"
        f" {totals['changes']} change(s)"
    )
    if result.get("undone"):
        click.echo(f"undone: {render.undone(result['undone'])}")
    for d in result.get("ddl") or []:
        click.echo(
            f"DDL {d['command']} {d['object'] or ''}  xid {d['xid']}  {d['commit_time']}"
            f"  statement: {d['statement'] or ''}"
            + ("" if d["tag"] == "trusted" else f"  tag {d['tag']} ({d['tag_reason']})")
        )
    for g in result.get("guard_refusals") or []:
        click.echo(
            f"refused by guard {g['guard']} at {g['refused_at']}"
            + (f" ({g['reason']})" if g["reason"] else "")
            + f": {g['statement'] or ''}"
            + ("" if g["tag"] == "trusted" else f"  tag {g['tag']} ({g['tag_reason']})")
        )
    for m in result.get("malformed") or []:
        click.echo(
            f"malformed {m['prefix']} message at {m['received_at']}  xid {m['xid'] or ''}:"
            f" {m['problem']} (kept in the store's malformed table, never used)"
        )
    if totals["rows"]:
        click.echo("\n" + render.table(totals["rows"], ["table", "operation", "rows"]))
    shown = [0]  # changes printed, by both lists: at most ``limit`` in all
    _print_transactions(txns, shown, limit)
    claims = result["untrusted"]
    total = totals["changes"] + claims["totals"]["changes"]
    if claims["transactions"]:  # listed apart: not the session's, not in its totals
        c = claims["totals"]
        click.echo(
            f"\nuntrusted: {c['transactions']} transaction(s), {c['changes']} change(s), claim"
            " this session with a tag that does not verify (not counted above; `undo session`"
            " leaves them out)"
        )
        if claims.get("undone"):
            click.echo(f"undone: {render.undone(claims['undone'])}")
        if c["rows"]:
            click.echo(render.table(c["rows"], ["table", "operation", "rows"]))
        _print_transactions(claims["transactions"], shown, limit)
    if shown[0] < total:
        click.echo(f"\n({total - shown[0]} more change(s): --limit N or --all to see them)")


def _print_transactions(txns: list[dict[str, Any]], shown: list[int], limit: int | None) -> None:
    """Each transaction and its changes, until ``shown[0]`` changes printed reach ``limit``."""
    for t in txns:
        if limit is not None and shown[0] >= limit:
            break
        click.echo(
            f"\nxid {t['xid']}  {t['commit_time']}  {t['application_name'] or ''}"
            f"  {t['user'] or ''}  tag {t['tag']}"
            + (f" ({t['tag_reason']})" if t.get("tag_reason") else "")
        )
        click.echo(f"  statement: {t['statement'] or ''}")
        statement = t["statement"]
        for c in t["changes"]:
            if limit is not None and shown[0] >= limit:
                break
            shown[0] += 1
            if c.get("statement", statement) != statement:  # a later statement's changes
                statement = c["statement"]
                click.echo(f"  statement: {statement or ''}")
            click.echo(f"  {c['op']:8} {c['table']}  {render.key(c['key_columns'], c['key'])}")
            _echo_images(c, "    ")


def _show_options(f: Any) -> Any:
    f = click.option("--all", "show_all", is_flag=True, help="Every change (no --limit).")(f)
    return click.option(
        "--limit", default=100, show_default=True, help="Print at most this many changes."
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
    _print_show(result, as_json, None if show_all else limit)


@show_group.command("xact")
@click.argument("xid", type=int)
@_show_options
@json_option
@pass_settings
def show_xact(settings: Settings, xid: int, limit: int, show_all: bool, as_json: bool) -> None:
    """A transaction's row changes.

    Example: undo show xact 7341
    """
    result = queries.show(open_store(settings.store), xid=xid)
    _print_show(result, as_json, None if show_all else limit)


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
        help="Let user triggers fire (no session_replication_role = replica).",
    ),
    click.option("--lock-timeout", default="5s", show_default=True, callback=_duration),
    click.option("--statement-timeout", default="0", show_default=True, callback=_duration),
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
    """Progress bars on stderr (a terminal, not --quiet): done/total, rate and ETA per phase."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.phase = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if phase != self.phase:
            from tqdm import tqdm

            self.close()
            self.phase = phase
            self.bar = tqdm(
                total=total, desc=f"undo: {phase}", unit="", file=sys.stderr, leave=False
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
    lock_timeout: str,
    statement_timeout: str,
) -> None:
    from .apply import undo
    from .plan import Target, parse_only

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
    report = run(bars)
    bars.close()
    for line in report.summary():
        _echo_err(line)
    if report.applied:
        _echo_err(f"applied in xid {report.undo_xid}")
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
@click.argument("xids", nargs=-1, required=True, type=int)
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
        raise _UserError("undo app needs --since (a time or an age such as 4h)", 2)
    _run_undo(settings, {"app": name}, **kw)


@cli.group("guard")
def guard_group() -> None:
    """Read-only guards: applications (glob patterns) that may not write to audited tables.

    A seatbelt against accidents, not a security boundary: a session picks its own
    application_name.
    """


@guard_group.command("add")
@click.argument("pattern")
@click.option("--reason", help="Shown in the error the refused script gets.")
@pass_settings
def guard_add(settings: Settings, pattern: str, reason: str | None) -> None:
    """Make applications matching PATTERN (* and ?) read-only on audited tables.

    Example: undo guard add 'usage-metrics*' --reason "reporting only"
    """
    from . import guard

    new = guard.add(settings, pattern, reason)
    _echo_err(f"guard {pattern} {'added' if new else 'updated'}")


@guard_group.command("remove")
@click.argument("pattern")
@pass_settings
def guard_remove(settings: Settings, pattern: str) -> None:
    """Remove a guard.

    Example: undo guard remove 'usage-metrics*'
    """
    from . import guard

    guard.remove(settings, pattern)
    _echo_err(f"guard {pattern} removed")


@guard_group.command("list")
@json_option
@pass_settings
def guard_list(settings: Settings, as_json: bool) -> None:
    """The guards and how many writes each refused (as far as the store knows).

    Example: undo guard list --json
    """
    from . import guard

    rows = guard.list_guards(settings)
    if as_json:
        click.echo(render.to_json(rows))
        return
    click.echo(render.table(rows, ["pattern", "reason", "created_at", "created_by", "refusals"]))


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
    from . import rewind

    if (to is None) == (as_of is None):
        raise _UserError("undo table needs exactly one of --to TIME and --as-of TIME", 2)
    if as_of is not None:
        if len(tables) != 1 or options["apply"]:
            raise _UserError("--as-of takes one table and changes nothing (no --apply)", 2)
        columns, rows = rewind.as_of(
            settings,
            tables[0],
            parse_time(as_of),
            where,
            lock_timeout=options["lock_timeout"],
            statement_timeout=options["statement_timeout"],
        )
        click.echo(render.to_json(rows) if as_json else render.table(rows, columns))
        return
    if where is not None or as_json:
        raise _UserError("--where and --json go with --as-of", 2)
    assert to is not None
    at = parse_time(to)
    _report(
        lambda progress: rewind.rewind(
            settings, tables, at, out=sys.stdout, progress=progress, **options
        )
    )


@cli.command("history")
@click.argument("table")
@click.argument("key", nargs=-1, required=True)
@json_option
@pass_settings
def history_cmd(settings: Settings, table: str, key: tuple[str, ...], as_json: bool) -> None:
    """Every recorded version of one row, oldest first, with who changed it.

    Example: undo history public.accounts id=42
    """
    rows = queries.history(open_store(settings.store), table, queries.parse_key(list(key)))
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
        if r["undo_of"] is not None:  # its statement is only the undo's first one
            click.echo(f"  undo of: {json.dumps(r['undo_of'], ensure_ascii=False)}")
        else:
            click.echo(f"  statement: {r['statement']}")
        _echo_images(r, "  ")


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
    from .timespec import parse_bucket

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


@cli.command("prune")
@click.option("--before", required=True, help="ISO 8601 time or age (30d).")
@pass_settings
def prune_cmd(settings: Settings, before: str) -> None:
    """Delete history committed before a time, whole sessions only; keeps the undo ledger.

    Example: undo prune --before 90d
    """
    from .store.prune import prune

    r = prune(open_store(settings.store), parse_time(before))
    click.echo(
        f"removed {r.transactions} transaction(s), {r.changes} change(s) of"
        f" {r.sessions} session(s); kept {r.kept_sessions} session(s) that go on after"
        f" that time; store {r.bytes_before} -> {r.bytes_after} bytes"
    )


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option(
    "--token",
    envvar="UNDO_TOKEN",
    show_envvar=True,
    help="Required on any address but loopback; checked on every request.",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="A host name requests may use besides loopback and the address served (repeatable).",
)
@pass_settings
def serve_cmd(
    settings: Settings, host: str, port: int, token: str | None, allowed_hosts: tuple[str, ...]
) -> None:
    """The dashboard and Prometheus /metrics (read-only).

    Example: undo serve --port 8080
    """
    from .web import serve

    server = serve(settings, host, port, token, allowed_hosts)
    _echo_err(f"serving http://{host}:{server.server_port}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@cli.command("demo")
@click.option("--keep", is_flag=True, help="Keep the audit store file afterwards.")
@click.option("--guard", is_flag=True, help="Declare the script read-only first: its delete fails.")
def demo_cmd(keep: bool, guard: bool) -> None:
    """The incident end to end on a throwaway PostgreSQL it starts itself.

    Example: undo demo --guard
    """
    from .demo import run_demo

    if not run_demo(click.echo, keep=keep, guard=guard):
        sys.exit(1)


def main() -> None:
    cli(prog_name="undo")
