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


def flat_jacobian(
    losses: Tensor | Sequence[Tensor], inputs: Sequence[Tensor], batched: bool, chunk_size: int | None = None
) -> Tensor:
    """Jacobian ``[m, n]`` of the task losses w.r.t. ``inputs`` (flattened and concatenated).

    ``losses`` is the vector of task losses or, better for the loop, the list of the m scalar losses
    themselves: each backward pass then visits only its own task's head, where a row of a stacked
    vector would send (zero) cotangents through every head. The graph is kept (``retain_graph``),
    so a backward pass can follow. Inputs that a loss does not reach get zero rows. ``chunk_size``
    bounds how many rows one batched backward computes.
    """
    terms = list(losses) if not isinstance(losses, Tensor) else [losses[i] for i in range(losses.numel())]
    m = len(terms)
    if batched:
        losses = torch.stack(terms) if not isinstance(losses, Tensor) else losses
        rows = []
        eye = torch.eye(m, device=losses.device, dtype=losses.dtype)
        step = chunk_size or m
        for start in range(0, m, step):
            cotangents = eye[start : start + step]
            grads = torch.autograd.grad(
                losses, inputs, grad_outputs=cotangents, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
            rows.append(_flatten(grads, inputs, leading=cotangents.shape[0]))
        return torch.cat(rows) if len(rows) > 1 else rows[0]
    rows = []
    for term in terms:
        grads = torch.autograd.grad(term, inputs, retain_graph=True, allow_unused=True)
        rows.append(_flatten(grads, inputs, leading=None))
    return torch.stack(rows)


def _flatten(grads: Sequence[Tensor | None], inputs: Sequence[Tensor], leading: int | None) -> Tensor:
    parts = []
    for grad, inp in zip(grads, inputs):
        if grad is None:
            shape = (inp.numel(),) if leading is None else (leading, inp.numel())
            parts.append(torch.zeros(shape, device=inp.device, dtype=inp.dtype))
        else:
            parts.append(grad.reshape(-1) if leading is None else grad.reshape(leading, -1))
    return torch.cat(parts, dim=-1)


def add_to_grads(params: Sequence[Tensor], flat: Tensor) -> None:
    """``p.grad += slice`` for each parameter (``p.grad = slice`` where it has none)."""
    views = torch.split(flat, [p.numel() for p in params])
    for p, v in zip(params, views):
        v = v.view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = v.clone()
        else:
            p.grad.add_(v)
