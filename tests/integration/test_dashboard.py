"""The daskinfer dashboard page, its JSON and Prometheus metrics, on real clusters.

Each test reads the scheduler's HTTP server the way a person or Prometheus would
(``urllib``), and one renders the page in a real headless Chromium.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from html import escape as html_escape

import pytest
from prometheus_client.parser import text_string_to_metric_families

from distributed import Client, LocalCluster

from daskinfer._internal import dashboard
from daskinfer._internal.dashboard import TOPIC, RunStore, install

INF = math.inf


# ------------------------------------------------------------------------------ helpers


def _get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _dashboard_url(client: Client) -> str:
    port = client.scheduler_info()["services"]["dashboard"]
    return f"http://127.0.0.1:{port}/"


def _stage(name: str, kind: str = "tasks", **fields):
    stage = {
        "name": name,
        "kind": kind,
        "rows_done": 0,
        "rows_expected": None,
        "rows_per_s": 0.0,
        "batches_done": 0,
        "in_flight": 0,
        "queued": 0,
        "actors_alive": 0,
        "actors_busy": 0,
        "actor_workers": [],
        "retries": 0,
        "errors": 0,
        "quarantined_rows": 0,
        "task_seconds": 0.0,
        "latency_buckets": [[0.1, 0], [1.0, 0], [INF, 0]],
        "latency_sum_s": 0.0,
        "gpu_busy": None,
    }
    stage.update(fields)
    return stage


def _snapshot(run: str, t: float, stages, *, state="running", error=None, started=None, **extra):
    snap = {
        "run": run,
        "pipeline": "ReadParquet->MapBatches(tokenize)->MapBatches(Embedder)->Write",
        "state": state,
        "error": error,
        "started": t if started is None else started,
        "time": t,
        "wall_s": t - (t if started is None else started),
        "rows_out": 0,
        "stages": stages,
    }
    snap.update(extra)
    return snap


def _runs(base: str) -> dict[str, dict]:
    status, body = _get(base + "daskinfer/api/runs.json")
    assert status == 200, body
    return {r["run"]: r for r in json.loads(body)["runs"]}


def _wait_for(base: str, run: str, t: float, timeout: float = 10) -> dict:
    """The run's latest snapshot, once the scheduler has the one taken at ``t``."""
    deadline = time.monotonic() + timeout
    while True:
        got = _runs(base).get(run)
        if got is not None and got["time"] >= t:
            return got
        assert time.monotonic() < deadline, f"run {run} never reached time {t}: {got}"
        time.sleep(0.05)


def _metrics(base: str) -> dict[tuple[str, frozenset], float]:
    """``{(sample name, labels): value}`` from the scheduler's /metrics."""
    status, body = _get(base + "metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _browser(args: list[str], tmp_path, timeout: float = 120) -> str:
    """Run headless Chromium; its stdout."""
    binary = _chromium()
    assert binary is not None
    profile = tmp_path / f"profile-{uuid.uuid4().hex[:8]}"
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


needs_chromium = pytest.mark.skipif(
    _chromium() is None,
    reason="no chromium binary on PATH (install Debian's: apt-get install -y chromium)",
)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dash():
    """A cluster with the dashboard on, a snapshot published *before* install, installed twice."""
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=40,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        early = f"early-{uuid.uuid4().hex[:8]}"
        client.log_event(TOPIC, _snapshot(early, time.time(), [_stage("Early(stage)")]))
        deadline = time.monotonic() + 10
        while not client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.get_events(TOPIC)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.run_on_scheduler(install)
        client.run_on_scheduler(install)
        yield client, _dashboard_url(client), early


# -------------------------------------------------------------------------------- tests


def test_install_is_idempotent(dash):
    client, _, _ = dash
    client.run_on_scheduler(install)

    def count(dask_scheduler):
        import tornado.routing
        from prometheus_client import REGISTRY

        from daskinfer._internal.prometheus import RunCollector

        routes = 0
        for host_rule in dask_scheduler.http_application.default_router.rules:
            for rule in getattr(host_rule.target, "rules", []):
                if isinstance(rule.matcher, tornado.routing.PathMatches):
                    routes += "daskinfer" in rule.matcher.regex.pattern
        plugins = [p for p in dask_scheduler.plugins if "daskinfer" in p]
        collectors = [c for c in REGISTRY._collector_to_names if isinstance(c, RunCollector)]
        return routes, plugins, len(collectors)

    assert client.run_on_scheduler(count) == (2, [dashboard.PLUGIN_NAME], 1)


def test_dask_dashboard_links_to_the_page(dash):
    _, base, _ = dash
    for page in ("status", "workers"):
        status, body = _get(base + page)
        assert status == 200
        assert body.count('<a href="daskinfer">') == 1, page


def test_snapshots_published_before_install_are_kept(dash):
    _, base, early = dash
    assert _runs(base)[early]["stages"][0]["name"] == "Early(stage)"


def test_page_json_sitemap_and_metrics(dash):
    client, base, _ = dash
    run = f"run-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    for i in range(1, 4):
        client.log_event(
            TOPIC,
            _snapshot(
                run,
                t0 + i,
                started=t0,
                rows_out=300 * i,
                bottleneck={"stage": "MapBatches(Embedder)", "reason": "busy 98% of the time"},
                stages=[
                    _stage(
                        "MapBatches(tokenize)",
                        rows_done=500 * i,
                        rows_expected=2000,
                        rows_per_s=500.0,
                        batches_done=5 * i,
                        in_flight=3,
                        queued=4,
                        retries=1,
                        task_seconds=1.5 * i,
                        latency_buckets=[[0.1, 2 * i], [1.0, 5 * i], [INF, 5 * i]],
                        latency_sum_s=1.25 * i,
                    ),
                    _stage(
                        "MapBatches(Embedder)",
                        kind="actors",
                        rows_done=300 * i,
                        rows_expected=2000,
                        rows_per_s=300.0,
                        batches_done=3 * i,
                        in_flight=2,
                        actors_alive=2,
                        actors_busy=1,
                        actor_workers=["tcp://127.0.0.1:40001", "tcp://127.0.0.1:40002"],
                        errors=2,
                        quarantined_rows=7,
                        gpu_busy=0.75,
                    ),
                ],
            ),
        )
    latest = _wait_for(base, run, t0 + 3)

    # JSON: the latest snapshot, with rows/s between snapshots for the sparkline
    tok, emb = latest["stages"]
    assert latest["state"] == "running" and latest["rows_out"] == 900
    assert (tok["rows_done"], tok["rows_expected"], tok["in_flight"], tok["queued"]) == (
        1500,
        2000,
        3,
        4,
    )
    assert tok["rows_per_s_history"] == [500.0, 500.0]
    assert (emb["actors_alive"], emb["actors_busy"], emb["gpu_busy"]) == (2, 1, 0.75)
    assert emb["actor_workers"] == ["tcp://127.0.0.1:40001", "tcp://127.0.0.1:40002"]

    # the HTML page
    status, page = _get(base + "daskinfer")
    assert status == 200
    section = page[page.index(f'id="run-{run}"') :]
    section = section[: section.index("</section>")]
    for text in [
        "ReadParquet-&gt;MapBatches(tokenize)-&gt;MapBatches(Embedder)-&gt;Write",
        "MapBatches(tokenize)",
        "MapBatches(Embedder)",
        "1,500 / 2,000",
        "900 / 2,000",
        "2 alive, 1 busy",
        "tcp://127.0.0.1:40002",
        "75%",
        "<svg",
        "running",
        "bottleneck: <b>MapBatches(Embedder)</b> (busy 98% of the time)",
    ]:
        assert text in section, text
    assert 'href="status"' in page  # back to Dask's dashboard
    assert '<meta http-equiv="refresh"' in page

    # the sitemap
    status, body = _get(base + "sitemap.json")
    assert status == 200, body
    paths = json.loads(body)["paths"]
    assert "/daskinfer" in paths and "/daskinfer/api/runs.json" in paths and "/status" in paths

    # Prometheus
    m = _metrics(base)
    tok_labels = frozenset({"run": run, "stage": "MapBatches(tokenize)"}.items())
    emb_labels = frozenset({"run": run, "stage": "MapBatches(Embedder)"}.items())
    assert m["daskinfer_rows_processed_total", tok_labels] == 1500
    assert m["daskinfer_rows_processed_total", emb_labels] == 900
    assert m["daskinfer_batches_processed_total", tok_labels] == 15
    assert m["daskinfer_batches_in_flight", tok_labels] == 3
    assert m["daskinfer_batches_queued", tok_labels] == 4
    assert m["daskinfer_actors_alive", emb_labels] == 2
    assert m["daskinfer_retries_total", tok_labels] == 1
    assert m["daskinfer_errors_total", emb_labels] == 2
    assert m["daskinfer_quarantined_rows_total", emb_labels] == 7
    assert m["daskinfer_gpu_busy_ratio", emb_labels] == 0.75
    assert ("daskinfer_gpu_busy_ratio", tok_labels) not in m  # unknown, not zero
    assert m["daskinfer_stage_latency_seconds_bucket", tok_labels | {("le", "0.1")}] == 6
    assert m["daskinfer_stage_latency_seconds_bucket", tok_labels | {("le", "1.0")}] == 15
    assert m["daskinfer_stage_latency_seconds_bucket", tok_labels | {("le", "+Inf")}] == 15
    assert m["daskinfer_stage_latency_seconds_count", tok_labels] == 15
    assert m["daskinfer_stage_latency_seconds_sum", tok_labels] == 3.75

    # the final snapshot: the page shows the state and the (escaped) error
    client.log_event(
        TOPIC,
        _snapshot(
            run,
            t0 + 4,
            started=t0,
            state="failed",
            error="PredictorError: <b>boom</b> in batch 3",
            stages=[_stage("MapBatches(tokenize)", rows_done=2000, rows_expected=2000)],
        ),
    )
    assert _wait_for(base, run, t0 + 4)["state"] == "failed"
    page = _get(base + "daskinfer")[1]
    assert "PredictorError: &lt;b&gt;boom&lt;/b&gt; in batch 3" in page
    assert "<b>boom</b>" not in page
    info = frozenset({"run": run, "state": "failed"}.items())
    assert any(name == "daskinfer_run_info" and info <= labels for name, labels in _metrics(base))


def test_malformed_snapshots_do_not_hurt_the_scheduler(dash):
    client, base, _ = dash
    run = f"odd-{uuid.uuid4().hex[:8]}"
    t = time.time()
    for bad in [
        "not a dict",
        None,
        [1, 2, 3],
        {"no": "run id"},
        {"run": run, "time": t, "stages": [None, 5, {"name": "<script>x</script>", "rows_done": "many",
                                                     "latency_buckets": "nope", "gpu_busy": "?",
                                                     "actor_workers": 3, "future_field": {"a": 1}}],
         "state": "unheard-of", "started": "yesterday", "unknown": [1]},
    ]:  # fmt: skip
        client.log_event(TOPIC, bad)
    got = _wait_for(base, run, t)
    assert got["stages"][0]["name"] == "<script>x</script>"
    assert got["stages"][0]["rows_done"] == 0
    status, page = _get(base + "daskinfer")
    assert status == 200
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x</script>" not in page
    assert _get(base + "metrics")[0] == 200
    assert client.run_on_scheduler(lambda: 42) == 42


def test_page_under_a_scheduler_http_prefix():
    with (
        LocalCluster(
            n_workers=0,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            scheduler_kwargs={"http_prefix": "/dask"},
            silence_logs=40,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        client.run_on_scheduler(install)
        base = _dashboard_url(client) + "dask/"
        t = time.time()
        client.log_event(TOPIC, _snapshot("prefixed", t, [_stage("MapBatches(f)", rows_done=7)]))
        assert _wait_for(base, "prefixed", t)["stages"][0]["rows_done"] == 7
        status, page = _get(base + "daskinfer")
        assert status == 200 and "MapBatches(f)" in page
        assert _get(base + "status")[0] == 200  # where the page's relative link leads
        assert _get(_dashboard_url(client) + "daskinfer")[0] == 404


def test_store_keeps_the_newest_runs():
    store = RunStore(max_runs=3)
    for i in range(5):
        assert store.ingest(
            {"run": f"r{i}", "started": 100 + i, "time": 100 + i, "state": "finished"}
        )
    assert [s["run"] for s in store.snapshots()] == ["r4", "r3", "r2"]
    # a running run outlives finished ones, even older ones
    store = RunStore(max_runs=2)
    store.ingest({"run": "old-running", "started": 1, "time": 1, "state": "running"}, 100.0)
    store.ingest({"run": "done", "started": 2, "time": 2, "state": "finished"}, 101.0)
    store.ingest({"run": "new", "started": 3, "time": 3, "state": "running"}, 102.0)
    assert [s["run"] for s in store.snapshots()] == ["new", "old-running"]
    # ... unless it is stale: its client has sent nothing for a long while
    store.ingest({"run": "newer", "started": 4, "time": 4}, received=1000.0)
    assert [s["run"] for s in store.snapshots()] == ["newer", "new"]
    # a late snapshot does not undo the final one
    store.ingest({"run": "new", "started": 3, "time": 10, "state": "finished"}, 1001.0)
    store.ingest({"run": "new", "started": 3, "time": 9, "state": "running"}, 1002.0)
    assert {s["run"]: s["state"] for s in store.snapshots()}["new"] == "finished"


@needs_chromium
def test_page_renders_in_headless_chromium(dash, tmp_path):
    client, base, _ = dash
    run = f"web-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    for i in range(1, 6):
        client.log_event(
            TOPIC,
            _snapshot(
                run,
                t0 + i,
                started=t0,
                rows_out=250 * i,
                stages=[
                    _stage("ReadParquet->MapBatches(tokenize)", rows_done=400 * i,
                           rows_expected=2000, rows_per_s=400.0, batches_done=4 * i,
                           in_flight=2, queued=3),
                    _stage("MapBatches(Embedder)", kind="actors", rows_done=250 * i,
                           rows_expected=2000, rows_per_s=250.0 + 20 * i, in_flight=4,
                           actors_alive=2, actors_busy=2, gpu_busy=0.9,
                           actor_workers=["tcp://127.0.0.1:40001"]),
                ],
            ),
        )  # fmt: skip
    _wait_for(base, run, t0 + 5)

    dom = _browser(["--dump-dom", base + "daskinfer"], tmp_path)
    section = dom[dom.index(f'id="run-{run}"') :]
    section = section[: section.index("</section>")]
    for text in [
        "ReadParquet-&gt;MapBatches(tokenize)",
        "MapBatches(Embedder)",
        "2,000 / 2,000",
        "1,250 / 2,000",
        "2 alive, 2 busy",
        "90%",
        "polyline",
    ]:
        assert text in section, text

    shot = tmp_path / "dashboard.png"
    _browser([f"--screenshot={shot}", "--window-size=1280,900", base + "daskinfer"], tmp_path)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# ------------------------------------------------------------- a real pipeline, end to end


def _plus_one(batch):
    return {"id": batch["id"] + 1}


def _slow_tokenize(batch):
    time.sleep(0.004 * len(batch["id"]))  # 2,000 rows: 8 s of work
    return {"id": batch["id"]}


class _Doubler:
    """A stateful predictor: one instance per actor."""

    def __call__(self, batch):
        return {"id": batch["id"] * 2}


def _latest_run(base: str, needle: str) -> dict | None:
    """The newest run whose pipeline names ``needle`` (None before the page exists)."""
    status, body = _get(base + "daskinfer/api/runs.json")
    if status == 404:  # the run has not yet installed the page on this scheduler
        return None
    assert status == 200, body
    return next((r for r in json.loads(body)["runs"] if needle in r["pipeline"]), None)


def test_a_real_run_shows_on_the_page_and_in_metrics(client):
    import daskinfer as di

    base = _dashboard_url(client)
    ds = di.range(2000).map_batches(_plus_one, batch_size=100)
    ds = ds.map_batches(_Doubler, batch_size=100, compute=di.ActorPoolStrategy(size=2))
    out = ds.to_pandas()
    assert sorted(out["id"]) == [2 * (i + 1) for i in range(2000)]

    deadline = time.monotonic() + 10
    while (run := _latest_run(base, "_plus_one")) is None or run["state"] == "running":
        assert time.monotonic() < deadline, run
        time.sleep(0.1)
    assert run["state"] == "finished" and run["rows_out"] == 2000
    stages = {s["name"]: s for s in run["stages"]}
    pool = next(s for s in run["stages"] if s["kind"] == "actors")
    assert "_Doubler" in pool["name"] and pool["rows_done"] == 2000
    assert any("_plus_one" in name and s["rows_done"] == 2000 for name, s in stages.items())

    status, page = _get(base + "daskinfer")
    assert status == 200
    section = page[page.index(f'id="run-{run["run"]}"') :]
    section = section[: section.index("</section>")]
    assert "finished" in section and "2,000" in section
    for name in stages:
        assert html_escape(name) in section

    m = _metrics(base)
    labels = frozenset({"run": run["run"], "stage": pool["name"]}.items())
    assert m["daskinfer_rows_processed_total", labels] == 2000
    assert m["daskinfer_stage_latency_seconds_count", labels] == pool["batches_done"] > 0


@needs_chromium
def test_screenshot_while_a_slow_run_is_going(client, tmp_path):
    """Renders the page mid-run; DASKINFER_DASHBOARD_SCREENSHOT=path keeps the picture."""
    import daskinfer as di

    base = _dashboard_url(client)
    ds = di.range(2000).map_batches(_slow_tokenize, batch_size=50)
    ds = ds.map_batches(_Doubler, batch_size=100, compute=di.ActorPoolStrategy(size=2))
    results: list = []

    def consume():
        with client.as_current():
            results.append(ds.to_pandas())

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            run = _latest_run(base, "_slow_tokenize")
            slow = next((s for s in (run or {}).get("stages", []) if "_slow" in s["name"]), None)
            if (
                run is not None
                and run["state"] == "running"
                and slow is not None
                and 0.3 <= slow["rows_done"] / 2000 <= 0.85
                and len(slow["rows_per_s_history"]) >= 2
            ):
                break
            assert time.monotonic() < deadline and thread.is_alive(), run
            time.sleep(0.1)
        dom = _browser(["--dump-dom", base + "daskinfer"], tmp_path)
        shot = tmp_path / "dashboard.png"
        _browser([f"--screenshot={shot}", "--window-size=1280,900", base + "daskinfer"], tmp_path)
    finally:
        thread.join(timeout=120)
    assert len(results) == 1 and len(results[0]) == 2000

    section = dom[dom.index(f'id="run-{run["run"]}"') :]
    section = section[: section.index("</section>")]
    assert "running" in section and "polyline" in section
    for stage in run["stages"]:
        assert html_escape(stage["name"]) in section
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("DASKINFER_DASHBOARD_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
