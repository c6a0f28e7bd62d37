"""Running a tvm artifact: its compiled library on TVM's Relax virtual machine on this machine's CPU, driven
through the explicit-cache interface every target's runner offers."""

from __future__ import annotations

import json

import numpy as np

from nanoexport.artifact import Artifact
from nanoexport.errors import NanoexportError
from nanoexport.targets.tvm.compile import LIBRARY, PARAMS, SIGNATURES


def signatures_of(artifact: Artifact) -> dict:
    try:
        return json.loads(artifact.file(SIGNATURES).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NanoexportError(f"{SIGNATURES} of {artifact.path} is not valid JSON ({error}); re-export the "
                              "artifact") from None


class Runner:
    """Calls the artifact's ``prefill`` function on chunks and ``decode`` on single tokens, each with the
    artifact's one set of parameters; the static cache goes in and comes back whole."""

    def __init__(self, artifact: Artifact):
        import tvm
        from safetensors.numpy import load_file
        from tvm import relax

        signatures = signatures_of(artifact)
        if signatures.get("library") != LIBRARY:
            raise NanoexportError(f"{artifact.path} was compiled for another device ({signatures.get('target')}), "
                                  "so it cannot run here; export with --tvm-target host to validate it")
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact.file(LIBRARY))), tvm.cpu())
        weights = load_file(str(artifact.file(PARAMS)))
        missing = [name for name in signatures["params"] if name not in weights]
        if missing:
            raise NanoexportError(f"{PARAMS} of {artifact.path} lacks {len(missing)} parameters (first: {missing[0]}); "
                                  "re-export the artifact")
        self.params = [tvm.runtime.tensor(weights[name]) for name in signatures["params"]]
        self.functions = signatures["functions"]

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        name = "decode" if feeds["input_ids"].shape[1] == 1 else "prefill"
        function = self.functions[name]
        inputs = [tvm.runtime.tensor(np.ascontiguousarray(feeds[value["name"]], value["dtype"]))
                  for value in function["inputs"]]
        results = self.vm[name](*inputs, *self.params)
        return {value["name"]: results[i].numpy() for i, value in enumerate(function["outputs"])}


class Generator:
    """A host artifact loaded once for greedy generation, the KV cache kept in TVM tensors between calls (no
    copies through NumPy): what an application does with the artifact, and what the decode benchmark times."""

    def __init__(self, folder):
        import tvm

        self.runner = Runner(Artifact.load(folder))
        decode = {value["name"]: value for value in self.runner.functions["decode"]["inputs"]}
        self.past = [name for name in decode if name.startswith("past_key_values.")]
        self.capacity = decode[self.past[0]]["shape"][2]
        self.chunk = {value["name"]: value for value in self.runner.functions["prefill"]["inputs"]}[
            "input_ids"]["shape"][1]
        self.empty = [tvm.runtime.tensor(np.zeros(decode[name]["shape"], decode[name]["dtype"])) for name in self.past]

    def _call(self, tokens: list[int], past: int, real: int, cache: list) -> tuple[np.ndarray, list]:
        import tvm

        from nanoexport.interface import call_feeds

        name = "decode" if len(tokens) == 1 else "prefill"
        function = self.runner.functions[name]
        feeds = call_feeds(tokens, past, real, self.capacity)
        feeds.update(zip(self.past, cache))
        inputs = [feeds[value["name"]] if value["name"] in self.past else
                  tvm.runtime.tensor(np.ascontiguousarray(feeds[value["name"]], value["dtype"]))
                  for value in function["inputs"]]
        results = self.runner.vm[name](*inputs, *self.runner.params)
        outputs = {value["name"]: results[i] for i, value in enumerate(function["outputs"])}
        cache = [outputs[name.replace("past_key_values.", "present.", 1)] for name in self.past]
        return outputs["logits"].numpy()[0, real - 1], cache

    def generate(self, prompt: list[int], new_tokens: int, first_token=None) -> list[int]:
        """Greedy: ``prompt`` in chunks, then one token a call; ``first_token()`` is called once the first new
        token is known (for timing)."""
        if len(prompt) + new_tokens > self.capacity:
            raise NanoexportError(f"{len(prompt) + new_tokens} tokens do not fit the artifact's KV cache of "
                                  f"{self.capacity}; export with a larger --max-context")
        cache, past = self.empty, 0
        for start in range(0, len(prompt), self.chunk):
            piece = prompt[start : start + self.chunk]
            padded = piece + [0] * (self.chunk - len(piece)) if len(piece) > 1 else piece
            logits, cache = self._call(padded, past, len(piece), cache)
            past += len(piece)
        tokens = [int(logits.argmax())]
        if first_token is not None:
            first_token()
        while len(tokens) < new_tokens:
            logits, cache = self._call(tokens[-1:], past, 1, cache)
            past += 1
            tokens.append(int(logits.argmax()))
        return tokens
