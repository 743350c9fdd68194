"""Moved to :mod:`lightning_mtl._features` (shared by every family); kept so old imports still work."""

from lightning_mtl._features import (
    batch_features,
    check_feature_hook,
    check_labelled,
    check_num_classes,
    feature_extractor,
)

__all__ = ["batch_features", "check_feature_hook", "check_labelled", "check_num_classes", "feature_extractor"]
