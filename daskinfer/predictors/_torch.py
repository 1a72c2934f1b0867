"""``TorchPredictor``: any PyTorch model as a ready predictor for ``map_batches``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from daskinfer.exceptions import PlanError
from daskinfer.predictors._common import (
    TORCH_DTYPES,
    as_names,
    batch_columns,
    check_choice,
    check_keep,
    limit_torch_threads,
    pick_torch_device,
    require_columns,
    stack_column,
    with_outputs,
)


class TorchPredictor:
    """Run a PyTorch model on numpy batches; the model loads once per actor.

    Use it as the class of an actor pool::

        ds.map_batches(
            di.predictors.TorchPredictor,
            fn_constructor_kwargs={"model_factory": make_model, "input_columns": ["data"]},
            compute=di.ActorPoolStrategy(size=2),
            batch_size=256,
        )

    Parameters
    ----------
    model_factory
        A picklable callable returning an ``nn.Module`` (a top-level function, or a
        class). Called on the worker. With ``model_path`` as well, the module's weights
        are then loaded from that state-dict file.
    model_path
        Without ``model_factory``: a TorchScript file (``torch.jit.save``), or a
        ``torch.export`` program saved as ``*.pt2`` (``torch.export.save``; export it
        with a dynamic batch dimension). With ``model_factory``: a state-dict file (``torch.save(model.state_dict(), path)``, loaded with
        ``weights_only=True``). The path must be readable on the workers.
    input_columns
        Columns passed to the model, each as one tensor, positionally and in this order
        (``model(col_a, col_b)``). A column of N-D values (images, vectors) arrives as
        one stacked array. Floating columns are cast to float32; integer columns stay.
    output_columns
        Name(s) of the output column(s). A tensor output fills one column (each row an
        N-D value when the output has more than one dimension); a tuple fills them in
        order; a dict (or a Hugging Face ``ModelOutput``) is read by these names as keys.
    keep_input_columns
        Keep the batch's columns in the output (``True``, the default), none of them
        (``False``), or only these (a list of names, e.g. ``["id"]`` to drop the pixels).
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: CUDA when this actor holds a GPU
        (CUDA visible and, inside a Dask worker, the worker offers the ``GPU`` resource,
        which ``num_gpus=`` asks for), else CPU.
    dtype
        ``"float16"`` or ``"bfloat16"``: run the forward pass under ``torch.autocast``
        on the device (mixed precision; about twice the throughput on recent GPUs).
        Outputs come back as float32. ``None`` (default) or ``"float32"``: full precision.
    num_threads
        torch's CPU threads; default: the Dask worker's thread count, so that actors
        sharing a machine's cores do not oversubscribe them.

    Notes
    -----
    The batch format is ``"numpy"`` (map_batches' default); pandas or pyarrow batches
    are converted. Outputs are numpy arrays, moved off the device after each call.
    """

    def __init__(
        self,
        model_factory: Callable[[], Any] | None = None,
        *,
        model_path: str | os.PathLike[str] | None = None,
        input_columns: str | Sequence[str] = ("data",),
        output_columns: str | Sequence[str] = "predictions",
        keep_input_columns: bool | Sequence[str] = True,
        device: str | None = None,
        dtype: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        name = type(self).__name__
        if model_factory is None and model_path is None:
            raise PlanError(
                f"{name}: give model_factory (a callable returning an nn.Module), "
                "model_path (a TorchScript file), or both (a state-dict file + factory)"
            )
        if model_factory is not None and not callable(model_factory):
            raise PlanError(
                f"{name}(model_factory={model_factory!r}): model_factory must be a callable "
                "that returns an nn.Module (a top-level function or a class)"
            )
        if model_path is not None and not os.path.exists(model_path):
            raise PlanError(
                f"{name}(model_path={str(model_path)!r}): no such file on this worker; "
                "the model file must be readable where the predictor runs"
            )
        check_choice(name, "dtype", dtype, TORCH_DTYPES)
        self.input_columns = as_names(name, "input_columns", input_columns)
        self.output_columns = as_names(name, "output_columns", output_columns)
        self.keep_input_columns = check_keep(name, keep_input_columns)

        import torch

        self.device = torch.device(pick_torch_device(device))
        limit_torch_threads(self.device.type, num_threads)
        self.autocast_dtype = getattr(torch, dtype) if dtype not in (None, "float32") else None
        self.model = self._load(model_factory, model_path).to(self.device)
        # prefetch_batch copies the next batch to the GPU on this stream while the
        # current batch computes on the default one
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _load(self, factory: Callable[[], Any] | None, path: Any) -> Any:
        import warnings

        import torch

        if factory is None and str(path).endswith(".pt2"):
            # torch.export's format, TorchScript's successor; its modules are already in
            # inference mode and refuse .eval()
            return torch.export.load(str(path)).module()
        if factory is None:
            with warnings.catch_warnings():
                # TorchScript is deprecated since torch 2.13, but its files are still common
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu").eval()
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise PlanError(
                f"{type(self).__name__}: model_factory returned {type(model).__name__}, "
                "not a torch.nn.Module"
            )
        if path is not None:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        return model.eval()

    def prefetch_batch(self, batch: Any) -> Any:
        """On a GPU: start copying the batch's inputs to it, on a copy stream of their own.

        daskinfer calls this with the next batch while the current one runs (see
        "Copying the next batch while this one runs" in docs/models.md), so the copy
        overlaps the current batch's compute; ``__call__`` then waits for the copy on
        the device, not on the host.
        On the CPU the batch is returned as it is.
        """
        if self._copy_stream is None:
            return batch
        columns = batch_columns(batch)
        require_columns(type(self).__name__, columns, self.input_columns)
        hosts = [self._host_tensor(stack_column(columns[c])) for c in self.input_columns]
        return _OnDevice(columns, hosts, self.device, self._copy_stream)

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        """Score one batch: inputs to tensors, one forward pass, outputs to numpy."""
        import torch

        if isinstance(batch, _OnDevice):
            columns, tensors = batch.columns, batch.take()
        else:
            columns = batch_columns(batch)
            require_columns(type(self).__name__, columns, self.input_columns)
            tensors = [self._tensor(stack_column(columns[c])) for c in self.input_columns]
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            result = self.model(*tensors)
        return with_outputs(columns, self._outputs(result), self.keep_input_columns)

    def _tensor(self, values: np.ndarray) -> Any:
        tensor = self._host_tensor(values)
        if self.device.type == "cuda":
            # pinned host memory lets the copy run asynchronously with the host's work
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _host_tensor(self, values: np.ndarray) -> Any:
        import torch

        if values.dtype.kind == "f":
            values = values.astype(np.float32, copy=False)
        elif values.dtype.kind not in "iub":
            raise TypeError(
                f"{type(self).__name__}: an input column has dtype {values.dtype}; "
                "models take numeric columns (preprocess text or images in an earlier "
                "map_batches stage)"
            )
        return torch.from_numpy(np.ascontiguousarray(values))

    def _outputs(self, result: Any) -> dict[str, np.ndarray]:
        names = self.output_columns
        if isinstance(result, Mapping):
            missing = [n for n in names if n not in result]
            if missing:
                raise KeyError(
                    f"{type(self).__name__}: output_columns {missing} are not keys of the "
                    f"model's output, which has {list(result)}"
                )
            values = [result[n] for n in names]
        elif isinstance(result, (tuple, list)):
            if len(result) != len(names):
                raise ValueError(
                    f"{type(self).__name__}: the model returned {len(result)} outputs but "
                    f"output_columns names {len(names)}: {list(names)}"
                )
            values = list(result)
        else:
            if len(names) != 1:
                raise ValueError(
                    f"{type(self).__name__}: the model returned one tensor but "
                    f"output_columns names {len(names)}: {list(names)}"
                )
            values = [result]
        return {n: _to_numpy(v) for n, v in zip(names, values, strict=True)}


class StagedTensors:
    """Tensors on their way to a GPU, copied on a CUDA stream of their own.

    For a predictor's ``prefetch_batch``: ``StagedTensors(host_tensors, device, stream)``
    pins the host tensors and starts their copies on ``stream``, then returns at once.
    In ``__call__``, ``take()`` makes the computing stream wait for the copies (the
    device waits, not the host) and returns the tensors on the device.
    """

    __slots__ = ("ready", "tensors")

    def __init__(self, host_tensors: Sequence[Any], device: Any, stream: Any) -> None:
        import torch

        with torch.cuda.stream(stream):
            # pinned host memory: the copy runs asynchronously (from pageable memory the
            # host would wait for it)
            self.tensors = [t.pin_memory().to(device, non_blocking=True) for t in host_tensors]
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def take(self) -> list[Any]:
        """The tensors, for use on the current stream once the copy is done."""
        import torch

        stream = torch.cuda.current_stream(self.tensors[0].device) if self.tensors else None
        if stream is not None:
            stream.wait_event(self.ready)
            for tensor in self.tensors:
                # allocated on the copy stream: the caching allocator must not reuse
                # the memory before the compute stream is done with it
                tensor.record_stream(stream)
        return self.tensors


class _OnDevice(StagedTensors):
    """A batch whose input tensors are being copied to the GPU, with its host columns."""

    __slots__ = ("columns",)

    def __init__(
        self, columns: dict[str, np.ndarray], host_tensors: Sequence[Any], device: Any, stream: Any
    ) -> None:
        super().__init__(host_tensors, device, stream)
        self.columns = columns


def _to_numpy(value: Any) -> np.ndarray:
    """A tensor as numpy on the host; reduced precision comes back as float32."""
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point() and value.dtype != torch.float64:
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)
