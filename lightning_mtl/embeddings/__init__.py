"""Text embeddings: bi-encoders over Hugging Face encoders, MNR / InfoNCE losses, mixture-of-experts surgery
with enforced routing, pair and retrieval data, and retrieval / pair-classification evaluation."""

from lightning_mtl.embeddings.bi_encoder import BiEncoder, pool_tokens
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

__all__ = [
    "BiEncoder",
    "CosineSimilarityLoss",
    "EnforcedRoutingExperts",
    "MNRLoss",
    "MNRPlusLoss",
    "cosine_similarity_loss",
    "create_loss",
    "list_losses",
    "mnr_loss",
    "mnr_plus_loss",
    "pool_tokens",
    "moe_surgery",
    "register_loss",
    "routing",
    "similarity_matrix",
]
