"""Any Hugging Face ``transformers`` encoder (local files or a config) with a pooled output."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

__all__ = ["TransformersEncoder", "pool"]

_INSTALL = "TransformersEncoder needs the optional `transformers` package: pip install 'lightning-mtl[transformers]'"


def pool(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """``[B, L, D]`` token states -> ``[B, D]``: the first token (``"cls"``) or the mean over the tokens that
    ``mask`` marks (``"mean"``)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    raise ValueError(f"pooling must be 'cls' or 'mean', got {mode!r}")


class TransformersEncoder(nn.Module):
    """A ``transformers`` encoder (BERT, RoBERTa, ...) as the shared encoder of text tasks.

    Vaswani et al., "Attention Is All You Need", NeurIPS 2017; Wolf et al., "Transformers: State-of-the-Art
    Natural Language Processing", EMNLP 2020 (the library). Built from a local folder
    (``AutoModel.from_pretrained(path, local_files_only=True)``; nothing is downloaded) or, with random
    weights, from a config dict (``AutoConfig.for_model(**config)``). Inputs are token ids ``[B, L]``
    (padding = ``pad_token_id``, from which the attention mask is made); the output is ``[B, hidden]``,
    pooled by ``pooling``.

    Args:
        path: local folder with ``config.json`` and weights.
        config: instead of ``path``: a config dict with ``model_type`` (random initialization).
        pooling: ``"cls"`` (first token) or ``"mean"`` (mean over the non-padding tokens).
        pad_token_id: id of the padding token (default: the model config's, else 0).
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        pooling: Literal["cls", "mean"] = "cls",
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if (path is None) == (config is None):
            raise ValueError("TransformersEncoder needs exactly one of `path` (a local folder) or `config` (a dict)")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        try:
            import transformers
        except ImportError as error:
            raise ImportError(_INSTALL) from error
        if path is not None:
            # from_pretrained returns the model in eval mode, and Lightning keeps each submodule's mode as
            # built: without this, dropout would never run while fine-tuning a loaded model
            self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True).train()
        else:
            config = dict(config or {})
            model_type = config.pop("model_type", None)
            if model_type is None:
                raise ValueError("a TransformersEncoder config needs a `model_type` (e.g. 'bert')")
            self.model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(model_type, **config))
        self.pooling = pooling
        self.pad_token_id = pad_token_id if pad_token_id is not None else (self.model.config.pad_token_id or 0)
        self.out_features = int(self.model.config.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        mask = (input_ids != self.pad_token_id).long()
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return pool(hidden, mask, self.pooling)
