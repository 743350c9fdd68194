"""Step time of each multi-task architecture against hard parameter sharing on the same encoder, and the
data-loading throughput of NYUv2 (.npy layout, 288x384) so the loader is known not to starve a GPU run.

Two families, each timed in the same process on the same batch with the same optimizer (Adam), one training
step = forward, task losses, backward of their sum, optimizer step; the architectures alternate for
``--repeats`` rounds and the median per-step time of each is compared with hard sharing:

* dense (NYUv2-like: segmentation 13 classes, depth, normals): MTAN vs hard sharing on a SegNet;
* vector (Multi-MNIST-like, two 10-class tasks, 36x36): MMoE, CGC, PLE, cross-stitch vs hard sharing, all built
  on the same MultiLeNet layers (experts / columns are copies of it).

Loading: a temporary NYUv2 copy of ``--samples`` random 288x384 samples is written in the real layout and read
through :class:`~lightning_mtl.datamodules.nyuv2.NYUv2` (training split, with augmentation) with 0 and 2
workers; samples per second are printed.

    python benchmarks/architectures.py            # full run (288x384 dense inputs)
    python benchmarks/architectures.py --quick    # about a minute on a 2-core CPU (smaller dense inputs)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn

sys.path.append(os.path.dirname(__file__))  # appended: a script here must not shadow a module
from _timing import emit, median, now

from lightning_mtl import MultiTaskModule
from lightning_mtl.architectures.cross_stitch import CrossStitch
from lightning_mtl.architectures.hps import HardParameterSharing
from lightning_mtl.architectures.mmoe import MMoE
from lightning_mtl.architectures.mtan import MTAN
from lightning_mtl.architectures.ple import CGC, PLE
from lightning_mtl.architectures.segnet import SegNet
from lightning_mtl.datamodules.nyuv2 import NYUv2
from lightning_mtl.multitask.dense import DepthTask, SegmentationTask, SurfaceNormalTask
from lightning_mtl.multitask.tasks import ClassificationTask


def lenet_stages() -> nn.Sequential:
    """MultiLeNet (Sener & Koltun) cut into three stages, for cross-stitch; 36x36 inputs."""
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 10, 5), nn.MaxPool2d(2), nn.ReLU()),
        nn.Sequential(nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten()),
        nn.Sequential(nn.Linear(720, 50), nn.ReLU()),
    )
    net.out_features = 50
    return net


def time_steps(model: MultiTaskModule, x: torch.Tensor, y: dict, steps: int, warmup: int, device) -> float:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    stamps = []
    for _ in range(steps):
        losses, _ = model.task_losses(model(x), y, "train")
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        stamps.append(now(device))
    timed = stamps[warmup:]
    return (timed[-1] - timed[0]) / (len(timed) - 1)


def compare(builders: dict, x, y, args, device) -> dict[str, float]:
    """Median seconds per step of every architecture (alternating rounds)."""
    models = {name: build().to(device) for name, build in builders.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(time_steps(model, x, y, args.steps, args.warmup, device))
    return {name: median(values) for name, values in times.items()}


def dense_family(args, device) -> dict[str, float]:
    h, w = args.dense_size
    channels = tuple(args.segnet_channels)
    tasks = lambda: {"segmentation": SegmentationTask(13), "depth": DepthTask(), "normal": SurfaceNormalTask()}  # noqa: E731
    builders = {
        "hps_segnet": lambda: MultiTaskModule(HardParameterSharing(SegNet(channels=channels)), tasks()),
        "mtan_segnet": lambda: MultiTaskModule(MTAN(SegNet(channels=channels)), tasks()),
    }
    g = torch.Generator().manual_seed(0)
    b = args.dense_batch
    x = torch.rand(b, 3, h, w, generator=g, device="cpu").to(device)
    y = {
        "segmentation": torch.randint(-1, 13, (b, h, w), generator=g).to(device),
        "depth": torch.rand(b, 1, h, w, generator=g).to(device) + 0.5,
        "normal": torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1).to(device),
    }
    return compare(builders, x, y, args, device)


def vector_family(args, device) -> dict[str, float]:
    torch.manual_seed(0)
    tasks = lambda: {"left": ClassificationTask(10), "right": ClassificationTask(10)}  # noqa: E731
    n_in = 36 * 36
    builders = {
        "hps_lenet": lambda: MultiTaskModule(HardParameterSharing(lenet_stages()), tasks()),
        "mmoe_4experts": lambda: MultiTaskModule(MMoE(lenet_stages(), 4, n_in), tasks()),
        "cgc_2+2experts": lambda: MultiTaskModule(CGC(lenet_stages(), n_in, num_specific=2, num_shared=2), tasks()),
        "ple_2levels": lambda: MultiTaskModule(PLE(lenet_stages(), n_in, ["left", "right"], num_levels=2), tasks()),
        "cross_stitch": lambda: MultiTaskModule(CrossStitch(lenet_stages(), ["left", "right"]), tasks()),
    }
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.vector_batch, 1, 36, 36, generator=g).to(device)
    y = {t: torch.randint(0, 10, (args.vector_batch,), generator=g).to(device) for t in ("left", "right")}
    return compare(builders, x, y, args, device)


def loading(args) -> dict[str, float]:
    """Samples per second of the NYUv2 training loader (augmented) on a 288x384 copy in the real layout."""
    rng = np.random.default_rng(0)
    out = {}
    with tempfile.TemporaryDirectory() as root:
        for split in ("train", "val"):
            for sub in ("image", "label", "depth", "normal"):
                os.makedirs(os.path.join(root, split, sub))
            for i in range(args.samples if split == "train" else 1):
                arrays = {
                    "image": rng.random((288, 384, 3), dtype=np.float32),
                    "label": rng.integers(-1, 13, (288, 384)).astype(np.float32),
                    "depth": rng.random((288, 384, 1), dtype=np.float32),
                    "normal": rng.random((288, 384, 3), dtype=np.float32),
                }
                for sub, array in arrays.items():
                    np.save(os.path.join(root, split, sub, f"{i}.npy"), array)
        for workers in (0, 2):
            dm = NYUv2(root, batch_size=8, num_workers=workers)
            dm.setup("fit")
            rates = []
            for _ in range(2 if args.quick else 3):
                loader = dm.train_dataloader()
                start, seen = time.perf_counter(), 0
                for x, _ in loader:
                    seen += len(x)
                rates.append(seen / (time.perf_counter() - start))
            out[f"workers_{workers}"] = median(rates)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (about a minute on a 2-core CPU)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-size", type=int, nargs=2, default=[288, 384])
    parser.add_argument("--dense-batch", type=int, default=2)
    parser.add_argument("--segnet-channels", type=int, nargs=5, default=[64, 128, 256, 512, 512])
    parser.add_argument("--vector-batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=64, help="NYUv2 samples written for the loading test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats, args.samples, args.vector_batch = 4, 1, 2, 16, 64
        if args.device == "cpu":  # a full SegNet step at 288x384 takes seconds on a CPU
            args.dense_size, args.segnet_channels = [64, 96], [8, 16, 32, 32, 32]
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)

    dense = dense_family(args, device)
    vector = vector_family(args, device)
    rates = loading(args)
    print(f"device {device.type}, torch threads {torch.get_num_threads()}, {args.steps} steps ({args.warmup} warm-up), "
          f"{args.repeats} rounds")  # fmt: skip
    print(f"dense: batch {args.dense_batch}, {args.dense_size[0]}x{args.dense_size[1]}, SegNet {args.segnet_channels}")
    for name, seconds in dense.items():
        print(f"  {name:16s} {1000 * seconds:9.2f} ms/step  {seconds / dense['hps_segnet']:6.2f}x hard sharing")
    print(f"vector: batch {args.vector_batch}, 36x36, MultiLeNet layers")
    for name, seconds in vector.items():
        print(f"  {name:16s} {1000 * seconds:9.2f} ms/step  {seconds / vector['hps_lenet']:6.2f}x hard sharing")
    print("NYUv2 loading (288x384, augmented, batch 8): "
          + ", ".join(f"{k.replace('_', ' ')}: {v:.1f} samples/s" for k, v in rates.items()))  # fmt: skip
    figures = {"benchmark": "architectures", "device": device.type, "dense_size": args.dense_size,
               "segnet_channels": args.segnet_channels,
               "nyuv2_samples_per_s": {k: round(v, 1) for k, v in rates.items()}}  # fmt: skip
    figures.update({f"{k}_ms": round(1000 * v, 3) for k, v in {**dense, **vector}.items()})
    figures.update({f"{k}_ratio": round(v / dense["hps_segnet"], 3) for k, v in dense.items() if k != "hps_segnet"})
    figures.update({f"{k}_ratio": round(v / vector["hps_lenet"], 3) for k, v in vector.items() if k != "hps_lenet"})
    emit(figures)


if __name__ == "__main__":
    main()
