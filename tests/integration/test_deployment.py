"""A cluster started like a deployment: `dask scheduler` and `dask worker` processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

import daskinfer as di
from daskinfer.cluster import worker_inventory


def _wait_for(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return json.loads(path.read_text())
        time.sleep(0.1)
    raise TimeoutError(f"{path} never appeared")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """One scheduler, two CPU-only workers and one worker started with GPU=1.

    Shared by the module's tests (starting and stopping these processes takes some 20 s
    on two cores); each test runs its own jobs on it, as jobs share a real deployment.
    """
    sched_file = tmp_path_factory.mktemp("deployment") / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [
        subprocess.Popen(
            [
                *dask,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(sched_file),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        address = _wait_for(sched_file)["address"]
        worker = [
            sys.executable,
            "-m",
            "distributed.cli.dask_worker",
            address,
            "--nthreads",
            "1",
            "--no-dashboard",
            "--host",
            "127.0.0.1",
        ]
        for name, extra in (("cpu-a", []), ("cpu-b", []), ("gpu-0", ["--resources", "GPU=1"])):
            procs.append(
                subprocess.Popen(
                    [*worker, "--name", name, *extra],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        client = di.init(address)
        client.wait_for_workers(3, timeout=60)
        yield client
    finally:
        di.shutdown()
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def tag_cpu(batch):
    from distributed import get_worker

    return {**batch, "preprocessed_on": np.full(len(batch["x"]), get_worker().name, dtype=object)}


class GpuTagger:
    def __init__(self):
        from distributed import get_worker

        self.name = get_worker().name

    def __call__(self, batch):
        return {**batch, "predicted_on": np.full(len(batch["x"]), self.name, dtype=object)}


def test_cpu_stages_on_cpu_workers_and_predictor_on_gpu_worker(deployment, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    frame = pd.DataFrame({"x": np.arange(3000, dtype="int64")})
    for i in range(6):
        frame.iloc[i * 500 : (i + 1) * 500].to_parquet(source / f"part-{i}.parquet", index=False)
    ds = (
        di.read_parquet(str(source))
        .map_batches(tag_cpu, batch_size=128)
        .map_batches(GpuTagger, concurrency=1, num_gpus=1, batch_size=256)
        .map_batches(
            lambda b: {
                **b,
                "written_on": np.full(
                    len(b["x"]), __import__("distributed").get_worker().name, dtype=object
                ),
            },
            batch_size=None,
        )
    )
    out = ds.to_pandas()
    assert out["x"].tolist() == list(range(3000))
    assert set(out["preprocessed_on"]) <= {"cpu-a", "cpu-b"}
    assert set(out["predicted_on"]) == {"gpu-0"}
    assert set(out["written_on"]) <= {"cpu-a", "cpu-b"}


class OneAtATime:
    """A GPU stand-in that records whether two of its calls ever overlapped."""

    def __init__(self):
        import threading

        self.active = 0
        self.most = 0
        self.guard = threading.Lock()

    def __call__(self, batch):
        with self.guard:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(0.005)
        with self.guard:
            self.active -= 1
        return {**batch, "most_at_once": np.full(len(batch["x"]), self.most)}


def test_accelerator_actor_prepares_the_next_call_but_runs_one_at_a_time(deployment):
    # calls of an actor holding a GPU leave the worker's single thread so that the next
    # call can fetch its batch meanwhile; the predictor itself must still see one call
    # at a time, and the order must hold
    ds = (
        di.range(4000, override_num_blocks=20)
        .map_batches(lambda b: {"x": b["id"]}, batch_size=100)
        .map_batches(OneAtATime, concurrency=1, num_gpus=1, batch_size=50)
    )
    out = ds.to_pandas()
    assert out["x"].tolist() == list(range(4000))
    assert out["most_at_once"].max() == 1


class StagesAhead:
    """A GPU stand-in whose prefetch_batch takes 20 ms (a copy to the device) and whose
    calls take 30 ms; it records when each batch was staged and called."""

    def __init__(self):
        import threading

        self.guard = threading.Lock()
        self.times_staged = {}

    def prefetch_batch(self, batch):
        t0 = time.time()
        time.sleep(0.02)
        first = int(batch["x"][0])
        with self.guard:
            self.times_staged[first] = self.times_staged.get(first, 0) + 1
        return {"x": batch["x"], "stage_t0": t0, "stage_t1": time.time()}

    def __call__(self, batch):
        assert "stage_t0" in batch, "the call got a batch that prefetch_batch did not return"
        t0 = time.time()
        time.sleep(0.03)
        n = len(batch["x"])
        return {
            "x": batch["x"],
            "times_staged": np.full(n, self.times_staged[int(batch["x"][0])]),
            **{k: np.full(n, batch[k]) for k in ("stage_t0", "stage_t1")},
            "call_t0": np.full(n, t0),
            "call_t1": np.full(n, time.time()),
        }


def test_accelerator_actor_stages_the_next_batch_while_the_current_one_runs(deployment, context):
    # prefetch_batch (a copy to the GPU, in a real predictor) runs for the next call in
    # line while the current call runs, so the two overlap; each batch is staged once,
    # and the predictor still runs one call at a time, in order
    context.target_task_s = 0.0  # one batch a call: the overlap is between calls
    context.max_pool_calls_per_s = None
    ds = (
        di.range(2000, override_num_blocks=10)
        .map_batches(lambda b: {"x": b["id"]}, batch_size=100)
        .map_batches(StagesAhead, concurrency=1, num_gpus=1, batch_size=50)
    )
    out = ds.to_pandas()
    assert out["x"].tolist() == list(range(2000))
    batches = out.groupby(out["x"] // 50).first()
    assert len(batches) == 40
    assert (batches["times_staged"] == 1).all()
    calls = batches.sort_values("call_t0")
    assert (
        calls["call_t0"].to_numpy()[1:] >= calls["call_t1"].to_numpy()[:-1]
    ).all()  # one at a time
    # a batch was staged ahead when its staging ended while the previous call ran
    previous_end = calls["call_t1"].shift(1)
    ahead = (calls["stage_t1"] < previous_end).sum()
    assert ahead >= 30, f"only {ahead} of 40 batches were staged while another call ran"


class ThreadBound:
    """Records the thread its constructor ran on, and keeps state in a thread-local (as
    CUDA's current stream, torch's grad mode and cuDNN's plan cache are)."""

    def __init__(self):
        import threading

        from distributed import get_worker

        self.home = threading.get_ident()
        self.worker = get_worker().address  # the task's context reaches the constructor
        self.local = threading.local()
        self.local.ready = True

    def __call__(self, batch):
        import threading

        from distributed import get_worker

        n = len(batch["x"])
        time.sleep(0.005)
        return {
            "x": batch["x"],
            "same_thread": np.full(n, threading.get_ident() == self.home),
            "local_state": np.full(n, getattr(self.local, "ready", False)),
            "same_worker": np.full(n, get_worker().address == self.worker),
            "thread": np.full(n, threading.current_thread().name),
        }


@pytest.mark.parametrize("where", ["accelerator", "cpu"])
def test_predictor_is_built_and_called_on_one_thread_of_its_own(deployment, where):
    # like a Ray actor's methods: the constructor and every call on one long-lived thread,
    # so thread-local state set up in __init__ is there in each call. Dask's task threads
    # come and go (an accelerator's calls leave the pool while they wait for their turn),
    # which would put calls on new threads
    placement = {"num_gpus": 1} if where == "accelerator" else {"num_cpus": 1}
    ds = (
        di.range(1200, override_num_blocks=12)
        .map_batches(lambda b: {"x": b["id"]}, batch_size=100)
        .map_batches(ThreadBound, concurrency=1, batch_size=50, **placement)
    )
    out = ds.to_pandas()
    assert out["x"].tolist() == list(range(1200))
    assert out["same_thread"].all(), out.groupby("thread").size()
    assert out["local_state"].all()
    assert out["same_worker"].all()
    assert out["thread"].str.startswith("daskinfer-predictor-").all()


def test_accelerator_workers_import_torch_at_warm_up_and_cpu_workers_do_not(deployment):
    # a GPU worker will load a model: torch's import (seconds for its CUDA build) is paid
    # when the client first connects, not inside the first job; CPU workers stay lean
    # (transformers imports lazily: the modules a model load needs are named too)
    wanted = {
        "torch",
        "transformers",
        "transformers.modeling_utils",
        "transformers.models.auto.tokenization_auto",
    }
    loaded = deployment.run(lambda: wanted <= set(sys.modules))
    by_name = {info["name"]: loaded[addr] for addr, info in worker_inventory(deployment).items()}
    assert by_name == {"cpu-a": False, "cpu-b": False, "gpu-0": True}


class PoisonedGpuModel:
    """Sums each row's vector; fails on rows whose x is a multiple of 97."""

    def __call__(self, batch):
        assert batch["vec"].shape == (len(batch["x"]), 4)  # N-D column arrives stacked
        if (batch["x"] % 97 == 0).any():
            raise ValueError("poisoned")
        return {"x": batch["x"], "total": batch["vec"].sum(axis=1)}


def _vectors_one_array(batch):
    # returned as one array: a tensor column, whose blocks travel as a few buffers
    return {"x": batch["id"], "vec": np.repeat(batch["id"][:, None], 4, axis=1)}


def _vectors_one_object_per_row(df):
    # a pandas batch holding an array per row: an object column, unpickled row by row
    vec = np.repeat(df["id"].to_numpy()[:, None], 4, axis=1)
    return pd.DataFrame({"x": df["id"], "vec": list(vec)})


@pytest.mark.parametrize(
    ("upstream", "batch_format", "assembled_on_cpu"),
    [(_vectors_one_object_per_row, "pandas", True), (_vectors_one_array, "numpy", False)],
)
def test_accelerator_calls_get_rows_assembled_on_cpu_workers_and_quarantine_still_works(
    deployment, tmp_path, upstream, batch_format, assembled_on_cpu
):
    # an accelerator actor's batches of per-row objects are cut, concatenated and
    # stacked by a CPU task (the GPU worker only receives contiguous arrays); rows of
    # arrays that are one array per block go to the call as they are. Either way a
    # failing batch is still bisected down to its bad rows, which are rebuilt from
    # those arrays
    ds = (
        di.range(3000, override_num_blocks=6)
        .map_batches(upstream, batch_size=100, batch_format=batch_format)
        .map_batches(
            PoisonedGpuModel, concurrency=1, num_gpus=1, batch_size=256, on_error="quarantine"
        )
    )
    from distributed import get_task_stream

    with get_task_stream(client=deployment) as stream:
        paths = ds.write_parquet(str(tmp_path / "out"))
    out = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    good = [i for i in range(3000) if i % 97]
    assert out["x"].tolist() == good
    assert (out["total"] == out["x"] * 4).all()
    dead = pd.read_parquet(next((tmp_path / "out" / "_errors").glob("quarantine-*.parquet")))
    assert sorted(dead["x"].tolist()) == [i for i in range(3000) if i % 97 == 0]
    # where the assembly ran: Dask's task stream names each task by its key
    gpu = {a for a, w in worker_inventory(deployment).items() if w["resources"].get("GPU")}
    assembled_on = {t["worker"] for t in stream.data if "-batch-" in str(t["key"])}
    if assembled_on_cpu:
        assert assembled_on and not (assembled_on & gpu)
    else:
        assert not assembled_on


class ColumnsSeen:
    """Sums each row's columns; records the dtypes and shapes its batches arrived with."""

    def __call__(self, batch):
        n = len(batch["x"])
        seen = ",".join(f"{k}:{v.dtype}:{v.shape}" for k, v in sorted(batch.items()))
        total = batch["x"] + (batch["vec"].sum(axis=1) if "vec" in batch else batch["y"])
        return {"x": batch["x"], "total": total, "seen": np.full(n, seen)}


def _flat(batch):
    return {"x": batch["id"], "y": batch["id"] * 3}


def _with_vectors(batch):
    return {"x": batch["id"], "vec": np.repeat(batch["id"][:, None], 3, axis=1)}


def _with_vector_objects(df):
    vec = np.repeat(df["id"].to_numpy()[:, None], 3, axis=1)
    return pd.DataFrame({"x": df["id"], "vec": list(vec)})


def test_a_call_gets_its_rows_of_flat_blocks_without_an_assembly_task(deployment, context):
    # an assembly task (a round trip, and a wait behind the CPU workers' work) only pays
    # when the accelerator's worker would otherwise unpickle per-row values: rows of
    # blocks of fixed-width columns go to the call as they are, and it joins them
    from distributed import get_task_stream

    context.target_task_s = 0.0  # one batch a call
    context.max_pool_calls_per_s = None
    cases = [
        # upstream function and batch size, the predictor's batch size, assembly tasks
        ("flat, a call's rows in one block", _flat, 100, 50, 0),
        ("flat, a call's rows across blocks", _flat, 60, 100, 0),
        ("an N-D column of one array, rows across blocks", _with_vectors, 60, 100, 0),
        ("an N-D column of objects, a call's rows in one block", _with_vector_objects, 100, 50, 12),
    ]
    for case, upstream, upstream_rows, actor_rows, assembly_tasks in cases:
        fmt = "pandas" if upstream is _with_vector_objects else "numpy"
        ds = (
            di.range(600, override_num_blocks=6)
            .map_batches(upstream, batch_size=upstream_rows, batch_format=fmt)
            .map_batches(ColumnsSeen, concurrency=1, num_gpus=1, batch_size=actor_rows)
        )
        with get_task_stream(client=deployment) as stream:
            out = ds.to_pandas()
        assert out["x"].tolist() == list(range(600)), case
        assert (out["total"] == out["x"] * 4).all(), case
        # the call sees the same contiguous numpy batches either way
        n = actor_rows
        other = f"y:int64:({n},)" if upstream is _flat else f"vec:int64:({n}, 3)"
        assert set(out["seen"]) == {",".join(sorted([f"x:int64:({n},)", other]))}, case
        assert sum("-batch-" in str(t["key"]) for t in stream.data) == assembly_tasks, case


def test_unknown_address_fails_within_seconds():
    start = time.monotonic()
    with pytest.raises(
        di.DaskInferError, match=r"no Dask scheduler answered at 'tcp://127\.0\.0\.1:9'"
    ):
        di.init("tcp://127.0.0.1:9", timeout_s=2)
    assert time.monotonic() - start < 10


EMBEDDED_SCRIPT = r"""
import sys, numpy as np, daskinfer as di
ds = di.range(1000).map_batches(lambda b: {"id": b["id"] * 2}, batch_size=100)
assert ds.count() == 1000
assert di.range(10).take(2) == [{"id": 0}, {"id": 1}]
client = di.current_client()
from daskinfer.cluster import worker_inventory
workers = worker_inventory(client)
hosts = {client.scheduler.address} | set(workers)
print("HOSTS", sorted(hosts))
print("RESOURCES", sorted({k for w in workers.values() for k in w["resources"]}))
print("DASHBOARD", client.dashboard_link)
import os
print("NICENESS", os.nice(0), sorted(client.run(os.nice, 0).values()))
import psutil
me = psutil.Process()
listen = set()
for proc in [me, *me.children(recursive=True)]:
    conns = getattr(proc, "net_connections", proc.connections)(kind="inet")
    listen |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
print("LISTEN", sorted(listen))
"""


def test_embedded_cluster_starts_on_localhost_and_prints_dashboard_once():
    out = subprocess.run(
        [sys.executable, "-c", EMBEDDED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    hosts = next(line for line in out.stdout.splitlines() if line.startswith("HOSTS"))
    assert "127.0.0.1" in hosts and all("127.0.0.1" in h for h in eval(hosts[6:]))
    assert "RESOURCES ['CPU']" in out.stdout
    # every socket the scheduler, the nannies, the workers and the dashboards listen on
    # (read from the processes themselves, not from what Dask reports) is on loopback
    listening = next(line for line in out.stdout.splitlines() if line.startswith("LISTEN"))
    assert eval(listening[7:]) == ["127.0.0.1"], listening
    assert out.stderr.count("started a local Dask cluster; dashboard at http://127.0.0.1:") == 1
    assert "dask_cuda" not in out.stderr
    # the CPU workers yield to this process and the scheduler (Ray's workers run at 15)
    niceness = next(line for line in out.stdout.splitlines() if line.startswith("NICENESS"))
    client_nice, workers_nice = niceness.split(maxsplit=2)[1:]
    assert int(client_nice) < 15 and eval(workers_nice) == [15] * len(eval(workers_nice))


PRIORITY_SCRIPT = r"""
import os
from distributed import Client, LocalCluster
from daskinfer.cluster import cpu_worker_options
if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, **cpu_worker_options(7)) as cluster, \
            Client(cluster) as client:
        print("BEFORE", os.nice(0), sorted(client.run(os.nice, 0).values()))
        client.restart()  # a worker that restarts gets the niceness again
        print("AFTER", sorted(client.run(os.nice, 0).values()))
"""


def test_worker_priority_preload_on_a_cluster_of_ones_own(tmp_path):
    script = tmp_path / "priority.py"
    script.write_text(PRIORITY_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    client_nice, _, workers = lines["BEFORE"].partition(" ")
    assert eval(workers) == [max(7, int(client_nice))] * 2
    assert eval(lines["AFTER"]) == eval(workers)


def test_worker_priority_reads_its_setting_and_never_raises_priority():
    code = (
        "import os; from daskinfer.worker_priority import lower_priority as lp; "
        "os.environ['DASKINFER_WORKER_NICENESS'] = '5'; print(lp()); print(lp(3)); "
        "os.environ['DASKINFER_WORKER_NICENESS'] = 'high'\n"
        "try:\n    lp()\nexcept ValueError as e:\n    print(e)"
    )
    out = subprocess.run(
        ["nice", "-n", "0", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.splitlines() == [
        "5",
        "5",  # 3 would raise the priority back: a process cannot, so it stays at 5
        "DASKINFER_WORKER_NICENESS='high': use an integer from 0 to 19",
    ]


def test_init_refuses_a_niceness_out_of_range():
    with pytest.raises(di.DaskInferError, match=r"cpu_worker_niceness=25.*0 to 19"):
        di.init(cpu_worker_niceness=25)


def test_unguarded_script_fails_fast_with_the_fix(tmp_path):
    # Dask's worker processes re-import the main module; without a __main__ guard the
    # script would start a cluster inside every worker, forever
    script = tmp_path / "unguarded.py"
    script.write_text("import daskinfer as di\nprint(di.range(10).count())\n")
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode != 0
    assert "daskinfer was asked to start a local cluster while a worker process" in out.stderr
    assert 'if __name__ == "__main__":' in out.stderr


def _make_tls_certificates(directory) -> dict[str, str]:
    """A throwaway CA and one certificate it signed for 127.0.0.1 (openssl CLI)."""
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "node.key", directory / "node.csr", directory / "node.pem"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=daskinfer-test-ca",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca_cert),
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_cert),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    return {"ca": str(ca_cert), "cert": str(cert), "key": str(key)}


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make test certificates"
)
def test_init_passes_tls_security_through_to_a_tls_only_cluster(tmp_path):
    from distributed import LocalCluster
    from distributed.security import Security

    files = _make_tls_certificates(tmp_path)
    security = Security(
        tls_ca_file=files["ca"],
        tls_client_cert=files["cert"],
        tls_client_key=files["key"],
        tls_scheduler_cert=files["cert"],
        tls_scheduler_key=files["key"],
        tls_worker_cert=files["cert"],
        tls_worker_key=files["key"],
        require_encryption=True,
    )
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        protocol="tls",
        host="127.0.0.1",
        security=security,
        dashboard_address=None,
        silence_logs=50,
    ) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        # without certificates: a clear error before any connection is tried
        with pytest.raises(di.DaskInferError, match="is a TLS address: pass its certificates"):
            di.init(address, timeout_s=3)
        # with a certificate the cluster's CA did not sign, the handshake fails
        other = (
            _make_tls_certificates(tmp_path / "other")
            if (tmp_path / "other").mkdir() is None
            else None
        )
        stranger = Security(
            tls_ca_file=other["ca"],
            tls_client_cert=other["cert"],
            tls_client_key=other["key"],
            require_encryption=True,
        )
        with pytest.raises(di.DaskInferError, match="no Dask scheduler answered"):
            di.init(address, security=stranger, timeout_s=3)
        client = di.init(address, security=security, timeout_s=20)
        try:
            ds = di.range(500).map_batches(lambda b: {"id": b["id"] + 1}, batch_size=100)
            assert ds.count() == 500
            assert client.scheduler.address.startswith("tls://")
        finally:
            di.shutdown()
