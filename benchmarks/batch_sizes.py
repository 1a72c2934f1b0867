"""Batch-size guidance, measured: MiniLM rows/s against batch size, fixed and token-aware.

One process, the predictor called directly (``HFEmbeddingPredictor``, all-MiniLM-L6-v2,
torch on ``--threads`` threads, CPU): W3's sentences (8 to 40 words) and W5's long-tailed
texts (5 to 500 tokens), each at several batch sizes, with fixed batches in input order and
with a token budget (``max_tokens_per_batch``). Prints one JSON line per case; the figures
in docs/models.md come from it:

    python benchmarks/batch_sizes.py --rows 512
"""

from __future__ import annotations

import argparse
import json
import os
import time

import _common as c
from w5_tokens import long_tailed_texts

from daskinfer.predictors import HFEmbeddingPredictor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--sizes", default="8,32,128,512")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    model, _ = c.minilm_path()
    texts = {"sentences": c.sentences(args.rows), "long-tailed": long_tailed_texts(args.rows)}
    for kind, rows in texts.items():
        column = np.array(rows, dtype=object)
        for size in (int(s) for s in args.sizes.split(",")):
            for budget in (None, args.max_tokens):
                pred = HFEmbeddingPredictor(
                    model, max_length=512, max_tokens_per_batch=budget, num_threads=args.threads
                )
                pred({"text": column[:8]})  # warm up
                pred.daskinfer_metrics()
                started = time.perf_counter()
                for s in range(0, len(column), size):
                    pred({"text": column[s : s + size]})
                seconds = time.perf_counter() - started
                counters = pred.daskinfer_metrics()
                print(
                    json.dumps(
                        {
                            "texts": kind,
                            "batch_size": size,
                            "max_tokens_per_batch": budget,
                            "rows_per_s": round(len(column) / seconds, 1),
                            "padded_over_real": round(
                                counters["tokens_padded"] / counters["tokens_real"], 2
                            ),
                            "threads": args.threads,
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
