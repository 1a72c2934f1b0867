"""W5: token-aware batching vs fixed batches in input order, MiniLM embeddings, long-tailed lengths.

20,000 synthetic texts whose token lengths follow a long tail from 5 to 500 tokens (a
log-normal of median about 30 tokens, clipped; fixed seed): most texts are short and a
few are very long, so a batch padded to its longest row is mostly padding. Both runs use
``daskinfer.predictors.HFEmbeddingPredictor`` (all-MiniLM-L6-v2, mean pooling,
``max_length`` 512) with the same ``batch_size``:

- fixed: ``max_tokens_per_batch=None``: one forward pass per batch, in input order,
  padded to the batch's longest row;
- token-aware: ``max_tokens_per_batch=--max-tokens``: within each batch the rows are
  sorted by length and cut into sub-batches of at most that many tokens, then put back
  in input order.

Figure: ``speedup`` = fixed wall time / token-aware wall time (each includes starting its
pool and loading the model once per actor). Correctness: every id once and in input
order in both runs, and the two runs' embeddings equal to ``1e-4`` (max abs difference).
``pad_ratio_*`` (padded / real tokens) are computed on the client from the token
lengths with the predictor's own planner.

``--engine loop``: the same two modes in this process, the predictor called directly on
consecutive batches, torch on all cores. (Ray Data has no token-aware batching; its
``ray`` engine is not offered.)
"""

from __future__ import annotations

import os

import _common as c

from daskinfer.predictors import HFEmbeddingPredictor


class W5Embedder(HFEmbeddingPredictor):
    """HFEmbeddingPredictor that can also build MiniLM with seeded random weights (the
    accelerator machine carries the config and tokenizer only, see _common.minilm_path)."""

    def __init__(self, weights: str, **kwargs):
        self.weights = weights
        super().__init__(**kwargs)

    def _load_model(self, model):
        if self.weights == "pretrained":
            return super()._load_model(model)
        import torch
        from transformers import AutoConfig, AutoModel

        torch.manual_seed(0)
        return AutoModel.from_config(AutoConfig.from_pretrained(model))


def long_tailed_texts(n: int, seed: int = 0, lo: int = 5, hi: int = 500) -> list[str]:
    """``n`` texts of ``lo`` to ``hi`` tokens (words of one token each, plus [CLS]/[SEP])."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = np.clip(rng.lognormal(mean=np.log(30), sigma=1.0, size=n), lo, hi).astype(int)
    picks = rng.integers(0, len(c.WORDS), size=int(tokens.sum()))
    out, pos = [], 0
    for t in tokens - 2:  # [CLS] and [SEP]
        out.append(" ".join(c.WORDS[i] for i in picks[pos : pos + t]))
        pos += t
    return out


def pad_ratios(lengths, batch_size: int, max_tokens: int) -> tuple[float, float]:
    """padded / real tokens of fixed batches in input order, and of token-aware ones."""
    from daskinfer.predictors import TokenCounters, plan_sub_batches

    fixed, aware = TokenCounters(), TokenCounters()
    for s in range(0, len(lengths), batch_size):
        window = lengths[s : s + batch_size]
        fixed.add(window, plan_sub_batches(window, None))
        aware.add(window, plan_sub_batches(window, max_tokens))
    f, a = fixed.take(), aware.take()
    return f["tokens_padded"] / f["tokens_real"], a["tokens_padded"] / a["tokens_real"]


def _collect(batches, n):
    import numpy as np

    ids, embs = [], []
    for b in batches:
        ids.append(np.asarray(b["id"], dtype=np.int64))
        e = b["embedding"]
        embs.append(np.stack(list(e)) if e.dtype == object else np.asarray(e))
    return np.concatenate(ids), np.concatenate(embs).astype("float32")


def run(args) -> dict:
    import numpy as np
    import pandas as pd

    n, bs = args.rows, args.batch_size
    path, weights = c.minilm_path()
    texts = long_tailed_texts(n)
    frame = pd.DataFrame({"id": np.arange(n, dtype=np.int64), "text": texts})
    from transformers import AutoTokenizer

    lengths = np.array(
        [
            len(x)
            for x in AutoTokenizer.from_pretrained(path)(texts, truncation=True, max_length=512)[
                "input_ids"
            ]
        ]
    )
    pad_fixed, pad_aware = pad_ratios(lengths, bs, args.max_tokens)
    rec: dict = {
        "rows": n,
        "batch_size": bs,
        "max_tokens_per_batch": args.max_tokens,
        "weights": weights,
        "tokens_min": int(lengths.min()),
        "tokens_median": float(np.median(lengths)),
        "tokens_max": int(lengths.max()),
        "pad_ratio_fixed": pad_fixed,
        "pad_ratio_aware": pad_aware,
    }
    base = {"weights": weights, "model": path, "max_length": 512}
    results = {}
    if args.engine == "daskinfer":
        import daskinfer as di

        with c.dask_cluster(cpu_workers=args.workers, threads_per_worker=1):
            ds = di.from_pandas(frame, npartitions=args.blocks)
            for mode, budget in (("fixed", None), ("aware", args.max_tokens)):
                out = ds.map_batches(
                    W5Embedder,
                    compute=di.ActorPoolStrategy(size=args.pool),
                    batch_size=bs,
                    fn_constructor_kwargs={**base, "max_tokens_per_batch": budget},
                )
                with c.Timer() as t:
                    got = _collect(out.iter_batches(batch_size=bs), n)
                results[mode] = (t.s, *got)
        rec.update(version=c.daskinfer_version(), pool=args.pool)
    else:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        for mode, budget in (("fixed", None), ("aware", args.max_tokens)):
            with c.Timer() as t:
                predictor = W5Embedder(**base, max_tokens_per_batch=budget)
                batches = (
                    predictor(
                        {
                            "id": frame["id"].to_numpy()[s : s + bs],
                            "text": frame["text"].to_numpy()[s : s + bs],
                        }
                    )
                    for s in range(0, n, bs)
                )
                got = _collect(batches, n)
            results[mode] = (t.s, *got)
        rec["torch_threads"] = os.cpu_count() or 1
    (fixed_s, fixed_ids, fixed_emb), (aware_s, aware_ids, aware_emb) = (
        results["fixed"],
        results["aware"],
    )
    in_order = np.arange(n)
    ok = bool((fixed_ids == in_order).all() and (aware_ids == in_order).all())
    max_diff = float(np.abs(fixed_emb - aware_emb).max()) if ok else None
    ok = ok and max_diff is not None and max_diff < 1e-4 and bool(np.isfinite(aware_emb).all())
    rec.update(
        speedup=fixed_s / aware_s,
        fixed_s=fixed_s,
        aware_s=aware_s,
        fixed_rows_per_s=n / fixed_s,
        aware_rows_per_s=n / aware_s,
        max_abs_diff=max_diff,
        correct=bool(ok),
    )
    return rec


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], engines=("daskinfer", "loop"))
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument(
        "--batch-size", type=int, default=256, help="rows per predictor call (both modes)"
    )
    p.add_argument(
        "--max-tokens", type=int, default=8192, help="token-aware budget per forward pass"
    )
    p.add_argument("--blocks", type=int, default=20, help="source blocks (pandas partitions)")
    p.add_argument(
        "--workers", type=int, default=2, help="daskinfer: CPU worker processes (1 thread each)"
    )
    p.add_argument("--pool", type=int, default=2, help="predictor actors")
    c.run_main("W5", p.parse_args(), run, figures=("speedup",))


if __name__ == "__main__":
    main()
