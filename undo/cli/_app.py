"""The root command and what every command shares: the connection options, errors as one
line and an exit code, --json."""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import sys
from typing import Any

import click

from undo.cli import render
from undo.core.config import Settings
from undo.core.errors import UndoError


class UserError(click.ClickException):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]


class Command(click.Command):
    """Turns an UndoError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UndoError as e:
            raise UserError(str(e), e.exit_code) from None


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
        raise UserError(str(e), e.exit_code) from None


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


def json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")(f)


def echo_err(message: str) -> None:
    click.echo(message, err=True)
