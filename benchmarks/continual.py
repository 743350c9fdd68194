"""Online step throughput of the prompt methods against experience replay on the same ViT, and the
vectorized per-sample head gradient of MVP's focal loss against a Python loop over the samples.

Same process, same timm ViT (same seed, so the same initial weights), same stream batches (random
images with Si-Blurry ``StreamBatch`` labels, materialized once), same Adam (lr 5e-3), all under the
Lightning Trainer at the chosen precision:

* ``er``: full fine-tuning of the ViT and a linear head (the ER / fine-tuning baseline; the replayed
  samples are part of the batch, so the step is the same with or without a memory);
* ``linear``: the frozen-backbone linear baseline;
* ``l2p``, ``dualprompt``, ``mvp`` (query pass + prompted pass), ``oneprompt`` (OVOR's prompt: one
  prompted pass, no query). The outlier phase of OVOR runs once per task on cached features and is
  timed apart (``vor_phase_ms``: one task's phase on ``--vor-samples`` features).

Each module runs ``--steps`` steps, the first ``--warmup`` untimed; the modules alternate for
``--repeats`` rounds; per module, the median over rounds of each round's median step-to-step time.

The per-sample gradient part times :func:`lightning_mtl.continual.mvp.per_sample_head_grads` (one
vectorized pass) and the reference loop (one autograd call per sample) on the same ``[B, D]`` features
and ``[C, D]`` head, and checks they agree.

    python benchmarks/continual.py --quick                                  # about a minute on a 2-core CPU
    python benchmarks/continual.py --device cuda --precision bf16-mixed      # ViT-B/16, 224 px, batch 64
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
import torch
from _timing import emit, median, now, per_step, timed_fit

from lightning_mtl.continual.dualprompt import DualPrompt
from lightning_mtl.continual.er import ER, LinearBaseline
from lightning_mtl.continual.l2p import L2P
from lightning_mtl.continual.mvp import MVP, _per_sample_head_grads_loop, per_sample_head_grads
from lightning_mtl.continual.oneprompt import OnePrompt
from lightning_mtl.continual.stream import StreamBatch

METHODS = {"er": ER, "linear": LinearBaseline, "l2p": L2P, "dualprompt": DualPrompt, "mvp": MVP, "oneprompt": OnePrompt}
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=96, depth=6, num_heads=3)


def stream_batches(steps: int, batch_size: int, image_size: int, num_classes: int, device: torch.device) -> list:
    g = torch.Generator().manual_seed(0)
    seen = num_classes // 2  # half the classes exposed: the seen-class mask is active
    batches = []
    for _ in range(steps):
        batches.append(
            StreamBatch(
                x=torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device),
                y=torch.randint(0, seen, (batch_size,), generator=g).to(device),
                num_seen=torch.full((batch_size,), seen, device=device),
                is_new=torch.ones(batch_size, dtype=torch.bool, device=device),
            )
        )
    return batches


def time_grads(batch: int, dim: int, classes: int, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(vectorized ms, loop ms, max abs difference) of the per-sample head gradients."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(batch, dim, generator=g).to(device)
    w = (0.02 * torch.randn(classes, dim, generator=g)).to(device)
    b = torch.zeros(classes, device=device)
    y = torch.randint(0, classes // 2, (batch,), generator=g).to(device)
    mask = (2 * torch.rand(batch, classes, generator=g)).to(device)
    args = (f, w, b, y, mask, classes // 2)
    fast, slow = per_sample_head_grads(*args), _per_sample_head_grads_loop(*args)
    error = float((fast - slow).abs().max())
    out = {}
    for name, fn in (("vectorized", per_sample_head_grads), ("loop", _per_sample_head_grads_loop)):
        fn(*args)  # warm-up
        runs = []
        for _ in range(repeats):
            start = now(device)
            fn(*args)
            runs.append(now(device) - start)
        out[name] = 1000 * median(runs)
    return out["vectorized"], out["loop"], error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny ViT on 32 px images, a minute on a 2-core CPU")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="stream samples per step (Si-Blurry: 64)")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--precision", default=None, help="Trainer precision, e.g. bf16-mixed on a GPU")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--vor-samples", type=int, default=2000, help="features of one task for the VOR phase")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    vit_kwargs: dict = {}
    image_size = 224
    if args.quick:
        args.steps, args.warmup, args.repeats, args.batch_size = 8, 2, 2, 16
        vit_kwargs, image_size, args.vor_samples = dict(TINY_VIT), 32, 400
        args.backbone = "vit_tiny_patch16_224"
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]

    modules = {}
    for name in names:
        torch.manual_seed(0)  # the same backbone weights for every method
        modules[name] = METHODS[name](args.num_classes, backbone=args.backbone, vit_kwargs=dict(vit_kwargs))
    batches = stream_batches(args.steps, args.batch_size, image_size, args.num_classes, device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):  # alternate, so drifts of the machine hit every method alike
        for name in names:
            stamps = timed_fit(copy.deepcopy(modules[name]), batches, device, precision=args.precision)
            times[name].append(per_step(stamps, args.warmup))
    ms = {name: 1000 * median(values) for name, values in times.items()}

    vor_ms = None
    if "oneprompt" in names:
        vor_ms = time_vor_phase(modules["oneprompt"].to(device), args.vor_samples, args.num_classes, device)

    dim = modules[names[0]].head.in_features
    vec_ms, loop_ms, error = time_grads(args.batch_size, dim, args.num_classes, device, 5 if args.quick else 20)

    print(
        f"device {device.type}, {args.backbone} {vit_kwargs or ''} at {image_size} px, batch {args.batch_size}, "
        f"{args.num_classes} classes, precision {args.precision or '32-true'}, {args.steps} steps "
        f"({args.warmup} warm-up), {args.repeats} rounds, torch threads {torch.get_num_threads()}"
    )
    base = ms.get("er")
    for name in names:
        ratio = f"   {ms[name] / base:.2f}x ER" if base else ""
        print(f"{name:11s} {ms[name]:9.2f} ms/step  {1000 * args.batch_size / ms[name]:9.1f} stream samples/s{ratio}")
    if vor_ms is not None:
        print(f"OVOR outlier phase of one task ({args.vor_samples} features): {vor_ms:.1f} ms")
    print(
        f"per-sample head gradients [{args.batch_size} x {args.num_classes} x {dim}]: vectorized {vec_ms:.3f} ms, "
        f"loop {loop_ms:.3f} ms, loop / vectorized {loop_ms / vec_ms:.1f}x, max |difference| {error:.2e}"
    )
    figures = {
        "benchmark": "continual",
        "device": device.type,
        "backbone": args.backbone,
        "image_size": image_size,
        "batch_size": args.batch_size,
        "precision": args.precision or "32-true",
        "steps": args.steps,
    }
    for name in names:
        figures[f"{name}_ms"] = round(ms[name], 3)
        if base:
            figures[f"{name}_vs_er"] = round(ms[name] / base, 3)
    figures.update(
        {
            "vor_phase_ms": None if vor_ms is None else round(vor_ms, 2),
            "grad_vectorized_ms": round(vec_ms, 4),
            "grad_loop_ms": round(loop_ms, 4),
            "grad_loop_over_vectorized": round(loop_ms / vec_ms, 2),
            "grad_max_abs_diff": error,
        }
    )
    emit(figures)  # fmt: skip


def time_vor_phase(module: torch.nn.Module, samples: int, num_classes: int, device: torch.device) -> float:
    """Milliseconds of one task's outlier generation and head training on ``samples`` cached features."""
    from lightning_mtl.continual.vor import VirtualOutlierRegularization

    g = torch.Generator().manual_seed(2)
    features = torch.randn(samples, module.head.in_features, generator=g).to(device)
    labels = torch.randint(0, min(num_classes, 10), (samples,), generator=g).to(device)
    vor = VirtualOutlierRegularization()
    start = now(device)
    vor._train_head(module.head, features, labels, num_seen=min(num_classes, 10), task=0)
    return 1000 * (now(device) - start)


if __name__ == "__main__":
    main()
