"""Skill localization by grafting: a sparse mask over a task vector that keeps the fine-tuned accuracy."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call
from torchmetrics.classification import MulticlassAccuracy

from lightning_mtl._constants import MISSING_LABEL
from lightning_mtl._hparams import save_init_hyperparameters
from lightning_mtl.merging._state import StateSource, linear_head, load_state, select_prefix

__all__ = ["Grafting", "apply_graft", "load_mask", "mask_iou", "save_mask"]


class Grafting(pl.LightningModule):
    """Learns a sparse binary mask ``gamma`` so that ``theta_0 + gamma * tau`` keeps the expert's accuracy.

    Panigrahi, Saunshi, Zhao, Arora, "Task-Specific Skill Localization in Fine-tuned Language Models",
    ICML 2023 (https://arxiv.org/abs/2302.06600; official code:
    github.com/abhishekpanigrahi1996/Skill-Localization-by-grafting).

    The relaxed mask is ``gamma = base + (1 - 2 base) * sigmoid(S - b)``: ``base`` is the initial patch, the
    top ``sparsity`` fraction of ``|tau|`` over all the encoder's floating entries together (ties at the
    threshold kept), ``S`` the mask logits, drawn from U(0, 1) with ``seed``, the only parameters, ``b`` the
    ``sigmoid_bias`` (10: ``sigmoid(S - b)`` is about 5e-5, so training starts at the base patch; a logit
    that climbs past ``b`` flips its entry in or out). Training minimises the task's cross-entropy at the
    continuous grafted model ``theta_0 + gamma * tau`` (rebuilt each forward with
    :func:`torch.func.functional_call`; nothing edits ``theta_0``). After every epoch the mask is rounded
    (``base`` XOR ``S > b``), the rounded model is validated, and the best rounded mask so far is kept
    (``best_mask``, in the checkpoint, written to ``mask_path`` if given); ``val/<task>/acc`` is the rounded
    model's accuracy.

    The official code steps ``S`` by hand: ``S -= lr * (dL/dtheta * tau) * (1 - 2 base) * sigmoid'(S - b)``
    with the gradient averaged over ``gradient_accumulation_steps`` batches and ``lr = 1e7``. That product is
    exactly the autograd gradient of ``S`` in this parametrisation, so ``torch.optim.SGD(lr=1e7)`` with
    ``accumulate_grad_batches`` (Lightning averages the accumulated losses) takes the official steps; the
    huge rate only compensates the tiny chain-rule factors (``sigmoid'(-10)`` is 4.5e-5). Any optimizer
    works; a sign-like one (Adam) moves every logit by about its rate per step instead.

    The mask covers every floating entry of the encoder (conv and linear weights, biases, BatchNorm
    weights and running statistics), so the all-ones mask is the expert and the all-zeros mask ``theta_0``
    exactly. Logits exist for the parameters; a BatchNorm running statistic (no kernel differentiates
    through it) takes the mask of its layer's weight, entry by entry. The encoder and the head run in eval
    mode. Under DDP the logits' gradients are averaged over
    the ranks (the single-process step on the concatenated batch for a mean loss and equal rank batches).

    Args:
        encoder: the encoder with the pre-trained weights ``theta_0`` loaded.
        expert: the fine-tuned checkpoint (``prefix`` entries: the expert encoder; ``heads.<task>``: the
            head) or the expert encoder's state dict (then give ``head``).
        task: the task's name (its labels key and head).
        head: the task's head, a checkpoint to read ``heads.<task>`` from or an ``nn.Module`` (default: the
            expert checkpoint's).
        sparsity: fraction of entries in the initial patch (the official script: 1e-7 on RoBERTa; the
            paper localises about 0.01 %).
        sigmoid_bias: ``b`` (official: 10).
        seed: seed of the initial logits.
        prefix: where the encoder's entries are in the expert checkpoint.
        mask_path: where to write the best rounded mask (:func:`save_mask`), if anywhere.
        optimizer: optimizer factory, called with the logits (see above; the recipe uses SGD).
        lr_scheduler: optional scheduler factory.
    """

    metric: MulticlassAccuracy
    best_score: Tensor

    def __init__(
        self,
        encoder: nn.Module,
        expert: Any,
        task: str,
        head: Any = None,
        sparsity: float = 0.01,
        sigmoid_bias: float = 10.0,
        seed: int = 0,
        prefix: str = "encoder.",
        mask_path: str | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        save_init_hyperparameters(self, ["encoder", "expert", "head", "optimizer", "lr_scheduler"])
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be a fraction in [0, 1], got {sparsity}")
        self.encoder = encoder.requires_grad_(False)
        self.task = str(task)
        self.sigmoid_bias = float(sigmoid_bias)
        self.mask_path = mask_path
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        base = {k: v for k, v in self.encoder.state_dict().items() if v.is_floating_point()}
        self.entry_names = tuple(base)
        state = load_state(expert)
        weights = state if isinstance(expert, Mapping) else select_prefix(state, prefix, what="encoder weights")
        for key in self.entry_names:
            if key not in weights or tuple(weights[key].shape) != tuple(base[key].shape):
                raise KeyError(f"the expert has no entry {key!r} of shape {tuple(base[key].shape)} (the encoder's)")
        if head is None and isinstance(expert, Mapping):
            raise ValueError("an expert given as a state dict has no head: pass `head`")
        if isinstance(head, nn.Module):
            self.head = head.requires_grad_(False)
        else:
            self.head = linear_head(state if head is None else load_state(head), self.task)
        self.parameter_names = tuple(n for n, p in self.encoder.named_parameters() if p.is_floating_point())
        taus = {k: weights[k].float() - base[k].float() for k in self.entry_names}
        patch = _top_fraction([taus[k].abs() for k in self.parameter_names], sparsity)
        generator = torch.Generator().manual_seed(int(seed))
        self.logits = nn.ParameterList(
            [nn.Parameter(torch.rand(taus[k].shape, generator=generator)) for k in self.parameter_names]
        )
        for i, start in enumerate(patch):
            self.register_buffer(f"_base{i}", start, persistent=False)
        # a floating buffer (BatchNorm's running statistics, which no kernel differentiates) follows the mask
        # of its layer's parameter of the same shape; without one it keeps theta_0's value
        self.owners = tuple(_owner(name, base, self.parameter_names) for name in self.entry_names)
        for e, name in enumerate(self.entry_names):
            self.register_buffer(f"_tau{e}", taus[name], persistent=False)
            owner = self.owners[e]
            start = patch[owner] if owner >= 0 else torch.zeros_like(taus[name], dtype=torch.bool)
            self.register_buffer(f"best_mask{e}", start.clone())
        self.register_buffer("best_score", torch.tensor(-1.0))
        self.metric = MulticlassAccuracy(self.head.out_features, average="micro", ignore_index=MISSING_LABEL)  # type: ignore[arg-type]
        # read by BestMetricsSummary: accuracies better higher, the mask's share lower
        self.metric_directions = {f"val/{self.task}/acc": True, f"val/{self.task}/best_acc": True,
                                  f"test/{self.task}/acc": True, "val/mask/fraction": False}  # fmt: skip
        self.train()

    def train(self, mode: bool = True) -> Grafting:
        super().train(mode)
        self.encoder.eval()
        self.head.eval()
        return self

    # -- masks --------------------------------------------------------------------------------------------
    def relaxed_mask(self) -> list[Tensor]:
        """``gamma`` per parameter: ``base + (1 - 2 base) * sigmoid(S - b)`` (differentiable in ``S``)."""
        masks = []
        for i, logits in enumerate(self.logits):
            base = getattr(self, f"_base{i}").float()
            masks.append(base + (1.0 - 2.0 * base) * torch.sigmoid(logits.float() - self.sigmoid_bias))
        return masks

    def _spread(self, per_parameter: list[Tensor], zero: Any) -> list[Tensor]:
        """Per entry: a parameter's own mask, a buffer its owner's (detached), else ``zero``."""
        out = []
        for e, owner in enumerate(self.owners):
            if owner < 0:
                out.append(torch.zeros_like(getattr(self, f"_tau{e}"), dtype=zero))
            elif self.entry_names[e] == self.parameter_names[owner]:
                out.append(per_parameter[owner])
            else:
                out.append(per_parameter[owner].detach())
        return out

    def rounded_mask(self) -> dict[str, Tensor]:
        """The binary mask now: the base patch with the entries whose logit passed ``b`` flipped."""
        rounded = [getattr(self, f"_base{i}") ^ (p.detach() > self.sigmoid_bias) for i, p in enumerate(self.logits)]
        return dict(zip(self.entry_names, self._spread(rounded, torch.bool)))

    @property
    def best_mask(self) -> dict[str, Tensor]:
        """The best rounded mask of the validations so far (the base patch before the first)."""
        return {name: getattr(self, f"best_mask{i}") for i, name in enumerate(self.entry_names)}

    def grafted_state(self, mask: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``theta_0 + gamma * tau`` for the relaxed mask (default) or a given binary one."""
        with torch.autocast(self.device.type, enabled=False):
            state = {**dict(self.encoder.named_parameters()), **dict(self.encoder.named_buffers())}
            if mask is None:
                gammas = self._spread(self.relaxed_mask(), torch.float32)
            else:
                gammas = [mask[n].float() for n in self.entry_names]
            return {
                name: state[name] + (gamma * getattr(self, f"_tau{i}")).to(state[name].dtype)
                for i, (name, gamma) in enumerate(zip(self.entry_names, gammas))
            }

    def forward(self, x: Tensor, mask: Mapping[str, Tensor] | None = None) -> Tensor:
        """Logits of the grafted model (relaxed mask unless ``mask`` is given)."""
        return self.head(functional_call(self.encoder, self.grafted_state(mask), (x,)))

    # -- training -----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(list(self.logits))
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def _labels(self, batch: Any) -> tuple[Tensor, Tensor]:
        x, labels = batch[0], batch[1]
        if isinstance(labels, Mapping):
            if self.task not in labels:
                raise KeyError(f"the batch has no labels of task {self.task!r} (it has {', '.join(labels)})")
            labels = labels[self.task]
        return x, labels

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self._labels(batch)
        loss = F.cross_entropy(self(x).float(), y, ignore_index=MISSING_LABEL)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self._labels(batch)
        self.metric.update(self(x, self.rounded_mask()), y)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self._labels(batch)
        self.metric.update(self(x, self.best_mask), y)

    def on_validation_epoch_end(self) -> None:
        accuracy = self.metric.compute()
        self.metric.reset()
        rounded = self.rounded_mask()
        ones = sum(int(m.sum()) for m in rounded.values())
        self.log(f"val/{self.task}/acc", accuracy)
        self.log("val/mask/fraction", ones / sum(m.numel() for m in rounded.values()))
        if self.trainer.sanity_checking:
            return
        if float(accuracy) > float(self.best_score):
            self.best_score.fill_(float(accuracy))
            for i, name in enumerate(self.entry_names):
                getattr(self, f"best_mask{i}").copy_(rounded[name])
            if self.mask_path is not None and self.trainer.is_global_zero:
                save_mask(self.best_mask, self.mask_path)
        self.log(f"val/{self.task}/best_acc", self.best_score.clone())

    def on_test_epoch_end(self) -> None:
        self.log(f"test/{self.task}/acc", self.metric.compute())
        self.metric.reset()


def _owner(name: str, base: Mapping[str, Tensor], parameters: tuple[str, ...]) -> int:
    """Index of the parameter whose mask an entry uses: its own, or for a buffer its layer's parameter of
    the same shape; -1 if there is none."""
    if name in parameters:
        return parameters.index(name)
    layer = name.rpartition(".")[0]
    same = [i for i, p in enumerate(parameters) if p.rpartition(".")[0] == layer and base[p].shape == base[name].shape]
    return same[0] if same else -1


def _top_fraction(magnitudes: list[Tensor], fraction: float) -> list[Tensor]:
    """Boolean masks of the entries among the top ``fraction`` of all magnitudes together (ties kept).

    The threshold is the k-th largest value over every tensor, found with one sort of the concatenated
    magnitudes (a graft's task vector is one model's worth of numbers).
    """
    total = sum(m.numel() for m in magnitudes)
    k = int(round(fraction * total))
    if k == 0:
        return [torch.zeros_like(m, dtype=torch.bool) for m in magnitudes]
    threshold = torch.cat([m.flatten() for m in magnitudes]).topk(k).values[-1]
    return [m >= threshold for m in magnitudes]


def apply_graft(
    model: nn.Module | None, base: StateSource, vectors: Mapping[str, Tensor], mask: Mapping[str, Tensor] | str
) -> dict[str, Tensor]:
    """``theta_0 + mask * tau`` as a state dict, loaded into ``model`` when one is given.

    Args:
        model: a module to load the grafted weights into (strict), or None.
        base: ``theta_0``: a state dict, or a file :func:`~lightning_mtl.merging._state.load_state` reads.
        vectors: the task vector ``tau`` (entry name -> tensor; e.g. a ``TaskVector`` or ``expert - base``).
        mask: entry name -> boolean tensor, or the path of a mask written by :func:`save_mask`. Entries of
            ``base`` without a mask or a vector stay as they are.
    """
    state = dict(load_state(base))
    masks = load_mask(mask) if isinstance(mask, (str, os.PathLike)) else mask
    for name, m in masks.items():
        if name not in state or name not in vectors:
            raise KeyError(f"mask entry {name!r} is not in both the base and the task vector")
        if m.shape != state[name].shape or vectors[name].shape != state[name].shape:
            raise ValueError(f"mask entry {name!r}: shapes of mask, vector and base differ")
        state[name] = state[name] + (m.to(vectors[name].dtype) * vectors[name]).to(state[name].dtype)
    if model is not None:
        model.load_state_dict(state)
    return state


def save_mask(mask: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Write a binary mask as bits (``numpy.packbits``, one bit per entry) with each entry's shape."""
    packed = {
        name: {"bits": torch.from_numpy(_packbits(m)), "shape": torch.tensor(list(m.shape), dtype=torch.long)}
        for name, m in mask.items()
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(packed, os.fspath(path))


def load_mask(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A mask written by :func:`save_mask`, as boolean tensors."""
    import numpy as np

    packed = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    out = {}
    for name, item in packed.items():
        shape = tuple(int(s) for s in item["shape"])
        count = int(np.prod(shape)) if shape else 1
        bits = np.unpackbits(item["bits"].numpy())[:count]
        out[name] = torch.from_numpy(bits.astype(bool)).reshape(shape)
    return out


def _packbits(mask: Tensor) -> Any:
    import numpy as np

    return np.packbits(mask.detach().cpu().flatten().numpy().astype(np.uint8))


def mask_iou(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Intersection over union of two binary masks (over the entries of either): task similarity of grafts."""
    intersection = union = 0
    for name in set(a) | set(b):
        ma = a.get(name)
        mb = b.get(name)
        if ma is None or mb is None:
            union += int((ma if ma is not None else mb).sum())  # type: ignore[union-attr]
            continue
        intersection += int((ma & mb).sum())
        union += int((ma | mb).sum())
    return intersection / union if union else 1.0
