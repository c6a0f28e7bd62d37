"""The ``onnx`` target: the graph as ``model.onnx`` plus ``model.onnx.data``, run by ONNX Runtime.

With ``split_prefill_decode``, ``prefill.onnx`` (a fixed chunk of tokens) and ``decode.onnx`` (one token)
replace ``model.onnx``; both read their weights from the one ``model.onnx.data``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from nanoexport.artifact import Artifact
from nanoexport.config import ExportConfig
from nanoexport.passes.kv_cache import specialize

NAME = "onnx"
RUNTIME = "onnxruntime"
KV_CACHE_FORMS = ("dynamic", "static")  # the first is the default
MODEL_FILE = "model.onnx"
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
WEIGHTS_FILE = "model.onnx.data"


def lower(model: ir.Model, config: ExportConfig, folder: Path) -> list[str]:
    """Write ``model`` into ``folder`` for ONNX Runtime; returns the model files written."""
    ir.save(model, folder / MODEL_FILE, external_data=WEIGHTS_FILE)
    if not config.split_prefill_decode:
        return [MODEL_FILE, WEIGHTS_FILE]
    # Reloaded copies are cheap (weights stay on disk) and their initializers keep pointing into the one
    # weights file, which each specialized graph then references rather than copies.
    for file_name, sequence_length in ((PREFILL_FILE, config.prefill_chunk), (DECODE_FILE, 1)):
        graph = ir.load(folder / MODEL_FILE)
        specialize(graph, sequence_length)
        ir.save(graph, folder / file_name)
    (folder / MODEL_FILE).unlink()
    return [PREFILL_FILE, DECODE_FILE, WEIGHTS_FILE]


class Runner:
    """Runs an onnx-target artifact on ONNX Runtime CPU, one call per forward step."""

    def __init__(self, artifact: Artifact):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        files = artifact.manifest["model_files"]

        def session(file_name: str):
            return ort.InferenceSession(str(artifact.file(file_name)), options, providers=["CPUExecutionProvider"])

        if PREFILL_FILE in files:
            self.sessions = {"prefill": session(PREFILL_FILE), "decode": session(DECODE_FILE)}
        else:
            self.sessions = {"prefill": session(MODEL_FILE)}
        self.output_names = [output.name for output in self.sessions["prefill"].get_outputs()]

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        one_token = feeds["input_ids"].shape[1] == 1
        session = self.sessions["decode"] if one_token and "decode" in self.sessions else self.sessions["prefill"]
        return dict(zip(self.output_names, session.run(self.output_names, feeds)))
