"""Optimum ONNX folders of each family we capture export as our own capture of the same checkpoint does.

The fixtures (tests/fixtures/optimum-<family>, made by make_optimum_fixture.py in Optimum's own environment)
are tiny random-weight checkpoints beside the ``model.onnx`` that ``optimum-cli export onnx --task
text-generation-with-past`` wrote: Llama; Qwen2 with query/key/value biases and a head tied to its embedding;
Phi-3 with its fused qkv_proj and gate_up_proj; GPT-2 with Conv1D projections, tanh GELU and a tied head.
Per family: the fused canonical graph has the ops of our torch capture, int4 gives its integers, and the
artifacts validate against PyTorch. The rules written for Optimum's forms are each checked on ONNX Runtime.
"""

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnxscript.rewriter import pattern

import nanoexport
from nanoexport.capture.checkpoint import load_checkpoint
from nanoexport.capture.onnx_export import export_onnx
from nanoexport.capture.optimum import import_optimum_onnx
from nanoexport.passes import PASSES, fold_constants, remove_unused, run_passes
from nanoexport.passes.initializers import layer_of
from nanoexport.passes.torchscript import StaticSliceOfShape, TiedHead
from nanoexport.passes.verify import GraphRunner
from nanoexport.runtime import cpu_session

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("llama", "qwen2", "phi3", "gpt2")
# The ops that carry a decoder's math once fused: the canonical ops, the projections (Phi-3's fused ones cut by
# Slice and Split), GPT-2's norms and GELU. What is left of Optimum's shape arithmetic and mask is not counted.
FUSED_OPS = ("RMSNormalization", "LayerNormalization", "RotaryEmbedding", "Attention", "Swish", "Gelu", "MatMul",
             "Gemm", "Split", "Slice", "Transpose")
# What a fusion replaces; none of it may be left.
DECOMPOSED_OPS = ("Softmax", "Pow", "Sqrt", "Sigmoid", "Tanh", "IsNaN", "ReduceMean")
# Per family, its canonical ops: two layers' norms and the final one, query and key rotations, attention on the
# shared KV head, the SwiGLU gate (GPT-2: its tanh GELU).
SWIGLU_DECODER = {"RMSNormalization": 5, "RotaryEmbedding": 4, "Attention": 2, "Swish": 2}
CANONICAL_OPS = {"llama": SWIGLU_DECODER, "qwen2": SWIGLU_DECODER, "phi3": SWIGLU_DECODER,
                 "gpt2": {"LayerNormalization": 5, "Attention": 2, "Gelu": 2}}
# Small validation runs, as the target tests have: tiny models, few windows, short generations.
SMALL_VALIDATION = dict(greedy_tokens=8, eval_window=32, eval_windows=2)
# A target besides onnx per family, so that each lowering meets each family's Optimum graph in the tests.
OTHER_TARGET = {"llama": "openvino", "qwen2": "coreml", "phi3": "openvino", "gpt2": "tvm"}


def small_config(weights: str = "none") -> nanoexport.ExportConfig:
    config = nanoexport.ExportConfig(max_context=64, prefill_chunk=16)
    config.quant.weights = weights
    for name, value in SMALL_VALIDATION.items():
        setattr(config.validate, name, value)
    return config


def torch_capture_folder(family: str, folder: Path) -> Path:
    """The fixture's checkpoint without Optimum's ONNX file: what our own capture exports."""
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / f"optimum-{family}" / name, folder / name)
    return folder


def fused_ops(graph: ir.Model) -> Counter:
    run_passes(graph, PASSES, verify=True)
    return Counter(node.op_type for node in graph.graph if node.op_type in FUSED_OPS + DECOMPOSED_OPS)


@pytest.mark.parametrize("family", FAMILIES)
def test_optimum_graph_fuses_to_the_ops_of_our_capture(family):
    fixture = FIXTURES / f"optimum-{family}"
    checkpoint = load_checkpoint(fixture, lazy=True)
    optimum = import_optimum_onnx(fixture / "model.onnx", checkpoint.config)
    # The import keeps Optimum's numbers: its graph and ours give the same logits on ONNX Runtime.
    original = ir.serde.deserialize_model(onnx.load(fixture / "model.onnx"))
    runner = GraphRunner(optimum)
    np.testing.assert_allclose(runner.logits(optimum), runner.logits(original), atol=1e-5)
    ops = fused_ops(optimum)
    assert ops == fused_ops(export_onnx(checkpoint))
    assert {op: count for op, count in ops.items() if op in CANONICAL_OPS["gpt2"] | SWIGLU_DECODER} \
        == CANONICAL_OPS[family]
    assert not any(ops[op] for op in DECOMPOSED_OPS), ops


@pytest.mark.parametrize("family", FAMILIES)
def test_optimum_int4_quantizes_as_our_capture_does(family, tmp_path):
    """The same integers from either capture, the tied heads and embedding tables quantized too (untied, a
    tied table would be two layers), and the same validation figures (a random model's int4 logits are far
    from its float ones, so the figures are compared, not held to the thresholds)."""
    config = small_config("int4")
    config.quant.keep_float = []
    sources = {"optimum": FIXTURES / f"optimum-{family}", "torch": torch_capture_folder(family, tmp_path / "torch")}
    digests, figures = {}, {}
    for name, source in sources.items():
        artifact = nanoexport.export(source, target="onnx", out=tmp_path / f"{name}-onnx", config=config,
                                     progress=False)
        digests[name] = artifact.manifest["weight_digests"]["canonical"]
        figures[name] = {check.name: check.value for check in nanoexport.validate(artifact, write=False).checks}
    assert digests["optimum"]["digest"] == digests["torch"]["digest"]
    # Projections by digest; embedding tables by count: the torch capture's names carry its wrapper's prefix
    # (GPT-2's), and a tied table the head's name.
    layers = {name: capture["layers"] for name, capture in digests.items()}
    projections = {name: {layer: digest for layer, digest in found.items() if layer_of(layer) is not None}
                   for name, found in layers.items()}
    # By digest: GPT-2's names differ by the torch capture's wrapper prefix, as its tables' do.
    assert sorted(projections["optimum"].values()) == sorted(projections["torch"].values())
    assert len(projections["torch"]) >= 2 * 4  # every decoder projection (GPT-2's Conv1D Gemms too), both layers
    assert len(layers["optimum"]) == len(layers["torch"])
    for name, value in figures["torch"].items():
        assert figures["optimum"][name] == pytest.approx(value, abs=1e-4), name


@pytest.mark.parametrize("family", FAMILIES)
def test_optimum_folder_exports_and_validates_against_pytorch(family, tmp_path):
    fixture = FIXTURES / f"optimum-{family}"
    for target in ("onnx", OTHER_TARGET[family]):
        artifact = nanoexport.export(fixture, target=target, out=tmp_path / target, config=small_config(),
                                     progress=False)
        report = nanoexport.validate(artifact, write=False)
        assert report.reference == "PyTorch fp32"
        assert report.passed, (target, [check for check in report.checks if not check.passed])


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return cpu_session(model, optimize=False).run(None, feeds)


def _model(nodes: list, inputs: list, outputs: list, initializers: list) -> ir.Model:
    graph = helper.make_graph(nodes, "rule", inputs, outputs, initializer=initializers)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def gpt2_scaled_query(kept: tuple[int, int]) -> ir.Model:
    """GPT-2's query scaled by ``sqrt(1 / sqrt(Shape(q)[kept[0]:kept[1]]))``, as Optimum writes it."""
    constants = [helper.make_tensor("start", TensorProto.INT64, [1], [kept[0]]),
                 helper.make_tensor("end", TensorProto.INT64, [1], [kept[1]]),
                 helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])]
    nodes = [
        helper.make_node("Shape", ["q"], ["shape"]),
        helper.make_node("Slice", ["shape", "start", "end"], ["width"]),
        helper.make_node("Cast", ["width"], ["width_float"], to=TensorProto.FLOAT),
        helper.make_node("Sqrt", ["width_float"], ["root"]),
        helper.make_node("Div", ["one", "root"], ["inverse"]),
        helper.make_node("Sqrt", ["inverse"], ["scale"]),
        helper.make_node("Mul", ["q", "scale"], ["y"]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", 2, "seq", 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, "seq", 16])], constants)


@pytest.mark.parametrize("kept, folds", [((-1, 2**63 - 1), True), ((1, 2), True), ((0, 1), False), ((2, 3), False)])
def test_a_slice_of_a_shape_folds_where_its_sizes_are_static(kept, folds):
    model = gpt2_scaled_query(kept)
    feeds = {"q": np.random.default_rng(0).standard_normal((1, 2, 3, 16), dtype=np.float32)}
    before = _run(model, feeds)
    count = pattern.RewriteRuleSet([StaticSliceOfShape.rule()]).apply_to_model(model)
    fold_constants(model)
    assert count == int(folds)
    assert ("Shape" in Counter(node.op_type for node in model.graph)) != folds
    np.testing.assert_allclose(_run(model, feeds)[0], before[0], rtol=1e-6)


def tied_head_model(head_matches: bool) -> ir.Model:
    """An embedding lookup and an output head whose weight is the table transposed (or, not quite)."""
    table = np.random.default_rng(0).standard_normal((12, 4), dtype=np.float32)
    head = table.T.copy() if head_matches else table.T + np.float32(1e-3)
    nodes = [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["hidden"]),
             helper.make_node("MatMul", ["hidden", "lm_head.weight.T"], ["logits"])]
    return _model(nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 12])],
                  [onnx.numpy_helper.from_array(table, "embed_tokens.weight"),
                   onnx.numpy_helper.from_array(head, "lm_head.weight.T")])


@pytest.mark.parametrize("head_matches", [True, False])
def test_a_head_equal_to_the_transposed_table_reads_the_table(head_matches):
    model = tied_head_model(head_matches)
    feeds = {"input_ids": np.array([[0, 5, 11, 3]], np.int64)}
    before = _run(model, feeds)
    table = model.graph.initializers["embed_tokens.weight"]
    count = pattern.RewriteRuleSet([TiedHead.rule(table)]).apply_to_model(model)
    remove_unused(model)
    assert count == int(head_matches)
    assert sorted(model.graph.initializers) == (["embed_tokens.weight"] if head_matches
                                                else ["embed_tokens.weight", "lm_head.weight.T"])
    if head_matches:  # named as the torch capture names the tied head, for quantization plans and digests
        weight = next(node for node in model.graph if node.op_type == "MatMul").inputs[1]
        assert weight.name == "lm_head.weight.T" and weight.producer().op_type == "Transpose"
    np.testing.assert_array_equal(_run(model, feeds)[0], before[0])
