"""Cost of the controllable multi-task network: a sandwich training step against a plain step of the widest
network, and inference at the narrowest width against the widest.

Training: ControllableMultiTaskModule (widest + narrowest + 2 random configurations, CI-KD) against a
MultiTaskModule with the plain DigitsCNN and plain two-layer heads of the widest sizes; same batches
(materialized once), same optimizer, same process, under the Trainer, sides alternating for ``--repeats``
rounds, a side's time the median step over rounds. Inference: the same trained-width network in eval mode,
forward on one batch at the narrowest and at the widest configuration, median of ``--calls`` calls.
Targets (issue 21): sandwich step <= 4.2x the plain step; narrowest inference >= 3x faster than the widest.

    python benchmarks/controllable.py            # full run
    python benchmarks/controllable.py --quick    # under a minute on a 2-core CPU
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import emit, median, now, per_step, timed_fit

from lightning_mtl import ClassificationTask, DigitsCNN, MultiDigits, MultiTaskModule
from lightning_mtl.controllable import ControllableMultiTaskModule, SlimmableDigitsCNN, configuration_flops


def _tasks(hidden: int | None, features: int) -> dict[str, ClassificationTask]:
    def head() -> nn.Module | None:
        return None if hidden is None else nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    return {"left": ClassificationTask(10, head=head()), "right": ClassificationTask(10, head=head())}


def _inference_ms(module: ControllableMultiTaskModule, config: dict[str, float], x: torch.Tensor, calls: int) -> float:
    module.set_configuration(config)
    times = []
    with torch.no_grad():
        for _ in range(calls + 3):
            start = now(x.device)
            module(x)
            times.append(now(x.device) - start)
    return 1000 * median(times[3:])  # the first calls warm the allocator up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (under a minute on a 2-core CPU)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--calls", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (12 if args.quick else 40)
    repeats = args.repeats or (2 if args.quick else 3)
    calls = args.calls or (10 if args.quick else 40)
    warmup = 3
    warnings.filterwarnings("ignore")
    device = torch.device("cpu")

    data = MultiDigits(num_train=args.batch_size * steps, num_val=64, num_test=64, batch_size=args.batch_size, seed=0)
    data.setup("fit")
    batches = list(data.train_dataloader())[:steps]
    hidden, features = 64, 128
    torch.manual_seed(0)
    plain = MultiTaskModule(encoder=DigitsCNN(out_features=features), tasks=_tasks(hidden, features),
                            optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))  # fmt: skip
    torch.manual_seed(0)
    slim = ControllableMultiTaskModule(encoder=SlimmableDigitsCNN(out_features=features), tasks=_tasks(None, features),
                                       decoder_hidden=hidden, num_random=2,
                                       optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))  # fmt: skip
    ours, ref = [], []
    for _ in range(repeats):  # alternate, so drifts of the machine hit both sides alike
        ref.append(per_step(timed_fit(copy.deepcopy(plain), batches, device, precision="32-true"), warmup))
        ours.append(per_step(timed_fit(copy.deepcopy(slim), batches, device, precision="32-true"), warmup))
    plain_ms, sandwich_ms = 1000 * median(ref), 1000 * median(ours)
    train_ratio = sandwich_ms / plain_ms

    slim.eval()
    x = batches[0][0]
    widest, narrowest = slim.sampler.widest(), slim.sampler.narrowest()
    wide_ms, narrow_ms = [], []
    for _ in range(repeats):
        wide_ms.append(_inference_ms(slim, widest, x, calls))
        narrow_ms.append(_inference_ms(slim, narrowest, x, calls))
    wide, narrow = median(wide_ms), median(narrow_ms)
    speedup = wide / narrow
    flops_ratio = configuration_flops(slim, widest, x)["total"] / configuration_flops(slim, narrowest, x)["total"]

    print(f"device {device.type}, batch {args.batch_size}, {steps} steps ({warmup} warm-up), {repeats} rounds, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"plain widest step     {plain_ms:8.2f} ms/step")
    print(f"sandwich step (1+1+2) {sandwich_ms:8.2f} ms/step")
    print(f"training ratio        {train_ratio:8.3f}  (target <= 4.2)")
    print(f"inference widest      {wide:8.3f} ms/batch")
    print(f"inference narrowest   {narrow:8.3f} ms/batch")
    print(f"inference speed-up    {speedup:8.3f}  (target >= 3; FLOPs ratio {flops_ratio:.1f})")
    targets = {"cpu_sandwich_step_le_4.2x": "met" if train_ratio <= 4.2 else "missed",
               "cpu_narrowest_inference_ge_3x": "met" if speedup >= 3 else "missed"}  # fmt: skip
    print(f"targets: {targets}")
    emit({"benchmark": "controllable", "device": device.type, "batch_size": args.batch_size, "steps": steps,
          "plain_step_ms": round(plain_ms, 3), "sandwich_step_ms": round(sandwich_ms, 3),
          "train_ratio": round(train_ratio, 4), "widest_inference_ms": round(wide, 4),
          "narrowest_inference_ms": round(narrow, 4), "inference_speedup": round(speedup, 4),
          "flops_ratio": round(flops_ratio, 3), "targets": targets})  # fmt: skip


if __name__ == "__main__":
    main()
