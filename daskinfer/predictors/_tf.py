"""``TFPredictor``: a TensorFlow/Keras model as a ready predictor for ``map_batches``.

TensorFlow is imported in ``__init__`` only (on the worker), never when this module is
imported: it takes seconds to import and is an optional dependency (the ``tf`` extra).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from daskinfer.exceptions import PlanError
from daskinfer.predictors._common import (
    as_names,
    batch_columns,
    check_keep,
    require_columns,
    stack_column,
    with_outputs,
    worker_nthreads,
)


class TFPredictor:
    """Run a Keras model on numpy batches; the model loads once per actor.

    Parameters
    ----------
    model_factory
        A picklable callable returning a ``keras.Model`` (built or not; Keras builds it
        on the first batch). Called on the worker.
    model_path
        Instead of a factory: a saved Keras file (``model.save("m.keras")``), loaded with
        ``keras.models.load_model``. It must be readable on the workers.
    input_columns
        Columns given to the model: one column as the input tensor, several as a list
        of inputs in this order. Floating columns are cast to float32.
    output_columns
        Name(s) of the output column(s); a model with several outputs fills them in order.
    keep_input_columns
        Keep the batch's columns (``True``, the default), none, or a list of names.
    num_threads
        TensorFlow's intra-op threads; default: the Dask worker's thread count. It can
        only be set before TensorFlow starts in the process, so a second actor on the
        same worker keeps the first one's setting.

    Notes
    -----
    TensorFlow places the model on a GPU by itself when it sees one (``tensorflow`` with
    CUDA rather than ``tensorflow-cpu``); to keep an actor on the CPU, hide the GPUs from
    its worker (``CUDA_VISIBLE_DEVICES=""``).
    """

    def __init__(
        self,
        model_factory: Callable[[], Any] | None = None,
        *,
        model_path: str | os.PathLike[str] | None = None,
        input_columns: str | Sequence[str] = ("data",),
        output_columns: str | Sequence[str] = "predictions",
        keep_input_columns: bool | Sequence[str] = True,
        num_threads: int | None = None,
    ) -> None:
        name = type(self).__name__
        if (model_factory is None) == (model_path is None):
            raise PlanError(
                f"{name}: give exactly one of model_factory (a callable returning a "
                f"keras.Model) and model_path (a saved .keras file); got "
                f"model_factory={model_factory!r}, model_path={model_path!r}"
            )
        if model_factory is not None and not callable(model_factory):
            raise PlanError(f"{name}(model_factory={model_factory!r}): it must be callable")
        if model_path is not None and not os.path.exists(model_path):
            raise PlanError(f"{name}(model_path={str(model_path)!r}): no such file on this worker")
        self.input_columns = as_names(name, "input_columns", input_columns)
        self.output_columns = as_names(name, "output_columns", output_columns)
        self.keep_input_columns = check_keep(name, keep_input_columns)

        import tensorflow as tf

        n = num_threads if num_threads is not None else worker_nthreads()
        if n is not None:
            with contextlib.suppress(RuntimeError):  # TF already started in this process
                tf.config.threading.set_intra_op_parallelism_threads(n)
                tf.config.threading.set_inter_op_parallelism_threads(n)
        self.tf = tf
        if model_factory is not None:
            self.model = model_factory()
        else:
            self.model = tf.keras.models.load_model(str(model_path))

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        """Score one batch with ``model(inputs, training=False)``."""
        columns = batch_columns(batch)
        require_columns(type(self).__name__, columns, self.input_columns)
        arrays = [_model_input(stack_column(columns[c])) for c in self.input_columns]
        inputs = arrays[0] if len(arrays) == 1 else arrays
        # model(...) rather than predict(): no per-call tf.data pipeline or progress bar
        result = self.model(inputs, training=False)
        return with_outputs(columns, self._outputs(result), self.keep_input_columns)

    def _outputs(self, result: Any) -> dict[str, np.ndarray]:
        names = self.output_columns
        if isinstance(result, Mapping):
            values = [result[n] for n in names]
        elif isinstance(result, (list, tuple)):
            values = list(result)
        else:
            values = [result]
        if len(values) != len(names):
            raise ValueError(
                f"{type(self).__name__}: the model returned {len(values)} output(s) but "
                f"output_columns names {len(names)}: {list(names)}"
            )
        return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}


def _model_input(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f":
        return values.astype(np.float32, copy=False)
    return values
