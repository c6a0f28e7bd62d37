"""The reference models and greedy generation, beside the artifact decoding loop they are compared with.

``ArtifactDecoder``, ``prompts_for`` and ``PROMPTS`` live in ``nanoexport.interface`` (targets run artifacts
with them too, and must not import validation); they are imported here for validation's use.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoexport.capture.checkpoint import Checkpoint, check_reference_memory
from nanoexport.capture.optimum import onnx_weight_files
from nanoexport.errors import NanoexportError, first_line
from nanoexport.interface import PROMPTS, ArtifactDecoder, call_feeds, kv_shape, prompts_for  # noqa: F401


class Reference:
    """A reference model: the logits of a whole sequence, recomputed from the start at every step, so that no
    KV-cache code of ours is involved."""

    description = ""  # what runs, for the report

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits ``[len(tokens), vocab]`` of one forward over ``tokens``."""
        raise NotImplementedError

    def next_token_stream(self, prompt: list[int]) -> Iterator[np.ndarray]:
        """Yields next-token logits; send the chosen token back in."""
        tokens = list(prompt)
        while True:
            token = yield self.logits(tokens)[-1]
            tokens.append(token)


class TorchReference(Reference):
    """The PyTorch model."""

    description = "PyTorch fp32"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def logits(self, tokens: list[int]) -> np.ndarray:
        return self.model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float().numpy()


class OnnxReference(Reference):
    """The ONNX decoder a weightless checkpoint holds (Optimum's ``model.onnx``, the float model its user has),
    on ONNX Runtime CPU, every forward from an empty cache."""

    def __init__(self, path: Path, hf_config: Any):
        from nanoexport.runtime import cpu_session

        self.description = f"ONNX Runtime CPU on {path.name}"
        # ONNX Runtime holds the weights as the files store them.
        check_reference_memory(sum(file.stat().st_size for file in onnx_weight_files(path)), str(path),
                               "ONNX Runtime reference model")
        try:
            self.session = cpu_session(path)
        except Exception as error:  # the runtime's many exception types all mean "cannot load this file"
            raise NanoexportError(f"ONNX Runtime cannot load {path} as the reference ({first_line(error)[:300]}); "
                                  "pass the checkpoint it was exported from with --reference") from None
        self.num_layers = hf_config.num_hidden_layers
        kv_heads, head_dim = kv_shape(hf_config)
        types = {value.name: value.type for value in self.session.get_inputs()}
        dtype = np.float16 if types.get("past_key_values.0.key") == "tensor(float16)" else np.float32
        self.empty_cache = np.zeros((1, kv_heads, 0, head_dim), dtype)

    def logits(self, tokens: list[int]) -> np.ndarray:
        feeds = call_feeds(tokens, 0, len(tokens), None)
        for layer in range(self.num_layers):
            feeds[f"past_key_values.{layer}.key"] = feeds[f"past_key_values.{layer}.value"] = self.empty_cache
        return self.session.run(["logits"], feeds)[0][0].astype(np.float32)


def reference_model(checkpoint: Checkpoint) -> Reference:
    """What validation compares against: ``checkpoint``'s PyTorch model, or for a weightless checkpoint the
    ONNX decoder holding its weights (a model loaded from safetensors lazily has no data: load it first)."""
    if checkpoint.onnx_weights is not None:
        return OnnxReference(checkpoint.onnx_weights, checkpoint.config)
    return TorchReference(checkpoint.model)


def greedy(stream: Iterator[np.ndarray], count: int) -> list[int]:
    """``count`` greedily chosen tokens from a next-token stream."""
    tokens = [int(np.argmax(next(stream)))]
    while len(tokens) < count:
        tokens.append(int(np.argmax(stream.send(tokens[-1]))))
    stream.close()
    return tokens
