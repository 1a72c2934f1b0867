"""N-D columns held as one array per block (``TensorArray``): the block format's contract."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from daskinfer._internal.batching import (
    arrow_to_pandas,
    batch_to_block,
    block_nbytes,
    block_to_arrow,
    block_to_batch,
    concat_blocks,
    rows_of,
    slice_block,
)
from daskinfer._internal.tensor import TensorArray, TensorDtype
from daskinfer._internal.transforms import MapBatchesTransform


def _embeddings(rows: int = 6, width: int = 4) -> np.ndarray:
    return np.arange(rows * width, dtype=np.float32).reshape(rows, width)


def test_a_returned_array_becomes_one_tensor_column():
    emb = _embeddings()
    block = batch_to_block({"id": np.arange(6), "emb": emb})
    assert block["emb"].dtype == TensorDtype((4,), np.float32)
    assert block["emb"].array.values.shape == (6, 4)
    # pandas copies what a function returned (it may reuse its buffers); the numpy
    # format then hands out the block's one array as it is
    batch = block_to_batch(block, "numpy")
    assert batch["emb"] is block["emb"].array.values
    # as the object columns of earlier versions: each row reads back as its array
    assert isinstance(block["emb"][2], np.ndarray)
    np.testing.assert_array_equal(block["emb"][2], emb[2])
    cells = block["emb"].to_numpy()
    assert cells.dtype == object and len(cells) == 6
    np.testing.assert_array_equal(np.stack(list(block["emb"])), emb)
    assert rows_of(block)[5]["emb"].tolist() == emb[5].tolist()
    assert block_nbytes(block) == emb.nbytes + 6 * 8


def test_slices_concatenations_and_takes_keep_one_array():
    a = batch_to_block({"emb": _embeddings()})
    b = batch_to_block({"emb": _embeddings() + 100})
    joined = concat_blocks([slice_block(a, 1, 3), slice_block(b, 4, 6)])
    assert joined["emb"].dtype == TensorDtype((4,), np.float32)
    np.testing.assert_array_equal(
        block_to_batch(joined, "numpy")["emb"],
        np.concatenate([_embeddings()[1:3], _embeddings()[4:6] + 100]),
    )
    taken = a.iloc[[5, 0]]
    np.testing.assert_array_equal(taken["emb"].array.values, _embeddings()[[5, 0]])
    # rows that are not there (a reindex) are NaN for floats, and refused for integers
    grown = a.reindex(range(8))
    assert np.isnan(grown["emb"].array.values[6:]).all()
    ints = batch_to_block({"emb": np.ones((2, 3), dtype=np.int64)})
    with pytest.raises(ValueError, match="int64"):
        ints.reindex(range(3))


def test_a_block_serializes_as_a_few_buffers_not_one_per_row():
    from distributed.protocol import deserialize, serialize

    block = batch_to_block({"id": np.arange(1024), "emb": np.random.rand(1024, 384)})
    header, frames = serialize(block)
    # the object column this replaces took one frame per row (1,028 for this block)
    assert len(frames) < 16
    back = deserialize(header, frames)
    np.testing.assert_array_equal(back["emb"].array.values, block["emb"].array.values)
    again = pickle.loads(pickle.dumps(block, protocol=5))
    assert again["emb"].dtype == block["emb"].dtype


def test_arrow_and_parquet_keep_the_types_earlier_blocks_wrote(tmp_path):
    vectors = batch_to_block({"emb": _embeddings()})
    images = batch_to_block({"img": np.arange(2 * 3 * 2 * 3, dtype=np.uint8).reshape(2, 3, 2, 3)})
    table = block_to_arrow(vectors)
    assert table.schema.field("emb").type == pa.list_(pa.float32())  # as pyarrow made them
    assert table.column("emb").to_pylist()[1] == _embeddings()[1].tolist()
    image_table = block_to_arrow(images)
    assert isinstance(image_table.schema.field("img").type, pa.FixedShapeTensorType)
    pq.write_table(image_table, tmp_path / "img.parquet")
    back = arrow_to_pandas(pq.read_table(tmp_path / "img.parquet"))
    assert back["img"].dtype == TensorDtype((3, 2, 3), np.uint8)
    np.testing.assert_array_equal(back["img"].array.values, images["img"].array.values)
    empty = arrow_to_pandas(image_table.slice(0, 0))
    assert empty["img"].dtype == TensorDtype((3, 2, 3), np.uint8) and len(empty) == 0


def test_the_dtype_has_a_name_pandas_parses_back():
    dtype = TensorDtype((3, 2), np.float16)
    assert pd.api.types.pandas_dtype(dtype.name) == dtype
    with pytest.raises(TypeError):
        TensorDtype.construct_from_string("float32")
    assert pd.Series(TensorArray(np.zeros((2, 3, 2), np.float16))).dtype == dtype


def test_a_dask_dataframe_over_such_blocks_computes():
    import dask.dataframe as dd

    block = batch_to_block({"id": np.arange(6), "emb": _embeddings()})
    ddf = dd.from_pandas(block, npartitions=2).map_partitions(lambda df: df)
    out = ddf.compute(scheduler="sync")
    np.testing.assert_array_equal(out["emb"].array.values, _embeddings())


def test_a_function_that_edits_its_numpy_batch_in_place_cannot_change_the_block():
    block = batch_to_block({"emb": _embeddings()})
    columns = MapBatchesTransform("f", lambda b: b, None, "numpy").prepare(block)
    assert columns is not None
    columns["emb"][:] = -1
    np.testing.assert_array_equal(block["emb"].array.values, _embeddings())


def test_an_actor_call_joins_tensor_columns_of_several_blocks():
    from daskinfer._internal.worker_fns import _join_flat_columns

    a = batch_to_block({"id": np.arange(6), "emb": _embeddings()})
    b = batch_to_block({"id": np.arange(6, 12), "emb": _embeddings() + 100})
    joined = _join_flat_columns([(4, 6), (0, 2)], [a, b])
    assert joined is not None
    assert joined["emb"].shape == (4, 4) and joined["emb"].dtype == np.float32
    np.testing.assert_array_equal(joined["emb"][2:], _embeddings()[0:2] + 100)
    assert joined["id"].tolist() == [4, 5, 6, 7]


def test_rows_of_python_objects_stay_one_object_per_row():
    ragged = np.empty((2, 2), dtype=object)
    ragged[:] = [["a", "b"], ["c", "d"]]
    block = batch_to_block({"pairs": ragged})
    assert block["pairs"].dtype == object
    assert list(block["pairs"][1]) == ["c", "d"]


def test_the_builtin_predictors_get_a_pandas_batch_s_tensor_column_as_one_array():
    from daskinfer.predictors._common import batch_columns

    block = batch_to_block({"id": np.arange(6), "emb": _embeddings()})
    columns = batch_columns(block)
    assert columns["emb"].shape == (6, 4) and columns["emb"].dtype == np.float32
    assert columns["id"].tolist() == list(range(6))


def test_what_users_do_with_to_pandas_output_works_on_such_a_column(tmp_path):
    df = batch_to_block({"id": np.arange(5), "emb": _embeddings(5)})
    assert df.sort_values("id", ascending=False)["emb"].iloc[0].tolist() == [16, 17, 18, 19]
    assert df["emb"].map(lambda v: float(v.sum())).tolist() == [6, 22, 38, 54, 70]
    assert np.stack(df["emb"]).shape == (5, 4)
    assert df.to_dict("records")[1]["emb"].tolist() == [4, 5, 6, 7]
    df.to_parquet(tmp_path / "out.parquet")
    assert pd.read_parquet(tmp_path / "out.parquet")["emb"][1].tolist() == [4, 5, 6, 7]
    pd.testing.assert_frame_equal(df, df.copy())
    changed = df.copy()
    changed["emb"].array.values[2, 0] = -1
    with pytest.raises(AssertionError, match="emb"):
        pd.testing.assert_frame_equal(df, changed)
    assert "[4. 5. 6. 7.]" in repr(df)


def test_the_column_type_is_public_where_users_look_for_it():
    from daskinfer.extensions import TensorArray as Public
    from daskinfer.extensions import TensorDtype as PublicDtype

    wrapped = pd.Series(Public(_embeddings()))
    assert isinstance(wrapped.dtype, PublicDtype)
    assert wrapped.array.values is not None and wrapped.array.values.shape == (6, 4)
    with pytest.raises(ValueError, match="2 or more dimensions"):
        Public(np.arange(3))
