"""Ray Data's batch-inference quick start (PyTorch), ported to daskinfer.

The original (docs.ray.io, "End-to-end: Offline Batch Inference", PyTorch tab) builds a
dataset of ones with ``ray.data.from_numpy``, defines a ``TorchPredictor`` class whose
``__init__`` builds the model and whose ``__call__`` runs it on a batch, and maps it over
the dataset with ``concurrency=2``. Here only the import changes; the model is built
from code, so nothing is downloaded.

Run it::

    python examples/pytorch_quickstart.py            # 10,000 rows
    python examples/pytorch_quickstart.py --rows 200 # a quick check

The script checks its own output and exits non-zero when something is wrong.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import daskinfer as di

SEED = 0


def build_model():
    """The quick start's model: one linear layer and a sigmoid, seeded so every actor agrees."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(in_features=100, out_features=1), nn.Sigmoid())
    model.eval()
    return model


class TorchPredictor:
    """A stateful predictor: ``__init__`` runs once per actor, on a worker."""

    def __init__(self):
        import torch

        torch.set_num_threads(1)  # two actors share a small machine
        self.model = build_model()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        tensor = torch.as_tensor(batch["data"], dtype=torch.float32)
        with torch.inference_mode():
            # Ray's example returns only the model's output; so does this one
            return {"output": self.model(tensor).numpy()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows of ones to score")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per predictor call")
    parser.add_argument("--concurrency", type=int, default=2, help="predictor actors")
    args = parser.parse_args(argv)

    ds = di.from_numpy(np.ones((args.rows, 100), dtype=np.float32))
    predictions = ds.map_batches(
        TorchPredictor, concurrency=args.concurrency, batch_size=args.batch_size
    )

    # Ray's quick start ends with show(); take() is the same, as a list of rows
    predictions.show(limit=1)
    start = time.perf_counter()
    # stream every batch back to this process (take_batch(n) would do too, but stats()
    # reports only executions started from this very Dataset)
    output = np.concatenate(
        [b["output"] for b in predictions.iter_batches(batch_size=args.batch_size)]
    )
    elapsed = time.perf_counter() - start

    # check: one output per row, and every actor built the same (seeded) model
    import torch

    with torch.inference_mode():
        expected = float(build_model()(torch.ones(1, 100)).item())
    errors = []
    if output.shape != (args.rows, 1):
        errors.append(f"output shape {output.shape}, expected {(args.rows, 1)}")
    if not np.all((output > 0) & (output < 1)):
        errors.append("a sigmoid output lies outside (0, 1)")
    if not np.allclose(output, expected, atol=1e-6):
        errors.append(f"outputs differ from the model run here ({expected:.6f})")
    print(predictions.stats())
    if errors:
        print("FAILED: " + "; ".join(errors), file=sys.stderr)
        return 1
    print(
        f"OK: scored {len(output)} rows with {args.concurrency} TorchPredictor actors "
        f"in {elapsed:.2f} s; output[0] = {float(output[0, 0]):.6f}"
    )
    return 0


if __name__ == "__main__":  # Dask starts worker processes: keep the run under this guard
    sys.exit(main())
