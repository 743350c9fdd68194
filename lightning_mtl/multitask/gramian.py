"""The Gramian level: ``G = J J^T`` of the task losses w.r.t. the shared parameters, accumulated layer
by layer, without ever materialising the m x n Jacobian ``J``.

For a linear map ``y = x W^T + b`` applied to the rows ``X [R, d_in]`` with the per-task output
gradients ``D_i [R, d_out]``, ``grad_W l_i = D_i^T X``, so

    <grad_W l_i, grad_W l_j> = sum((D_i D_j^T) * (X X^T)),   <grad_b l_i, grad_b l_j> = <1^T D_i, 1^T D_j>.

A convolution is such a map on its unfolded patches (``R = batch x positions``). Where ``R^2`` is
larger than ``d_in x d_out`` the layer's per-task weight gradients ``[m, d_out, d_in]`` are cheaper:
they are formed for that layer only and dropped once its Gram block is summed. A layer called several
times in one forward stacks the rows of its calls (its gradient is the sum over the calls). The
output gradients come from m backward passes w.r.t. the recorded layer outputs (not the parameters);
the shared parameters of other modules (norm layers, embeddings, ...) take their per-task gradients
directly, as they are small. Once the weights ``w`` are known, the shared gradient of
``sum_i w_i l_i`` is formed from the same pieces (``X^T (sum_i w_i D_i)``), with no further backward.

Under DDP the task losses are the means over the ranks, so ``G_ij = (1 / W^2) sum_{r,s} <g_i^r, g_j^s>``
has cross-rank terms. Per layer, every rank either gathers all ranks' rows ``X`` and ``D / W`` and
contracts them as one process would the concatenated batch (``W x (|X| + m |D|)`` numbers received;
the contraction is then done ``W`` times over, once per rank), or averages the layer's per-task
parameter gradients ``[m, p]`` over the ranks (an all-reduce of ``m x p`` numbers, the parameter
level's traffic for that layer, but one layer at a time); :func:`gathers_rows` takes whichever moves
fewer numbers. The other shared parameters' per-task gradients are averaged (``m x k``). The weighted
gradient is then formed from this rank's pieces and averaged over the ranks in one all-reduce of
``n`` numbers, what DDP's own averaging would move.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from lightning_mtl._distributed import gather_rows, max_over_ranks, mean_over_ranks_


@dataclass
class LayerCalls:
    """The recorded calls of one linear or convolutional layer: its inputs and outputs, in call order."""

    module: nn.Module
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


def contracted(module: nn.Module) -> bool:
    """Whether the Gramian of ``module``'s weight is contracted from its inputs and output gradients
    (``nn.Linear``, and ``nn.Conv2d`` with one group, zero padding given as numbers)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or not weight.requires_grad:
        return False
    if type(module) is nn.Linear:
        return True
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


@contextlib.contextmanager
def record_layers(encoder: nn.Module) -> Iterator[list[LayerCalls]]:
    """Record the inputs and outputs of ``encoder``'s contracted layers while the block runs (the
    forward continues on a copy of each output, one activation's memory per layer call)."""
    layers = [LayerCalls(m) for m in encoder.modules() if contracted(m)]

    def hook(calls: LayerCalls) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
        def record(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if not output.requires_grad:  # a call under no_grad reaches no loss: it adds nothing
                return output
            calls.inputs.append(args[0])
            calls.outputs.append(output)
            calls.versions.append(output._version)
            # the rest of the forward gets a copy: an in-place operation after the layer (ReLU(inplace=True))
            # then leaves the recorded output, whose gradient is the layer's output gradient, as it was
            return output.clone()

        return record

    handles = [calls.module.register_forward_hook(hook(calls)) for calls in layers]
    try:
        yield layers
    finally:
        for handle in handles:
            handle.remove()


def _rows(calls: LayerCalls, output_grads: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The layer's input rows ``X [R, d_in]`` and the per-task output-gradient rows ``D [m, R, d_out]``
    of all its calls (float32)."""
    module, xs, ds = calls.module, [], []
    for x, d in zip(calls.inputs, output_grads):
        m = d.shape[0]
        if isinstance(module, nn.Conv2d):
            assert not isinstance(module.padding, str)  # contracted() sends string paddings the direct way
            patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
            xs.append(patches.transpose(1, 2).reshape(-1, patches.shape[1]))  # [B * L, C * kh * kw]
            ds.append(d.flatten(3).transpose(2, 3).reshape(m, -1, d.shape[2]))  # [m, B * L, out]
        else:
            xs.append(x.reshape(-1, x.shape[-1]))
            ds.append(d.reshape(m, -1, d.shape[-1]))
    return torch.cat(xs).float(), torch.cat(ds, dim=1).float()


def layer_gramian(x: Tensor, d: Tensor, bias: bool) -> Tensor:
    """The ``[m, m]`` Gramian of one layer's weight (and bias) gradients from ``X [R, d_in]`` and
    ``D [m, R, d_out]``, by whichever contraction is cheaper."""
    rows, d_in, d_out = x.shape[0], x.shape[1], d.shape[2]
    if rows * rows <= d_in * d_out:
        kernel = x @ x.T  # [R, R]
        gramian = torch.einsum("iro,jro->ij", d, torch.einsum("rs,jso->jro", kernel, d))
    else:
        # the per-task weight gradients of this layer alone, dropped once their Gram is taken
        grads = torch.einsum("mro,rd->mod", d, x).flatten(1)
        gramian = grads @ grads.T
    if bias:
        sums = d.sum(dim=1)
        gramian = gramian + sums @ sums.T
    return gramian


def _conv_weight_grad(conv: nn.Conv2d, x: Tensor, d: Tensor) -> Tensor:
    """The weight gradient of one call of ``conv`` for the output gradient ``d`` (the native kernel)."""
    assert not isinstance(conv.padding, str)  # contracted() sends string paddings the direct way
    return conv2d_weight(x.to(d.dtype), conv.weight.shape, d, conv.stride, conv.padding, conv.dilation, conv.groups)


def _summed(tensors: Iterator[Tensor]) -> Tensor:
    """The sum of one or more tensors (one per recorded call)."""
    first, *rest = tensors
    for t in rest:
        first = first + t
    return first


def _task_parameter_gradients(calls: LayerCalls, grads: Sequence[Tensor], bias: bool) -> Tensor:
    """The per-task gradients ``[m, weight (+ bias)]`` of one layer's parameters (float32), summed over
    its recorded calls: the native kernel for a convolution, ``D_i^T X`` for a linear layer."""
    module = calls.module
    m = grads[0].shape[0]
    if isinstance(module, nn.Conv2d):
        weight_grads = torch.stack(
            [_summed(_conv_weight_grad(module, x, d[i]) for x, d in zip(calls.inputs, grads)) for i in range(m)]
        ).flatten(1)
        sums = _summed(d.sum(dim=(1, 3, 4)) for d in grads) if bias else None
    else:
        x, d = _rows(calls, grads)
        weight_grads = torch.einsum("mro,rd->mod", d, x).flatten(1)
        sums = d.sum(dim=1) if bias else None
    weight_grads = weight_grads.float()
    return weight_grads if sums is None else torch.cat([weight_grads, sums.float()], dim=1)


def _calls_gramian(calls: LayerCalls, grads: Sequence[Tensor], bias: bool) -> Tensor:
    """The Gramian block of one layer from its recorded calls and their per-task output gradients."""
    module = calls.module
    if isinstance(module, nn.Conv2d):
        rows = sum(d.shape[1] * d.shape[3] * d.shape[4] for d in grads)
        if rows * rows > module.weight.numel():
            # many positions: the per-task weight gradients from the native kernel (no unfolded
            # patches), this layer's only, dropped once their Gram is taken
            task_grads = _task_parameter_gradients(calls, grads, bias)
            return task_grads @ task_grads.T
    x, d = _rows(calls, grads)
    return layer_gramian(x, d, bias)


def gathers_rows(row_numel: int, parameters: int, m: int, world_size: int) -> bool:
    """Whether a layer's cross-rank Gramian block gathers the rows (inputs and output gradients, ``row_numel``
    numbers per rank) rather than all-reducing its per-task parameter gradients (``m x parameters``
    numbers): whichever moves fewer numbers to each rank."""
    return world_size * row_numel < m * parameters


def _row_numel(calls: LayerCalls, grads: Sequence[Tensor]) -> int:
    """The numbers one rank sends to gather a layer's rows: its inputs and per-task output gradients."""
    return sum(x.numel() + d.numel() for x, d in zip(calls.inputs, grads))


def _cross_rank_gramian(
    calls: LayerCalls, grads: Sequence[Tensor], bias: bool, world_size: int, row_numel: int
) -> Tensor:
    """One layer's Gramian block of the losses averaged over the ranks.

    The gradient of the mean loss is ``(1 / W) sum_r g_i^r``, so the block holds the cross-rank terms
    ``<g_i^r, g_j^s>``. Either every rank gathers every rank's rows (the output gradients divided by
    ``W``) and contracts them as one process would the concatenated batch, or the per-task parameter
    gradients of this layer are averaged over the ranks; :func:`gathers_rows` picks the cheaper from
    ``row_numel``, which must be the same on every rank (the largest rank's).
    """
    m = grads[0].shape[0]
    module = calls.module
    parameters = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
    if gathers_rows(row_numel, parameters, m, world_size):
        inputs = [gather_rows(x) for x in calls.inputs]
        outputs = [gather_rows(d.transpose(0, 1)).transpose(0, 1) / world_size for d in grads]
        return _calls_gramian(LayerCalls(module, inputs), outputs, bias)
    task_grads = mean_over_ranks_(_task_parameter_gradients(calls, grads, bias))
    return task_grads @ task_grads.T


def gramian_and_gradients(
    layers: Sequence[LayerCalls],
    terms: Sequence[Tensor],
    direct: Sequence[Tensor],
    others: Sequence[Tensor],
    batched: bool,
    chunk_size: int | None,
    world_size: int = 1,
) -> tuple[Tensor, list[list[Tensor]], Tensor, list[Tensor | None]]:
    """The Gramian ``[m, m]`` (float32) of the task losses ``terms`` w.r.t. the shared parameters.

    Above one rank, ``terms`` are this rank's and the Gramian is that of their means over the ranks
    (each layer's block by :func:`_cross_rank_gramian`, the direct parameters' per-task gradients
    averaged over the ranks); the pieces, gradients and ``direct`` rows returned stay this rank's.

    Returns the Gramian, the per-task output gradients ``[m, *output]`` of each recorded call of each
    layer that ran (for :func:`weighted_gradients`), the per-task gradients ``[m, k]`` of the
    ``direct`` parameters (flattened) and the summed gradients of ``others`` (the heads: their
    ordinary gradient). The graph is freed.
    """
    from lightning_mtl.multitask.engine import task_gradients  # the engine imports this module

    used = [calls for calls in layers if calls.outputs]
    outputs = [y for calls in used for y in calls.outputs]
    for calls in used:
        if any(y._version != v for y, v in zip(calls.outputs, calls.versions)):
            raise RuntimeError(
                f"gradient_mode='gramian': the recorded output of {type(calls.module).__name__} was modified in "
                "place (by another forward hook?); use gradient_mode='parameter'"
            )
    jac, other_grads = task_gradients(
        terms, [*outputs, *direct], batched, chunk_size, summed=others, retain_graph=False
    )
    m = len(terms)
    views = torch.split(jac, [t.numel() for t in [*outputs, *direct]], dim=1)
    gramian = jac.new_zeros(m, m, dtype=torch.float32)
    pieces, k = [], 0
    for calls in used:
        count = len(calls.outputs)
        pieces.append([v.view(m, *y.shape) for v, y in zip(views[k : k + count], calls.outputs)])
        k += count
    row_numels: list[int] = []
    if world_size > 1 and used:  # every rank must take the same scheme per layer: the largest rank's rows decide
        numels = torch.tensor([_row_numel(calls, grads) for calls, grads in zip(used, pieces)], dtype=torch.float64)
        row_numels = [int(n) for n in max_over_ranks(numels.to(jac.device)).tolist()]
    for i, (calls, grads) in enumerate(zip(used, pieces)):
        bias = getattr(calls.module, "bias", None)
        has_bias = isinstance(bias, Tensor) and bias.requires_grad
        if world_size > 1:
            gramian += _cross_rank_gramian(calls, grads, has_bias, world_size, row_numels[i])
        else:
            gramian += _calls_gramian(calls, grads, has_bias)
    direct_jac = torch.cat(views[k:], dim=1) if direct else jac.new_zeros(m, 0)
    # a copy: the rows returned stay this rank's (the weighted gradient is averaged later)
    direct_mean = mean_over_ranks_(direct_jac.float().clone()) if world_size > 1 else direct_jac.float()
    gramian += direct_mean @ direct_mean.T
    return gramian, pieces, direct_jac, other_grads


def weighted_gradients(
    layers: Sequence[LayerCalls], pieces: Sequence[list[Tensor]], weights: Tensor
) -> dict[int, Tensor]:
    """The gradients of ``sum_i w_i l_i`` w.r.t. the recorded layers' weights and biases, keyed by the
    parameter's ``id`` (float32)."""
    grads: dict[int, Tensor] = {}
    used = [calls for calls in layers if calls.outputs]
    for calls, output_grads in zip(used, pieces):
        module = calls.module
        combined = [torch.einsum("m,m...->...", weights, d) for d in output_grads]
        weight = module.weight
        assert isinstance(weight, Tensor)
        if isinstance(module, nn.Conv2d):
            grads[id(weight)] = _summed(_conv_weight_grad(module, x, c) for x, c in zip(calls.inputs, combined))
            bias_grad = _summed(c.sum(dim=(0, 2, 3)) for c in combined)
        else:
            rows = torch.cat([c.reshape(-1, c.shape[-1]) for c in combined])
            inputs = torch.cat([x.reshape(-1, x.shape[-1]) for x in calls.inputs]).float()
            grads[id(weight)] = rows.T @ inputs
            bias_grad = rows.sum(dim=0)
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor) and bias.requires_grad:
            grads[id(bias)] = bias_grad
    return grads


__all__ = [
    "LayerCalls",
    "contracted",
    "gathers_rows",
    "gramian_and_gradients",
    "layer_gramian",
    "record_layers",
    "weighted_gradients",
]
