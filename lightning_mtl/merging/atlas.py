"""aTLAS: learned anisotropic scaling of task vectors (one coefficient per task vector and parameter block)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call
from torchmetrics.classification import MulticlassAccuracy

from lightning_mtl._constants import MISSING_LABEL
from lightning_mtl._hparams import save_init_hyperparameters
from lightning_mtl.merging._state import linear_head, load_state, select_prefix

__all__ = ["ATLAS", "parse_granularity"]

Objective = Literal["addition", "negation", "fewshot", "tta"]


def parse_granularity(granularity: str) -> tuple[str, int]:
    """``"task"`` / ``"block"`` / ``"partition:K"`` as ``(kind, K)``; a one-sentence error otherwise."""
    kind, _, k = str(granularity).partition(":")
    if kind in ("task", "block") and not k:
        return kind, 1
    if kind == "partition" and k.isdigit() and int(k) >= 2:
        return kind, int(k)
    raise ValueError(f"granularity must be 'task', 'block' or 'partition:K' with K >= 2, got {granularity!r}")


class ATLAS(pl.LightningModule):
    """aTLAS: a frozen pre-trained encoder plus task vectors scaled by learned coefficients, the only parameters.

    Zhang, Dai, Jha, Moreau, Gould, Gu, "Knowledge Composition using Task Vectors with Learned Anisotropic
    Scaling", NeurIPS 2024 (https://arxiv.org/abs/2407.02880; official code: github.com/fredzzhang/atlas).

    The encoder's weights are ``theta = theta_0 + sum_t lambda_{t,b} tau_{t,b}`` per block ``b``, rebuilt at
    every forward (under autocast: in float32) and applied with :func:`torch.func.functional_call`, so
    ``theta_0`` is never edited in place; the gradient of a coefficient is ``<dL/dtheta_b, tau_{t,b}>``.
    Blocks are the encoder's floating-point parameters, weights and biases of every layer kind (the
    official partition code gives no coefficient to anything but 2-D weights; here nothing is left out).
    BatchNorm running statistics, which no kernel differentiates, are merged with each task's mean
    coefficient over the blocks, a merged variance clamped at 0. The encoder and the heads always run in
    eval mode (BatchNorm normalises with the merged running statistics; coefficients of 1 on one task
    vector give exactly that expert). Coefficients start at 0: training starts at ``theta_0``.

    Granularity: ``"task"`` (one coefficient per task vector, isotropic), ``"block"`` (one per task vector
    and block), ``"partition:K"`` (each block split into K parts by a fixed random assignment of its
    entries drawn from ``seed``, K coefficients per task vector and block).

    Objectives (batches are ``(x, {task: labels})``, labels :data:`~lightning_mtl.MISSING_LABEL` where a
    sample is not of that task, as :class:`~lightning_mtl.datamodules.DigitsTasks` yields them):

    * ``"addition"``: sum over ``targets`` of each task's mean cross-entropy (a task-balanced loader).
    * ``"negation"``: ``-CE(targets) + CE(control)``: forget the target, keep the control task.
    * ``"fewshot"``: the addition loss on new ``targets`` whose own vectors are not in the ``pool``.
    * ``"tta"``: test-time adaptation, FixMatch-style and unsupervised: pseudo-labels from the batch as is
      (weak view), kept where the softmax confidence is at least ``confidence``, cross-entropy on a strong
      view (random 1-pixel shift, Gaussian noise, a 3x3 cut-out; drawn from ``seed`` and the step); divided by
      the batch size, as FixMatch does. Labels are read only for validation.

    Logged: ``train/loss``, ``train/<task>/loss``; ``val/<task>/acc`` for each head with labels in the
    validation data, ``val/mean/acc`` over ``targets`` and, with ``expert_accuracy``,
    ``val/<task>/norm_acc`` (accuracy / the expert's) and ``val/mean/norm_acc``, the aTLAS recipe's
    selection metric (monitor it with a ``ModelCheckpoint`` to keep the best epoch); the same under ``test/``.

    Trainer flags: ``32-true``, ``bf16-mixed`` and ``16-mixed`` (Lightning unscales the gradients before it
    clips them, unlike the official code, which clips the scaled gradients; an optimizer that unscales by
    itself, e.g. ``fused=True``, is refused with clipping under ``16-mixed``); ``gradient_clip_val``;
    ``accumulate_grad_batches``; DDP (the coefficients' gradients are averaged over ranks: the single-process
    update on the concatenated batch when every rank has the same number of samples of each task). The
    checkpoint holds the coefficients, ``theta_0`` and the heads; the task vectors are rebuilt from
    ``experts`` / ``vectors`` when the module is built again (give the same ones to resume).

    Args:
        encoder: the encoder with the pre-trained weights ``theta_0`` loaded (e.g. a
            :class:`~lightning_mtl.merging.PretrainedEncoder`).
        experts: task -> a fine-tuned checkpoint (its ``prefix`` entries are the expert encoder, its
            ``heads.<task>`` the task's head) or the expert encoder's state dict; ``tau = expert - theta_0``.
        vectors: task -> a task vector (any mapping of encoder entry names to tensors, e.g. a ``TaskVector``);
            entries it lacks count as zero.
        heads: task -> a checkpoint to read ``heads.<task>`` from, or an ``nn.Module``; adds to / replaces the
            experts' heads (e.g. the control task's head from the pre-training checkpoint). Heads are frozen.
        pool: the task vectors used, by name (default: all of ``experts`` and ``vectors``).
        targets: tasks of the loss (default: every head but ``control``).
        control: the control task of ``"negation"``.
        objective: ``"addition"``, ``"negation"``, ``"fewshot"`` or ``"tta"``.
        granularity: ``"task"``, ``"block"`` or ``"partition:K"``.
        expert_accuracy: task -> the expert's accuracy, for the normalised accuracy.
        confidence: pseudo-label threshold of ``"tta"`` (the official 0.99).
        prefix: where the encoder's entries are in an expert checkpoint.
        seed: seed of the partitions and of the strong views.
        optimizer: optimizer factory, called with the coefficients (the recipe: AdamW, lr 1e-3, weight decay 0.1).
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        encoder: nn.Module,
        experts: dict[str, Any] | None = None,
        vectors: dict[str, Any] | None = None,
        heads: dict[str, Any] | None = None,
        pool: list[str] | None = None,
        targets: list[str] | None = None,
        control: str | None = None,
        objective: Objective = "addition",
        granularity: str = "block",
        expert_accuracy: dict[str, float] | None = None,
        confidence: float = 0.99,
        prefix: str = "encoder.",
        seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        save_init_hyperparameters(self, ["encoder", "experts", "vectors", "heads", "optimizer", "lr_scheduler"])
        self.kind, self.parts = parse_granularity(granularity)
        if objective not in ("addition", "negation", "fewshot", "tta"):
            raise ValueError(f"objective must be 'addition', 'negation', 'fewshot' or 'tta', got {objective!r}")
        self.encoder = encoder.requires_grad_(False)
        self.objective = objective
        self.confidence = float(confidence)
        self.seed = int(seed)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.expert_accuracy = dict(expert_accuracy or {})

        base = {k: v for k, v in self.encoder.state_dict().items() if v.is_floating_point()}
        self.entry_names = tuple(base)
        self.block_names = tuple(name for name, p in self.encoder.named_parameters() if p.is_floating_point())
        task_vectors, head_modules = self._read_sources(experts or {}, vectors or {}, heads or {}, base, prefix)
        self.pool = tuple(pool) if pool is not None else tuple(task_vectors)
        missing = [name for name in self.pool if name not in task_vectors]
        if missing or not self.pool:
            raise KeyError(
                f"pool names task vector {missing[0]!r}, which is not given" if missing else "no task vector"
            )
        self.heads = nn.ModuleDict(head_modules)
        self.control = control
        if objective == "negation" and (control is None or control not in self.heads):
            raise ValueError("objective 'negation' needs `control`, a task with a head (e.g. the pre-training task)")
        self.targets = tuple(targets) if targets is not None else tuple(n for n in self.heads if n != control)
        if not self.targets:
            raise ValueError("ATLAS needs a target task with a head: give experts' checkpoints or `heads`")
        for name in (*self.targets, *([control] if control else [])):
            if name not in self.heads:
                raise KeyError(f"task {name!r} has no head: give its expert checkpoint or an entry of `heads`")
        if objective == "fewshot" and set(self.targets) & set(self.pool):
            raise ValueError("objective 'fewshot' adapts to new tasks: leave the targets' own vectors out of `pool`")

        # stacked task vectors [T, *shape] per entry: plain float32 buffers, rebuilt from the sources
        for e, name in enumerate(self.entry_names):
            stacked = torch.stack([task_vectors[t].get(name, torch.zeros_like(base[name])) for t in self.pool])
            self.register_buffer(f"_tau{e}", stacked.float(), persistent=False)
        for b, name in enumerate(self.block_names):
            if self.kind == "partition":
                generator = torch.Generator().manual_seed(self.seed * 100_003 + b)
                parts = torch.randint(self.parts, (base[name].numel(),), generator=generator)
                self.register_buffer(f"_part{b}", parts, persistent=False)
        self.owners = tuple(self._owner(name, base) for name in self.entry_names)
        blocks = len(self.block_names) if self.kind != "task" else 1
        self.coefficients = nn.Parameter(torch.zeros(len(self.pool), blocks, self.parts))
        self.metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict(
                    {
                        name: MulticlassAccuracy(head.out_features, average="micro", ignore_index=MISSING_LABEL)  # type: ignore[arg-type]
                        for name, head in self.heads.items()
                    }
                )
                for stage in ("val", "test")
            }
        )
        # read by BestMetricsSummary: every logged accuracy is better higher
        keys = [f"{t}/{m}" for t in (*self.heads, "mean") for m in ("acc", "norm_acc")]
        self.metric_directions = {f"{stage}/{key}": True for stage in ("val", "test") for key in keys}
        self.train()

    # -- construction ---------------------------------------------------------------------------------------
    @staticmethod
    def _read_sources(
        experts: Mapping[str, Any],
        vectors: Mapping[str, Any],
        heads: Mapping[str, Any],
        base: Mapping[str, Tensor],
        prefix: str,
    ) -> tuple[dict[str, dict[str, Tensor]], dict[str, nn.Module]]:
        task_vectors: dict[str, dict[str, Tensor]] = {}
        head_modules: dict[str, nn.Module] = {}
        for task, source in experts.items():
            state = load_state(source)
            if isinstance(source, Mapping):
                weights = state
            else:
                weights = select_prefix(state, prefix, what="encoder weights")
                head_modules[task] = linear_head(state, task)
            _check_vector(task, weights, base, expert=True)
            task_vectors[task] = {k: weights[k].float() - base[k].float() for k in base}
        for task, vector in vectors.items():
            task_vectors[task] = {str(k): v.detach().float() for k, v in vector.items()}
            _check_vector(task, task_vectors[task], base, expert=False)
        for task, source in heads.items():
            head_modules[task] = (
                source.requires_grad_(False) if isinstance(source, nn.Module) else linear_head(load_state(source), task)
            )
        return task_vectors, head_modules

    def _owner(self, name: str, base: Mapping[str, Tensor]) -> int:
        """The coefficient block of an entry: a parameter its own; a floating buffer (BatchNorm's running
        statistics, which no kernel differentiates) -1: each task's mean coefficient over all blocks."""
        return self.block_names.index(name) if name in self.block_names else -1

    # -- the merged model -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ATLAS:
        super().train(mode)
        # frozen parts: BatchNorm keeps the merged running statistics, dropout stays off
        self.encoder.eval()
        self.heads.eval()
        return self

    def merged_state(self) -> dict[str, Tensor]:
        """The floating entries of the encoder at the current coefficients (differentiable in them)."""
        with torch.autocast(self.device.type, enabled=False):
            state = {**dict(self.encoder.named_parameters()), **dict(self.encoder.named_buffers())}
            coefficients = self.coefficients.float()
            merged = {}
            for e, (name, b) in enumerate(zip(self.entry_names, self.owners)):
                tau: Tensor = getattr(self, f"_tau{e}")
                is_parameter = b >= 0 and self.block_names[b] == name
                if b < 0:
                    c = coefficients.mean(dim=(1, 2)).unsqueeze(1)  # [T, 1]
                else:
                    c = coefficients[:, b if self.kind != "task" else 0]  # [T, K]
                    if self.parts > 1 and getattr(self, f"_part{b}").numel() != tau[0].numel():
                        c = c.mean(1, keepdim=True)
                if not is_parameter:
                    c = c.detach()
                if c.shape[1] == 1:
                    delta = torch.tensordot(c[:, 0], tau, dims=1)
                else:
                    delta = (c[:, getattr(self, f"_part{b}")] * tau.flatten(1)).sum(0).view(tau.shape[1:])
                merged[name] = state[name] + delta.to(state[name].dtype)
                if name.endswith("running_var"):
                    # a variance stays >= 0 off the segment between theta_0 and an expert (coefficients < 0 or
                    # summing past 1), where the linear combination alone can go negative (NaN features)
                    merged[name] = merged[name].clamp_min(0.0)
        return merged

    def merged_state_dict(self) -> dict[str, Tensor]:
        """The merged encoder's full state dict (detached): load it into the architecture to deploy it."""
        state = dict(self.encoder.state_dict())
        state.update({k: v.detach().clone() for k, v in self.merged_state().items()})
        return state

    def forward(self, x: Tensor) -> Tensor:
        """Features of the merged encoder."""
        return functional_call(self.encoder, self.merged_state(), (x,))

    # -- training ----------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        trainer = self.trainer
        if str(trainer.precision) in ("16-true", "bf16-true", "64-true"):
            raise ValueError(
                f"ATLAS keeps theta_0 and the task vectors in float32: use precision='16-mixed' or 'bf16-mixed' "
                f"instead of precision={trainer.precision!r}"
            )
        if str(trainer.precision) == "16-mixed" and trainer.gradient_clip_val:
            for optimizer in trainer.optimizers:
                if getattr(optimizer, "_step_supports_amp_scaling", False):
                    raise ValueError(
                        "gradient_clip_val under precision='16-mixed' needs an optimizer that Lightning unscales "
                        f"before clipping; {type(optimizer).__name__} unscales in its step (fused): use fused=False"
                    )

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([self.coefficients])
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def _labels(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        x, labels = batch[0], batch[1]
        if isinstance(labels, Tensor):
            if len(self.targets) != 1:
                raise TypeError(f"labels came as one tensor but ATLAS has {len(self.targets)} target tasks")
            labels = {self.targets[0]: labels}
        return x, labels

    def _task_loss(self, features: Tensor, labels: Mapping[str, Tensor], task: str) -> Tensor:
        if task not in labels:
            raise KeyError(f"the batch has no labels of task {task!r} (it has {', '.join(labels)})")
        y = labels[task]
        rows = y != MISSING_LABEL
        if not bool(rows.any()):
            return features.sum() * 0.0  # keeps the graph, so DDP ranks reduce the same gradients
        return F.cross_entropy(self.heads[task](features[rows]).float(), y[rows])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, labels = self._labels(batch)
        if self.objective == "tta":
            loss = self._fixmatch_loss(x)
        else:
            features = self(x)
            losses = {task: self._task_loss(features, labels, task) for task in self.targets}
            loss = torch.stack(list(losses.values())).sum()
            if self.objective == "negation":
                assert self.control is not None  # checked in __init__
                losses[self.control] = self._task_loss(features, labels, self.control)
                loss = losses[self.control] - loss
            for task, value in losses.items():
                self.log(f"train/{task}/loss", value.detach(), batch_size=len(x))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(x))
        return loss

    def _strong_view(self, x: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
        n, _, h, w = x.shape
        shifts = torch.randint(0, 3, (n, 2), generator=generator)
        padded = F.pad(x, (1, 1, 1, 1), value=float(x.min()))
        rows = (shifts[:, :1] + torch.arange(h)).to(x.device)  # [N, H]
        cols = (shifts[:, 1:] + torch.arange(w)).to(x.device)  # [N, W]
        batch = torch.arange(n, device=x.device)[:, None, None]
        view = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        view = view + 0.3 * torch.randn(view.shape, generator=generator).to(x)
        top, left = (
            torch.randint(0, h - 2, (n,), generator=generator),
            torch.randint(0, w - 2, (n,), generator=generator),
        )
        r, c = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
        inside = (r >= top[:, None, None]) & (r < top[:, None, None] + 3) & (c >= left[:, None, None])
        hole = inside & (c < left[:, None, None] + 3)  # [N, H, W]: a 3x3 square per sample
        return view * (~hole).unsqueeze(1).to(x)

    def _fixmatch_loss(self, x: Tensor) -> Tensor:
        features = self(torch.cat([x, self._strong_view(x)]))
        weak, strong = features.chunk(2)
        loss = features.sum() * 0.0
        for task in self.targets:
            head = self.heads[task]
            with torch.no_grad():
                probs = head(weak).float().softmax(-1)
                confidence, pseudo = probs.max(-1)
                trusted = (confidence >= self.confidence).float()
            per_sample = F.cross_entropy(head(strong).float(), pseudo, reduction="none")
            loss = loss + (per_sample * trusted).sum() / len(x)
            self.log(f"train/{task}/trusted", trusted.mean(), batch_size=len(x))
        return loss

    # -- evaluation --------------------------------------------------------------------------------------------
    def _eval_step(self, batch: Any, stage: str) -> None:
        x, labels = self._labels(batch)
        features = self(x)
        for task, y in labels.items():
            if task in self.heads and bool((y != MISSING_LABEL).any()):
                self._metric(stage, task).update(self.heads[task](features), y)

    def _metric(self, stage: str, task: str) -> MulticlassAccuracy:
        return cast(MulticlassAccuracy, cast(nn.ModuleDict, self.metrics[stage])[task])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_epoch(self, stage: str) -> None:
        accuracy, normalised = {}, {}
        for task in self.heads:
            metric = self._metric(stage, task)
            if metric.update_count == 0:
                continue
            accuracy[task] = float(metric.compute())  # synchronised over ranks
            metric.reset()
            self.log(f"{stage}/{task}/acc", accuracy[task])
            if task in self.expert_accuracy:
                normalised[task] = accuracy[task] / self.expert_accuracy[task]
                self.log(f"{stage}/{task}/norm_acc", normalised[task])
        for key, values in (("acc", accuracy), ("norm_acc", normalised)):
            mine = [values[t] for t in self.targets if t in values]
            if mine:
                self.log(f"{stage}/mean/{key}", sum(mine) / len(mine))

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")


def _check_vector(task: str, weights: Mapping[str, Tensor], base: Mapping[str, Tensor], expert: bool) -> None:
    """One sentence naming the first entry of a task vector / expert that does not fit the encoder."""
    for key, value in weights.items():
        if key not in base:
            if expert and not value.is_floating_point():
                continue  # integer buffers (BatchNorm's counter) are not merged
            raise KeyError(f"task {task!r}: entry {key!r} is not a floating entry of the encoder")
        if tuple(value.shape) != tuple(base[key].shape):
            raise ValueError(
                f"task {task!r}: entry {key!r} has shape {tuple(value.shape)}, the encoder's is {tuple(base[key].shape)}"
            )
    if expert:
        absent = [k for k in base if k not in weights]
        if absent:
            raise KeyError(f"task {task!r}: the expert has no entry {absent[0]!r} of the encoder")
    if not math.isfinite(sum(float(v.float().abs().sum()) for v in weights.values())):
        raise ValueError(f"task {task!r}: the weights hold NaN or infinite values")
