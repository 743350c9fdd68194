"""Fine-tuning a pre-trained model by touching very little of it: LoFiT head interventions on any Hugging
Face decoder."""

from lightning_mtl.finetuning.hf_models import build_causal_lm
from lightning_mtl.finetuning.intervention import (
    AttentionLayout,
    LoFiTIntervention,
    find_attention_projections,
    load_intervention,
)

__all__ = [
    "AttentionLayout",
    "LoFiTIntervention",
    "build_causal_lm",
    "find_attention_projections",
    "load_intervention",
]
