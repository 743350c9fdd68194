"""Multi-task loss weightings and gradient aggregators, one file per method, registered by name."""

from lightning_mtl.aggregators.base import Aggregator, GramianWeighting, JacobianAggregator, LossWeighting
from lightning_mtl.aggregators.dwa import DynamicWeightAverage
from lightning_mtl.aggregators.famo import FAMO
from lightning_mtl.aggregators.gradnorm import GradNorm
from lightning_mtl.aggregators.linear import LinearScalarization
from lightning_mtl.aggregators.rlw import RandomLossWeighting
from lightning_mtl.aggregators.scale_invariant import ScaleInvariantLS
from lightning_mtl.aggregators.uncertainty import UncertaintyWeighting
from lightning_mtl.aggregators.registry import (
    AggregatorName,
    create_aggregator,
    get_aggregator_class,
    list_aggregators,
    register_aggregator,
)

__all__ = [
    "Aggregator",
    "AggregatorName",
    "GramianWeighting",
    "JacobianAggregator",
    "DynamicWeightAverage",
    "FAMO",
    "GradNorm",
    "LinearScalarization",
    "RandomLossWeighting",
    "ScaleInvariantLS",
    "UncertaintyWeighting",
    "LossWeighting",
    "create_aggregator",
    "get_aggregator_class",
    "list_aggregators",
    "register_aggregator",
]

# Gradient aggregators (Gramian weightings and Jacobian aggregators); importing registers them.
from lightning_mtl.aggregators.aligned_mtl import AlignedMTL  # noqa: E402
from lightning_mtl.aggregators.cagrad import CAGrad  # noqa: E402
from lightning_mtl.aggregators.dbmtl import DBMTL  # noqa: E402
from lightning_mtl.aggregators.dualproj import DualProj  # noqa: E402
from lightning_mtl.aggregators.fairgrad import FairGrad  # noqa: E402
from lightning_mtl.aggregators.graddrop import GradDrop  # noqa: E402
from lightning_mtl.aggregators.gradvac import GradVac  # noqa: E402
from lightning_mtl.aggregators.imtl import IMTLG  # noqa: E402
from lightning_mtl.aggregators.mgda import MGDA  # noqa: E402
from lightning_mtl.aggregators.nashmtl import NashMTL  # noqa: E402
from lightning_mtl.aggregators.pcgrad import PCGrad  # noqa: E402
from lightning_mtl.aggregators.upgrad import UPGrad  # noqa: E402

__all__ += [
    "AlignedMTL",
    "CAGrad",
    "DBMTL",
    "DualProj",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "IMTLG",
    "MGDA",
    "NashMTL",
    "PCGrad",
    "UPGrad",
]
