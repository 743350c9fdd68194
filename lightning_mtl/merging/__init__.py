"""Weight-space composition: task vectors, training-free merges (task arithmetic, TIES, weight averaging),
a coefficient search over ``trainer.validate`` and the ``merge`` command; learned compositions of task vectors
(aTLAS, Self Positioning) and skill localization by grafting."""

from lightning_mtl.merging.atlas import ATLAS
from lightning_mtl.merging.averaging import WeightAveraging
from lightning_mtl.merging.grafting import Grafting, apply_graft, load_mask, mask_iou, save_mask
from lightning_mtl.merging.pretrained import PretrainedEncoder
from lightning_mtl.merging.registry import Merge, create_merge, get_merge_class, list_merges, register_merge
from lightning_mtl.merging.search import search_coefficient
from lightning_mtl.merging.self_positioning import SelfPositioning
from lightning_mtl.merging.task_arithmetic import TaskArithmetic
from lightning_mtl.merging.task_vector import TaskVector, load_state_dict
from lightning_mtl.merging.ties import TIES, kth_smallest_magnitude

__all__ = [
    "ATLAS",
    "Grafting",
    "PretrainedEncoder",
    "SelfPositioning",
    "apply_graft",
    "load_mask",
    "mask_iou",
    "save_mask",
    "TIES",
    "Merge",
    "TaskArithmetic",
    "TaskVector",
    "WeightAveraging",
    "create_merge",
    "get_merge_class",
    "kth_smallest_magnitude",
    "list_merges",
    "load_state_dict",
    "register_merge",
    "search_coefficient",
]
