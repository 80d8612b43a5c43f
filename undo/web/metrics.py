"""/metrics: Prometheus text read from the store (and the source) at scrape time, every series
labelled with its source's name in the store (``source``)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import replace
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from undo.core.config import Settings
from undo.core.errors import UndoError
from undo.core.times import epoch
from undo.source import pg, sources
from undo.source.status import lag
from undo.store import open_store
from undo.store.api import Store

#: the application labels a metric family names: application_name is any writer's to choose,
#: and a series each would grow /metrics without bound. The first APPLICATIONS seen keep their
#: label for good; the rest count under OTHER. Not the busiest: an application moving in or out
#: of a top would make its series, or OTHER's, go down (a counter reset to Prometheus).
APPLICATIONS = 100
OTHER = "(other)"


def _named(apps: Iterable[str | None]) -> set[str | None]:
    """The first APPLICATIONS distinct applications of ``apps`` (first seen first)."""
    named: dict[str | None, None] = {}
    for app in apps:
        if len(named) >= APPLICATIONS:
            break
        named.setdefault(app)
    return set(named)


def _counter(
    name: str, doc: str, labels: list[str], samples: Iterable[tuple[tuple[str, ...], int]]
) -> CounterMetricFamily:
    """A counter family of ``samples``, those with the same labels summed (OTHER's)."""
    sums: dict[tuple[str, ...], int] = {}
    for key, n in samples:
        sums[key] = sums.get(key, 0) + n
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, n in sums.items():
        family.add_metric(list(key), n)
    return family


class StoreCollector(Collector):
    """Reads the aggregates capture keeps; never scans the changes."""

    def __init__(self, settings: Settings, only: Collection[str] | None = None) -> None:
        self.settings = settings
        self.only = None if only is None else set(only)  # these sources (None: every one)

    def collect(self) -> Iterator[Any]:
        """Every series with the label ``source`` (the source's name in the store), first;
        each source names its own first APPLICATIONS applications."""
        db = open_store(self.settings.store)
        try:
            changes: list[tuple[tuple[str, ...], int]] = []
            txns: list[tuple[tuple[str, ...], int]] = []
            refusals: list[tuple[tuple[str, ...], int]] = []
            untrusted = CounterMetricFamily(
                "undo_untrusted_writes",
                "Row changes on audited tables without a trusted tag, by reason",
                labels=["source", "reason"],
            )
            malformed = CounterMetricFamily(
                "undo_malformed_messages",
                "Messages with undo's prefixes that were not what undo's SQL writes, by prefix",
                labels=["source", "prefix"],
            )
            last = GaugeMetricFamily(
                "undo_last_commit_timestamp_seconds",
                "Commit time of the last captured transaction",
                labels=["source"],
            )
            gaps = GaugeMetricFamily(
                "undo_gaps", "Gaps recorded in the audit trail", labels=["source"]
            )
            # every source's figures at once (the store-wide reader): a source at a time made
            # its reader and ran each query again
            wanted = [x.name for x in db.sources() if self.only is None or x.name in self.only]
            for s, figures in db.metrics_by_source(wanted).items():
                named = _named(app for app, _ in figures.transactions)
                changes += [
                    ((s, app if app in named else OTHER, table, op), n)
                    for app, table, ins, upd, dele, trunc in figures.changes
                    for op, n in (
                        ("insert", ins),
                        ("update", upd),
                        ("delete", dele),
                        ("truncate", trunc),
                    )
                ]
                txns += [
                    ((s, app if app in named else OTHER), n) for app, n in figures.transactions
                ]
                for reason, n in figures.untrusted:
                    untrusted.add_metric([s, reason or "unknown"], n)
                refused = _named(app for _, app, _ in figures.guard_refusals)
                refusals += [
                    ((s, guard or "", (app or "") if app in refused else OTHER), n)
                    for guard, app, n in figures.guard_refusals
                ]
                for prefix, n in figures.malformed:
                    malformed.add_metric([s, prefix], n)
                if figures.last_commit_time:
                    last.add_metric([s], epoch(figures.last_commit_time))
                gaps.add_metric([s], figures.gaps)
            yield _counter(
                "undo_changes",
                "Row changes captured, by application, table and operation",
                ["source", "application", "table", "operation"],
                changes,
            )
            yield _counter(
                "undo_transactions",
                "Transactions captured, by application",
                ["source", "application"],
                txns,
            )
            yield untrusted
            yield _counter(
                "undo_guard_refusals",
                "Transactions a guard refused to let write, by guard and application",
                ["source", "guard", "application"],
                refusals,
            )
            yield malformed
            if last.samples:
                yield last
            yield gaps
            if self.settings.dsn:
                yield from self._source(db)
        finally:
            db.close()

    def source_only(self) -> tuple[list[Any], str]:
        """The families that need the source (none without --dsn), without the store's: what
        the dashboard's overview shows of the source's health; and why they are missing."""
        if not self.settings.dsn:
            return [], "no --dsn"
        db = open_store(self.settings.store)
        try:
            found: list[Any] = []
            return found, self._measure(db, found)
        finally:
            db.close()

    def _source(self, db: Store) -> Iterator[Any]:
        found: list[Any] = []
        self._measure(db, found)
        yield from found

    def _measure(self, db: Store, found: list[Any]) -> str:
        """What needs the source, into ``found``: the WAL the slot the store recorded for the
        --dsn database's source holds, and the lag (as `undo status`); why any is missing."""
        try:
            conn = pg.connect(self.settings.dsn, connect_timeout=2)
        except Exception:
            return "source unreachable"
        try:
            with conn:
                try:
                    # the --dsn database's source: its position, its slot, its name as the label
                    source = sources.bind(db, self.settings, conn).name
                except UndoError:
                    return "--dsn is no source of the store"
                slot = db.meta("slot") or self.settings.slot
                settings = replace(self.settings, slot=slot)
                row = conn.execute(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8,"
                    " active_pid IS NOT NULL FROM pg_replication_slots WHERE slot_name = %s"
                    " AND database = current_database()",  # not another database's slot
                    (slot,),
                ).fetchone()
                behind = lag(conn, db, settings, active=bool(row and row[1]), peek=bool(row))
        except Exception:
            return "source unreachable"
        if self.only is not None and source not in self.only:
            return ""

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, text, labels=["source"])
            g.add_metric([source], value)
            return g

        if row is not None and row[0] is not None:
            found.append(
                gauge("undo_slot_wal_held_bytes", "WAL the slot keeps on the source", row[0])
            )
        if behind["lag_bytes"] is not None:
            found.append(
                gauge(
                    "undo_capture_lag_bytes",
                    "The source's current WAL position minus the store's position",
                    behind["lag_bytes"],
                )
            )
        if behind["lag_seconds"] is not None:
            found.append(
                gauge(
                    "undo_capture_lag_seconds",
                    "Age of the oldest commit not yet stored (0 when caught up)",
                    behind["lag_seconds"],
                )
            )
        return "" if row is not None else f"no slot {slot} on the --dsn database"


def registry(settings: Settings, only: Collection[str] | None = None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(settings, only))
    return reg
