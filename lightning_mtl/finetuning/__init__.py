"""Fine-tuning a pre-trained model by touching very little of it: LoFiT head interventions on any Hugging
Face decoder (with its preference-pair data and SFT / DPO losses), the supervised contrastive loss, prompt
tuned embedding classification (soft prompts + a multi-label head) with its multi-label text data, LoRA
and prefix tuning through ``peft`` with EDA augmentation, embedding mixup and CE + SupCon on few labelled
sentences, and LEVI, a frozen backbone's layers ensembled with a small model trained from scratch."""

from lightning_mtl.finetuning.adapters import create_adapter, list_adapters, register_adapter
from lightning_mtl.finetuning.docstring_topics import docstring_topics
from lightning_mtl.finetuning.eda import EDA, random_deletion, random_insertion, random_swap, synonym_replacement
from lightning_mtl.finetuning.few_shot_text import FewShotText
from lightning_mtl.finetuning.hf_models import build_causal_lm
from lightning_mtl.finetuning.intervention import (
    AttentionLayout,
    LoFiTIntervention,
    find_attention_projections,
    load_intervention,
)
from lightning_mtl.finetuning.levi import LEVI, LEVIFeatureCache, pool_view
from lightning_mtl.finetuning.lofit import LoFiT
from lightning_mtl.finetuning.lora import lora
from lightning_mtl.finetuning.losses import answer_token_accuracy, dpo_loss, sequence_log_probs, sft_loss
from lightning_mtl.finetuning.multilabel_data import EMBEDDED_LABELS, MultiLabelText, embedded_docstrings
from lightning_mtl.finetuning.peft_classifier import PEFTClassifier
from lightning_mtl.finetuning.preference_data import PreferencePairs, collate_pairs, encode_pair, synthetic_pairs
from lightning_mtl.finetuning.prefix_tuning import prefix_tuning
from lightning_mtl.finetuning.prompt_tuning import PromptTunedClassifier, choose_thresholds
from lightning_mtl.finetuning.supcon import SupConLoss, supervised_contrastive_loss

__all__ = [
    # LEVI
    "LEVI",
    "LEVIFeatureCache",
    "pool_view",
    # LoFiT, SupCon
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
    # PEFT with augmentation and SupCon
    "EDA",
    "FewShotText",
    "PEFTClassifier",
    "create_adapter",
    "docstring_topics",
    "list_adapters",
    "lora",
    "prefix_tuning",
    "random_deletion",
    "random_insertion",
    "random_swap",
    "register_adapter",
    "synonym_replacement",
]
