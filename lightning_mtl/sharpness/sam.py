"""SAM / ASAM as a wrapper around any torch optimizer."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_mtl.sharpness._perturb import apply_perturbation, restore_parameters, sam_perturbation
from lightning_mtl.sharpness.schedule import resolve_rho

__all__ = ["SAM"]


class SAM(Optimizer):
    """Sharpness-Aware Minimization around a base optimizer; ``adaptive=True`` gives ASAM.

    SAM: Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021. ASAM: Kwon, Kim, Park, Choi, "ASAM: Adaptive Sharpness-Aware
    Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021.

    One step: gradient ``g`` at ``w``; ``e = rho g / |g|`` (ASAM: ``rho T^2 g / |T g|``, ``T = |w| + eta``
    on every parameter); gradient at ``w + e``; ``w`` restored exactly; the base optimizer steps with that
    gradient. The base optimizer owns the parameter groups and the state (momentum, ...): an LR scheduler
    given this wrapper changes the base optimizer's learning rates, and ``state_dict()`` is the base
    optimizer's (plus the SAM step count that drives a ``rho`` schedule).

    **Plain PyTorch** (or Lightning manual optimization, precision other than 16-mixed): pass a closure
    that zeroes the gradients, computes the loss and calls backward; it is called twice (under manual
    optimization so is ``on_before_optimizer_step``, and DDP synchronizes both passes)::

        optimizer = SAM(model.parameters(), functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), rho=0.05)
        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        optimizer.step(closure)

    or call ``first_step()`` and ``second_step()`` around your own second forward/backward. In plain
    PyTorch the second forward moves BatchNorm statistics again unless you prevent it (momentum 0, or
    restore the buffers); the callback below does that for you.

    **Lightning automatic optimization**: add the
    :class:`~lightning_mtl.sharpness.SharpnessAwareMinimization` callback to the Trainer. It reads
    ``rho``, ``adaptive`` and ``eta`` from this wrapper and runs the second pass the Lightning way (one
    ``training_step`` logged, gradients unscaled under 16-mixed, DDP synchronized on the second pass
    only, clipping once); this wrapper's ``step`` then only runs the closure and the base step. Without
    the callback, stepping from Lightning raises, because Lightning's closure would run the whole
    training step, its hooks and gradient clipping twice (and under 16-mixed it is not passed at all).

    From a config (the module's ``optimizer`` init arg)::

        optimizer:
          class_path: lightning_mtl.sharpness.SAM
          init_args:
            rho: 0.05
            base_optimizer:
              class_path: torch.optim.SGD
              init_args: {lr: 0.1, momentum: 0.9}

    Args:
        params: the parameters (or parameter groups).
        base_optimizer: a factory called with ``params`` (a class such as ``torch.optim.SGD`` with its
            defaults, or a ``functools.partial`` with its arguments).
        rho: radius, or a callable of the SAM step count (e.g. :class:`RhoSchedule`). Usual values: 0.05
            for SAM, 0.5 to 2 for ASAM.
        adaptive: ASAM instead of SAM.
        eta: ASAM's offset in ``T = |w| + eta``.
        eps: added to the gradient norm.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[[Iterable[Any]], Optimizer] = torch.optim.SGD,
        rho: float | Callable[[int], float] = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        eps: float = 1e-12,
    ) -> None:
        if not callable(rho):
            resolve_rho(rho, 0)  # validate now, not at the first step
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        base = base_optimizer(params)
        if not isinstance(base, Optimizer):
            raise TypeError(f"base_optimizer must build a torch Optimizer, got {type(base).__name__}")
        if isinstance(base, SAM):
            raise TypeError("base_optimizer is itself SAM: nest the plain optimizer instead")
        self.base_optimizer = base
        self.rho, self.adaptive, self.eta, self.eps = rho, bool(adaptive), float(eta), float(eps)
        self.sam_steps = 0
        self._backup: list[Tensor | None] | None = None
        self._params: list[Tensor] | None = None
        self.driven_by_callback = False  # set by SharpnessAwareMinimization
        super().__init__([dict(g) for g in base.param_groups], dict(base.defaults))
        # share, not copy: schedulers, zero_grad, add_param_group and checkpoints act on the base optimizer's
        # groups and state
        self.param_groups = base.param_groups
        self.state = base.state

    def current_rho(self) -> float:
        """The radius of the next step (after a schedule)."""
        return resolve_rho(self.rho, self.sam_steps)

    def _with_grads(self) -> tuple[list[Tensor], list[Tensor]]:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Climb to ``w + e`` from the gradients now in ``.grad``; optionally zero them."""
        if self._backup is not None:
            raise RuntimeError("first_step() called twice without second_step()")
        params, grads = self._with_grads()
        if not params:
            raise RuntimeError("SAM.first_step found no gradients: run backward first")
        e = sam_perturbation(grads, params, self.current_rho(), self.adaptive, eta=self.eta, eps=self.eps)
        self._params, self._backup = params, apply_perturbation(params, e)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and take the base step with the gradients at ``w + e`` now in ``.grad``."""
        if self._backup is None or self._params is None:
            raise RuntimeError("second_step() called without first_step()")
        restore_parameters(self._params, self._backup)
        self._params = self._backup = None
        self.base_optimizer.step()
        self.sam_steps += 1
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.driven_by_callback:
            # Lightning: the callback swapped the closure's gradients for those at w + e already
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.base_optimizer.step()
            self.sam_steps += 1
            return loss
        if closure is None or _is_lightning_closure(closure):
            raise RuntimeError(
                "SAM needs two forward/backward passes per step. Under Lightning's automatic optimization add "
                "lightning_mtl.sharpness.SharpnessAwareMinimization() to the Trainer's callbacks (it reads rho "
                "from this optimizer); in plain PyTorch pass optimizer.step(closure) a closure that zeroes the "
                "gradients, computes the loss and calls backward, or call first_step() / second_step()"
            )
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = self.base_optimizer.state_dict()
        state["sam_steps"] = self.sam_steps
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.sam_steps = int(state_dict.pop("sam_steps", 0))
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def __repr__(self) -> str:
        kind = "ASAM" if self.adaptive else "SAM"
        return f"{kind}(rho={self.rho}, base={self.base_optimizer!r})"


def _is_lightning_closure(closure: Callable[[], Any]) -> bool:
    """Whether Lightning's automatic optimization passes this closure: its precision plugins hand over
    ``partial(Precision._wrap_closure, module, optimizer, closure)``. Under manual optimization the
    inner closure is the user's own and may run twice."""
    if not isinstance(closure, functools.partial):
        return False
    owner = getattr(closure.func, "__self__", None)
    if not type(owner).__module__.startswith("lightning."):
        return False
    module = closure.args[0] if closure.args else None
    return bool(getattr(module, "automatic_optimization", True))
