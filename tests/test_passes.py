"""Passes keep the numbers (checked on ONNX Runtime), and the pass manager catches one that does not."""

import onnx_ir as ir
import pytest

from nanoexport.capture.checkpoint import SUPPORTED_FAMILIES, load_checkpoint
from nanoexport.capture.onnx_export import export_onnx
from nanoexport.errors import NanoexportError
from nanoexport.passes import PASS_NAMES, PASSES, run_passes, select_passes
from nanoexport.passes.fusion import unmerge_projections


@pytest.fixture(scope="module")
def captured(tiny_checkpoint):
    graphs = {}

    def build(family):
        if family not in graphs:
            graphs[family] = export_onnx(load_checkpoint(tiny_checkpoint(family)))
        return graphs[family]

    return build


@pytest.mark.parametrize("family", sorted(SUPPORTED_FAMILIES))
def test_every_pass_keeps_the_logits(family, captured):
    stats = run_passes(captured(family), PASSES, verify=True)
    assert [s.name for s in stats] == PASS_NAMES
    for stat in stats:
        assert stat.logits_change is not None and stat.logits_change <= 1e-4, stat
    assert stats[-1].nodes_after <= stats[0].nodes_before


def test_cleanup_shrinks_the_captured_graph(tiny_checkpoint):
    graph = export_onnx(load_checkpoint(tiny_checkpoint("llama")))
    stats = run_passes(graph, PASSES)
    assert stats[-1].nodes_after < stats[0].nodes_before
    assert not any(node.op_type == "Identity" for node in graph.graph)


def test_unmerge_projections_undoes_the_merge_and_keeps_the_logits(tiny_checkpoint):
    """The inverse targets run when their kernels read no merged projection: a MatMul per projection again."""
    graph = export_onnx(load_checkpoint(tiny_checkpoint("llama")))
    run_passes(graph, PASSES)
    splits = sum(node.op_type == "Split" for node in graph.graph)
    matmuls = sum(node.op_type == "MatMul" for node in graph.graph)
    assert splits == 4  # two layers, each with merged q/k/v and merged gate/up

    stats = run_passes(graph, [unmerge_projections], verify=True)
    assert stats[0].logits_change <= 1e-5
    assert not any(node.op_type == "Split" for node in graph.graph)
    assert sum(node.op_type == "MatMul" for node in graph.graph) == matmuls + 2 * 2 + 2 * 1
    read = {value.name for node in graph.graph for value in node.inputs if value is not None}
    assert set(graph.graph.initializers) <= read  # the merged weights went with the merge


def test_biased_projections_merge_with_their_biases_and_unmerge(tiny_checkpoint):
    """Qwen2's query/key/value biases: one Add of the concatenated biases between the merged MatMul and its Split.

    Unmerged, each projection gets its MatMul and its part of the bias back.
    """
    graph = export_onnx(load_checkpoint(tiny_checkpoint("qwen2")))
    run_passes(graph, PASSES, verify=True)
    splits = [node for node in graph.graph if node.op_type == "Split"]
    biased = [split for split in splits if split.inputs[0].producer().op_type == "Add"]
    assert len(splits) == 4 and len(biased) == 2  # per layer: q/k/v with biases, gate/up without
    for split in biased:
        add = split.inputs[0].producer()
        assert add.inputs[0].producer().op_type == "MatMul" and add.inputs[1].const_value is not None
    adds = sum(node.op_type == "Add" for node in graph.graph)

    stats = run_passes(graph, [unmerge_projections], verify=True)
    assert stats[0].logits_change <= 1e-5
    assert not any(node.op_type == "Split" for node in graph.graph)
    assert sum(node.op_type == "Add" for node in graph.graph) == adds + 2 * 2


def test_adds_of_zeros_go(tiny_checkpoint):
    """A projection's all-zero bias (an untrained initialization) costs no Add, so the projections merge bare."""
    import torch

    from tiny_models import tiny_model

    model = tiny_model("qwen2")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.zero_()
    graph = export_onnx(load_checkpoint(model))
    biases = sum(node.op_type == "Add" and any(v.const_value is not None and v.shape.rank() == 1 for v in node.inputs)
                 for node in graph.graph)
    assert biases == 2 * 3
    run_passes(graph, PASSES, verify=True)
    splits = [node for node in graph.graph if node.op_type == "Split"]
    assert len(splits) == 4 and all(split.inputs[0].producer().op_type == "MatMul" for split in splits)


def scale_first_weight(model: ir.Model) -> None:
    """A broken pass: doubles one weight matrix."""
    initializer = next(v for v in model.graph.initializers.values() if len(v.shape) == 2)
    initializer.const_value = ir.tensor(initializer.const_value.numpy() * 2, name=initializer.name)


def test_verification_names_the_pass_that_moved_the_logits(tiny_checkpoint):
    graph = export_onnx(load_checkpoint(tiny_checkpoint("llama")))
    with pytest.raises(NanoexportError, match="pass scale_first_weight changed the logits"):
        run_passes(graph, [PASSES[0], scale_first_weight, PASSES[1]], verify=True)


def test_select_passes():
    assert [p.__name__ for p in select_passes()] == PASS_NAMES
    skipped = select_passes(skip=["fold_constants"])
    assert [p.__name__ for p in skipped] == [n for n in PASS_NAMES if n != "fold_constants"]
    chosen = select_passes(only=["remove_unused", "strip_metadata"])
    assert [p.__name__ for p in chosen] == ["strip_metadata", "remove_unused"]
    with pytest.raises(NanoexportError, match="unknown pass 'fuse_everything'"):
        select_passes(only=["fuse_everything"])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_attention_reads_the_kv_heads_without_repeating_them(family, captured):
    graph = captured(family)
    run_passes(graph, PASSES, verify=True)
    attentions = [node for node in graph.graph if node.op_type == "Attention"]
    assert len(attentions) == 2
    for node in attentions:
        query, key, value = node.inputs[:3]
        assert key.shape[1] == value.shape[1] == 2 < query.shape[1] == 4
        assert key.producer().op_type == "Concat"  # straight from the cache, no Expand/Reshape copy
    assert not any(node.op_type == "Expand" and node.outputs[0].shape.rank() == 5 for node in graph.graph)


def test_duplicate_initializers_are_merged_within_a_layer_only():
    """Equal weights share one tensor inside a layer; across layers they stay apart, as cuts at layer
    boundaries go by the names (all-ones norms of a random-weight Qwen2 put layer 3 on layer 0's norm, and
    the qnn target could not split the model)."""
    import torch

    from nanoexport.passes.initializers import layer_of
    from tiny_models import tiny_model

    model = tiny_model("qwen2")
    with torch.no_grad():
        layers = model.model.layers
        layers[0].mlp.up_proj.weight.copy_(layers[0].mlp.gate_proj.weight)  # within layer 0: merged
        for name, parameter in layers[1].named_parameters():  # layer 1 = layer 0: kept apart
            parameter.copy_(dict(layers[0].named_parameters())[name])
        for layer in layers:  # untrained norms, the same in every layer
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
    graph = export_onnx(load_checkpoint(model))
    before = len(graph.graph.initializers)
    stats = run_passes(graph, PASSES, verify=True)
    assert stats[0].logits_change <= 1e-6
    merged = [name for name in graph.graph.initializers if "up_proj" in name and layer_of(name) == 0]
    assert merged == [], "layer 0's equal gate and up weights should share one tensor"
    for node in graph.graph:
        named = {layer_of(value.name) for value in node.inputs if value is not None and value.is_initializer()}
        assert len(named - {None}) <= 1, f"{node.name} reads weights of several layers: {named}"
    norms = {layer_of(name) for name in graph.graph.initializers if "layernorm" in name}
    assert norms == set(range(len(layers))), "each layer keeps its own (equal) norm weights"
    assert before > len(graph.graph.initializers)


def test_gpt2_layers_equal_weight_for_weight_keep_their_own_weights():
    """GPT-2 names its layers ``transformer.h.N``: two identical layers still keep a tensor each."""
    import torch

    from nanoexport.passes.initializers import layer_of
    from tiny_models import tiny_model

    model = tiny_model("gpt2")
    blocks = model.transformer.h
    with torch.no_grad():
        for name, parameter in blocks[1].named_parameters():
            parameter.copy_(dict(blocks[0].named_parameters())[name])
    graph = export_onnx(load_checkpoint(model))
    run_passes(graph, PASSES, verify=False)
    layers = {layer_of(name) for name in graph.graph.initializers}
    assert {0, 1} <= layers, f"layer 1's weights were merged into layer 0's: {sorted(layers - {None})}"
    for node in graph.graph:
        named = {layer_of(value.name) for value in node.inputs if value is not None and value.is_initializer()}
        assert len(named - {None}) <= 1, f"{node.name} reads weights of several layers: {named}"


def test_a_duplicate_initializer_that_is_a_graph_output_keeps_its_name():
    import numpy as np

    from nanoexport.passes import merge_duplicate_initializers

    first, second = (ir.val(name, const_value=ir.tensor(np.ones(3, np.float32), name=name)) for name in "ab")
    total = ir.node("Add", [first, second])
    graph = ir.Graph([], [total.outputs[0], second], nodes=[total], initializers=[first, second],
                     opset_imports={"": 23})
    merge_duplicate_initializers(ir.Model(graph, ir_version=10))
    assert [value.name for value in graph.outputs[1:]] == ["b"] and list(graph.initializers) == ["a", "b"]


def test_no_op_casts_are_removed(tiny_checkpoint):
    graph = export_onnx(load_checkpoint(tiny_checkpoint("llama")))
    logits = graph.graph.outputs[0]
    producer = logits.producer()
    cast = ir.node("Cast", [producer.inputs[0]], attributes={"to": ir.DataType.FLOAT})
    cast.outputs[0].dtype = ir.DataType.FLOAT
    graph.graph.insert_before(producer, cast)
    producer.replace_input_with(0, cast.outputs[0])
    run_passes(graph, select_passes(only=["eliminate_no_ops", "eliminate_identity"]), verify=True)
    assert producer.inputs[0].producer() is not cast
    assert cast not in list(graph.graph)


def test_shape_inference_types_every_value(tiny_checkpoint):
    graph = export_onnx(load_checkpoint(tiny_checkpoint("qwen2")))
    run_passes(graph, select_passes(only=["fold_constants", "infer_shapes"]))
    untyped = [v.name for node in graph.graph for v in node.outputs if v.dtype is None or v.shape is None]
    assert untyped == []


# Per family: ops that must be gone after fusion (their unfused spelling) and canonical op counts per layer.
UNFUSED = {"Softmax", "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Neg", "Erf", "Sigmoid"}
GELU_FAMILIES = {"gpt2", "gemma2"}  # the others gate their MLP with SiLU


@pytest.mark.parametrize("family", sorted(SUPPORTED_FAMILIES))
def test_no_unfused_attention_norm_or_rope_remains(family, captured):
    graph = captured(family)
    run_passes(graph, PASSES, verify=True)
    ops = [node.op_type for node in graph.graph]
    layers = 2
    assert not UNFUSED & set(ops), UNFUSED & set(ops)
    assert ops.count("Attention") == layers
    norms = "LayerNormalization" if family == "gpt2" else "RMSNormalization"
    per_layer_norms = {"qwen3": 4, "gemma2": 4}.get(family, 2)  # q/k norms; Gemma 2's sandwich norms
    assert ops.count(norms) == per_layer_norms * layers + 1
    assert ops.count("RotaryEmbedding") == (0 if family == "gpt2" else 2 * layers)
    assert ops.count("Swish" if family not in GELU_FAMILIES else "Gelu") == layers
    # qkv, o, gate+up (GPT-2: c_fc), down per layer; the LM head. GPT-2's Conv1D Gemms become MatMuls too.
    assert ops.count("MatMul") == 4 * layers + 1 and "Gemm" not in ops
    for node in graph.graph:
        if node.op_type == "Attention":
            assert node.inputs[1].producer().op_type == "Concat"  # the KV heads, straight from the cache


def test_no_unfused_subgraph_remains_in_the_demo_model():
    from nanoexport.capture.checkpoint import DEMO_MODEL

    checkpoint = load_checkpoint(DEMO_MODEL)
    graph = export_onnx(checkpoint)
    run_passes(graph, PASSES, verify=True)
    ops = [node.op_type for node in graph.graph]
    layers = checkpoint.config.num_hidden_layers
    assert not UNFUSED & set(ops)
    assert (ops.count("Attention"), ops.count("RMSNormalization"), ops.count("RotaryEmbedding"),
            ops.count("Swish")) == (layers, 2 * layers + 1, 2 * layers, layers)
    assert ops.count("MatMul") == 4 * layers + 1


@pytest.mark.parametrize("bias,trans_b,fused", [(True, 0, True), (False, 0, True), (True, 1, False)])
def test_a_linear_gemm_becomes_matmul_and_add(bias, trans_b, fused):
    """GPT-2's Conv1D: ``Gemm(x, W[K, N], b)`` -> ``MatMul + Add``, same outputs on ONNX Runtime; a Gemm whose
    weight is transposed is left alone (the canonical weight is ``[K, N]``)."""
    import numpy as np

    from nanoexport.passes.fusion import fuse
    from nanoexport.runtime import cpu_session

    rng = np.random.default_rng(0)
    x = ir.Value(name="x", shape=ir.Shape([3, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    def constant(name: str, shape: tuple[int, ...]) -> ir.Value:
        return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT),
                        const_value=ir.tensor(rng.standard_normal(shape).astype(np.float32)))

    operands = [x, constant("w", (6, 8) if trans_b else (8, 6))] + ([constant("b", (6,))] if bias else [])
    gemm = ir.node("Gemm", operands, {"transB": trans_b})
    gemm.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], gemm.outputs, nodes=[gemm], initializers=operands[1:], opset_imports={"": 23}),
                     ir_version=10)
    feeds = {"x": rng.standard_normal((3, 8)).astype(np.float32)}
    before = cpu_session(model).run(None, feeds)[0]
    fuse(model)
    ops = [node.op_type for node in model.graph]
    assert ops == ((["MatMul", "Add"] if bias else ["MatMul"]) if fused else ["Gemm"])
    np.testing.assert_allclose(cpu_session(model).run(None, feeds)[0], before, rtol=1e-6, atol=1e-6)
