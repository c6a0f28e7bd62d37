"""Activation observers run layer by layer (one segment's session at a time) see what one session on the
whole graph sees: the same ranges, bit for bit, for calibration's observers and the qnn lowering's."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest

from nanoexport.calibration import layerwise, qdq, quantize
from nanoexport.capture.checkpoint import DEMO_MODEL, load_checkpoint
from nanoexport.capture.onnx_export import export_onnx
from nanoexport.config import ExportConfig, QuantConfig
from nanoexport.passes import PASSES, run_passes, static_kv_cache_pass
from nanoexport.passes.kv_cache import specialize
from nanoexport.targets import Build
from nanoexport.targets.qnn import activations, rewrites
from nanoexport.targets.qnn.weights import weights_for_htp

EXCLUDE = QuantConfig().activation_exclude
CAPACITY, CHUNK = 32, 8


def _windows(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 320, (3, length))


def _w4(checkpoint) -> ir.Model:
    """A checkpoint's canonical graph with int4 weights (as activation calibration sees it)."""
    model = export_onnx(load_checkpoint(checkpoint))
    run_passes(model, PASSES)
    quantize(model, QuantConfig(weights="int4"), {}, None)
    return model


# The demo model, not a tiny random one: random checkpoints' norm weights are all ones, shared as one
# initializer whose name no longer tells the layers apart, so their cuts are not one per layer.
@pytest.fixture(scope="module")
def canonical() -> ir.Model:
    return _w4(DEMO_MODEL)


@pytest.fixture(scope="module")
def prefill(tmp_path_factory) -> ir.Model:
    """The W4A16 prefill graph as the qnn lowering observes its weight outputs: activation Q/DQ pairs in,
    static cache, HTP weights and rewrites."""
    model = _w4(DEMO_MODEL)
    ranges = qdq.observe(model, qdq.activation_inputs(model, EXCLUDE), _windows(24, 0), "minmax", 0)
    qdq.insert_qdq(model, ranges, "a16", EXCLUDE)
    run_passes(model, [static_kv_cache_pass(CAPACITY, [None] * 4, circular=False)])
    weights_for_htp(model)
    specialize(model, CHUNK)
    build = Build(ExportConfig(), None, None, tmp_path_factory.mktemp("prefill"), verify=False)
    build.run_passes(model, rewrites.htp_graph_passes(CAPACITY), graph="prefill")
    return model


def _refuse_cuts(monkeypatch) -> None:
    def refuse(model):
        raise layerwise.NotLayered("refused by the test")

    monkeypatch.setattr(layerwise, "residual_cuts", refuse)


def test_values_in_the_prelude_every_layer_and_the_head_are_placed(canonical):
    """The demo's observed values lie in the prelude, its 4 layers and the head: all are covered, and a segment
    reads nothing kept from earlier sessions but its residual stream."""
    values = qdq.activation_inputs(canonical, EXCLUDE)
    stages = layerwise.observation_stages(canonical, values)
    assert len(stages) == 6 and all(stage.observed for stage in stages)
    assert sorted(value.name for stage in stages for value in stage.observed) == sorted(v.name for v in values)
    graph_inputs = set(canonical.graph.inputs)
    for stage in stages[1:]:
        assert {value for value in stage.inputs if value not in graph_inputs} == {stage.start}


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_layerwise_activation_ranges_equal_the_whole_graphs(canonical, monkeypatch, observer):
    values = qdq.activation_inputs(canonical, EXCLUDE)
    windows = _windows(24, 1)
    layered = qdq.observe(canonical, values, windows, observer, 7)
    _refuse_cuts(monkeypatch)
    whole = qdq.observe(canonical, values, windows, observer, 7)
    assert len(whole) == len(values) and layered == whole


def test_layerwise_weight_output_ranges_equal_the_whole_graphs(prefill, monkeypatch):
    """On the prefill graph with its Q/DQ pairs, run as QDQ_AS_FLOAT says, in every session."""
    windows = _windows(CHUNK, 2)
    configs = []
    real_session = layerwise.cpu_session
    monkeypatch.setattr(layerwise, "cpu_session", lambda model, **kwargs: (
        configs.append(kwargs.get("session_config")), real_session(model, **kwargs))[1])
    layered = activations.observe_weight_outputs(prefill, windows)
    assert len(configs) > 2 and all(config == activations.QDQ_AS_FLOAT for config in configs)
    _refuse_cuts(monkeypatch)
    whole = activations.observe_weight_outputs(prefill, windows)
    assert whole and layered == whole


def test_each_session_holds_one_segments_weights(canonical, monkeypatch):
    """No session but the whole graph's fallback reads more than one layer's weights."""
    sessions = []
    real_session = layerwise.cpu_session
    monkeypatch.setattr(layerwise, "cpu_session", lambda model, **kwargs: (
        sessions.append({name for name in model.graph.initializers if ".layers." in name}),
        real_session(model, **kwargs))[1])
    qdq.observe(canonical, qdq.activation_inputs(canonical, EXCLUDE), _windows(24, 3), "minmax", 0)
    layers = [{name.split(".layers.")[1].split(".")[0] for name in names} for names in sessions]
    assert len(sessions) == 6 and all(len(found) <= 1 for found in layers)


def test_a_graph_without_per_layer_norms_is_observed_whole(tiny_checkpoint, caplog):
    """GPT-2's LayerNormalization gives no cuts: the whole graph is observed at once, and says so."""
    model = _w4(tiny_checkpoint("gpt2"))
    values = qdq.activation_inputs(model, EXCLUDE)
    with pytest.raises(layerwise.NotLayered):
        layerwise.observation_stages(model, values)
    with caplog.at_level(logging.INFO, logger="nanoexport.calibration.qdq"):
        ranges = qdq.observe(model, values, _windows(16, 4), "minmax", 0)
    assert "observing activations on the whole graph at once" in caplog.text
    assert len(ranges) == len(values) and all(low <= 0.0 <= high for low, high in ranges.values())
