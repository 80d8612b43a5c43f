"""The dashboard's pages, server-rendered HTML with inline SVG charts: nothing fetched from
the network, so it works on closed machines. Read-only: nothing is applied from the web.

Any address other than loopback needs a token, checked on every request (``Authorization:
Bearer`` or the cookie the login form sets); without it a request sees no data.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from html import escape
from http.cookies import SimpleCookie
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs, quote, urlencode
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.exposition import generate_latest

from .. import render
from ..config import Settings
from ..errors import BadInput, NotFound, NotRecorded, UndoError
from ..pg import int_to_lsn
from ..store import queries
from ..store.schema import open_store
from ..stream.protocol import epoch
from ..timespec import parse_time
from . import metrics

log = logging.getLogger(__name__)
PAGE = 50
PREVIEW_LIMIT = 5000
Environ = dict[str, Any]
StartResponse = Callable[..., Any]

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:10px 20px}header a{color:#fff;margin-right:18px}
main{padding:16px 20px}table{border-collapse:collapse;background:#fff;width:100%}
td,th{border:1px solid #dde;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#eef}.changed{background:#ffe08a}.del{color:#b00}.ins{color:#070}
pre{background:#fff;border:1px solid #dde;padding:8px;overflow:auto;max-height:480px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #dde;
padding:8px}.muted{color:#667}form.filters input{width:140px}code{font-size:12px}
"""
OP_COLORS = {"inserts": "#2a9d3a", "updates": "#e0a000", "deletes": "#d03030"}


def _page(title: str, body: str) -> bytes:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{escape(title)} · undo</title><style>{CSS}</style></head><body>"
        "<header><a href='/'><b>undo</b></a><a href='/'>Overview</a>"
        "<a href='/sessions'>Sessions</a><a href='/metrics'>Metrics</a></header>"
        f"<main><h1>{escape(title)}</h1>{body}</main></body></html>"
    ).encode()


def _table(rows: Iterable[Iterable[str]], head: list[str]) -> str:
    out = ["<table><tr>", *(f"<th>{escape(h)}</th>" for h in head), "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _e(v: Any) -> str:
    return "<span class='muted'>NULL</span>" if v is None else escape(str(v))


def chart(
    points: list[dict[str, Any]],
    start: int,
    bucket: int,
    count: int,
    width: int = 420,
    height: int = 120,
) -> str:
    """Inserts, updates and deletes per bucket as an inline SVG bar chart.

    ``start`` is the first bucket (Unix time), ``count`` buckets of ``bucket`` seconds; buckets
    without writes are drawn empty, so the time axis is the range asked for.
    """
    by_bucket = {int(epoch(p["bucket"])): p for p in points}
    top = max([max(p[k] for k in OP_COLORS) for p in points] or [0]) or 1
    slot = width / count
    bar = max(1.0, slot / 3 - 0.5)
    parts = [
        f"<svg class='chart' width='{width}' height='{height + 20}' "
        f"viewBox='0 0 {width} {height + 20}' role='img'>"
        f"<rect width='{width}' height='{height}' fill='#fafbff' stroke='#dde'/>"
    ]
    for i in range(count):
        p = by_bucket.get(start + i * bucket)
        if p is None:
            continue
        for j, (key, color) in enumerate(OP_COLORS.items()):
            if p[key]:
                h = max(1.0, p[key] * (height - 4) / top)
                parts.append(
                    f"<rect class='bar' x='{i * slot + j * bar:.1f}' y='{height - h:.1f}' "
                    f"width='{bar:.1f}' height='{h:.1f}' fill='{color}'>"
                    f"<title>{escape(p['bucket'])}: {p[key]} {key}</title></rect>"
                )
    first = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M")
    parts.append(
        f"<text x='2' y='{height + 14}' font-size='10'>{first} UTC</text>"
        f"<text x='{width - 2}' y='{height + 14}' font-size='10' text-anchor='end'>"
        f"now · max {top}/bucket</text></svg>"
    )
    return "".join(parts)


#: on every response: no script, no framing, no type sniffing (the pages are HTML and inline
#: SVG with inline styles only)
SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:;"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_FORM_BYTES = 4096


class App:
    def __init__(
        self, settings: Settings, token: str | None = None, allowed_hosts: Iterable[str] = ()
    ) -> None:
        self.settings = settings
        self.token = token
        self.registry = metrics.registry(settings)
        # a request naming another host is refused: DNS rebinding reaches a loopback dashboard
        # through a name the attacker controls
        self.allowed_hosts = LOOPBACK_NAMES | {h.lower() for h in allowed_hosts}

    def _host_allowed(self, environ: Environ) -> bool:
        host = environ.get("HTTP_HOST", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.strip("[]").lower() in self.allowed_hosts

    # -- plumbing ------------------------------------------------------------------------------
    def __call__(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if not self._host_allowed(environ):
            return self._respond(
                start_response,
                "400 Bad Request",
                _page("Bad request", "<p>This host name is not served (see --allowed-host).</p>"),
            )
        try:
            if self.token is not None and not self._authorized(environ):
                if path == "/login" and environ.get("REQUEST_METHOD") == "POST":
                    return self._login(environ, start_response)
                return self._respond(
                    start_response,
                    "401 Unauthorized",
                    _page(
                        "Sign in",
                        "<form method='post' action='/login'><label>Token "
                        "<input type='password' name='token'></label> <button>Sign in</button>"
                        "</form>",
                    ),
                )
            if path == "/metrics":
                return self._respond(
                    start_response,
                    "200 OK",
                    generate_latest(self.registry),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            if path == "/":
                body = self.overview(query)
            elif path == "/sessions":
                body = self.sessions(query)
            elif path.startswith("/sessions/"):
                body = self.session(path[len("/sessions/") :], query)
            elif path.startswith("/history/"):
                body = self.history(path[len("/history/") :], query)
            elif path == "/login":
                return self._redirect(start_response, "/")
            else:
                return self._respond(start_response, "404 Not Found", _page("Not found", ""))
        except (NotFound, NotRecorded) as e:
            return self._respond(
                start_response, "404 Not Found", _page("Not found", f"<p>{escape(str(e))}")
            )
        except BadInput as e:
            return self._respond(
                start_response, "400 Bad Request", _page("Bad request", f"<p>{escape(str(e))}")
            )
        except UndoError as e:
            return self._respond(
                start_response, "409 Conflict", _page("Refused", f"<p>{escape(str(e))}")
            )
        return self._respond(start_response, "200 OK", body)

    def _authorized(self, environ: Environ) -> bool:
        assert self.token is not None
        given = ""
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if auth.startswith("Bearer "):
            given = auth[7:].strip()
        else:
            cookie = SimpleCookie(environ.get("HTTP_COOKIE", ""))
            if "undo_token" in cookie:
                given = cookie["undo_token"].value
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _login(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        try:
            size = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            size = -1
        if not 0 <= size <= MAX_FORM_BYTES:  # never read a body of unknown or large size
            return self._respond(
                start_response, "400 Bad Request", _page("Bad request", "<p>Bad form.</p>")
            )
        form = parse_qs(environ["wsgi.input"].read(size).decode(errors="replace"))
        given = (form.get("token") or [""])[0]
        assert self.token is not None
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return self._respond(
                start_response, "401 Unauthorized", _page("Sign in", "<p>Wrong token.</p>")
            )
        start_response(
            "303 See Other",
            [
                ("Location", "/"),
                (
                    "Set-Cookie",
                    f"undo_token={quote(given)}; HttpOnly; SameSite=Strict; Path=/"
                    + ("; Secure" if _over_tls(environ) else ""),
                ),
                *SECURITY_HEADERS,
            ],
        )
        return [b""]

    @staticmethod
    def _respond(
        start_response: StartResponse,
        status: str,
        body: bytes,
        ctype: str = "text/html; charset=utf-8",
    ) -> list[bytes]:
        start_response(
            status,
            [
                ("Content-Type", ctype),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
                *SECURITY_HEADERS,
            ],
        )
        return [body]

    @staticmethod
    def _redirect(start_response: StartResponse, where: str) -> list[bytes]:
        start_response("303 See Other", [("Location", where), *SECURITY_HEADERS])
        return [b""]

    # -- pages ---------------------------------------------------------------------------------
    def overview(self, q: dict[str, str]) -> bytes:
        since_text = q.get("since", "24h")
        since = parse_time(since_text)
        db = open_store(self.settings.store)
        try:
            now = time.time()
            span = now - epoch(since)
            bucket = max(60, int(span / 48) // 60 * 60)
            first = int(epoch(since)) // bucket * bucket
            count = int(now - first) // bucket + 1
            rows = queries.activity(db, by="app", since=since, bucket_seconds=bucket)
            health = queries.status(db)
            refused = queries.guard_refusals(db)[-20:][::-1]
        finally:
            db.conn.close()
        by_app: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_app.setdefault(r["app"] or "(untagged)", []).append(r)
        cards = "".join(
            f"<div class='card'><b><a href='/sessions?{urlencode({'app': app})}'>"
            f"{escape(app)}</a></b> <span class='muted'>{sum(p['inserts'] for p in pts)} ins · "
            f"{sum(p['updates'] for p in pts)} upd · {sum(p['deletes'] for p in pts)} del</span>"
            f"<br>{chart(pts, first, bucket, count)}</div>"
            for app, pts in sorted(by_app.items())
        )
        ago = ""
        if health["last_commit_time"]:
            ago = f"{time.time() - epoch(health['last_commit_time']):.0f} s ago"
        gaps = (
            "".join(
                f"<li>{escape(g['detected_at'])}: {escape(g['reason'])}</li>"
                for g in health["gaps"]
            )
            or "<li>none</li>"
        )
        form = (
            f"<form><label>Since <input name='since' value='{escape(since_text)}'></label>"
            " <button>Show</button> <span class='muted'>ISO 8601 or an age: 90m, 4h, 2d"
            f"</span></form><p class='muted'>bucket {bucket // 60} min; "
            "<span style='color:#2a9d3a'>inserts</span>, "
            "<span style='color:#e0a000'>updates</span>, "
            "<span style='color:#d03030'>deletes</span></p>"
        )
        wal_held, capture_lag = self._source_health()
        body = (
            f"<h2>Capture health</h2><ul><li>last captured commit: "
            f"{_e(health['last_commit_time'])} {escape(ago)}</li>"
            f"<li>store position: {int_to_lsn(health['store_position'])}</li>"
            f"<li>{health['transactions']} transactions, {health['changes']} changes stored</li>"
            f"<li>WAL held by the slot: {wal_held}</li>"
            f"<li>capture lag (age of the oldest commit not yet stored): {capture_lag}</li>"
            f"<li>gaps in the audit trail:<ul>{gaps}</ul></li></ul>"
            f"<h2>Writes refused by guards</h2>{_refusals(refused, link=True)}"
            f"<h2>Write activity per application</h2>{form}<div class='cards'>{cards or ''}</div>"
        )
        return _page("Overview", body)

    def _source_health(self) -> tuple[str, str]:
        """WAL held by the slot and the capture lag, from one collection of the metrics (one
        connection to the source, one peek at the slot)."""
        if not self.settings.dsn:
            unknown = "<span class='muted'>unknown (no --dsn)</span>"
            return unknown, unknown
        found = {m.name: m.samples[0].value for m in self.registry.collect() if m.samples}
        unknown = "<span class='muted'>unknown (source unreachable)</span>"
        held = found.get("undo_slot_wal_held_bytes")
        lag = found.get("undo_capture_lag_seconds")
        return (
            unknown if held is None else f"{int(held):,} bytes",
            unknown if lag is None else f"{lag:.1f} s",
        )

    def sessions(self, q: dict[str, str]) -> bytes:
        page = _page_number(q)
        db = open_store(self.settings.store)
        try:
            rows = queries.sessions(
                db,
                since=parse_time(q["since"]) if q.get("since") else None,
                until=parse_time(q["until"]) if q.get("until") else None,
                app=q.get("app") or None,
                user=q.get("user") or None,
                tables=[q["table"]] if q.get("table") else None,
                limit=PAGE + 1,
                offset=(page - 1) * PAGE,
            )
        finally:
            db.conn.close()
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        fields = ["app", "user", "table", "since", "until"]
        form = (
            "<form class='filters'>"
            + "".join(
                f"<label>{f} <input name='{f}' value='{escape(q.get(f, ''))}'></label> "
                for f in fields
            )
            + "<button>Filter</button></form><br>"
        )
        table = _table(
            (
                [
                    f"<a href='/sessions/{quote(r['session_id'] or '', safe='')}'>"
                    f"{_e(r['session_id'])}</a>"
                    if r["session_id"]
                    else _e(None),
                    _e(r["application_name"]),
                    _e(r["user"]),
                    _e(r["first_change_at"]),
                    _e(r["last_change_at"]),
                    str(r["transactions"]),
                    str(r["inserts"]),
                    str(r["updates"]),
                    str(r["deletes"]),
                    str(r["guard_refusals"]),
                    escape(", ".join(r["tables"])),
                    _e(render.tag(r["tag"], r["tag_reason"])),
                    _e(render.undone(r["undone"])),
                ]
                for r in rows
            ),
            [
                "session",
                "application",
                "user",
                "first change",
                "last change",
                "transactions",
                "inserts",
                "updates",
                "deletes",
                "refused",
                "tables",
                "tag",
                "undone",
            ],
        )
        keep = {k: v for k, v in q.items() if k in fields and v}
        nav = []
        if page > 1:
            nav.append(f"<a href='?{urlencode({**keep, 'page': page - 1})}'>← newer</a>")
        if more:
            nav.append(f"<a href='?{urlencode({**keep, 'page': page + 1})}'>older →</a>")
        return _page("Sessions", form + table + f"<p>page {page} " + " ".join(nav) + "</p>")

    def session(self, session_id: str, q: dict[str, str]) -> bytes:
        from urllib.parse import unquote

        session_id = unquote(session_id)
        page = _page_number(q)
        db = open_store(self.settings.store)
        try:
            refused = queries.guard_refusals(db, session_id)
            try:
                txns = queries.transactions_of_session(db, session_id)
            except NotFound:
                if not refused:
                    raise
                txns = []
            undone = queries.undone_sessions(db).get((session_id, "trusted"))
            total = sum(t["inserts"] + t["updates"] + t["deletes"] + t["truncates"] for t in txns)
            changes = queries.changes_page(db, [t["id"] for t in txns], PAGE, (page - 1) * PAGE)
        finally:
            db.conn.close()
        xid_of = {t["id"]: t["xid"] for t in txns}
        tpage = _page_number(q, "tpage")
        shown = txns[(tpage - 1) * PAGE : tpage * PAGE]  # the list is paged too
        tx_table = _table(
            (
                [
                    str(t["xid"]),
                    _e(t["commit_time"]),
                    _e(t["application_name"]),
                    _e(t["user_name"]),
                    _e(render.tag(t["tag"], t["tag_reason"])),
                    f"{t['inserts']}/{t['updates']}/{t['deletes']}",
                    f"<code>{_e(t['statement'])}</code>",
                ]
                for t in shown
            ),
            ["xid", "committed", "application", "user", "tag", "ins/upd/del", "statement"],
        )
        tnav = []
        if tpage > 1:
            tnav.append(f"<a href='?{urlencode({'tpage': tpage - 1, 'page': page})}'>← earlier</a>")
        if tpage * PAGE < len(txns):
            tnav.append(f"<a href='?{urlencode({'tpage': tpage + 1, 'page': page})}'>later →</a>")
        if tnav:
            pages = -(-len(txns) // PAGE)
            tx_table += f"<p>transactions, page {tpage} of {pages} {' '.join(tnav)}</p>"
        rows = []
        for c in changes:
            cols = list((c["old"] or c["new"] or {}).keys())
            old, new = c["old"] or {}, c["new"] or {}
            diff = {k for k in cols if c["op"] == "update" and old.get(k) != new.get(k)}
            cells_old = _cells(cols, old, diff) if c["old"] else ""
            cells_new = _cells(cols, new, diff) if c["new"] else ""
            key = c["key"] or []
            hist = ""
            if c["key_columns"]:
                params = urlencode(dict(zip(c["key_columns"], key, strict=False)))
                hist = f"<a href='/history/{quote(c['table'], safe='')}?{params}'>history</a>"
            rows.append(
                [
                    str(xid_of[c["txn"]]),
                    escape(c["table"]),
                    f"<span class='{c['op'][:3]}'>{c['op']}</span>",
                    escape(", ".join(map(str, key))) + " " + hist,
                    cells_old,
                    cells_new,
                ]
            )
        nav = []
        if page > 1:
            nav.append(f"<a href='?page={page - 1}'>← previous</a>")
        if page * PAGE < total:
            nav.append(f"<a href='?page={page + 1}'>next →</a>")
        body = (
            (f"<p><strong>Undone</strong>: {_e(render.undone(undone))}</p>" if undone else "")
            + (f"<h2>Writes refused by guards</h2>{_refusals(refused)}" if refused else "")
            + f"<h2>Transactions</h2>{tx_table}<h2>Row changes ({total})</h2>"
            + _table(rows, ["xid", "table", "op", "key", "old", "new"])
            + f"<p>page {page} {' '.join(nav)}</p><h2>Undo preview</h2>"
            + self._preview(session_id, total)
        )
        return _page(f"Session {session_id}", body)

    def _preview(self, session_id: str, total: int) -> str:
        cmd = f"undo session {session_id}"
        if total > PREVIEW_LIMIT:
            return (
                f"<p>{total} changes: too many to preview here. Run <code>{escape(cmd)}</code>.</p>"
            )
        from ..apply import undo
        from ..plan import Target

        out = io.StringIO()
        try:
            report = undo(self.settings, Target(session=session_id), out=out, on_conflict="skip")
        except UndoError as e:
            return f"<p>{escape(str(e))}</p>"
        summary = "".join(f"<li>{escape(x)}</li>" for x in report.summary())
        return (
            f"<p>What <code>{escape(cmd)}</code> prints (review it, then run it with "
            f"<code>--apply</code>):</p><ul>{summary}</ul>"
            f"<pre class='preview'>{escape(out.getvalue())}</pre>"
        )

    def history(self, table: str, q: dict[str, str]) -> bytes:
        from urllib.parse import unquote

        table = unquote(table)
        db = open_store(self.settings.store)
        try:
            rows = queries.history(db, table, dict(q))
        finally:
            db.conn.close()
        body = _table(
            (
                [
                    _e(r["commit_time"]),
                    _e(r["op"]),
                    str(r["xid"]),
                    f"<a href='/sessions/{quote(r['session_id'] or '', safe='')}'>"
                    f"{_e(r['session_id'])}</a>",
                    _e(r["application_name"]),
                    _e(r["user"]),
                    f"<code>{_e(r['statement'])}</code>",
                    f"<code>{_e(json.dumps(r['old'], ensure_ascii=False))}</code>",
                    f"<code>{_e(json.dumps(r['new'], ensure_ascii=False))}</code>",
                ]
                for r in rows
            ),
            ["committed", "op", "xid", "session", "application", "user", "statement", "old", "new"],
        )
        key = ", ".join(f"{k}={v}" for k, v in q.items())
        return _page(f"History of {table} ({key})", body)


def _cells(cols: list[str], values: dict[str, Any], changed: set[str]) -> str:
    """One image's columns, the ones the update changed highlighted."""
    return "<br>".join(
        f"<span class='{'changed' if k in changed else ''}'>{escape(k)}={_e(values.get(k))}</span>"
        for k in cols
    )


def _refusals(rows: list[dict[str, Any]], link: bool = False) -> str:
    """Writes a guard refused, as a table (with links to the sessions on the overview)."""
    if not rows:
        return "<p class='muted'>none</p>"
    return _table(
        (
            [
                _e(r["refused_at"]),
                _e(r["guard"]),
                _e(r["reason"]),
                _e(r["application_name"]),
                f"<a href='/sessions/{quote(r['session_id'] or '', safe='')}'>"
                f"{_e(r['session_id'])}</a>"
                if link and r["session_id"]
                else _e(r["session_id"]),
                _e(render.tag(r["tag"], r["tag_reason"])),
                f"<code>{_e(r['statement'])}</code>",
            ]
            for r in rows
        ),
        ["refused at", "guard", "reason", "application", "session", "tag", "statement"],
    )


def _page_number(q: dict[str, str], name: str = "page") -> int:
    try:
        return max(1, int(q.get(name) or 1))
    except ValueError:
        raise BadInput(f"{name} must be a number, not {q.get(name)!r}") from None


def _over_tls(environ: Environ) -> bool:
    return (
        environ.get("wsgi.url_scheme") == "https"
        or environ.get("HTTP_X_FORWARDED_PROTO", "").lower() == "https"
    )


def make_app(
    settings: Settings, token: str | None = None, allowed_hosts: Iterable[str] = ()
) -> App:
    """The WSGI application for these settings."""
    open_store(settings.store).conn.close()  # fail early on a missing store
    return App(settings, token, allowed_hosts)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def serve(
    settings: Settings,
    host: str,
    port: int,
    token: str | None,
    allowed_hosts: Iterable[str] = (),
) -> Any:
    """A threaded HTTP server for the app; the caller runs ``serve_forever``. Requests must
    name a loopback host, the address served (unless a wildcard), or one of allowed_hosts."""
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise BadInput(f"serving on {host} exposes customer data: give --token (or UNDO_TOKEN)")
    hosts = [*allowed_hosts, *([host] if host not in ("0.0.0.0", "::", "") else [])]
    return make_server(
        host,
        port,
        make_app(settings, token, hosts),
        server_class=_Server,
        handler_class=_QuietHandler,
    )
