"""The onnx target lowers canonical ops to ONNX Runtime's fused kernels and still matches PyTorch."""

import json
from collections import Counter

import onnx
import pytest

import nanoexport


def load_graph(artifact) -> onnx.GraphProto:
    return onnx.load(str(artifact.path / "model.onnx"), load_external_data=False).graph


@pytest.mark.parametrize("family, fused", [("llama", 4), ("qwen3", 4), ("gemma2", 4), ("gpt2", 0)])
def test_residual_adds_fuse_into_skip_rms_norm(family, fused, tiny_checkpoint, tmp_path):
    """Each RMSNorm that follows a residual Add becomes one kernel: 2 per layer (none in GPT-2, a LayerNorm).

    Each layer's attention becomes one GroupQueryAttention, with or without rotary, Qwen3's per-head norms
    and Gemma 2's soft cap and sliding window.
    """
    artifact = nanoexport.export(tiny_checkpoint(family), out=tmp_path / family, progress=False)
    ops = Counter((node.domain or "ai.onnx", node.op_type) for node in load_graph(artifact).node)
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == fused
    assert ops[("com.microsoft", "GroupQueryAttention")] == 2
    assert nanoexport.validate(artifact).passed


def test_growing_cache_is_appended_inside_group_query_attention(demo_artifact):
    """No Concat copies the cache: GroupQueryAttention writes every present, so genai can share past and present."""
    graph = load_graph(demo_artifact)
    producers = {output: node for node in graph.node for output in node.output}
    presents = [value.name for value in graph.output if value.name.startswith("present.")]
    assert len(presents) == 8
    assert all(producers[name].op_type == "GroupQueryAttention" for name in presents)
    assert not [node for node in graph.node
                if node.op_type == "Concat" and any(name.startswith("past_key_values.") for name in node.input)]
    genai_config = json.loads((demo_artifact.path / "genai_config.json").read_text())
    assert genai_config["search"]["past_present_share_buffer"]
    assert nanoexport.validate(demo_artifact).passed


@pytest.mark.parametrize("weights, asymmetric", [("int4", False), ("uint4", True)])
def test_four_bit_weights_lower_to_matmul_nbits(weights, asymmetric, tmp_path):
    """The canonical DequantizeLinear -> MatMul becomes one MatMulNBits over the same integers and scales."""
    config = nanoexport.ExportConfig()
    config.quant.weights, config.quant.asymmetric = weights, asymmetric
    artifact = nanoexport.export(out=tmp_path / weights, config=config, progress=False)
    ops = Counter((node.domain or "ai.onnx", node.op_type) for node in load_graph(artifact).node)
    assert ops[("com.microsoft", "MatMulNBits")] == 16 and ops[("ai.onnx", "DequantizeLinear")] == 0
    data = artifact.file("model.onnx.data").stat().st_size
    assert data < 0.45 * 14_689_280  # the fp32 demo's weights file; int4 leaves the float embedding only
    assert nanoexport.validate(artifact, write=False).passed
