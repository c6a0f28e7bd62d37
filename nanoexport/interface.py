"""The model interface every graph and artifact shares: KV-cache forms and layout, and the inputs of a call.

The captured graph reads ``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key/.value``
and gives ``logits`` and ``present.{i}.key/.value``, caches laid out ``[batch, kv_heads, seq, head_dim]``.
The fixed-size forms add ``cache_position`` and give the mask one slot per cache entry. Which form an export
builds is decided once, in ``KvCache.resolve``; every stage after that reads the resolved value.

``ArtifactDecoder`` drives an artifact's runner through this interface call by call (prefill, in chunks when
the graph takes a fixed count, then one-token steps), batch 1 without padding, on the fixed prompts of
``prompts_for``: validation and the targets' own checks run artifacts the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nanoexport.errors import NanoexportError

if TYPE_CHECKING:
    from nanoexport.targets import Runner

# Growing with the sequence: explicit I/O (dynamic) or kept by the runtime between calls (stateful).
GROWING_FORMS = ("dynamic", "stateful")
# Fixed capacity, written at cache_position: from slot 0 (static) or round-robin (sliding).
FIXED_FORMS = ("static", "sliding")
KV_CACHE_FORMS = (*GROWING_FORMS, *FIXED_FORMS)


@dataclass(frozen=True)
class KvCache:
    """The KV cache an export builds: its form, capacity, per-layer attention windows, and graph split."""

    form: str
    capacity: int | None  # slots of a fixed-size cache; None when it grows
    windows: tuple[int | None, ...]  # per layer, positions back attention reaches (None: all)
    split_prefill_decode: bool = False
    prefill_chunk: int | None = None  # tokens per prefill call when split

    @property
    def fixed(self) -> bool:
        return self.form in FIXED_FORMS

    @property
    def circular(self) -> bool:
        return self.form == "sliding"

    @classmethod
    def resolve(cls, requested: str, forms: tuple[str, ...], split: bool, max_context: int, prefill_chunk: int,
                target: str) -> KvCache:
        """The form ``requested`` (empty: the target's default, or static when ``split``), checked against the
        target's ``forms`` and the capacity and chunk settings; raises with the fix on a bad combination.
        Settings only, so it runs before capture; ``for_model`` adds the checkpoint's attention windows."""
        form = requested or ("static" if split else forms[0])
        if form not in forms:
            raise NanoexportError(f"target {target} cannot run a {form!r} KV cache; choose --kv-cache from "
                                  f"{', '.join(forms)}")
        if form in FIXED_FORMS and max_context < 1:
            raise NanoexportError(f"--max-context must be at least 1, not {max_context}")
        if split:
            if form in GROWING_FORMS:
                raise NanoexportError(f"--split-prefill-decode needs a fixed-size KV cache; drop --kv-cache {form}")
            if not 1 < prefill_chunk <= max_context:
                raise NanoexportError(f"--prefill-chunk must be between 2 and --max-context ({max_context}), "
                                      f"not {prefill_chunk}")
        return cls(form, max_context if form in FIXED_FORMS else None, (), split, prefill_chunk if split else None)

    def for_model(self, hf_config: Any) -> KvCache:
        """This cache with each layer's attention window from the model's transformers config."""
        return dataclasses.replace(self, windows=tuple(attention_windows(hf_config)))


def kv_shape(config: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) of one layer's cache, from a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def attention_windows(config: Any) -> list[int | None]:
    """Per layer, how many positions back attention reaches, or None for full attention."""
    window = getattr(config, "sliding_window", None) or None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [window if layer_type == "sliding_attention" else None for layer_type in layer_types]
    return [window] * config.num_hidden_layers


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The captured graph's input and output names, in order."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def call_feeds(tokens, past: int, real: int, capacity: int | None) -> dict[str, np.ndarray]:
    """The non-cache inputs of one call on ``tokens`` (the first ``real`` of them real, the rest padding)
    after ``past`` cached positions: batch 1, positions counting on. ``capacity``: the slots of a fixed-size
    cache, whose mask marks the valid slots and whose writes start at ``cache_position``; None: a growing
    cache, whose mask covers every position so far."""
    total = past + real
    slots = total if capacity is None else capacity
    feeds = {
        "input_ids": np.asarray(tokens, np.int64).reshape(1, -1),
        "position_ids": np.arange(past, past + len(tokens), dtype=np.int64)[None],
        "attention_mask": (np.arange(slots) < min(total, slots)).astype(np.int64)[None],
    }
    if capacity is not None:
        feeds["cache_position"] = np.array([past], np.int64)
    return feeds


PROMPTS = (
    "To be, or not to be, that is the question:",
    "Now is the winter of our discontent",
    "Friends, Romans, countrymen, lend me your ears;",
)
RANDOM_PROMPT_LENGTH = 16


@dataclass
class CacheTensors:
    """Per-layer key and value tensors and how many positions they hold."""

    tensors: list[np.ndarray]
    length: int


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

    def empty_cache(self) -> CacheTensors:
        slots = 0 if self.capacity is None else self.capacity
        shape = (1, self.kv_heads, slots, self.head_dim)
        return CacheTensors([np.zeros(shape, np.float32) for _ in range(2 * self.num_layers)], 0)

    def step(self, tokens: list[int], cache: CacheTensors) -> tuple[np.ndarray, CacheTensors]:
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

    def _call(self, tokens: list[int], cache: CacheTensors, real: int) -> tuple[np.ndarray, CacheTensors]:
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
        return outputs["logits"][0], CacheTensors(present, total)

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


def prompts_for(artifact_folder: Path, vocab_size: int) -> list[list[int]]:
    """Fixed English prompts through the artifact's tokenizer; seeded random tokens when it has none."""
    tokenizer_folder = artifact_folder / "tokenizer"
    if tokenizer_folder.is_dir():
        from nanoexport.tokenizer import Tokenizer

        tokenizer = Tokenizer.of_artifact(tokenizer_folder)
        prompts = [tokenizer.encode(text) for text in PROMPTS]
        if all(len(p) > 0 and max(p) < vocab_size for p in prompts):
            return prompts
    generator = np.random.default_rng(0)
    return [generator.integers(0, vocab_size, RANDOM_PROMPT_LENGTH).tolist() for _ in PROMPTS]
