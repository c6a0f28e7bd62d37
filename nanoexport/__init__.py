"""nanoexport: turn a small decoder LM into validated artifacts for on-device runtimes.

    import nanoexport
    artifact = nanoexport.export("path/to/checkpoint", target="onnx", out="out/onnx")
    report = nanoexport.validate(artifact)
    assert report.passed
"""

from nanoexport.artifact import Artifact
from nanoexport.config import ExportConfig, ValidationConfig
from nanoexport.errors import NanoexportError
from nanoexport.pipeline import export
from nanoexport.validate import ValidationReport, validate

__version__ = "0.1.0"
__all__ = ["Artifact", "ExportConfig", "NanoexportError", "ValidationConfig", "ValidationReport", "export",
           "validate", "__version__"]
