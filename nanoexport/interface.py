"""The model interface every graph and artifact shares: KV-cache forms and layout, and the inputs of a call.

The captured graph reads ``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key/.value``
and gives ``logits`` and ``present.{i}.key/.value``, caches laid out ``[batch, kv_heads, seq, head_dim]``.
The fixed-size forms add ``cache_position`` and give the mask one slot per cache entry. Which form an export
builds is decided once, in ``KvCache.resolve``; every stage after that reads the resolved value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nanoexport.errors import NanoexportError

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
                hf_config: Any, target: str) -> KvCache:
        """The form ``requested`` (empty: the target's default, or static when ``split``), checked against the
        target's ``forms`` and the capacity and chunk settings; raises with the fix on a bad combination."""
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
        windows = tuple(attention_windows(hf_config)) if hf_config is not None else ()
        return cls(form, max_context if form in FIXED_FORMS else None, windows, split,
                   prefill_chunk if split else None)


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
