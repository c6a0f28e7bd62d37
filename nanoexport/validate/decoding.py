"""The PyTorch reference and greedy generation, beside the artifact decoding loop they are compared with.

``ArtifactDecoder``, ``prompts_for`` and ``PROMPTS`` live in ``nanoexport.interface`` (targets run artifacts
with them too, and must not import validation); they are imported here for validation's use.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from nanoexport.interface import PROMPTS, ArtifactDecoder, prompts_for  # noqa: F401 (validation's names)


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
