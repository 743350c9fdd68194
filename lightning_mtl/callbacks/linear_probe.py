"""Moved to :mod:`lightning_mtl.ssl.linear_probe` (the family owns its callbacks); kept so old imports and config
class paths still work."""

from lightning_mtl.ssl.linear_probe import OnlineLinearProbe

__all__ = ["OnlineLinearProbe"]
