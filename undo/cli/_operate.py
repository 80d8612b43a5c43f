"""Setting up and running undo: init, capture, status, guards, prune, serve, the demo."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import click

from undo.cli import render
from undo.cli._app import (
    cli,
    echo_err,
    info,
    json_option,
    pass_settings,
)
from undo.core.config import Settings
from undo.core.times import parse_age, parse_time
from undo.store import open_store


@cli.command("init")
@click.option(
    "--schema",
    "schemas",
    multiple=True,
    help="Audit every table of this schema (repeatable).  [default: public, when no --schema"
    " or --table is given]",
)
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
    help="PostgreSQL 17+: a failover slot, kept in step on standbys (see docs/operations.md).",
)
@click.option(
    "--statements",
    type=click.Choice(["each", "first"]),
    help="Which statements of a transaction its changes are attributed to, for the whole"
    " database: each (every change its own statement) or first (the transaction's first"
    " statement: cheaper for many-statement transactions, see docs/performance.md).  [default:"
    " each on a new install; kept when not given]",
)
@click.option(
    "--reregister",
    is_flag=True,
    help="Give the source named by --source this database's identity: the same database on a"
    " new server (pg_upgrade, a restore). Capture goes on from this slot's position.",
)
@pass_settings
def init_cmd(
    settings: Settings,
    schemas: tuple[str, ...],
    tables: tuple[str, ...],
    uninstall: bool,
    failover: bool,
    statements: str | None,
    reregister: bool,
) -> None:
    """Make the source database ready: trigger, replica identity, publication, slot, store.

    Audits the schemas given (--schema, --table), or only the schema public when none is:
    tables of other schemas are not captured (init names them).

    Example: undo --dsn postgresql://admin@db/shop init --schema public --schema billing
    """
    from undo.source.install import init
    from undo.source.install import uninstall as do_uninstall

    if uninstall:
        done = do_uninstall(settings)
        click.echo("\n".join(done) if done else "nothing to remove")
        return
    report = init(
        settings,
        list(schemas),
        list(tables),
        failover=failover,
        statements=statements,
        source=settings.source,
        reregister=reregister,
    )
    for w in report.warnings:
        echo_err(w, logging.WARNING)
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
@click.option(
    "--keep",
    metavar="AGE",
    help="Prune history older than this (90d, 12w) as it goes, a small batch at a time"
    " (by the rule of `undo prune`).",
)
@pass_settings
def capture_cmd(settings: Settings, once: bool, accept_gap: bool, keep: str | None) -> None:
    """Stream committed changes from the slot into the store, until SIGINT/SIGTERM.

    Exit codes: 0 stopped by a signal (or --once done); 75 the source database went away
    and reconnecting failed, or a capture that exited still holds the slot (a restart puts it
    right); 1 a gap refused, another consumer holds the slot; 2 bad options, the store
    corrupt, full or read-only (a person must act). See docs/operations.md, "Running capture as a
    service".

    Example: undo capture --keep 90d
    """
    from undo.stream.capture import capture

    keep_seconds = parse_age(keep, "--keep", "an age such as 90d or 12w") if keep else None
    stopping = {"flag": False}

    def stop(signum: int, frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    report = capture(
        settings,
        once=once,
        accept_gap=accept_gap,
        should_stop=lambda: stopping["flag"],
        keep=keep_seconds,
    )
    info(
        f"captured {report.transactions} transaction(s), {report.changes} change(s)",
        transactions=report.transactions,
        changes=report.changes,
    )


@cli.command("check")
@click.option(
    "--max-lag",
    default="5m",
    show_default=True,
    metavar="AGE",
    help="Capture lag (the oldest commit not yet stored) over this is a problem.",
)
@json_option
@pass_settings
def check_cmd(settings: Settings, max_lag: str, as_json: bool) -> None:
    """What this store audits and what is wrong with it, each with its fix; exit 1 if anything.

    Checks the audited tables (undo's trigger, REPLICA IDENTITY FULL, logged), the slot (there,
    this database's, the store's decoder, not ahead of the store), the publication, capture lag,
    open gaps, and the store (SQLite's quick_check, which reads all of it).

    Example: undo check --max-lag 10m
    """
    from undo.source.status import check

    result = check(settings, float(parse_age(max_lag, "--max-lag", "an age such as 5m or 1h")))
    click.echo(render.to_json(result) if as_json else render.check(result))
    if not result["ok"]:
        sys.exit(1)


@cli.command("status")
@json_option
@pass_settings
def status_cmd(settings: Settings, as_json: bool) -> None:
    """Slot position, WAL held back, last capture and its lag, store size, unprepared tables.

    Example: undo status --json
    """
    from undo.source.status import status

    result = status(settings)
    if as_json:
        click.echo(render.to_json(result))
        return
    click.echo(render.fields(result))


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
    from undo.source import guards as guard

    new = guard.add(settings, pattern, reason)
    info(f"guard {pattern} {'added' if new else 'updated'}")


@guard_group.command("remove")
@click.argument("pattern")
@pass_settings
def guard_remove(settings: Settings, pattern: str) -> None:
    """Remove a guard.

    Example: undo guard remove 'usage-metrics*'
    """
    from undo.source import guards as guard

    guard.remove(settings, pattern)
    info(f"guard {pattern} removed")


@guard_group.command("list")
@json_option
@pass_settings
def guard_list(settings: Settings, as_json: bool) -> None:
    """The guards and how many writes each refused (as far as the store knows).

    Example: undo guard list --json
    """
    from undo.source import guards as guard

    rows = guard.list_guards(settings)
    if as_json:
        click.echo(render.to_json(rows))
        return
    click.echo(render.table(rows, ["pattern", "reason", "created_at", "created_by", "refusals"]))


@cli.command("prune")
@click.option("--before", required=True, help="ISO 8601 time or age (30d).")
@pass_settings
def prune_cmd(settings: Settings, before: str) -> None:
    """Delete history recorded before a time, per transaction; keeps the undo ledger.

    A session that goes on after the cut keeps only its later transactions. On a PostgreSQL
    store the cut is the start of the partition that holds the time (partitions are dropped).

    Example: undo prune --before 90d
    """
    with open_store(settings.store) as db:
        r = db.prune(parse_time(before))
    click.echo(
        f"removed {r.transactions} transaction(s), {r.changes} change(s) of"
        f" {r.sessions} session(s) committed before {r.cut}; {r.kept_sessions} session(s)"
        f" go on after it and keep their later transactions only; store {r.bytes_before}"
        f" -> {r.bytes_after} bytes"
    )


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port (0: any free one, printed).",
)
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
@click.option(
    "--trusted-proxy",
    envvar="UNDO_TRUSTED_PROXY",
    show_envvar=True,
    metavar="ADDR",
    help="IP address of the TLS proxy in front: its X-Forwarded-Proto (https: the sign-in"
    " cookie is Secure) and X-Forwarded-For are believed; from any other peer, ignored.",
)
@pass_settings
def serve_cmd(
    settings: Settings,
    host: str,
    port: int,
    token: str | None,
    allowed_hosts: tuple[str, ...],
    trusted_proxy: str | None,
) -> None:
    """The dashboard and Prometheus /metrics (read-only). Exposed beyond this machine, put a
    TLS proxy in front (and give --trusted-proxy).

    Example: undo serve --host 127.0.0.1 --port 8080 --trusted-proxy 127.0.0.1
    """
    from undo.web import serve

    server = serve(settings, host, port, token, allowed_hosts, trusted_proxy)
    info(f"serving http://{host}:{server.server_port}/ (Ctrl-C to stop)")
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
    from undo.demo import run_demo

    if not run_demo(click.echo, render.table, keep=keep, guard=guard):
        sys.exit(1)


@cli.group("store")
def store_group() -> None:
    """The audit store as a whole: copy it into another (SQLite file or PostgreSQL database)."""


@store_group.command("copy")
@click.option(
    "--to",
    "target",
    required=True,
    help="The store to copy into: an SQLite file or a PostgreSQL database (postgresql:// URI or"
    " conninfo), made when there is none; it must hold nothing.",
)
@pass_settings
def store_copy(settings: Settings, target: str) -> None:
    """Copy the whole store (every source, transaction, change, gap, DDL record, guard refusal
    and undo, and where capture is) into an empty store, from one consistent snapshot: capture
    may go on writing meanwhile. Capture pointed at the copy goes on from the snapshot's
    position.

    Example: undo --store undo.db store copy --to postgresql://undo@audit-db/audit
    """
    from undo.core.wal import int_to_lsn
    from undo.store import shown
    from undo.store.copy import copy_store

    quiet = click.get_current_context().find_root().meta.get("undo.quiet")

    def progress(table: str, n: int, total: int) -> None:
        if not quiet:
            echo_err(f"copying {table}: {n}/{total} rows", table=table, rows=n, total=total)

    done = copy_store(settings.store, target, progress)
    positions = ", ".join(
        f"{name} at {'none' if lsn is None else int_to_lsn(int(lsn))}"
        for name, lsn in done.positions.items()
    )
    info(
        f"copied {done.rows.get('transactions', 0)} transaction(s) and"
        f" {done.rows.get('changes', 0)} change(s) to {shown(target)}; capture into it goes on"
        f" from: {positions or 'no source'}"
    )
