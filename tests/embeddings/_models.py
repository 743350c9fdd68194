"""Tiny randomly initialised Hugging Face encoders of each layout the family supports (built from configs)."""

from __future__ import annotations

import torch

LAYOUTS = ("bert", "roberta", "modernbert", "distilbert")
TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def tiny_config(layout: str) -> dict:
    """A config dict (``model_type`` + sizes) for ``AutoConfig.for_model``; dropout off, eager attention."""
    if layout == "distilbert":
        return dict(model_type="distilbert", vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                    dropout=0.0, attention_dropout=0.0, pad_token_id=0)  # fmt: skip
    config = dict(model_type=layout, **TINY, pad_token_id=0)
    if layout == "modernbert":
        config.update(global_attn_every_n_layers=1, local_attention=8, max_position_embeddings=64,
                      embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0, bos_token_id=1,
                      eos_token_id=2, cls_token_id=1, sep_token_id=2)  # fmt: skip
    else:
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64)
        if layout == "roberta":
            config.update(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return config


def tiny_model(layout: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    """The random model itself, in ``dtype`` (float64: equalities up to rounding of 1e-12)."""
    import transformers

    config = dict(tiny_config(layout))
    model_type = config.pop("model_type")
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(model_type, **config),
                                               attn_implementation="eager")  # fmt: skip
    return model.to(dtype).eval()


def token_batch(batch: int = 6, length: int = 7, seed: int = 0, pad_id: int = 0):
    """Token ids in ``[3, 64)`` with right padding of varying length, and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (batch, length), generator=g)
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, pad_id), mask
