"""Text embeddings: bi-encoders over Hugging Face encoders, MNR / InfoNCE losses, mixture-of-experts surgery
with enforced routing, pair and retrieval data, and retrieval / pair-classification evaluation."""

from lightning_mtl.embeddings.bi_encoder import BiEncoder, pool_tokens
from lightning_mtl.embeddings.embedded import embedded_pairs
from lightning_mtl.embeddings.losses import (
    CosineSimilarityLoss,
    MNRLoss,
    MNRPlusLoss,
    cosine_similarity_loss,
    create_loss,
    list_losses,
    mnr_loss,
    mnr_plus_loss,
    register_loss,
    similarity_matrix,
)
from lightning_mtl.embeddings.moe import EnforcedRoutingExperts, moe_surgery, routing
from lightning_mtl.embeddings.pairs import PairCollate, PairsDataModule, read_rows, train_wordpiece

__all__ = [
    "BiEncoder",
    "CosineSimilarityLoss",
    "EnforcedRoutingExperts",
    "MNRLoss",
    "MNRPlusLoss",
    "PairCollate",
    "PairsDataModule",
    "cosine_similarity_loss",
    "create_loss",
    "embedded_pairs",
    "list_losses",
    "mnr_loss",
    "mnr_plus_loss",
    "pool_tokens",
    "read_rows",
    "moe_surgery",
    "register_loss",
    "routing",
    "similarity_matrix",
    "train_wordpiece",
]
