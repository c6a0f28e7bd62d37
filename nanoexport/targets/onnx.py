"""The ``onnx`` target: the graph as ``model.onnx`` plus ``model.onnx.data``, run by ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from nanoexport.config import ExportConfig

NAME = "onnx"
RUNTIME = "onnxruntime"
KV_CACHE_FORMS = ("dynamic", "static")  # the first is the default
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"


def lower(model: ir.Model, config: ExportConfig, folder: Path) -> list[str]:
    """Write ``model`` into ``folder`` for ONNX Runtime; returns the model files written."""
    ir.save(model, folder / MODEL_FILE, external_data=WEIGHTS_FILE)
    return [MODEL_FILE, WEIGHTS_FILE]


class Runner:
    """Runs an onnx-target artifact on ONNX Runtime CPU, one call per forward step."""

    def __init__(self, folder: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        self.output_names = [output.name for output in self.session.get_outputs()]

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
