"""Self Positioning: one learned merge coefficient per task vector, fitted on a task-balanced probe set."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call

from lightning_mtl._hparams import save_init_hyperparameters
from lightning_mtl.merging._state import load_state, select_prefix

__all__ = ["SelfPositioning"]


class _Method(nn.Module):
    """Calls one method of ``inner``: :func:`functional_call` then runs any method, not only ``forward``."""

    def __init__(self, inner: nn.Module, name: str) -> None:
        super().__init__()
        self.inner, self.name = inner, name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, self.name)(*args, **kwargs)


def _batch_size(batch: Any) -> int:
    """The length of the first tensor found in a (nested) batch; 1 when there is none."""
    if isinstance(batch, Tensor):
        return len(batch) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, list | tuple) else ()
    for value in values:
        size = _batch_size(value)
        if size:
            return size
    return 1


class SelfPositioning(pl.LightningModule):
    """A model whose weights are ``theta_0 + sum_t alpha_t tau_t``, the coefficients ``alpha`` (one per task
    vector) the only trainable parameters, learned by gradient descent on a task-balanced probe set.

    Li, Nie, Zhang, Long, Zhang, Xie, "Improving General Text Embedding Model: Tackling Task Conflict and Data
    Imbalance through Model Merging", arXiv 2410.15035, 2024 ("Self Positioning": train one embedding model
    per task from one pre-trained model, then search the interpolation space of their task vectors
    ``tau_t = theta_t - theta_0`` by SGD on a small probe set balanced across tasks, with the training loss,
    for text embeddings a contrastive loss with in-batch negatives). No official code was found; the
    coefficients' start (``init``), the optimizer and the probe size here are choices, not the paper's.

    Any model works: ``model`` holds ``theta_0`` (a :class:`~lightning_mtl.embeddings.BiEncoder` built from
    the pre-trained folder or checkpoint, a classifier, ...) and its method ``objective`` maps a batch to a
    scalar loss (a ``BiEncoder``'s ``batch_loss``: MNR over in-batch negatives). Its weights are rebuilt at
    every call (in float32, outside autocast) and applied with :func:`torch.func.functional_call`, so
    ``theta_0`` is never edited in place and ``dL/dalpha_t = <dL/dtheta, tau_t>``. The model runs in eval
    mode (no dropout: the gradient of a handful of coefficients needs no noise). Floating buffers an
    expert holds (BatchNorm's running statistics) follow the same coefficients, detached; a merged
    variance is clamped at 0. With ``aTLAS`` (:class:`~lightning_mtl.merging.ATLAS`) this is its
    ``granularity: task`` case for any loss; ``ATLAS`` itself is built for classifiers with heads.

    Evaluation: ``validation_step`` / ``test_step`` log ``val/loss`` / ``test/loss`` (the objective at the
    merged weights); :meth:`encode` runs the model's ``encode`` at the merged weights, so the embedding
    family's ``RetrievalEvaluation`` and ``PairClassificationEvaluation`` callbacks score the merged model
    as they score a ``BiEncoder``. ``validate`` without ``fit`` scores fixed coefficients: ``init: 1/T`` is
    weight averaging, ``init: lambda`` task arithmetic, a one-hot ``init`` the expert itself.
    Logged while training: ``train/loss`` and ``train/coef/<task>``.

    Trainer flags: ``32-true``, ``bf16-mixed`` / ``16-mixed`` (weights merged in float32), gradient clipping,
    accumulation and DDP (the coefficients' gradients are averaged over ranks: for a mean loss over equal
    shares the single-process update on the concatenated batch, tested with 2 gloo processes; a ``BiEncoder``
    objective gathers every rank's embeddings first, as in its own training).
    The checkpoint holds ``theta_0`` and the coefficients; the task vectors are rebuilt from ``experts``
    when the module is built again (give the same ones to resume). :meth:`merged_state_dict` is the merged
    model's state dict, for ``model.load_state_dict``.

    Args:
        model: the model with the pre-trained weights ``theta_0``.
        experts: task -> a fine-tuned checkpoint (Lightning ``.ckpt``, ``.pt``, ``.safetensors``) or state dict
            of the same model (its entries under ``prefix``).
        objective: the name of ``model``'s method that maps a batch to the loss (``batch_loss`` for a
            ``BiEncoder``).
        init: the coefficients' start: one number for every task, or task -> number (default ``1/T``: weight
            averaging, a point inside the interpolation space).
        include: merge only entries whose names start so (default: every floating entry of ``model``).
        prefix: where the model's entries are in an expert's state dict (``""``: at the top, as a checkpoint
            of the same LightningModule has them).
        optimizer: optimizer factory, called with the coefficients (AdamW).
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        model: nn.Module,
        experts: dict[str, Any],
        objective: str = "batch_loss",
        init: float | dict[str, float] | None = None,
        include: list[str] | None = None,
        prefix: str = "",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        save_init_hyperparameters(self, ["model", "experts", "optimizer", "lr_scheduler"])
        if not experts:
            raise ValueError("experts is empty: give task -> the checkpoint of the model fine-tuned on that task")
        if not callable(getattr(model, objective, None)):
            raise ValueError(f"objective {objective!r} is not a method of {type(model).__name__}: name its batch loss")
        self.model = model.requires_grad_(False)
        self.objective, self.tasks = objective, tuple(experts)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        base = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        if include is not None:
            base = {k: v for k, v in base.items() if any(k.startswith(p) for p in include)}
            if not base:
                raise ValueError(f"include {include} selects no floating entry of {type(model).__name__}")
        parameters = {name for name, _ in model.named_parameters()}
        self.entry_names = tuple(base)
        self.is_parameter = tuple(name in parameters for name in self.entry_names)
        vectors = [self._task_vector(task, source, base, prefix) for task, source in experts.items()]
        for e, name in enumerate(self.entry_names):
            self.register_buffer(f"_tau{e}", torch.stack([v[name] for v in vectors]), persistent=False)
        self.coefficients = nn.Parameter(self._start(init))
        # read by BestMetricsSummary; the evaluation callbacks add theirs
        self.metric_directions: dict[str, bool] = {"train/loss": False, "val/loss": False, "test/loss": False}
        self.train()

    # -- construction ---------------------------------------------------------------------------------------
    @staticmethod
    def _task_vector(task: str, source: Any, base: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
        state = load_state(source)
        if prefix:
            state = select_prefix(state, prefix, what=f"weights of expert {task!r}")
        vector = {}
        for name, theta_0 in base.items():
            if name not in state:
                raise KeyError(f"expert {task!r} has no entry {name!r} of the model (prefix {prefix!r})")
            if tuple(state[name].shape) != tuple(theta_0.shape):
                raise ValueError(f"expert {task!r}: entry {name!r} has shape {tuple(state[name].shape)}, "
                                 f"the model's is {tuple(theta_0.shape)}")  # fmt: skip
            vector[name] = state[name].float() - theta_0.detach().float().cpu()
        if not math.isfinite(sum(float(v.abs().sum()) for v in vector.values())):
            raise ValueError(f"expert {task!r}: the weights hold NaN or infinite values")
        return vector

    def _start(self, init: float | Mapping[str, float] | None) -> Tensor:
        if init is None:
            return torch.full((len(self.tasks),), 1.0 / len(self.tasks))
        if isinstance(init, Mapping):
            unknown = [task for task in init if task not in self.tasks]
            if unknown or len(init) != len(self.tasks):
                name = unknown[0] if unknown else next(t for t in self.tasks if t not in init)
                raise KeyError(f"init names {name!r}: give a number for each of the tasks {list(self.tasks)}")
            return torch.tensor([float(init[task]) for task in self.tasks])
        return torch.full((len(self.tasks),), float(init))

    # -- the merged model -----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> SelfPositioning:
        super().train(mode)
        self.model.eval()  # frozen: no dropout, BatchNorm keeps the merged running statistics
        return self

    def coefficient_dict(self) -> dict[str, float]:
        """Task -> its current coefficient."""
        return {task: float(c) for task, c in zip(self.tasks, self.coefficients.detach().cpu())}

    def merged_state(self) -> dict[str, Tensor]:
        """The merged entries ``theta_0 + sum_t alpha_t tau_t`` (differentiable in ``alpha`` for parameters)."""
        with torch.autocast(self.device.type, enabled=False):
            state = self.model.state_dict(keep_vars=True)
            alpha = self.coefficients.float()
            merged = {}
            for e, (name, is_parameter) in enumerate(zip(self.entry_names, self.is_parameter)):
                tau: Tensor = getattr(self, f"_tau{e}")
                delta = torch.tensordot(alpha if is_parameter else alpha.detach(), tau, dims=1)
                merged[name] = state[name] + delta.to(state[name].dtype)
                if name.endswith("running_var"):
                    merged[name] = merged[name].clamp_min(0.0)  # beyond the experts a variance could go negative
        return merged

    def merged_state_dict(self) -> dict[str, Tensor]:
        """The merged model's full state dict (detached): ``model.load_state_dict`` deploys it."""
        state = dict(self.model.state_dict())
        state.update({k: v.detach().clone() for k, v in self.merged_state().items()})
        return state

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``model.<method>(*args, **kwargs)`` at the merged weights."""
        return functional_call(_Method(self.model, method), {f"inner.{k}": v for k, v in self.merged_state().items()},
                               args, kwargs)  # fmt: skip

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward at the merged weights."""
        return self.call("forward", *args, **kwargs)

    @torch.no_grad()
    def encode(self, *args: Any, **kwargs: Any) -> Any:
        """The model's ``encode`` (a ``BiEncoder``'s embeddings of texts) at the merged weights."""
        return self.call("encode", *args, **kwargs)

    # -- training ---------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        precision = str(self.trainer.precision)
        if precision in ("16-true", "bf16-true", "64-true"):
            raise ValueError(
                "SelfPositioning keeps theta_0 and the task vectors in float32: use precision='16-mixed' or "
                f"'bf16-mixed' instead of precision={precision!r}"
            )

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([self.coefficients])
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.call(self.objective, batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=_batch_size(batch))
        for task, value in self.coefficient_dict().items():
            self.log(f"train/coef/{task}", value, batch_size=1)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.call(self.objective, batch), sync_dist=True, batch_size=_batch_size(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test/loss", self.call(self.objective, batch), sync_dist=True, batch_size=_batch_size(batch))
