"""W3: tokenize in a CPU stage, all-MiniLM-L6-v2 mean-pooled embeddings in a predictor, on CPU.

20,000 synthetic sentences (8 to 40 common English words, fixed seed), batch_size 256. The CPU
stage pads to ``--max-length`` (64) so the batch is two fixed-width int arrays; the predictor
trims each batch to its longest row before the forward pass (so does the loop).

``loop``: tokenize + forward in one process, torch on all cores (``torch.set_num_threads``).
Correctness: every id once, 384 finite values per row, and ``--check-rows`` rows recomputed
one by one on the client after timing must match to 1e-3.

Ray: the predictor pool asks ``num_cpus=0.5`` per actor by default (a pool of 2 actors at the
default 1 CPU each leaves no CPU for the tokenize tasks on a 2-core machine; see W1).
"""

from __future__ import annotations

import itertools
import os

import _common as c


def tokenize(batch, path, max_length):
    import _common
    from transformers import AutoTokenizer

    tok = _common.cached(("tok", path), lambda: AutoTokenizer.from_pretrained(path))
    enc = tok(
        [str(t) for t in batch["text"]],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="np",
    )
    return {
        "id": batch["id"],
        "input_ids": enc["input_ids"].astype("int32"),
        "attention_mask": enc["attention_mask"].astype("int8"),
    }


def embed(model, input_ids, attention_mask):
    """Mean-pooled last hidden state of the rows (numpy in, float32 numpy out)."""
    import numpy as np
    import torch

    width = max(1, int(attention_mask.sum(axis=1).max()))
    ids = torch.from_numpy(np.ascontiguousarray(input_ids[:, :width]).astype("int64"))
    mask = torch.from_numpy(np.ascontiguousarray(attention_mask[:, :width]).astype("int64"))
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return pooled.numpy().astype("float32")


class Embedder:
    def __init__(self, path, weights, threads):
        import _common
        import torch

        torch.set_num_threads(threads)
        _tok, self.model = _common.load_minilm(path, weights)

    def __call__(self, batch):
        return {
            "id": batch["id"],
            "emb": embed(self.model, batch["input_ids"], batch["attention_mask"]),
        }


def _frames(n: int, blocks: int):
    import numpy as np
    import pandas as pd

    text = c.sentences(n)
    edges = np.linspace(0, n, blocks + 1).astype(int)
    return [
        pd.DataFrame({"id": np.arange(a, b, dtype=np.int64), "text": text[a:b]})
        for a, b in itertools.pairwise(edges)
        if b > a
    ]


def _collect(batches, n):
    import numpy as np

    out = np.full((n, 384), np.nan, dtype=np.float32)
    seen = np.zeros(n, dtype=np.int64)
    rows = 0
    for b in batches:
        ids = np.asarray(b["id"], dtype=np.int64)
        emb = np.stack(list(b["emb"])) if b["emb"].dtype == object else np.asarray(b["emb"])
        out[ids] = emb
        np.add.at(seen, ids, 1)
        rows += len(ids)
    return rows, seen, out


def run(args) -> dict:
    import numpy as np

    n, bs = args.rows, args.batch_size
    path, weights = c.minilm_path()
    rec: dict = {"rows": n, "batch_size": bs, "max_length": args.max_length, "weights": weights}
    tok_kwargs = {"path": path, "max_length": args.max_length}
    ctor = {"path": path, "weights": weights, "threads": args.torch_threads}
    frames = _frames(n, args.blocks)
    if args.engine == "daskinfer":
        import daskinfer as di

        with c.dask_cluster(cpu_workers=args.workers, threads_per_worker=1):
            ds = (
                di.from_pandas(frames)
                .map_batches(tokenize, batch_size=bs, fn_kwargs=tok_kwargs)
                .map_batches(
                    Embedder,
                    concurrency=args.pool,
                    batch_size=bs,
                    num_cpus=args.actor_cpus or 1,
                    fn_constructor_kwargs=ctor,
                )
            )
            with c.Timer() as t:
                got = _collect(ds.iter_batches(batch_size=bs), n)
        rec.update(version=c.daskinfer_version(), pool=args.pool, actor_cpus=args.actor_cpus or 1)
    elif args.engine == "ray":
        with c.ray_session(args.cpus) as ray:
            cpus = args.actor_cpus or 0.5
            ds = (
                ray.data.from_pandas(frames)
                .map_batches(tokenize, batch_size=bs, fn_kwargs=tok_kwargs)
                .map_batches(
                    Embedder,
                    concurrency=args.pool,
                    batch_size=bs,
                    num_cpus=cpus,
                    fn_constructor_kwargs=ctor,
                )
            )
            with c.Timer() as t:
                got = _collect(ds.iter_batches(batch_size=bs, batch_format="numpy"), n)
        rec.update(version=c.ray_version(), pool=args.pool, actor_cpus=cpus)
    else:
        import pandas as pd
        import torch

        threads = os.cpu_count() or 1
        torch.set_num_threads(threads)
        whole = pd.concat(frames, ignore_index=True)
        with c.Timer() as t:
            _tok, model = c.load_minilm(path, weights)

            def batches():
                for start in range(0, n, bs):
                    part = whole.iloc[start : start + bs]
                    b = tokenize(
                        {"id": part["id"].to_numpy(), "text": part["text"].to_numpy()}, **tok_kwargs
                    )
                    yield {"id": b["id"], "emb": embed(model, b["input_ids"], b["attention_mask"])}

            got = _collect(batches(), n)
        rec["torch_threads"] = threads
    rows, seen, out = got
    ok = rows == n and bool((seen == 1).all()) and bool(np.isfinite(out).all())
    max_diff = None
    if ok and args.check_rows:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        tok, model = c.load_minilm(path, weights)
        if weights != "random":  # random weights differ per process: only ids and shapes checkable
            text = c.sentences(n)
            idx = np.linspace(0, n - 1, min(n, args.check_rows)).astype(int)
            diffs = []
            for i in idx:
                enc = tok(
                    [text[i]], truncation=True, max_length=args.max_length, return_tensors="np"
                )
                ref = embed(model, enc["input_ids"], enc["attention_mask"])[0]
                diffs.append(float(np.abs(ref - out[i]).max()))
            max_diff = max(diffs)
            ok = max_diff < 1e-3
    rec.update(
        rows_per_s=n / t.s,
        wall_s=t.s,
        rows_seen=rows,
        checksum=float(np.float64(out.sum())),
        check_max_abs_diff=max_diff,
        correct=bool(ok),
    )
    return rec


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--blocks", type=int, default=20, help="source blocks (pandas frames)")
    p.add_argument(
        "--workers", type=int, default=2, help="daskinfer: CPU worker processes (1 thread each)"
    )
    p.add_argument("--pool", type=int, default=2, help="predictor actors")
    p.add_argument(
        "--actor-cpus", type=float, default=None, help="num_cpus per actor (daskinfer 1, ray 0.5)"
    )
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per predictor actor")
    p.add_argument(
        "--check-rows", type=int, default=8, help="rows recomputed on the client to check"
    )
    c.run_main("W3", p.parse_args(), run, figures=("rows_per_s",))


if __name__ == "__main__":
    main()
