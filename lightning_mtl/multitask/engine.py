"""The per-task gradient engine: Jacobians of the task losses, and writing an aggregated direction.

Knows nothing of any aggregation method. Two levels (see ``MultiTaskModule(gradient_mode=...)``):

* parameter level: the m x n Jacobian of the task losses w.r.t. the shared parameters, from one
  batched backward (``is_grads_batched``, a vmap over the VJP) or from a loop of m backward passes;
  batching pays on a GPU, the loop is as fast and lighter on a CPU;
* representation level (MGDA-UB style): the m gradients w.r.t. the shared representation only (the
  heads are cheap), whose m x m Gramian drives the weights; one ordinary backward of the weighted
  loss then goes through the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
            totals[k] = grad if totals[k] is None else totals[k].add_(grad)


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
