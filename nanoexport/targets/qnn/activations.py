"""Quantized outputs for the weight MatMuls calibration left float: HTP runs a MatMul by a quantized weight
only with a quantized output too.

Calibration quantizes the inputs of the next arithmetic op, which a Split or Reshape in between (the fused
q/k/v projection) hides. The ranges are observed on the prefill graph over prefill chunks of the same
calibration text quantization read, and the Q -> DQ pairs are calibration's own (``qdq_pair``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from nanoexport.calibration import calibration_path
from nanoexport.calibration.data import calibration_windows, load_tokenizer
from nanoexport.calibration.layerwise import NotLayered, observe_layers
from nanoexport.calibration.qdq import RangeObserver, collect_ranges, qdq_pair
from nanoexport.interface import call_feeds
from nanoexport.passes import GraphPass, lossy
from nanoexport.runtime import cpu_session
from nanoexport.targets import Build
from nanoexport.targets.qnn.runtime import QDQ_AS_FLOAT

log = logging.getLogger(__name__)


def prefill_windows(build: Build) -> np.ndarray:
    """Prefill chunks of the calibration text quantization read (the same file, found the same way)."""
    checkpoint, quant = build.checkpoint, build.config.quant
    folder = Path(checkpoint.source) if checkpoint.source else None
    source = calibration_path(quant, folder)
    tokenizer = load_tokenizer(checkpoint.tokenizer_files)
    return calibration_windows(source, tokenizer, quant.calib_samples, build.cache.prefill_chunk, quant.seed)


def observe_weight_outputs(model: ir.Model, windows: np.ndarray) -> dict[str, tuple[float, float]]:
    """Min/max of each weight MatMul output that calibration left float, over prefill calls on ``windows``:
    computed layer by layer (``layerwise.observe_layers``), or on the whole graph at once when it cannot be
    cut; the ranges are the same either way."""
    values = [node.outputs[0] for node in model.graph
              if _reads_quantized_weight(node) and not _is_quantized(node.outputs[0])]
    if not values:
        return {}
    feeds = _first_chunk_feeds(model, windows)
    try:
        # QDQ_AS_FLOAT: observed on the graph as ONNX Runtime CPU runs the artifact's QDQ graphs.
        outputs = observe_layers(model, values, feeds, QDQ_AS_FLOAT)
    except NotLayered as reason:
        log.info("observing weight outputs on the whole graph at once: %s", reason)
        outputs = _whole_graph_outputs(model, values, feeds)
    return collect_ranges(outputs, {value.name: RangeObserver("minmax") for value in values})


def _whole_graph_outputs(model: ir.Model, values: list[ir.Value],
                         feeds: list[dict[str, np.ndarray]]) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """Per window: the names of ``values`` and their arrays, from one session on the whole graph."""
    kept = len(model.graph.outputs)
    model.graph.outputs.extend(values)
    try:
        session = cpu_session(model, session_config=QDQ_AS_FLOAT)
    finally:
        del model.graph.outputs[kept:]
    names = [value.name for value in values]
    for feed in feeds:
        yield names, session.run(names, feed)


def _first_chunk_feeds(model: ir.Model, windows: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per window ``tokens``: a prefill call on them with an empty cache (one zero buffer per cache input,
    shared by the windows: ONNX Runtime does not write its inputs)."""
    inputs = {value.name: value for value in model.graph.inputs}
    caches = {name: np.zeros(tuple(value.shape), np.float32) for name, value in inputs.items()
              if name.startswith("past_key_values.")}
    capacity = inputs["attention_mask"].shape[1]
    return [caches | call_feeds(tokens, 0, len(tokens), capacity=capacity) for tokens in windows]


def _reads_quantized_weight(node: ir.Node) -> bool:
    producer = node.inputs[1].producer() if node.op_type == "MatMul" else None
    return producer is not None and producer.op_type == "DequantizeLinear" and \
        producer.inputs[0].const_value is not None


def _is_quantized(value: ir.Value) -> bool:
    uses = value.uses()
    return bool(uses) and all(node.op_type == "QuantizeLinear" for node, _ in uses)


def quantize_outputs_pass(ranges: dict[str, tuple[float, float]], activations: str) -> GraphPass:
    """``quantize_outputs`` with these ranges, as a pass."""

    @lossy
    def quantize_weight_outputs(model: ir.Model) -> None:
        """A Q -> DQ pair after each weight MatMul output calibration left float (HTP needs them quantized)."""
        quantize_outputs(model, ranges, activations)

    return quantize_weight_outputs


def quantize_outputs(model: ir.Model, ranges: dict[str, tuple[float, float]], activations: str) -> None:
    """A Q -> DQ pair (``activations`` type, asymmetric per tensor, as calibration's) right after each named
    value, read by every reader of the value."""
    graph = model.graph
    producers = {node.outputs[0].name: node for node in graph}
    for name, value_range in sorted(ranges.items()):
        node = producers[name]
        value = node.outputs[0]
        uses = list(value.uses())
        quantize, dequantize = qdq_pair(graph, value, value_range, activations, f"{name}.out_")
        quantize.name, quantize.outputs[0].name = f"{name}.out_q", f"{name}.out_q"
        dequantize.name, dequantize.outputs[0].name = f"{name}.out_dq", f"{name}.out_qdq"
        graph.insert_after(node, [quantize, dequantize])
        for user, index in uses:
            user.replace_input_with(index, dequantize.outputs[0])
