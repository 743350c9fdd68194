"""Task vectors: the weight change ``tau = theta_ft - theta_0`` of a fine-tuned model, keyed by name."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, overload

import torch
from torch import Tensor, nn

__all__ = ["TaskVector", "load_state_dict"]

StateDict = Mapping[str, Tensor]


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict stored in a checkpoint file, on the CPU.

    Lightning ``.ckpt`` files give their ``"state_dict"`` entry; ``.pt`` / ``.pth`` / ``.bin`` files hold
    a state dict or a dict with a ``"state_dict"`` entry; ``.safetensors`` files are read with
    ``safetensors``. Files are memory-mapped where torch allows, so reading a large checkpoint does
    not copy it into memory before it is used.

    Args:
        path: the checkpoint file.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file holds no state dict (a mapping of names to tensors).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist (expected a .ckpt, .pt, .pth or .safetensors file)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # an old (non-zip) serialization cannot be memory-mapped
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(
            f"{str(path)!r} holds no state dict (a mapping of names to tensors, or one under 'state_dict')"
        )
    return dict(loaded)


def _as_state_dict(source: StateDict | str | os.PathLike[str] | nn.Module) -> StateDict:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, (str, os.PathLike)):
        return load_state_dict(source)
    return source


def _selected(key: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return (not include or key.startswith(include)) and not (exclude and key.startswith(exclude))


class TaskVector(Mapping[str, Tensor]):
    """A task vector ``tau = theta_ft - theta_0`` (Ilharco et al., "Editing Models with Task Arithmetic",
    ICLR 2023): a read-only mapping from parameter name to the change of that tensor.

    Every floating-point entry of the state dicts is part of the vector: parameters and floating
    buffers such as BatchNorm's ``running_mean`` / ``running_var`` (merging them like weights is what
    merging the state dicts means; the merged model keeps statistics that match its weights only
    approximately, so re-estimate them on data where that matters). Integer and boolean buffers
    (``num_batches_tracked``) are never part of a vector: :meth:`apply_to` leaves them as the target
    holds them.

    Entries are stored in ``dtype`` (float32 by default, whatever the checkpoints' precision):
    half-precision storage halves the memory but rounds each change to 11 significant bits (see the
    family's docs page for the measured cost).

    Args:
        deltas: parameter name -> change; copied into ``dtype``.
        dtype: storage precision of the entries.

    Example:
        >>> base = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
        >>> tuned = {"w": torch.tensor([1.5, 1.0]), "n": torch.tensor(7)}
        >>> tau = TaskVector.from_state_dicts(base, tuned)
        >>> list(tau), tau["w"]
        (['w'], tensor([ 0.5000, -1.0000]))
        >>> tau.apply_to(base, coef=2.0)["w"]
        tensor([2., 0.])
    """

    def __init__(self, deltas: Mapping[str, Tensor], dtype: torch.dtype = torch.float32) -> None:
        self._deltas: dict[str, Tensor] = {}
        for key, value in deltas.items():
            if not value.is_floating_point():
                raise ValueError(
                    f"task vector entry {key!r} has dtype {value.dtype}; only floating-point entries are merged"
                )
            self._deltas[key] = value.detach().to(dtype=dtype, copy=True)
        self.dtype = dtype

    @classmethod
    def from_state_dicts(
        cls,
        base: StateDict | str | os.PathLike[str] | nn.Module,
        finetuned: StateDict | str | os.PathLike[str] | nn.Module,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> TaskVector:
        """``finetuned - base`` over the floating-point entries whose names pass the prefix filters.

        Args:
            base: the pre-trained weights ``theta_0``: a state dict, a module or a checkpoint path
                (see :func:`load_state_dict`).
            finetuned: the fine-tuned weights ``theta_ft``, in the same forms.
            include: keep only names starting with one of these prefixes (e.g. ``"model.encoder."``);
                all names when ``None``.
            exclude: then drop names starting with one of these prefixes.
            dtype: storage precision (the difference is taken in the wider of it and float32).

        Raises:
            KeyError: a selected name is in one state dict and not the other (the first one is named).
            ValueError: a selected name has different shapes in the two, or the filters select nothing.
        """
        base_sd, tuned_sd = _as_state_dict(base), _as_state_dict(finetuned)
        inc = (include,) if isinstance(include, str) else tuple(include or ())
        exc = (exclude,) if isinstance(exclude, str) else tuple(exclude or ())
        keys = [k for k, v in base_sd.items() if v.is_floating_point() and _selected(k, inc, exc)]
        for key in tuned_sd:
            if key not in base_sd and tuned_sd[key].is_floating_point() and _selected(key, inc, exc):
                raise KeyError(f"{key!r} is in the fine-tuned state dict but not in the base one")
        if not keys:
            raise ValueError(f"no floating-point entry passes include={list(inc)} exclude={list(exc)}")
        wide = torch.promote_types(dtype, torch.float32)
        deltas = {}
        for key in keys:
            if key not in tuned_sd:
                raise KeyError(f"{key!r} is in the base state dict but not in the fine-tuned one")
            a, b = base_sd[key], tuned_sd[key]
            if a.shape != b.shape:
                raise ValueError(
                    f"{key!r} has shape {tuple(a.shape)} in the base and {tuple(b.shape)} in the fine-tuned state dict"
                )
            deltas[key] = (b.to(wide) - a.to(wide)).to(dtype)
        return cls._wrap(deltas, dtype)

    @classmethod
    def from_checkpoints(
        cls,
        base_path: str | os.PathLike[str],
        finetuned_path: str | os.PathLike[str],
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> TaskVector:
        """:meth:`from_state_dicts` on two checkpoint files (``.ckpt``, ``.pt``, ``.pth``, ``.safetensors``)."""
        return cls.from_state_dicts(
            load_state_dict(base_path), load_state_dict(finetuned_path), include, exclude, dtype
        )

    @classmethod
    def _wrap(cls, deltas: dict[str, Tensor], dtype: torch.dtype) -> TaskVector:
        """A vector over ``deltas`` without copying them (they are fresh tensors of ``dtype``)."""
        vector = cls.__new__(cls)
        vector._deltas, vector.dtype = deltas, dtype
        return vector

    # the Mapping interface
    def __getitem__(self, key: str) -> Tensor:
        return self._deltas[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._deltas)

    def __len__(self) -> int:
        return len(self._deltas)

    def __repr__(self) -> str:
        numel = sum(v.numel() for v in self._deltas.values())
        return f"TaskVector({len(self)} tensors, {numel} entries, {self.dtype}, norm={self.norm():.4g})"

    # arithmetic
    def _check_compatible(self, other: Mapping[str, Tensor]) -> None:
        for key in self._deltas:
            if key not in other:
                raise KeyError(f"{key!r} is in the left task vector but not in the right one")
            if other[key].shape != self._deltas[key].shape:
                raise ValueError(
                    f"{key!r} has shape {tuple(self._deltas[key].shape)} on the left and {tuple(other[key].shape)} on the right"
                )
        for key in other:
            if key not in self._deltas:
                raise KeyError(f"{key!r} is in the right task vector but not in the left one")

    def __add__(self, other: Mapping[str, Tensor]) -> TaskVector:
        if not isinstance(other, Mapping):
            return NotImplemented
        self._check_compatible(other)
        return self._wrap({k: v + other[k].to(self.dtype) for k, v in self._deltas.items()}, self.dtype)

    def __radd__(self, other: Any) -> TaskVector:
        if isinstance(other, (int, float)) and other == 0:  # sum([tau_1, tau_2, ...]) starts from 0
            return self._wrap({k: v.clone() for k, v in self._deltas.items()}, self.dtype)
        return self.__add__(other)

    def __sub__(self, other: Mapping[str, Tensor]) -> TaskVector:
        if not isinstance(other, Mapping):
            return NotImplemented
        self._check_compatible(other)
        return self._wrap({k: v - other[k].to(self.dtype) for k, v in self._deltas.items()}, self.dtype)

    def __mul__(self, scalar: float) -> TaskVector:
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        return self._wrap({k: v * scalar for k, v in self._deltas.items()}, self.dtype)

    __rmul__ = __mul__

    def __neg__(self) -> TaskVector:
        return self._wrap({k: -v for k, v in self._deltas.items()}, self.dtype)

    def norm(self) -> float:
        """The Euclidean norm of the whole vector (all entries of all tensors), computed in float64."""
        return math.sqrt(sum(float(v.double().square().sum()) for v in self._deltas.values()))

    def to(self, dtype: torch.dtype) -> TaskVector:
        """A copy stored in ``dtype`` (e.g. ``torch.float16`` to halve its memory)."""
        return TaskVector(self._deltas, dtype=dtype)

    @overload
    def apply_to(self, target: nn.Module, coef: float = 1.0) -> nn.Module: ...

    @overload
    def apply_to(self, target: StateDict, coef: float = 1.0) -> dict[str, Tensor]: ...

    def apply_to(self, target: nn.Module | StateDict, coef: float = 1.0) -> nn.Module | dict[str, Tensor]:
        """``theta_0 + coef * tau`` on the vector's entries; every other entry is left as it is.

        The sum is computed in float32 (or the vector's wider dtype) and cast to each target tensor's
        dtype; ``coef = 0`` gives ``theta_0`` bit for bit.

        Args:
            target: a state dict holding ``theta_0`` (a new dict is returned; its other entries are the
                same tensor objects) or a module holding ``theta_0`` (its tensors are overwritten in place
                and the module is returned).
            coef: the scaling ``lambda`` (negative for task negation).

        Raises:
            KeyError: a vector entry is not in the target (the first one is named).
            ValueError: an entry's shape differs from the target's.
        """
        state = target.state_dict() if isinstance(target, nn.Module) else target
        wide = torch.promote_types(self.dtype, torch.float32)
        new: dict[str, Tensor] = {}
        for key, delta in self._deltas.items():
            if key not in state:
                raise KeyError(f"task vector entry {key!r} is not in the target state dict")
            base = state[key]
            if base.shape != delta.shape:
                raise ValueError(
                    f"task vector entry {key!r} has shape {tuple(delta.shape)}, the target's {tuple(base.shape)}"
                )
            if coef == 0:
                new[key] = base.clone()  # exact, even where delta holds inf or nan
            else:
                new[key] = (base.to(wide) + coef * delta.to(device=base.device, dtype=wide)).to(base.dtype)
        if isinstance(target, nn.Module):
            with torch.no_grad():
                for key, value in new.items():
                    state[key].copy_(value)  # state_dict() tensors share storage with the module's
            return target
        return {key: new.get(key, value) for key, value in state.items()}
