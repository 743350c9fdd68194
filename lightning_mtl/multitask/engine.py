"""The multi-task gradient engine: from the task losses to the gradients an optimizer step reads.

:class:`GradientEngine` is the one owner of that path. The Lightning module hands it the m task losses
of a step (:class:`TaskStep`), the shared and the other trainable parameters, the loss that Lightning
back-propagates (which carries GradScaler's scale under 16-mixed) and the world size; the engine writes
the gradients, or gives back the one loss to back-propagate ordinarily. It keeps the last task weights,
Gramian and, on request, Jacobian for logging. It knows nothing of Lightning (plain torch; collectives
through the floor-0 ``_distributed`` module) and nothing of any aggregation method: it dispatches on the
aggregator's ``kind`` and its declared capability flags (:class:`~lightning_mtl.aggregators.Aggregator`).

Three levels (``MultiTaskModule(gradient_mode=...)``; ``"auto"`` picks one of the first and the
last by :func:`~lightning_mtl.multitask.auto_mode.choose_gradient_mode`):

* parameter level: the m x n Jacobian of the task losses w.r.t. the shared parameters, from one
  batched backward (``is_grads_batched``, a vmap over the VJP) or from a loop of m backward passes;
  batching pays on a GPU, the loop is as fast and lighter on a CPU;
* representation level (MGDA-UB style): the m gradients w.r.t. the shared representation only (the
  heads are cheap), whose m x m Gramian drives the weights; one ordinary backward of the weighted
  loss then goes through the encoder;
* Gramian level (Gramian weightings only): the m x m Gramian of the parameter level, accumulated
  layer by layer from the recorded inputs and per-task output gradients of the encoder's linear and
  convolutional layers (:mod:`lightning_mtl.multitask.gramian`), never the m x n Jacobian; the
  update equals the parameter level's, under DDP too (each layer's cross-rank terms gathered or
  averaged over the ranks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn

from lightning_mtl._distributed import mean_over_ranks_, sum_over_ranks
from lightning_mtl.aggregators.base import Aggregator, GramianWeighting, JacobianAggregator, LossWeighting
from lightning_mtl.aggregators.linear import LinearScalarization
from lightning_mtl.multitask.gramian import LayerCalls, gramian_and_gradients, weighted_gradients

if TYPE_CHECKING:
    from lightning_mtl.multitask.fmtl import FMTL

JacobianLevel = Literal["parameter", "representation"]
GradientMode = Literal["parameter", "representation", "gramian"]


@dataclass
class TaskStep:
    """One training step's task losses, as the engine consumes them (staged by the module's training
    step, consumed by its backward).

    Attributes:
        terms: the m scalar task losses (unstacked: per-task backward passes then skip the other heads).
        losses: their stack ``[m]``, as the aggregator saw it.
        closure_loss: the loss handed to Lightning; backward gets it back, times GradScaler's scale
            under 16-mixed.
        features: the shared representation (representation level, or a requested Jacobian there).
        objective: a loss weighting's objective when the engine works on gradients (F-MTL).
        inputs: the batch's inputs (F-MTL's perturbed passes run the encoder on them again).
        task_loss: ``(i, prediction of head i) -> l_i`` on this batch's labels (F-MTL).
        layers: the encoder's recorded linear and convolutional layer calls (Gramian level).
    """

    terms: list[Tensor]
    losses: Tensor
    closure_loss: Tensor
    features: Tensor | None = None
    objective: Tensor | None = None
    inputs: Any = None
    task_loss: Callable[[int, Tensor], Tensor] | None = None
    layers: list[LayerCalls] | None = None


class GradientEngine:
    """Per-task gradients, their aggregation and the gradients written, for any aggregator.

    Args:
        aggregator: the method (a loss weighting, a Gramian weighting or a Jacobian aggregator).
        mode: ``"parameter"``, ``"representation"`` or ``"gramian"`` (the last two for Gramian
            weightings only), see the module docs.
        batched: one batched backward for a Jacobian (``True``) or a loop of m backward passes
            (``False``); ``None`` batches on GPUs and loops on CPUs.
        chunk_size: at most this many Jacobian rows per batched backward.
        fmtl: F-MTL (:class:`~lightning_mtl.multitask.fmtl.FMTL`), parameter level only.
        flat_aggregator: F-MTL's second aggregator for the flat gradients (``variant="flat"``), so
            that a stateful method keeps one state per stream.
        encoder: the shared encoder (F-MTL runs it again at the perturbed points).
        heads: the task heads in task order (F-MTL).

    Attributes:
        last_weights: the task weights of the last step that had any (a loss weighting other than
            linear scalarization, a Gramian weighting, F-MTL with a loss weighting), else ``None``.
        last_gramian: the m x m Gramian a Gramian weighting saw in the last step, else ``None``.
        last_jacobian: the Jacobian ``[m, n]`` of the task losses (unscaled, averaged over the ranks)
            of the last step, at the level asked for with :meth:`request_jacobian`; ``None`` on
            steps without a request.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        mode: GradientMode = "parameter",
        batched: bool | None = None,
        chunk_size: int | None = None,
        fmtl: FMTL | None = None,
        flat_aggregator: Aggregator | None = None,
        encoder: nn.Module | None = None,
        heads: Sequence[nn.Module] = (),
    ) -> None:
        self.aggregator, self.mode, self.batched, self.chunk_size = aggregator, mode, batched, chunk_size
        self.fmtl, self.flat_aggregator, self.encoder, self.heads = fmtl, flat_aggregator, encoder, list(heads)
        self.last_weights: Tensor | None = None
        self.last_gramian: Tensor | None = None
        self.last_jacobian: Tensor | None = None
        self.jacobian_request: JacobianLevel | None = None
        self._step: TaskStep | None = None
        self._losses_before: Tensor | None = None

    # -- what the aggregator needs --------------------------------------------------------------
    @property
    def uses_gradients(self) -> bool:
        """Whether a step works on per-task gradients: a gradient aggregator, or F-MTL."""
        return not isinstance(self.aggregator, LossWeighting) or self.fmtl is not None

    @property
    def needs_jacobian(self) -> bool:
        """Whether a step needs the task gradients at all (a gradient method, or task gradient norms)."""
        return self.uses_gradients or self.aggregator.needs_grad_norms

    def is_batched(self, like: Tensor) -> bool:
        """Whether Jacobians of tensors on ``like``'s device come from one batched backward."""
        # one batched backward pays on a GPU; on a CPU a loop of backward passes is as fast and lighter
        return self.batched if self.batched is not None else like.is_cuda

    def request_jacobian(self, level: JacobianLevel | None = "parameter") -> None:
        """Keep the Jacobian of the next step at ``level`` in :attr:`last_jacobian` (computed for it
        where the step does not need one itself, e.g. with a loss weighting); ``None`` withdraws."""
        if level not in (None, "parameter", "representation"):
            raise ValueError(f"level must be 'parameter' or 'representation', got {level!r}")
        self.jacobian_request = level

    # -- one step -------------------------------------------------------------------------------
    def start_step(self) -> None:
        """Forget the last step's weights, Gramian, Jacobian and any step left staged."""
        self.last_weights = self.last_gramian = self.last_jacobian = None
        self._step = None

    def objective(self, losses: Tensor, grad_norms: Callable[[], Tensor] | None = None) -> Tensor:
        """A loss weighting's objective; ``grad_norms()`` gives the task gradient norms to a method
        that ``needs_grad_norms`` (GradNorm)."""
        if self.aggregator.needs_grad_norms:
            if grad_norms is None:
                raise ValueError(f"{type(self.aggregator).__name__} needs the task gradient norms (grad_norms)")
            objective = self.aggregator(losses, grad_norms=grad_norms())
        else:
            objective = self.aggregator(losses)
        if not isinstance(self.aggregator, LinearScalarization):  # fixed weights are not worth a log line
            assert isinstance(self.aggregator, LossWeighting)  # only loss weightings make an objective
            self.last_weights = self.aggregator.last_weights
        return objective

    def gradient_norms(self, terms: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        """The norms ``[m]`` of the task gradients w.r.t. ``params`` (the graph is kept)."""
        return flat_jacobian(terms, params, self.is_batched(terms[0]), self.chunk_size).norm(dim=1)

    def record_losses(self, losses: Tensor) -> None:
        """The step's task losses, kept for :meth:`after_step` when the aggregator asks for them."""
        if self.aggregator.needs_losses_after_step:
            self._losses_before = losses.detach()

    def stage(self, step: TaskStep) -> None:
        """Keep the step for :meth:`backward` if it needs the engine (gradients, or a requested Jacobian)."""
        self._step = step if self.uses_gradients or self.jacobian_request is not None else None

    @property
    def staged(self) -> bool:
        """Whether a step waits for :meth:`backward`."""
        return self._step is not None

    def backward(
        self,
        loss: Tensor,
        shared: Sequence[Tensor],
        others: Sequence[Tensor],
        world_size: int = 1,
        forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> Tensor | None:
        """Write the staged step's gradients; return the loss the caller must back-propagate ordinarily
        instead (a loss weighting, the representation level), or ``None`` when they are written.

        Args:
            loss: what Lightning back-propagates: the step's ``closure_loss``, or a new tensor (times
                GradScaler's scale under 16-mixed, divided by the accumulation steps). The engine
                differentiates the losses so scaled (fp16 gradients need the scale) and shows the
                aggregator unscaled gradients.
            shared: the shared (encoder) parameters that take the aggregated direction.
            others: every other trainable parameter (heads, the aggregator's own); each takes its
                ordinary gradient.
            world_size: the number of DDP ranks; above 1 the Jacobian (or Gramian) is reduced over
                them with ``torch.distributed``, so every rank writes the update of the whole batch.
            forward_context: entered around each of F-MTL's extra forwards (autocast).
        """
        step, self._step = self._step, None
        if step is None:
            return loss
        scale = loss_scale(loss, step.closure_loss)
        terms = step.terms if scale is None else [term * scale for term in step.terms]
        distributed = world_size > 1
        request, self.jacobian_request = self.jacobian_request, None
        if not self.uses_gradients:
            self._keep_jacobian(self._jacobian(request, terms, shared, step), scale, distributed)
            return loss
        if self.mode == "representation":
            return self._representation_step(step, terms, shared, scale, world_size, request)
        if self.mode == "gramian":
            self._gramian_step(step, terms, shared, others, scale, world_size, request)
            return None
        if request == "representation":
            self._keep_jacobian(self._jacobian(request, terms, shared, step), scale, distributed)
        divisors = None
        if self.aggregator.uses_log_losses:
            # grad log L = grad L / L (heads included), with L the loss averaged over ranks: exact
            # under DDP as well
            divisors = step.losses.detach().clone()
            divisors = _all_mean(divisors) if distributed else divisors
            terms = [term / divisors[i] for i, term in enumerate(terms)]
        loss_weights = None
        if step.objective is not None:  # F-MTL with a loss weighting: its weights, and its own parameters' grads
            loss_weights = self._loss_weighting_gradients(step, scale, distributed)
        # one pass per task gives the shared Jacobian and the heads' (summed, ordinary) gradients
        jac, other_grads = task_gradients(
            terms, shared, self.is_batched(terms[0]), self.chunk_size, summed=others, retain_graph=False
        )
        if scale is not None:
            jac = jac.div_(scale)
        if distributed:  # J of the mean loss over ranks = mean of the per-rank Jacobians
            jac = _all_mean(jac)
            other_grads = _all_mean_grads(others, other_grads)
        if request == "parameter":  # rows of the plain losses, whatever the aggregator saw
            self.last_jacobian = jac.clone() if divisors is None else jac * divisors[:, None].to(jac.dtype)
        if self.fmtl is not None:
            direction = self._fmtl_direction(
                step, jac, others, other_grads, loss_weights, scale, divisors, distributed, forward_context
            )
        else:
            direction = self.direction(jac)
        set_grads(others, other_grads)  # already carry the loss scale
        add_to_grads(shared, direction if scale is None else direction * scale)
        return None

    def direction(self, jac: Tensor, aggregator: Aggregator | None = None, log: bool = True) -> Tensor:
        """The aggregator's direction ``[n]`` for a Jacobian (keeping a Gramian weighting's weights)."""
        aggregator = self.aggregator if aggregator is None else aggregator
        if isinstance(aggregator, GramianWeighting):
            gramian = jac @ jac.T
            weights = aggregator(gramian)
            if log:
                self.last_weights, self.last_gramian = weights.detach(), gramian
            return weights.to(jac.dtype) @ jac
        assert isinstance(aggregator, JacobianAggregator), "a loss weighting has no direction of its own"
        return aggregator.aggregate(jac)

    def after_step(
        self, losses_after: Callable[[], Tensor], reduce_mean: Callable[[Tensor], Tensor] = lambda t: t
    ) -> None:
        """The aggregators' hook after an optimizer step; ``losses_after()`` (the same batch's task
        losses at the new parameters) is called only for a method that needs them (FAMO)."""
        if self.flat_aggregator is not None:
            self.flat_aggregator.after_step()
        if not self.aggregator.needs_losses_after_step:
            self.aggregator.after_step()
            return
        before, self._losses_before = self._losses_before, None
        if before is None:
            return
        after = losses_after()
        self.aggregator.after_step(reduce_mean(before), reduce_mean(after))

    def on_train_epoch_end(self, reduce_mean: Callable[[Tensor], Tensor]) -> None:
        """The aggregator's end-of-epoch hook (DWA), with a mean over the ranks."""
        self.aggregator.on_train_epoch_end(reduce_mean)

    # -- the paths ------------------------------------------------------------------------------
    def _representation_step(
        self,
        step: TaskStep,
        terms: list[Tensor],
        shared: Sequence[Tensor],
        scale: Tensor | None,
        world_size: int,
        request: JacobianLevel | None,
    ) -> Tensor:
        """Weights from the Gramian of the representation gradients; the weighted loss comes back."""
        if request == "parameter":
            self._keep_jacobian(self._jacobian(request, terms, shared, step), scale, world_size > 1)
        assert step.features is not None  # the module hands the representation on this path
        jac = flat_jacobian(terms, [step.features], self.is_batched(terms[0]), self.chunk_size)
        jac = jac if scale is None else jac / scale
        if request == "representation":
            self._keep_jacobian(jac.clone(), None, world_size > 1)
        gramian = jac @ jac.T
        if world_size > 1:
            # the full batch's loss is the mean of the per-rank means: its representation Jacobian
            # is the per-rank ones / world side by side, so its Gramian is their sum / world^2
            gramian = sum_over_ranks(gramian) / world_size**2
        weights = self.aggregator(gramian).to(terms[0].dtype)
        self.last_weights, self.last_gramian = weights.detach(), gramian
        return (weights.detach() * torch.stack(terms)).sum()

    def _gramian_step(
        self,
        step: TaskStep,
        terms: list[Tensor],
        shared: Sequence[Tensor],
        others: Sequence[Tensor],
        scale: Tensor | None,
        world_size: int,
        request: JacobianLevel | None,
    ) -> None:
        """The parameter level's update from the Gramian alone (see :mod:`~lightning_mtl.multitask.gramian`);
        under DDP, that of the losses averaged over the ranks (the cross-rank terms gathered or reduced
        per layer), so every rank writes the update of the whole batch."""
        assert isinstance(self.aggregator, GramianWeighting) and step.layers is not None
        distributed = world_size > 1
        # a requested Jacobian costs its own passes (rows of the plain losses), before the graph is freed
        self._keep_jacobian(self._jacobian(request, terms, shared, step), scale, distributed)
        if self.aggregator.uses_log_losses:  # grad log L = grad L / L, as at the parameter level
            divisors = step.losses.detach().clone()
            divisors = _all_mean(divisors) if distributed else divisors
            terms = [term / divisors[i] for i, term in enumerate(terms)]
        contracted = {id(p) for calls in step.layers if calls.outputs for p in calls.module.parameters(recurse=False)}
        direct = [p for p in shared if id(p) not in contracted]
        gramian, pieces, direct_jac, other_grads = gramian_and_gradients(
            step.layers, terms, direct, others, self.is_batched(terms[0]), self.chunk_size, world_size
        )
        layers, step.layers = step.layers, None  # the recorded activations go with the step
        if scale is not None:  # the pieces carry the scale once, the Gramian twice
            gramian = gramian / (scale.float() ** 2)
        weights = self.aggregator(gramian)
        self.last_weights, self.last_gramian = weights.detach(), gramian
        # the shared gradient of sum_i w_i l_i from the same pieces (they carry the loss scale)
        written = weighted_gradients(layers, pieces, weights.detach().float())
        direct_grads = torch.split(weights.detach().float() @ direct_jac.float(), [p.numel() for p in direct])
        written.update({id(p): g.view_as(p) for p, g in zip(direct, direct_grads)})
        shared_grads: list[Tensor | None] = [written[id(p)] for p in shared]
        if distributed:  # this rank's pieces: the whole batch's gradient is their mean over the ranks
            shared_grads = _all_mean_grads(shared, shared_grads)
            other_grads = _all_mean_grads(others, other_grads)
        set_grads(others, other_grads)  # already carry the loss scale
        set_grads(shared, shared_grads)

    def _jacobian(
        self, level: JacobianLevel | None, terms: list[Tensor], shared: Sequence[Tensor], step: TaskStep
    ) -> Tensor | None:
        """A Jacobian the step does not need itself, for a request (the graph is kept)."""
        if level is None:
            return None
        if level == "representation" and not isinstance(step.features, Tensor):
            raise ValueError("a representation-level Jacobian needs one shared representation tensor")
        wrt = list(shared) if level == "parameter" else [cast(Tensor, step.features)]
        return flat_jacobian(terms, wrt, self.is_batched(terms[0]), self.chunk_size)

    def _keep_jacobian(self, jac: Tensor | None, scale: Tensor | None, distributed: bool) -> None:
        if jac is None:
            return
        jac = jac if scale is None else jac.div_(scale)
        self.last_jacobian = _all_mean(jac) if distributed else jac

    def _loss_weighting_gradients(self, step: TaskStep, scale: Tensor | None, distributed: bool) -> Tensor:
        """A loss weighting's weights ``d objective / d losses`` (F-MTL applies them to its gradients);
        the weighting's own parameters (uncertainty weighting) take their gradients of the objective."""
        own = [p for p in self.aggregator.parameters() if p.requires_grad]
        assert step.objective is not None  # the caller checked it
        grads = torch.autograd.grad(step.objective, [step.losses, *own], retain_graph=True, allow_unused=True)
        weights = grads[0].detach().float()
        if distributed:
            weights = _all_mean(weights)
        own_grads = [None if g is None else (g if scale is None else g * scale) for g in grads[1:]]
        set_grads(own, _all_mean_grads(own, own_grads) if distributed else own_grads)
        return weights

    def _fmtl_direction(
        self,
        step: TaskStep,
        jac: Tensor,
        others: Sequence[Tensor],
        other_grads: list[Tensor | None],
        loss_weights: Tensor | None,
        scale: Tensor | None,
        divisors: Tensor | None,
        distributed: bool,
        forward_context: Callable[[], contextlib.AbstractContextManager],
    ) -> Tensor:
        """F-MTL's shared direction; each head's entry of ``other_grads`` becomes its SAM gradient."""
        assert self.fmtl is not None and self.encoder is not None and step.task_loss is not None
        index = {id(p): k for k, p in enumerate(others)}
        heads = [[p for p in head.parameters() if p.requires_grad] for head in self.heads]
        head_grads = [[other_grads[index[id(p)]] for p in own] for own in heads]
        raw_loss = step.task_loss

        def task_loss(i: int, pred: Tensor) -> Tensor:  # scaled like the first pass
            term = raw_loss(i, pred)
            term = term if divisors is None else term / divisors[i]
            return term if scale is None else term * scale

        jac_sam, head_sam = self.fmtl.perturbed_gradients(
            jac, head_grads, self.encoder, self.heads, step.inputs, task_loss, forward_context
        )
        if scale is not None:
            jac_sam = jac_sam.div_(scale)
        flat_heads = [p for own in heads for p in own]
        head_sam_flat = [g for grads in head_sam for g in grads]
        if distributed:
            jac_sam = _all_mean(jac_sam)
            head_sam_flat = _all_mean_grads(flat_heads, head_sam_flat)
        k = 0
        for i, own in enumerate(heads):  # head i takes its own SAM gradient (weighted for a loss weighting)
            for p in own:
                grad = head_sam_flat[k]
                k += 1
                if grad is not None and loss_weights is not None:
                    grad = grad * loss_weights[i].to(grad.dtype)
                other_grads[index[id(p)]] = grad
        if loss_weights is not None:  # linear in the gradients: both variants give w^T g^SAM
            self.last_weights = loss_weights
            return loss_weights @ jac_sam
        if self.fmtl.variant == "direct":
            return self.direction(jac_sam)
        direction = self.direction(jac)
        # the flat gradients get an aggregator of their own, so a stateful method (GradVac's targets,
        # Nash-MTL's warm start) keeps one state per stream
        return direction + self.direction(jac_sam.sub_(jac), self.flat_aggregator, log=False)


def loss_scale(loss: Tensor, closure_loss: Tensor) -> Tensor | None:
    """The factor between the loss Lightning back-propagates and the closure's loss (GradScaler's scale,
    1 / accumulation steps), or ``None`` when it is the closure's loss itself."""
    if loss is closure_loss:
        return None
    total = closure_loss.detach()
    return torch.where(total != 0, loss.detach() / total, torch.ones_like(total))


def _all_mean(tensor: Tensor) -> Tensor:
    """Mean over the DDP ranks (one all-reduce, in place)."""
    return mean_over_ranks_(tensor)


def _all_mean_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The gradients averaged over the ranks, in one all-reduce of their concatenation (a parameter no
    loss reached on this rank counts as zero: another rank's batch may have reached it)."""
    if not params:
        return []
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
    flat = _all_mean(flat)
    return [v.view_as(p) for p, v in zip(params, torch.split(flat, [p.numel() for p in params]))]


def task_gradients(
    losses: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    batched: bool,
    chunk_size: int | None = None,
    summed: Sequence[Tensor] = (),
    retain_graph: bool = True,
) -> tuple[Tensor, list[Tensor | None]]:
    """The float32 Jacobian ``[m, n]`` of the task losses w.r.t. ``inputs``, and the gradients of their
    sum w.r.t. ``summed``, from the same backward passes.

    ``losses`` is the vector of task losses or, better for the loop, the list of the m scalar losses
    themselves: each backward pass then visits only its own task's head, where a row of a stacked
    vector would send (zero) cotangents through every head. ``summed`` are the parameters that need
    only the ordinary gradient (the heads): their per-task rows are never stored. Every pass writes
    straight into one preallocated buffer (no concatenation, no stacking). Inputs that a loss does
    not reach get zero rows; a summed parameter no loss reaches gets ``None``. ``chunk_size`` bounds
    how many rows one batched backward computes; ``retain_graph=False`` frees the graph after the
    last pass (when no backward follows).
    """
    terms = [losses[i] for i in range(losses.numel())] if isinstance(losses, Tensor) else list(losses)
    m = len(terms)
    sizes = [p.numel() for p in inputs]
    wrt = [*inputs, *summed]
    jac = torch.zeros(m, sum(sizes), device=terms[0].device, dtype=torch.float32)
    totals: list[Tensor | None] = [None] * len(summed)
    if batched:
        stacked = torch.stack(terms)
        eye = torch.eye(m, device=stacked.device, dtype=stacked.dtype)
        step = chunk_size or m
        for start in range(0, m, step):
            last = start + step >= m
            grads = torch.autograd.grad(
                stacked, wrt, grad_outputs=eye[start : start + step], is_grads_batched=True,
                retain_graph=retain_graph or not last, allow_unused=True,
            )  # fmt: skip
            write_flat(jac[start : start + step], grads[: len(inputs)], sizes)
            _accumulate(totals, [None if g is None else g.sum(0) for g in grads[len(inputs) :]])
        return jac, totals
    for i, term in enumerate(terms):
        grads = torch.autograd.grad(term, wrt, retain_graph=retain_graph or i < m - 1, allow_unused=True)
        write_flat(jac[i], grads[: len(inputs)], sizes)
        _accumulate(totals, grads[len(inputs) :])
    return jac, totals


def flat_jacobian(
    losses: Tensor | Sequence[Tensor], inputs: Sequence[Tensor], batched: bool, chunk_size: int | None = None
) -> Tensor:
    """Jacobian ``[m, n]`` (float32) of the task losses w.r.t. ``inputs``, flattened and concatenated.

    The graph is kept, so a backward pass can follow. See :func:`task_gradients`.
    """
    return task_gradients(losses, inputs, batched, chunk_size)[0]


def write_flat(rows: Tensor, grads: Sequence[Tensor | None], sizes: Sequence[int]) -> None:
    """Copy each gradient into its columns of ``rows`` (``[n]``, or ``[k, n]`` for k batched rows)."""
    start = 0
    for grad, size in zip(grads, sizes):
        if grad is not None:  # columns of an unreached input stay zero
            rows[..., start : start + size].copy_(grad.reshape(*rows.shape[:-1], size))
        start += size


def _accumulate(totals: list[Tensor | None], grads: Sequence[Tensor | None]) -> None:
    for k, grad in enumerate(grads):
        if grad is not None:
            total = totals[k]
            totals[k] = grad if total is None else total.add_(grad)


def add_to_grads(params: Sequence[Tensor], flat: Tensor) -> None:
    """``p.grad += slice`` for each parameter (``p.grad = slice`` where it has none: the slices are
    views of ``flat``, which the caller hands over)."""
    views = torch.split(flat, [p.numel() for p in params])
    for p, v in zip(params, views):
        v = v.view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = v
        else:
            p.grad.add_(v)


def set_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None], scale: Tensor | None = None) -> None:
    """``p.grad += g`` (times ``scale``) for each parameter with a gradient; the tensors are taken over."""
    for p, grad in zip(params, grads):
        if grad is None:
            continue
        grad = (grad if scale is None else grad.mul_(scale)).to(p.dtype)
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.add_(grad)
