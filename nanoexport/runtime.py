"""ONNX Runtime sessions as every stage opens them: quiet, on the CPU, from a file or an in-memory graph."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx_ir as ir


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
