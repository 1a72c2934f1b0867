"""The daskinfer page of the Dask dashboard, served by the scheduler.

The client publishes a progress snapshot of each run about once a second with
``client.log_event("daskinfer-progress", snapshot)``. :func:`install`, run on the
scheduler with ``client.run_on_scheduler(install)``, adds to that scheduler:

- a :class:`ProgressPlugin` (a ``SchedulerPlugin``) whose ``log_event`` hook keeps the
  latest snapshot and a short history of the last :data:`MAX_RUNS` runs. Dask's own event
  log is a bounded deque shared by all runs, so it cannot be relied on for history;
- the routes ``/daskinfer`` (an HTML page) and ``/daskinfer/api/runs.json`` on the
  scheduler's HTTP server (``Scheduler.http_application``, a tornado application), so
  they show in ``/sitemap.json``;
- the Prometheus collector of :mod:`daskinfer._internal.prometheus`, served by ``/metrics``.

Everything here runs on the scheduler, in its event loop: it holds no client, never
blocks, and a malformed snapshot is dropped (logged at debug level), never raised.
"""

from __future__ import annotations

import collections
import html
import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from tornado import web

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.http.utils import RequestHandler

__all__ = ["MAX_RUNS", "PLUGIN_NAME", "TOPIC", "ProgressPlugin", "RunStore", "install"]

logger = logging.getLogger("daskinfer.dashboard")

TOPIC = "daskinfer-progress"
PLUGIN_NAME = "daskinfer-dashboard"
PAGE_PATH = "daskinfer"
API_PATH = "daskinfer/api/runs.json"
MAX_RUNS = 20  # runs kept (and exported to Prometheus) per scheduler
HISTORY_POINTS = 300  # snapshots kept per run for the rows/s sparklines (~5 min at 1/s)
STALE_S = 30.0  # a "running" run with no snapshot for this long is shown as stale
KINDS = ("source", "tasks", "actors", "limit", "repartition")


# --------------------------------------------------------------------------- snapshots


def _int(value: Any, default: int = 0) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return out if out >= 0 else default


def _float(value: Any, default: float = 0.0) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) and out >= 0 else default


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    out = _float(value, -1.0)
    return None if out < 0 else out


def _str(value: Any, default: str = "", limit: int = 200) -> str:
    """``value`` as text, cut to ``limit`` characters (names label Prometheus series)."""
    if value is None:
        return default
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _buckets(value: Any) -> list[tuple[float, int]]:
    """Cumulative ``[le, count]`` pairs, sorted, non-decreasing, ending at +inf."""
    pairs: list[tuple[float, int]] = []
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                try:
                    le = float(item[0])
                except (TypeError, ValueError):
                    continue
                if not math.isnan(le):
                    pairs.append((le, _int(item[1])))
    pairs.sort(key=lambda p: p[0])
    out: list[tuple[float, int]] = []
    highest = 0
    for le, count in pairs:
        highest = max(highest, count)
        if out and out[-1][0] == le:
            out[-1] = (le, highest)
        else:
            out.append((le, highest))
    if out and not math.isinf(out[-1][0]):
        out.append((math.inf, highest))
    return out


def _clean_stage(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    kind = _str(raw.get("kind"), "tasks")
    workers = raw.get("actor_workers")
    return {
        "name": name,
        "kind": kind if kind in KINDS else _str(kind)[:40],
        "rows_done": _int(raw.get("rows_done")),
        "rows_expected": None if raw.get("rows_expected") is None else _int(raw["rows_expected"]),
        "rows_per_s": _float(raw.get("rows_per_s")),
        "batches_done": _int(raw.get("batches_done")),
        "in_flight": _int(raw.get("in_flight")),
        "queued": _int(raw.get("queued")),
        "actors_alive": _int(raw.get("actors_alive")),
        "actors_busy": _int(raw.get("actors_busy")),
        "actor_workers": [_str(w) for w in workers] if isinstance(workers, (list, tuple)) else [],
        "retries": _int(raw.get("retries")),
        "errors": _int(raw.get("errors")),
        "quarantined_rows": _int(raw.get("quarantined_rows")),
        "task_seconds": _float(raw.get("task_seconds")),
        "latency_buckets": _buckets(raw.get("latency_buckets")),
        "latency_sum_s": _float(raw.get("latency_sum_s")),
        "gpu_busy": _opt_float(raw.get("gpu_busy")),
    }


def clean_snapshot(msg: Any, received: float) -> dict[str, Any] | None:
    """A snapshot with every field present and of the documented type; None if unusable.

    Missing or malformed fields get defaults, so snapshots from older or newer clients
    still show. Stage names are made unique within a run (``name#2``), since they label
    Prometheus series.
    """
    if not isinstance(msg, Mapping) or not msg.get("run"):
        return None
    stages: list[dict[str, Any]] = []
    seen: set[str] = set()
    raw_stages = msg.get("stages")
    for i, raw in enumerate(raw_stages if isinstance(raw_stages, (list, tuple)) else []):
        if not isinstance(raw, Mapping):
            continue
        name = _str(raw.get("name"), f"stage {i}") or f"stage {i}"
        unique, n = name, 1
        while unique in seen:
            n += 1
            unique = f"{name}#{n}"
        seen.add(unique)
        stages.append(_clean_stage(raw, unique))
    state = _str(msg.get("state"), "running")
    bottleneck = msg.get("bottleneck")
    if isinstance(bottleneck, Mapping) and bottleneck.get("stage"):
        bottleneck = {
            "stage": _str(bottleneck["stage"]),
            "reason": _str(bottleneck.get("reason"), limit=500),
        }
    else:
        bottleneck = None
    snap_time = _float(msg.get("time"), received) or received
    return {
        "run": _str(msg["run"]),
        "pipeline": _str(msg.get("pipeline"), limit=1000),
        "state": state if state in ("running", "finished", "failed") else state[:40],
        "error": None if msg.get("error") is None else _str(msg.get("error"), limit=10_000),
        "started": _float(msg.get("started"), snap_time) or snap_time,
        "time": snap_time,
        "wall_s": _float(msg.get("wall_s")),
        "rows_out": _int(msg.get("rows_out")),
        "bottleneck": bottleneck,
        "stages": stages,
    }


class _Run:
    """The latest snapshot of one run, and the stages' rows done over time."""

    def __init__(self, snapshot: dict[str, Any], received: float) -> None:
        self.latest = snapshot
        self.received = received
        # (snapshot time, {stage name: rows_done})
        self.history: collections.deque[tuple[float, dict[str, int]]] = collections.deque(
            maxlen=HISTORY_POINTS
        )
        self._record(snapshot)

    def update(self, snapshot: dict[str, Any], received: float) -> None:
        if snapshot["time"] < self.latest["time"]:
            return  # a late, out-of-order snapshot must not undo a newer (final) one
        self.latest = snapshot
        self.received = received
        self._record(snapshot)

    def _record(self, snapshot: dict[str, Any]) -> None:
        point = (snapshot["time"], {s["name"]: s["rows_done"] for s in snapshot["stages"]})
        if self.history and point[0] <= self.history[-1][0]:
            self.history[-1] = point
        else:
            self.history.append(point)

    def rates(self, stage: str) -> list[float]:
        """Rows per second of ``stage`` between successive snapshots."""
        out: list[float] = []
        prev: tuple[float, int] | None = None
        for t, rows in self.history:
            if stage not in rows:
                continue
            if prev is not None and t > prev[0]:
                out.append(max(0.0, (rows[stage] - prev[1]) / (t - prev[0])))
            prev = (t, rows[stage])
        return out

    def is_stale(self, now: float) -> bool:
        return self.latest["state"] == "running" and now - self.received > STALE_S

    def as_json(self, now: float) -> dict[str, Any]:
        out = dict(self.latest)
        out["stages"] = [
            {
                **s,
                "latency_buckets": [[_json_float(le), n] for le, n in s["latency_buckets"]],
                "rows_per_s_history": [round(r, 3) for r in self.rates(s["name"])],
            }
            for s in self.latest["stages"]
        ]
        out["received"] = self.received
        out["stale"] = self.is_stale(now)
        return out


def _json_float(value: float) -> float | str:
    return "+Inf" if math.isinf(value) else value


class RunStore:
    """The last :data:`MAX_RUNS` runs seen on the progress topic; safe across threads."""

    def __init__(self, max_runs: int = MAX_RUNS) -> None:
        self.max_runs = max_runs
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    def ingest(self, msg: Any, received: float | None = None) -> bool:
        """Take one published snapshot; False (and nothing changes) if it is unusable."""
        received = time.time() if received is None else received
        snapshot = clean_snapshot(msg, received)
        if snapshot is None:
            return False
        with self._lock:
            run = self._runs.get(snapshot["run"])
            if run is None:
                self._runs[snapshot["run"]] = _Run(snapshot, received)
                self._evict(received)
            else:
                run.update(snapshot, received)
        return True

    def _evict(self, now: float) -> None:
        while len(self._runs) > self.max_runs:
            # ended runs go first; a stale run (its client died) counts as ended
            done = [
                r for r in self._runs.values() if r.latest["state"] != "running" or r.is_stale(now)
            ]
            victim = min(done or self._runs.values(), key=lambda r: r.latest["started"])
            del self._runs[victim.latest["run"]]

    def runs(self) -> list[_Run]:
        """Runs, newest first (by start time)."""
        with self._lock:
            runs = list(self._runs.values())
        return sorted(runs, key=lambda r: r.latest["started"], reverse=True)

    def snapshots(self) -> list[dict[str, Any]]:
        """The latest snapshot of each run, newest first."""
        return [r.latest for r in self.runs()]


class ProgressPlugin(SchedulerPlugin):
    """Keeps the progress snapshots published on :data:`TOPIC` in a :class:`RunStore`."""

    name = PLUGIN_NAME

    def __init__(self) -> None:
        self.store = RunStore()
        self.routes_added = False

    def log_event(self, topic: str, msg: Any) -> None:
        """Take a snapshot (called by the scheduler for every event on every topic)."""
        if topic == TOPIC:
            self.ingest(msg)

    def ingest(self, msg: Any, received: float | None = None) -> None:
        """Store one snapshot; a malformed one is dropped and logged at debug level."""
        try:
            if not self.store.ingest(msg, received):
                logger.debug("daskinfer dashboard: dropped a malformed snapshot")
        except Exception:  # the scheduler must not suffer from a bad snapshot
            logger.debug("daskinfer dashboard: snapshot failed", exc_info=True)


# ------------------------------------------------------------------------------ install


def install(dask_scheduler: Any) -> None:
    """Add the daskinfer page, its JSON and Prometheus metrics to this scheduler.

    Idempotent: call it with ``client.run_on_scheduler(install)`` at the start of every
    run, from any number of clients.

    Parameters
    ----------
    dask_scheduler : distributed.Scheduler
        Passed by ``Client.run_on_scheduler``.
    """
    plugin = dask_scheduler.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, ProgressPlugin):
        plugin = ProgressPlugin()
        # snapshots published before the first install are still in Dask's event log
        for received, msg in dask_scheduler.get_events(TOPIC):
            plugin.ingest(msg, received)
        dask_scheduler.add_plugin(plugin, name=PLUGIN_NAME)
    if not plugin.routes_added:
        app = getattr(dask_scheduler, "http_application", None)
        if app is not None:
            prefix = _http_prefix(app)
            kwargs = {"dask_server": dask_scheduler}
            app.add_handlers(
                r".*$",
                [
                    (prefix + PAGE_PATH, PageHandler, kwargs),
                    (prefix + API_PATH, RunsJsonHandler, kwargs),
                ],
            )
            _repair_sitemap(app)
            _add_to_navbar(dask_scheduler)
        plugin.routes_added = True
    try:
        from daskinfer._internal import prometheus

        prometheus.register(dask_scheduler)
    except ImportError:  # prometheus_client is optional in distributed
        logger.debug("daskinfer dashboard: no prometheus_client", exc_info=True)


def _http_prefix(app: web.Application) -> str:
    """The scheduler's ``http_prefix`` ("/" or "/prefix/"), read off its /health route."""
    import tornado.routing

    for rule in getattr(app.wildcard_router, "rules", []):
        matcher = rule.matcher
        if isinstance(matcher, tornado.routing.PathMatches):
            pattern = matcher.regex.pattern.rstrip("$")
            if pattern.endswith("/health"):
                return pattern[: -len("health")]
    return "/"


def _add_to_navbar(scheduler: Any) -> None:
    """Link the page from the Dask dashboard's top bar, next to Status, Workers, ..."""
    try:
        from distributed.dashboard.scheduler import template_variables
    except ImportError:  # no Bokeh: no Dask dashboard pages to link from
        return
    try:
        # memoized per scheduler: the very dict (and list) its Bokeh pages render with
        pages = template_variables(scheduler)["pages"]
        if PAGE_PATH not in pages:
            pages.append(PAGE_PATH)
    except Exception:  # a cosmetic link; never fail install over it
        logger.debug("daskinfer dashboard: no link in the navigation bar", exc_info=True)


def _repair_sitemap(app: web.Application) -> None:
    """Serve ``/sitemap.json`` with :class:`SitemapHandler` instead of Dask's handler.

    Dask's ``DirectoryHandler`` (distributed 2026.8) recognises the Bokeh application by
    ``"bokeh" in str(app)``, which no longer matches ``DaskBokehTornado``; it then walks
    Bokeh's routes and fails with ``KeyError: 'path'`` on Bokeh's ``StaticHandler``, so
    the sitemap answers 500 whenever the Bokeh dashboard runs.
    """
    import tornado.routing

    from distributed.http.routing import DirectoryHandler

    for host_rule in getattr(app.default_router, "rules", []):
        for rule in getattr(host_rule.target, "rules", []):
            matcher = rule.matcher
            if (
                isinstance(matcher, tornado.routing.PathMatches)
                and matcher.regex.pattern == "/sitemap.json$"
                and rule.target is DirectoryHandler
            ):
                rule.target = SitemapHandler


def _descend(router: Any, seen: set[int], out: set[str]) -> None:
    import tornado.routing

    if id(router) in seen:
        return
    seen.add(id(router))
    for rule in list(getattr(router, "named_rules", {}).values()) + list(router.rules):
        target = rule.target
        if isinstance(rule.matcher, tornado.routing.PathMatches):
            pattern = rule.matcher.regex.pattern.rstrip("$")
            path = rule.target_kwargs.get("path")
            if isinstance(target, type) and issubclass(target, web.StaticFileHandler) and path:
                prefix = pattern.removesuffix("(.*)").rstrip("/")
                out.update(_static_files(str(path), prefix))
            else:
                out.add(pattern)
        if isinstance(target, tornado.routing.RuleRouter):
            _descend(target, seen, out)


def _static_files(path: str, prefix: str) -> set[str]:
    import os

    out = set()
    for directory, _, files in os.walk(path):
        for name in files:
            full = os.path.join(directory, name)
            out.add(prefix + "/" + os.path.relpath(full, path).replace(os.sep, "/"))
    return out


class SitemapHandler(web.RequestHandler):
    """``/sitemap.json``: every route of the scheduler's HTTP server, as Dask lists them."""

    def get(self) -> None:
        out: set[str] = set()
        seen: set[int] = set()
        application: Any = self.application
        for app in [*getattr(application, "applications", []), application]:
            app_paths = getattr(app, "app_paths", None)
            if app_paths is not None:  # the Bokeh dashboard's pages
                out.update(app_paths)
            else:
                _descend(app.default_router, seen, out)
                _descend(app.wildcard_router, seen, out)
        self.write({"paths": sorted(out)})


def _store(server: Any) -> RunStore:
    plugin = server.plugins.get(PLUGIN_NAME) if server is not None else None
    return plugin.store if isinstance(plugin, ProgressPlugin) else RunStore()


class RunsJsonHandler(RequestHandler):
    """``/daskinfer/api/runs.json``: the latest snapshot of each run, newest first."""

    def get(self) -> None:
        now = time.time()
        body = {"time": now, "runs": [r.as_json(now) for r in _store(self.server).runs()]}
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(body, allow_nan=False))


class PageHandler(RequestHandler):
    """``/daskinfer``: running and recent pipelines, server-rendered, refreshing itself."""

    def get(self) -> None:
        refresh = _int(self.get_query_argument("refresh", "2"), 2)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(render_page(_store(self.server).runs(), time.time(), refresh_s=refresh))


# --------------------------------------------------------------------------------- HTML

_CSS = """
body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;
background:#fafafa}
header{background:#fff;border-bottom:1px solid #ddd;padding:10px 20px;display:flex;gap:18px;
align-items:baseline}
header h1{font-size:18px;margin:0}
header a{color:#3465a4;text-decoration:none}
main{padding:10px 20px}
section.run{background:#fff;border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:10px 14px}
section.run h2{font-size:15px;margin:0 0 4px 0;font-family:ui-monospace,monospace;
word-break:break-all}
.meta{color:#555;margin-bottom:8px}
.meta span{margin-right:16px}
.state{font-weight:600;padding:1px 8px;border-radius:10px;color:#fff}
.state-running{background:#3465a4}.state-finished{background:#4e9a06}
.state-failed{background:#cc0000}.state-stale{background:#c4a000}
pre.error{background:#fff0f0;border:1px solid #e0b0b0;padding:6px;white-space:pre-wrap;
margin:6px 0}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 6px;border-bottom:1px solid #eee;vertical-align:middle}
th{font-weight:600;color:#444;background:#f4f4f4}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{width:90px;height:10px;background:#e6e6e6;border-radius:5px;overflow:hidden;
display:block;margin:2px 0}
.bar>div{height:100%;background:#4e9a06}
.nonzero{color:#cc0000;font-weight:600}
.workers{color:#666;font-size:12px;font-family:ui-monospace,monospace}
svg.spark{vertical-align:middle;margin-left:6px}
.empty{color:#666;padding:30px 0}
.scroll{overflow-x:auto}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_rate(r: float) -> str:
    return f"{r:,.0f}" if r >= 100 else f"{r:,.1f}"


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def sparkline(values: Iterable[float], width: int = 80, height: int = 20) -> str:
    """An inline SVG polyline of ``values`` (empty string when fewer than two)."""
    vals = list(values)[-60:]
    if len(vals) < 2:
        return ""
    top = max(vals) or 1.0
    step = width / (len(vals) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - 1 - (v / top) * (height - 2):.1f}" for i, v in enumerate(vals)
    )
    return (
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f"<title>rows/s between snapshots, peak {_e(_fmt_rate(top))}</title>"
        f'<polyline fill="none" stroke="#3465a4" stroke-width="1.5" points="{points}"/></svg>'
    )


def _progress(done: int, expected: int | None) -> str:
    if not expected:
        return f"{_fmt_int(done)}"
    pct = min(100.0, 100.0 * done / expected)
    return (
        f'<div class="bar" title="{pct:.1f}%"><div style="width:{pct:.1f}%"></div></div>'
        f"{_fmt_int(done)} / {_fmt_int(expected)}"
    )


def _count(n: int) -> str:
    return f'<span class="nonzero">{_fmt_int(n)}</span>' if n else "0"


def _latency(stage: Mapping[str, Any]) -> str:
    buckets = stage["latency_buckets"]
    total = buckets[-1][1] if buckets else 0
    if not total:
        return "–"
    mean = stage["latency_sum_s"] / total
    # the bucket bound below which half the calls finished
    p50 = next((le for le, n in buckets if n >= total / 2), math.inf)
    p50_text = "&gt; last bucket" if math.isinf(p50) else f"≤ {p50:g} s"
    return f'<span title="median {p50_text}">{mean:.3g} s</span>'


def _actors(stage: Mapping[str, Any]) -> str:
    if stage["kind"] != "actors" and not stage["actors_alive"]:
        return "–"
    workers = sorted(set(stage["actor_workers"]))
    listed = "<br>".join(_e(w) for w in workers)
    return f"{stage['actors_alive']} alive, {stage['actors_busy']} busy" + (
        f'<div class="workers">{listed}</div>' if workers else ""
    )


def _render_run(run: _Run, now: float) -> str:
    snap = run.latest
    state = snap["state"]
    badge_class = "stale" if run.is_stale(now) else state
    badge = _e(state) + (
        f" (no update for {now - run.received:.0f} s)" if run.is_stale(now) else ""
    )
    rows = []
    for s in snap["stages"]:
        gpu = "–" if s["gpu_busy"] is None else f"{100 * s['gpu_busy']:.0f}%"
        rows.append(
            "<tr>"
            f"<td>{_e(s['name'])}</td><td>{_e(s['kind'])}</td>"
            f"<td>{_progress(s['rows_done'], s['rows_expected'])}</td>"
            f'<td class="num">{_fmt_rate(s["rows_per_s"])}{sparkline(run.rates(s["name"]))}</td>'
            f'<td class="num">{_fmt_int(s["batches_done"])}</td>'
            f'<td class="num">{_fmt_int(s["in_flight"])}</td>'
            f'<td class="num">{_fmt_int(s["queued"])}</td>'
            f"<td>{_actors(s)}</td>"
            f'<td class="num">{_count(s["retries"])}</td>'
            f'<td class="num">{_count(s["errors"])}</td>'
            f'<td class="num">{_count(s["quarantined_rows"])}</td>'
            f'<td class="num">{_latency(s)}</td>'
            f'<td class="num">{gpu}</td>'
            "</tr>"
        )
    error = f'<pre class="error">{_e(snap["error"])}</pre>' if snap["error"] else ""
    bottleneck = snap.get("bottleneck")
    if bottleneck:
        reason = f" ({_e(bottleneck['reason'])})" if bottleneck["reason"] else ""
        error += f'<div class="meta">bottleneck: <b>{_e(bottleneck["stage"])}</b>{reason}</div>'

    head = "".join(
        f'<th class="{cls}">{name}</th>'
        for name, cls in [
            ("Stage", ""), ("Kind", ""), ("Rows done / expected", ""), ("Rows/s", "num"),
            ("Batches", "num"), ("In flight", "num"), ("Queued", "num"), ("Actor pool", ""),
            ("Retries", "num"), ("Errors", "num"), ("Quarantined", "num"),
            ("Mean latency", "num"), ("GPU busy", "num"),
        ]
    )  # fmt: skip
    return (
        f'<section class="run" id="run-{_e(snap["run"])}">'
        f"<h2>{_e(snap['pipeline'] or snap['run'])}</h2>"
        '<div class="meta">'
        f'<span class="state state-{_e(badge_class)}">{badge}</span>'
        f"<span>run <code>{_e(snap['run'])}</code></span>"
        f"<span>started {_e(_fmt_time(snap['started']))}</span>"
        f"<span>wall {snap['wall_s']:.1f} s</span>"
        f"<span>rows out {_fmt_int(snap['rows_out'])}</span>"
        "</div>"
        f"{error}"
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
        "</section>"
    )


def render_page(runs: list[_Run], now: float, *, refresh_s: int = 2) -> str:
    """The whole HTML page; ``refresh_s=0`` turns the self-refresh off."""
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s > 0 else ""
    body = (
        "".join(_render_run(r, now) for r in runs)
        if runs
        else '<p class="empty">No daskinfer pipeline has reported to this scheduler yet.</p>'
    )
    # links are relative, so they hold under a scheduler http_prefix
    return (
        "<!DOCTYPE html>"
        '<html lang="en"><head><meta charset="utf-8">'
        f"{refresh}<title>daskinfer pipelines</title><style>{_CSS}</style></head><body>"
        "<header><h1>daskinfer pipelines</h1>"
        '<a href="status">Dask dashboard</a>'
        f'<a href="{_e(API_PATH)}">JSON</a>'
        '<a href="metrics">Prometheus metrics</a>'
        f'<span class="meta">{len(runs)} run(s), newest first; updated {_e(_fmt_time(now))}</span>'
        f"</header><main>{body}</main></body></html>"
    )
