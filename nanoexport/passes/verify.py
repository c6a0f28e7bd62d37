"""Run an in-memory graph on ONNX Runtime on fixed inputs, to check that a pass kept its numbers.

The inputs are one logical state (5 new tokens after 3 cached positions with random keys and values),
rendered for whichever cache interface the graph has, so a pass that turns the growing cache into a
fixed-capacity one is checked like any other: the logits must not move.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from nanoexport.interface import call_feeds
from nanoexport.runtime import cpu_session

NEW_TOKENS = 5
CACHED = 3


class GraphRunner:
    """Fixed inputs for ``model``'s interface, drawn once, and a way to get the logits for them."""

    def __init__(self, model: ir.Model, seed: int = 0):
        generator = np.random.default_rng(seed)
        vocab_size = model.graph.outputs[0].shape[-1]
        tokens = model.graph.inputs[0].shape[1]  # input_ids; a specialized graph takes a fixed count
        self.input_ids = generator.integers(0, vocab_size, (1, tokens if isinstance(tokens, int) else NEW_TOKENS),
                                            dtype=np.int64)
        self.past = {
            value.name: generator.standard_normal((1, value.shape[1], CACHED, value.shape[3])).astype(np.float32)
            for value in model.graph.inputs
            if value.name.startswith("past_key_values.")
        }

    def feeds(self, model: ir.Model) -> dict[str, np.ndarray]:
        inputs = {value.name: value for value in model.graph.inputs}
        slots = inputs["attention_mask"].shape[1]
        capacity = slots if isinstance(slots, int) else None
        feeds = call_feeds(self.input_ids[0], CACHED, self.input_ids.shape[1], capacity)
        for name, past in self.past.items():
            if capacity is None:
                feeds[name] = past
            else:
                value = inputs[name]
                feeds[name] = np.zeros((1, value.shape[1], capacity, value.shape[3]), np.float32)
                feeds[name][:, :, :CACHED] = past
        unknown = set(inputs) - set(feeds)
        if unknown:
            raise ValueError(f"no verification input for graph inputs {sorted(unknown)}")
        return {name: feeds[name] for name in inputs}

    def logits(self, model: ir.Model) -> np.ndarray:
        # Runtime graph optimizations off: we compare our graphs, not what ORT makes of them.
        session = cpu_session(model, optimize=False)
        return session.run([model.graph.outputs[0].name], self.feeds(model))[0]
