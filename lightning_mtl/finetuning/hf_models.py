"""Hugging Face causal language models from local files or a config, imported lazily."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = ["build_causal_lm"]

_INSTALL = "the finetuning family needs the optional `transformers` package: pip install 'lightning-mtl[transformers]'"


def build_causal_lm(path: str | None = None, config: dict[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """A ``transformers`` causal LM from a local folder, or with random weights from a config dict.

    Args:
        path: local folder (``from_pretrained(path, local_files_only=True)``; nothing is downloaded).
        config: instead: ``{"model_type": "gpt2", "n_layer": 2, ...}`` (``AutoConfig.for_model``).
        seed: seed of the random weights (a config model is the same in every run and in both stages).
    """
    if (path is None) == (config is None):
        raise ValueError("give exactly one of `path` (a local model folder) or `config` (a dict with model_type)")
    try:
        import transformers
    except ImportError as error:
        raise ImportError(_INSTALL) from error
    if path is not None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no model folder at '{path}' (LoFiT loads local files only)")
        return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    settings = dict(config or {})
    model_type = settings.pop("model_type", None)
    if model_type is None:
        raise ValueError("a model config needs a `model_type` (e.g. 'gpt2', 'llama', 'qwen2')")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **settings))
