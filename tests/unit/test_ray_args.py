"""Ray Data's own arguments, met at the call: taken at Ray's default, else refused with the fix.

A Ray Data pipeline ports by changing its import; its calls still carry Ray's arguments.
Nothing here starts a cluster: every refusal comes before any work.
"""

from __future__ import annotations

import inspect

import pandas as pd
import pytest

import daskinfer as di
from daskinfer._internal.ray_args import READER_ARGS, TRANSFORM_ARGS


@pytest.fixture
def parquet_dir(tmp_path):
    pd.DataFrame({"a": [1, 2]}).to_parquet(tmp_path / "x.parquet")
    return str(tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"filesystem": None},
        {"parallelism": -1},
        {"concurrency": None},
        {"num_cpus": None},
        {"ray_remote_args": {}},
        {"ray_remote_args": None},
        {"meta_provider": None},
        {"shuffle": None},
        {"ignore_missing_paths": False},
    ],
)
def test_a_reader_takes_ray_arguments_at_their_defaults(parquet_dir, kwargs):
    ds = di.read_parquet(parquet_dir, **kwargs)
    assert ds.columns() == ["a"]


@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        ({"filesystem": object()}, r"storage_options="),
        ({"parallelism": 8}, r"override_num_blocks="),
        ({"concurrency": 4}, r"as many at once as they have threads"),
        ({"num_cpus": 2}, r"more threads"),
        ({"ray_remote_args": {"num_cpus": 1}}, r"no Ray options"),
        ({"shuffle": "files"}, r"random\.shuffle\(paths\)"),
        ({"partitioning": "hive"}, r"Hive directories"),
        ({"ignore_missing_paths": True}, r"paths that exist"),
    ],
)
def test_a_reader_refuses_ray_arguments_naming_the_fix(parquet_dir, kwargs, fix):
    (name,) = kwargs
    with pytest.raises(di.PlanError, match=rf"read_parquet\({name}=.*Ray's argument.*{fix}"):
        di.read_parquet(parquet_dir, **kwargs)


def test_read_csv_refuses_pyarrow_options_before_pandas_sees_them(tmp_path):
    (tmp_path / "a.csv").write_text("x\n1\n")
    with pytest.raises(di.PlanError, match=r"read_csv\(parse_options=.*sep="):
        di.read_csv(str(tmp_path / "a.csv"), parse_options=object())
    # pandas' own keywords still reach pandas
    assert di.read_csv(str(tmp_path / "a.csv"), sep=",").columns() == ["x"]


def test_every_file_reader_meets_ray_reader_arguments(tmp_path):
    for reader in (
        "read_parquet",
        "read_csv",
        "read_json",
        "read_text",
        "read_images",
        "read_binary_files",
        "read_numpy",
    ):
        with pytest.raises(di.PlanError, match=rf"{reader}\(concurrency=3\)"):
            getattr(di, reader)(str(tmp_path), concurrency=3)


def test_transforms_take_ray_defaults_and_refuse_the_rest():
    ds = di.from_items([{"x": 1}])
    # Ray's defaults, and its optimizer hint (either answer is right here)
    ds.map_batches(lambda b: b, memory=None, ray_remote_args_fn=None)
    ds.map_batches(lambda b: b, udf_modifying_row_count=True)
    ds.map(lambda r: r, memory=None)
    with pytest.raises(di.PlanError, match=r"map_batches\(memory=.*--memory-limit"):
        ds.map_batches(lambda b: b, memory=2**30)
    # Ray's remote options: not taken, with what to use instead
    with pytest.raises(di.PlanError, match=r"map_batches\(scheduling_strategy=\).*num_cpus="):
        ds.map_batches(lambda b: b, scheduling_strategy="SPREAD")
    with pytest.raises(di.PlanError, match=r"flat_map\(max_retries=\).*max_retries"):
        ds.flat_map(lambda r: [r], max_retries=3)
    # a typo names the argument meant
    with pytest.raises(di.PlanError, match=r"filter\(concurency=\).*Did you mean concurrency="):
        ds.filter(lambda r: True, concurency=2)
    with pytest.raises(di.PlanError, match=r"Did you mean batch_size="):
        ds.map_batches(lambda b: b, bach_size=2)


def test_signatures_stay_the_functions_own():
    """The wrapper keeps help() and editors showing daskinfer's own arguments."""
    params = inspect.signature(di.Dataset.map_batches).parameters
    assert "batch_size" in params and "memory" not in params
    assert "include_paths" in inspect.signature(di.read_parquet).parameters
    assert set(TRANSFORM_ARGS).isdisjoint(params)
    assert set(READER_ARGS).isdisjoint(inspect.signature(di.read_images).parameters)


def test_writers_meet_ray_writer_arguments(tmp_path):
    ds = di.from_items([{"x": 1}])
    for writer in ("write_parquet", "write_csv", "write_json"):
        with pytest.raises(di.PlanError, match=rf"{writer}\(filesystem=.*storage_options="):
            getattr(ds, writer)(str(tmp_path / writer), filesystem=object())
        with pytest.raises(di.PlanError, match=rf"{writer}\(concurrency=2\).*threads"):
            getattr(ds, writer)(str(tmp_path / writer), concurrency=2)
    # pyarrow's own options still reach write_parquet; Ray's are met before them
    with pytest.raises(di.PlanError, match=r"write_parquet\(filename_provider=.*row order"):
        ds.write_parquet(str(tmp_path / "p"), filename_provider=object(), compression="zstd")
    with pytest.raises(di.PlanError, match=r"write_numpy\(min_bytes_per_file=.*rows_per_file"):
        ds.write_numpy(str(tmp_path / "n"), column="x", min_bytes_per_file=10)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_other_calls_meet_ray_arguments():
    ds = di.from_items([{"x": 1}])
    with pytest.raises(di.PlanError, match=r"with_column\(label_selector=\)"):
        ds.with_column("y", di.expressions.col("x") + 1, label_selector={"a": "b"})
    with pytest.raises(di.PlanError, match=r"with_columns\(memory=.*--memory-limit"):
        ds.with_columns({"y": di.expressions.col("x")}, memory=10)
    with pytest.raises(di.PlanError, match=r"read_sql\(parallelism=8\).*override_num_blocks"):
        di.read_sql("SELECT 1", lambda: None, parallelism=8)
    with pytest.raises(di.PlanError, match=r"from_huggingface\(concurrency=2\)"):
        di.from_huggingface(object(), concurrency=2)


def test_init_meets_ray_init_arguments():
    """Refused before any cluster starts or any client is replaced."""
    with pytest.raises(di.PlanError, match=r"di\.init\(num_cpus=4\).*n_workers="):
        di.init(num_cpus=4)
    with pytest.raises(di.PlanError, match=r"di\.init\(runtime_env=.*PipInstall"):
        di.init(runtime_env={"pip": ["torch"]})
    with pytest.raises(di.PlanError, match=r"address='auto'.*tcp://host:8786"):
        di.init(address="auto")
    with pytest.raises(di.PlanError, match=r"object_store_memory=.*memory_limit="):
        di.init(object_store_memory=10**9)
