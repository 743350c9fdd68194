"""Tiny random Hugging Face decoders (built from config objects, nothing downloaded) shared by the tests."""

from __future__ import annotations

from typing import Any

VOCAB = 32

GPT2 = dict(model_type="gpt2", n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
_DECODER = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=32, pad_token_id=0,
                bos_token_id=0, eos_token_id=0)  # fmt: skip
# every layout the intervention supports: GPT-2 (c_proj, Conv1D), Llama / Qwen2 / Mistral (o_proj), Gemma
# (o_proj, head_dim set apart from hidden_size / heads)
CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": GPT2,
    "llama": dict(model_type="llama", **_DECODER),
    "qwen2": dict(model_type="qwen2", **_DECODER),
    "mistral": dict(model_type="mistral", **_DECODER),
    "gemma": dict(model_type="gemma", head_dim=6, **_DECODER),
}


def head_dim(name: str) -> int:
    return 6 if name == "gemma" else 8
