"""Cost of mixture-of-experts surgery with enforced routing: a BiEncoder training step with N = 5 experts
against the dense model's step, same batch, same process.

A small random BERT (4 layers, hidden 256, feed-forward 1024; ``--quick``: 2 layers, hidden 128), a batch of
token pairs whose domains are spread over the 5 experts, MNR loss, fused AdamW. Sides, timed in turn for
``--repeats`` rounds (median step time after ``--warmup`` steps, then the median over rounds):

- dense: the encoder as built;
- moe (grouped): the pair collate's order (rows sorted by domain): each expert runs on a contiguous slice;
- moe (unsorted): the same rows in random order: one gather and one scatter per block;
- moe (per sample): each sample through its expert alone, as the official code's sentence switch
  (``SentenceSwitchMoeBlock``) does, for the cost of that choice.

Target: moe (grouped) <= 1.15x dense (the issue's). The closing JSON line says "met" or "missed".

    python benchmarks/embeddings.py            # full run
    python benchmarks/embeddings.py --quick    # under a minute on a 2-core CPU
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import emit, median, now, per_step

from lightning_mtl.embeddings import BiEncoder, EnforcedRoutingExperts


def _per_sample(self: EnforcedRoutingExperts, *args: Any) -> torch.Tensor:
    """The official switch's loop: sample i through expert ids[i] alone."""
    ids = self.bench_ids  # type: ignore[attr-defined]
    rows = [
        self.experts[int(ids[i])](*(a[i : i + 1] if isinstance(a, torch.Tensor) else a for a in args))
        for i in range(len(ids))
    ]
    return torch.cat(rows)


def _batch(n: int, length: int, vocab: int, experts: int, seed: int, sort: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    domain = torch.randint(0, experts, (n,), generator=g)
    if sort:
        domain = domain.sort().values

    def side() -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(5, vocab, (n, length), generator=g),
                "attention_mask": torch.ones(n, length, dtype=torch.long)}  # fmt: skip

    return {"anchor": side(), "positive": side(), "domain": domain}


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device)


def _steps(module: BiEncoder, batch: dict[str, Any], steps: int, device: torch.device,
           before: Callable[[], None] = lambda: None) -> list[float]:  # fmt: skip
    """A plain training loop (forward, MNR loss, backward, AdamW step); one timestamp per finished step."""
    module = module.to(device).train()
    # fused: one kernel for all parameters on both sides; the for-each loop would charge the experts'
    # extra parameter tensors to the MoE side
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
    stamps = []
    for _ in range(steps):
        before()
        loss = module.batch_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append(now(device))
    return stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (under a minute on a 2-core CPU)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    config = dict(model_type="bert", vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=1024, max_position_embeddings=512, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)  # fmt: skip
    if args.quick:
        args.steps, args.warmup, args.repeats, args.length = 8, 2, 3, 32
        config.update(hidden_size=128, num_hidden_layers=2, intermediate_size=512)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    torch.manual_seed(0)
    dense = BiEncoder(config=config)
    moe = copy.deepcopy(dense)
    moe.num_experts = args.experts
    from lightning_mtl.embeddings import moe_surgery

    moe_surgery(moe.encoder.model, args.experts)
    sorted_batch = _to(_batch(args.batch_size, args.length, 4096, args.experts, 0, sort=True), device)
    shuffled = _to(_batch(args.batch_size, args.length, 4096, args.experts, 0, sort=False), device)
    blocks = [m for m in moe.modules() if isinstance(m, EnforcedRoutingExperts)]

    def per_sample_on() -> None:
        for block in blocks:
            block.bench_ids = shuffled["domain"].tolist()  # type: ignore[attr-defined]
            block.forward = _per_sample.__get__(block)  # type: ignore[method-assign]

    def per_sample_off() -> None:
        for block in blocks:
            del block.forward

    times: dict[str, list[float]] = {"dense": [], "moe_grouped": [], "moe_unsorted": [], "moe_per_sample": []}
    for _ in range(args.repeats):  # alternate, so drifts of the machine hit all sides alike
        times["dense"].append(per_step(_steps(copy.deepcopy(dense), sorted_batch, args.steps, device), args.warmup))
        times["moe_grouped"].append(per_step(_steps(copy.deepcopy(moe), sorted_batch, args.steps, device), args.warmup))
        times["moe_unsorted"].append(per_step(_steps(copy.deepcopy(moe), shuffled, args.steps, device), args.warmup))
        per_sample_on()
        times["moe_per_sample"].append(per_step(_steps(moe, shuffled, args.steps, device), args.warmup))
        per_sample_off()
    ms = {k: 1000 * median(v) for k, v in times.items()}
    ratios = {k: ms[k] / ms["dense"] for k in ms}
    print(f"device {device.type}, batch {args.batch_size} pairs x {args.length} tokens, {args.experts} experts, "
          f"hidden {config['hidden_size']} x {config['num_hidden_layers']} layers, {args.steps} steps "
          f"({args.warmup} warm-up), {args.repeats} rounds, torch threads {torch.get_num_threads()}")  # fmt: skip
    for name, value in ms.items():
        print(f"{name:16s}{value:9.2f} ms/step  {ratios[name]:6.3f}x dense")
    met = ratios["moe_grouped"] <= 1.15
    targets = {f"{device.type}_moe_grouped_vs_dense_le_1.15": "met" if met else "missed"}
    print(f"targets: {targets}")
    emit({"benchmark": "embeddings", "device": device.type, "batch_size": args.batch_size, "length": args.length,
          "experts": args.experts, "steps": args.steps, **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
          **{f"{k}_ratio": round(v, 4) for k, v in ratios.items() if k != "dense"}, "target": 1.15,
          "targets": targets})  # fmt: skip


if __name__ == "__main__":
    main()
