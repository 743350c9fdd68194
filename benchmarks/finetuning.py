"""LoFiT's training step against LoRA of a similar parameter budget and against the official per-head loop.

Same frozen decoder (a randomly initialised Llama, no download), same initial weights, same batches, same
loss (token cross-entropy on the answer tokens), same optimizer (AdamW), same process; each side is a
plain PyTorch step (forward, backward, optimizer step), so the figures compare the interventions, not
frameworks:

* ``lofit``: our hooks (one fused multiply-add per layer over all heads), stage 1 (``A`` on every head).
* ``lora``: ``peft`` LoRA of rank 1 on every ``o_proj`` (``2 * hidden`` parameters per layer, LoFiT stage 1
  has ``hidden``): the cheapest LoRA that touches the same projection.
* ``per_head_loop``: the official code's form: a Python loop over the heads writing each head's slice.

Each side runs ``--steps`` steps of which the first ``--warmup`` are not timed; the sides alternate for
``--repeats`` rounds; a side's time is the median step, then the median over rounds. Targets: LoFiT <= 1.10x
LoRA; LoFiT <= 1.0x the per-head loop. The last line is one JSON object with the figures.

LEVI (its own block at the end): one training step of LEVI with every backbone feature cached (the store
filled by one pass, as after the first epoch) against full fine-tuning of the same DigitsCNN backbone with a
linear head, same batches, plain PyTorch; target LEVI <= 0.5x full fine-tuning.

    python benchmarks/finetuning.py            # full run
    python benchmarks/finetuning.py --quick    # under a minute on a 2-core CPU
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import emit, median, now, per_step

from lightning_mtl.finetuning import LoFiTIntervention, build_causal_lm, find_attention_projections
from lightning_mtl.finetuning.losses import sft_loss


class PerHeadLoop(nn.Module):
    """The official code's intervention: one parameter pair per head, a Python loop writing slices."""

    def __init__(self, layers: int, heads: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.scale = nn.ParameterList([nn.Parameter(torch.randn(dim) * 1e-3) for _ in range(layers * heads)])
        self.offset = [torch.zeros(dim) for _ in range(layers * heads)]  # stage 1 trains A only
        self.heads = heads

    def hook(self, layer: int, module: nn.Module, args: tuple) -> tuple:
        z = args[0]
        out = z.clone()
        for i in range(self.heads):
            block = slice(i * self.dim, (i + 1) * self.dim)
            index = layer * self.heads + i
            offset = self.offset[index].to(z.device)
            out[..., block] = (1 + self.scale[index]) * z[..., block] + offset
        return (out, *args[1:])

    def attach(self, model: nn.Module) -> None:
        for layer, projection in enumerate(find_attention_projections(model).projections):
            projection.register_forward_pre_hook(lambda m, a, layer=layer: self.hook(layer, m, a))


def run(model: nn.Module, params: list[nn.Parameter], batches: list, device: torch.device) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    stamps = []
    for ids, labels in batches:
        loss = sft_loss(model(input_ids=ids).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append(now(device))
    return stamps


def lofit_side(base: nn.Module, device: torch.device) -> tuple[nn.Module, list[nn.Parameter]]:
    model = copy.deepcopy(base)
    layout = find_attention_projections(model)
    intervention = LoFiTIntervention(layout.num_layers, layout.num_heads, layout.head_dim).to(device)
    with torch.no_grad():
        intervention.scale.normal_(0.0, 1e-3)
    intervention.offset.requires_grad_(False)
    intervention.attach(model)
    return model, [intervention.scale]


def lora_side(base: nn.Module, device: torch.device) -> tuple[nn.Module, list[nn.Parameter]]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=1, lora_alpha=1, target_modules=["o_proj"], lora_dropout=0.0)
    )
    return model, [p for p in model.parameters() if p.requires_grad]


def loop_side(base: nn.Module, device: torch.device) -> tuple[nn.Module, list[nn.Parameter]]:
    model = copy.deepcopy(base)
    layout = find_attention_projections(model)
    loop = PerHeadLoop(layout.num_layers, layout.num_heads, layout.head_dim).to(device)
    loop.attach(model)
    return model, list(loop.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (under a minute on a 2-core CPU)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--levi-image-size", type=int, default=8, help="LEVI: side of the digit inputs")
    parser.add_argument("--levi-batch-size", type=int, default=64)
    parser.add_argument("--levi-width", type=int, default=32, help="LEVI: the DigitsCNN backbone's first width")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats, args.seq_len = 8, 2, 2, 64
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)

    config = dict(model_type="llama", num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.heads, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                  vocab_size=args.vocab, max_position_embeddings=args.seq_len)  # fmt: skip
    base = build_causal_lm(config=config, seed=0).to(device).requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=generator)
        labels = ids.clone()
        labels[:, : args.seq_len // 2] = -100  # the second half is the answer
        batches.append((ids.to(device), labels.to(device)))

    sides: dict[str, Callable] = {"lofit": lofit_side, "lora": lora_side, "per_head_loop": loop_side}
    times: dict[str, list[float]] = {name: [] for name in sides}
    counts = {}
    for _ in range(args.repeats):  # alternate, so drifts of the machine hit all sides alike
        for name, build in sides.items():
            torch.manual_seed(0)
            model, params = build(base, device)
            counts[name] = sum(p.numel() for p in params)
            times[name].append(per_step(run(model, params, batches, device), args.warmup))
    ms = {name: 1000 * median(values) for name, values in times.items()}
    vs_lora, vs_loop = ms["lofit"] / ms["lora"], ms["lofit"] / ms["per_head_loop"]
    print(f"device {device.type}, Llama {args.layers} layers x {args.heads} heads, hidden {args.hidden}, "
          f"batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps ({args.warmup} warm-up), "
          f"{args.repeats} rounds, torch threads {torch.get_num_threads()}")  # fmt: skip
    for name in sides:
        print(f"{name:14s} {ms[name]:9.2f} ms/step   {counts[name]:7d} trained parameters")
    print(f"LoFiT / LoRA          {vs_lora:6.3f}  (target <= 1.10)")
    print(f"LoFiT / per-head loop {vs_loop:6.3f}  (target <= 1.00)")
    targets = {f"{device.type}_vs_lora_le_1.10": "met" if vs_lora <= 1.10 else "missed",
               f"{device.type}_vs_per_head_loop_le_1.00": "met" if vs_loop <= 1.0 else "missed"}  # fmt: skip
    print(f"targets: {targets}")
    levi = levi_figures(args, device)
    emit({**levi, "benchmark": "finetuning", "device": device.type, "layers": args.layers, "heads": args.heads,
          "hidden": args.hidden, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
          **{f"{name}_ms": round(value, 3) for name, value in ms.items()},
          **{f"{name}_params": value for name, value in counts.items()},
          "lofit_vs_lora": round(vs_lora, 4), "lofit_vs_per_head_loop": round(vs_loop, 4), "targets": targets})  # fmt: skip


# --- LEVI: cached features against full fine-tuning of the backbone ---------------------------------------


def levi_side(name: str, image_size: int, width: int) -> nn.Module:
    """``levi``: the recipe's LEVI (frozen DigitsCNN, three views, small CNN, MLP adapting layers); ``full``: the
    same DigitsCNN fine-tuned with a linear head on its last layer (no small model)."""
    from lightning_mtl.architectures import DigitsCNN
    from lightning_mtl.finetuning import LEVI

    torch.manual_seed(0)
    backbone = DigitsCNN(channels=(width, 2 * width), out_features=128)
    if name == "full":
        return LEVI(10, backbone=backbone, layers=["project"], input_shape=[1, image_size, image_size],
                    use_small_model=False, adapter_hidden=0, freeze_backbone=False)  # fmt: skip
    return LEVI(10, backbone=backbone, layers=["features.5", "features.12", "project"],
                input_shape=[1, image_size, image_size], small_width=16, adapter_hidden=128)  # fmt: skip


def levi_run(module: nn.Module, batches: list, device: torch.device) -> list[float]:
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    stamps = []
    for x, y in batches:
        loss = F.cross_entropy(module(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append(now(device))
    return stamps


def levi_figures(args: argparse.Namespace, device: torch.device) -> dict:
    """Median step of LEVI with every feature cached (its store filled by one pass over the batches, as after
    the first epoch) against full fine-tuning, same batches; target <= 0.5x."""
    from lightning_mtl.finetuning import LEVIFeatureCache

    generator = torch.Generator().manual_seed(0)
    size = args.levi_image_size
    batches = [(torch.randn(args.levi_batch_size, 1, size, size, generator=generator).to(device),
                torch.randint(0, 10, (args.levi_batch_size,), generator=generator).to(device))
               for _ in range(args.steps)]  # fmt: skip
    times: dict[str, list[float]] = {"levi_cached": [], "full_finetune": []}
    for _ in range(args.repeats):
        full = levi_side("full", size, args.levi_width).to(device).train()
        times["full_finetune"].append(per_step(levi_run(full, batches, device), args.warmup))
        levi = levi_side("levi", size, args.levi_width).to(device).train()
        store = LEVIFeatureCache().store
        with torch.no_grad():
            for x, _ in batches:  # the first epoch: every batch computed once and stored
                store.lookup(x, levi.backbone_features)
        levi.feature_cache = store
        times["levi_cached"].append(per_step(levi_run(levi, batches, device), args.warmup))
    ms = {name: 1000 * median(values) for name, values in times.items()}
    ratio = ms["levi_cached"] / ms["full_finetune"]
    print(f"LEVI: DigitsCNN ({args.levi_width}, {2 * args.levi_width}) on {size}x{size} inputs, batch "
          f"{args.levi_batch_size}: full fine-tuning {ms['full_finetune']:.2f} ms/step, LEVI with cached features "
          f"{ms['levi_cached']:.2f} ms/step, ratio {ratio:.3f} (target <= 0.50)")  # fmt: skip
    return {"levi_cached_ms": round(ms["levi_cached"], 3), "levi_full_finetune_ms": round(ms["full_finetune"], 3),
            "levi_vs_full_finetune": round(ratio, 4),
            "levi_target": {f"{device.type}_levi_vs_full_finetune_le_0.50": "met" if ratio <= 0.5 else "missed"}}  # fmt: skip


if __name__ == "__main__":
    main()
