"""How much a busy neighbour thread slows torch ops (GIL released and re-taken per op).

python benchmarks/gil_neighbour.py: torch CPU ops/s on a tiny tensor in one thread, alone and
while another thread runs pure Python, np.stack of 128 images or pandas concatenations; at
the default 5 ms switch interval and at 0.5 ms. See docs/benchmarks.md (GPU section).
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import torch

torch.set_num_threads(1)
x = torch.zeros(16)


def ops(seconds=1.0):
    n = 0
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        for _ in range(100):
            x + 1  # the op is the point; its result is dropped
        n += 100
    return n / (time.perf_counter() - t)


stop = threading.Event()


def py_busy():
    while not stop.is_set():
        s = 0
        for i in range(10000):
            s += i


arrs = [np.random.randint(0, 255, (224, 224, 3), dtype=np.uint8) for _ in range(128)]


def np_busy():
    while not stop.is_set():
        np.stack(arrs)


import pandas as pd


def pd_busy():
    while not stop.is_set():
        pd.concat(
            [pd.DataFrame({"a": np.arange(1000), "b": np.arange(1000) * 2.0}) for _ in range(20)]
        )


for si in (0.005, 0.0005):
    sys.setswitchinterval(si)
    res = {"alone": ops()}
    for name, fn in (("python", py_busy), ("np.stack", np_busy), ("pandas", pd_busy)):
        stop.clear()
        th = threading.Thread(target=fn)
        th.start()
        time.sleep(0.1)
        res[name] = ops()
        stop.set()
        th.join()
    print(si, {k: f"{v:,.0f}" for k, v in res.items()})
