"""Self-supervised learning: Barlow Twins, Mixed Barlow Twins, their losses, augmentations, the
offline linear evaluation of a frozen backbone and the online monitors (kNN, linear probe)."""

from lightning_mtl.ssl.augmentations import EvalTransform, SSLAugmentation, TwoViews
from lightning_mtl.ssl.barlow_twins import BarlowTwins, build_projector, split_views
from lightning_mtl.ssl.knn import KNNMonitor, weighted_knn_predict
from lightning_mtl.ssl.linear_eval import LinearEvaluation, load_backbone_weights
from lightning_mtl.ssl.linear_probe import OnlineLinearProbe
from lightning_mtl.ssl.losses import barlow_twins_loss, cross_correlation, mixed_barlow_twins_loss, standardize
from lightning_mtl.ssl.mixed_barlow_twins import MixedBarlowTwins

__all__ = [
    "BarlowTwins",
    "EvalTransform",
    "KNNMonitor",
    "LinearEvaluation",
    "MixedBarlowTwins",
    "OnlineLinearProbe",
    "SSLAugmentation",
    "TwoViews",
    "barlow_twins_loss",
    "build_projector",
    "cross_correlation",
    "load_backbone_weights",
    "mixed_barlow_twins_loss",
    "split_views",
    "standardize",
    "weighted_knn_predict",
]
