"""Cost of an aTLAS step and of a grafting mask step against a plain fine-tuning step of the same network.

Same encoder (DigitsCNN) and head, same batch, same process. The plain step trains every weight with Adam
(train mode); the aTLAS step rebuilds the weights from theta_0 and T = 8 task vectors at ``block``
granularity (T x P multiply-adds) and trains the coefficients with AdamW; the grafting step rebuilds
``theta_0 + gamma * tau`` from the relaxed mask and trains the mask logits with SGD. Each side runs
``--steps`` steps (the first ``--warmup`` untimed) in a loop without the Trainer (Lightning's own cost is
the same for all three and measured by benchmarks/overhead.py); the sides alternate for ``--repeats``
rounds; a side's time is the median step, then the median over rounds. Targets: aTLAS <= 1.3x, grafting
<= 1.5x the plain step; the closing JSON line says "met" or "missed" for each.

    python benchmarks/merging_learned.py            # full run
    python benchmarks/merging_learned.py --quick    # well under a minute on a 2-core CPU
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import emit, median, now, per_step

from lightning_mtl.architectures import DigitsCNN
from lightning_mtl.merging import ATLAS, Grafting


def plain_steps(encoder: nn.Module, head: nn.Module, x, y, steps: int, device) -> list[float]:
    params = list(encoder.parameters()) + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    encoder.train()
    optimizer = torch.optim.Adam(params, lr=1e-3)
    stamps = []
    for _ in range(steps):
        loss = F.cross_entropy(head(encoder(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append(now(device))
    return stamps


def module_steps(module, params, optimizer, batch, steps: int, device) -> list[float]:
    stamps = []
    for i in range(steps):
        loss = module.training_step(batch, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append(now(device))
    return stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (well under a minute on a 2-core CPU)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 20, 3, 3
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)

    torch.manual_seed(0)
    encoder, head = DigitsCNN(in_channels=1, out_features=128), nn.Linear(128, 10)
    generator = torch.Generator().manual_seed(1)
    floating = {k: v for k, v in encoder.state_dict().items() if v.is_floating_point()}
    vectors = {
        f"t{i}": {k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in floating.items()}
        for i in range(args.tasks)
    }
    x = torch.randn(args.batch_size, 1, 8, 8, generator=generator).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)

    atlas = ATLAS(
        copy.deepcopy(encoder), vectors=vectors, heads={"t0": copy.deepcopy(head)}, targets=["t0"], granularity="block"
    ).to(device)
    atlas.log = lambda *a, **k: None  # type: ignore[method-assign]  # no Trainer: logging is a no-op here
    atlas_optimizer = torch.optim.AdamW([atlas.coefficients], lr=1e-3, weight_decay=0.1)
    expert = {k: v + vectors["t0"].get(k, 0) for k, v in encoder.state_dict().items()}
    graft = Grafting(copy.deepcopy(encoder), expert=expert, task="t0", head=copy.deepcopy(head), sparsity=0.01).to(
        device
    )
    graft.log = lambda *a, **k: None  # type: ignore[method-assign]
    graft_optimizer = torch.optim.SGD(list(graft.logits), lr=1e7)
    batch = (x, {"t0": y})

    plain, ours_atlas, ours_graft = [], [], []
    for _ in range(args.repeats):  # alternate, so drifts of the machine hit all sides alike
        enc, hd = copy.deepcopy(encoder).to(device), copy.deepcopy(head).to(device)
        plain.append(per_step(plain_steps(enc, hd, x, y, args.steps, device), args.warmup))
        ours_atlas.append(per_step(module_steps(atlas, None, atlas_optimizer, batch, args.steps, device), args.warmup))
        ours_graft.append(per_step(module_steps(graft, None, graft_optimizer, batch, args.steps, device), args.warmup))
    plain_ms, atlas_ms, graft_ms = 1000 * median(plain), 1000 * median(ours_atlas), 1000 * median(ours_graft)
    params = sum(v.numel() for v in floating.values())
    print(f"device {device.type}, DigitsCNN ({params} floating entries), batch {args.batch_size}, T={args.tasks}, "
          f"{args.steps} steps ({args.warmup} warm-up), {args.repeats} rounds, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"plain fine-tuning step  {plain_ms:8.2f} ms")
    print(f"aTLAS step (block, T={args.tasks}) {atlas_ms:8.2f} ms  ratio {atlas_ms / plain_ms:.3f} (target <= 1.3)")
    print(f"grafting mask step      {graft_ms:8.2f} ms  ratio {graft_ms / plain_ms:.3f} (target <= 1.5)")
    targets = {
        f"{device.type}_atlas_block_le_1.3": "met" if atlas_ms / plain_ms <= 1.3 else "missed",
        f"{device.type}_grafting_le_1.5": "met" if graft_ms / plain_ms <= 1.5 else "missed",
    }
    print(f"targets: {targets}")
    emit({"benchmark": "merging_learned", "device": device.type, "batch_size": args.batch_size, "tasks": args.tasks,
          "steps": args.steps, "plain_ms": round(plain_ms, 3), "atlas_ms": round(atlas_ms, 3),
          "grafting_ms": round(graft_ms, 3), "atlas_ratio": round(atlas_ms / plain_ms, 4),
          "grafting_ratio": round(graft_ms / plain_ms, 4), "targets": targets})  # fmt: skip


if __name__ == "__main__":
    main()
