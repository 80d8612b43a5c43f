"""`undo demo`: the incident end to end on a throwaway PostgreSQL.

A ticketing database, a web workload writing all along, and a routine "usage-metrics" script
with a bug: it deletes the events of 7% of accounts (their tickets and registrations go with
them, ON DELETE CASCADE). Capture records it all; on-call finds the session, reviews the
script, applies it; every deleted row comes back and the web's writes stay.

With ``guard``, the script is declared read-only first (undo guard): its delete fails, nothing
is lost, and the refused attempt is in the store and on the dashboard.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from werkzeug.test import Client

from undo.core.config import Settings
from undo.demo.cluster import TempCluster
from undo.engine.apply import undo
from undo.engine.plan import Target
from undo.source import guards
from undo.source.install import init
from undo.store import open_store
from undo.stream.capture import capture
from undo.web.app import make_app

SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL, email text,
                       last_login timestamptz);
CREATE TABLE events (id int PRIMARY KEY, account_id int NOT NULL REFERENCES accounts
                     ON DELETE CASCADE, title text NOT NULL, starts_at timestamptz,
                     capacity int, details jsonb, price numeric(10, 2));
CREATE TABLE tickets (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                      event_id int NOT NULL REFERENCES events ON DELETE CASCADE,
                      holder text, seat text, paid numeric(10, 2));
CREATE TABLE registrations (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                            event_id int NOT NULL REFERENCES events ON DELETE CASCADE,
                            email text, at timestamptz DEFAULT now());
INSERT INTO accounts SELECT g, 'Account ' || g, 'owner' || g || '@example.com', now()
  FROM generate_series(1, 1000) g;
INSERT INTO events SELECT g, 1 + (g * 7919) % 1000, 'Event ' || g || E' \u2014 "live"',
       '2026-12-01 19:30+01'::timestamptz + g * interval '1 hour', 50 + g % 200,
       jsonb_build_object('venue', 'Hall ' || g % 12, 'tags', jsonb_build_array('music', g)),
       (g % 90) + 0.99
  FROM generate_series(1, 5000) g;
INSERT INTO tickets (event_id, holder, seat, paid)
  SELECT 1 + g % 5000, 'Holder ' || g, chr(65 + g % 20) || g % 30, (g % 90) + 0.99
  FROM generate_series(1, 20000) g;
INSERT INTO registrations (event_id, email)
  SELECT 1 + g % 5000, 'fan' || g || '@example.org' FROM generate_series(1, 5000) g;
"""

BUGGY_SCRIPT = """
-- usage-metrics: meant to count events per account; instead it deletes them
DELETE FROM events WHERE account_id IN (SELECT id FROM accounts WHERE id % 100 < 7)
"""

LOCK_EVENTS = "SELECT FROM events WHERE account_id % 100 < 7 FOR UPDATE"

AFFECTED = """
SELECT 'events', e::text FROM events e WHERE account_id % 100 < 7
UNION ALL SELECT 'tickets', t::text FROM tickets t JOIN events e ON e.id = t.event_id
  WHERE e.account_id % 100 < 7
UNION ALL SELECT 'registrations', r::text FROM registrations r JOIN events e ON e.id = r.event_id
  WHERE e.account_id % 100 < 7
"""


def _web(dsn: str, stop: threading.Event, written: list[int], errors: list[BaseException]) -> None:
    """The web application: registrations and logins, all through the incident. Its error
    goes to ``errors`` (raised by _Background.stop), never to the thread's traceback."""
    try:
        _write(dsn, stop, written)
    except psycopg.Error as e:
        errors.append(e)


def _write(dsn: str, stop: threading.Event, written: list[int]) -> None:
    rnd = random.Random(7)
    with psycopg.connect(dsn, autocommit=True, application_name="web") as conn:
        while not stop.is_set():
            account = rnd.randint(1, 1000)
            conn.execute("UPDATE accounts SET last_login = now() WHERE id = %s", (account,))
            try:
                row = conn.execute(
                    "INSERT INTO registrations (event_id, email) VALUES (%s, %s) RETURNING id",
                    (rnd.randint(1, 5000), f"web{rnd.randint(1, 10**6)}@example.net"),
                ).fetchone()
                if row:
                    written.append(int(row[0]))
            except psycopg.errors.ForeignKeyViolation:
                pass  # the event is gone (for now): the web app shows an error page
            time.sleep(0.005)


class _Background:
    """What runs all through the incident: capture streaming into the store, and the web app
    writing. ``stop`` stops both and stores what capture had not yet."""

    def __init__(self, settings: Settings, dsn: str) -> None:
        self.settings = settings
        self.written: list[int] = []
        self._stop_capture = threading.Event()
        self._stop_web = threading.Event()
        self._error: list[BaseException] = []
        self._capture = threading.Thread(target=self._run_capture, daemon=True)
        self._capture.start()
        self._web = threading.Thread(
            target=_web, args=(dsn, self._stop_web, self.written, self._error), daemon=True
        )
        self._web.start()

    def _run_capture(self) -> None:
        try:
            capture(self.settings, should_stop=self._stop_capture.is_set)
        except Exception as e:  # raised by stop()
            self._error.append(e)

    def stop(self) -> None:
        self.halt()
        if self._error:
            raise self._error[0]
        capture(self.settings, once=True)

    def halt(self) -> None:
        """Stop both threads (also when the demo was interrupted: before its server goes)."""
        self._stop_web.set()
        self._web.join()
        self._stop_capture.set()
        self._capture.join()


#: how the demo lays out rows: the caller's (the CLI's render.table), so the demo sits below it
Table = Callable[[Sequence[dict[str, Any]], Sequence[str]], str]


def run_demo(
    say: Callable[[str], None], table: Table, keep: bool = False, guard: bool = False
) -> bool:
    """Play the incident; return True if every row came back (with ``guard``: none was lost
    and the refusal is recorded) and the web writes stayed."""
    start = time.monotonic()
    say("1. Starting a throwaway PostgreSQL (initdb, wal_level=logical) ...")
    with TempCluster() as cluster:
        admin = cluster.admin_dsn
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute("CREATE DATABASE tickets")
        dsn = cluster.dsn("tickets")
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(SCHEMA.encode())
        say(
            "   ticketing schema: 1,000 accounts, 5,000 events, 20,000 tickets, 5,000 registrations"
        )
        workdir = tempfile.mkdtemp(prefix="undo-demo-")
        try:
            return _incident(say, table, dsn, workdir, keep, guard, start)
        finally:
            if not keep:  # the demo's own folder, with whatever the store kept in it
                shutil.rmtree(workdir, ignore_errors=True)


def _incident(
    say: Callable[[str], None],
    table: Table,
    dsn: str,
    workdir: str,
    keep: bool,
    guard: bool,
    start: float,
) -> bool:
    """The incident on the throwaway server, its store in ``workdir``."""
    settings = Settings(dsn=dsn, store=os.path.join(workdir, "undo.db"), slot="undo")
    say("\n2. undo init: REPLICA IDENTITY FULL, tagging trigger, publication, slot")
    for line in init(settings, ["public"], []).changed:
        say(f"   {line}")
    if guard:
        say("   undo guard add 'usage-metrics*' --reason 'reporting only: it must not write'")
        guards.add(settings, "usage-metrics*", "reporting only: it must not write")

    background = _Background(settings, dsn)
    try:
        return _played(say, table, settings, dsn, background, keep, guard, start)
    finally:
        background.halt()  # interrupted: before the server stops under them


def _played(
    say: Callable[[str], None],
    table: Table,
    settings: Settings,
    dsn: str,
    background: _Background,
    keep: bool,
    guard: bool,
    start: float,
) -> bool:
    """From capture streaming to the check."""
    say("\n3. undo capture is streaming; the web app is writing")
    time.sleep(1.0)

    say("\n4. 03:12 - the routine usage-metrics script runs, with its bug:")
    say("   " + BUGGY_SCRIPT.strip().splitlines()[-1])
    with psycopg.connect(dsn, application_name="usage-metrics") as c:
        # the rows the script deletes, exactly: the events locked first, a registration
        # the web adds for one waits (then fails on the foreign key) instead of joining
        # the cascade unseen (2110 deletes undone, "2109 rows" restored)
        c.execute(LOCK_EVENTS)
        before = sorted(c.execute(AFFECTED).fetchall())
        try:
            c.execute(BUGGY_SCRIPT)
            c.commit()
        except psycopg.errors.ReadOnlySqlTransaction as e:
            c.rollback()
            say(f"   ERROR: {e.diag.message_primary}")
    if guard:
        background.stop()
        return _guarded_end(say, table, settings, dsn, before, keep, start)
    gone = {k: sum(1 for r in before if r[0] == k) for k in ("events", "tickets", "registrations")}
    say(
        f"   deleted the {gone['events']} events of 7% of accounts, and by cascade about"
        f" {gone['tickets']} tickets and {gone['registrations']} registrations"
    )
    time.sleep(1.0)
    background.stop()
    with psycopg.connect(dsn, autocommit=True) as c:
        logins = c.execute("SELECT id, last_login FROM accounts ORDER BY id").fetchall()

    say("\n5. On-call: undo sessions --app usage-metrics")
    rows = open_store(settings.store).sessions(app="usage-metrics")
    for line in table(
        [r.to_json() for r in rows],
        [
            "session_id",
            "application_name",
            "user",
            "transactions",
            "inserts",
            "updates",
            "deletes",
            "tables",
        ],
    ).splitlines():
        say(f"   {line}")
    sid = rows[0].session_id
    assert sid is not None  # the script's session: tagged

    say(f"\n6. undo session {sid}   (the script to review, first lines)")
    buf = io.StringIO()
    preview = undo(settings, Target(session=sid), out=buf)
    lines = buf.getvalue().splitlines()
    for line in [x for x in lines if not x.startswith("SELECT set_config")][:8]:
        say(f"   {line[:100]}")
    say(f"   ... {len(lines)} lines in all")
    for line in preview.summary():
        say(f"   {line}")

    say(f"\n7. undo session {sid} --apply")
    report = undo(settings, Target(session=sid), apply=True)
    for line in report.summary():
        say(f"   {line}")
    say(f"   applied atomically in xid {report.undo_xid}")

    say("\n8. Check: every deleted row is back, exactly; the web's writes are intact")
    with psycopg.connect(dsn, autocommit=True) as c:
        after = sorted(c.execute(AFFECTED).fetchall())
        kept = c.execute(
            "SELECT count(*) FROM registrations WHERE id = ANY (%s)", (background.written,)
        ).fetchone()
        logins_after = c.execute("SELECT id, last_login FROM accounts ORDER BY id").fetchall()
    restored = set(before) <= set(after)
    web_ok = kept is not None and kept[0] == len(background.written) and logins_after == logins
    say(f"   deleted rows restored exactly: {'yes' if restored else 'NO'} ({len(before)} rows)")
    say(
        f"   web writes intact: {'yes' if web_ok else 'NO'}"
        f" ({len(background.written)} registrations, {len(logins)} accounts' last_login)"
    )
    _done(say, settings, keep, start)
    return restored and web_ok


def _guarded_end(
    say: Callable[[str], None],
    table: Table,
    settings: Settings,
    dsn: str,
    before: list[Any],
    keep: bool,
    start: float,
) -> bool:
    """The guarded incident after the script ran: nothing lost, the refusal recorded."""
    say("\n5. On-call: undo sessions --app usage-metrics")
    db = open_store(settings.store)
    rows = db.sessions(app="usage-metrics")
    for line in table(
        [r.to_json() for r in rows],
        ["session_id", "application_name", "user", "transactions", "deletes", "guard_refusals"],
    ).splitlines():
        say(f"   {line}")
    refusals = db.guard_refusals()
    say("\n6. The dashboard (undo serve) lists it under 'Writes refused by guards':")
    page = Client(make_app(settings)).get("/", headers={"Host": "127.0.0.1"}).get_data()
    on_dashboard = b"usage-metrics*" in page
    for r in refusals:
        statement = " ".join(
            line for line in (r.statement or "").splitlines() if not line.startswith("--")
        )
        say(f"   {r.refused_at}  {r.guard}  {r.application_name}:  {statement.strip()}")
    say("\n7. Check: nothing was lost")
    with psycopg.connect(dsn, autocommit=True) as c:
        after = sorted(c.execute(AFFECTED).fetchall())
    intact = set(before) <= set(after)  # the web kept adding registrations
    say(
        f"   the rows the script meant to delete are all there: {'yes' if intact else 'NO'}"
        f" ({len(before)} rows)"
    )
    say(
        f"   the refusal is stored and on the dashboard: "
        f"{'yes' if refusals and on_dashboard else 'NO'}"
    )
    _done(say, settings, keep, start)
    return intact and bool(refusals) and on_dashboard


def _done(say: Callable[[str], None], settings: Settings, keep: bool, start: float) -> None:
    say(
        f"\nDone in {time.monotonic() - start:.1f}s. The audit store was {settings.store}"
        + ("" if keep else " (removed)")
    )
