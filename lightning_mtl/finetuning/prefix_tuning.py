"""Prefix tuning (P-tuning v2) through ``peft``: trainable key / value prefixes at every layer."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_mtl.finetuning.adapters import import_peft, register_adapter

__all__ = ["prefix_tuning"]


@register_adapter("prefix")
def prefix_tuning(
    model: nn.Module,
    num_virtual_tokens: int = 16,
    prefix_projection: bool = False,
    encoder_hidden_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Wrap a ``transformers`` encoder with deep prefix tuning: every attention layer attends to
    ``num_virtual_tokens`` trained key / value vectors before the input's own.

    Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021; Liu et al.,
    "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales and Tasks", ACL
    2022 (prefixes at every layer, no reparameterization for NLU), through Hugging Face ``peft``. Only the
    prefix table (and the projection, if any) is trainable.

    Args:
        model: the base encoder (its weights are frozen by ``peft``).
        num_virtual_tokens: prefix length.
        prefix_projection: learn the prefixes through a two-layer MLP (Li and Liang) instead of directly
            (P-tuning v2).
        encoder_hidden_size: hidden size of that MLP (default the model's).
        **kwargs: further ``peft.PrefixTuningConfig`` fields.
    """
    peft = import_peft()
    if encoder_hidden_size is not None:
        kwargs["encoder_hidden_size"] = encoder_hidden_size
    config = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=num_virtual_tokens,
                                     prefix_projection=prefix_projection, **kwargs)  # fmt: skip
    return peft.get_peft_model(model, config)
