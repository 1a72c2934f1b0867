"""Ray Data's ``split_at_indices``, ``split``, ``split_proportionately``,
``train_test_split`` and ``zip`` on a real cluster: cuts at any row, across blocks of a
pipeline whose blocks do not line up with the cuts."""

from __future__ import annotations

import numpy as np
import pytest

import daskinfer as di


def _ds(n: int = 1000) -> di.Dataset:
    # blocks of a batched stage: their boundaries fall anywhere
    return di.range(n, override_num_blocks=7).map_batches(
        lambda b: {"id": b["id"], "x": b["id"] * 2.0}, batch_size=96
    )


def _ids(ds: di.Dataset) -> list[int]:
    return [int(i) for i in ds.to_pandas()["id"]]


def test_split_at_indices_cuts_at_the_rows_asked(client):
    first, middle, last, past = _ds().split_at_indices([100, 650, 1000])
    assert _ids(first) == list(range(100))
    assert _ids(middle) == list(range(100, 650))
    assert _ids(last) == list(range(650, 1000))
    assert past.count() == 0 and past.to_pandas().empty
    assert middle.take(1) == [{"id": 100, "x": 200.0}]
    # materialized: a split's blocks are known without running anything
    assert middle.num_blocks() >= 1
    clipped = _ds(50).split_at_indices([10, 500])
    assert [p.count() for p in clipped] == [10, 40, 0]


def test_split_and_split_proportionately(client):
    assert [p.count() for p in _ds().split(3)] == [334, 333, 333]
    parts = _ds(1001).split(4, equal=True)  # as Ray: the remainder is dropped
    assert [p.count() for p in parts] == [250, 250, 250, 250]
    assert [i for p in parts for i in _ids(p)] == list(range(1000))
    shares = _ds().split_proportionately([0.2, 0.5])
    assert [p.count() for p in shares] == [200, 500, 300]
    assert _ids(shares[2]) == list(range(700, 1000))


def test_train_test_split(client):
    train, test = _ds().train_test_split(0.25)
    assert _ids(train) == list(range(750)) and _ids(test) == list(range(750, 1000))
    train, test = _ds().train_test_split(10, shuffle=True, seed=3)
    again = _ds().train_test_split(10, shuffle=True, seed=3)[1]
    assert test.count() == 10 and train.count() == 990
    assert _ids(test) == _ids(again)  # the seed fixes the shuffle
    assert sorted(_ids(train) + _ids(test)) == list(range(1000))
    assert _ids(test) != list(range(990, 1000))


def test_zip_lines_up_rows_across_differently_cut_blocks(client):
    other = di.range(1000, override_num_blocks=3).map_batches(
        lambda b: {"id": b["id"] * 10, "emb": np.stack([b["id"], b["id"] + 1], axis=1)}
    )
    third = di.from_items([{"id": -i} for i in range(1000)])
    got = _ds().zip(other, third).to_pandas()
    assert got.columns.tolist() == ["id", "x", "id_1", "emb", "id_2"]  # Ray's suffixes
    assert (got["id_1"] == got["id"] * 10).all() and (got["id_2"] == -got["id"]).all()
    batch = _ds().zip(other).take_batch(5)
    assert batch["emb"].shape == (5, 2)
    np.testing.assert_array_equal(batch["emb"][:, 1], np.arange(5) + 1)


def test_bad_split_and_zip_arguments(client):
    with pytest.raises(di.PlanError, match=r"zip: the datasets have \[1000, 10\] rows"):
        _ds().zip(di.range(10))
    ds = di.range(10)
    with pytest.raises(di.PlanError, match=r"split_at_indices\(indices=\[5, 2\]\).*increasing"):
        ds.split_at_indices([5, 2])
    with pytest.raises(di.PlanError, match=r"split\(n=0\)"):
        ds.split(0)
    with pytest.raises(di.PlanError, match=r"split_proportionately.*less than 1"):
        ds.split_proportionately([0.5, 0.5])
    with pytest.raises(di.PlanError, match=r"test_size=1\.5"):
        ds.train_test_split(1.5)
    with pytest.raises(di.PlanError, match=r"stratify"):
        ds.train_test_split(0.1, stratify="label")
    with pytest.raises(di.PlanError, match=r"has 10 rows"):
        ds.train_test_split(20)
