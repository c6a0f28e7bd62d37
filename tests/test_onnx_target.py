"""The onnx target lowers canonical ops to ONNX Runtime's fused kernels and still matches PyTorch."""

import json
from collections import Counter

import onnx
import pytest

import nanoexport
from nanoexport.errors import NanoexportError
from nanoexport.targets.onnx import kernels


def load_graph(artifact) -> onnx.GraphProto:
    return onnx.load(str(artifact.path / "model.onnx"), load_external_data=False).graph


@pytest.mark.parametrize("family, fused", [("llama", 4), ("qwen3", 4), ("gemma2", 4), ("gpt2", 0)])
def test_residual_adds_fuse_into_skip_rms_norm(family, fused, tiny_checkpoint, tmp_path):
    """Each RMSNorm that follows a residual Add becomes one kernel: 2 per layer (none in GPT-2, a LayerNorm).

    Each layer's attention becomes one GroupQueryAttention, with or without rotary, Qwen3's per-head norms
    and Gemma 2's soft cap and sliding window. A norm names only the outputs something reads: ONNX Runtime
    computes every named one.
    """
    artifact = nanoexport.export(tiny_checkpoint(family), out=tmp_path / family, progress=False)
    graph = load_graph(artifact)
    ops = Counter((node.domain or "ai.onnx", node.op_type) for node in graph.node)
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == fused
    read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    norm_outputs = [name for node in graph.node if node.op_type == "SkipSimplifiedLayerNormalization"
                    for name in node.output if name]
    assert set(norm_outputs) <= read
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
    # ONNX Runtime inlines Swish as four nodes and runs a Split as copies: QuickGelu, and a MatMul per part.
    ops = Counter(node.op_type for node in graph.node)
    assert ops["QuickGelu"] == 4 and not ops["Swish"] and not ops["Split"]
    genai_config = json.loads((demo_artifact.path / "genai_config.json").read_text())
    assert genai_config["search"]["past_present_share_buffer"]
    assert nanoexport.validate(demo_artifact).passed


@pytest.mark.parametrize("weights, asymmetric, keep_float, dynamic_int8",
                         [("int4", False, ["lm_head"], False), ("int4", False, [], True), ("uint4", True, [], True)])
def test_four_bit_weights_lower_to_ort_kernels(weights, asymmetric, keep_float, dynamic_int8, tmp_path):
    """Each canonical DequantizeLinear -> MatMul becomes one MatMulNBits over the same integers and scales.

    A quantized tied head reads the embedding's integers: the head as MatMulNBits (the [vocab, hidden]
    layout is the kernel's own, no Transpose), the lookup as GatherBlockQuantized, which for symmetric
    weights reads the head's very bytes and scales; no DequantizeLinear is left to expand a whole table per
    call. Merged projections are split back into a kernel per part (ONNX Runtime's Split copies), except
    query/key/value, which GroupQueryAttention reads packed. ``dynamic_int8`` sets the kernels'
    accuracy_level.
    """
    config = nanoexport.ExportConfig()
    config.quant.weights, config.quant.asymmetric = weights, asymmetric
    config.quant.keep_float, config.quant.dynamic_int8 = keep_float, dynamic_int8
    artifact = nanoexport.export(out=tmp_path / weights, config=config, progress=False)
    graph = load_graph(artifact)
    ops = Counter((node.domain or "ai.onnx", node.op_type) for node in graph.node)
    head_quantized = not keep_float
    layers, kernels_per_layer = 4, 5  # packed q/k/v, o, gate, up, down
    assert ops[("com.microsoft", "MatMulNBits")] == layers * kernels_per_layer + head_quantized
    assert ops[("ai.onnx", "Split")] == 0
    assert ops[("com.microsoft", "GatherBlockQuantized")] == head_quantized
    assert ops[("ai.onnx", "DequantizeLinear")] == 0
    assert ops[("ai.onnx", "Transpose")] == (0 if head_quantized else 1)  # a float head transposes the table
    levels = {attribute.i for node in graph.node if node.op_type == "MatMulNBits"
              for attribute in node.attribute if attribute.name == "accuracy_level"}
    assert levels == {4 if dynamic_int8 else 0}
    data = artifact.file("model.onnx.data").stat().st_size
    fp32_demo_weights = 14_689_280
    # A float embedding alone is 4.2 of the 14.7 MB; as 4-bit blocks of 32 with float32 scales, 0.66 MB.
    assert data < (0.25 if head_quantized else 0.45) * fp32_demo_weights
    if head_quantized and not asymmetric:
        producers = {output: node for node in graph.node for output in node.output}
        lookup = next(node for node in graph.node if node.op_type == "GatherBlockQuantized")
        head = producers["logits"]
        assert head.op_type == "MatMulNBits"
        assert producers[lookup.input[0]].op_type == "Reshape"
        assert producers[lookup.input[0]].input[0] == head.input[1] and lookup.input[2] == head.input[2]
        # 4.5 bits per weight plus the rotary caches; a second copy of the table would make it 0.21.
        assert data < 0.18 * fp32_demo_weights
    assert nanoexport.validate(artifact, write=False).passed


@pytest.mark.parametrize("asymmetric, scale_dtype", [(False, "fp32"), (True, "fp32"), (False, "fp16")])
def test_an_eight_bit_head_lowers_to_eight_bit_kernels(asymmetric, scale_dtype, tmp_path):
    """An int8 head (an override beside int4 layers) runs as an 8-bit MatMulNBits, and the tied lookup as an
    8-bit GatherBlockQuantized: one byte a weight rather than the four of a float head ONNX Runtime expands
    at load. With fp32 scales the kernels compute what the canonical DequantizeLinear graph computes (the
    verified pass); with fp16 ones the canonical graph rounds each weight to fp16 and the kernels do not,
    which verification allows for. The bytes the kernels read are the canonical integers (the manifest's
    digests; signed integers with zero points are stored shifted, and read back as they were)."""
    from nanoexport.targets import QUANTIZED_WEIGHTS_TOLERANCE

    config = nanoexport.ExportConfig(verify_passes=True)
    config.quant.weights, config.quant.asymmetric, config.quant.scale_dtype = "int4", asymmetric, scale_dtype
    config.quant.dynamic_int8 = False  # int8 activations would move the logits: the kernels alone are compared
    config.quant.overrides = {"lm_head": "int8"}
    artifact = nanoexport.export(out=tmp_path / "head8", config=config, progress=False)
    graph = load_graph(artifact)
    bits = Counter((node.op_type, attribute.i) for node in graph.node for attribute in node.attribute
                   if attribute.name == "bits")
    assert bits == {("MatMulNBits", 4): 4 * 5, ("MatMulNBits", 8): 1, ("GatherBlockQuantized", 8): 1}
    assert not [node for node in graph.node if node.op_type == "DequantizeLinear"]
    changes = {stat["name"]: stat["logits_change"]
               for stat in json.loads((artifact.path / "build.json").read_text())["target_passes"]}
    assert changes["ort_kernels"] <= (1e-4 if scale_dtype == "fp32" else QUANTIZED_WEIGHTS_TOLERANCE)
    digests = artifact.manifest["weight_digests"]
    assert "model.lm_head.weight" in digests["stored"]["layers"]
    assert digests["stored"]["layers"] == digests["canonical"]["layers"] and digests["stored"]["equals_canonical"]
    head = next(node for node in graph.node if node.op_type == "MatMulNBits" and node.output[0] == "logits")
    vocab, hidden, block = 4096, 256, 32
    stored = next(tensor for tensor in graph.initializer if tensor.name == head.input[1])
    assert list(stored.dims) == [vocab, hidden // block, block]  # a byte a weight
    assert nanoexport.validate(artifact, write=False).passed


def test_unpadded_batches_compute_no_padding_bias(demo_artifact, tmp_path):
    """``padded_batches`` off: every attention_mask entry is 1 by contract, genai's, so no per-call bias.

    On input that keeps the contract (an unpadded batch of two, prompt then one decode step) the logits are
    the default artifact's.
    """
    import numpy as np

    from nanoexport.targets.onnx.runtime import Runner

    config = nanoexport.ExportConfig()
    config.options["onnx"].padded_batches = False
    artifact = nanoexport.export(out=tmp_path / "unpadded", config=config, progress=False)
    assert artifact.manifest["config"]["onnx"]["padded_batches"] is False

    def biases(graph: onnx.GraphProto) -> list[str]:
        return [node.input[10] if len(node.input) > 10 else "" for node in graph.node
                if node.op_type == "GroupQueryAttention"]

    assert all(biases(load_graph(demo_artifact))) and not any(biases(load_graph(artifact)))
    assert "Where" not in {node.op_type for node in load_graph(artifact).node}

    kv = artifact.manifest["io"]["kv_cache"]
    ids = np.random.default_rng(2).integers(3, kv["vocab_size"], (2, 8))
    empty = np.zeros((2, kv["kv_heads"], 0, kv["head_dim"]), np.float32)
    feeds = {"input_ids": ids[:, :7], "attention_mask": np.ones((2, 7), np.int64),
             "position_ids": np.tile(np.arange(7), (2, 1)),
             **{f"past_key_values.{layer}.{part}": empty for layer in range(kv["num_layers"])
                for part in ("key", "value")}}
    logits = []
    for runner in (Runner(demo_artifact), Runner(artifact)):
        prefill = runner.forward(feeds)
        step = runner.forward({"input_ids": ids[:, 7:], "attention_mask": np.ones((2, 8), np.int64),
                               "position_ids": np.full((2, 1), 7),
                               **{name.replace("present.", "past_key_values."): value
                                  for name, value in prefill.items() if name.startswith("present.")}})
        logits.append(np.concatenate([prefill["logits"], step["logits"]], axis=1))
    assert np.abs(logits[0] - logits[1]).max() <= 1e-5
    assert nanoexport.validate(artifact, write=False).passed


def test_verified_export_records_the_target_passes(demo_artifact):
    """``verify_passes`` checks the onnx target's passes as the canonical ones: each logs its logits change."""
    build_log = json.loads((demo_artifact.path / "build.json").read_text())
    changes = {stat["name"]: stat["logits_change"] for stat in build_log["target_passes"]}
    assert list(changes) == ["group_query_attention", "unmerge_projections", "ort_kernels"]
    assert all(change is not None and change <= 1e-4 for change in changes.values()), changes


class SkipRMSNormWithoutSkip(kernels.SkipRMSNorm):
    """A broken rule: the fused kernel is given zeros for the skip addend, so the residual is lost."""

    def rewrite(self, op, x, skip, weight, normalized, **_):
        return super().rewrite(op, x, op.Sub(skip, skip), weight, normalized)


def test_verification_stops_a_broken_target_rule(tiny_checkpoint, tmp_path, monkeypatch):
    """A target rule that moves the logits stops a verified export, naming the target pass that ran it."""
    monkeypatch.setattr(kernels, "SkipRMSNorm", SkipRMSNormWithoutSkip)
    config = nanoexport.ExportConfig(verify_passes=True)
    with pytest.raises(NanoexportError, match="pass ort_kernels changed the logits"):
        nanoexport.export(tiny_checkpoint("llama"), out=tmp_path / "broken", config=config, progress=False)


@pytest.mark.parametrize("quantized", [False, True])
def test_an_untied_embedding_table_is_quantized_only_when_asked(quantized, tmp_path):
    """A table of its own (an untied head) stays float by default, like the head; asked for (here alone, the
    layers kept float), it is stored as 4-bit blocks along the hidden size and looked up by
    GatherBlockQuantized, computing what PyTorch computes with the dequantized table."""
    import torch
    from tiny_models import save_tiny_checkpoint, tiny_model

    from nanoexport.calibration.blocks import WeightFormat, rtn

    checkpoint = save_tiny_checkpoint("llama", tmp_path / "llama")
    config = nanoexport.ExportConfig()
    config.quant.weights = "int4"
    if quantized:
        config.quant.keep_float = ["lm_head", "model.layers.*"]
    artifact = nanoexport.export(checkpoint, out=tmp_path / "out", config=config, progress=False)
    ops = Counter(node.op_type for node in load_graph(artifact).node)
    assert artifact.manifest["quantization"]["layers"]["model.embed_tokens"] == ("int4" if quantized else "fp16")
    assert ops["GatherBlockQuantized"] == quantized and ops["Gather"] == (not quantized)
    assert ops["MatMulNBits"] == (0 if quantized else 2 * 5) and ops["DequantizeLinear"] == 0
    if not quantized:
        return
    reference = tiny_model("llama")
    table = reference.model.embed_tokens.weight
    dequantized = rtn(table.detach().numpy().T, WeightFormat("int4", 32)).dequantize().T
    with torch.no_grad():
        table.copy_(torch.from_numpy(dequantized))
    report = nanoexport.validate(artifact, reference=reference, write=False)
    cosine = next(check.value for check in report.checks if check.name == "logits min cosine")
    assert report.passed and cosine > 0.99999
