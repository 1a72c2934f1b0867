"""Ray Data's batch-inference quick start (TensorFlow), ported to daskinfer.

The original (docs.ray.io, "End-to-end: Offline Batch Inference", TensorFlow tab) builds a
dataset of ones with ``ray.data.from_numpy``, defines a ``TFPredictor`` class whose
``__init__`` builds a Keras model (one dense layer, a sigmoid) and whose ``__call__``
runs it on ``batch["data"]``, and maps it over the dataset with ``concurrency=2``. Here
the class is daskinfer's ready ``daskinfer.predictors.TFPredictor``: give it a function
that builds the model (or a saved ``.keras`` file) and it loads the model once per actor,
limits TensorFlow's threads to the worker's, and returns the output column.

Needs TensorFlow: ``pip install 'daskinfer[tf]'`` (tensorflow-cpu).

Run it::

    python examples/tensorflow_quickstart.py              # 10,000 rows
    python examples/tensorflow_quickstart.py --rows 200   # a quick check

The script checks its own output and exits non-zero when something is wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import daskinfer as di
from daskinfer.predictors import TFPredictor

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # inherited by the workers: no banner

SEED = 0


def build_model():
    """The quick start's model: 100 inputs, one dense unit, a sigmoid. Its weights are
    set from a seeded numpy generator, so every actor (and the check here) builds the
    same model (with Keras' seeded initialisers, one CI run saw outputs that differed
    from the check's). Runs on the workers (TensorFlow is imported there)."""
    import keras

    model = keras.Sequential(
        [keras.Input(shape=(100,)), keras.layers.Dense(1, activation="sigmoid")]
    )
    rng = np.random.default_rng(SEED)
    kernel = rng.normal(0.0, 0.1, size=(100, 1)).astype(np.float32)
    model.layers[0].set_weights([kernel, np.zeros(1, dtype=np.float32)])
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows of ones to score")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per predictor call")
    parser.add_argument("--concurrency", type=int, default=2, help="predictor actors")
    args = parser.parse_args(argv)

    ds = di.from_numpy(np.ones((args.rows, 100), dtype=np.float32))
    predictions = ds.map_batches(
        TFPredictor,
        compute=di.ActorPoolStrategy(size=args.concurrency),
        batch_size=args.batch_size,
        fn_constructor_kwargs={
            "model_factory": build_model,
            "input_columns": ["data"],
            "output_columns": "output",
            "keep_input_columns": False,  # Ray's example returns only the output
        },
    )
    predictions.show(limit=1)
    start = time.perf_counter()
    output = np.concatenate(
        [b["output"] for b in predictions.iter_batches(batch_size=args.batch_size)]
    )
    elapsed = time.perf_counter() - start

    # check: one output per row, and every actor built the same (seeded) model
    expected = float(np.asarray(build_model()(np.ones((1, 100), dtype=np.float32)))[0, 0])
    errors = []
    if output.shape != (args.rows, 1):
        errors.append(f"output shape {output.shape}, expected {(args.rows, 1)}")
    if not np.all((output > 0) & (output < 1)):
        errors.append("a sigmoid output lies outside (0, 1)")
    if not np.allclose(output, expected, atol=1e-5):
        errors.append(f"outputs differ from the model run here ({expected:.6f})")
    print(predictions.stats())
    if errors:
        print("FAILED: " + "; ".join(errors), file=sys.stderr)
        return 1
    print(
        f"OK: scored {len(output)} rows with {args.concurrency} TFPredictor actors "
        f"in {elapsed:.2f} s; output[0] = {float(output[0, 0]):.6f}"
    )
    return 0


if __name__ == "__main__":  # Dask starts worker processes: keep the run under this guard
    sys.exit(main())
