"""The slimmable dilated ResNet and DeepLab head: the widest configuration is the plain network (outputs and
gradients, with copied weights and with the same seed), narrower widths are sub-networks of the first channels
(the head's projection reads the first channels of each branch's block)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl.architectures import DeepLabHead, ResNetDilated
from lightning_mtl.controllable import SlimmableDeepLabHead, SlimmableResNetDilated, set_width
from tests.fixtures.trainers import one_thread  # noqa: F401  # the autouse fixture

WIDTHS = (0.25, 0.5, 1.0)


def _twin_name(name: str, slim: dict[str, nn.Parameter]) -> str:
    """The slimmable twin's name of a plain parameter: a batch norm's widest entry (``...bn1.bn.2.weight``)."""
    if name in slim:
        return name
    module, leaf = name.rsplit(".", 1)
    return f"{module}.bn.{len(WIDTHS) - 1}.{leaf}"


def _assert_equal_outputs_and_gradients(plain: nn.Module, slim: nn.Module, *inputs: torch.Tensor) -> None:
    out_plain, out_slim = plain(*inputs), slim(*inputs)
    assert out_plain.shape == out_slim.shape
    assert torch.equal(out_plain, out_slim)
    target = torch.randn_like(out_plain)
    F.mse_loss(out_plain, target).backward()
    F.mse_loss(out_slim, target).backward()
    slim_params = dict(slim.named_parameters())
    for name, param in plain.named_parameters():
        twin = slim_params[_twin_name(name, slim_params)]
        assert twin.grad is not None and torch.equal(param.grad, twin.grad), name


@pytest.mark.parametrize("train", [True, False])
def test_widest_slimmable_dilated_resnet_equals_plain_outputs_and_gradients(train):
    torch.manual_seed(0)
    plain = ResNetDilated("resnet18")
    plain.train()
    plain(torch.randn(4, 3, 32, 32))  # running statistics that are not the initial ones
    slim = SlimmableResNetDilated.from_resnet_dilated(plain, WIDTHS)
    plain.train(train)
    slim.train(train)
    _assert_equal_outputs_and_gradients(plain, slim, torch.randn(2, 3, 32, 32))


def test_slimmable_dilated_resnet_built_from_a_seed_is_the_plain_one_built_from_it():
    torch.manual_seed(3)
    plain = ResNetDilated("resnet18", output_stride=8)
    torch.manual_seed(3)
    slim = SlimmableResNetDilated("resnet18", output_stride=8, width_mults=WIDTHS)
    _assert_equal_outputs_and_gradients(plain, slim, torch.randn(2, 3, 24, 24))


def test_narrow_dilated_resnet_gives_the_first_channels_at_output_stride_8():
    torch.manual_seed(0)
    slim = SlimmableResNetDilated("resnet18", width_mults=WIDTHS).eval()
    x = torch.randn(1, 3, 32, 32)
    for width in WIDTHS:
        set_width(slim, width)
        assert slim(x).shape == (1, slim.features_at(width), 4, 4)
    assert slim.features_at(0.25) == 128 and slim.features_at(1.0) == 512
    # the narrow stem is the plain stem's first channels
    set_width(slim, 0.25)
    stem = slim.model.conv1
    assert torch.equal(stem(x), F.conv2d(x, stem.weight[:16], None, stride=2, padding=3))


@pytest.mark.parametrize("train", [True, False])
def test_widest_slimmable_deeplab_head_equals_plain_outputs_and_gradients(train):
    torch.manual_seed(0)
    plain = DeepLabHead(16, 3, rates=(1, 2), width=8)
    plain.train()
    plain(torch.randn(4, 16, 6, 6))
    slim = SlimmableDeepLabHead.from_deeplab_head(plain, WIDTHS)
    plain.train(train)
    slim.train(train)
    _assert_equal_outputs_and_gradients(plain, slim, torch.randn(2, 16, 6, 6))
    torch.manual_seed(5)
    plain = DeepLabHead(16, 3, rates=(1, 2), width=8)
    torch.manual_seed(5)
    built = SlimmableDeepLabHead(16, 3, rates=(1, 2), width=8, width_mults=WIDTHS)
    _assert_equal_outputs_and_gradients(plain, built, torch.randn(2, 16, 6, 6))


def test_narrow_deeplab_head_projects_the_first_channels_of_every_branch():
    torch.manual_seed(0)
    head = SlimmableDeepLabHead(16, 3, rates=(1, 2), width=8, width_mults=WIDTHS).eval()
    set_width(head, 0.5)
    x = torch.randn(2, 8, 5, 5)  # a narrow encoder's 8 of 16 channels
    assert head(x).shape == (2, 3, 5, 5)  # the prediction keeps its size
    project = head.project[0]
    parts = torch.randn(2, 4 * 4, 5, 5)  # 4 parts (1x1, two dilated, pooled) of ceil(8 * 0.5) = 4 channels
    # part g's channels meet the weight columns g*8 .. g*8+3 of the widest projection
    columns = torch.cat([torch.arange(g * 8, g * 8 + 4) for g in range(4)])
    expected = F.conv2d(parts, project.weight[:4, columns])
    assert torch.allclose(project(parts), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="equal parts"):
        project(torch.randn(1, 15, 2, 2))
