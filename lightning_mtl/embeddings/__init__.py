"""Text embeddings: bi-encoders over Hugging Face encoders, MNR / InfoNCE losses, mixture-of-experts surgery
with enforced routing, distilled sentence embeddings, pair and retrieval data, BEIR-layout training data, length bucketing, and retrieval / pair-classification evaluation."""

from lightning_mtl.embeddings.beir import BeirPairsDataModule, read_beir, read_jsonl, read_qrels
from lightning_mtl.embeddings.bi_encoder import BiEncoder, pool_tokens
from lightning_mtl.embeddings.buckets import LengthBucketSampler
from lightning_mtl.embeddings.dse import DistilledSentenceEmbedding, PairHead, dse_loss, pair_features
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
from lightning_mtl.embeddings.pair_classification import (
    PairClassificationEvaluation,
    f1_at_threshold,
    labelled_pairs,
    max_f1_threshold,
)
from lightning_mtl.embeddings.pairs import PairCollate, PairsDataModule, read_rows, train_wordpiece
from lightning_mtl.embeddings.retrieval import RetrievalEvaluation, RetrievalSet, load_beir, retrieval_metrics
from lightning_mtl.embeddings.teacher_scores import (
    ScoredPairsDataModule,
    cached_teacher_scores,
    embedded_scored_pairs,
    overlap_teacher,
)

__all__ = [
    "BeirPairsDataModule",
    "BiEncoder",
    "CosineSimilarityLoss",
    "DistilledSentenceEmbedding",
    "EnforcedRoutingExperts",
    "LengthBucketSampler",
    "MNRLoss",
    "MNRPlusLoss",
    "PairClassificationEvaluation",
    "PairCollate",
    "PairHead",
    "PairsDataModule",
    "RetrievalEvaluation",
    "RetrievalSet",
    "ScoredPairsDataModule",
    "cached_teacher_scores",
    "cosine_similarity_loss",
    "create_loss",
    "dse_loss",
    "embedded_pairs",
    "embedded_scored_pairs",
    "f1_at_threshold",
    "labelled_pairs",
    "list_losses",
    "load_beir",
    "max_f1_threshold",
    "mnr_loss",
    "mnr_plus_loss",
    "moe_surgery",
    "overlap_teacher",
    "pair_features",
    "pool_tokens",
    "read_beir",
    "read_jsonl",
    "read_qrels",
    "read_rows",
    "register_loss",
    "retrieval_metrics",
    "routing",
    "similarity_matrix",
    "train_wordpiece",
]
