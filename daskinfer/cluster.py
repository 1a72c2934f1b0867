"""Which cluster runs the work: an address, the active client, or an embedded one.

``di.init(address)`` connects to any Dask scheduler. With no address and no active
``distributed.Client``, the first execution starts an embedded cluster bound to
127.0.0.1: a ``LocalCluster`` where no GPU is present; where GPUs are, dask-cuda's
``LocalCUDACluster`` (one worker per GPU, resources ``GPU=1``) plus CPU-only workers.
dask-cuda is imported only after GPUs have been found.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import logging
import os
import sys
import threading
import weakref
from collections.abc import Mapping
from typing import Any, cast

import distributed
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

from daskinfer._internal.ray_args import INIT_ARGS, takes_ray_args
from daskinfer.context import DataContext
from daskinfer.exceptions import DaskInferError, PlanError
from daskinfer.worker_priority import DEFAULT_NICENESS

__all__ = ["current_client", "init", "shutdown"]

logger = logging.getLogger("daskinfer")

GPU = "GPU"
CPU = "CPU"

_lock = threading.RLock()
_client: Client | None = None
_cluster: Any = None  # the embedded cluster we own, if any


def detect_gpus() -> int:
    """Number of NVIDIA GPUs visible to this process (0 without NVML or a driver)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        import pynvml  # from nvidia-ml-py; absent on CPU-only installs
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001  # no NVML or no driver: no GPUs
        return 0
    if visible:
        count = min(count, len([v for v in visible.split(",") if v.strip()]))
    return count


def _bootstrapping_child_process() -> bool:
    """Whether this is a spawned process still importing the parent's main module."""
    import multiprocessing

    # the flag multiprocessing itself checks before refusing to start a process
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False)) or (
        getattr(sys.modules.get("__main__"), "__name__", "") == "__mp_main__"
    )


@takes_ray_args("di.init", INIT_ARGS)
def init(
    address: str | None = None,
    *,
    security: Any = None,
    timeout_s: float = 10.0,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | float | None = "auto",
    dashboard_address: str | None = "127.0.0.1:0",
    cpu_workers: int | None = None,
    cpu_worker_niceness: int | None = DEFAULT_NICENESS,
) -> Client:
    """Connect daskinfer to a cluster, or start the embedded one, and return its client.

    Parameters
    ----------
    address
        A scheduler address (``tcp://host:8786``, ``tls://...``). ``None`` uses the
        active ``distributed.Client`` if there is one, else starts an embedded cluster.
    security
        A ``distributed.Security`` for TLS, passed to the client as-is.
    timeout_s
        How long to wait for the scheduler to answer before raising.
    n_workers, threads_per_worker, memory_limit, dashboard_address
        Options of the embedded ``LocalCluster`` (ignored with an address). The embedded
        cluster listens on 127.0.0.1 only; each worker offers ``CPU=threads_per_worker``.
    cpu_workers
        On a machine with GPUs, how many CPU-only workers to start beside the GPU ones.
    cpu_worker_niceness
        The embedded cluster's CPU workers run at this niceness (0-19; Ray's workers run
        at 15), so that the scheduler, this process and the GPU workers get a core first
        when they need one (``daskinfer.worker_priority``). ``None`` leaves it as is.

    Examples
    --------
    >>> import daskinfer as di
    >>> client = di.init("tcp://scheduler:8786")  # doctest: +SKIP
    """
    global _client, _cluster
    if address == "auto":
        raise PlanError(
            "di.init(address='auto'): Ray's way to find a running cluster; give the Dask "
            "scheduler's address (di.init('tcp://host:8786')), or no address to use the "
            "active distributed.Client or start an embedded cluster"
        )
    if cpu_worker_niceness is not None and (
        not isinstance(cpu_worker_niceness, int) or not 0 <= cpu_worker_niceness <= 19
    ):
        raise DaskInferError(
            f"di.init(cpu_worker_niceness={cpu_worker_niceness!r}): use an integer from 0 "
            "to 19, or None to leave the workers' priority alone"
        )
    with _lock:
        if _client is not None:
            shutdown()
        if address is not None:
            if str(address).startswith("tls://") and security is None:
                raise DaskInferError(
                    f"{address!r} is a TLS address: pass its certificates, e.g. "
                    "di.init(address, security=distributed.security.Security(tls_ca_file=..., "
                    "tls_client_cert=..., tls_client_key=..., require_encryption=True))"
                )
            try:
                _client = Client(
                    address, security=security, timeout=f"{timeout_s}s", set_as_default=False
                )
            except (OSError, TimeoutError) as exc:
                raise DaskInferError(
                    f"no Dask scheduler answered at {address!r} within {timeout_s:g} s "
                    f"({type(exc).__name__}: {exc}). Check the address and that "
                    "`dask scheduler` is running and reachable, or call di.init() with no "
                    "address to start a local cluster."
                ) from exc
            _cluster = None
            # now rather than inside the first job (workers that join later run it on joining)
            warm_up_workers(_client)
            logger.info(
                "daskinfer: connected to %s (dashboard %s)", address, _client.dashboard_link
            )
            return _client
        if _bootstrapping_child_process():
            # a worker process re-running the user's script: without this error it would
            # start a cluster of its own, whose workers would do the same, endlessly
            raise DaskInferError(
                "daskinfer was asked to start a local cluster while a worker process was "
                "importing your script. Put the pipeline under "
                '`if __name__ == "__main__":` (Dask starts worker processes by '
                "re-importing the main module)."
            )
        _cluster = _start_embedded(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            memory_limit=memory_limit,
            dashboard_address=dashboard_address,
            cpu_workers=cpu_workers,
            cpu_worker_niceness=cpu_worker_niceness,
        )
        _client = Client(_cluster, set_as_default=False)
        warm_up_workers(_client)
        message = f"daskinfer: started a local Dask cluster; dashboard at {_client.dashboard_link}"
        logger.info(message)
        print(message, file=sys.stderr)
        return _client


def _start_embedded(
    *,
    n_workers: int | None,
    threads_per_worker: int | None,
    memory_limit: str | float | None,
    dashboard_address: str | None,
    cpu_workers: int | None,
    cpu_worker_niceness: int | None = None,
) -> Any:
    cores = os.cpu_count() or 1
    gpus = detect_gpus()
    lower_priority = cpu_worker_options(cpu_worker_niceness)
    common: dict[str, Any] = {
        "host": "127.0.0.1",
        "dashboard_address": dashboard_address,
        "memory_limit": memory_limit,
    }
    if gpus:
        from dask_cuda import LocalCUDACluster  # only once GPUs are known to exist

        cluster = LocalCUDACluster(
            **common,
            threads_per_worker=threads_per_worker or 1,
            resources={GPU: 1, CPU: threads_per_worker or 1},
        )
        extra = cpu_workers if cpu_workers is not None else max(1, cores - gpus)
        for i in range(extra):
            # CPU-only workers beside the GPU ones, without CUDA_VISIBLE_DEVICES pinning
            cluster.worker_spec[f"cpu-{i}"] = {
                "cls": distributed.Nanny,
                "options": {
                    "nthreads": 1,
                    "memory_limit": memory_limit,
                    "resources": {CPU: 1},
                    "host": "127.0.0.1",
                    **lower_priority,
                },
            }
        cluster.sync(cluster._correct_state)
        return cluster
    workers = n_workers or cores
    threads = threads_per_worker or max(1, cores // workers)
    return distributed.LocalCluster(
        **common,
        n_workers=workers,
        threads_per_worker=threads,
        processes=True,
        resources={CPU: threads},
        **lower_priority,
    )


def cpu_worker_options(niceness: int | None) -> dict[str, Any]:
    """Worker (Nanny) options that start a CPU worker at ``niceness`` (None: nothing)."""
    if niceness is None:
        return {}
    return {
        "preload": ["daskinfer.worker_priority"],
        "env": {"DASKINFER_WORKER_NICENESS": str(niceness)},
    }


def shutdown() -> None:
    """Close the client daskinfer opened and the embedded cluster, if any."""
    global _client, _cluster
    with _lock:
        client, cluster = _client, _cluster
        _client = _cluster = None
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def current_client() -> Client:
    """The client executions use: ``init``'s, else the active one, else a new embedded one."""
    with _lock:
        if _client is not None and _client.status == "running":
            return _client
        try:
            return Client.current(allow_global=True)
        except ValueError:
            pass
        return init()


atexit.register(shutdown)


ACTOR_RESOURCE_PREFIX = "daskinfer-actor-"  # see worker_fns.actor_resource


def worker_inventory(client: Client) -> dict[str, dict[str, Any]]:
    """``{address: {"resources": {...}, "nthreads": n, "name": ...}}`` for live workers."""
    # asked of the scheduler directly: Client.scheduler_info returns the client's cached
    # copy, which its own refresh every 2 s (asking for no workers) can overwrite between
    # the fetch and the return, giving a cluster without workers (seen once in CI)
    kwargs = {"n_workers": -1} if _accepts_n_workers(cast(Any, type(client))) else {}
    info = client.sync(client.scheduler.identity, **kwargs)
    return {
        addr: {
            # without the resources that route calls to our own actors: they say where
            # a predictor lives, not what a worker can offer
            "resources": {
                k: v
                for k, v in (w.get("resources") or {}).items()
                if not k.startswith(ACTOR_RESOURCE_PREFIX)
            },
            "nthreads": int(w.get("nthreads", 1)),
            "name": w.get("name", addr),
        }
        for addr, w in info.get("workers", {}).items()
    }


@functools.cache
def _accepts_n_workers(client_type: Any) -> bool:
    # read once per class: the inventory is refreshed every two seconds. The scheduler's
    # identity takes n_workers from the same release on; before it, it listed every worker
    return "n_workers" in inspect.signature(client_type.scheduler_info).parameters


class WarmupPlugin(WorkerPlugin):
    """Import daskinfer's worker code (pandas, pyarrow ...) when a worker starts.

    Otherwise each worker pays that import (about a second) on its first task, one
    worker after another along the pipeline; a predictor's worker would sit idle
    through its own import after the first batch had already arrived.

    Workers that offer an accelerator (``GPU``) also import ``accelerator_modules``
    (torch and transformers, where installed): such a worker will load a model, and
    torch's CUDA build and transformers take seconds to import, all of them time in
    which the GPU would sit idle inside the first job. CPU workers do not: torch costs
    each process hundreds of MB.
    """

    name = "daskinfer-warmup"
    # transformers imports lazily: ``import transformers`` leaves its model and tokenizer
    # machinery to the first use, which took 1.3 s more here (modeling_utils, on top of
    # torch's 0.8 s), inside the first job; so the modules a model load imports are named
    accelerator_modules = (
        "torch",
        "transformers",
        "transformers.modeling_utils",
        "transformers.models.auto.tokenization_auto",
    )

    def __init__(self, freeze_gc: bool = True) -> None:
        self.freeze_gc = freeze_gc

    def setup(self, worker: Any) -> None:
        """Import the worker-side modules, and the model framework on accelerator workers.

        Then, with ``freeze_gc``, freeze what the imports made, so that the process's
        full garbage collections skip it (see ``daskinfer._internal.gc_freeze``).
        """
        import daskinfer._internal.worker_fns  # noqa: F401

        if worker.state.total_resources.get(GPU):
            self._import_accelerator_modules(worker)
        if self.freeze_gc:
            from daskinfer._internal.gc_freeze import freeze_after_startup

            freeze_after_startup()

    def _import_accelerator_modules(self, worker: Any) -> None:
        import importlib
        import importlib.util

        for module in self.accelerator_modules:
            try:
                if importlib.util.find_spec(module.partition(".")[0]) is not None:
                    importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - a broken install must not stop the worker
                logger.warning(
                    "warm-up: importing %s on %s failed: %s", module, worker.address, exc
                )


_warmed: weakref.WeakSet[Client] = weakref.WeakSet()


def warm_up_workers(client: Client) -> None:
    """Register the warm-up plugin once per client (also runs on workers that join later)."""
    with _lock:
        if client in _warmed:
            return
        freeze_gc = DataContext.get_current().freeze_gc
        client.register_plugin(WarmupPlugin(freeze_gc=freeze_gc), name=WarmupPlugin.name)
        _warmed.add(client)
    # also part of a client's one-time set-up: installing the page costs the scheduler
    # a few tenths of a second, better spent at start-up than during the first run
    install_dashboard(client, wait=True)


_dashboards: weakref.WeakSet[Client] = weakref.WeakSet()


def install_dashboard(client: Client, *, wait: bool = False) -> None:
    """Add the daskinfer page and metrics to the scheduler's dashboard, once per client.

    Runs ``daskinfer._internal.dashboard.install`` on the scheduler, so any Dask
    deployment gets the page without configuration, provided daskinfer is importable
    there (it is for the embedded cluster and for `dask scheduler` started from the same
    environment). Where it is not, the job runs anyway; the warning says why.
    """
    with _lock:
        if client in _dashboards:
            return
        _dashboards.add(client)
    if wait:
        _install_dashboard(client)
        return
    # off the executor's loop: the first run must not wait for it
    threading.Thread(
        target=_install_dashboard, args=(client,), name="daskinfer-dashboard", daemon=True
    ).start()


def _install_dashboard(client: Client) -> None:
    try:
        from daskinfer._internal.dashboard import install

        client.run_on_scheduler(install)
    except Exception as exc:  # noqa: BLE001  # the dashboard is optional: warn, never fail the run
        if client.status != "running":
            return  # the client closed meanwhile: nothing to report
        logger.warning(
            "daskinfer: the dashboard page and metrics are not available on this "
            "scheduler (%s: %s); install daskinfer in the scheduler's environment to get them",
            type(exc).__name__,
            exc,
        )
        return
    link = client.dashboard_link
    if link:
        logger.info("daskinfer: pipelines at %s", link.replace("/status", "/daskinfer"))


def has_resources(worker: Mapping[str, Any], needed: Mapping[str, float]) -> bool:
    """Whether a worker's declared resources cover ``needed``."""
    offered = worker["resources"]
    return all(offered.get(k, 0) >= v for k, v in needed.items())
