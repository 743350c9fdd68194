"""Cost of EMATeacher and of an AdAutoMix step, against a plain classification step with the same backbone.

Same process, same CIFAR-stem ResNet-18 (100 classes), same initial weights, same batches (random
32 x 32 images materialized once), same SGD, all under the Lightning Trainer:

* ``plain``: a MultiTaskModule with one classification task (cross-entropy);
* ``plain + EMATeacher``: the same with ``EMATeacher(decay=0.999)`` (plain EMA, teacher made by the
  callback); target ratio <= 1.03. The EMA update alone (one ``_foreach_lerp_`` over the 11 M
  parameters) is also timed in isolation, since on a shared CPU the noise of a whole step exceeds 3 %;
* ``AdAutoMix`` with 3- and 2-sample mixes (plus its EMATeacher): teacher forward on the clean batch and
  on the generated mix, student forward/backward on the mix and the clean batch (and the linear 3-mix).

Each side runs ``--steps`` steps, the first ``--warmup`` untimed; the sides alternate for ``--repeats``
rounds; per side, the median over rounds of each round's median step-to-step time is compared.

    python benchmarks/mixup.py            # full run
    python benchmarks/mixup.py --quick    # about a minute or two on a 2-core CPU
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
import torch
from _timing import emit, median, now, per_step, timed_fit

from lightning_mtl.architectures.resnet_cifar import ResNet18
from lightning_mtl.callbacks.ema import EMATeacher
from lightning_mtl.mixup.adautomix import AdAutoMix
from lightning_mtl.multitask.module import MultiTaskModule
from lightning_mtl.multitask.tasks import ClassificationTask


def ema_update_alone(model: torch.nn.Module, repeats: int) -> float:
    """Seconds of one EMA update of the whole model, timed in isolation."""
    teacher = copy.deepcopy(model)
    ema = EMATeacher(decay=0.999)
    ema._pairs = [(model, teacher)]
    ema.update()  # warm-up (builds the tensor lists)
    device = next(model.parameters()).device
    start = now(device)
    for _ in range(repeats):
        ema.update()
    return (now(device) - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (a minute or two on a 2-core CPU)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats, args.batch_size = 6, 2, 2, 8
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4)

    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(args.batch_size, 3, 32, 32, generator=g), torch.randint(0, 100, (args.batch_size,), generator=g))
        for _ in range(args.steps)
    ]
    if device.type == "cuda":
        batches = [(x.to(device), y.to(device)) for x, y in batches]
    torch.manual_seed(0)
    backbone = ResNet18()
    plain = MultiTaskModule(encoder=backbone, tasks={"label": ClassificationTask(100)}, optimizer=sgd)
    adautomix = {k: AdAutoMix(copy.deepcopy(backbone), 100, mix_samples=k, optimizer=sgd) for k in (3, 2)}

    def ema():
        return EMATeacher(decay=0.999, schedule="hold_cosine", final_decay=0.999999, buffers="own")

    times: dict[str, list[float]] = {"plain": [], "plain_ema": [], "adautomix3": [], "adautomix2": []}
    for _ in range(args.repeats):  # alternate, so drifts of the machine hit all sides alike
        times["plain"].append(per_step(timed_fit(copy.deepcopy(plain), batches, device, []), args.warmup))
        with_ema = timed_fit(copy.deepcopy(plain), batches, device, [EMATeacher(0.999)])
        times["plain_ema"].append(per_step(with_ema, args.warmup))
        for k in (3, 2):
            stamps = timed_fit(copy.deepcopy(adautomix[k]), batches, device, [ema()])
            times[f"adautomix{k}"].append(per_step(stamps, args.warmup))
    ms = {name: 1000 * median(values) for name, values in times.items()}
    update_ms = 1000 * ema_update_alone(copy.deepcopy(backbone).to(device), 20 if args.quick else 100)
    params = sum(p.numel() for p in backbone.parameters())

    print(
        f"device {device.type}, ResNet-18 (CIFAR stem, {params / 1e6:.1f} M parameters), batch {args.batch_size}, "
        f"{args.steps} steps ({args.warmup} warm-up), {args.repeats} rounds, torch threads {torch.get_num_threads()}"
    )
    print(f"plain classification step   {ms['plain']:9.2f} ms")
    ema_ratio = ms["plain_ema"] / ms["plain"]
    print(f"  + EMATeacher              {ms['plain_ema']:9.2f} ms   ratio {ema_ratio:.3f}  (target <= 1.03)")
    print(f"  EMA update alone          {update_ms:9.2f} ms   = {update_ms / ms['plain']:.2%} of a plain step")
    print(f"AdAutoMix step, 3 samples   {ms['adautomix3']:9.2f} ms   ratio {ms['adautomix3'] / ms['plain']:.2f}")
    print(f"AdAutoMix step, 2 samples   {ms['adautomix2']:9.2f} ms   ratio {ms['adautomix2'] / ms['plain']:.2f}")
    emit({
        "benchmark": "mixup", "device": device.type, "batch_size": args.batch_size, "steps": args.steps,
        "plain_ms": round(ms["plain"], 3), "plain_ema_ms": round(ms["plain_ema"], 3),
        "ema_ratio": round(ms["plain_ema"] / ms["plain"], 4), "ema_update_ms": round(update_ms, 3),
        "ema_update_share": round(update_ms / ms["plain"], 5), "ema_target": 1.03,
        "adautomix3_ms": round(ms["adautomix3"], 3), "adautomix3_ratio": round(ms["adautomix3"] / ms["plain"], 3),
        "adautomix2_ms": round(ms["adautomix2"], 3), "adautomix2_ratio": round(ms["adautomix2"] / ms["plain"], 3),
    })  # fmt: skip


if __name__ == "__main__":
    main()
