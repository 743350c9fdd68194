"""Kept for branches written against the old path: the builders live in :mod:`tests.fixtures`."""

from tests.fixtures.jacobians import badly_scaled_jacobians  # noqa: F401
from tests.fixtures.trainers import one_thread, tiny_module, tiny_multidigits, tiny_trainer  # noqa: F401
