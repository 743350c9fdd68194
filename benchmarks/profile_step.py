"""Where a multi-task step's time goes: ours against its reference, operator by operator (torch.profiler).

The issue's CPU targets ask that, where ours is not yet faster than its anchor, a profile shows where the
remaining time goes. This script builds the sides of ``benchmarks/aggregation.py`` (same model, batch and
initial weights), times them step by step in turns (median), then profiles ``--steps`` steps of each side
and prints, per operator, the self CPU time of both sides and their difference, largest first. Operators
are also grouped into a few families (convolution, batch norm, matrix products, element-wise and copies,
autograd engine bookkeeping, linear algebra of the solver) so that the gap reads at a glance.

* ``--mode parameter`` (default): ours at the parameter level against LibMTL's loop of m backward passes;
* ``--mode representation``: ours at the representation level against the plain step (one backward of
  the summed losses), the target of the issue being <= 1.5x at m = 10;
* ``--mode gramian``: ours at the Gramian level against the loop.

    python benchmarks/profile_step.py --quick
    python benchmarks/profile_step.py --encoder digits --tasks 10 --method mgda --mode representation

One thread (``--threads``, default 1) keeps a shared machine's scheduling out of the per-operator figures;
read the ratio, not the absolute times, and run it when the machine is quiet.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import warnings
from collections import defaultdict

import torch
from _timing import emit, median, now
from aggregation import NUM_CLASSES, LibMTLLoop, Ours, Plain, Side, build_encoder, make_batch, task_names
from torch.profiler import ProfilerActivity, profile

from lightning_mtl import ClassificationTask, MultiTaskModule
from lightning_mtl.aggregators import create_aggregator

# operator name fragments -> family, first match wins (order matters: "convolution_backward" before "conv")
FAMILIES = [
    ("convolution", ("convolution", "conv2d", "mkldnn_conv")),
    ("batch norm", ("batch_norm",)),
    ("pooling", ("pool",)),
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::dot")),
    ("solver linear algebra", ("linalg", "cholesky", "lu_", "solve", "eigh", "qr")),
    ("zeroing and copies", ("fill_", "zero_", "copy_", "aten::cat", "aten::stack", "clone", "aten::zeros")),
    ("autograd bookkeeping", ("autograd::", "AccumulateGrad", "Backward0", "detach")),
    ("views and allocation", ("view", "slice", "select", "as_strided", "reshape", "empty", "aten::t", "expand")),
]


def family(name: str) -> str:
    for label, fragments in FAMILIES:
        if any(fragment in name for fragment in fragments):
            return label
    return "other element-wise"


def self_times(sides: dict[str, Side], steps: int) -> dict[str, dict[str, float]]:
    """Self CPU time per operator (ms per step) of each side over ``steps`` profiled steps, one step of each
    side in turn, so that a shared machine's load changes hit both sides alike."""
    totals: dict[str, dict[str, float]] = {name: defaultdict(float) for name in sides}
    for i in range(steps):
        for name in list(sides)[i % 2 :] + list(sides)[: i % 2]:
            sides[name].zero()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                sides[name].step()
            for event in prof.key_averages():
                totals[name][event.key] += event.self_cpu_time_total / 1e3 / steps
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="DigitsCNN, m = 10, PCGrad, parameter level")
    parser.add_argument("--encoder", default="digits", choices=["digits", "mlp", "resnet18"])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--method", default="pcgrad")
    parser.add_argument("--mode", default="parameter", choices=["parameter", "representation", "gramian"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timed", type=int, default=30, help="timed steps per side (in turns)")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps per side")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    args = parser.parse_args()
    if args.quick:
        args.timed, args.steps = 20, 10
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device, amp = torch.device("cpu"), contextlib.nullcontext

    torch.manual_seed(0)
    encoder, shape = build_encoder(args.encoder)
    tasks = {name: ClassificationTask(NUM_CLASSES) for name in task_names(args.tasks)}
    template = MultiTaskModule(encoder=encoder, tasks=tasks)
    batch = make_batch(args.tasks, shape, args.batch_size, device)
    module = MultiTaskModule(
        encoder=copy.deepcopy(template.encoder), tasks=tasks, aggregator=args.method, gradient_mode=args.mode
    )
    module.heads = copy.deepcopy(template.heads)
    ours = Ours(module.train(), batch, amp)
    reference_encoder, reference_heads = copy.deepcopy(template.encoder).train(), copy.deepcopy(template.heads).train()
    if args.mode == "representation":
        ref_name, reference = "plain", Plain(reference_encoder, reference_heads, batch, amp)
    else:
        aggregator = create_aggregator(args.method)
        ref_name, reference = "loop", LibMTLLoop(reference_encoder, reference_heads, batch, amp, aggregator, False)
    sides = {"ours": ours, ref_name: reference}

    for side in sides.values():  # warm-up: allocator, oneDNN primitives
        for _ in range(3):
            side.zero()
            side.step()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(args.timed):  # in turns, the order rotating, so that a drift hits both sides alike
        for name in list(sides)[i % 2 :] + list(sides)[: i % 2]:
            sides[name].zero()
            start = now(device)
            sides[name].step()
            times[name].append(now(device) - start)
    ms = {name: 1e3 * median(values) for name, values in times.items()}
    ratio = ms["ours"] / ms[ref_name]

    profiles = self_times(sides, args.steps)
    totals = {name: sum(p.values()) for name, p in profiles.items()}
    by_family: dict[str, dict[str, float]] = {name: defaultdict(float) for name in sides}
    for name, p in profiles.items():
        for op, t in p.items():
            by_family[name][family(op)] += t
    families = sorted(set(by_family["ours"]) | set(by_family[ref_name]), key=lambda f: -by_family["ours"][f])
    ops = set(profiles["ours"]) | set(profiles[ref_name])
    diffs = sorted(
        ((op, profiles["ours"].get(op, 0.0), profiles[ref_name].get(op, 0.0)) for op in ops),
        key=lambda row: -abs(row[1] - row[2]),
    )

    print(f"{args.encoder}, m = {args.tasks}, {args.method}, {args.mode} level vs {ref_name}, batch "
          f"{args.batch_size}, {args.threads} thread(s), torch {torch.__version__}")  # fmt: skip
    print(f"median step: ours {ms['ours']:.2f} ms, {ref_name} {ms[ref_name]:.2f} ms, ratio {ratio:.3f}")
    print(f"profiled self CPU per step: ours {totals['ours']:.2f} ms, {ref_name} {totals[ref_name]:.2f} ms")
    print(f"\n{'family':<24}{'ours ms':>10}{ref_name + ' ms':>10}{'diff':>9}{'ours %':>8}")
    for f in families:
        a, b = by_family["ours"][f], by_family[ref_name][f]
        print(f"{f:<24}{a:>10.2f}{b:>10.2f}{a - b:>+9.2f}{100 * a / totals['ours']:>7.1f}%")
    print(f"\n{'operator (largest differences)':<48}{'ours ms':>10}{ref_name + ' ms':>10}{'diff':>9}")
    for op, a, b in diffs[: args.top]:
        print(f"{op[:47]:<48}{a:>10.3f}{b:>10.3f}{a - b:>+9.3f}")
    emit({
        "benchmark": "profile_step", "encoder": args.encoder, "m": args.tasks, "method": args.method,
        "mode": args.mode, "reference": ref_name, "ours_ms": round(ms["ours"], 3),
        "reference_ms": round(ms[ref_name], 3), "ratio": round(ratio, 4),
        "families_ms": {f: [round(by_family["ours"][f], 3), round(by_family[ref_name][f], 3)] for f in families},
        "top_differences_ms": [[op, round(a, 3), round(b, 3)] for op, a, b in diffs[: args.top]],
    })  # fmt: skip


if __name__ == "__main__":
    main()
