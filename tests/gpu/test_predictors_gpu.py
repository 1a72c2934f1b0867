"""daskinfer.predictors on CUDA: the CPU suite's checks, on a device.

Run with ``pytest -m gpu --rungpu tests/gpu`` on the accelerator machine; skipped
elsewhere. The predictors run in the test process (``device="cuda"``) and in a pool on a
one-worker cluster that offers ``GPU=1`` (so ``num_gpus=1`` places them and the
predictor picks CUDA by itself).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.gpu._models import minilm_dir as minilm_path
from tests.integration.test_predictors import (
    RecordingEmbedder,
    linear_model,
    long_tailed_texts,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_client():
    """One worker process offering the GPU resource, as ``dask cuda worker`` would."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            resources={"GPU": 1},
            silence_logs=40,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
        client.as_current(),
    ):
        yield client


def _texts_ds(texts):
    import daskinfer as di

    df = pd.DataFrame({"id": np.arange(len(texts), dtype=np.int64), "text": texts})
    return di.from_pandas(df, npartitions=2)


def test_embeddings_on_cuda_match_cpu(gpu_client):
    import daskinfer as di
    from daskinfer.predictors import HFEmbeddingPredictor

    texts = long_tailed_texts(200, seed=7)
    cpu = HFEmbeddingPredictor(minilm_path(), normalize=True, max_length=128, device="cpu")
    expected = cpu({"text": np.array(texts, dtype=object)})["embedding"]
    out = (
        _texts_ds(texts)
        .map_batches(
            RecordingEmbedder,
            compute=di.ActorPoolStrategy(size=1),
            num_gpus=1,
            batch_size=64,
            fn_constructor_kwargs={
                "model": minilm_path(),
                "max_length": 128,
                "max_tokens_per_batch": 2048,
            },
        )
        .to_pandas()
    )
    assert out["id"].tolist() == list(range(len(texts)))
    assert (out["sub_rows"] * out["sub_width"] <= 2048).all()
    got = np.stack(out["embedding"].to_numpy())
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    assert float(np.abs(got - expected).max()) < 1e-3  # TF32/cuBLAS vs CPU kernels


@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16"])
def test_torch_predictor_on_cuda(dtype):
    import torch

    from daskinfer.predictors import TorchPredictor

    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    predictor = TorchPredictor(linear_model, dtype=dtype)
    assert predictor.device.type == "cuda"
    out = predictor({"data": x})["predictions"]
    assert out.dtype == np.float32
    with torch.inference_mode():
        expected = linear_model()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5 if dtype is None else 2e-2)


def test_torch_predictor_stages_batches_on_a_copy_stream():
    # prefetch_batch starts the copy on the predictor's own stream and returns at once;
    # the call waits for it on the device and gives the same result as an unstaged batch
    import torch

    from daskinfer.predictors import TorchPredictor

    predictor = TorchPredictor(linear_model)
    batches = [np.random.default_rng(i).normal(size=(256, 8)).astype(np.float32) for i in range(4)]
    staged = [predictor.prefetch_batch({"data": x}) for x in batches]
    assert all(s.tensors[0].device.type == "cuda" for s in staged)
    assert predictor._copy_stream != torch.cuda.current_stream()
    for x, s in zip(batches, staged, strict=True):
        expected = predictor({"data": x})["predictions"]
        np.testing.assert_allclose(predictor(s)["predictions"], expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(predictor(s)["data"], x)  # inputs kept, from the host


def test_torch_predictor_pool_on_the_gpu_worker_stages_ahead(gpu_client):
    import daskinfer as di
    from daskinfer.predictors import TorchPredictor

    x = np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32)
    out = (
        di.from_numpy(x)
        .map_batches(lambda b: b, batch_size=100)
        .map_batches(
            TorchPredictor,
            fn_constructor_kwargs={"model_factory": linear_model},
            concurrency=1,
            num_gpus=1,
            batch_size=128,
        )
        .take_batch(2000)
    )
    import torch

    with torch.inference_mode():
        expected = linear_model()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.stack(out["predictions"]), expected, atol=1e-5)


def test_hf_predictors_half_precision_on_cuda():
    from daskinfer.predictors import HFEmbeddingPredictor

    texts = np.array(long_tailed_texts(32, seed=8), dtype=object)
    full = HFEmbeddingPredictor(minilm_path(), normalize=True, device="cuda")({"text": texts})
    half = HFEmbeddingPredictor(minilm_path(), normalize=True, dtype="float16")({"text": texts})
    assert half["embedding"].dtype == np.float32
    assert float(np.abs(full["embedding"] - half["embedding"]).max()) < 1e-2
