"""nanoexport: turn a small decoder LM into validated artifacts for on-device runtimes.

    import nanoexport
    artifact = nanoexport.export("path/to/checkpoint", target="onnx", out="out/onnx")
    report = nanoexport.validate(artifact)
    assert report.passed
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanoexport.artifact import Artifact
    from nanoexport.config import ExportConfig, ValidationConfig
    from nanoexport.errors import NanoexportError
    from nanoexport.pipeline import export
    from nanoexport.validate import ValidationReport, validate

__version__ = "0.1.0"
__all__ = ["Artifact", "ExportConfig", "NanoexportError", "ValidationConfig", "ValidationReport", "export",
           "validate", "__version__"]
# Where each public name lives. Imported on first use, so `nanoexport --help` and `nanoexport targets` start
# without loading torch or a runtime (the CLI imports this package first).
_HOMES = {"Artifact": "nanoexport.artifact", "ExportConfig": "nanoexport.config",
          "ValidationConfig": "nanoexport.config", "NanoexportError": "nanoexport.errors",
          "export": "nanoexport.pipeline", "ValidationReport": "nanoexport.validate", "validate": "nanoexport.validate"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'nanoexport' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``nanoexport.validate`` is the function, though a subpackage has that name too: importing a subpackage
    sets it as an attribute of its parent, which here must not hide the function."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _HOMES and isinstance(value, types.ModuleType):
            globals().pop(name, None)  # resolved again, to the function, by __getattr__
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
