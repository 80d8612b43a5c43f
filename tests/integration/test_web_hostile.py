"""The dashboard under hostile clients: slow senders, a forged X-Forwarded-Proto, guessed
tokens, absurd query parameters; over real HTTP against a real store."""

from __future__ import annotations

import html
import http.client
import os
import random
import re
import selectors
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import STORES, run_cli
from tests.integration.test_web import _scenario
from undo.web import serve
from undo.web.app import Server, make_app

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def site(pgo):
    sid = _scenario(pgo)
    servers = []

    def start(token=TOKEN, trusted_proxy=None):
        server = serve(pgo.settings, "127.0.0.1", 0, token, trusted_proxy=trusted_proxy)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_port

    yield pgo, sid, start
    for s in servers:
        s.shutdown()


def _request(port, method, path, headers=None, body=None, source="127.0.0.1", timeout=10):
    conn = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=timeout, source_address=(source, 0)
    )
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        conn.close()


class SlowClients:
    """``count`` connections that each send a request line, then one header line every
    ``every`` seconds and never the blank line that ends the headers (slowloris); one the
    server closes comes back a second later, as an attacker's would."""

    def __init__(self, port: int, count: int, every: float) -> None:
        self.port, self.count, self.every = port, count, every
        self.stop = threading.Event()
        self.lines_sent = 0
        self.reconnects = 0
        self.open = 0  # connections open now
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SlowClients:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        try:
            self._attack()
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def _attack(self) -> None:
        sel = selectors.DefaultSelector()
        due: dict[socket.socket, float] = {}  # the next header line
        comeback: list[float] = []  # when a closed one reconnects

        def connect() -> None:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            due[s] = time.monotonic() + random.uniform(0, self.every)

        def closed(s: socket.socket) -> None:
            sel.unregister(s)
            s.close()
            del due[s]
            comeback.append(time.monotonic() + 1)

        for _ in range(self.count):
            connect()
        while not self.stop.is_set():
            for key, _ in sel.select(timeout=0.1):  # readable: closed by the server
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    closed(s)
            now = time.monotonic()
            for s, when in list(due.items()):
                if when <= now:
                    try:
                        s.send(b"X-Slow: %d\r\n" % self.lines_sent)
                        self.lines_sent += 1
                        due[s] = now + self.every
                    except OSError:
                        closed(s)
            while comeback and comeback[0] <= now:
                comeback.pop(0)
                connect()
                self.reconnects += 1
            self.open = len(due)
        for s in list(due):
            sel.unregister(s)
            s.close()


def test_metrics_answer_within_5_s_while_150_connections_send_headers_slowly(site):
    """The trial: slow connections took every place waitress keeps (100) and each header line
    reset its idle timeout, so every /metrics probe waited in the backlog until it timed out.
    Now the connection waiting longest is closed to let a new one in, and a request must have
    arrived 10 s after its first byte."""
    _src, _sid, start = site
    port = start()
    answers = []
    held = []  # slow connections open at each probe
    with SlowClients(port, count=150, every=2.0) as attack:
        time.sleep(2)  # every slow connection is in
        end = time.monotonic() + 40
        while time.monotonic() < end:
            held.append(attack.open)
            t0 = time.monotonic()
            try:
                status, _h, body = _request(port, "GET", "/metrics", AUTH, timeout=5)
                answers.append((round(time.monotonic() - t0, 2), status))
                assert "undo_changes_total" in body
            except (TimeoutError, OSError) as e:
                answers.append((round(time.monotonic() - t0, 2), repr(e)))
            time.sleep(max(0.0, 1 - (time.monotonic() - t0)))
    assert not attack.errors, attack.errors
    late = [a for a in answers if a[1] != 200 or a[0] >= 5]
    assert not late, f"{len(late)} of {len(answers)} probes failed or came late: {late[:5]}"
    assert len(answers) >= 20
    # as many as the server keeps (100) throughout: those it closes come back
    assert min(held) >= 90 and attack.reconnects > 150, (held, attack.reconnects)


def test_a_request_still_arriving_after_the_deadline_is_closed(pgo):
    """A client that sends a header line every half second: waitress's idle timeout never
    fires, the deadline does (2 s here, 10 s by default)."""
    _scenario(pgo)
    server = Server(make_app(pgo.settings), "127.0.0.1", 0, request_deadline=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        s = socket.create_connection(("127.0.0.1", server.server_port), timeout=0.5)
        t0 = time.monotonic()
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed_after = None
        while time.monotonic() - t0 < 10:
            try:
                s.sendall(b"X-Slow: 1\r\n")
                if s.recv(4096) == b"":
                    closed_after = time.monotonic() - t0
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - t0
                break
        s.close()
        assert closed_after is not None, "still open after 10 s"
        assert 2 <= closed_after < 5
        # a request that arrives whole is served as before
        status, _h, _b = _request(server.server_port, "GET", "/metrics")
        assert status == 200
    finally:
        server.shutdown()


def _login(port, headers=None, token=TOKEN, source="127.0.0.1"):
    return _request(
        port,
        "POST",
        "/login",
        {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
        body=f"token={token}",
        source=source,
    )


def test_a_nul_in_the_sign_in_form_is_a_400(site):
    """Every other NUL a request carries is a 400; the sign-in form's was a wrong token (401)."""
    _src, _sid, start = site
    port = start()
    status, _h, body = _login(port, token="a%00b")
    assert status == 400 and "Bad form." in body
    status, headers, _b = _login(port)  # the right one still signs in
    assert status == 303 and "Set-Cookie" in headers


def test_the_cookie_is_secure_behind_the_trusted_proxy_only(site):
    """X-Forwarded-Proto: https marks the cookie Secure when the peer is --trusted-proxy (here
    loopback: the test plays the proxy); from any other peer it is ignored."""
    _src, _sid, start = site
    behind = start(trusted_proxy="127.0.0.1")
    status, headers, _b = _login(behind, {"X-Forwarded-Proto": "https"})
    assert status == 303 and "Secure" in headers["Set-Cookie"], headers
    status, headers, _b = _login(behind, {"X-Forwarded-Proto": "http"})
    assert status == 303 and "Secure" not in headers["Set-Cookie"]
    # another proxy is trusted: the header of this peer is anyone's word
    elsewhere = start(trusted_proxy="192.0.2.10")
    status, headers, _b = _login(elsewhere, {"X-Forwarded-Proto": "https"})
    assert status == 303 and "Secure" not in headers["Set-Cookie"]
    # and none at all
    status, headers, _b = _login(start(), {"X-Forwarded-Proto": "https"})
    assert status == 303 and "Secure" not in headers["Set-Cookie"]


def test_undo_serve_takes_the_trusted_proxy_from_its_option_or_the_environment(site):
    src, _sid, _start = site
    done = run_cli(src, "serve", "--trusted-proxy", "proxy.example")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "Error: --trusted-proxy takes the proxy's IP address (10.0.0.5, ::1), not 'proxy.example'"
    ]
    env = dict(
        os.environ,
        UNDO_DSN=src.dsn,
        UNDO_STORE=src.store,
        UNDO_SLOT=src.slot,
        UNDO_TOKEN=TOKEN,
        UNDO_TRUSTED_PROXY="127.0.0.1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "undo", "serve", "--port", "0"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        port = int(re.search(r":(\d+)/", line).group(1))  # type: ignore[union-attr]
        status, headers, _b = _login(port, {"X-Forwarded-Proto": "https"})
        assert status == 303 and "Secure" in headers["Set-Cookie"]
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def _cookie(headers):
    """The session cookie's value from a Set-Cookie header."""
    return re.match(r"undo_session=([^;]*);", headers["Set-Cookie"]).group(1)  # type: ignore[union-attr]


def test_the_cookie_holds_a_session_value_not_the_token(site, monkeypatch):
    _src, sid, start = site
    port = start()
    status, headers, _b = _login(port)
    assert status == 303
    value = _cookie(headers)
    assert value and TOKEN not in value and value != TOKEN
    assert "Max-Age=43200" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
    assert _cookie(_login(port)[1]) != value  # one per sign-in
    cookie = {"Cookie": f"undo_session={value}"}
    status, _h, body = _request(port, "GET", "/sessions", cookie)
    assert status == 200 and sid in body and "Sign out" in body
    # the token itself in the cookie is no way in
    for forged in (f"undo_session={TOKEN}", f"undo_token={TOKEN}"):
        assert _request(port, "GET", "/sessions", {"Cookie": forged})[0] == 401
    # signing out ends the session on the server, not only in the browser
    status, headers, _b = _request(port, "POST", "/logout", cookie)
    assert status == 303 and re.search(r"undo_session=;", headers["Set-Cookie"])
    assert _request(port, "GET", "/sessions", cookie)[0] == 401
    # and a session ends by itself
    monkeypatch.setattr("undo.web.app.SESSION_SECONDS", 1)
    short = {"Cookie": f"undo_session={_cookie(_login(port)[1])}"}
    assert _request(port, "GET", "/sessions", short)[0] == 200
    time.sleep(1.2)
    assert _request(port, "GET", "/sessions", short)[0] == 401


def test_wrong_tokens_are_limited_per_client_address(site, monkeypatch):
    """The trial guessed 424 tokens a second. Now 5 wrong ones, then one a second: 429 with
    Retry-After; the right token still passes; other addresses go on."""
    _src, _sid, start = site
    port = start()
    # hammering: about one try a second gets checked
    t0 = time.monotonic()
    answers = [_login(port, token="guess")[0] for _ in range(60)]
    checked = answers.count(401)
    assert set(answers) == {401, 429} and checked <= 6 + (time.monotonic() - t0), answers
    # a slower refill for the steps below, so that a slow machine does not refill the bucket
    # between two of them
    monkeypatch.setattr("undo.web.app.FAILED_PER_SECOND", 0.5)
    wrong = {"Authorization": "Bearer guess"}
    source = "127.0.0.2"
    answers = [_request(port, "GET", "/metrics", wrong, source=source)[0] for _ in range(5)]
    assert answers == [401] * 5
    status, headers, body = _request(port, "GET", "/metrics", wrong, source=source)
    assert status == 429 and headers["Retry-After"] == "2"
    assert "Too many wrong tokens from 127.0.0.2: try again in 2 s." in body
    # the right token is never limited by others' wrong ones from its address (a NAT, a
    # proxy): a client sending a wrong one every 0.5 s kept Prometheus out
    assert _request(port, "GET", "/metrics", AUTH, source=source)[0] == 200
    assert _login(port, source=source)[0] == 303  # the form is the same door
    assert _login(port, token="guess", source=source)[0] == 429
    assert _request(port, "GET", "/metrics", AUTH, source="127.0.0.3")[0] == 200  # another
    assert _login(port, token="guess", source="127.0.0.3")[0] == 401
    time.sleep(2.1)
    assert _request(port, "GET", "/metrics", AUTH, source=source)[0] == 200


def test_behind_the_trusted_proxy_the_limit_is_per_forwarded_client(site, monkeypatch):
    monkeypatch.setattr("undo.web.app.FAILED_PER_SECOND", 0.1)  # none refilled meanwhile
    _src, _sid, start = site
    port = start(trusted_proxy="127.0.0.1")
    one, two = {"X-Forwarded-For": "203.0.113.1"}, {"X-Forwarded-For": "203.0.113.2"}
    answers = [_login(port, one, token="guess")[0] for _ in range(6)]
    assert answers == [401] * 5 + [429]
    assert _login(port, two)[0] == 303
    # from a peer that is not the proxy, X-Forwarded-For is not believed: its own address
    # counts, whatever it claims
    port = start(trusted_proxy="192.0.2.10")
    answers = [
        _login(port, {"X-Forwarded-For": f"203.0.113.{i}"}, token="guess")[0] for i in range(6)
    ]
    assert answers == [401] * 5 + [429]


BIG = "99999999999999999999999"
BAD_PARAMETERS = [
    ("/sessions", f"page={BIG}", "page must be a whole number from 1 to 1000000000"),
    ("/sessions", "page=-1", "page must be a whole number"),
    ("/sessions", "page=0", "page must be a whole number"),
    ("/sessions", "page=abc", "page must be a whole number"),
    ("/sessions", "page=1e3", "page must be a whole number"),
    ("/sessions", "page=%C2%B2", "page must be a whole number"),  # a superscript 2
    ("/sessions", f"page={'9' * 5000}", "..."),
    ("/sessions", "until=soon", "malformed time"),
    # the chart's first bucket fell before the year 1: ValueError, a 500
    ("/", "since=0001-01-01", "since is not a time undo can use: '0001-01-01' (the chart"),
    ("/", "since=0002-01-01", "since is not a time undo can use: '0002-01-01' (the chart"),
    ("/", "since=-5m", "malformed time"),
    ("/", f"since={BIG}d", "before the year 1"),
    ("/sessions/{sid}", f"page={BIG}", "page must be a whole number"),
    ("/sessions/{sid}", "page=-3", "page must be a whole number"),
    ("/sessions/{sid}", f"tpage={BIG}", "tpage must be a whole number"),
    ("/sessions/{sid}", "tpage=-1", "tpage must be a whole number"),
    # parameters a page does not take were ignored (200): `undo activity`'s options are not
    # the overview's
    ("/", "bucket=0m", "unknown parameter 'bucket': this page takes since"),
    ("/", "bucket=99999d", "unknown parameter 'bucket'"),
    ("/", "by=zzz", "unknown parameter 'by'"),
    ("/sessions", "sort=zzz", "unknown parameter 'sort': this page takes app, page, since"),
    (
        "/sessions/{sid}",
        "limit=5",
        "unknown parameter 'limit': this page takes page, source, tpage",
    ),
    # /metrics took any parameter and any source name (200, every source's series)
    ("/metrics", "match[]=up", "unknown parameter 'match[]': this page takes source"),
    ("/metrics", "source=nope", "no source 'nope' in the audit store"),
    ("/metrics", "source=a%00b", "holds a NUL character"),
]


@pytest.mark.parametrize(("path", "query", "says"), BAD_PARAMETERS)
def test_a_bad_query_parameter_is_a_400_of_one_line(site, path, query, says):
    """`?page=99999999999999999999999` was a 500 (SQLite's OFFSET overflowed), a negative
    page was taken for 1, and a year SQLite cannot hold was a 500."""
    _src, sid, start = site
    port = start(token=None)
    status, _h, body = _request(port, "GET", path.format(sid=sid) + "?" + query)
    message = re.search(r"<main><h1>Bad request</h1>\s*<p>(.*?)</p>", body, re.S)
    assert status == 400 and message is not None, (status, body[:300])
    assert "\n" not in message.group(1) and len(message.group(1)) < 200
    assert says in html.unescape(message.group(1))


def test_good_query_parameters_still_answer(site):
    _src, sid, start = site
    port = start(token=None)

    def status(path: str) -> int:
        # what is answered, not how fast: an overview peeks at the slot, which on a loaded
        # machine once took over 10 s (CI, two test processes)
        return int(_request(port, "GET", path, timeout=60)[0])

    for path in ("/sessions?page=1", "/sessions?page=2&since=1h", f"/sessions/{sid}?tpage=1"):
        assert status(path) == 200, path
    assert status("/?since=2999-01-01") == 200  # a time to come: no bars
    # years before 1000 are times the store holds (fix(times) 951bf12), the chart from year 100
    for path in ("/sessions?since=0001-01-01", "/sessions?until=0999-12-31", "/?since=0100-01-01"):
        assert status(path) == 200, path
    assert status("/?since=") == 200  # an empty form: the last 24 hours


def test_the_authorization_scheme_is_case_insensitive(site):
    """RFC 7235: `bearer`, `BEARER` are the Bearer scheme (`bearer TOKEN` was a 401)."""
    _src, _sid, start = site
    port = start()
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        for token, status in ((TOKEN, 200), ("guess", 401)):
            got = _request(port, "GET", "/metrics", {"Authorization": f"{scheme} {token}"})
            assert got[0] == status, (scheme, token, got[0])
    assert _request(port, "GET", "/metrics", {"Authorization": f"Basic {TOKEN}"})[0] == 401


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_a_nul_in_a_parameter_is_a_bad_request_and_only_get_is_served(site):
    """A NUL in a parameter was a 500 and a traceback on a PostgreSQL store (it refuses NUL in
    text); the read-only pages answered POST as GET."""
    _src, _sid, start = site
    port = start()
    for path in (
        "/sessions?app=%00",
        "/sessions?user=a%00b",
        "/history/public.t?id=%00",
        "/sessions/a%00b",  # in the path too
    ):
        status, _h, body = _request(port, "GET", path, AUTH)
        assert status == 400 and "NUL" in body, (path, status, body)
    for method in ("POST", "PUT", "DELETE"):
        for path in ("/", "/sessions", "/metrics"):
            status, _h, _b = _request(port, method, path, AUTH)
            assert status == 405, (method, path, status)
    status, _h, _b = _request(port, "HEAD", "/", AUTH)
    assert status == 200
