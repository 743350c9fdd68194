"""Mixed Barlow Twins step against the plain Barlow Twins step, and the kNN monitor's cost per validation epoch.

1. Training step: the two modules' own loss code (``compute_loss``), backward and an Adam step; same backbone
   (ResNet-18 with the CIFAR stem), same initial weights, same batches of two views, same process. The two sides
   alternate for ``--repeats`` rounds; the median per-step time of each is compared. A Mixed Barlow Twins step
   runs the backbone on three inputs instead of two, so the floor of the ratio is about 1.5 x the share of the
   step spent in forward / backward passes. Target: ratio <= 1.5.
2. kNN monitor: the :class:`~lightning_mtl.ssl.knn.KNNMonitor` callback itself, fed the features that a
   training epoch of ``--bank`` samples hands it (CIFAR-10 with 5,000 images held out: 45,000) and a validation
   epoch of ``--val`` samples; the time of collecting the bank during the epoch, building (gathering and
   normalizing) it, and voting for every validation sample, against the measured time of a training epoch.

    python benchmarks/barlow_twins.py            # ResNet-18, batch 256, 32x32 (a GPU run: cuda when there is one)
    python benchmarks/barlow_twins.py --quick    # about a minute on a 2-core CPU (narrow ResNet-18, batch 64)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(__file__))

import torch
from _timing import emit, median, now

from lightning_mtl.architectures.resnet_cifar import ResNet18
from lightning_mtl.ssl import BarlowTwins, MixedBarlowTwins
from lightning_mtl.ssl.knn import KNNMonitor


def step_times(module, batches, device, warmup: int, dtype: torch.dtype | None) -> float:
    """Seconds per training step (median over the steps after ``warmup``)."""
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, weight_decay=1e-6)
    module.train()
    stamps = [now(device)]
    for i, views in enumerate(batches):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            terms, _ = module.compute_loss(views, i)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        stamps.append(now(device))
    gaps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]
    return median(gaps)


def knn_epoch_cost(bank: int, val: int, dim: int, batch: int, num_classes: int, device) -> dict[str, float]:
    """Seconds the KNNMonitor spends in one training epoch (collecting) and one validation epoch."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    train_features = [torch.randn(batch, dim, generator=generator).to(device) for _ in range(bank // batch)]
    train_labels = [torch.randint(0, num_classes, (batch,), generator=generator).to(device) for _ in train_features]
    val_features = [torch.randn(batch, dim, generator=generator).to(device) for _ in range(max(1, val // batch))]
    val_labels = [torch.randint(0, num_classes, (batch,), generator=generator).to(device) for _ in val_features]
    dummy = torch.zeros(batch, 1, 1, 1, device=device)
    trainer = SimpleNamespace(current_epoch=0, sanity_checking=False)
    module = SimpleNamespace(device=device, log=lambda *a, **k: None, metric_directions={})
    monitor = KNNMonitor(k=200, temperature=0.5, num_classes=num_classes)

    start = now(device)
    monitor.on_train_epoch_start(trainer, module)
    for f, y in zip(train_features, train_labels):
        monitor.on_train_batch_end(trainer, module, {"features": f}, ((dummy, dummy), y), 0)
    collected = now(device)
    monitor.on_validation_epoch_start(trainer, module)
    built = now(device)
    for f, y in zip(val_features, val_labels):
        monitor.on_validation_batch_end(trainer, module, {"features": f}, (dummy, y), 0)
    monitor.on_validation_epoch_end(trainer, module)
    done = now(device)
    return {"collect": collected - start, "build": built - collected, "vote": done - built}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (about a minute on a 2-core CPU)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=64, help="channels of ResNet-18's first stage (64 = standard)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--embedding-dim", type=int, default=1024)
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--bank", type=int, default=45_000, help="kNN bank: labelled training samples")
    parser.add_argument("--val", type=int, default=5_000, help="kNN queries: validation samples")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 8, 2, 3
        args.batch_size, args.width, args.embedding_dim = 64, 16, 256
        args.bank, args.val = 10_000, 2_000
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    batches = [[torch.randn(shape, generator=generator).to(device) for _ in range(2)] for _ in range(args.steps)]
    torch.manual_seed(0)
    plain = BarlowTwins(ResNet18(width=args.width), embedding_dim=args.embedding_dim).to(device)
    mixed = MixedBarlowTwins(ResNet18(width=args.width), embedding_dim=args.embedding_dim, lambda_reg=4.0).to(device)
    mixed.load_state_dict(plain.state_dict())

    plain_s, mixed_s = [], []
    for _ in range(args.repeats):  # alternate, so drifts of the machine hit both sides alike
        plain_s.append(step_times(copy.deepcopy(plain), batches, device, args.warmup, dtype))
        mixed_s.append(step_times(copy.deepcopy(mixed), batches, device, args.warmup, dtype))
    plain_ms, mixed_ms = 1000 * median(plain_s), 1000 * median(mixed_s)
    ratio = mixed_ms / plain_ms

    knn = [knn_epoch_cost(args.bank, args.val, plain.feature_dim, args.batch_size, args.num_classes, device)
           for _ in range(args.repeats)]  # fmt: skip
    knn_ms = {key: 1000 * median([k[key] for k in knn]) for key in knn[0]}
    train_epoch_ms = mixed_ms * (args.bank // args.batch_size)
    knn_total_ms = sum(knn_ms.values())

    name = "cuda" if device.type == "cuda" else "cpu"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {name} ({gpu}), ResNet-18 (CIFAR stem, width {args.width}), batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}, embedding {args.embedding_dim}, precision {args.precision}, "
          f"{args.steps} steps ({args.warmup} warm-up) x {args.repeats} rounds")  # fmt: skip
    print(f"Barlow Twins step        {plain_ms:9.2f} ms")
    print(f"Mixed Barlow Twins step  {mixed_ms:9.2f} ms")
    print(f"ratio                    {ratio:9.3f}  (target <= 1.5; three backbone passes instead of two)")
    print(f"kNN monitor, bank {args.bank} x {plain.feature_dim}, {args.val} queries, k=200:")
    print(f"  collect during the training epoch {knn_ms['collect']:9.2f} ms")
    print(f"  build the bank                    {knn_ms['build']:9.2f} ms")
    print(f"  vote for the validation split     {knn_ms['vote']:9.2f} ms")
    print(f"  total per validation epoch        {knn_total_ms:9.2f} ms = {100 * knn_total_ms / train_epoch_ms:.2f} % "
          f"of a Mixed Barlow Twins training epoch over the bank ({train_epoch_ms / 1000:.1f} s)")  # fmt: skip
    emit({"benchmark": "ssl", "device": name, "device_name": gpu, "batch_size": args.batch_size, "width": args.width,
          "precision": args.precision, "barlow_twins_ms": round(plain_ms, 3), "mixed_barlow_twins_ms": round(mixed_ms, 3),
          "ratio": round(ratio, 4), "target": 1.5, "knn_bank": args.bank, "knn_val": args.val,
          "knn_collect_ms": round(knn_ms["collect"], 3), "knn_build_ms": round(knn_ms["build"], 3),
          "knn_vote_ms": round(knn_ms["vote"], 3), "knn_total_ms": round(knn_total_ms, 3),
          "knn_share_of_train_epoch": round(knn_total_ms / train_epoch_ms, 5)})  # fmt: skip


if __name__ == "__main__":
    main()
