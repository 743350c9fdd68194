"""TaskVector: construction from state dicts and checkpoints, filters, arithmetic, apply_to, errors."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import nn

from lightning_mtl.merging import TaskVector, load_state_dict


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))
    net.train()
    net(torch.randn(4, 1, 4, 4))  # moves the BatchNorm statistics and its integer counter
    return net


@pytest.fixture
def pair():
    base, tuned = _net(0), _net(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p))
    tuned(torch.randn(4, 1, 4, 4))  # a second batch: other running stats, counter 2
    return base.state_dict(), tuned.state_dict()


def test_is_a_mapping_of_float32_differences_without_integer_buffers(pair):
    base, tuned = pair
    tau = TaskVector.from_state_dicts(base, tuned)
    assert isinstance(tau, Mapping)
    assert "1.num_batches_tracked" not in tau and "1.running_mean" in tau
    assert set(tau) == {k for k, v in base.items() if v.is_floating_point()}
    for key, value in tau.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, tuned[key] - base[key])


def test_lambda_zero_is_the_base_bit_for_bit_on_state_dicts_and_modules(pair):
    base, tuned = pair
    tau = TaskVector.from_state_dicts(base, tuned)
    merged = tau.apply_to(base, 0.0)
    assert merged.keys() == base.keys()
    for key in base:
        assert torch.equal(merged[key], base[key]), key
    module = _net(0)
    module.load_state_dict(tuned)  # holds theta_ft everywhere ...
    module.load_state_dict(base)  # ... then theta_0
    tau.apply_to(module, 0.0)
    for key, value in module.state_dict().items():
        assert torch.equal(value, base[key]), key


def test_lambda_one_reproduces_the_expert(pair):
    base, tuned = pair
    # float64 differences of float32 weights are exact, so theta_0 + tau rounds back to theta_ft exactly
    exact = TaskVector.from_state_dicts(base, tuned, dtype=torch.float64).apply_to(base, 1.0)
    for key in base:
        if base[key].is_floating_point():
            assert torch.equal(exact[key], tuned[key]), key
        else:  # integer buffers are the target's: never merged
            assert torch.equal(exact[key], base[key]), key
    # float32 differences round once: within one float32 spacing of the larger magnitude
    approx = TaskVector.from_state_dicts(base, tuned).apply_to(base, 1.0)
    for key in tau_keys(base):
        bound = torch.finfo(torch.float32).eps * torch.maximum(base[key].abs(), tuned[key].abs())
        assert ((approx[key] - tuned[key]).abs() <= bound).all(), key


def tau_keys(state):
    return [k for k, v in state.items() if v.is_floating_point()]


def test_negation_and_scaling_apply_theta0_minus_lambda_tau(pair):
    base, tuned = pair
    tau = TaskVector.from_state_dicts(base, tuned, dtype=torch.float64)
    merged = (-tau).apply_to(base, 0.5)
    for key in tau:
        expected = (base[key].double() - 0.5 * (tuned[key].double() - base[key].double())).float()
        assert torch.equal(merged[key], expected), key


def test_arithmetic_and_norm(pair):
    base, tuned = pair
    a = TaskVector.from_state_dicts(base, tuned)
    b = TaskVector({k: torch.full_like(v, 0.5) for k, v in a.items()})
    for key in a:
        assert torch.equal((a + b)[key], a[key] + b[key])
        assert torch.equal((a - b)[key], a[key] - b[key])
        assert torch.equal((2 * a)[key], a[key] * 2) and torch.equal((a * 2)[key], a[key] * 2)
        assert torch.equal((-a)[key], -a[key])
        assert torch.equal(sum([a, b])[key], a[key] + b[key])
    flat = torch.cat([v.reshape(-1).double() for v in a.values()])
    assert a.norm() == pytest.approx(float(flat.norm()), rel=1e-12)
    assert b.norm() == pytest.approx(0.5 * flat.numel() ** 0.5, rel=1e-12)
    half = a.to(torch.float16)
    assert all(v.dtype == torch.float16 for v in half.values())


def test_include_and_exclude_prefixes(pair):
    base, tuned = pair
    assert set(TaskVector.from_state_dicts(base, tuned, include="3.")) == {"3.weight", "3.bias"}
    kept = set(TaskVector.from_state_dicts(base, tuned, include=["0.", "1."], exclude="1.running"))
    assert kept == {"0.weight", "0.bias", "1.weight", "1.bias"}
    merged = TaskVector.from_state_dicts(base, tuned, include="3.").apply_to(base, 1.0)
    assert merged["0.weight"] is base["0.weight"]  # entries outside the vector are not touched
    with pytest.raises(ValueError, match="no floating-point entry passes"):
        TaskVector.from_state_dicts(base, tuned, include="nothing.")


def test_errors_name_the_first_mismatching_key_or_shape(pair):
    base, tuned = pair
    missing = {k: v for k, v in tuned.items() if k != "0.bias"}
    with pytest.raises(KeyError, match="'0.bias' is in the base state dict but not in the fine-tuned one"):
        TaskVector.from_state_dicts(base, missing)
    extra = {**tuned, "head.weight": torch.zeros(2)}
    with pytest.raises(KeyError, match="'head.weight' is in the fine-tuned state dict but not in the base one"):
        TaskVector.from_state_dicts(base, extra)
    misshapen = {**tuned, "3.weight": torch.zeros(3, 12)}
    with pytest.raises(ValueError, match=r"'3.weight' has shape \(2, 12\) in the base and \(3, 12\) in the fine-tuned"):
        TaskVector.from_state_dicts(base, misshapen)
    tau = TaskVector.from_state_dicts(base, tuned)
    with pytest.raises(KeyError, match="'0.bias' is not in the target"):
        tau.apply_to({k: v for k, v in base.items() if k != "0.bias"})
    with pytest.raises(ValueError, match=r"'3.weight' has shape \(2, 12\), the target's \(3, 12\)"):
        tau.apply_to({**base, "3.weight": torch.zeros(3, 12)})
    other = TaskVector({k: v for k, v in tau.items() if k != "3.bias"})
    with pytest.raises(KeyError, match="'3.bias' is in the left task vector but not in the right one"):
        tau + other
    with pytest.raises(ValueError, match="only floating-point entries"):
        TaskVector({"n": torch.tensor(3)})


def test_checkpoint_formats_give_the_same_vector(pair, tmp_path):
    from safetensors.torch import save_file

    base, tuned = pair
    torch.save({"state_dict": base, "epoch": 3}, tmp_path / "base.ckpt")  # Lightning's layout
    torch.save(tuned, tmp_path / "tuned.pt")  # a bare state dict
    torch.save({"state_dict": tuned}, tmp_path / "tuned.pth")
    save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    reference = TaskVector.from_state_dicts(base, tuned)
    for name in ("tuned.pt", "tuned.pth", "tuned.safetensors"):
        tau = TaskVector.from_checkpoints(tmp_path / "base.ckpt", tmp_path / name)
        assert tau.keys() == reference.keys()
        assert all(torch.equal(tau[k], reference[k]) for k in tau), name
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_state_dict(tmp_path / "nope.ckpt")
    torch.save({"epoch": 1}, tmp_path / "empty.ckpt")
    with pytest.raises(ValueError, match="holds no state dict"):
        load_state_dict(tmp_path / "empty.ckpt")


def test_half_precision_checkpoints_are_differenced_in_float32():
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    tuned = {"w": torch.tensor([1.0078125, 1.0], dtype=torch.bfloat16)}
    tau = TaskVector.from_state_dicts(base, tuned)
    assert tau["w"].dtype == torch.float32 and torch.equal(tau["w"], torch.tensor([0.0078125, -1.0]))
    merged = tau.apply_to(base, 1.0)
    assert merged["w"].dtype == torch.bfloat16 and torch.equal(merged["w"], tuned["w"])
