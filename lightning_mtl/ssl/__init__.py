"""Self-supervised learning: Barlow Twins, Mixed Barlow Twins, their losses, augmentations and the
offline linear evaluation of a frozen backbone."""

from lightning_mtl.ssl.augmentations import EvalTransform, SSLAugmentation, TwoViews
from lightning_mtl.ssl.barlow_twins import BarlowTwins, build_projector, split_views
from lightning_mtl.ssl.linear_eval import LinearEvaluation, load_backbone_weights
from lightning_mtl.ssl.losses import barlow_twins_loss, cross_correlation, mixed_barlow_twins_loss, standardize
from lightning_mtl.ssl.mixed_barlow_twins import MixedBarlowTwins

__all__ = [
    "BarlowTwins",
    "EvalTransform",
    "LinearEvaluation",
    "MixedBarlowTwins",
    "SSLAugmentation",
    "TwoViews",
    "barlow_twins_loss",
    "build_projector",
    "cross_correlation",
    "load_backbone_weights",
    "mixed_barlow_twins_loss",
    "split_views",
    "standardize",
]
