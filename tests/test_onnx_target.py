"""The onnx target lowers canonical ops to ONNX Runtime's fused kernels and still matches PyTorch."""

from collections import Counter

import onnx
import pytest

import nanoexport


@pytest.mark.parametrize("family, fused", [("llama", 4), ("qwen3", 4), ("gemma2", 4), ("gpt2", 0)])
def test_residual_adds_fuse_into_skip_rms_norm(family, fused, tiny_checkpoint, tmp_path):
    """Each RMSNorm that follows a residual Add becomes one kernel: 2 per layer (none in GPT-2, a LayerNorm)."""
    artifact = nanoexport.export(tiny_checkpoint(family), out=tmp_path / family, progress=False)
    graph = onnx.load(str(artifact.path / "model.onnx"), load_external_data=False).graph
    ops = Counter((node.domain or "ai.onnx", node.op_type) for node in graph.node)
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == fused
    assert nanoexport.validate(artifact).passed
