"""``GET /metrics``: Prometheus metrics derived from the ledger at scrape time.

Why from the ledger and not prometheus-client's multiprocess mode: jobs are
created by any web process and run by any worker process on any host, and a
web process cannot read another host's multiprocess directory. The ledger
already sees every job, so every web process answers with the same, complete
numbers; scrape ONE target (the service address, not each process), since each
answer is already the fleet's total.

Counters and histograms come from ``job_transition_totals``, which a trigger on
``job_events`` keeps in the same transaction as each transition: they stay
monotonic when retention pruning deletes old jobs (counting rows of ``jobs``
would make them drop and look like a counter reset). Gauges (queued, running,
stuck, the oldest due job's wait) are counted from ``jobs`` as they are now.
A scrape costs two small queries; a ledger that does not answer within
``SCRAPE_TIMEOUT_MS`` yields ``ffworker_ledger_up 0`` and nothing else.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString
from sqlalchemy import Engine, func, select, text

from ffworker import webhooks
from ffworker.ledger import WAITING_REASONS, waiting_expression
from ffworker.models import JOB_KINDS, TERMINAL_STATUSES, Job

jobs_table = Job.__table__

log = logging.getLogger("ffworker.metrics")

SCRAPE_TIMEOUT_MS = 5000

_TOTALS = text("""
    SELECT t.name AS tenant, x.workspace, x.kind, x.from_status, x.to_status, x.by_reaper, x.transitions,
           x.seconds_count, x.seconds_sum, x.seconds_buckets, x.speed_count, x.speed_sum, x.speed_buckets,
           x.media_seconds
      FROM job_transition_totals x JOIN tenants t ON t.id = x.tenant_id
""")
_BOUNDS = text("SELECT ffworker_seconds_bounds() AS seconds, ffworker_speed_bounds() AS speed")
# One branch per status, each matching a partial index of jobs (status = 'queued' / 'running'):
# the scrape reads the live work, not the whole retention window. "Stuck" is the reaper's own
# test, ffworker_is_stale() (migration 0006).
_CURRENT = text("""
    SELECT kind, 'queued' AS status, count(*) AS jobs, 0 AS stuck,
           max(extract(epoch FROM now() - run_after)) FILTER (
               WHERE run_after <= now() AND cancel_requested_at IS NULL) AS oldest_due_s
      FROM jobs WHERE status = 'queued' GROUP BY kind
    UNION ALL
    SELECT kind, 'running', count(*),
           count(*) FILTER (WHERE ffworker_is_stale(heartbeat_at, :stale_after_s)), NULL
      FROM jobs WHERE status = 'running' GROUP BY kind
""")


_TENANT_SLOTS = text("""
    SELECT t.name AS tenant, u.running_slots, coalesce(t.max_slots, :default_slots) AS max_slots
      FROM tenant_usage u JOIN tenants t ON t.id = u.tenant_id
""")


def _waiting_query(waiting):
    """Queued jobs by why they wait (the same rule as the job's ``waiting``)."""
    reason = waiting.label("reason")
    return select(reason, func.count().label("jobs")).select_from(jobs_table).where(
        jobs_table.c.status == "queued").group_by(reason)


class _Histogram:
    """Per-bucket counts summed over rows, exposed cumulatively."""

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def add(self, counts: list[int] | None, total: float) -> None:
        for i, count in enumerate((counts or [])[: len(self.counts)]):
            self.counts[i] += count or 0
        self.total += total

    def buckets(self) -> list[tuple[str, float]]:
        running, out = 0, []
        for bound, count in zip([*self.bounds, float("inf")], self.counts):
            running += count
            out.append((floatToGoString(bound), running))
        return out


class LedgerCollector:
    """A prometheus-client collector that reads the ledger on each scrape."""

    def __init__(self, engine: Engine, stale_after_s: float, *, tenant_max_slots: int = 5,
                 max_running: int | None = None) -> None:
        self.engine = engine
        self.stale_after_s = stale_after_s
        self.tenant_max_slots = tenant_max_slots
        self.waiting = _waiting_query(waiting_expression(tenant_max_slots, max_running))

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: families depend on the data

    def collect(self) -> Iterable[Metric]:
        started = time.monotonic()
        try:
            with self.engine.connect() as conn:
                with conn.begin():
                    conn.execute(text(f"SET LOCAL statement_timeout = {SCRAPE_TIMEOUT_MS}"))
                    bounds = conn.execute(_BOUNDS).mappings().one()
                    totals = conn.execute(_TOTALS).mappings().all()
                    current = conn.execute(_CURRENT, {"stale_after_s": self.stale_after_s}).mappings().all()
                    webhook_rows = webhooks.metrics_read(conn)
                    waiting = conn.execute(self.waiting).all()
                    slots = conn.execute(_TENANT_SLOTS, {"default_slots": self.tenant_max_slots}).all()
        except Exception as exc:
            log.warning("event=metrics_scrape_failed error=%s", type(exc).__name__)
            yield GaugeMetricFamily("ffworker_ledger_up", "1 when the ledger answered this scrape", value=0)
            return
        yield GaugeMetricFamily("ffworker_ledger_up", "1 when the ledger answered this scrape", value=1)
        yield from self._from_totals(totals, list(bounds["seconds"]), list(bounds["speed"]))
        yield from self._from_current(current)
        yield from webhooks.metric_families(webhook_rows, list(bounds["seconds"]))
        yield from self._fair_share(waiting, slots)
        yield GaugeMetricFamily("ffworker_metrics_scrape_duration_seconds",
                                "Time this scrape spent reading the ledger", value=time.monotonic() - started)

    @staticmethod
    def _fair_share(waiting, slots) -> Iterable[Metric]:
        counts = dict(waiting)
        family = GaugeMetricFamily("ffworker_jobs_waiting", "Queued jobs by why they wait (the job's `waiting`)",
                                   labels=["reason"])
        for reason in WAITING_REASONS:
            family.add_metric([reason], counts.get(reason, 0))
        yield family
        running = GaugeMetricFamily("ffworker_tenant_running_slots", "Slots a tenant's running jobs use now",
                                    labels=["tenant"])
        limit = GaugeMetricFamily("ffworker_tenant_max_slots", "Slots a tenant may use at once", labels=["tenant"])
        for row in sorted(slots):
            running.add_metric([row.tenant], row.running_slots)
            limit.add_metric([row.tenant], row.max_slots)
        yield running
        yield limit

    def _from_totals(self, rows, seconds_bounds: list[float], speed_bounds: list[float]) -> Iterable[Metric]:
        created: dict[tuple, float] = defaultdict(float)
        finished: dict[tuple, float] = defaultdict(float)
        retries: dict[tuple, float] = defaultdict(float)
        reaped: dict[tuple, float] = defaultdict(float)
        media: dict[tuple, float] = defaultdict(float)
        queue_wait: dict[tuple, _Histogram] = {}
        run_time: dict[tuple, _Histogram] = {}
        speed: dict[tuple, _Histogram] = {}
        for row in rows:
            tenant, workspace, kind = row["tenant"], row["workspace"], row["kind"]
            source, target, count = row["from_status"], row["to_status"], row["transitions"]
            if source is None:
                created[(tenant, workspace, kind)] += count
            if target in TERMINAL_STATUSES:
                finished[(tenant, workspace, kind, target)] += count
            if source == "running" and target == "queued":
                retries[(kind,)] += count
            if row["by_reaper"]:
                reaped[(kind, _REAPER_ACTIONS.get(target, target), "stale")] += count
            if row["media_seconds"]:
                media[(tenant, kind)] += row["media_seconds"]
            if source == "queued" and target == "running":
                queue_wait.setdefault((kind,), _Histogram(seconds_bounds)).add(
                    row["seconds_buckets"], row["seconds_sum"])
            if source == "running":
                outcome = "retried" if target == "queued" else target
                run_time.setdefault((kind, outcome), _Histogram(seconds_bounds)).add(
                    row["seconds_buckets"], row["seconds_sum"])
            if source == "running" and target == "completed" and row["speed_count"]:
                speed.setdefault((kind,), _Histogram(speed_bounds)).add(row["speed_buckets"], row["speed_sum"])

        yield _counter("ffworker_jobs_created", "Jobs submitted", ["tenant", "workspace", "kind"], created)
        yield _counter("ffworker_jobs_finished", "Jobs that reached a terminal status",
                       ["tenant", "workspace", "kind", "status"], finished)
        yield _counter("ffworker_job_retries", "Runs that ended with the job queued again (worker retry or reaper)",
                       ["kind"], retries)
        yield _counter("ffworker_reaper_actions", "Stale running jobs the reaper acted on, by what it made of them",
                       ["kind", "action", "reason"], reaped)
        yield _counter("ffworker_media_processed_seconds", "Input media duration of completed jobs",
                       ["tenant", "kind"], media)
        yield _histogram("ffworker_job_queue_wait_seconds",
                         "From the moment a job was due (submitted, or its retry backoff over) to its claim",
                         ["kind"], queue_wait)
        yield _histogram("ffworker_job_run_seconds", "Duration of each run, claim to its end, by outcome",
                         ["kind", "outcome"], run_time)
        yield _histogram("ffworker_ffmpeg_speed_ratio",
                         "ffmpeg's encode speed (x real time) at the end of each completed run", ["kind"], speed)

    def _from_current(self, rows) -> Iterable[Metric]:
        values: dict[tuple[str, str], float] = defaultdict(float)
        for row in rows:
            values[(row["status"], row["kind"])] += row["jobs"]
            values[("stuck", row["kind"])] += row["stuck"]
        families = {
            "queued": GaugeMetricFamily("ffworker_jobs_queued", "Jobs queued now (due or in a retry backoff)",
                                        labels=["kind"]),
            "running": GaugeMetricFamily("ffworker_jobs_running", "Jobs running now", labels=["kind"]),
            "stuck": GaugeMetricFamily("ffworker_jobs_stuck",
                                       "Running jobs without a heartbeat for longer than FFWORKER_STALE_AFTER_S",
                                       labels=["kind"]),
        }
        for kind in sorted(set(JOB_KINDS) | {row["kind"] for row in rows}):
            for status, family in families.items():
                family.add_metric([kind], values.get((status, kind), 0))
        yield from families.values()
        oldest = max((float(row["oldest_due_s"]) for row in rows if row["oldest_due_s"] is not None), default=0.0)
        yield GaugeMetricFamily("ffworker_queue_oldest_due_seconds",
                                "How long the oldest due queued job has been waiting for a worker", value=oldest)


_REAPER_ACTIONS = {"queued": "requeued", "failed": "failed", "cancelled": "cancelled"}


def _counter(name: str, documentation: str, labels: list[str], values: dict[tuple, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key in sorted(values):
        family.add_metric(list(key), values[key])
    return family


def _histogram(name: str, documentation: str, labels: list[str],
               values: dict[tuple, _Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for key in sorted(values):
        family.add_metric(list(key), values[key].buckets(), sum_value=values[key].total)
    return family


class Metrics:
    """The app's registry: only ledger-derived metrics (no per-process ones, which
    would differ between the processes behind one scrape address)."""

    def __init__(self, engine: Engine, stale_after_s: float, *, tenant_max_slots: int = 5,
                 max_running: int | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(LedgerCollector(engine, stale_after_s, tenant_max_slots=tenant_max_slots,
                                               max_running=max_running))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type), in the format the scraper's Accept header asks for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
