"""SAM / ASAM as a drop-in Callback for any LightningModule with automatic optimization."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor

from lightning_mtl._modes import restored_buffers
from lightning_mtl.sharpness._perturb import apply_perturbation, restore_parameters, sam_perturbation
from lightning_mtl.sharpness.sam import SAM
from lightning_mtl.sharpness.schedule import resolve_rho

__all__ = ["SharpnessAwareMinimization"]

_DEFAULT_RHO = {False: 0.05, True: 0.5}


class SharpnessAwareMinimization(pl.Callback):
    """SAM (or ASAM with ``adaptive=True``) for an unchanged LightningModule with automatic optimization.

    SAM: Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021. ASAM: Kwon, Kim, Park, Choi, "ASAM: Adaptive Sharpness-Aware
    Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021.

    Each optimizer step: the gradient ``g`` at ``w`` (Lightning's own closure: ``training_step``, backward,
    logging as usual); ``e = rho g / |g|`` (ASAM: ``rho T^2 g / |T g|`` with ``T = |w| + eta`` on every
    parameter); the gradient at ``w + e`` from a second ``training_step`` and backward run by this
    callback; ``w`` restored bit-exactly; then gradient clipping and the base optimizer's step with the
    gradient at ``w + e``. LR schedulers, checkpoints and the optimizer are the module's own.

    **How it hooks in, and why.** The second pass runs in ``on_before_optimizer_step``: every precision
    plugin calls that hook once, after the closure's backward (and, under 16-mixed, after GradScaler's
    ``unscale_``) and before gradient clipping and the step. Wrapping ``optimizer.step(closure)`` instead
    would miss 16-mixed, whose plugin runs the closure itself and steps through the scaler without one,
    and re-running Lightning's closure would repeat the hooks, logging and clipping. Consequences:

    - Logs and metrics come from the first pass only (the loss at ``w``): during the second
      ``training_step`` ``self.log`` / ``self.log_dict`` do nothing and every torchmetrics ``Metric`` in
      the module gets its state back afterwards. ``training_step`` itself does run twice (SAM needs the
      loss at ``w + e``); code with other side effects can ask :meth:`in_perturbed_pass`.
    - Every buffer of the module (BatchNorm running statistics, ``num_batches_tracked``) is restored
      after the second pass, so statistics move once per step, from the forward at ``w``.
    - ``on_before_backward`` / ``on_after_backward`` run for the first pass only; module-level
      ``on_before_optimizer_step``, ``configure_gradient_clipping`` and callbacks after this one in
      ``trainer.callbacks`` see the gradient at ``w + e``.

    Trainer flags: precision ``32-true``, ``64-true``, ``bf16-mixed``, ``16-true`` / ``bf16-true`` and
    ``16-mixed`` (the second pass is scaled with the scaler's current scale and unscaled here; a
    non-finite value in either pass makes GradScaler skip the step and lower its scale).
    ``strategy="ddp"``: the first pass runs without gradient synchronization (each rank perturbs with
    its own gradient: SAM's m-sharpness with m = the per-rank batch), the second pass synchronizes, so
    the step, and the parameters, are the same on every rank. ``accumulate_grad_batches=k``: the
    perturbation comes from the gradient accumulated over the k micro-batches (the whole effective
    batch), and the second pass replays the k micro-batches at ``w + e`` (under DDP synchronizing on
    the last one), so the step equals SAM on the concatenated batch (exactly so without BatchNorm; with
    it, batch statistics are per micro-batch, as without SAM). Refused at setup: other multi-device
    strategies (FSDP, DeepSpeed), manual optimization, several optimizers, and under DDP a
    MultiTaskModule gradient aggregator (its engine synchronizes the first pass itself; use F-MTL).

    With the :class:`~lightning_mtl.sharpness.SAM` optimizer wrapper as the module's optimizer, ``rho``,
    ``adaptive`` and ``eta`` default to the wrapper's and the wrapper only takes the base step.

    Args:
        rho: radius, or a callable of the SAM step count (e.g. :class:`RhoSchedule`); default 0.05 (SAM),
            0.5 (ASAM), or the wrapper's.
        adaptive: ASAM instead of SAM (default ``False``, or the wrapper's).
        eta: ASAM's offset in ``T = |w| + eta`` (default 0.01, or the wrapper's).
        eps: added to the gradient norm.

    Examples:
        >>> sam = SharpnessAwareMinimization(rho=0.05)
        >>> trainer = pl.Trainer(callbacks=[sam], logger=False, enable_checkpointing=False)
        >>> sam in trainer.callbacks
        True
    """

    def __init__(
        self,
        rho: float | Callable[[int], float] | None = None,
        adaptive: bool | None = None,
        eta: float | None = None,
        eps: float = 1e-12,
    ) -> None:
        if rho is not None and not callable(rho):
            resolve_rho(rho, 0)
        if eta is not None and eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self._rho_arg, self._adaptive_arg, self._eta_arg = rho, adaptive, eta
        self.rho: float | Callable[[int], float] = rho if rho is not None else _DEFAULT_RHO[bool(adaptive)]
        self.adaptive = bool(adaptive)
        self.eta = 0.01 if eta is None else float(eta)
        self.eps = float(eps)
        self.steps = 0  # SAM steps taken: drives a rho schedule, saved in checkpoints
        self.last_rho: float | None = None
        self._batches: list[tuple[Any, int]] = []
        self._ddp_sync: bool | None = None
        self._wrapper: SAM | None = None
        self._module_parts: _ModuleParts | None = None

    # -- checks ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{name} needs automatic optimization; with automatic_optimization=False use the "
                "lightning_mtl.sharpness.SAM optimizer and call optimizer.step(closure) in your training_step"
            )
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or "DeepSpeed" in type(strategy).__name__:
            raise ValueError(
                f"strategy {type(strategy).__name__} is not supported with {name}: it needs the full parameters "
                "on every device; use strategy='ddp' (or one device)"
            )
        if trainer.world_size > 1 and getattr(pl_module, "uses_gradients", False):
            # MultiTaskModule's gradient engine all-reduces the task Jacobian itself, outside DDP's hooks
            raise ValueError(
                f"{name} under DDP does not support the gradient aggregator "
                f"{type(getattr(pl_module, 'aggregator', None)).__name__}: its engine synchronizes the task "
                "gradients itself, so the perturbing pass cannot stay local. Use F-MTL "
                "(lightning_mtl.sharpness.FMTL) for sharpness-aware multi-task training, a loss weighting "
                "such as 'ls', or one device"
            )
        plugin = strategy.precision_plugin
        if type(plugin) not in (Precision, MixedPrecision, HalfPrecision, DoublePrecision):
            raise ValueError(
                f"precision plugin {type(plugin).__name__} is not supported with {name}; use precision "
                "'32-true', 'bf16-mixed' or '16-mixed'"
            )
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None and not all(
            hasattr(scaler, a) for a in ("_per_optimizer_states", "_unscale_grads_", "_scale", "scale")
        ):
            raise ValueError(
                f"precision='16-mixed' with {name} needs torch's GradScaler (its scaler "
                f"{type(scaler).__name__} lacks the unscaling internals used for the second pass); "
                "use precision='bf16-mixed'"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"{type(self).__name__} supports one optimizer, the module configures {len(trainer.optimizers)}"
            )
        optimizer = trainer.optimizers[0]
        if isinstance(optimizer, SAM):
            self._wrapper = optimizer
            optimizer.driven_by_callback = True
            if self._adaptive_arg is None:
                self.adaptive = optimizer.adaptive
            if self._rho_arg is None:
                self.rho = optimizer.rho
            if self._eta_arg is None:
                self.eta = optimizer.eta
        elif self._rho_arg is None:
            self.rho = _DEFAULT_RHO[self.adaptive]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module_parts = None
        if self._wrapper is not None:
            self._wrapper.driven_by_callback = False

    # -- the step -------------------------------------------------------------------------------
    def current_rho(self) -> float:
        """The radius of the next step (after a schedule)."""
        return resolve_rho(self.rho, self.steps)

    @staticmethod
    def in_perturbed_pass(pl_module: pl.LightningModule) -> bool:
        """True while the callback runs ``training_step`` at the perturbed weights ``w + e``."""
        return bool(getattr(pl_module, "_sam_perturbed_pass", False))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = []  # Lightning's accumulation windows end with the epoch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batches.append((batch, batch_idx))  # the micro-batches of this optimizer step
        ddp = _ddp_module(trainer)
        if ddp is not None:
            # m-sharpness: the perturbing pass (Lightning's closure, forward included) must not all-reduce
            self._ddp_sync = ddp.require_backward_grad_sync
            ddp.require_backward_grad_sync = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._restore_ddp_sync(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_ddp_sync(trainer)
        self._batches = []

    def _restore_ddp_sync(self, trainer: pl.Trainer) -> None:
        ddp = _ddp_module(trainer)
        if ddp is not None and self._ddp_sync is not None:
            ddp.require_backward_grad_sync = self._ddp_sync
        self._ddp_sync = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        batches, self._batches = self._batches, []
        if not batches:
            raise RuntimeError(f"{type(self).__name__}: optimizer step without a training batch")
        all_params = [p for group in optimizer.param_groups for p in group["params"]]
        params = [p for p in all_params if p.grad is not None]
        if not params:  # training_step returned None: Lightning skips backward, nothing to perturb
            return
        rho = self.current_rho()
        self.last_rho = rho
        e = sam_perturbation([p.grad for p in params], params, rho, self.adaptive, eta=self.eta, eps=self.eps)
        backup = apply_perturbation(params, e)
        for p in all_params:
            p.grad = None
        ddp = _ddp_module(trainer)
        sync = bool(self._ddp_sync) if self._ddp_sync is not None else True
        scaler = getattr(trainer.strategy.precision_plugin, "scaler", None)
        skipped = False
        try:
            if self._module_parts is None:  # after the first forward, so lazy modules have their buffers
                self._module_parts = _ModuleParts(pl_module)
            # buffers go back after backward: BatchNorm's backward checks its saved running statistics
            with _one_pass_side_effects(pl_module, self._module_parts):
                for i, (batch, batch_idx) in enumerate(batches):
                    if ddp is not None:  # the second pass synchronizes, once, on the last micro-batch
                        ddp.require_backward_grad_sync = sync and i == len(batches) - 1
                    loss = self._perturbed_loss(trainer, pl_module, batch, batch_idx)
                    if loss is None:
                        skipped = True
                        break
                    loss = loss / trainer.accumulate_grad_batches  # as Lightning's closure normalizes
                    pl_module.backward(scaler.scale(loss) if scaler is not None else loss)
            if skipped:
                for p in all_params:  # the module skipped the perturbed step: skip the update
                    p.grad = None
            elif scaler is not None:
                _unscale_second_pass(scaler, optimizer)
        finally:
            restore_parameters(params, backup)
            if ddp is not None:
                ddp.require_backward_grad_sync = False  # on_train_batch_end puts the saved value back
        self.steps += 1

    def _perturbed_loss(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> Tensor | None:
        """The loss of ``training_step`` at ``w + e`` (through the strategy: autocast, DDP forward)."""
        assert self._module_parts is not None
        args: list[Any] = [batch, batch_idx] if self._module_parts.takes_batch_idx else [batch]
        with torch.enable_grad():
            output = trainer.strategy.training_step(*args)
        if output is None:
            return None
        if isinstance(output, Mapping):
            output = output.get("loss")
        if not isinstance(output, Tensor):
            raise TypeError(
                f"{type(self).__name__}: training_step must return the loss as a Tensor (or a dict with 'loss'), "
                f"got {type(output).__name__}"
            )
        return output

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "last_rho": self.last_rho}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict["steps"])
        self.last_rho = state_dict.get("last_rho")


def _ddp_module(trainer: pl.Trainer) -> Any:
    model = trainer.strategy.model
    return model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None


class _ModuleParts:
    """What the perturbed pass touches, looked up once per fit: buffers, torchmetrics, the step's signature."""

    def __init__(self, pl_module: pl.LightningModule) -> None:
        try:
            from torchmetrics import Metric
        except ImportError:  # pragma: no cover - torchmetrics ships with Lightning
            Metric = ()  # type: ignore[assignment,misc]
        self.buffers = list(pl_module.buffers())
        self.metrics = [m for m in pl_module.modules() if isinstance(m, Metric)]
        self.takes_batch_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)


@contextmanager
def _one_pass_side_effects(pl_module: pl.LightningModule, parts: _ModuleParts) -> Iterator[None]:
    """Mute logging; give buffers and torchmetrics states back afterwards."""
    metrics = [(m, m._copy_state_dict(), m._update_count, m._computed, m._forward_cache) for m in parts.metrics]
    pl_module.__dict__["log"] = _no_log
    pl_module.__dict__["log_dict"] = _no_log
    pl_module.__dict__["_sam_perturbed_pass"] = True
    try:
        with restored_buffers(parts.buffers):
            yield
    finally:
        for key in ("log", "log_dict", "_sam_perturbed_pass"):
            pl_module.__dict__.pop(key, None)
        for metric, states, count, computed, cache in metrics:
            for attr, value in states.items():
                setattr(metric, attr, value)
            metric._update_count, metric._computed, metric._forward_cache = count, computed, cache


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


def _unscale_second_pass(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Unscale the second pass's gradients and add its inf/NaN findings to those of the first pass.

    Lightning's plugin already called ``scaler.unscale_(optimizer)`` for the first pass, and GradScaler
    refuses a second ``unscale_``; its ``step`` then skips the update if any recorded flag is set.
    """
    state = scaler._per_optimizer_states[id(optimizer)]
    inv_scale = scaler._scale.double().reciprocal().float()
    found_inf = torch.zeros((), dtype=torch.float32, device=scaler._scale.device)
    found = scaler._unscale_grads_(optimizer, inv_scale, found_inf, False)
    recorded = state["found_inf_per_device"]
    for device, flag in found.items():
        if device in recorded:
            recorded[device] = recorded[device] + flag
        else:
            recorded[device] = flag
