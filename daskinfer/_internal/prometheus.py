"""Prometheus metrics of daskinfer runs, served by the scheduler's ``/metrics``.

Distributed's ``PrometheusHandler`` writes ``prometheus_client.generate_latest()``, which
reads the process-wide ``prometheus_client.REGISTRY``; :func:`register` adds one
:class:`RunCollector` to it, once per process. The collector reads the
:class:`~daskinfer._internal.dashboard.RunStore` of every live scheduler it was
registered for (tests may run several schedulers in one process), and exports the latest
snapshot of each of their last ``MAX_RUNS`` runs, per stage, labelled ``run`` and ``stage``.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

__all__ = ["RunCollector", "register"]

logger = logging.getLogger("daskinfer.dashboard")

LABELS = ["run", "stage"]

# name, type, help, snapshot field
_SIMPLE: list[tuple[str, str, str, str]] = [
    ("daskinfer_rows_processed", "counter", "Rows a stage has output.", "rows_done"),
    ("daskinfer_batches_processed", "counter", "Batches (tasks) a stage has finished.",
     "batches_done"),
    ("daskinfer_retries", "counter", "Batches a stage has retried.", "retries"),
    ("daskinfer_errors", "counter", "Errors a stage has met.", "errors"),
    ("daskinfer_quarantined_rows", "counter", "Rows a stage has set aside as failing.",
     "quarantined_rows"),
    ("daskinfer_batches_in_flight", "gauge", "Batches a stage has submitted and not finished.",
     "in_flight"),
    ("daskinfer_batches_queued", "gauge", "Batches waiting at a stage's input.", "queued"),
    ("daskinfer_actors_alive", "gauge", "Actors alive in a stage's pool.", "actors_alive"),
    ("daskinfer_actors_busy", "gauge", "Actors of a stage's pool running a batch.",
     "actors_busy"),
    ("daskinfer_gpu_busy_ratio", "gauge",
     "Fraction of recent time the stage's GPUs were busy (0 to 1).", "gpu_busy"),
]  # fmt: skip

_lock = threading.Lock()
_collector: RunCollector | None = None


class RunCollector:
    """A custom collector (``collect()`` yields metric families) over runs on schedulers."""

    def __init__(self) -> None:
        self._schedulers: weakref.WeakSet[Any] = weakref.WeakSet()

    def add(self, scheduler: Any) -> None:
        """Export this scheduler's runs too."""
        self._schedulers.add(scheduler)

    def describe(self) -> list[Metric]:
        """The families (without samples), so the registry knows the names up front."""
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        """Families for the latest snapshot of each recent run."""
        try:
            snapshots = self._snapshots()
        except Exception:  # a scrape must never fail because of us
            logger.debug("daskinfer metrics: collecting failed", exc_info=True)
            snapshots = []
        yield from self._families(snapshots)

    def _snapshots(self) -> list[dict[str, Any]]:
        from daskinfer._internal.dashboard import PLUGIN_NAME

        latest: dict[str, dict[str, Any]] = {}
        for scheduler in list(self._schedulers):
            if str(getattr(scheduler, "status", "")).endswith(("closed", "closing")):
                continue
            plugin = scheduler.plugins.get(PLUGIN_NAME)
            store = getattr(plugin, "store", None)
            if store is None:
                continue
            for snap in store.snapshots():
                if snap["run"] not in latest or latest[snap["run"]]["time"] < snap["time"]:
                    latest[snap["run"]] = snap
        return list(latest.values())

    def _families(self, snapshots: list[dict[str, Any]]) -> Iterator[Metric]:
        for name, kind, doc, field in _SIMPLE:
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(name, doc, labels=LABELS)
            for snap in snapshots:
                for stage in snap["stages"]:
                    value = stage.get(field)
                    if value is not None:
                        family.add_metric([snap["run"], stage["name"]], float(value))
            yield family

        latency = HistogramMetricFamily(
            "daskinfer_stage_latency_seconds",
            "Seconds from a batch's submission to its result, per stage.",
            labels=LABELS,
        )
        for snap in snapshots:
            for stage in snap["stages"]:
                buckets = stage.get("latency_buckets") or []
                if buckets:
                    latency.add_metric(
                        [snap["run"], stage["name"]],
                        buckets=[
                            ("+Inf" if math.isinf(le) else floatToGoString(le), float(n))
                            for le, n in buckets
                        ],
                        sum_value=float(stage.get("latency_sum_s") or 0.0),
                    )
        yield latency

        info = GaugeMetricFamily(
            "daskinfer_run_info",
            "1 for each recent run, labelled with its pipeline and state.",
            labels=["run", "pipeline", "state"],
        )
        for snap in snapshots:
            info.add_metric([snap["run"], snap["pipeline"], snap["state"]], 1.0)
        yield info


def register(scheduler: Any) -> None:
    """Export ``scheduler``'s runs on ``/metrics`` (idempotent, thread-safe)."""
    global _collector
    with _lock:
        if _collector is None:
            collector = RunCollector()
            try:
                REGISTRY.register(collector)
            except ValueError:  # names taken, e.g. by a reloaded copy of this module
                logger.warning("daskinfer metrics: names already registered", exc_info=True)
                return
            _collector = collector
        _collector.add(scheduler)
