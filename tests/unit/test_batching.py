from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from daskinfer._internal.batching import (
    BatchConversionError,
    batch_to_block,
    block_from_rows,
    block_is_flat,
    block_to_batch,
    rows_of,
)


def _block():
    emb = np.arange(12, dtype="float32").reshape(3, 4)
    return batch_to_block(
        {"id": np.arange(3), "text": np.array(["a", "bb", "ccc"], dtype=object), "emb": emb}
    )


def test_numpy_round_trip_keeps_text_and_nd_columns():
    block = _block()
    batch = block_to_batch(block, "numpy")
    assert batch["emb"].shape == (3, 4) and batch["emb"].dtype == np.float32
    assert list(batch["text"]) == ["a", "bb", "ccc"]
    assert batch["id"].tolist() == [0, 1, 2]
    again = block_to_batch(batch_to_block(batch), "numpy")
    np.testing.assert_array_equal(again["emb"], batch["emb"])


def test_pandas_and_arrow_formats():
    block = _block()
    assert block_to_batch(block, "pandas") is block
    table = block_to_batch(block, "pyarrow")
    assert isinstance(table, pa.Table) and table.num_rows == 3
    back = batch_to_block(table)
    assert back["text"].tolist() == ["a", "bb", "ccc"]
    assert list(back["emb"].iloc[1]) == [4.0, 5.0, 6.0, 7.0]


def test_string_dtype_from_pandas3_becomes_object_array():
    df = pd.DataFrame({"s": pd.array(["x", "y"], dtype="str")})
    batch = block_to_batch(df, "numpy")
    assert batch["s"].tolist() == ["x", "y"]


def test_unequal_columns_and_wrong_types_are_explained():
    with pytest.raises(BatchConversionError, match="unequal length"):
        batch_to_block({"a": np.arange(3), "b": np.arange(2)})
    with pytest.raises(BatchConversionError, match="return a dict"):
        batch_to_block([1, 2, 3])
    with pytest.raises(BatchConversionError, match="scalar"):
        batch_to_block({"a": 5})


def test_rows_round_trip():
    rows = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert rows_of(block_from_rows(rows)) == rows
    with pytest.raises(BatchConversionError, match="return a dict"):
        block_from_rows([1, 2])


def test_only_blocks_of_fixed_width_numpy_columns_count_as_flat():
    # a flat block reaches an accelerator's predictor without an assembly task: it must
    # hold nothing that costs Python work per row to unpickle or to stack
    flat = pd.DataFrame(
        {
            "i": np.arange(3),
            "f": np.ones(3, dtype="float32"),
            "b": np.zeros(3, dtype=bool),
            "t": pd.date_range("2026-01-01", periods=3),
            "u": np.arange(3, dtype="uint8"),
        }
    )
    assert block_is_flat(flat)
    assert block_is_flat(flat.iloc[1:])
    assert block_is_flat(pd.DataFrame())  # an empty block: nothing to convert
    # N-D values a stage returned as one array stay one array: a few buffers too
    assert block_is_flat(flat.assign(extra=_block()["emb"]))
    cells = np.empty(3, dtype=object)
    cells[:] = list(np.ones((3, 2)))
    for name, column in {
        "N-D values as one object per row": cells,
        "strings as objects": np.array(["a", "b", "c"], dtype=object),
        "pandas strings": pd.array(["a", "b", "c"], dtype="str"),
        "nullable integers": pd.array([1, None, 3], dtype="Int64"),
        "categories": pd.Categorical(["a", "b", "a"]),
    }.items():
        assert not block_is_flat(flat.assign(extra=column)), name


def test_a_call_joins_row_ranges_of_flat_blocks_into_private_arrays_like_the_pandas_path():
    # the actor call assembles the rows of several flat blocks itself (no assembly task):
    # one copy per column, the same arrays as pandas' concat and conversion give
    from daskinfer._internal.transforms import MapBatchesTransform
    from daskinfer._internal.worker_fns import _gather_slices, _join_flat_columns, assemble_batch

    blocks = [
        pd.DataFrame({"x": np.arange(i * 10, i * 10 + 10), "y": np.arange(10) * 0.5})
        for i in range(3)
    ]
    slices = [(4, 10), (0, 10), (0, 3)]
    transform = MapBatchesTransform(stage="s", fn=None, batch_size=8, batch_format="numpy")
    joined = assemble_batch((transform,), slices, *blocks).columns
    expected = transform.prepare(_gather_slices(slices, blocks))
    assert list(joined) == ["x", "y"]
    for name in ("x", "y"):
        np.testing.assert_array_equal(joined[name], expected[name])
        assert joined[name].dtype == expected[name].dtype
        assert not any(np.shares_memory(joined[name], b[name].to_numpy()) for b in blocks)
    assert joined["x"].tolist() == [*range(4, 10), *range(10, 20), *range(20, 23)]

    # blocks whose schemas differ, or that hold objects, take pandas' way
    drifted = [blocks[0], blocks[1].astype({"y": "float32"})]
    assert _join_flat_columns([(0, 10), (0, 10)], drifted) is None
    texts = [b.assign(t="a") for b in blocks[:2]]
    assert _join_flat_columns([(0, 10), (0, 10)], texts) is None
    mixed = assemble_batch((transform,), [(0, 10), (0, 10)], *drifted).columns
    assert mixed["y"].dtype == np.float64 and len(mixed["x"]) == 20
