"""The root command and what every command shares: the connection options, errors as one
line and an exit code, --json."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import click
import psycopg

from undo.cli import json_asked, json_line, render
from undo.core.config import Settings
from undo.core.errors import Interrupted, UndoError
from undo.source.pg import connect_failure
from undo.store import store_fault


class UserError(click.ClickException):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]

    #: under --log-format json (set where it is raised, _guarded)
    as_json = False

    def show(self, file: Any = None) -> None:
        """``Error: ...``; under --log-format json one JSON object, as every other line on
        stderr is then (a service's log collector reads one format)."""
        if not self.as_json:
            super().show(file)
            return
        click.echo(
            json_line("error", self.message, exit_code=self.exit_code), file=file or sys.stderr
        )


#: what Ctrl-C leaves behind, by command (the others: nothing that needs saying)
INTERRUPTED = {
    "init": "init stopped part way: run `undo init` again (it is idempotent)",
    "prune": "the batches already deleted stay deleted: run `undo prune` again to go on",
    **dict.fromkeys(
        ("session", "xact", "app", "table"),
        "nothing was applied: an undo is one transaction, rolled back unless it committed"
        " (`undo sessions` shows what is undone)",
    ),
}


def _one_line(ctx: click.Context, e: BaseException) -> UserError | None:
    """Any failure as one line and its exit code; None for click's own exceptions, which
    click shows. An error of undo's is its message (UndoError); the store's and the source's
    are named by SQLite's result code and the SQLSTATE; anything else is a bug, shown with its
    traceback under -v."""
    if isinstance(e, click.ClickException | click.exceptions.Exit | click.Abort):
        return None
    if isinstance(e, KeyboardInterrupt):
        note = INTERRUPTED.get(ctx.command.name or "")
        e = Interrupted("interrupted (Ctrl-C)" + (f": {note}" if note else ""))
    if not isinstance(e, UndoError):  # the store's own errors, by its result codes
        store = ctx.meta.get("undo.settings", ctx.find_root().obj)
        e = store_fault(e, store.store if store else "?") or e
    if isinstance(e, UndoError):
        return UserError(str(e), e.exit_code)
    if isinstance(e, psycopg.OperationalError) and e.sqlstate is None:  # no server's answer
        return UserError(f"lost the source database: {connect_failure(e)}", 2)
    if isinstance(e, psycopg.Error) and e.sqlstate is not None:
        return UserError(
            f"the source database refused: {e.diag.message_primary or connect_failure(e)}"
            f" (SQLSTATE {e.sqlstate})",
            1,
        )
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return UserError(f"{e.strerror or e}{where}", 2)
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return None  # -v: the traceback
    return UserError(
        f"internal error ({type(e).__name__}: {e}): a bug in undo; run the command again with"
        " -v (before the command) for its traceback, and report it",
        1,
    )


def _guarded(ctx: click.Context, run: Callable[[], Any], args: list[str] | None = None) -> Any:
    try:
        return _one_line_errors(ctx, run)
    except UserError as e:
        # the root's own arguments refused: --log-format json among them still asks for JSON
        e.as_json = _as_json(ctx) or (ctx.parent is None and args is not None and json_asked(args))
        raise


def _one_line_errors(ctx: click.Context, run: Callable[[], Any]) -> Any:
    try:
        return run()
    except click.UsageError as e:
        # one line, not usage and a hint: what is wrong and where the help is
        path = e.ctx.command_path if e.ctx is not None else "undo"
        raise UserError(f"{e.format_message()} (see `{path} --help`)", 2) from None
    except BrokenPipeError:
        # `undo ... | head`: the reader has what it wanted. Quiet, as a command killed by
        # SIGPIPE would be (and nothing more written to the closed pipe at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise click.exceptions.Exit(141) from None
    except (Exception, KeyboardInterrupt) as e:
        line = _one_line(ctx, e)
        if line is None:
            raise
        raise line from None


class Command(click.Command):
    """Turns any failure into one line on stderr and its exit code (_one_line)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return _guarded(ctx, lambda: super(Command, self).parse_args(ctx, args))  # type: ignore[no-any-return]

    def invoke(self, ctx: click.Context) -> Any:
        return _guarded(ctx, lambda: super(Command, self).invoke(ctx))


class Group(click.Group):
    """Every command under it, nested groups' included, translates failures (Command); and
    so does the group itself (an unknown command or option)."""

    command_class = Command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        given = list(args)  # click's parser consumes args as it goes
        return _guarded(ctx, lambda: super(Group, self).parse_args(ctx, args), given)  # type: ignore[no-any-return]

    def invoke(self, ctx: click.Context) -> Any:
        return _guarded(ctx, lambda: super(Group, self).invoke(ctx))


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
    help="The audit store: a SQLite file, or a PostgreSQL database (postgresql:// URI or"
    " conninfo string; the schema undo_store there).",
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
@click.option(
    "--source",
    "sources",
    envvar="UNDO_SOURCE",
    show_envvar=True,
    multiple=True,
    help="A source of the store by its name (repeatable: listings cover these; without it,"
    " every source). A command acting on one source: default the --dsn database's, else the"
    " store's only one.",
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
    sources: tuple[str, ...],
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
    ctx.meta["undo.quiet"] = quiet
    try:
        ctx.obj = Settings(dsn=dsn, store=store, slot=slot, decoder=decoder, sources=sources)
    except UndoError as e:
        raise UserError(str(e), e.exit_code) from None


#: --dsn, --store, --slot, --decoder, --source also after the command name (`undo init --decoder
#: wal2json`); there they win over the same option before it, which wins over the environment.
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
    click.option(
        "--source",
        "sources",
        multiple=True,
        help="A source of the store (as before the command; repeatable for listings).",
    ),
]


def pass_settings(f: Any) -> Any:
    """Like click.pass_obj for the Settings, with the connection options taken after the
    command name too."""

    @click.pass_context
    @functools.wraps(f)
    def wrapper(ctx: click.Context, /, *args: Any, **kw: Any) -> Any:
        given = {k: kw.pop(k) for k in ("dsn", "store", "slot", "decoder", "sources")}
        settings = dataclasses.replace(
            ctx.obj, **{k: v for k, v in given.items() if v is not None and v != ()}
        )
        ctx.meta["undo.settings"] = settings  # the store an error names
        return f(settings, *args, **kw)

    for opt in reversed(_AFTER):
        wrapper = opt(wrapper)
    return wrapper


_DURATION = re.compile(r"^\s*\d+(\.\d+)?\s*(us|ms|s|min|h|d)?\s*$")


def duration(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A timeout as PostgreSQL reads one (5s, 500ms, 2min, 0 = none), checked before anything
    connects."""
    if not _DURATION.match(value):
        raise UserError(
            f"malformed --{param.name.replace('_', '-') if param.name else 'timeout'}"
            f" {value!r}: use a PostgreSQL duration such as 5s, 500ms, 2min, or 0 for none",
            2,
        )
    return value.strip()


#: a transaction id as the store keeps it (a 32-bit xid, or a 64-bit one from a tag: SQLite's
#: INTEGER holds up to 2**63 - 1)
XID = click.IntRange(0, 2**63 - 1)


def json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")(f)


def _as_json(ctx: click.Context | None) -> bool:
    """--log-format json given (and parsed) to the root command of ``ctx``."""
    return ctx is not None and ctx.find_root().params.get("log_format") == "json"


def echo_err(message: str, level: int = logging.INFO, **fields: Any) -> None:
    """A line on stderr for the person at the terminal (a warning: ``warning: `` before it);
    under --log-format json one JSON object, its level and fields, as every line there is."""
    if not _as_json(click.get_current_context(silent=True)):
        prefix = "warning: " if level == logging.WARNING else ""
        click.echo(prefix + message, err=True)
        return
    click.echo(json_line(logging.getLevelName(level).lower(), message, **fields), err=True)


def info(message: str, **fields: Any) -> None:
    """A line on stderr that says how it went (a summary), left out under -q."""
    if not click.get_current_context().find_root().meta.get("undo.quiet"):
        echo_err(message, **fields)
