"""Slimmable layers and the slimmable digits CNN: the widest network is the plain network, narrower ones are
its sub-networks, batch norm keeps statistics per width, and bad widths are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl.architectures import DigitsCNN, ResNet18
from lightning_mtl.controllable import (
    SlimmableConv2d,
    SlimmableDecoder,
    SlimmableDigitsCNN,
    SlimmableLinear,
    SlimmableResNet18,
    SwitchableBatchNorm2d,
    copy_plain_weights,
    scaled_channels,
    set_width,
)
from tests.fixtures.trainers import one_thread  # noqa: F401  # the autouse fixture


@pytest.mark.parametrize("train", [True, False])
def test_widest_slimmable_digits_cnn_equals_plain_outputs_and_gradients(train):
    torch.manual_seed(0)
    plain = DigitsCNN(channels=(8, 16), out_features=24)
    plain.train()
    plain(torch.randn(32, 1, 8, 8))  # running statistics that are not the initial ones
    slim = SlimmableDigitsCNN.from_digits_cnn(plain)
    plain.train(train)
    slim.train(train)
    x = torch.randn(6, 1, 8, 8)
    out_plain, out_slim = plain(x), slim(x)
    assert torch.equal(out_plain, out_slim)
    target = torch.randn_like(out_plain)
    F.mse_loss(out_plain, target).backward()
    F.mse_loss(out_slim, target).backward()
    plain_grads = [p.grad for p in plain.parameters()]
    # the widest switchable norm is the last of each ModuleList: keep only the parameters the plain network has
    slim_grads = [p.grad for n, p in slim.named_parameters() if ".bn." not in n or ".bn.3." in n]
    assert len(plain_grads) == len(slim_grads)
    for a, b in zip(plain_grads, slim_grads):
        assert torch.equal(a, b)


def test_narrow_conv_is_the_sub_network_of_the_first_channels():
    torch.manual_seed(0)
    conv = SlimmableConv2d(6, 8, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)  # only 3 of the 6 input channels: the previous layer was narrow
    conv.width_mult = 0.5
    expected = F.conv2d(x, conv.weight[:4, :3], conv.bias[:4], padding=1)
    assert torch.equal(conv(x), expected)
    linear = SlimmableLinear(10, 6, slim_output=False)
    linear.width_mult = 0.25
    z = torch.randn(2, 4)
    assert torch.equal(linear(z), z @ linear.weight[:, :4].T + linear.bias)


def test_switchable_batch_norm_keeps_statistics_per_width():
    norm = SwitchableBatchNorm2d(8, (0.5, 1.0))
    norm.width_mult = 0.5
    norm(torch.randn(4, 4, 3, 3) + 5.0)
    narrow, wide = norm.bn
    assert narrow.running_mean.mean() > 0.3  # momentum 0.1 of a mean near 5
    assert torch.equal(wide.running_mean, torch.zeros(8))  # the widest statistics saw nothing


def test_scaled_channels_is_monotone_and_exact_at_full_width():
    widths = [0.125, 0.25, 0.3, 0.5, 0.75, 1.0]
    for c in (1, 3, 16, 64, 100):
        counts = [scaled_channels(c, w) for w in widths]
        assert counts == sorted(counts) and counts[-1] == c and counts[0] >= 1
    assert scaled_channels(64, 0.5) == 32


def test_slimmable_decoder_reads_any_encoder_width():
    decoder = SlimmableDecoder(24, 10, hidden=16)
    set_width(decoder, 0.25)
    assert decoder(torch.randn(3, 6)).shape == (3, 10)
    assert decoder.hidden.active_out() == 4


def test_bad_widths_are_refused_with_one_sentence():
    net = SlimmableDigitsCNN(channels=(8, 16), out_features=16, width_mults=(0.5, 1.0))
    with pytest.raises(ValueError, match="not one of the trained widths"):
        set_width(net, 0.75)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        set_width(net, 1.5)
    with pytest.raises(ValueError, match="include 1.0"):
        SlimmableDigitsCNN(width_mults=(0.25, 0.5))
    with pytest.raises(ValueError, match="at most 6 input channels"):
        SlimmableLinear(6, 2)(torch.randn(1, 7))
    norm = SwitchableBatchNorm2d(8, (0.5, 1.0))
    with pytest.raises(ValueError, match="expects 8 channels"):
        norm(torch.randn(2, 4, 2, 2))


def test_narrower_width_has_fewer_features_and_parameters_in_use():
    net = SlimmableDigitsCNN(channels=(8, 16), out_features=32)
    sizes = []
    for w in net.width_mults:
        set_width(net, w)
        sizes.append(net(torch.randn(2, 1, 8, 8)).shape[1])
    assert sizes == [net.features_at(w) for w in net.width_mults] == [8, 16, 24, 32]
    assert isinstance(net.features[0], nn.Conv2d)


def _widest_grads(slim):
    # each switchable norm's widest statistics are the last of its ModuleList: the parameters the plain net has
    return [p.grad for n, p in slim.named_parameters() if ".bn." not in n or ".bn.3." in n]


def test_widest_slimmable_resnet18_equals_plain_outputs_and_gradients():
    torch.manual_seed(0)
    plain = ResNet18(width=4)
    plain(torch.randn(8, 3, 16, 16))  # running statistics that are not the initial ones
    slim = SlimmableResNet18.from_resnet18(plain)
    x = torch.randn(4, 3, 16, 16)
    for train in (False, True):
        plain.train(train)
        slim.train(train)
        assert torch.equal(plain(x), slim(x))
    target = torch.randn(4, 32)
    F.mse_loss(plain(x), target).backward()
    F.mse_loss(slim(x), target).backward()
    plain_grads, slim_grads = [p.grad for p in plain.parameters()], _widest_grads(slim)
    assert len(plain_grads) == len(slim_grads)
    for a, b in zip(plain_grads, slim_grads):
        assert torch.equal(a, b)
    for w, size in zip(slim.width_mults, (8, 16, 24, 32)):
        set_width(slim, w)
        assert slim(x).shape == (4, size) == (4, slim.features_at(w))


def test_copying_weights_into_a_network_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="no slimmable twin of the same shape"):
        copy_plain_weights(DigitsCNN(channels=(8, 16)), SlimmableDigitsCNN(channels=(8, 32)))
