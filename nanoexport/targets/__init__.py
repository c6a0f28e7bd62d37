"""Targets by name. Each target is one module with ``lower(graph, config, folder)`` and a ``Runner``.

A target module is imported only when asked for, so a missing optional runtime affects only its target.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from nanoexport.errors import NanoexportError

# target name -> (module, the Python package its runtime needs)
TARGETS = {
    "onnx": ("nanoexport.targets.onnx", "onnxruntime"),
    "coreml": ("nanoexport.targets.coreml", "coremltools"),
    "openvino": ("nanoexport.targets.openvino", "openvino"),
    "qnn": ("nanoexport.targets.qnn", "onnxruntime"),
}


def get_target(name: str) -> ModuleType:
    if name not in TARGETS:
        raise NanoexportError(f"unknown target {name!r}; available targets: {', '.join(sorted(TARGETS))}")
    return importlib.import_module(TARGETS[name][0])


def runtime_installed(name: str) -> bool:
    return importlib.util.find_spec(TARGETS[name][1]) is not None
