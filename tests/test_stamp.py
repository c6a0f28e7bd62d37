"""A deep decoder captured from three traced layers equals its full trace: same graph interface, same ops,
the same logits and caches on ONNX Runtime."""

import collections

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from tiny_models import TINY_CONFIGS
from transformers import AutoConfig, AutoModelForCausalLM

import nanoexport.capture.onnx_export as onnx_export
from nanoexport.capture.checkpoint import load_checkpoint
from nanoexport.capture.stamp import LayersDiffer, stampable

LAYERS = 5  # three traced, two stamped


def _deep_checkpoint(family: str, folder):
    settings = dict(TINY_CONFIGS[family], **{"n_layer" if family == "gpt2" else "num_hidden_layers": LAYERS})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **settings)).save_pretrained(folder)
    return load_checkpoint(folder, lazy=True)


def _weight_names(model: ir.Model) -> list[str]:
    """The initializers named for a module's parameter (the wrapper's ``model.`` prefix); folded constants are
    named for the values they were made from."""
    return sorted(name for name in model.graph.initializers if name.startswith("model."))


def _outputs(model: ir.Model) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString())
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.array([[3, 5, 7]]), "attention_mask": np.ones((1, 5), np.int64),
             "position_ids": np.array([[2, 3, 4]])}
    for cache in session.get_inputs()[3:]:
        feeds[cache.name] = rng.standard_normal((1, cache.shape[1], 2, cache.shape[3]), dtype=np.float32)
    return session.run(None, feeds)


@pytest.mark.parametrize("family", ["qwen2", "phi3", "gpt2"])  # biases; packed projections; transformer.h.N
def test_stamped_layers_equal_the_full_trace(family, tmp_path):
    checkpoint = _deep_checkpoint(family, tmp_path)
    assert stampable(checkpoint.config)
    stamped, full = onnx_export.export_onnx(checkpoint), onnx_export.export_onnx(checkpoint, trace_all_layers=True)
    assert [v.name for v in stamped.graph.inputs] == [v.name for v in full.graph.inputs]
    assert [v.name for v in stamped.graph.outputs] == [v.name for v in full.graph.outputs]
    assert len(stamped.graph.initializers) == len(full.graph.initializers)
    assert _weight_names(stamped) == _weight_names(full)
    assert collections.Counter(n.op_type for n in stamped.graph) == collections.Counter(n.op_type for n in full.graph)
    for expected, actual in zip(_outputs(full), _outputs(stamped), strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_layers_of_two_attention_types_are_traced_in_full():
    config = AutoConfig.for_model("gemma2", **dict(TINY_CONFIGS["gemma2"], num_hidden_layers=LAYERS))
    assert len(set(config.layer_types)) == 2 and not stampable(config)


def test_layers_that_do_not_pair_fall_back_to_a_full_trace(tmp_path, monkeypatch, caplog):
    checkpoint = _deep_checkpoint("llama", tmp_path)

    def refuse(model, num_layers):
        raise LayersDiffer("the traced decoder layers differ op for op")

    monkeypatch.setattr(onnx_export, "stamp_layers", refuse)
    model = onnx_export.export_onnx(checkpoint)
    assert len(model.graph.inputs) == 3 + 2 * LAYERS
    assert "tracing all 5 layers" in caplog.text
