"""Ray Data's tensor sources on a real cluster: ``range_tensor``, ``read_numpy``, ``from_torch``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import daskinfer as di


def test_range_tensor_rows_are_filled_with_their_index(client):
    ds = di.range_tensor(10, shape=(2, 3), override_num_blocks=3)
    data = ds.take_batch(10)["data"]
    assert data.shape == (10, 2, 3) and data.dtype == np.int64
    np.testing.assert_array_equal(data, np.arange(10)[:, None, None] * np.ones((1, 2, 3), int))
    assert ds.count() == 10 and ds.materialize().num_blocks() == 3
    with pytest.raises(di.PlanError, match="tuple of positive integers"):
        di.range_tensor(4, shape=(0,))


def test_read_numpy_reads_back_write_numpy(client, tmp_path):
    arr = np.random.default_rng(0).random((9, 4, 2)).astype("float32")
    di.from_numpy(arr).write_numpy(str(tmp_path / "out"), column="data", min_rows_per_file=4)
    ds = di.read_numpy(str(tmp_path / "out"), include_paths=True)
    batch = ds.take_batch(9)
    np.testing.assert_array_equal(batch["data"], arr)  # files in order, rows in order
    assert len(set(batch["path"])) == 3  # 4 + 4 + 1 rows
    assert (
        di.read_numpy(str(tmp_path / "out"), override_num_blocks=2).materialize().num_blocks() == 2
    )


def test_read_numpy_refuses_pickled_arrays(client, tmp_path):
    objects = np.empty(2, dtype=object)
    objects[:] = [{"a": 1}, None]
    np.save(tmp_path / "objects.npy", objects, allow_pickle=True)
    with pytest.raises(di.PlanError, match="need pickle"):
        di.read_numpy(str(tmp_path / "objects.npy"))


def test_from_torch_map_style_and_iterable(client):
    pairs = torch.utils.data.TensorDataset(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 0]))
    rows = di.from_torch(pairs).take_all()
    assert len(rows) == 3
    features, label = rows[1]["item"]
    np.testing.assert_array_equal(features, [2.0, 3.0])
    assert int(label) == 1

    class Counter(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(5))

    assert [r["item"] for r in di.from_torch(Counter()).take_all()] == [0, 1, 2, 3, 4]
    with pytest.raises(di.PlanError, match=r"torch\.utils\.data\.Dataset"):
        di.from_torch([1, 2, 3])
