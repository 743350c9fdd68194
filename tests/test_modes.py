"""lightning_mtl._modes.restored_buffers: an extra forward leaves BatchNorm statistics as it found them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mtl._modes import restored_buffers


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2), nn.BatchNorm1d(2)).train()


def test_buffers_of_a_module_come_back_after_forward_and_backward():
    net = _net()
    before = {name: b.clone() for name, b in net.named_buffers()}
    with restored_buffers(net) as buffers:
        net(torch.randn(8, 4)).sum().backward()  # BatchNorm's backward runs before the copy-back
        assert len(buffers) == len(before)
        assert not torch.equal(net[1].running_mean, before["1.running_mean"])  # the forward did move them
    for name, b in net.named_buffers():
        assert torch.equal(b, before[name]), name
    assert net[0].weight.grad is not None  # gradients are not the helper's business


def test_given_tensors_only_are_restored_also_when_the_block_raises():
    net = _net()
    first, second = net[1], net[3]
    kept = second.running_mean.clone()
    with pytest.raises(RuntimeError, match="boom"):
        with restored_buffers(first.buffers()):
            net(torch.randn(8, 4))
            raise RuntimeError("boom")
    assert torch.equal(first.running_mean, torch.zeros(3)) and int(first.num_batches_tracked) == 0
    assert not torch.equal(second.running_mean, kept)  # not in the list: left as the forward made it


def test_a_module_without_buffers_is_fine():
    with restored_buffers(nn.Linear(2, 2)) as buffers:
        assert buffers == []
