"""The worker warm-up plugin's priority change, in a child process (it cannot be undone)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os, threading, types
import daskinfer.cluster as cluster

started = threading.Event()
stop = threading.Event()
threading.Thread(target=lambda: (started.set(), stop.wait()), daemon=True).start()
started.wait()
worker = types.SimpleNamespace(address="tcp://x", state=types.SimpleNamespace(total_resources={{"CPU": 1}}))
cluster.detect_gpus = lambda: {gpus}
cluster.WarmupPlugin()._yield_to_gpus(worker)
print(sorted({{os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}}))
stop.set()
"""


def _priorities(gpus: int) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(gpus=gpus)], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_cpu_worker_beside_a_gpu_lowers_the_priority_of_all_its_threads():
    assert _priorities(gpus=1) == "[10]"


def test_cpu_worker_on_a_host_without_gpus_keeps_its_priority():
    assert _priorities(gpus=0) == "[0]"
