from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_cluster_in_unit_tests(monkeypatch):
    """Unit tests must not start a cluster (Ray's guard)."""
    import distributed

    def refuse(*args, **kwargs):
        raise AssertionError("unit tests must not start a cluster")

    monkeypatch.setattr(distributed.Client, "__init__", refuse)
    monkeypatch.setattr(distributed.LocalCluster, "__init__", refuse)
