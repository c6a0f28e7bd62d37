"""Run an in-memory graph on ONNX Runtime on fixed inputs, to check that a pass kept its numbers."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

# Sizes for the symbolic dimensions of the explicit-cache interface; past > 0 so the cache is read.
DIMENSIONS = {"batch_size": 1, "sequence_length": 5, "past_sequence_length": 3, "total_sequence_length": 8}


class GraphRunner:
    """Fixed inputs for ``model``'s interface, drawn once, and a way to get the logits for them."""

    def __init__(self, model: ir.Model, seed: int = 0):
        generator = np.random.default_rng(seed)
        vocab_size = model.graph.outputs[0].shape[-1]
        past = DIMENSIONS["past_sequence_length"]
        self.feeds = {}
        for value in model.graph.inputs:
            shape = [DIMENSIONS[str(d)] if isinstance(d, ir.SymbolicDim) else d for d in value.shape]
            if value.name == "input_ids":
                self.feeds[value.name] = generator.integers(0, vocab_size, shape, dtype=np.int64)
            elif value.name == "attention_mask":
                self.feeds[value.name] = np.ones(shape, np.int64)
            elif value.name == "position_ids":
                self.feeds[value.name] = np.broadcast_to(np.arange(past, past + shape[1]), shape).astype(np.int64)
            else:
                self.feeds[value.name] = generator.standard_normal(shape).astype(value.dtype.numpy())

    def logits(self, model: ir.Model) -> np.ndarray:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            options = ort.SessionOptions()
            options.log_severity_level = 3
            # Runtime graph optimizations off: we compare our graphs, not what ORT makes of them.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            return session.run([model.graph.outputs[0].name], self.feeds)[0]
