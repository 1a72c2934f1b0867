"""On a machine with a GPU: the embedded cluster is dask-cuda's, plus CPU-only workers.

Run with ``pytest -m gpu --rungpu tests/gpu`` on the accelerator machine; skipped elsewhere.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

SCRIPT = r"""
import numpy as np, daskinfer as di
from daskinfer.cluster import worker_inventory
from distributed import get_worker

def tag_cpu(batch):
    return {**batch, "cpu_worker": np.full(len(batch["id"]), str(get_worker().name), dtype=object)}

class OnGpu:
    def __init__(self):
        import torch
        assert torch.cuda.is_available(), "the predictor's worker sees no GPU"
        self.device = torch.device("cuda")
        self.worker = str(get_worker().name)

    def __call__(self, batch):
        import torch
        x = torch.as_tensor(batch["id"], device=self.device) * 2
        return {**batch, "doubled": x.cpu().numpy(), "gpu_worker": np.full(len(x), self.worker, dtype=object)}

if __name__ == "__main__":
    out = (
        di.range(4096)
        .map_batches(tag_cpu, batch_size=256)
        .map_batches(OnGpu, concurrency=1, num_gpus=1, batch_size=512)
        .to_pandas()
    )
    assert out["doubled"].tolist() == [2 * i for i in range(4096)]
    info = worker_inventory(di.current_client()).values()
    gpu_names = {str(w["name"]) for w in info if w["resources"].get("GPU")}
    assert gpu_names, "the embedded cluster has no GPU worker"
    assert set(out["gpu_worker"]) <= gpu_names
    assert not (set(out["cpu_worker"]) & gpu_names), "a CPU stage ran on a GPU worker"
    print("OK", sorted(gpu_names))
"""


def test_embedded_cluster_uses_dask_cuda_and_keeps_cpu_stages_off_the_gpu(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "OK" in out.stdout
