"""The manifest's weight digests: a target's re-rounded layers measured against the canonical ones one layer at a
time, never all of them held at once."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx_ir as ir

from nanoexport.digests import CanonicalWeights, QuantizedWeight, dequantized, stored_digests

ROWS, COLUMNS, BLOCK, LAYERS = 256, 1024, 32, 16


def _canonical(rng: np.random.Generator) -> tuple[ir.Model, dict[str, QuantizedWeight]]:
    """A graph of ``LAYERS`` blocked int4 DequantizeLinear weights ``[K, N]``, blocks along K."""
    nodes, initializers, weights = [], [], {}
    for index in range(LAYERS):
        integers = rng.integers(-8, 8, (ROWS, COLUMNS)).astype(np.int8)
        scales = rng.uniform(0.01, 0.02, (ROWS // BLOCK, COLUMNS)).astype(np.float32)
        quant = ir.Value(name=f"model.layers.{index}.mlp.down_proj.weight.T.quant", shape=ir.Shape(integers.shape),
                         type=ir.TensorType(ir.DataType.INT4),
                         const_value=ir.Tensor(integers, dtype=ir.DataType.INT4))
        scale = ir.Value(name=f"model.layers.{index}.mlp.down_proj.weight.T.scale", const_value=ir.tensor(scales))
        initializers += [quant, scale]
        nodes.append(ir.node("DequantizeLinear", [quant, scale], {"axis": 0, "block_size": BLOCK}))
        weights[f"model.layers.{index}.mlp.down_proj.weight.T"] = QuantizedWeight(integers, scales)
    graph = ir.Graph([], [node.outputs[0] for node in nodes], nodes=nodes, initializers=initializers,
                     opset_imports={"": 23})
    return ir.Model(graph, ir_version=10), weights


def test_re_rounded_layers_are_measured_one_at_a_time():
    rng = np.random.default_rng(0)
    model, weights = _canonical(rng)
    canonical = CanonicalWeights(model)
    record = canonical.record()

    def re_rounded():  # what a target with its own grid stores: coarser scales, integers rounded again
        for name, weight in weights.items():
            scales = np.round(weight.scales, 2) + 0.005
            integers = np.clip(np.round(dequantized(weight).T / np.repeat(scales, BLOCK, axis=0)), -8, 7)
            yield name, QuantizedWeight(integers.astype(np.int8), scales.astype(np.float32))

    expected = list(re_rounded())  # made before measuring, so the stored layers' own arrays are not counted
    tracemalloc.start()
    stored = stored_digests(iter(expected), record, canonical)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    layer_float_bytes = ROWS * COLUMNS * 4
    # A few float copies of one layer at a time; all the changed layers held at once would be 16 of them.
    assert peak < 8 * layer_float_bytes, peak / layer_float_bytes
    error = stored["weight_error"]
    assert error["layers"] == LAYERS and sorted(stored["changed_layers"]) == sorted(weights)
    differences = sum(float(np.square(dequantized(ours) - dequantized(weights[name])).sum()) for name, ours in expected)
    squares = sum(float(np.square(dequantized(weight)).sum()) for weight in weights.values())
    assert np.isclose(error["relative_rms"], (differences / squares) ** 0.5, rtol=1e-5)
    assert 0 < error["worst_layer_relative_rms"] < 1
