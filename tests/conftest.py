from __future__ import annotations

import dataclasses
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--rungpu", action="store_true", help="run tests marked gpu")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "gpu" in item.keywords and not (config.getoption("--rungpu") and _cuda_available()):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device and --rungpu"))


@pytest.fixture
def context():
    """The process-wide DataContext, every setting restored after the test."""
    import daskinfer as di

    ctx = di.DataContext.get_current()
    saved = dataclasses.replace(ctx)
    yield ctx
    for field in dataclasses.fields(ctx):
        setattr(ctx, field.name, getattr(saved, field.name))


@pytest.fixture(scope="session")
def cluster_client():
    """A real LocalCluster with two worker processes (one thread, CPU=1 each)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            resources={"CPU": 1},
            silence_logs=40,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        yield client


@pytest.fixture
def client(cluster_client):
    """The session cluster's client, set as the default for the test's duration."""
    with cluster_client.as_current():
        yield cluster_client
    import daskinfer.cluster

    # a run on a thread without this client as current starts daskinfer's embedded
    # cluster, which every later test would then run on instead of its own
    assert daskinfer.cluster._client is None, "a test left daskinfer's own cluster running"
    # no test may leave data or actors behind on the shared cluster
    leftover = cluster_client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
    if leftover == 0 or _wait_empty(cluster_client):
        return
    # a failed test's traceback keeps its futures alive: clear the cluster, so that the
    # tests after this one start clean and report their own outcome, not this one's
    cluster_client.restart()
    pytest.fail(f"a test left {leftover} tasks on the cluster")


def _wait_empty(client) -> bool:
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0:
            return True
        time.sleep(0.05)
    return False
