"""Decoding loops shared by every runtime: prefill, one-token decode steps, greedy generation.

Batch 1 without padding: the attention mask is all ones and positions count from zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

PROMPTS = (
    "To be, or not to be, that is the question:",
    "Now is the winter of our discontent",
    "Friends, Romans, countrymen, lend me your ears;",
)
RANDOM_PROMPT_LENGTH = 16


class Runner(Protocol):
    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class ArtifactDecoder:
    """Drives an artifact runner through the explicit KV-cache interface."""

    def __init__(self, runner: Runner, kv_cache: dict[str, Any]):
        self.runner = runner
        self.num_layers = kv_cache["num_layers"]
        self.kv_heads = kv_cache["kv_heads"]
        self.head_dim = kv_cache["head_dim"]
        self.vocab_size = kv_cache["vocab_size"]

    def empty_cache(self) -> list[np.ndarray]:
        return [np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.num_layers)]

    def step(self, tokens: list[int], cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Feed ``tokens`` after the ``cache``; returns logits ``[len(tokens), vocab]`` and the new cache."""
        past = cache[0].shape[2]
        feeds = {
            "input_ids": np.array([tokens], np.int64),
            "attention_mask": np.ones((1, past + len(tokens)), np.int64),
            "position_ids": np.arange(past, past + len(tokens), dtype=np.int64)[None],
        }
        for layer in range(self.num_layers):
            feeds[f"past_key_values.{layer}.key"] = cache[2 * layer]
            feeds[f"past_key_values.{layer}.value"] = cache[2 * layer + 1]
        outputs = self.runner.forward(feeds)
        present = []
        for layer in range(self.num_layers):
            present += [outputs[f"present.{layer}.key"], outputs[f"present.{layer}.value"]]
        return outputs["logits"][0], present

    def full_logits(self, prompt: list[int]) -> np.ndarray:
        return self.step(prompt, self.empty_cache())[0]

    def prefill_then_decode(self, prompt: list[int], prefill: int) -> np.ndarray:
        """Logits of every position, from a prefill of ``prefill`` tokens and then one token per step."""
        logits, cache = self.step(prompt[:prefill], self.empty_cache())
        rows = [logits]
        for token in prompt[prefill:]:
            logits, cache = self.step([token], cache)
            rows.append(logits)
        return np.concatenate(rows)

    def next_token_stream(self, prompt: list[int]) -> Iterator[np.ndarray]:
        """Yields next-token logits; send the chosen token back in."""
        logits, cache = self.step(prompt, self.empty_cache())
        while True:
            token = yield logits[-1]
            logits, cache = self.step([token], cache)


class TorchReference:
    """The PyTorch model, recomputing the whole sequence each step: no cache code of ours involved."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def logits(self, tokens: list[int]) -> np.ndarray:
        return self.model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float().numpy()

    def next_token_stream(self, prompt: list[int]) -> Iterator[np.ndarray]:
        tokens = list(prompt)
        while True:
            token = yield self.logits(tokens)[-1]
            tokens.append(token)


def greedy(stream: Iterator[np.ndarray], count: int) -> list[int]:
    """``count`` greedily chosen tokens from a next-token stream."""
    tokens = [int(np.argmax(next(stream)))]
    while len(tokens) < count:
        tokens.append(int(np.argmax(stream.send(tokens[-1]))))
    stream.close()
    return tokens


def prompts_for(artifact_folder: Path, vocab_size: int) -> list[list[int]]:
    """Fixed English prompts through the artifact's tokenizer; seeded random tokens when it has none."""
    tokenizer_folder = artifact_folder / "tokenizer"
    if tokenizer_folder.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        prompts = [tokenizer.encode(text, add_special_tokens=False) for text in PROMPTS]
        if all(len(p) > 0 and max(p) < vocab_size for p in prompts):
            return prompts
    generator = np.random.default_rng(0)
    return [generator.integers(0, vocab_size, RANDOM_PROMPT_LENGTH).tolist() for _ in PROMPTS]
