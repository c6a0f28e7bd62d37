"""Running an onnx-target artifact on ONNX Runtime, the way validation drives it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nanoexport.artifact import Artifact
from nanoexport.errors import NanoexportError
from nanoexport.onnx_file import open_session
from nanoexport.targets.onnx import DECODE_FILE, MODEL_FILE, PREFILL_FILE


class Runner:
    """Runs an onnx-target artifact on ONNX Runtime CPU, one call per forward step."""

    def __init__(self, artifact: Artifact):
        files = artifact.manifest["model_files"]

        graphs = {"prefill": PREFILL_FILE, "decode": DECODE_FILE} if PREFILL_FILE in files else {"prefill": MODEL_FILE}
        self.sessions = {}
        for name, file_name in graphs.items():
            self.sessions[name] = open_session(artifact.file(file_name), artifact.path)
            _check_kv_cache(self.sessions[name], artifact.manifest["io"]["kv_cache"], artifact.path / file_name,
                            role=name if len(graphs) == 2 else "whole")
        self.output_names = [output.name for output in self.sessions["prefill"].get_outputs()]

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        one_token = feeds["input_ids"].shape[1] == 1
        session = self.sessions["decode"] if one_token and "decode" in self.sessions else self.sessions["prefill"]
        return dict(zip(self.output_names, session.run(self.output_names, feeds)))


def _check_kv_cache(session, kv_cache: dict[str, Any], path: Path, role: str) -> None:
    """Refuse a manifest whose ``io.kv_cache`` does not fit the graph at ``path``. Validation sizes the inputs
    it feeds from it, which the runtime would refuse only in the middle of a run (or which would not fit in
    memory). ``role``: "whole" (any number of tokens), or the "prefill" (``prefill_chunk`` tokens) or "decode"
    graph of a split artifact."""
    inputs = {value.name: value.shape for value in session.get_inputs()}
    outputs = {value.name: value.shape for value in session.get_outputs()}
    layers = range(kv_cache["num_layers"])
    past = {f"past_key_values.{layer}.{part}" for layer in layers for part in ("key", "value")}
    present = {f"present.{layer}.{part}" for layer in layers for part in ("key", "value")}
    fix = "the manifest does not describe the model: re-export the artifact"
    if past != {name for name in inputs if name.startswith("past_key_values.")} or not present <= outputs.keys() \
            or "input_ids" not in inputs or "logits" not in outputs:
        raise NanoexportError(f"the manifest of {path.parent} says {len(layers)} layers of KV cache, but {path.name} "
                              "does not take and give them with input_ids and logits; " + fix)
    cache_shape, tokens_shape = inputs["past_key_values.0.key"], inputs["input_ids"]
    if len(cache_shape) != 4 or len(tokens_shape) != 2:
        raise NanoexportError(f"{path} takes a KV cache of shape {cache_shape}, not [batch, kv_heads, sequence, "
                              f"head_dim]; {fix}")
    graph = {"kv_heads": cache_shape[1], "capacity": cache_shape[2], "head_dim": cache_shape[3],
             "vocab_size": outputs["logits"][-1]}
    if role != "decode":
        graph["prefill_chunk"] = tokens_shape[1] if role == "prefill" else None
    for key, size in graph.items():
        fixed = size if isinstance(size, int) else None  # a named dimension: any size, or a growing cache
        claimed = kv_cache.get(key)  # capacity and prefill_chunk may be left out: None
        if fixed != claimed and (fixed is not None or key in ("capacity", "prefill_chunk")):
            raise NanoexportError(f"the manifest of {path.parent} says {key} {claimed}, but {path.name} takes "
                                  f"{size}; {fix}")
