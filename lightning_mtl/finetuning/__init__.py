"""Fine-tuning a pre-trained model by touching very little of it: LoFiT head interventions on any Hugging
Face decoder (with its preference-pair data and SFT / DPO losses), the supervised contrastive loss, and
prompt tuned embedding classification (soft prompts + a multi-label head) with its multi-label text data."""

from lightning_mtl.finetuning.hf_models import build_causal_lm
from lightning_mtl.finetuning.intervention import (
    AttentionLayout,
    LoFiTIntervention,
    find_attention_projections,
    load_intervention,
)
from lightning_mtl.finetuning.lofit import LoFiT
from lightning_mtl.finetuning.losses import answer_token_accuracy, dpo_loss, sequence_log_probs, sft_loss
from lightning_mtl.finetuning.multilabel_data import EMBEDDED_LABELS, MultiLabelText, embedded_docstrings
from lightning_mtl.finetuning.preference_data import PreferencePairs, collate_pairs, encode_pair, synthetic_pairs
from lightning_mtl.finetuning.prompt_tuning import PromptTunedClassifier, choose_thresholds
from lightning_mtl.finetuning.supcon import SupConLoss, supervised_contrastive_loss

__all__ = [
    "AttentionLayout",
    "LoFiT",
    "LoFiTIntervention",
    "PreferencePairs",
    "SupConLoss",
    "answer_token_accuracy",
    "build_causal_lm",
    "collate_pairs",
    "dpo_loss",
    "encode_pair",
    "find_attention_projections",
    "load_intervention",
    "sequence_log_probs",
    "sft_loss",
    "supervised_contrastive_loss",
    "synthetic_pairs",
    # prompt tuned embedding classification
    "EMBEDDED_LABELS",
    "MultiLabelText",
    "PromptTunedClassifier",
    "choose_thresholds",
    "embedded_docstrings",
]
