"""Online and offline class-incremental learning: the Si-Blurry stream, prompts on timm ViTs, MVP,
OVOR (OnePrompt + virtual outlier regularization), L2P, DualPrompt, ER and the linear baseline.

The stream (:class:`SiBlurryStream`) turns any image data module into the training loop's batches and
a schedule; the modules subclass :class:`ContinualModule`; the anytime metrics come from
:class:`~lightning_mtl.continual.AnytimeEvaluation`, the outlier phase of OVOR from
:class:`VirtualOutlierRegularization`, which works with every module here.
"""

from lightning_mtl.continual.anytime import AnytimeEvaluation, evaluation_plan
from lightning_mtl.continual.base import ContinualModule, mask_unseen
from lightning_mtl.continual.dualprompt import DualPrompt
from lightning_mtl.continual.er import ER, LinearBaseline
from lightning_mtl.continual.l2p import L2P
from lightning_mtl.continual.metrics import (
    accuracy_matrix,
    anytime_auc,
    average_accuracy,
    class_accuracy,
    forgetting_last,
    last_accuracy,
)
from lightning_mtl.continual.mvp import MVP
from lightning_mtl.continual.oneprompt import OnePrompt
from lightning_mtl.continual.prompts import PromptedViT, PromptPool, build_prompted_vit, create_vit
from lightning_mtl.continual.stream import SiBlurrySplit, SiBlurryStream, StreamBatch, StreamStep, si_blurry_split
from lightning_mtl.continual.transforms import ViTEvalTransform, ViTTrainTransform
from lightning_mtl.continual.vor import VirtualOutlierRegularization

# the registry the shared tests parametrize over: every class-incremental method by its config name
METHODS: dict[str, type[ContinualModule]] = {
    "mvp": MVP,
    "ovor": OnePrompt,
    "l2p": L2P,
    "dualprompt": DualPrompt,
    "er": ER,
    "linear": LinearBaseline,
}

__all__ = [
    "AnytimeEvaluation",
    "DualPrompt",
    "ER",
    "L2P",
    "METHODS",
    "MVP",
    "ContinualModule",
    "LinearBaseline",
    "OnePrompt",
    "PromptPool",
    "PromptedViT",
    "SiBlurrySplit",
    "SiBlurryStream",
    "StreamBatch",
    "StreamStep",
    "ViTEvalTransform",
    "ViTTrainTransform",
    "VirtualOutlierRegularization",
    "accuracy_matrix",
    "anytime_auc",
    "average_accuracy",
    "build_prompted_vit",
    "class_accuracy",
    "create_vit",
    "evaluation_plan",
    "forgetting_last",
    "last_accuracy",
    "mask_unseen",
    "si_blurry_split",
]
