"""Slimmable layers: convolution, linear and switchable batch norm whose active width is set before forward.

Yu, Yang, Xu, Yang and Huang, "Slimmable Neural Networks", ICLR 2019. A slimmable layer keeps the weights of
its widest configuration and, at a width multiplier ``w``, uses the first ``channels(c, w)`` output
channels (and as many input channels as the incoming tensor has), so every narrower network is a
sub-network of the widest one. Batch norm keeps separate statistics and affine parameters per width
(*switchable* batch norm): the statistics of a sub-network differ from those of the widest network.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Slimmable",
    "SlimmableConv2d",
    "SlimmableLinear",
    "SwitchableBatchNorm2d",
    "check_width_mults",
    "copy_plain_weights",
    "scaled_channels",
    "set_width",
    "slimmable_modules",
    "slimmable_twin",
]


def scaled_channels(channels: int, width_mult: float) -> int:
    """Active channels of a layer with ``channels`` at width ``width_mult``: ``ceil(channels * w)``, at least 1.

    Monotone in ``width_mult``, and equal to ``channels`` at 1.0.
    """
    return max(1, math.ceil(channels * width_mult - 1e-9))  # the epsilon keeps 0.5 * 64 at 32, not 33


def check_width_mults(width_mults: Iterable[float], what: str = "width_mults") -> tuple[float, ...]:
    """The width multipliers sorted ascending, each in ``(0, 1]``, the last one 1.0 (the full network)."""
    values = tuple(sorted({float(w) for w in width_mults}))
    if not values or values[0] <= 0 or values[-1] != 1.0:
        raise ValueError(f"{what} must be multipliers in (0, 1] that include 1.0 (the widest network), got {values}")
    return values


class Slimmable:
    """Mixin of the layers whose active width :func:`set_width` sets (``width_mult``, 1.0 by default)."""

    width_mult: float = 1.0


class SlimmableConv2d(nn.Conv2d, Slimmable):
    """A ``Conv2d`` that uses its first output channels at the active width and the input's channels.

    Args:
        in_channels: input channels of the widest network.
        out_channels: output channels of the widest network.
        kernel_size: as in ``nn.Conv2d``; stride, padding, dilation and bias too (``groups`` must be 1).
        slim_output: whether the output channels follow the width (``False`` for a layer whose output size is
            fixed, such as a task's prediction layer).
        in_groups: the input is the concatenation of this many equal slimmable parts (e.g. the branches of an
            ASPP head): at a narrower width the layer reads the first channels of each part's block of weights.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, slim_output: bool = True,
                 in_groups: int = 1, **kwargs: object) -> None:  # fmt: skip
        if kwargs.get("groups", 1) != 1:
            raise ValueError("SlimmableConv2d supports groups=1 only")
        if in_groups < 1 or in_channels % in_groups:
            raise ValueError(f"in_groups={in_groups} must be >= 1 and divide in_channels={in_channels}")
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)  # type: ignore[arg-type]  # the Conv2d keywords
        self.slim_output = slim_output
        self.in_groups = in_groups

    def active_out(self) -> int:
        return scaled_channels(self.out_channels, self.width_mult) if self.slim_output else self.out_channels

    def forward(self, x: Tensor) -> Tensor:
        cin = _check_input(self, x.shape[1], self.in_channels)
        cout = self.active_out()
        bias = None if self.bias is None else self.bias[:cout]
        if self.in_groups > 1 and cin < self.in_channels:
            weight = self.weight[:cout].unflatten(1, (self.in_groups, -1))
            if cin % self.in_groups:
                raise ValueError(f"{cin} input channels do not split into {self.in_groups} equal parts")
            return self._conv_forward(x, weight[:, :, : cin // self.in_groups].flatten(1, 2), bias)
        # a strided slice of the weight sends oneDNN to slow layouts (the pooling after it too); a contiguous
        # copy of a narrow slice is cheap, and the full weight is contiguous already (no copy at width 1.0)
        return self._conv_forward(x, self.weight[:cout, :cin].contiguous(), bias)


class SlimmableLinear(nn.Linear, Slimmable):
    """A ``Linear`` that uses its first output features at the active width and the input's features.

    Args:
        in_features: input features of the widest network.
        out_features: output features of the widest network.
        bias: as in ``nn.Linear``.
        slim_output: whether the output features follow the width (``False`` for a prediction layer).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, slim_output: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.slim_output = slim_output

    def active_out(self) -> int:
        return scaled_channels(self.out_features, self.width_mult) if self.slim_output else self.out_features

    def forward(self, x: Tensor) -> Tensor:
        cin = _check_input(self, x.shape[-1], self.in_features)
        cout = self.active_out()
        bias = None if self.bias is None else self.bias[:cout]
        return F.linear(x, self.weight[:cout, :cin], bias)


class SwitchableBatchNorm2d(nn.Module, Slimmable):
    """Batch norm with its own statistics and affine parameters for each width (switchable batch norm).

    Args:
        num_features: channels of the widest network.
        width_mults: the widths the network is trained at; :func:`set_width` accepts only these.
        kwargs: further ``nn.BatchNorm2d`` arguments (eps, momentum, ...).
    """

    def __init__(self, num_features: int, width_mults: Sequence[float], **kwargs: object) -> None:
        super().__init__()
        self.width_mults = check_width_mults(width_mults)
        self.num_features = num_features
        self.bn = nn.ModuleList(
            nn.BatchNorm2d(scaled_channels(num_features, w), **kwargs)  # type: ignore[arg-type]  # the BatchNorm2d keywords
            for w in self.width_mults
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.width_mult not in self.width_mults:
            raise ValueError(
                f"width {self.width_mult} is not one of the widths this batch norm was built for {self.width_mults}"
            )
        norm = self.bn[self.width_mults.index(self.width_mult)]
        if x.shape[1] != norm.num_features:
            raise ValueError(
                f"SwitchableBatchNorm2d at width {self.width_mult} expects {norm.num_features} channels, got "
                f"{x.shape[1]}: set the same width on the layer before it"
            )
        return norm(x)


def _check_input(layer: nn.Module, given: int, widest: int) -> int:
    if given > widest:
        raise ValueError(f"{type(layer).__name__} was built for at most {widest} input channels, got {given}")
    return given


def slimmable_modules(module: nn.Module) -> list[nn.Module]:
    """The slimmable layers inside ``module`` (``module`` itself included)."""
    return [m for m in module.modules() if isinstance(m, Slimmable)]


def set_width(module: nn.Module, width_mult: float) -> None:
    """Set the active width of every slimmable layer inside ``module``.

    Raises:
        ValueError: ``width_mult`` is not in ``(0, 1]``, or a switchable batch norm inside has no statistics
            for it.
    """
    width_mult = float(width_mult)
    if not 0 < width_mult <= 1:
        raise ValueError(f"a width multiplier must be in (0, 1], got {width_mult}")
    for layer in module.modules():
        if isinstance(layer, SwitchableBatchNorm2d) and width_mult not in layer.width_mults:
            raise ValueError(
                f"width {width_mult} is not one of the trained widths {layer.width_mults} (switchable batch norm "
                "keeps statistics per width)"
            )
        if isinstance(layer, Slimmable):
            layer.width_mult = width_mult


def copy_plain_weights(plain: nn.Module, slim: nn.Module) -> None:
    """Copy a plain network's weights into its slimmable twin (the same module names): convolutions and linear
    layers whole, each batch norm into every width of the switchable one, as its first channels.

    Raises:
        ValueError: a layer of ``plain`` has no counterpart of the right kind in ``slim``.
    """
    twins = dict(slim.named_modules())
    with torch.no_grad():
        for name, layer in plain.named_modules():
            twin = twins.get(name)
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                if not isinstance(twin, (SlimmableConv2d, SlimmableLinear)) or twin.weight.shape != layer.weight.shape:
                    raise ValueError(f"layer {name!r} has no slimmable twin of the same shape")
                twin.load_state_dict(layer.state_dict())
            elif isinstance(layer, nn.BatchNorm2d):
                if not isinstance(twin, SwitchableBatchNorm2d) or twin.num_features != layer.num_features:
                    raise ValueError(f"batch norm {name!r} has no switchable twin of the same size")
                _copy_norm(layer, twin)


def slimmable_twin(module: nn.Module, width_mults: Sequence[float]) -> None:
    """Replace, in place, every ``Conv2d``, ``Linear`` and ``BatchNorm2d`` inside ``module`` by its slimmable twin
    holding the same weights (the batch norm's in every width, as first channels), so that at width 1.0 the
    module computes what it computed before. The replaced layers keep their names; the caller marks the layers
    whose output must not slim (``slim_output = False``).

    Raises:
        ValueError: a convolution has ``groups != 1``, or a layer is a subclass this function cannot copy.
    """
    widths = check_width_mults(width_mults)
    for name, child in list(module.named_children()):
        twin: nn.Module | None = None
        if isinstance(child, Slimmable):
            continue
        if type(child) is nn.Conv2d:
            twin = SlimmableConv2d(
                child.in_channels, child.out_channels, child.kernel_size,  # type: ignore[arg-type]  # Conv2d takes the tuple
                stride=child.stride, padding=child.padding, dilation=child.dilation, groups=child.groups,
                bias=child.bias is not None, padding_mode=child.padding_mode,
            )  # fmt: skip
            twin.load_state_dict(child.state_dict())
        elif type(child) is nn.Linear:
            twin = SlimmableLinear(child.in_features, child.out_features, bias=child.bias is not None)
            twin.load_state_dict(child.state_dict())
        elif type(child) is nn.BatchNorm2d:
            twin = SwitchableBatchNorm2d(child.num_features, widths, eps=child.eps, momentum=child.momentum,
                                         affine=child.affine, track_running_stats=child.track_running_stats)  # fmt: skip
            _copy_norm(child, twin)
        elif isinstance(child, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            raise ValueError(f"layer {name!r} is a {type(child).__name__}, which slimmable_twin cannot copy")
        if twin is None:
            slimmable_twin(child, widths)
            continue
        twin.train(child.training)
        setattr(module, name, twin)


def _copy_norm(plain: nn.BatchNorm2d, twin: SwitchableBatchNorm2d) -> None:
    """Each width's batch norm of ``twin`` starts from the first channels of ``plain``'s state."""
    with torch.no_grad():
        for norm in twin.bn:
            assert isinstance(norm, nn.BatchNorm2d)
            for key, value in plain.state_dict().items():
                norm.state_dict()[key].copy_(value if value.ndim == 0 else value[: norm.num_features])
