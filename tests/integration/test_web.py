"""The dashboard over real HTTP against a real capture, and once in headless Chromium."""

from __future__ import annotations

import html
import http.client
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import STORES
from tests.integration.test_undo import _as_session
from undo.core.errors import BadInput
from undo.source.pg import session_id
from undo.web import serve


def _scenario(src):
    src.sql("CREATE TABLE accounts (id int PRIMARY KEY, name text, plan text)")
    src.init()
    with src.connect(application_name="web") as c:
        c.execute(
            "INSERT INTO accounts SELECT g, 'acct ' || g, 'free' FROM generate_series(1, 20) g"
        )
        c.execute("UPDATE accounts SET plan = 'pro' WHERE id = 3")
    with src.connect(application_name="usage-metrics") as c:
        sid = session_id(c)
        c.execute("DELETE FROM accounts WHERE id % 5 = 0")
    src.capture()
    return sid


@pytest.fixture
def site(pgo):
    sid = _scenario(pgo)
    servers = []

    def start(token=None, allowed_hosts=()):
        server = serve(pgo.settings, "127.0.0.1", 0, token, allowed_hosts)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield pgo, sid, start
    for s in servers:
        s.shutdown()
        s.server_close()


def _get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        e.close()
        return e.code, body


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_every_page_answers(site):
    _src, sid, start = site
    base = start()
    status, body = _get(base + "/")
    assert status == 200 and "<svg" in body and "usage-metrics" in body
    assert "last captured commit" in body
    status, body = _get(base + "/sessions?app=usage-metrics")
    assert status == 200 and sid in body and "web" not in re.sub(r"<header>.*?</header>", "", body)
    status, body = _get(base + f"/sessions/{sid}")
    assert status == 200 and "DELETE FROM accounts WHERE id % 5 = 0" in body
    assert "Undo preview" in body and 'INSERT INTO "public"."accounts"' in html.unescape(body)
    assert 'INSERT INTO "public"' not in body  # the script is escaped into the page
    assert "4 delete(s) of public.accounts to undo" in body
    status, body = _get(base + "/history/public.accounts?id=5")
    assert status == 200 and "usage-metrics" in body and "insert" in body
    assert _get(base + "/sessions/nope.nope")[0] == 404
    assert _get(base + "/since?x")[0] == 404
    assert _get(base + "/?since=yesterday")[0] == 400


def _metric(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_metrics_match_the_store(site):
    src, _, start = site
    status, text = _get(start() + "/metrics")
    assert status == 200
    table = "public.accounts"
    assert (
        _metric(text, "undo_changes_total", application="web", table=table, operation="insert")
        == 20
    )
    assert (
        _metric(text, "undo_changes_total", application="web", table=table, operation="update") == 1
    )
    assert (
        _metric(
            text, "undo_changes_total", application="usage-metrics", table=table, operation="delete"
        )
        == 4
    )
    assert _metric(text, "undo_transactions_total", application="web") == 2
    assert _metric(text, "undo_transactions_total", application="usage-metrics") == 1
    assert 0 <= _metric(text, "undo_capture_lag_seconds") < 600
    assert _metric(text, "undo_slot_wal_held_bytes") > 0
    (last,) = src.store_rows("SELECT max(commit_time) FROM transactions")[0]
    assert last is not None and _metric(text, "undo_last_commit_timestamp_seconds") > 0


def _series(text, name):
    """{labels: value} of every sample of a metric family in /metrics."""
    return {
        tuple(sorted(re.findall(r'(\w+)="([^"]*)"', line))): float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{")
    }


def _spam(src, names, updates=0, inserts=0):
    """Writes as any role may: each under an application_name of its choosing."""
    from psycopg import sql

    with src.connect() as c:
        for name in names:
            c.execute(sql.SQL("SET application_name = {}").format(sql.Literal(name)))
            for _ in range(updates):
                c.execute("UPDATE accounts SET plan = plan WHERE id = 1")
            for _ in range(inserts):
                c.execute("INSERT INTO accounts SELECT max(id) + 1, 'spam', 'free' FROM accounts")


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
def test_metrics_name_a_bounded_number_of_applications_and_never_go_down(site):
    """application_name is any writer's to choose: 110 of them must not make 110 series per
    family. The first APPLICATIONS seen keep their label, the rest count under "(other)"; the
    totals stay exact, and no series goes down when the others write more (the 100 busiest
    would not do: the updaters below overtaking the inserters would take their updates out of
    "(other)", and the inserters would bring no updates in)."""
    from undo.web.metrics import APPLICATIONS

    src, _, start = site
    base = start()
    _spam(src, [f"spam-{i:03}" for i in range(100)], inserts=3)
    _spam(src, [f"spam-{i:03}" for i in range(100, 110)], updates=2)
    src.capture()
    before = _get(base + "/metrics")[1]
    _spam(src, [f"spam-{i:03}" for i in range(100, 110)], updates=2)
    _spam(src, ["web"], updates=5)
    _spam(src, [f"new-{i:02}" for i in range(20)] + ["(other)"], inserts=1)
    src.capture()
    after = _get(base + "/metrics")[1]
    changes = 25 + 300 + 20
    for text, expected in ((before, changes), (after, changes + 20 + 5 + 21)):
        for family in ("undo_changes_total", "undo_transactions_total"):
            apps = {dict(labels)["application"] for labels in _series(text, family)}
            assert len(apps) <= APPLICATIONS + 1 and "(other)" in apps, (family, len(apps))
        assert sum(_series(text, "undo_changes_total").values()) == expected
        assert sum(_series(text, "undo_transactions_total").values()) == expected - 25 + 3
    for family in ("undo_changes_total", "undo_transactions_total"):
        later = _series(after, family)
        for labels, value in _series(before, family).items():
            assert later.get(labels, value) >= value, (family, labels)


def test_token_is_required_off_loopback_and_checked_on_every_request(site):
    src, sid, start = site
    with pytest.raises(BadInput, match="--token"):
        serve(src.settings, "0.0.0.0", 0, None)
    base = start(token="s3cret")
    for path in ("/", "/sessions", f"/sessions/{sid}", "/metrics", "/history/public.accounts?id=5"):
        status, body = _get(base + path)
        assert status == 401 and sid not in body and "acct" not in body
    status, body = _get(base + "/sessions", {"Authorization": "Bearer s3cret"})
    assert status == 200 and sid in body
    assert _get(base + "/sessions", {"Authorization": "Bearer wrong"})[0] == 401
    # the cookie holds a session value, never the token (test_web_hostile.py)
    assert _get(base + "/sessions", {"Cookie": "undo_token=s3cret"})[0] == 401
    assert _get(base + "/sessions", {"Cookie": "undo_session=s3cret"})[0] == 401


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_dashboard_in_headless_chromium(site, tmp_path):
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium and playwright are needed for the browser test")
        pytest.skip("chromium or playwright not installed")
    _src, sid, start = site
    base = start()
    shots = Path(os.environ.get("UNDO_SCREENSHOTS", tmp_path))
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(base + "/")
            assert page.locator("svg.chart").count() >= 2
            assert page.locator("svg.chart rect.bar").count() == 3  # web: I, U; metrics: D
            page.screenshot(path=str(shots / "overview.png"), full_page=True)
            page.click("text=Sessions")
            page.click(f"text={sid}")
            assert page.locator("text=Undo preview").count() == 1
            assert page.locator("span.del").count() == 4
            assert "COPY" in page.locator("pre.preview").inner_text()
            page.screenshot(path=str(shots / "session.png"), full_page=True)
        finally:
            browser.close()
    assert (shots / "session.png").stat().st_size > 1000


def test_the_dashboard_refuses_foreign_hosts_large_bodies_and_bad_pages(site):
    """DNS rebinding (a name the attacker controls resolving to 127.0.0.1), a login body of
    unknown or excessive size, and a bad page number: each refused, reading nothing and
    showing no data."""
    _src, sid, start = site
    base = start(token="s3cret", allowed_hosts=["Dash.example"])
    auth = {"Authorization": "Bearer s3cret"}
    status, body = _get(base + "/sessions", {**auth, "Host": "rebind.attacker.example"})
    assert status == 400 and sid not in body
    for host in ("localhost:1234", "[::1]:80", "dash.example:8080"):
        status, body = _get(base + "/sessions", {**auth, "Host": host})
        assert status == 200 and sid in body, host
    assert _get(base + "/sessions?page=abc", auth)[0] == 400
    assert _get(base + f"/sessions/{sid}?page=-x", auth)[0] == 400
    req = urllib.request.Request(base + "/sessions", headers=auth)
    with urllib.request.urlopen(req, timeout=30) as r:
        headers = r.headers
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
    port = int(base.rsplit(":", 1)[1])
    for length in ("-1", "999999999", "abc"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("POST", "/login")
        conn.putheader("Content-Length", length)
        conn.putheader("Content-Type", "application/x-www-form-urlencoded")
        conn.endheaders()
        conn.send(b"token=s3cret")  # never the length claimed: a server that waits times out
        response = conn.getresponse()
        # a length that is not a number is a 400; one over the limit is a 413 (waitress
        # answers both before reading a byte of the body)
        assert response.status == (413 if length == "999999999" else 400), length
        assert response.getheader("Set-Cookie") is None
        conn.close()


def test_a_session_of_many_transactions_is_paged(pgo):
    pgo.sql("CREATE TABLE t (id int PRIMARY KEY)")
    pgo.init()
    # 120 transactions: three pages of 50
    sid = _as_session(pgo, *(f"INSERT INTO t VALUES ({i})" for i in range(120)), app="loop")
    pgo.capture()
    server = serve(pgo.settings, "127.0.0.1", 0, None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/sessions/{sid}"
        first, last = _get(base)[1], _get(base + "?tpage=3")[1]
        assert "page 1 of 3" in first and first.count("<code>INSERT INTO t") == 50
        assert "page 3 of 3" in last and last.count("<code>INSERT INTO t") == 20
        assert _get(base + "?tpage=x")[0] == 400
    finally:
        server.shutdown()
        server.server_close()
