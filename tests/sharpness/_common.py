"""A tiny plain classifier, fixed batches and a hand-written SAM / ASAM step (the documented semantics)."""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


def tiny_net(batchnorm: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if batchnorm else []) + [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def batches(n: int = 4, size: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def loader(data):
    return torch.utils.data.DataLoader(data, batch_size=None)


class Classifier(pl.LightningModule):
    """A user's module: nothing in it knows about SAM. Counts its calls and hooks."""

    def __init__(self, net: nn.Module, lr: float = 0.1, momentum: float = 0.9, scheduler: bool = False) -> None:
        super().__init__()
        self.net, self.lr, self.momentum, self.scheduler = net, lr, momentum, scheduler
        self.calls = {"training_step": 0, "log": 0, "on_after_backward": 0, "clip": 0, "before_opt": 0}
        self.logged_losses: list[float] = []

    def log(self, name, value, *args, **kwargs):  # counts what reaches Lightning's logging
        self.calls["log"] += 1
        if name == "train/loss":
            self.logged_losses.append(float(value.detach()))
        return super().log(name, value, *args, **kwargs)

    def training_step(self, batch, batch_idx):
        self.calls["training_step"] += 1
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def on_after_backward(self):
        self.calls["on_after_backward"] += 1

    def on_before_optimizer_step(self, optimizer):
        self.calls["before_opt"] += 1

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.calls["clip"] += 1
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if not self.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def hand_perturbation(params, grads, rho, adaptive, eta):
    """e written out directly: rho g / |g| or rho T^2 g / |T g| with T = |w| + eta."""
    if adaptive:
        scales = [p.detach().abs() + eta for p in params]
        norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scales, grads)))
        return [rho * t * t * g / norm for t, g in zip(scales, grads)]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    return [rho * g / norm for g in grads]


def hand_sam_step(net, optimizer, x, y, rho, adaptive=False, eta=0.01, clip_norm=None, autocast=None):
    """One SAM step in plain PyTorch: BatchNorm statistics move in the first forward only."""
    ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else contextlib.nullcontext
    params = [p for p in net.parameters()]
    optimizer.zero_grad(set_to_none=True)
    with ctx():
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    e = hand_perturbation(params, [p.grad for p in params], rho, adaptive, eta)
    saved = [p.detach().clone() for p in params]
    buffers = [b.detach().clone() for b in net.buffers()]
    with torch.no_grad():
        for p, d in zip(params, e):
            p.add_(d)
    optimizer.zero_grad(set_to_none=True)
    with ctx():
        F.cross_entropy(net(x), y).backward()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
        for b, s in zip(net.buffers(), buffers):
            b.copy_(s)
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    return loss.detach()
