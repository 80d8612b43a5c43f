"""The dashboard: Werkzeug for requests and routing, Jinja2 templates (autoescaped) for the
pages, waitress to serve them. Server-rendered HTML with inline SVG charts: nothing is fetched
from the network, so it works on closed machines. Read-only: nothing is applied from the web.

Any address other than loopback needs a token, checked on every request (``Authorization:
Bearer`` or the cookie the login form sets); without it a request sees no data.
"""

from __future__ import annotations

import errno
import hmac
import io
import json
import logging
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import waitress.server
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
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
from undo.store import open_store
from undo.store.api import split_claims
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

URLS = Map(
    [
        Rule("/", endpoint="overview"),
        Rule("/sessions", endpoint="sessions"),
        Rule("/sessions/<path:session_id>", endpoint="session"),
        Rule("/history/<path:table>", endpoint="history"),
        Rule("/metrics", endpoint="metrics"),
        Rule("/login", endpoint="login", methods=["GET", "POST"]),
    ],
    strict_slashes=False,
)


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
    return env


def chart(
    points: list[dict[str, Any]],
    start: int,
    bucket: int,
    count: int,
    width: int = 420,
    height: int = 120,
) -> dict[str, Any]:
    """Inserts, updates and deletes per bucket as bars of an SVG chart (the template draws it).

    ``start`` is the first bucket (Unix time), ``count`` buckets of ``bucket`` seconds; buckets
    without writes are drawn empty, so the time axis is the range asked for.

    >>> c = chart([{"bucket": "1970-01-01T00:01:00.000000Z", "inserts": 2, "updates": 0,
    ...             "deletes": 1}], 0, 60, 2, width=100, height=10)
    >>> [(b["x"], b["h"], b["color"]) for b in c["bars"]]
    [('50.0', '6.0', '#2a9d3a'), ('82.3', '3.0', '#d03030')]
    """
    by_bucket = {int(epoch(p["bucket"])): p for p in points}
    top = max([max(p[k] for k in OP_COLORS) for p in points] or [0]) or 1
    slot = width / count
    bar = max(1.0, slot / 3 - 0.5)
    bars = []
    for i in range(count):
        p = by_bucket.get(start + i * bucket)
        if p is None:
            continue
        for j, (key, color) in enumerate(OP_COLORS.items()):
            if p[key]:
                h = max(1.0, p[key] * (height - 4) / top)
                bars.append(
                    {
                        "x": f"{i * slot + j * bar:.1f}",
                        "y": f"{height - h:.1f}",
                        "w": f"{bar:.1f}",
                        "h": f"{h:.1f}",
                        "color": color,
                        "title": f"{p['bucket']}: {p[key]} {key}",
                    }
                )
    first = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M")
    return {"width": width, "height": height, "bars": bars, "first": first, "top": top}


def _tagged(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with its tag as text ('untrusted (forged)')."""
    return [{**r, "tag_text": words.tag(r["tag"], r["tag_reason"])} for r in rows]


def _page_number(q: Any, name: str = "page") -> int:
    try:
        return max(1, int(q.get(name) or 1))
    except ValueError:
        raise BadInput(f"{name} must be a number, not {q.get(name)!r}") from None


class App:
    """The WSGI application: routing, the host allowlist, the token, the pages."""

    def __init__(
        self, settings: Settings, token: str | None = None, allowed_hosts: Iterable[str] = ()
    ) -> None:
        self.settings = settings
        self.token = token
        self.registry = metrics.registry(settings)
        self.templates = _templates()
        # a request naming another host is refused: DNS rebinding reaches a loopback dashboard
        # through a name the attacker controls
        self.allowed_hosts = LOOPBACK_NAMES | {h.lower() for h in allowed_hosts}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        request.max_content_length = MAX_FORM_BYTES
        request.max_form_memory_size = MAX_FORM_BYTES
        response = self.dispatch(request)
        response.headers.update(SECURITY_HEADERS)
        return response(environ, start_response)

    # -- plumbing ------------------------------------------------------------------------------
    def page(self, template: str, title: str, status: int = 200, **context: Any) -> Response:
        html = self.templates.get_template(template).render(title=title, css=CSS, **context)
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
        if self.token is not None and not self._authorized(request):
            if endpoint == "login" and request.method == "POST":
                return self.login(request)
            return self.page("login.html", "Sign in", 401, message=None)
        try:
            if endpoint == "metrics":
                return Response(
                    generate_latest(self.registry),
                    content_type="text/plain; version=0.0.4; charset=utf-8",
                )
            if endpoint == "login":
                return redirect("/", 303)
            response: Response = getattr(self, endpoint)(request.args, **args)
            return response
        except (NotFound, NotRecorded) as e:
            return self.page("message.html", "Not found", 404, message=str(e))
        except BadInput as e:
            return self.page("message.html", "Bad request", 400, message=str(e))
        except UndoError as e:
            return self.page("message.html", "Refused", 409, message=str(e))

    def _authorized(self, request: Request) -> bool:
        assert self.token is not None
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth.startswith("Bearer ") else ""
        if not given:
            given = request.cookies.get("undo_token", "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    def login(self, request: Request) -> Response:
        size = request.content_length
        if size is None or size > MAX_FORM_BYTES:  # never read a body of unknown or large size
            return self.page("message.html", "Bad request", 400, message="Bad form.")
        given = request.form.get("token", "")
        assert self.token is not None
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return self.page("login.html", "Sign in", 401, message="Wrong token.")
        response = redirect("/", 303)
        over_tls = request.scheme == "https" or (
            request.headers.get("X-Forwarded-Proto", "").lower() == "https"
        )
        response.set_cookie(
            "undo_token", given, httponly=True, samesite="Strict", path="/", secure=over_tls
        )
        return response

    # -- pages ---------------------------------------------------------------------------------
    def overview(self, q: Any) -> Response:
        since_text = q.get("since", "24h")
        since = parse_time(since_text)
        db = open_store(self.settings.store)
        try:
            now = time.time()
            span = now - epoch(since)
            bucket = max(60, int(span / 48) // 60 * 60)
            first = int(epoch(since)) // bucket * bucket
            count = int(now - first) // bucket + 1
            rows = db.activity(by="app", since=since, bucket_seconds=bucket)
            health = db.status()
            refused = db.guard_refusals()[-20:][::-1]
        finally:
            db.close()
        by_app: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_app.setdefault(r["app"] or "(untagged)", []).append(r)
        apps = [
            {
                "name": app,
                "inserts": sum(p["inserts"] for p in pts),
                "updates": sum(p["updates"] for p in pts),
                "deletes": sum(p["deletes"] for p in pts),
                "chart": chart(pts, first, bucket, count),
            }
            for app, pts in sorted(by_app.items())
        ]
        ago = ""
        if health["last_commit_time"]:
            ago = f"{time.time() - epoch(health['last_commit_time']):.0f} s ago"
        wal_held, capture_lag, unknown = self._source_health()
        return self.page(
            "overview.html",
            "Overview",
            health=health,
            ago=ago,
            position=int_to_lsn(health["store_position"]),
            wal_held=wal_held,
            capture_lag=capture_lag,
            unknown=unknown,
            refused=_tagged(refused),
            since=since_text,
            bucket_minutes=bucket // 60,
            apps=apps,
        )

    def _source_health(self) -> tuple[str | None, str | None, str]:
        """WAL held by the slot and the capture lag, from one collection of the metrics (one
        connection to the source, one peek at the slot); and why they may be unknown."""
        if not self.settings.dsn:
            return None, None, "no --dsn"
        found = {m.name: m.samples[0].value for m in self.registry.collect() if m.samples}
        held = found.get("undo_slot_wal_held_bytes")
        lag = found.get("undo_capture_lag_seconds")
        return (
            None if held is None else f"{int(held):,} bytes",
            None if lag is None else f"{lag:.1f} s",
            "source unreachable",
        )

    def sessions(self, q: Any) -> Response:
        page = _page_number(q)
        db = open_store(self.settings.store)
        try:
            rows = db.sessions(
                since=parse_time(q["since"]) if q.get("since") else None,
                until=parse_time(q["until"]) if q.get("until") else None,
                app=q.get("app") or None,
                user=q.get("user") or None,
                tables=[q["table"]] if q.get("table") else None,
                limit=PAGE + 1,
                offset=(page - 1) * PAGE,
            )
        finally:
            db.close()
        fields = ["app", "user", "table", "since", "until"]
        for r in rows:
            r["undone_text"] = words.undone(r["undone"])
        return self.page(
            "sessions.html",
            "Sessions",
            fields=fields,
            filters=q,
            rows=_tagged(rows[:PAGE]),
            page=page,
            more=len(rows) > PAGE,
            keep={k: v for k, v in q.items() if k in fields and v},
        )

    def session(self, q: Any, session_id: str) -> Response:
        page = _page_number(q)
        tpage = _page_number(q, "tpage")
        db = open_store(self.settings.store)
        try:
            refused = db.guard_refusals(session_id)
            ddl = db.ddl_of(session_id)
            try:
                txns = db.transactions_of_session(session_id)
            except NotFound:
                if not refused and not ddl:
                    raise
                txns = []
            undone = db.undone_sessions().get((session_id, "trusted"))
            # the session is its trusted transactions: those that only claim it (forged,
            # replayed, malformed tags) are listed apart and not counted in its totals
            txns, claims = split_claims(txns)
            total = sum(t["inserts"] + t["updates"] + t["deletes"] + t["truncates"] for t in txns)
            claimed = sum(
                t["inserts"] + t["updates"] + t["deletes"] + t["truncates"] for t in claims
            )
            changes = db.changes_page([t["id"] for t in txns], PAGE, (page - 1) * PAGE)
            claim_changes = db.changes_page([t["id"] for t in claims], PAGE, 0)
        finally:
            db.close()
        xid_of = {t["id"]: t["xid"] for t in txns + claims}

        def shown(changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
            rows = []
            for c in changes:
                cols = list((c["old"] or c["new"] or {}).keys())
                old, new = c["old"] or {}, c["new"] or {}
                key = c["key"] or []
                rows.append(
                    {
                        **c,
                        "xid": xid_of[c["txn"]],
                        "cols": cols,
                        "diff": {
                            k for k in cols if c["op"] == "update" and old.get(k) != new.get(k)
                        },
                        "key": [str(k) for k in key],
                        "history": dict(zip(c["key_columns"], key, strict=False))
                        if c["key_columns"]
                        else None,
                    }
                )
            return rows

        return self.page(
            "session.html",
            f"Session {session_id}",
            undone=words.undone(undone) if undone else None,
            refused=_tagged(refused),
            ddl=_tagged(ddl),
            txns=_tagged(txns[(tpage - 1) * PAGE : tpage * PAGE]),  # the list is paged too
            tpage=tpage,
            tpages=-(-len(txns) // PAGE),
            total=total,
            changes=shown(changes),
            claims=_tagged(claims[:PAGE]),
            claim_count=len(claims),
            claimed=claimed,
            claim_changes=shown(claim_changes),
            session_id=session_id,
            page=page,
            page_size=PAGE,
            preview=self._preview(session_id, total),
        )

    def _preview(self, session_id: str, total: int) -> dict[str, Any]:
        cmd = f"undo session {session_id}"
        if total > PREVIEW_LIMIT:
            return {"command": cmd, "too_many": True}
        from undo.engine.apply import undo
        from undo.engine.plan import Target

        out = io.StringIO()
        try:
            report = undo(self.settings, Target(session=session_id), out=out, on_conflict="skip")
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
            rows = db.history(table, q.to_dict(), keyforms.offline)
        finally:
            db.close()
        key = ", ".join(f"{k}={v}" for k, v in q.items())
        return self.page("history.html", f"History of {table} ({key})", rows=rows)


def make_app(
    settings: Settings, token: str | None = None, allowed_hosts: Iterable[str] = ()
) -> App:
    """The WSGI application for these settings."""
    open_store(settings.store).close()  # fail early on a missing store
    return App(settings, token, allowed_hosts)


class Server:
    """waitress serving the app: bounded request bodies and headers, idle connections closed,
    a pool of threads. ``serve_forever`` runs it; ``shutdown`` (from any thread) stops it and
    waits for ``serve_forever`` to return; ``server_close`` does the same."""

    def __init__(self, app: App, host: str, port: int) -> None:
        self._server: Any = waitress.server.create_server(
            app,
            host=host,
            port=port,
            threads=4,
            channel_timeout=30,
            max_request_body_size=MAX_FORM_BYTES,
            max_request_header_size=16384,
            connection_limit=100,
            ident="undo",
        )
        self.server_port: int = self._server.effective_port
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


def serve(
    settings: Settings,
    host: str,
    port: int,
    token: str | None,
    allowed_hosts: Iterable[str] = (),
) -> Server:
    """The server for the app; the caller runs ``serve_forever``. Requests must name a loopback
    host, the address served (unless a wildcard), or one of allowed_hosts."""
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise BadInput(f"serving on {host} exposes customer data: give --token (or UNDO_TOKEN)")
    hosts = [*allowed_hosts, *([host] if host not in ("0.0.0.0", "::", "") else [])]
    app = make_app(settings, token, hosts)
    try:
        return Server(app, host, port)
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
