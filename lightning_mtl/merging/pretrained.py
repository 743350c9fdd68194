"""An encoder whose weights start from a checkpoint: the pre-trained model that experts are fine-tuned from."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_mtl.merging._state import load_state, select_prefix

__all__ = ["PretrainedEncoder"]


class PretrainedEncoder(nn.Module):
    """Wraps ``module`` and, when ``checkpoint_path`` is given, loads its weights from that file.

    The fine-tuning recipes of model merging start every expert from one pre-trained encoder:
    ``PretrainedEncoder(DigitsCNN(), "pretrain.ckpt")`` in a :class:`~lightning_mtl.MultiTaskModule` loads
    the ``encoder.`` entries of a Lightning checkpoint (``prefix``) into the CNN. Pre-train with the same
    wrapper and no path, so that the pre-trained and fine-tuned checkpoints name their weights alike
    (``encoder.module.*``) and task vectors line up key by key.

    Args:
        module: the encoder architecture.
        checkpoint_path: a Lightning ``.ckpt``, ``.pt`` or ``.safetensors`` file; None keeps ``module``'s weights.
        prefix: where the encoder's entries are in that file (a further ``module.`` level is removed too).
    """

    def __init__(self, module: nn.Module, checkpoint_path: str | None = None, prefix: str = "encoder.") -> None:
        super().__init__()
        self.module = module
        self.out_features = getattr(module, "out_features", None)
        if checkpoint_path is not None:
            weights = select_prefix(load_state(checkpoint_path), prefix, what="encoder weights")
            if all(k.startswith("module.") for k in weights):
                weights = {k[len("module.") :]: v for k, v in weights.items()}
            module.load_state_dict(weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)
