from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Returns a function family -> folder of a tiny random-weight checkpoint, built once per session."""
    folders: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in folders:
            folders[family] = save_tiny_checkpoint(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return folders[family]

    return build


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory):
    """The bundled demo model exported for the onnx target once per session."""
    import nanoexport

    return nanoexport.export(
        out=tmp_path_factory.mktemp("demo") / "demo-onnx", config=nanoexport.ExportConfig(verify_passes=True),
        progress=False,
    )
