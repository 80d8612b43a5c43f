"""The dashboard: Werkzeug for requests and routing, Jinja2 templates (autoescaped) for the
pages, waitress to serve them. Server-rendered HTML with inline SVG charts: nothing is fetched
from the network, so it works on closed machines. Read-only: nothing is applied from the web.

Any address other than loopback needs a token, checked on every request (``Authorization:
Bearer``, or the session cookie the sign-in form sets: a random value, never the token);
without it a request sees no data. Wrong tokens are limited per client address.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import waitress.adjustments
import waitress.channel
import waitress.server
import waitress.task
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape
from prometheus_client.exposition import generate_latest
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.utils import redirect
from werkzeug.wrappers import Request, Response

from undo.core import words
from undo.core.config import Settings
from undo.core.errors import BadInput, NotFound, NotRecorded, UndoError
from undo.core.times import epoch, parse_time
from undo.core.wal import int_to_lsn
from undo.source import keyforms
from undo.store import across, open_store
from undo.store.api import (
    ActivityBucket,
    DdlCommand,
    GuardRefusal,
    RowChange,
    SessionRow,
    Store,
    Transaction,
    Undone,
    split_claims,
)
from undo.web import metrics

log = logging.getLogger(__name__)
PAGE = 50
PREVIEW_LIMIT = 5000

CSS = Markup(
    "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}"
    "header{background:#1d2330;color:#fff;padding:10px 20px}header a{color:#fff;margin-right:18px}"
    "main{padding:16px 20px}table{border-collapse:collapse;background:#fff;width:100%}"
    "td,th{border:1px solid #dde;padding:4px 6px;text-align:left;vertical-align:top}"
    "th{background:#eef}.changed{background:#ffe08a}.del{color:#b00}.ins{color:#070}"
    "pre{background:#fff;border:1px solid #dde;padding:8px;overflow:auto;max-height:480px}"
    ".cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #dde;"
    "padding:8px}.muted{color:#667}form.filters input{width:140px}code{font-size:12px}"
    "header form{display:inline;float:right}"
)
OP_COLORS = {"inserts": "#2a9d3a", "updates": "#e0a000", "deletes": "#d03030"}

#: on every response: no script, no framing, no type sniffing (the pages are HTML and inline
#: SVG with inline styles only)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline';"
    " img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_FORM_BYTES = 4096  # the login form; waitress refuses a larger body before reading it
COOKIE = "undo_session"
SESSION_SECONDS = 12 * 3600  # a sign-in lasts this long (or until sign-out, or a restart)
MAX_SESSIONS = 1000
FAILED_BURST = 5  # wrong tokens a client address may give at once,
FAILED_PER_SECOND = 1.0  # and then this many a second (more: 429 and Retry-After)
MAX_CLIENTS = 10000  # addresses remembered by the limit

URLS = Map(
    [
        # read-only: GET (and HEAD) only; another method is 405
        Rule("/", endpoint="overview", methods=["GET"]),
        Rule("/sessions", endpoint="sessions", methods=["GET"]),
        Rule("/sessions/<path:session_id>", endpoint="session", methods=["GET"]),
        Rule("/history/<path:table>", endpoint="history", methods=["GET"]),
        Rule("/metrics", endpoint="metrics", methods=["GET"]),
        Rule("/login", endpoint="login", methods=["GET", "POST"]),
        Rule("/logout", endpoint="logout", methods=["POST"]),
    ],
    strict_slashes=False,
)


#: the query parameters each page takes; any other is a 400 (ignored, `/?bucket=0m` looked
#: like a chart of 0-minute buckets). A row's history takes its key's columns: any name.
PARAMETERS = {
    "overview": ("since", "source"),
    "sessions": ("app", "page", "since", "source", "table", "until", "user"),
    "session": ("page", "source", "tpage"),
    "metrics": ("source",),
}


def _unknown_parameter(endpoint: str, q: Any) -> None:
    """A parameter the page does not take, or a NUL in any (no text the store holds has one;
    PostgreSQL refuses it in a query's text parameter): BadInput."""
    for name, value in q.items(multi=True):
        if "\x00" in name or "\x00" in value:
            raise BadInput(f"parameter {_shown(name)} holds a NUL character")
    takes = PARAMETERS.get(endpoint)
    if takes is None:
        return
    for name in q:
        if name not in takes:
            raise BadInput(f"unknown parameter {_shown(name)}: this page takes {', '.join(takes)}")


def _templates() -> Environment:
    env = Environment(
        loader=PackageLoader("undo.web", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["q"] = lambda s: quote(str(s), safe="")  # one path segment
    env.filters["qs"] = urlencode  # a query string
    env.filters["jsontext"] = lambda v: json.dumps(v, ensure_ascii=False)
    env.filters["tag_text"] = _tag_text
    env.filters["undone_text"] = _undone_text
    return env


def chart(
    points: list[ActivityBucket],
    start: int,
    bucket: int,
    count: int,
    width: int = 420,
    height: int = 120,
) -> dict[str, Any]:
    """Inserts, updates and deletes per bucket as bars of an SVG chart: the bars' markup made
    here (``bars``: a loop of the template took 2 ms a chart of 48 buckets, 120 ms for the
    overview of 60 applications), the frame by the template.

    ``start`` is the first bucket (Unix time), ``count`` buckets of ``bucket`` seconds; buckets
    without writes are drawn empty, so the time axis is the range asked for.

    >>> c = chart([ActivityBucket("1970-01-01T00:01:00.000000Z", "app", "x", 2, 0, 1, 0)],
    ...           0, 60, 2, width=100, height=10)
    >>> import re
    >>> [re.search(r'x="(\\S+)".*height="(\\S+)" fill="(\\S+)"', b).groups()
    ...  for b in str(c["bars"]).split("</rect>")[:-1]]
    [('50.0', '6.0', '#2a9d3a'), ('82.3', '3.0', '#d03030')]
    >>> "<title>1970-01-01T00:01:00.000000Z: 1 deletes</title>" in c["bars"]
    True
    """
    by_bucket = {int(epoch(p.bucket)): p for p in points}
    top = max([max(_ops(p).values()) for p in points] or [0]) or 1
    slot = width / count
    bar = max(1.0, slot / 3 - 0.5)
    bars = []
    for i in range(count):
        p = by_bucket.get(start + i * bucket)
        if p is None:
            continue
        counts = _ops(p)
        for j, (key, color) in enumerate(OP_COLORS.items()):
            if counts[key]:
                h = max(1.0, counts[key] * (height - 4) / top)
                bars.append(
                    f'<rect class="bar" x="{i * slot + j * bar:.1f}" y="{height - h:.1f}"'
                    f' width="{bar:.1f}" height="{h:.1f}" fill="{color}"><title>'
                    f"{escape(f'{p.bucket}: {counts[key]} {key}')}</title></rect>"
                )
    first = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M")
    return {
        "width": width,
        "height": height,
        "bars": Markup("".join(bars)),
        "first": first,
        "top": top,
    }


def _ops(p: ActivityBucket) -> dict[str, int]:
    """A bucket's counts by the names OP_COLORS gives them."""
    return {"inserts": p.inserts, "updates": p.updates, "deletes": p.deletes}


def _tag_text(row: SessionRow | Transaction | GuardRefusal | DdlCommand) -> str:
    """A row's tag as text ('untrusted (forged)')."""
    return words.tag(row.tag, row.tag_reason)


def _undone_text(entry: Undone | None) -> str | None:
    """What undid a session, in a few words."""
    return None if entry is None else words.undone(entry.to_json())


YEAR_1 = int(datetime(1, 1, 1, tzinfo=UTC).timestamp())  # the first time datetime holds

MAX_PAGE = 10**9  # pages past it hold nothing, and SQLite's OFFSET takes 64 bits at most


def _shown(text: str) -> str:
    """A query parameter as an error quotes it: at most 40 characters."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _page_number(q: Any, name: str = "page") -> int:
    text = q.get(name) or "1"
    if not re.fullmatch(r"[0-9]{1,10}", text) or not 1 <= int(text) <= MAX_PAGE:
        raise BadInput(f"{name} must be a whole number from 1 to {MAX_PAGE}, not {_shown(text)}")
    return int(text)


def _time(q: Any, name: str, default: str | None = None) -> str | None:
    """A time parameter (ISO 8601 or an age) as the store's text; None when not given."""
    text = q.get(name) or default
    if not text:
        return None
    try:
        stored = parse_time(text)
        epoch(stored)  # a time the store could not read back (out of range) is refused here
    except (ValueError, OverflowError):
        raise BadInput(f"{name} is not a time undo can use: {_shown(text)}") from None
    return stored


class Sessions:
    """Signed-in browsers. Each sign-in gets a random value for its cookie; this keeps only a
    hash of it and its expiry, so neither the cookie nor this map can be turned into the
    token, and signing out (or a restart) ends the session."""

    def __init__(self) -> None:
        self._expiry: dict[bytes, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(value: str) -> bytes:
        return hashlib.sha256(value.encode()).digest()

    def new(self) -> str:
        value = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            for key in [k for k, e in self._expiry.items() if e <= now]:
                del self._expiry[key]
            while len(self._expiry) >= MAX_SESSIONS:  # the oldest sign-in ends
                del self._expiry[next(iter(self._expiry))]
            self._expiry[self._key(value)] = now + SESSION_SECONDS
        return value

    def valid(self, value: str) -> bool:
        if not value:
            return False
        with self._lock:
            return self._expiry.get(self._key(value), 0.0) > time.monotonic()

    def end(self, value: str) -> None:
        with self._lock:
            self._expiry.pop(self._key(value), None)


class FailedTokens:
    """Wrong tokens per client address: a bucket of FAILED_BURST tries, refilled at
    FAILED_PER_SECOND; an empty bucket is told to wait (nothing is checked meanwhile)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # address: tries left, when
        self._lock = threading.Lock()

    def _left(self, client: str, now: float) -> float:
        left, when = self._buckets.get(client, (FAILED_BURST, now))
        return min(FAILED_BURST, left + (now - when) * FAILED_PER_SECOND)

    def wait(self, client: str) -> float:
        """Seconds before this client may try a token again (0: now)."""
        with self._lock:
            left = self._left(client, time.monotonic())
        return 0.0 if left >= 1 else (1 - left) / FAILED_PER_SECOND

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            left = self._left(client, now)
            self._buckets.pop(client, None)  # to the end: the dict's order is the last try's
            self._buckets[client] = (left - 1, now)
            if len(self._buckets) > MAX_CLIENTS:  # those refilled are forgotten first
                for c in [c for c in self._buckets if self._left(c, now) >= FAILED_BURST]:
                    del self._buckets[c]
                while len(self._buckets) > MAX_CLIENTS:
                    del self._buckets[next(iter(self._buckets))]


class App:
    """The WSGI application: routing, the host allowlist, the token, the pages."""

    def __init__(
        self, settings: Settings, token: str | None = None, allowed_hosts: Iterable[str] = ()
    ) -> None:
        self.settings = settings
        self.token = token
        self.registry = metrics.registry(settings)
        self.collector = metrics.StoreCollector(settings)  # the overview's source health
        self.templates = _templates()
        # a request naming another host is refused: DNS rebinding reaches a loopback dashboard
        # through a name the attacker controls
        self.allowed_hosts = LOOPBACK_NAMES | {h.lower() for h in allowed_hosts}
        self.signed_in = Sessions()
        self.failed = FailedTokens()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        request.max_content_length = MAX_FORM_BYTES
        request.max_form_memory_size = MAX_FORM_BYTES
        response = self.dispatch(request)
        response.headers.update(SECURITY_HEADERS)
        return response(environ, start_response)

    # -- plumbing ------------------------------------------------------------------------------
    def page(self, template: str, title: str, status: int = 200, **context: Any) -> Response:
        signout = self.token is not None and template != "login.html"
        context.setdefault("sources", ())  # the sources the page is of (base.html names them)
        html = self.templates.get_template(template).render(
            title=title, css=CSS, signout=signout, **context
        )
        return Response(html, status=status, mimetype="text/html")

    def dispatch(self, request: Request) -> Response:
        name = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
        if name.strip("[]").lower() not in self.allowed_hosts:
            return self.page(
                "message.html",
                "Bad request",
                400,
                message="This host name is not served (see --allowed-host).",
            )
        try:
            endpoint, args = URLS.bind_to_environ(request.environ).match()
        except HTTPException as e:
            return self.page("message.html", e.name, e.code or 404, message=None)
        if endpoint == "logout":
            return self.logout(request)
        if self.token is not None:
            refused = self._authenticate(request, endpoint)
            if refused is not None:
                return refused
        try:
            if endpoint == "login":
                return redirect("/", 303)
            _unknown_parameter(endpoint, request.args)
            if any("\x00" in value for value in args.values()):  # a session id, a table
                raise BadInput("the path holds a NUL character")
            response: Response = getattr(self, endpoint)(request.args, **args)
            return response
        except (NotFound, NotRecorded) as e:
            return self.page("message.html", "Not found", 404, message=str(e))
        except BadInput as e:
            return self.page("message.html", "Bad request", 400, message=str(e))
        except UndoError as e:
            return self.page("message.html", "Refused", 409, message=str(e))

    def _authenticate(self, request: Request, endpoint: str) -> Response | None:
        """None when the request may go on (a live session cookie, or the token as a Bearer
        header); else the answer: the sign-in page, a new session, or 429 to a client
        address that gave too many wrong tokens."""
        if self.signed_in.valid(request.cookies.get(COOKIE, "")):
            return None
        # the scheme is case-insensitive (RFC 7235): "bearer TOKEN" is the Bearer scheme
        scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
        bearer = credentials.strip() if scheme.lower() == "bearer" else ""
        signing_in = endpoint == "login" and request.method == "POST"
        if not bearer and not signing_in:
            return self.page("login.html", "Sign in", 401, message=None)
        # the right token passes whatever others sent from its address (a NAT, a proxy): the
        # limit holds back wrong ones only
        if bearer and self._is_token(bearer):
            return None
        client = request.remote_addr or ""
        if signing_in:
            return self.login(request, client)
        return self._wrong(client)

    def _wrong(self, client: str) -> Response:
        """The answer to a wrong token: 429 while its address has to wait (nothing counted),
        else 401, counted."""
        wait = math.ceil(self.failed.wait(client))
        if wait:
            response = self.page(
                "message.html",
                "Too many requests",
                429,
                message=f"Too many wrong tokens from {client}: try again in {wait} s.",
            )
            response.headers["Retry-After"] = str(wait)
            return response
        self.failed.failed(client)
        return self.page("login.html", "Sign in", 401, message="Wrong token.")

    def _is_token(self, given: str) -> bool:
        assert self.token is not None
        return hmac.compare_digest(given.encode(), self.token.encode())

    def login(self, request: Request, client: str) -> Response:
        size = request.content_length
        if size is None or size > MAX_FORM_BYTES:  # never read a body of unknown or large size
            return self.page("message.html", "Bad request", 400, message="Bad form.")
        given = request.form.get("token", "")
        if "\x00" in given:  # no token holds one (argv and the environment cannot): malformed
            return self.page("message.html", "Bad request", 400, message="Bad form.")
        if not self._is_token(given):
            return self._wrong(client)
        response = redirect("/", 303)
        response.set_cookie(
            COOKIE,
            self.signed_in.new(),
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="Strict",
            path="/",
            # https when served over TLS, or behind --trusted-proxy saying so (waitress drops
            # X-Forwarded-Proto from any other peer)
            secure=request.scheme == "https",
        )
        return response

    def logout(self, request: Request) -> Response:
        """Ends the session of this cookie (a POST: SameSite=Strict keeps other sites out)."""
        self.signed_in.end(request.cookies.get(COOKIE, ""))
        response = redirect("/", 303)
        response.delete_cookie(
            COOKIE, path="/", httponly=True, samesite="Strict", secure=request.scheme == "https"
        )
        return response

    # -- pages ---------------------------------------------------------------------------------
    @staticmethod
    def _sources(db: Store, q: Any) -> list[str]:
        """The sources a page covers: ``?source=NAME`` (repeatable; an unknown one is a 400),
        else every source of the store."""
        known = [s.name for s in db.sources()]
        wanted = list(dict.fromkeys(q.getlist("source")))
        for name in wanted:
            if name not in known:
                raise BadInput(
                    f"no source {_shown(name)} in the audit store (its sources:"
                    f" {', '.join(known) or 'none'})"
                )
        return wanted or known

    def metrics(self, q: Any) -> Response:
        """Prometheus text of every source, or of those ``?source=`` names."""
        reg = self.registry
        if "source" in q:
            db = open_store(self.settings.store)
            try:
                wanted = self._sources(db, q)
            finally:
                db.close()
            reg = metrics.registry(self.settings, only=wanted)
        return Response(
            generate_latest(reg), content_type="text/plain; version=0.0.4; charset=utf-8"
        )

    def overview(self, q: Any) -> Response:
        since_text = q.get("since") or "24h"
        since = _time(q, "since", "24h")
        assert since is not None
        db = open_store(self.settings.store)
        try:
            now = time.time()
            span = now - epoch(since)
            bucket = max(60, int(span / 48) // 60 * 60)
            first = int(epoch(since)) // bucket * bucket
            if first < YEAR_1:  # the chart's first bucket must be a time too (0001-01-01: 500)
                raise BadInput(
                    f"since is not a time undo can use: {_shown(since_text)} (the chart would"
                    " start before the year 1)"
                )
            count = max(1, int(now - first) // bucket + 1)  # a time to come: one bucket
            names = self._sources(db, q)
            # every source's at once (the store's store-wide reader), not a source at a time
            rows: list[ActivityBucket] = db.activity(
                by="app", since=since, bucket_seconds=bucket, sources=names
            )
            healths = sorted(db.statuses(names), key=lambda h: names.index(h.source or ""))
            refused: list[GuardRefusal] = db.guard_refusals(sources=names)
            refused = sorted(refused, key=lambda g: g.refused_at)[-20:][::-1]
        finally:
            db.close()
        by_app: dict[tuple[str | None, str | None], list[ActivityBucket]] = {}
        for r in rows:
            by_app.setdefault((r.source, r.name), []).append(r)
        several = len(names) > 1

        def shown_app(key: tuple[str | None, str | None]) -> str:
            app = key[1] or "(untagged)"
            return f"{key[0]}: {app}" if several else app

        apps = [
            {
                "name": shown_app(key),
                # the sessions page of that application (and source): its own names
                "query": {
                    **({"app": key[1]} if key[1] else {}),
                    **({"source": key[0]} if several and key[0] else {}),
                },
                "inserts": sum(p.inserts for p in pts),
                "updates": sum(p.updates for p in pts),
                "deletes": sum(p.deletes for p in pts),
                "chart": chart(pts, first, bucket, count),
            }
            for key, pts in sorted(by_app.items(), key=lambda kv: shown_app(kv[0]))
        ]
        measured, wal_held, capture_lag, unknown = self._source_health()
        return self.page(
            "overview.html",
            "Overview",
            sources=names,
            healths=[
                {
                    "health": h,
                    "ago": f"{time.time() - epoch(h.last_commit_time):.0f} s ago"
                    if h.last_commit_time
                    else "",
                    "position": int_to_lsn(h.store_position),
                    # the slot's figures are the --dsn database's: that source's only
                    **(
                        {"wal_held": wal_held, "capture_lag": capture_lag, "unknown": unknown}
                        if measured is None or h.source == measured
                        else {
                            "wal_held": None,
                            "capture_lag": None,
                            "unknown": "--dsn is another source's database",
                        }
                    ),
                }
                for h in healths
            ],
            refused=refused,
            since=since_text,
            bucket_minutes=bucket // 60,
            apps=apps,
        )

    def _source_health(self) -> tuple[str | None, str | None, str | None, str]:
        """The source the --dsn database is, the WAL its slot holds and its capture lag, from
        the metrics that need the source (one connection to it, one peek at the slot; not the
        store's); and why they may be unknown."""
        families, why = self.collector.source_only()
        found = {m.name: m.samples[0] for m in families if m.samples}
        held = found.get("undo_slot_wal_held_bytes")
        lag = found.get("undo_capture_lag_seconds")
        measured = next((s.labels.get("source") for s in found.values()), None)
        return (
            measured,
            None if held is None else f"{int(held.value):,} bytes",
            None if lag is None else f"{lag.value:.1f} s",
            why,
        )

    def sessions(self, q: Any) -> Response:
        page = _page_number(q)
        db = open_store(self.settings.store)
        try:
            names = self._sources(db, q)
            rows = across.sessions(
                db,
                names,
                since=_time(q, "since"),
                until=_time(q, "until"),
                app=q.get("app") or None,
                user=q.get("user") or None,
                tables=[q["table"]] if q.get("table") else None,
                limit=PAGE + 1,
                offset=(page - 1) * PAGE,
            )
        finally:
            db.close()
        fields = ["app", "user", "table", "since", "until"]
        return self.page(
            "sessions.html",
            "Sessions",
            sources=names,
            fields=fields,
            filters=q,
            rows=rows[:PAGE],
            page=page,
            more=len(rows) > PAGE,
            keep={k: v for k, v in q.items() if k in [*fields, "source"] and v},
        )

    def session(self, q: Any, session_id: str) -> Response:
        page = _page_number(q)
        tpage = _page_number(q, "tpage")
        db = open_store(self.settings.store)
        try:
            # the session in the first of the page's sources that has it
            for name in self._sources(db, q):
                db.use(name)
                refused = db.guard_refusals(session_id)
                ddl = db.ddl_of(session_id)
                try:
                    txns = db.transactions_of_session(session_id)
                except NotFound:
                    txns = []
                if txns or refused or ddl:
                    break
            else:
                raise NotFound(f"unknown session {session_id!r}")
            undone = db.undone_sessions().get((session_id, "trusted"))
            # the session is its trusted transactions: those that only claim it (forged,
            # replayed, malformed tags) are listed apart and not counted in its totals
            txns, claims = split_claims(txns)
            total = sum(t.inserts + t.updates + t.deletes + t.truncates for t in txns)
            claimed = sum(t.inserts + t.updates + t.deletes + t.truncates for t in claims)
            changes = db.changes_page([t.id for t in txns], PAGE, (page - 1) * PAGE)
            claim_changes = db.changes_page([t.id for t in claims], PAGE, 0)
        finally:
            db.close()
        xid_of = {t.id: t.xid for t in txns + claims}

        def shown(changes: list[RowChange]) -> list[dict[str, object]]:
            """Each change as the page shows it: its xid, columns, what an update changed,
            its key as text and the query of its row's history."""
            rows: list[dict[str, object]] = []
            for c in changes:
                cols = list((c.old or c.new or {}).keys())
                old, new = c.old or {}, c.new or {}
                key = c.key or ()
                rows.append(
                    {
                        "xid": xid_of[c.txn],
                        "table": c.table,
                        "op": c.op,
                        "old": c.old,
                        "new": c.new,
                        "cols": cols,
                        "diff": {k for k in cols if c.op == "update" and old.get(k) != new.get(k)},
                        "key": [str(k) for k in key],
                        "history": dict(zip(c.key_columns, key, strict=False))
                        if c.key_columns
                        else None,
                    }
                )
            return rows

        return self.page(
            "session.html",
            f"Session {session_id}",
            undone=_undone_text(undone),
            refused=refused,
            ddl=ddl,
            txns=txns[(tpage - 1) * PAGE : tpage * PAGE],  # the list is paged too
            tpage=tpage,
            tpages=-(-len(txns) // PAGE),
            total=total,
            changes=shown(changes),
            claims=claims[:PAGE],
            claim_count=len(claims),
            claimed=claimed,
            claim_changes=shown(claim_changes),
            session_id=session_id,
            page=page,
            page_size=PAGE,
            preview=self._preview(session_id, total, name),
            sources=[name],
        )

    def _preview(self, session_id: str, total: int, source: str) -> dict[str, Any]:
        cmd = f"undo --source {source} session {session_id}"
        if total > PREVIEW_LIMIT:
            return {"command": cmd, "too_many": True}
        from undo.engine.apply import undo
        from undo.engine.plan import Target

        out = io.StringIO()
        try:
            report = undo(
                dataclasses.replace(self.settings, sources=(source,)),
                Target(session=session_id),
                out=out,
                on_conflict="skip",
            )
        except UndoError as e:
            return {"command": cmd, "too_many": False, "error": str(e)}
        return {
            "command": cmd,
            "too_many": False,
            "error": None,
            "summary": report.summary(),
            "script": out.getvalue(),
        }

    def history(self, q: Any, table: str) -> Response:
        db = open_store(self.settings.store)
        try:
            names = self._sources(db, q)
            key = {k: v for k, v in q.items() if k != "source"}
            rows = across.history(db, names, table, key, keyforms.offline)
        finally:
            db.close()
        shown = ", ".join(f"{k}={v}" for k, v in key.items())
        return self.page("history.html", f"History of {table} ({shown})", rows=rows, sources=names)


def make_app(
    settings: Settings, token: str | None = None, allowed_hosts: Iterable[str] = ()
) -> App:
    """The WSGI application for these settings."""
    open_store(settings.store).close()  # fail early on a missing store
    return App(settings, token, allowed_hosts)


#: a request (its headers and its small body) must have arrived this long after its first byte
REQUEST_DEADLINE = 10.0
CONNECTION_LIMIT = 100


class _Channel(waitress.channel.HTTPChannel):  # type: ignore[misc]  # waitress has no types
    """waitress's connection, knowing since when its request has been arriving."""

    request_started = 0.0

    def received(self, data: bytes) -> bool:
        before = self.request
        done: bool = super().received(data)
        if self.request is not None and self.request is not before:
            self.request_started = time.time()  # a new request began in these bytes
        return done

    def waiting_since(self) -> float | None:
        """Since when this connection holds its place without being served: the first byte of
        the request it is sending, or its last activity when it sends nothing; None while a
        request of it is served or its response is sent."""
        if self.requests or self.total_outbufs_len or self.will_close or self.close_when_flushed:
            return None
        return self.request_started if self.request is not None else float(self.last_activity)


class _Listener(waitress.server.TcpWSGIServer):  # type: ignore[misc]
    """waitress's listening socket, and two defences against clients that send slowly (one
    header line every few seconds, each one resetting waitress's idle timeout):

    - a request still arriving ``request_deadline`` seconds after its first byte is closed;
    - at the connection limit waitress stops accepting, and every new connection (a
      Prometheus probe, a person) waits in the kernel's backlog behind the slow ones. Here the
      connection waiting longest without being served is closed instead, so a new one is
      always let in; connections being served are never closed, and when every one is, new
      ones wait as in waitress.
    """

    channel_class = _Channel
    request_deadline = REQUEST_DEADLINE
    next_channel_cleanup: float

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle connections: channel_timeout
        for channel in list(self.active_channels.values()):
            since = channel.waiting_since()
            partial = channel.request is not None  # idle ones: channel_timeout, above
            if partial and since is not None and now - since > self.request_deadline:
                channel.will_close = True

    def readable(self) -> bool:
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        if not self.accepting:
            return False
        live = [c for c in self.active_channels.values() if not c.will_close]
        if len(live) < self.adj.connection_limit:
            return True
        waiting = [(since, c) for c in live if (since := c.waiting_since()) is not None]
        if not waiting:
            return False  # every connection is being served: new ones wait their turn
        min(waiting, key=lambda w: w[0])[1].will_close = True  # closed on the loop's next turn
        log.debug("connection limit reached: closed the connection waiting longest")
        return True


class Server:
    """waitress serving the app: bounded request bodies and headers, a deadline for each
    request, idle connections closed, a pool of threads. ``serve_forever`` runs it;
    ``shutdown`` (from any thread) stops it and waits for ``serve_forever`` to return;
    ``server_close`` does the same.

    ``trusted_proxy``: the address of a reverse proxy whose ``X-Forwarded-Proto`` (https: the
    cookie is marked Secure) and ``X-Forwarded-For`` (the client's address, for the limit on
    failed sign-ins) are believed; from any other peer these headers are dropped."""

    def __init__(
        self,
        app: App,
        host: str,
        port: int,
        trusted_proxy: str | None = None,
        request_deadline: float = REQUEST_DEADLINE,
    ) -> None:
        adj = waitress.adjustments.Adjustments(
            host=host,
            port=port,
            threads=4,
            channel_timeout=30,
            cleanup_interval=1,  # how often the deadlines are checked
            max_request_body_size=MAX_FORM_BYTES,
            max_request_header_size=16384,
            connection_limit=CONNECTION_LIMIT,
            ident="undo",
            **(
                {
                    "trusted_proxy": trusted_proxy,
                    "trusted_proxy_headers": {"x-forwarded-proto", "x-forwarded-for"},
                }
                if trusted_proxy
                else {}
            ),
        )
        dispatcher = waitress.task.ThreadedTaskDispatcher()
        dispatcher.set_thread_count(adj.threads)
        socket_map: dict[int, Any] = {}
        listeners: list[_Listener] = []
        try:
            for sockinfo in adj.listen:
                listener = _Listener(
                    app, socket_map, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo
                )
                listener.request_deadline = request_deadline
                listeners.append(listener)
        except BaseException:
            for listener in listeners:
                listener.close()
            dispatcher.shutdown(timeout=5)  # its threads
            raise
        self._server = listeners[0]
        self.server_port: int = int(self._server.effective_port)
        self._running = threading.Event()
        self._done = threading.Event()

    def serve_forever(self) -> None:
        self._running.set()
        try:
            self._server.run()  # until every socket is closed (or Ctrl-C)
        finally:
            self._done.set()

    def _close_all(self) -> None:
        for channel in list(self._server._map.values()):
            channel.close()

    def shutdown(self) -> None:
        if self._running.is_set() and not self._done.is_set():
            # sockets are closed by the loop's own thread (woken through its trigger): closed
            # from another, the loop would poll a closed descriptor
            try:
                self._server.trigger.pull_trigger(self._close_all)
            except OSError:  # its trigger is closed already (the loop is ending): close here
                self._close_all()
            self._done.wait(10)
        else:
            self._close_all()
        self._server.task_dispatcher.shutdown(timeout=5)

    def server_close(self) -> None:
        self.shutdown()


#: the shortest token accepted off loopback: `--token x` is guessed in a few tries
MIN_TOKEN = 16


def serve(
    settings: Settings,
    host: str,
    port: int,
    token: str | None,
    allowed_hosts: Iterable[str] = (),
    trusted_proxy: str | None = None,
) -> Server:
    """The server for the app; the caller runs ``serve_forever``. Requests must name a loopback
    host, the address served (unless a wildcard), or one of allowed_hosts. ``trusted_proxy``:
    the IP address of the TLS proxy in front, whose X-Forwarded-Proto and X-Forwarded-For are
    believed."""
    if host not in ("127.0.0.1", "localhost", "::1") and (
        not token or len(token) < MIN_TOKEN or token != token.strip()
    ):
        raise BadInput(
            f"serving on {host} exposes customer data: give --token (or UNDO_TOKEN) of at least"
            f" {MIN_TOKEN} characters, no spaces around it (make one: openssl rand -hex 24)"
        )
    if trusted_proxy:
        try:
            trusted_proxy = str(ipaddress.ip_address(trusted_proxy))  # as waitress sees peers
        except ValueError:
            raise BadInput(
                f"--trusted-proxy takes the proxy's IP address (10.0.0.5, ::1), not"
                f" {trusted_proxy!r}"
            ) from None
    hosts = [*allowed_hosts, *([host] if host not in ("0.0.0.0", "::", "") else [])]
    app = make_app(settings, token, hosts)
    try:
        return Server(app, host, port, trusted_proxy)
    except OSError as e:
        why = {
            errno.EADDRINUSE: "another process listens there: choose another --port, or stop it",
            errno.EACCES: "ports below 1024 need root (or CAP_NET_BIND_SERVICE): use --port 8080",
            errno.EADDRNOTAVAIL: "not an address of this machine: use 127.0.0.1 or one of its own",
        }.get(e.errno or 0, e.strerror or str(e))
        raise BadInput(f"cannot serve on {host} port {port}: {why}") from None
    except ValueError:  # waitress: the host does not resolve
        raise BadInput(
            f"cannot serve on {host} port {port}: {host} is not an address or a name this"
            " machine resolves"
        ) from None
