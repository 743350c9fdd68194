"""Cost of a multi-task training step under each aggregator: ours against a plain step, LibMTL's loop and torchjd.

One process, one model (a shared encoder and m linear classification heads, cross-entropy on random
labels), one batch, the same initial weights on every side. Each side times forward + backward +
aggregation, up to the gradients sitting in ``.grad`` (no optimizer step on any side; the gradients
are set to ``None`` between steps, outside the clock):

* ``plain``: one backward of the sum of the task losses (the floor);
* ``loop``: LibMTL's way: m backward passes ``loss_i.backward(retain_graph=True)``, each task's
  gradient of the shared parameters copied into an ``[m, n]`` buffer parameter by parameter, the
  aggregation, and the direction written back parameter by parameter. All on the device (LibMTL
  keeps the buffer on its device too, so there is no host round trip to penalize it). The aggregation
  is *our* aggregator's math, so that this side and ours differ only in the gradient engine. By
  default each ``loss_i`` is its own tensor, so its backward runs only its own head; LibMTL's trainer
  writes the losses into one ``[m]`` tensor, whose ``losses[i].backward()`` runs every head
  (``--loop-losses tensor`` for that);
* ``torchjd``: ``torchjd.autojac.mtl_backward(losses, features=...)`` then
  ``jac_to_grad(shared_params, aggregator)`` with torchjd's own aggregator of the same name, where
  the installed torchjd has one (``pip install "lightning-mtl[bench]"``, i.e. ``torchjd[full]``); by
  default its Jacobian through the encoder is one vmapped backward of all m rows (``--torchjd-chunk``);
* ``autogram`` (UPGrad rows only): torchjd's ``autogram.Engine(encoder, batch_dim=None)`` builds the
  Gramian of the m mean losses layer by layer, never the Jacobian; ``UPGradWeighting`` turns it into
  weights and one backward of the weighted losses writes the gradients (the shared ones are ours;
  each head gets its weighted, not its plain, gradient: the same work);
* ``ours``: ``MultiTaskModule(aggregator=...)`` timed as ``module.backward(module.training_step(batch, 0))``
  without a Trainer (the engine itself), at the parameter level and, for Gramian weightings, at
  the representation level (``gradient_mode="representation"``) and at the Gramian level
  (``gradient_mode="gramian"``: the parameter level's update from the Gramian accumulated layer by
  layer, never the Jacobian; column ``gram``). ``auto`` in a row names the level
  ``gradient_mode="auto"`` picks there (:func:`~lightning_mtl.multitask.auto_mode.choose_gradient_mode`);
  ``ours_vs_autogram`` is that level's time over autogram's.

For each (encoder, m, method) the sides take turns step by step, in an order that rotates, so that a
drift of the machine hits them alike; the figure of a side is the median of its timed steps. The
plain step is timed again beside every method, and each method's ratios use that figure. On a
shared CPU, measure when it is quiet: torch's threads wait badly for cores another job holds
(``--threads 1`` is steadier there).

Targets of the issue, printed beside the ratios (met / missed):

* CPU: gradient methods (parameter level) no slower than the loop and than torchjd (<= 1.0x); the
  Gramian level no slower than the loop (<= 1.0x; torchjd's autogram measured 0.93x the loop); ours
  (the level ``auto`` picks) no slower than torchjd's autogram (<= 1.0x, UPGrad);
  representation level <= 1.5x plain at m = 10; loss weighting <= 1.05x plain;
* GPU: gradient methods <= 0.8x the loop at m = 10 and <= 1.0x torchjd; representation level
  <= 3x plain at m = 40.

    python benchmarks/aggregation.py --quick                      # CPU, about a minute on 2 cores
    python benchmarks/aggregation.py --device cpu --encoders resnet18 --tasks 10 --methods upgrad mgda
    python benchmarks/aggregation.py                              # GPU: both encoders, m in {2, 10, 40}
    python benchmarks/aggregation.py --precision bf16             # bf16 autocast around the forward
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import emit, median, now

from lightning_mtl import ClassificationTask, DigitsCNN, MultiTaskModule
from lightning_mtl.aggregators import GramianWeighting, create_aggregator, list_aggregators
from lightning_mtl.multitask.auto_mode import choose_gradient_mode

NUM_CLASSES = 10
QUICK_METHODS = ["ls", "upgrad", "mgda", "imtl_g", "graddrop"]
CPU_TARGETS = {
    "param_vs_loop": 1.0,
    "param_vs_torchjd": 1.0,
    "rep_vs_plain_m10": 1.5,
    "loss_vs_plain": 1.05,
    "gram_vs_loop": 1.0,
    "ours_vs_autogram": 1.0,
}
GPU_TARGETS = {"param_vs_loop_m10": 0.8, "param_vs_torchjd": 1.0, "rep_vs_plain_m40": 3.0}


# -- model and data ---------------------------------------------------------------------------------
def build_encoder(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    """The shared encoder and the shape of one input."""
    if name == "digits":
        return DigitsCNN(), (1, 10, 10)
    if name == "mlp":  # linear layers only: where the Gramian level's R x R contraction pays
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in in (100, 512, 512):
            layers += [nn.Linear(width_in, 512), nn.ReLU()]
        encoder = nn.Sequential(*layers)
        encoder.out_features = 512  # type: ignore[assignment]  # read by MultiTaskModule
        return encoder, (1, 10, 10)
    if name == "resnet18":
        import timm

        net = timm.create_model("resnet18", pretrained=False, num_classes=0)
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)  # CIFAR stem
        net.maxpool = nn.Identity()
        return net, (3, 32, 32)
    raise ValueError(f"unknown encoder {name!r}")


def task_names(m: int) -> list[str]:
    return [f"t{i}" for i in range(m)]


def make_batch(m: int, shape: tuple[int, ...], batch_size: int, device: torch.device) -> tuple[Tensor, dict]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, *shape, generator=gen)
    ys = {name: torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen) for name in task_names(m)}
    return x.to(device), {k: v.to(device) for k, v in ys.items()}


def reference_losses(encoder: nn.Module, heads: nn.ModuleDict, batch, amp) -> tuple[Tensor, list[Tensor]]:
    """Forward of the reference sides: the features and one cross-entropy per task (as users write it)."""
    x, ys = batch
    with amp():
        z = encoder(x)
        losses = [F.cross_entropy(head(z).float(), ys[name]) for name, head in heads.items()]
    return z, losses


# -- the sides ------------------------------------------------------------------------------------
class Side:
    """One way of computing a training step's gradients; ``step`` is timed, ``zero`` is not."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params

    def zero(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        raise NotImplementedError


class Plain(Side):
    def __init__(self, encoder: nn.Module, heads: nn.ModuleDict, batch, amp) -> None:
        super().__init__(list(encoder.parameters()) + list(heads.parameters()))
        self.encoder, self.heads, self.batch, self.amp = encoder, heads, batch, amp

    def step(self) -> None:
        _, losses = reference_losses(self.encoder, self.heads, self.batch, self.amp)
        torch.stack(losses).sum().backward()


class LibMTLLoop(Side):
    """m backward passes, per-task gradients gathered into a flat buffer, aggregation, write-back."""

    def __init__(self, encoder: nn.Module, heads: nn.ModuleDict, batch, amp, aggregator, loss_tensor: bool) -> None:
        super().__init__(list(encoder.parameters()) + list(heads.parameters()))
        self.encoder, self.heads, self.batch, self.amp, self.aggregator = encoder, heads, batch, amp, aggregator
        self.loss_tensor = loss_tensor
        self.shared = [p for p in encoder.parameters() if p.requires_grad]
        self.sizes = [p.numel() for p in self.shared]
        self.grad_dim = sum(self.sizes)

    def step(self) -> None:
        _, losses = reference_losses(self.encoder, self.heads, self.batch, self.amp)
        if self.aggregator.uses_log_losses:  # DB-MTL: LibMTL differentiates log(l_i + 1e-8)
            losses = [torch.log(loss + 1e-8) for loss in losses]
        device = losses[0].device
        if self.loss_tensor:  # LibMTL's trainer writes the losses into a tensor: train_losses[tn] = ...
            written = torch.zeros(len(losses), device=device)
            for i, loss in enumerate(losses):
                written[i] = loss
            losses = [written[i] for i in range(len(losses))]
        grads = torch.zeros(len(losses), self.grad_dim, device=device)
        for i, loss in enumerate(losses):
            loss.backward(retain_graph=True)  # heads collect their own task's gradient on the way
            start = 0
            for p, size in zip(self.shared, self.sizes):
                if p.grad is not None:
                    grads[i, start : start + size].copy_(p.grad.reshape(-1))
                    p.grad.zero_()
                start += size
        direction = self.aggregator.aggregate(grads)
        start = 0
        for p, size in zip(self.shared, self.sizes):
            p.grad = direction[start : start + size].reshape(p.shape).to(p.dtype).clone()
            start += size


class TorchJD(Side):
    def __init__(self, encoder: nn.Module, heads: nn.ModuleDict, batch, amp, aggregator, chunk: int | None) -> None:
        super().__init__(list(encoder.parameters()) + list(heads.parameters()))
        from torchjd.autojac import jac_to_grad, mtl_backward

        self.mtl_backward, self.jac_to_grad = mtl_backward, jac_to_grad
        self.encoder, self.heads, self.batch, self.amp, self.aggregator = encoder, heads, batch, amp, aggregator
        self.shared = [p for p in encoder.parameters() if p.requires_grad]
        self.task_params = [list(head.parameters()) for head in heads.values()]
        self.chunk = chunk

    def step(self) -> None:
        z, losses = reference_losses(self.encoder, self.heads, self.batch, self.amp)
        self.mtl_backward(
            losses, features=z, tasks_params=self.task_params, shared_params=self.shared,
            parallel_chunk_size=self.chunk,
        )  # fmt: skip
        self.jac_to_grad(self.shared, self.aggregator)


class Autogram(Side):
    """torchjd's autogram: the Gramian of the mean losses w.r.t. the encoder, UPGrad's weights, one backward."""

    def __init__(self, encoder: nn.Module, heads: nn.ModuleDict, batch, amp) -> None:
        super().__init__(list(encoder.parameters()) + list(heads.parameters()))
        from torchjd.aggregation import UPGradWeighting
        from torchjd.autogram import Engine

        # the losses are batch means: no batch dimension to exploit (batch_dim=None)
        self.engine, self.weighting = Engine(encoder, batch_dim=None), UPGradWeighting()
        self.encoder, self.heads, self.batch, self.amp = encoder, heads, batch, amp
        self.shared = [p for p in encoder.parameters() if p.requires_grad]

    def step(self) -> None:
        _, losses = reference_losses(self.encoder, self.heads, self.batch, self.amp)
        stacked = torch.stack(losses)
        weights = self.weighting(self.engine.compute_gramian(stacked))
        stacked.backward(weights)


class Ours(Side):
    def __init__(self, module: MultiTaskModule, batch, amp) -> None:
        super().__init__(list(module.parameters()))
        self.module, self.batch, self.amp = module, batch, amp

    def step(self) -> None:
        with self.amp():
            loss = self.module.training_step(self.batch, 0)
        self.module.backward(loss)


# -- torchjd's counterparts -----------------------------------------------------------------------
def torchjd_aggregator(name: str, ours: Any, m: int) -> tuple[Any, str]:
    """torchjd's aggregator of the same method (same hyper-parameters where both have them), or a reason."""
    try:
        import torchjd.aggregation as tja
    except ImportError:
        return None, "torchjd not installed"
    makers: dict[str, Callable[[], Any]] = {
        "upgrad": lambda: tja.UPGrad(),
        "dualproj": lambda: tja.DualProj(),
        "mgda": lambda: tja.MGDA(),
        "pcgrad": lambda: tja.PCGrad(),
        "cagrad": lambda: tja.CAGrad(c=getattr(ours, "c", 0.4)),
        "imtl_g": lambda: tja.IMTLG(),
        "nashmtl": lambda: tja.NashMTL(
            n_tasks=m,
            update_weights_every=getattr(ours, "update_weights_every", 1),
            optim_niter=getattr(ours, "optim_niter", 20),
        ),  # fmt: skip
        "aligned_mtl": lambda: tja.AlignedMTL(scale_mode=getattr(ours, "scale_mode", "min")),
        "graddrop": lambda: tja.GradDrop(),
        "gradvac": lambda: tja.GradVac(beta=getattr(ours, "beta", 0.5)),
        "fairgrad": lambda: tja.FairGrad(alpha=getattr(ours, "alpha", 1.0)),
    }
    if name not in makers:
        return None, "no torchjd counterpart"
    try:
        return makers[name](), ""
    except (ImportError, AttributeError) as err:  # an optional dependency of torchjd, or an older torchjd
        return None, f"torchjd: {err}".splitlines()[0][:80]


# -- timing ---------------------------------------------------------------------------------------
def measure(sides: dict[str, Side], rounds: int, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median ms per step of each side. The sides take turns step by step, in an order that rotates
    from step to step, so that a drift of the machine hits them alike; each round starts with
    ``warmup`` untimed steps of every side."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    turn = 0
    for _ in range(rounds):
        for i in range(warmup + steps):
            k = turn % len(names)
            turn += 1
            for name in names[k:] + names[:k]:
                side = sides[name]
                side.zero()
                start = now(device)
                side.step()
                stop = now(device)
                if i >= warmup:
                    times[name].append(stop - start)
    for side in sides.values():
        side.zero()
    return {name: 1000 * median(values) for name, values in times.items()}


def max_rel_diff(a: list[Tensor], b: list[Tensor]) -> float:
    num = max(float((x.grad - y.grad).abs().max()) for x, y in zip(a, b))
    den = max(float(x.grad.abs().max()) for x in a) or 1.0
    return num / den


# -- one (encoder, m) --------------------------------------------------------------------------------
def run_config(encoder_name: str, m: int, methods: list[str], args, device: torch.device, amp) -> list[dict]:
    torch.manual_seed(0)
    encoder, shape = build_encoder(encoder_name)
    tasks = {name: ClassificationTask(NUM_CLASSES) for name in task_names(m)}
    template = MultiTaskModule(encoder=encoder, tasks=tasks).to(device)
    batch = make_batch(m, shape, args.batch_size, device)
    n_shared = sum(p.numel() for p in template.encoder.parameters())

    def fresh() -> tuple[nn.Module, nn.ModuleDict]:
        return copy.deepcopy(template.encoder).train(), copy.deepcopy(template.heads).train()

    def ours(method: str, mode: str) -> Ours:
        module = MultiTaskModule(
            encoder=copy.deepcopy(template.encoder), tasks=tasks, aggregator=method, gradient_mode=mode,
            jacobian_batched=args.jacobian_batched, jacobian_chunk_size=args.jacobian_chunk_size,
        )  # fmt: skip
        module.heads = copy.deepcopy(template.heads)
        return Ours(module.to(device).train(), batch, amp)

    rows = []
    for method in methods:
        probe = create_aggregator(method)
        kind = probe.kind
        sides: dict[str, Side] = {"plain": Plain(*fresh(), batch, amp), "param": ours(method, "parameter")}
        tjd_note = ""
        if kind != "loss":
            loop_aggregator = create_aggregator(method).to(device)
            sides["loop"] = LibMTLLoop(*fresh(), batch, amp, loop_aggregator, args.loop_losses == "tensor")
            tjd, tjd_note = torchjd_aggregator(method, probe, m) if not args.no_torchjd else (None, "--no-torchjd")
            if tjd is not None:
                side = TorchJD(*fresh(), batch, amp, tjd, args.torchjd_chunk)
                try:  # a trial step: torchjd's vmapped backward does not take every setting (bf16 on a CPU)
                    side.step()
                    sides["torchjd"] = side
                except RuntimeError as err:
                    tjd_note = f"torchjd failed: {err}".splitlines()[0][:80]
                side.zero()
            if isinstance(probe, GramianWeighting):
                sides["rep"] = ours(method, "representation")
                sides["gram"] = ours(method, "gramian")
            if method == "upgrad" and tjd is not None:  # torchjd is there
                side = Autogram(*fresh(), batch, amp)
                try:
                    side.step()
                    sides["autogram"] = side
                except RuntimeError as err:
                    tjd_note = f"autogram failed: {err}".splitlines()[0][:80]
                side.zero()
        check = gram_check = autogram_check = None
        if args.check and "loop" in sides:  # one step from the same weights: the loop and ours must agree
            for side in sides.values():
                side.zero()
            sides["loop"].step()
            sides["param"].step()
            loop_shared = sides["loop"].shared
            ours_shared = [p for p in sides["param"].module.encoder.parameters() if p.requires_grad]
            check = max_rel_diff(loop_shared, ours_shared)
            if "gram" in sides:  # the Gramian level must give the parameter level's update
                sides["gram"].step()
                gram_shared = [p for p in sides["gram"].module.encoder.parameters() if p.requires_grad]
                gram_check = max_rel_diff(ours_shared, gram_shared)
            if "autogram" in sides:  # autogram's shared gradients must be ours as well
                sides["autogram"].step()
                autogram_check = max_rel_diff(ours_shared, sides["autogram"].shared)
        ms = measure(sides, args.rounds, args.steps, args.warmup, device)
        row: dict[str, Any] = {"encoder": encoder_name, "m": m, "method": method, "kind": kind,
                               "shared_params": n_shared}  # fmt: skip
        row.update({f"{name}_ms": round(value, 3) for name, value in ms.items()})
        for ours_side in ("param", "rep", "gram"):
            if ours_side in ms:
                for ref in ("plain", "loop", "torchjd", "autogram"):
                    if ref in ms:
                        row[f"{ours_side}_vs_{ref}"] = round(ms[ours_side] / ms[ref], 4)
        if "torchjd" in ms and "loop" in ms:
            row["torchjd_vs_loop"] = round(ms["torchjd"] / ms["loop"], 4)
        if tjd_note and kind != "loss":
            row["torchjd_note"] = tjd_note
        if check is not None:
            row["loop_vs_param_max_rel_diff"] = check
        if gram_check is not None:
            row["param_vs_gram_max_rel_diff"] = gram_check
        if autogram_check is not None:
            row["param_vs_autogram_max_rel_diff"] = autogram_check
        if "gram" in ms:
            row["gram_vs_param"] = round(ms["gram"] / ms["param"], 4)
        if kind != "loss":
            auto = choose_gradient_mode(template.encoder, m, isinstance(probe, GramianWeighting), device, len(batch[0]))
            row["auto"] = auto
            if "autogram" in ms:
                row["autogram_vs_loop"] = round(ms["autogram"] / ms["loop"], 4)
                row["ours_vs_autogram"] = round(ms["param" if auto == "parameter" else "gram"] / ms["autogram"], 4)
        row["targets"] = targets_for(row, device)
        rows.append(row)
        print_row(row)
        del sides
    return rows


def targets_for(row: dict, device: torch.device) -> dict[str, dict]:
    """The issue's targets that apply to this row on this device: ratio, limit, met."""
    out: dict[str, dict] = {}

    def put(key: str, ratio_key: str, limit: float) -> None:
        if ratio_key in row:
            out[key] = {"ratio": row[ratio_key], "limit": limit, "met": row[ratio_key] <= limit}

    m, kind = row["m"], row["kind"]
    if device.type == "cpu":
        if kind == "loss":
            put("loss_vs_plain", "param_vs_plain", CPU_TARGETS["loss_vs_plain"])
        else:
            put("param_vs_loop", "param_vs_loop", CPU_TARGETS["param_vs_loop"])
            put("param_vs_torchjd", "param_vs_torchjd", CPU_TARGETS["param_vs_torchjd"])
            put("gram_vs_loop", "gram_vs_loop", CPU_TARGETS["gram_vs_loop"])
            put("ours_vs_autogram", "ours_vs_autogram", CPU_TARGETS["ours_vs_autogram"])
            if m == 10:
                put("rep_vs_plain_m10", "rep_vs_plain", CPU_TARGETS["rep_vs_plain_m10"])
    elif kind != "loss":
        if m == 10:
            put("param_vs_loop_m10", "param_vs_loop", GPU_TARGETS["param_vs_loop_m10"])
        put("param_vs_torchjd", "param_vs_torchjd", GPU_TARGETS["param_vs_torchjd"])
        if m == 40:
            put("rep_vs_plain_m40", "rep_vs_plain", GPU_TARGETS["rep_vs_plain_m40"])
    return out


# -- output ---------------------------------------------------------------------------------------
HEADER = (f"{'encoder':9s} {'m':>3s} {'method':12s} {'kind':8s} {'plain':>8s} {'loop':>8s} {'torchjd':>8s} | "
          f"{'param':>8s} {'/plain':>7s} {'/loop':>6s} {'/tjd':>6s} | {'rep':>8s} {'/plain':>7s} {'/loop':>6s} "
          f"{'/tjd':>6s} | {'gram':>8s} {'/param':>6s} {'/loop':>6s} {'/tjd':>6s} | {'autogram':>8s} {'auto':>9s} "
          f"{'/ag':>5s} | targets")  # fmt: skip


def print_row(row: dict) -> None:
    def ms(key: str) -> str:
        return f"{row[key]:8.2f}" if key in row else f"{'-':>8s}"

    def ratio(key: str, width: int) -> str:
        return f"{row[key]:{width}.2f}" if key in row else f"{'-':>{width}s}"

    marks = " ".join(f"{k}:{'ok' if v['met'] else 'MISSED'}" for k, v in row["targets"].items())
    note = f" ({row['torchjd_note']})" if "torchjd_note" in row else ""
    print(f"{row['encoder']:9s} {row['m']:3d} {row['method']:12s} {row['kind']:8s} {ms('plain_ms')} {ms('loop_ms')} "
          f"{ms('torchjd_ms')} | {ms('param_ms')} {ratio('param_vs_plain', 7)} {ratio('param_vs_loop', 6)} "
          f"{ratio('param_vs_torchjd', 6)} | {ms('rep_ms')} {ratio('rep_vs_plain', 7)} {ratio('rep_vs_loop', 6)} "
          f"{ratio('rep_vs_torchjd', 6)} | {ms('gram_ms')} {ratio('gram_vs_param', 6)} {ratio('gram_vs_loop', 6)} "
          f"{ratio('gram_vs_torchjd', 6)} | {ms('autogram_ms')} {row.get('auto', '-'):>9s} "
          f"{ratio('ours_vs_autogram', 5)} | {marks}{note}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU, DigitsCNN, m in {2, 10}, a handful of methods, few repeats (about a minute)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        "--dtype",
        dest="precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: autocast around the forward of every side (meant for GPUs)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on a GPU, 32 on the CPU")
    parser.add_argument("--encoders", nargs="+", default=["digits", "resnet18"], choices=["digits", "resnet18", "mlp"])
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 10, 40], help="numbers of tasks m")
    parser.add_argument("--methods", nargs="+", default=None, help=f"default: all, i.e. {' '.join(list_aggregators())}")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the sides")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side and round")
    parser.add_argument(
        "--torchjd-chunk",
        type=int,
        default=None,
        help="torchjd's parallel_chunk_size (default None: all m rows in one vmapped backward)",
    )
    parser.add_argument(
        "--jacobian-batched",
        type=lambda s: {"auto": None, "yes": True, "no": False}[s],
        default=None,
        help="ours: auto (batched on GPUs, loop on CPUs), yes or no",
    )
    parser.add_argument("--jacobian-chunk-size", type=int, default=None)
    parser.add_argument(
        "--loop-losses",
        default="list",
        choices=["list", "tensor"],
        help="the loop's losses: separate tensors (each backward runs only its own head) or, as "
        "LibMTL's trainer does, written into one [m] tensor (each backward runs every head)",
    )
    parser.add_argument("--no-torchjd", action="store_true", help="skip the torchjd side")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="before timing, print how far the loop's gradients are from ours after one step "
        "(0 up to rounding, except for methods that draw random numbers: graddrop, pcgrad, gradvac)",
    )
    args = parser.parse_args()
    if args.quick:
        args.device, args.encoders, args.tasks = "cpu", ["digits"], [2, 10]
        args.methods = args.methods or QUICK_METHODS
        args.rounds, args.steps, args.warmup = 3, 5, 1
    methods = args.methods or list_aggregators()
    unknown = [name for name in methods if name not in list_aggregators()]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(list_aggregators())}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size is None:
        args.batch_size = 256 if device.type == "cuda" else 32
    warnings.filterwarnings("ignore")
    bf16 = args.precision == "bf16"

    def amp() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    try:
        import torchjd

        tjd_version = getattr(torchjd, "__version__", None)
        if tjd_version is None:
            from importlib.metadata import version

            tjd_version = version("torchjd")
    except ImportError:
        tjd_version = None
    ours_batched = args.jacobian_batched if args.jacobian_batched is not None else device.type == "cuda"
    print(f"device {device.type}, {args.precision}, batch {args.batch_size}, {args.rounds} rounds x {args.steps} "
          f"steps ({args.warmup} warm-up), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"torchjd {tjd_version or 'not installed'}, our Jacobian {'batched' if ours_batched else 'loop'}, "
          f"loop losses as a {args.loop_losses}")  # fmt: skip
    print(
        "ms/step (median); param/rep/gram = ours at the parameter/representation/Gramian level; "
        "ratios < 1 = ours faster"
    )
    print(HEADER)
    rows = []
    for encoder_name in args.encoders:
        for m in args.tasks:
            rows += run_config(encoder_name, m, methods, args, device, amp)
    targets = CPU_TARGETS if device.type == "cpu" else GPU_TARGETS
    checked = [(f"{r['encoder']}/m={r['m']}/{r['method']}/{k}", v) for r in rows for k, v in r["targets"].items()]
    missed = [name for name, v in checked if not v["met"]]
    print(f"targets on {device.type}: {targets}")
    print(f"  met {len(checked) - len(missed)} of {len(checked)}" + (f"; missed: {', '.join(missed)}" * bool(missed)))
    other = ("GPU", GPU_TARGETS) if device.type == "cpu" else ("CPU", CPU_TARGETS)
    print(f"{other[0]} targets (not measured here): {other[1]}")
    emit({"benchmark": "aggregation", "device": device.type, "precision": args.precision,
          "batch_size": args.batch_size, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
          "threads": torch.get_num_threads(), "torch": torch.__version__, "torchjd": tjd_version,
          "ours_jacobian": "batched" if ours_batched else "loop", "loop_losses": args.loop_losses, "targets": targets,
          "targets_met": len(checked) - len(missed), "targets_checked": len(checked), "results": rows})  # fmt: skip


if __name__ == "__main__":
    main()
