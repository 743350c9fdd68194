"""The pure perturbation helpers against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mtl.sharpness.perturb import (
    apply_perturbation,
    perturbation_norm,
    restore_parameters,
    sam_perturbation,
)


def test_sam_perturbation_by_hand():
    # g = ([1, 2], [2]): |g| = 3, so with rho = 3 the perturbation is g itself, and with rho = 1 g / 3
    params = [torch.zeros(2), torch.zeros(1)]
    grads = [torch.tensor([1.0, 2.0]), torch.tensor([2.0])]
    e = sam_perturbation(grads, params, rho=3.0)
    assert torch.allclose(e[0], torch.tensor([1.0, 2.0])) and torch.allclose(e[1], torch.tensor([2.0]))
    e = sam_perturbation(grads, params, rho=1.0)
    assert torch.allclose(e[0], torch.tensor([1 / 3, 2 / 3])) and torch.allclose(e[1], torch.tensor([2 / 3]))
    assert perturbation_norm(grads).item() == pytest.approx(3.0)


def test_asam_perturbation_by_hand():
    # w = ([1, -2], [0]), g = ([1, 1], [2]), eta = 0.5: T = ([1.5, 2.5], [0.5]), T g = ([1.5, 2.5], [1]),
    # |T g| = sqrt(2.25 + 6.25 + 1) = sqrt(9.5); T^2 g = ([2.25, 6.25], [0.5]); with rho = sqrt(9.5): e = T^2 g
    params = [torch.tensor([1.0, -2.0]), torch.tensor([0.0])]
    grads = [torch.tensor([1.0, 1.0]), torch.tensor([2.0])]
    e = sam_perturbation(grads, params, rho=math.sqrt(9.5), adaptive=True, eta=0.5)
    assert torch.allclose(e[0], torch.tensor([2.25, 6.25])) and torch.allclose(e[1], torch.tensor([0.5]))
    assert perturbation_norm(grads, params, adaptive=True, eta=0.5).item() == pytest.approx(math.sqrt(9.5))
    # the ASAM radius is measured in T's coordinates: |T^-1 e| = rho
    e = sam_perturbation(grads, params, rho=0.7, adaptive=True, eta=0.5)
    t_inv_e = torch.cat([e[0] / torch.tensor([1.5, 2.5]), e[1] / 0.5])
    assert t_inv_e.norm().item() == pytest.approx(0.7)


def test_per_tensor_adaptive_flags_and_missing_gradients():
    # ASAM on the first tensor only (the official code's "weights only" choice), None skipped
    params = [torch.tensor([2.0]), torch.tensor([5.0]), torch.tensor([9.0])]
    grads = [torch.tensor([1.0]), None, torch.tensor([1.0])]
    e = sam_perturbation(grads, params, rho=1.0, adaptive=[True, True, False], eta=0.0)
    # T g = ([2], -, [1]): norm sqrt(5); e = ([4], -, [1]) / sqrt(5)
    assert e[1] is None
    assert e[0].item() == pytest.approx(4 / math.sqrt(5)) and e[2].item() == pytest.approx(1 / math.sqrt(5))


def test_zero_gradient_gives_zero_perturbation_and_restore_is_exact():
    params = [torch.tensor([0.1, 0.2, 0.3])]
    assert torch.equal(sam_perturbation([torch.zeros(3)], params, rho=0.05)[0], torch.zeros(3))
    original = params[0].clone()
    backup = apply_perturbation(params, [torch.tensor([1e-3, float("nan"), 7.0])])
    assert not torch.equal(params[0], original)
    restore_parameters(params, backup)
    assert torch.equal(params[0], original)  # bit-exact, even after a NaN perturbation


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="rho"):
        sam_perturbation([torch.ones(1)], [torch.ones(1)], rho=-1.0)
    with pytest.raises(ValueError, match="gradients for"):
        sam_perturbation([torch.ones(1)], [torch.ones(1), torch.ones(1)], rho=1.0)
    with pytest.raises(ValueError, match="no gradients"):
        sam_perturbation([None], [torch.ones(1)], rho=1.0)
