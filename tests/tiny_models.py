"""Tiny random-weight checkpoints of every supported family, built from transformers configs (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch

# Small enough to export in seconds; KV heads fewer than query heads wherever the family allows GQA.
COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0,
              initializer_range=0.1)  # wide logits: no near-ties to make greedy agreement flaky
TINY_CONFIGS = {
    "llama": dict(COMMON),
    "mistral": dict(COMMON, sliding_window=None),
    "qwen2": dict(COMMON),
    "qwen3": dict(COMMON, head_dim=16),
    "phi3": dict(COMMON),
    # A window shorter than the validation prompts, so the sliding-window mask is exercised.
    "gemma2": dict(COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16),
    "gpt2": dict(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                 eos_token_id=2),
}


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """``family``'s tiny random model; ``overrides`` change its config (smaller sizes for a committed fixture)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**TINY_CONFIGS[family], **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # transformers initializes biases to zero; a trained checkpoint's are not
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.02)
    return model


def save_tiny_checkpoint(family: str, folder: Path, seed: int = 0) -> Path:
    tiny_model(family, seed).save_pretrained(folder, safe_serialization=True)
    return folder
