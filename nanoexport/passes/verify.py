"""Run an in-memory graph on ONNX Runtime on fixed inputs, to check that a pass kept its numbers.

The inputs are one logical state (5 new tokens after 3 cached positions with random keys and values),
rendered for whichever cache interface the graph has, so a pass that turns the growing cache into a
fixed-capacity one is checked like any other: the logits must not move.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from nanoexport.capture.onnx_export import call_feeds

NEW_TOKENS = 5
CACHED = 3


class GraphRunner:
    """Fixed inputs for ``model``'s interface, drawn once, and a way to get the logits for them."""

    def __init__(self, model: ir.Model, seed: int = 0):
        generator = np.random.default_rng(seed)
        vocab_size = model.graph.outputs[0].shape[-1]
        self.input_ids = generator.integers(0, vocab_size, (1, NEW_TOKENS), dtype=np.int64)
        self.past = {
            value.name: generator.standard_normal((1, value.shape[1], CACHED, value.shape[3])).astype(np.float32)
            for value in model.graph.inputs
            if value.name.startswith("past_key_values.")
        }

    def feeds(self, model: ir.Model) -> dict[str, np.ndarray]:
        inputs = {value.name: value for value in model.graph.inputs}
        slots = inputs["attention_mask"].shape[1]
        capacity = slots if isinstance(slots, int) else None
        feeds = call_feeds(self.input_ids[0], CACHED, NEW_TOKENS, capacity)
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


def cpu_session(model: ir.Model | Path, optimize: bool = True, session_config: dict[str, str] | None = None):
    """A quiet ONNX Runtime CPU session on a saved model file, or on an in-memory ``model`` (written to a
    scratch folder, then dropped); ``session_config``: session configuration entries."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    if isinstance(model, Path):
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
