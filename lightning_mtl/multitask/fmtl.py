"""F-MTL: multi-task learning that seeks task-based flat regions, composable with every aggregator."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_mtl._modes import restored_buffers
from lightning_mtl.multitask.engine import write_flat
from lightning_mtl.sharpness.perturb import apply_perturbation, restore_parameters, sam_perturbation

__all__ = ["FMTL"]


class FMTL:
    """Task-based flat regions (F-MTL) for :class:`~lightning_mtl.multitask.MultiTaskModule`.

    Phan, H., Tran, L., Tran, N. N., Ho, N., Phung, D. and Le, T. "Improving Multi-task Learning via
    Seeking Task-based Flat Regions." arXiv:2211.13723, 2022; published as "Beyond Losses Reweighting:
    Empowering Multi-Task Learning via the Generalization Perspective", ICCV 2025.

    Pass it as ``MultiTaskModule(fmtl=FMTL(...))`` with any aggregator. For each task ``i``:

    * ``g_i``: the gradient of ``l_i`` w.r.t. the shared parameters, ``h_i`` w.r.t. task i's head
      (both from the module's one-pass engine, the rows of its Jacobian);
    * ``e_i = rho T^2 (g_i, h_i) / |T (g_i, h_i)|``, the SAM (``T = 1``) or ASAM (``adaptive``,
      ``T = |w|``, as in the official code) ascent step; ``normalization="separate"`` scales the
      shared part and the head part to ``rho`` each (the official dense benchmarks),
      ``"joint"`` normalizes them together (plain SAM on the task's own parameters); other heads
      are not perturbed for task i;
    * ``g_i^SAM``, ``h_i^SAM``: the gradients of ``l_i`` at ``(theta + e_i^shared, head_i + e_i^head)``;
    * shared update ``Agg(g) + Agg(g^SAM - g)`` (``variant="flat"``, the paper's "flat gradient"
      form) or ``Agg(g^SAM)`` (``variant="direct"``), with the module's aggregator; a loss weighting
      acts through its weights ``w = d objective / d losses``, so both variants give ``w^T g^SAM``;
    * head i takes its own SAM gradient ``h_i^SAM`` (times ``w_i`` for a loss weighting).

    With one task, ``normalization="joint"`` and linear scalarization this is SAM.

    Cost and exactness: the loss gradients come from the engine (1 forward, m backward passes or one
    batched backward); each perturbed pass is one forward of the encoder and task i's head only (the
    official code runs every head) and one backward. BatchNorm layers use the batch statistics in
    the perturbed passes (as SAM) and their running statistics are restored afterwards, so they
    count one update per step. Under DDP the perturbations come from the gradients averaged over
    ranks and the perturbed gradients are averaged too, so a step equals the single-process step on
    the concatenated batch (no m-sharpness). Under 16-mixed the perturbed losses carry GradScaler's
    scale like the first pass, and the aggregator sees unscaled gradients.

    Args:
        rho: radius of the perturbation (SAM: 0.05; the official ASAM runs on the dense benchmarks
            use 2.0 with ``adaptive=True``).
        adaptive: ASAM's scale-invariant form (``T = |w| + eta``).
        normalization: ``"separate"`` or ``"joint"``, see above.
        variant: ``"flat"`` (``Agg(g) + Agg(g^SAM - g)``) or ``"direct"`` (``Agg(g^SAM)``).
        eta: ASAM's offset (0 in the official F-MTL code).
        eps: added to the norm (a zero gradient gives no perturbation).
        batched: run the m perturbed passes as vmapped batches (``True``) or one by one (``False``);
            ``None`` batches on GPUs, where it fills the device, and loops on CPUs, where it buys
            nothing. Both give the same gradients.
        chunk_size: at most this many tasks per vmapped pass (memory: one copy of the encoder's
            parameters and activations per task).
    """

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        normalization: Literal["separate", "joint"] = "separate",
        variant: Literal["flat", "direct"] = "flat",
        eta: float = 0.0,
        eps: float = 1e-12,
        batched: bool | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if rho < 0:
            raise ValueError(f"FMTL rho must be >= 0, got {rho}")
        if normalization not in ("separate", "joint"):
            raise ValueError(f"FMTL normalization must be 'separate' or 'joint', got {normalization!r}")
        if variant not in ("flat", "direct"):
            raise ValueError(f"FMTL variant must be 'flat' or 'direct', got {variant!r}")
        self.rho, self.adaptive, self.eta, self.eps = float(rho), bool(adaptive), float(eta), float(eps)
        self.normalization, self.variant = normalization, variant
        self.batched, self.chunk_size = batched, chunk_size

    def __repr__(self) -> str:
        return (
            f"FMTL(rho={self.rho}, adaptive={self.adaptive}, normalization={self.normalization!r}, "
            f"variant={self.variant!r})"
        )

    def perturbation(self, grads: Sequence[Tensor | None], params: Sequence[Tensor], split: int) -> list[Tensor | None]:
        """The ascent step for one task: ``params[:split]`` are shared, the rest its head."""
        step = lambda g, p: sam_perturbation(g, p, self.rho, self.adaptive, self.eta, self.eps)  # noqa: E731
        if self.normalization == "joint" or split in (0, len(params)):
            return step(grads, params)
        return step(grads[:split], params[:split]) + step(grads[split:], params[split:])

    def perturbed_gradients(
        self,
        jacobian: Tensor,
        head_grads: Sequence[Sequence[Tensor | None]],
        encoder: nn.Module,
        heads: Sequence[nn.Module],
        inputs: Tensor,
        task_loss: Callable[[int, Tensor], Tensor],
        forward_context: Callable[[], contextlib.AbstractContextManager],
    ) -> tuple[Tensor, list[list[Tensor | None]]]:
        """``g^SAM`` (float32 ``[m, n]``) and each head's ``h^SAM``, from the losses ``task_loss`` gives.

        Args:
            jacobian: the loss gradients ``g`` (rows) w.r.t. the encoder's trainable parameters, unscaled.
            head_grads: per task, ``h_i`` for the trainable parameters of ``heads[i]``.
            task_loss: ``(i, prediction of head i) -> l_i``, scaled like the first pass.
            forward_context: the precision plugin's forward context (autocast), entered per forward.
        """
        shared = [p for p in encoder.parameters() if p.requires_grad]
        own = [[p for p in head.parameters() if p.requires_grad] for head in heads]
        sizes = [p.numel() for p in shared]
        perturbations = []
        for i in range(len(heads)):
            rows = [v.view_as(p) for v, p in zip(torch.split(jacobian[i], sizes), shared)]
            params = [*shared, *own[i]]
            perturbations.append(self.perturbation([*rows, *head_grads[i]], params, len(shared)))
        buffers = [*encoder.buffers(), *(b for head in heads for b in head.buffers())]
        out = torch.zeros_like(jacobian)
        head_out: list[list[Tensor | None]] = [[] for _ in heads]
        batched = self.batched if self.batched is not None else inputs.is_cuda
        step = (self.chunk_size or len(heads)) if batched else 1
        with restored_buffers(buffers):  # BatchNorm statistics: one update per step
            for first in range(0, len(heads), step):
                tasks = range(first, min(first + step, len(heads)))
                if batched:
                    rows, heads_sam = self._vmapped_passes(encoder, heads, inputs, task_loss, forward_context,
                                                           perturbations, tasks)  # fmt: skip
                else:
                    rows, heads_sam = self._one_pass(encoder, heads[first], inputs, task_loss, forward_context,
                                                     perturbations[first], first)  # fmt: skip
                for j, i in enumerate(tasks):
                    write_flat(out[i], rows[j], sizes)
                    head_out[i] = heads_sam[j]
        return out, head_out

    @staticmethod
    def _one_pass(encoder, head, inputs, task_loss, forward_context, perturbation, i):  # type: ignore[no-untyped-def]
        """Task i's perturbed pass: the parameters perturbed in place, then restored bit for bit."""
        shared = [p for p in encoder.parameters() if p.requires_grad]
        params = [*shared, *(p for p in head.parameters() if p.requires_grad)]
        backup = apply_perturbation(params, perturbation)
        try:
            with forward_context():
                pred = head(encoder(inputs))
            grads = torch.autograd.grad(task_loss(i, pred), params, allow_unused=True)
        finally:
            restore_parameters(params, backup)
        return [list(grads[: len(shared)])], [list(grads[len(shared) :])]

    @staticmethod
    def _vmapped_passes(encoder, heads, inputs, task_loss, forward_context, perturbations, tasks):  # type: ignore[no-untyped-def]
        """Several tasks' perturbed passes at once: the encoder runs once, vmapped over the stacked
        perturbed copies of its parameters (``torch.func.functional_call``); each head then runs on
        its task's features; one backward of the summed losses gives every task's gradients (each
        loss depends only on its own copy). BatchNorm uses batch statistics without tracking them."""
        names = [n for n, p in encoder.named_parameters() if p.requires_grad]
        shared = [p for p in encoder.parameters() if p.requires_grad]
        stacked = [
            torch.stack([p.detach() + (0 if perturbations[i][k] is None else perturbations[i][k]) for i in tasks])
            .requires_grad_()
            for k, p in enumerate(shared)
        ]  # fmt: skip
        n_shared = len(shared)

        def features(*params: Tensor) -> Tensor:
            return torch.func.functional_call(encoder, dict(zip(names, params)), (inputs,))

        with _untracked_batch_norm(encoder), forward_context():
            feats = torch.func.vmap(features)(*stacked)
        losses, head_params = [], []
        for j, i in enumerate(tasks):
            own = {n: p for n, p in heads[i].named_parameters() if p.requires_grad}
            moved = {
                n: (p.detach() + (0 if perturbations[i][n_shared + k] is None else perturbations[i][n_shared + k]))
                .requires_grad_()
                for k, (n, p) in enumerate(own.items())
            }  # fmt: skip
            with forward_context():
                pred = torch.func.functional_call(heads[i], moved, (feats[j],))
            losses.append(task_loss(i, pred))
            head_params.append(list(moved.values()))
        grads = torch.autograd.grad(torch.stack(losses).sum(), [*stacked, *(p for ps in head_params for p in ps)],
                                    allow_unused=True)  # fmt: skip
        rows = [[None if g is None else g[j] for g in grads[:n_shared]] for j in range(len(tasks))]
        heads_sam, k = [], n_shared
        for ps in head_params:
            heads_sam.append(list(grads[k : k + len(ps)]))
            k += len(ps)
        return rows, heads_sam


@contextlib.contextmanager
def _untracked_batch_norm(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers use the batch statistics without updating running ones (a vmapped forward
    cannot write them in place); the layers are put back as they were."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.track_running_stats, m.running_mean, m.running_var) for m in norms]
    try:
        for m in norms:
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
        yield
    finally:
        for m, (track, mean, var) in zip(norms, saved):
            m.track_running_stats, m.running_mean, m.running_var = track, mean, var
