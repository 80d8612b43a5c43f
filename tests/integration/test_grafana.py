"""contrib/grafana/undo-dashboard.json against the /metrics a real `undo serve` exposes: every
query names only series and labels that are there, and every series the brief names is shown."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.conftest import erase_own_tag
from tests.integration.test_web import _scenario
from undo.web import serve

DASHBOARD = Path(__file__).parents[2] / "contrib" / "grafana" / "undo-dashboard.json"
ALERTS = Path(__file__).parents[2] / "docker" / "prometheus-alerts.yml"
#: labels Prometheus adds to every series it scrapes
SCRAPE_LABELS = {"instance", "job"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and"}
PROMQL_WORDS |= {"or", "unless", "offset"}


def _exposed(text: str) -> dict[str, set[str]]:
    """Series names on a /metrics page and the labels each carries (a family with no sample
    yet is there by its TYPE line, with no labels known)."""
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.setdefault(line.split()[2], set())
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s", line)
            assert m is not None, line
            names.setdefault(m.group(1), set()).update(re.findall(r'(\w+)="', m.group(3) or ""))
    return names


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, expr, legend) of every target, rows' panels included; and the template
    variables' queries."""
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                found.append((p["title"], t["expr"], t.get("legendFormat", "")))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            found.append((f"${v['name']}", v["query"]["query"], ""))
    return found


def _parse(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names a PromQL expression uses."""
    labels: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {g.strip() for g in grouping.split(",") if g.strip()}
    rest = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    rest = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", rest)
    rest = re.sub(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*(\w+)\s*\)", r"\1 ", rest)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", rest):
        if m.group(2) is None and m.group(1) not in PROMQL_WORDS:
            names.add(m.group(1))
    if m := re.search(r"label_values\(\s*[a-zA-Z_:][a-zA-Z0-9_:]*\s*,\s*(\w+)\s*\)", expr):
        labels.add(m.group(1))
    return names, labels


def test_the_parser_sees_names_and_labels():
    assert _parse(
        'topk(10, sum by (table) (rate(undo_changes_total{instance=~"$instance"}'
        "[$__rate_interval])))"
    ) == ({"undo_changes_total"}, {"table", "instance"})
    assert _parse("time() - max(undo_last_commit_timestamp_seconds)") == (
        {"undo_last_commit_timestamp_seconds"},
        set(),
    )
    assert _parse("label_values(undo_gaps, instance)") == ({"undo_gaps"}, {"instance"})


@pytest.fixture
def scraped(pgo) -> str:
    """/metrics of a store with activity, a guard's refusal, an untrusted write (a malformed
    tag) and a source to measure lag against."""
    _scenario(pgo)
    assert pgo.undo_cli("guard", "add", "report*").returncode == 0
    with (
        pgo.connect(application_name="report-x") as c,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
    ):
        c.execute("DELETE FROM accounts")
    with pgo.connect(application_name="web") as c, c.transaction():
        erase_own_tag(c, "accounts")
        c.execute("SELECT pg_logical_emit_message(true, 'undo', 'not a tag')")
        c.execute("INSERT INTO accounts VALUES (100, 'x', 'free')")
    pgo.capture()
    server = serve(pgo.settings, "127.0.0.1", 0, None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as r:
            return str(r.read().decode())
    finally:
        server.shutdown()


def test_every_query_of_the_dashboard_names_series_and_labels_that_metrics_exposes(scraped):
    exposed = _exposed(scraped)
    for name in ("undo_untrusted_writes_total", "undo_guard_refusals_total"):
        assert exposed[name], f"the scenario left {name} without a sample"
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    assert len(queries) >= 10
    used: set[str] = set()
    for title, expr, legend in queries:
        names, labels = _parse(expr)
        assert names, f"{title}: no series in {expr!r}"
        unknown = names - exposed.keys()
        assert not unknown, f"{title}: {sorted(unknown)} not on /metrics ({expr!r})"
        known = SCRAPE_LABELS.union(*(exposed[n] for n in names))
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        assert labels | legend_labels <= known, f"{title}: labels {labels - known} in {expr!r}"
        used |= names
    # what the dashboard is for: activity per application, lag, gaps, untrusted writes,
    # guard refusals, malformed messages
    for name in (
        "undo_changes_total",
        "undo_transactions_total",
        "undo_capture_lag_seconds",
        "undo_gaps",
        "undo_untrusted_writes_total",
        "undo_guard_refusals_total",
        "undo_malformed_messages_total",
    ):
        assert name in used, f"the dashboard does not show {name}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "instance"}


def test_the_alert_rules_parse_and_one_watches_the_scrape_itself(scraped):
    """docker/prometheus-alerts.yml is YAML Prometheus reads, its rules name series /metrics
    exposes; and when the scrape itself fails (undo serve down, a token refused, a job named
    otherwise), an alert says so: every other rule is silent then."""
    exposed = _exposed(scraped)
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = {r["alert"]: r for r in group["rules"]}
    assert len(rules) == len(group["rules"]) >= 7
    for name, rule in rules.items():
        names, labels = _parse(rule["expr"])
        unknown = names - exposed.keys() - {"up"}
        assert names and not unknown, f"{name}: {sorted(unknown)} not on /metrics"
        assert labels <= SCRAPE_LABELS.union(*(exposed.get(n, set()) for n in names)), name
    down = rules["UndoMetricsDown"]
    expr = " ".join(down["expr"].split())
    assert 'up{job="undo"} == 0' in expr and 'absent(up{job="undo"})' in expr, expr
    assert down["labels"]["severity"] == "page" and down["for"]
