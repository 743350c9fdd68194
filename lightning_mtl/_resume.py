"""Mid-epoch resume of a data module's training batches (shared by the families whose samplers can skip)."""

from __future__ import annotations

from typing import Any

__all__ = ["ResumableBatches"]


class ResumableBatches:
    """Mid-epoch resume for a data module whose training batch sampler can ``skip(epoch, consumed)``: it counts
    the training batches handed to the model in the current epoch, keeps the count in its ``state_dict`` and,
    after a restore, fast-forwards the next training sampler to the same place (:meth:`_resume_sampler`)."""

    trainer: Any
    _epoch: int = 0
    _consumed: int = 0
    _resume: tuple[int, int] | None = None

    def _resume_sampler(self, sampler: Any) -> None:
        if self._resume is not None:  # a restored checkpoint: continue inside its epoch
            sampler.skip(*self._resume)
            self._epoch, self._consumed = self._resume
            self._resume = None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            if trainer.current_epoch != self._epoch:
                self._epoch, self._consumed = trainer.current_epoch, 0
            self._consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "consumed_batches": self._consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "epoch" in state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["consumed_batches"]))
