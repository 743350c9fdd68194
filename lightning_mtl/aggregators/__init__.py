"""Multi-task loss weightings and gradient aggregators, one file per method, registered by name."""

from lightning_mtl.aggregators.base import Aggregator, GramianWeighting, JacobianAggregator, LossWeighting
from lightning_mtl.aggregators.dwa import DynamicWeightAverage
from lightning_mtl.aggregators.famo import FAMO
from lightning_mtl.aggregators.gradnorm import GradNorm
from lightning_mtl.aggregators.linear import LinearScalarization
from lightning_mtl.aggregators.registry import (
    AggregatorName,
    create_aggregator,
    get_aggregator_class,
    list_aggregators,
    register_aggregator,
)
from lightning_mtl.aggregators.rlw import RandomLossWeighting
from lightning_mtl.aggregators.scale_invariant import ScaleInvariantLS
from lightning_mtl.aggregators.uncertainty import UncertaintyWeighting

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
from lightning_mtl.aggregators.aligned_mtl import AlignedMTL
from lightning_mtl.aggregators.cagrad import CAGrad
from lightning_mtl.aggregators.dbmtl import DBMTL
from lightning_mtl.aggregators.dualproj import DualProj
from lightning_mtl.aggregators.fairgrad import FairGrad
from lightning_mtl.aggregators.graddrop import GradDrop
from lightning_mtl.aggregators.gradvac import GradVac
from lightning_mtl.aggregators.imtl import IMTLG
from lightning_mtl.aggregators.mgda import MGDA
from lightning_mtl.aggregators.nashmtl import NashMTL
from lightning_mtl.aggregators.pcgrad import PCGrad
from lightning_mtl.aggregators.upgrad import UPGrad

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
