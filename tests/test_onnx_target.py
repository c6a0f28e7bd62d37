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


@pytest.mark.parametrize("weights, asymmetric, keep_float, dynamic_int8",
                         [("int4", False, ["lm_head"], False), ("uint4", True, [], True)])
def test_four_bit_weights_lower_to_ort_kernels(weights, asymmetric, keep_float, dynamic_int8, tmp_path):
    """Each canonical DequantizeLinear -> MatMul becomes one MatMulNBits over the same integers and scales.

    A quantized tied head reads the embedding's integers: the head as MatMulNBits (the [vocab, hidden]
    layout is the kernel's own, no Transpose), the lookup as GatherBlockQuantized; no DequantizeLinear is
    left to expand a whole table per call. ``dynamic_int8`` sets the kernels' accuracy_level.
    """
    config = nanoexport.ExportConfig()
    config.quant.weights, config.quant.asymmetric = weights, asymmetric
    config.quant.keep_float, config.quant.dynamic_int8 = keep_float, dynamic_int8
    artifact = nanoexport.export(out=tmp_path / weights, config=config, progress=False)
    graph = load_graph(artifact)
    ops = Counter((node.domain or "ai.onnx", node.op_type) for node in graph.node)
    head_quantized = not keep_float
    assert ops[("com.microsoft", "MatMulNBits")] == 16 + head_quantized
    assert ops[("com.microsoft", "GatherBlockQuantized")] == head_quantized
    assert ops[("ai.onnx", "DequantizeLinear")] == 0
    assert ops[("ai.onnx", "Transpose")] == (0 if head_quantized else 1)  # a float head transposes the table
    levels = {attribute.i for node in graph.node if node.op_type == "MatMulNBits"
              for attribute in node.attribute if attribute.name == "accuracy_level"}
    assert levels == {4 if dynamic_int8 else 0}
    data = artifact.file("model.onnx.data").stat().st_size
    fp32_demo_weights = 14_689_280
    # A float embedding alone is 4.2 of the 14.7 MB. A quantized head keeps the table's 4-bit integers
    # twice (as each kernel lays them out), their scales and the float norms.
    assert data < (0.25 if head_quantized else 0.45) * fp32_demo_weights
    assert nanoexport.validate(artifact, write=False).passed
