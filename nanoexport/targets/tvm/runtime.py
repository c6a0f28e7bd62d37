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
