"""Where a GPU worker's time goes (accelerator machine): one JSON line per measurement.

The same predictor calls as W7's (MiniLM on 512 tokenized texts, ResNet-50 on 128 images
as uint8 numpy, copied in by the call), timed for ``--seconds`` each:
1. in this process, with the machine idle;
2. inside a Dask worker offering ``GPU=1`` (the W7 cluster), with the CPU workers idle;
3. the same while every CPU worker burns a core in pure Python (contention);
4. the same again with the CPU workers' niceness raised to 10.
Measured on an H200 (docs/benchmarks.md): the same rates in all four, so neither the worker
process nor CPU contention slows a predictor's calls; the pipeline's slow-down comes from
work inside the GPU worker's own process.
Also: tokenizing 512 texts and decoding + resizing one image, per call, in an idle process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c


def rates(seconds: float, device: str = "cuda") -> dict:
    import _common
    import numpy as np
    import torch
    import w7_gpu

    out = {"torch_threads": torch.get_num_threads(), "niceness": os.getpriority(os.PRIO_PROCESS, 0)}
    path, weights = _common.minilm_path()
    text = w7_gpu.tokenize({"id": None, "text": _common.sentences(512)}, path, 64)
    text["id"] = np.arange(512)
    imgs = {
        "id": np.arange(128),
        "image": np.random.default_rng(0).integers(0, 256, (128, 224, 224, 3), dtype=np.uint8),
    }
    for name, pred, batch in (
        ("minilm", w7_gpu.MiniLMPredictor(path, weights, device, False), text),
        ("resnet50", w7_gpu.ResNetPredictor(device, False), imgs),
    ):
        pred(batch)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            pred(batch)
            n += 1
        out[f"{name}_calls_per_s"] = round(n / (time.perf_counter() - t), 1)
    return out


def burn(seconds: float) -> int:
    t, x = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        x += 1
    return x


def raise_niceness(value: int) -> int:
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), value)
        except OSError:
            pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def cpu_costs() -> dict:
    import glob

    import _common
    import numpy as np
    import w7_gpu

    from daskinfer.io.files import _read_images

    path, _ = _common.minilm_path()
    batch = {"id": None, "text": np.array(_common.sentences(512), dtype=object)}
    w7_gpu.tokenize(batch, path, 64)
    t = time.perf_counter()
    for _ in range(5):
        w7_gpu.tokenize(batch, path, 64)
    tok = (time.perf_counter() - t) / 5
    files = sorted(glob.glob(os.path.join(w7_gpu.make_images(512, 256), "*.jpg")))[:256]
    t = time.perf_counter()
    _read_images(files, (224, 224), "RGB", False, {})
    dec = (time.perf_counter() - t) / len(files)
    return {"tokenize_512_s": round(tok, 4), "decode_resize_ms": round(dec * 1000, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--workers", type=int, default=13)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    args = p.parse_args()

    def emit(step, **rec):
        print(json.dumps({"step": step, **rec}), flush=True)

    emit("cpu costs, idle process", **cpu_costs())
    emit("this process, idle", **rates(args.seconds, args.device))
    from daskinfer.cluster import worker_inventory

    with c.dask_cluster(cpu_workers=args.workers, threads_per_worker=1, gpu_workers=1) as client:
        info = worker_inventory(client)
        cpu = [a for a, w in info.items() if not w["resources"].get("GPU")]
        emit(
            "gpu worker, cpu idle",
            **client.submit(
                rates, args.seconds, args.device, resources={"GPU": 1}, pure=False
            ).result(),
        )
        for label in (
            "gpu worker, cpu workers burning",
            "gpu worker, cpu workers burning at niceness 10",
        ):
            if "niceness" in label:
                client.run(raise_niceness, 10, workers=cpu)
            burners = [
                client.submit(burn, 4 * args.seconds + 8, workers=[a], pure=False) for a in cpu
            ]
            time.sleep(1.0)
            emit(
                label,
                **client.submit(
                    rates, args.seconds, args.device, resources={"GPU": 1}, pure=False
                ).result(),
            )
            client.gather(burners)


if __name__ == "__main__":
    main()
