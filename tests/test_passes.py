"""Passes keep the numbers (checked on ONNX Runtime), and the pass manager catches one that does not."""

import onnx_ir as ir
import pytest

from nanoexport.capture.checkpoint import SUPPORTED_FAMILIES, load_checkpoint
from nanoexport.capture.onnx_export import export_onnx
from nanoexport.errors import NanoexportError
from nanoexport.passes import PASS_NAMES, PASSES, run_passes, select_passes


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
    assert [p.__name__ for p in select_passes(skip=["fold_constants"])] == [n for n in PASS_NAMES if n != "fold_constants"]
    assert [p.__name__ for p in select_passes(only=["remove_unused", "strip_metadata"])] == ["strip_metadata", "remove_unused"]
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
