"""Decoding loops shared by every runtime: prefill, one-token decode steps, greedy generation.

Batch 1 without padding: the attention mask is all ones and positions count from zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from nanoexport.interface import call_feeds
from nanoexport.errors import NanoexportError

PROMPTS = (
    "To be, or not to be, that is the question:",
    "Now is the winter of our discontent",
    "Friends, Romans, countrymen, lend me your ears;",
)
RANDOM_PROMPT_LENGTH = 16


@dataclass
class KVCache:
    """Per-layer key and value tensors and how many positions they hold."""

    tensors: list[np.ndarray]
    length: int


class Runner(Protocol):
    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class ArtifactDecoder:
    """Drives an artifact runner through its explicit KV-cache interface, growing or fixed-capacity."""

    def __init__(self, runner: Runner, kv_cache: dict[str, Any]):
        self.runner = runner
        self.num_layers = kv_cache["num_layers"]
        self.kv_heads = kv_cache["kv_heads"]
        self.head_dim = kv_cache["head_dim"]
        self.vocab_size = kv_cache["vocab_size"]
        self.capacity = kv_cache.get("capacity")  # None: the cache grows
        self.prefill_chunk = kv_cache.get("prefill_chunk")  # None: any number of tokens per call
        self.circular = kv_cache.get("form") == "sliding"

    def empty_cache(self) -> KVCache:
        slots = 0 if self.capacity is None else self.capacity
        shape = (1, self.kv_heads, slots, self.head_dim)
        return KVCache([np.zeros(shape, np.float32) for _ in range(2 * self.num_layers)], 0)

    def step(self, tokens: list[int], cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Feed ``tokens`` after the ``cache``; returns logits ``[len(tokens), vocab]`` and the new cache."""
        if len(tokens) > 1 and self.circular and cache.length + self._call_length(len(tokens)) > self.capacity:
            # One call would overwrite slots that its own earlier tokens still attend to: go token by token.
            rows = []
            for token in tokens:
                logits, cache = self._call([token], cache, 1)
                rows.append(logits)
            return np.concatenate(rows), cache
        if self.prefill_chunk is None or len(tokens) == 1:
            return self._call(tokens, cache, len(tokens))
        # A fixed-length prefill graph: feed whole chunks, the last one padded. Padding lands in cache slots
        # past the real tokens, which the mask hides and later tokens overwrite.
        rows = []
        for start in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[start : start + self.prefill_chunk]
            logits, cache = self._call(chunk + [0] * (self.prefill_chunk - len(chunk)), cache, len(chunk))
            rows.append(logits[: len(chunk)])
        return np.concatenate(rows), cache

    def _call_length(self, count: int) -> int:
        """Cache slots that feeding ``count`` tokens writes, padding included."""
        if self.prefill_chunk is None or count == 1:
            return count
        return -(-count // self.prefill_chunk) * self.prefill_chunk

    def _call(self, tokens: list[int], cache: KVCache, real: int) -> tuple[np.ndarray, KVCache]:
        """One runtime call on ``tokens``, of which the first ``real`` count; the rest is padding."""
        past, total = cache.length, cache.length + real
        if self.capacity is not None and past + len(tokens) > self.capacity and not self.circular:
            raise NanoexportError(
                f"{past + len(tokens)} tokens do not fit the artifact's KV cache of {self.capacity}; export "
                "with a larger --max-context or with --kv-cache sliding"
            )
        feeds = call_feeds(tokens, past, real, self.capacity)
        for layer in range(self.num_layers):
            feeds[f"past_key_values.{layer}.key"] = cache.tensors[2 * layer]
            feeds[f"past_key_values.{layer}.value"] = cache.tensors[2 * layer + 1]
        outputs = self.runner.forward(feeds)
        present = []
        for layer in range(self.num_layers):
            present += [outputs[f"present.{layer}.key"], outputs[f"present.{layer}.value"]]
        return outputs["logits"][0], KVCache(present, total)

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
