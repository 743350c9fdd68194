"""Moved to :mod:`lightning_mtl.ssl.knn` (the family owns its callbacks); kept so old imports and config
class paths still work."""

from lightning_mtl.ssl.knn import KNNMonitor, weighted_knn_predict

__all__ = ["KNNMonitor", "weighted_knn_predict"]
