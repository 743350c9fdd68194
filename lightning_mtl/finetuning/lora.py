"""LoRA through ``peft``: trainable low-rank updates beside frozen linear layers."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_mtl.finetuning.adapters import import_peft, register_adapter

__all__ = ["lora"]


@register_adapter("lora")
def lora(
    model: nn.Module,
    r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.1,
    target_modules: list[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Wrap a ``transformers`` model with LoRA: ``W x + (alpha / r) B A x`` with ``B`` zero at the start.

    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, through Hugging Face
    ``peft`` (Mangrulkar et al., 2022). At initialization the wrapped model computes exactly what the base
    model computes. Only ``A`` and ``B`` are trainable.

    Args:
        model: the base model (its weights are frozen by ``peft``).
        r: rank of the update.
        lora_alpha: scale numerator ``alpha``.
        lora_dropout: dropout on the adapter's input.
        target_modules: names of the linear layers that get an update (default: ``peft``'s choice for the
            architecture, the attention's query and value projections for BERT-like encoders).
        **kwargs: further ``peft.LoraConfig`` fields.
    """
    peft = import_peft()
    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                             **kwargs)  # fmt: skip
    return peft.get_peft_model(model, config)
