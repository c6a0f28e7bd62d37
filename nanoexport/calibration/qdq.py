"""Activation quantization for QDQ targets: observers on calibration data, then QuantizeLinear ->
DequantizeLinear in front of the ops that should compute on integers.

Activations are quantized per tensor, asymmetric, to uint16 (``a16``: W8A16 / W4A16 with the weight types
from weight quantization) or uint8 (``a8``: W8A8). The float inputs of the arithmetic ops in
``QUANTIZED_OPS`` get a Q/DQ pair, except where the consumer's type is excluded (softmax, normalizations,
attention by default: their inputs need the range float gives them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from nanoexport.calibration.activations import ModelSession, cache_inputs, window_feeds
from nanoexport.calibration.layerwise import NotLayered, observe_layers
from nanoexport.passes.initializers import new_initializer

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMul", "Add", "Mul", "Sigmoid", "Gelu", "Sub", "Div")
ACTIVATION_TYPES = {"a16": (np.uint16, ir.DataType.UINT16), "a8": (np.uint8, ir.DataType.UINT8)}
SAMPLE_PER_WINDOW = 4096  # values kept per tensor and window for the percentile and MSE observers
PERCENTILE = 99.99


def activation_inputs(model: ir.Model, exclude: list[str]) -> list[ir.Value]:
    """Float activations (not weights) read by a quantizable op whose type is not excluded."""
    chosen: dict[int, ir.Value] = {}
    for node in model.graph:
        if node.op_type not in QUANTIZED_OPS or node.op_type in exclude or node.domain not in ("", "ai.onnx"):
            continue
        for value in node.inputs:
            if value is None or value.const_value is not None or value.dtype != ir.DataType.FLOAT:
                continue
            if _is_weight(value) or _from_integers(value):
                continue
            chosen[id(value)] = value
    return list(chosen.values())


def _from_integers(value: ir.Value) -> bool:
    """Integers made float (positions, masks): exact already, and their run-time range is not calibration's."""
    producer = value.producer()
    return producer is not None and producer.op_type == "Cast" and producer.inputs[0].dtype not in (
        ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _is_weight(value: ir.Value) -> bool:
    """A value computed from constants only (a dequantized or cast weight), not from the model's inputs."""
    producer = value.producer()
    if producer is None:
        return value.const_value is not None
    return producer.op_type in ("DequantizeLinear", "Cast", "Transpose", "Reshape", "Gather", "Mul", "Unsqueeze") \
        and all(_is_weight(operand) for operand in producer.inputs if operand is not None)


def observe(model: ir.Model, values: list[ir.Value], windows: np.ndarray, observer: str,
            seed: int) -> dict[str, tuple[float, float]]:
    """The (low, high) range each value is quantized over, from ``observer`` on ``windows``: computed layer by
    layer (``layerwise.observe_layers``), or on the whole graph at once when it cannot be cut; the ranges
    are the same either way."""
    if not values:
        return {}
    caches = cache_inputs(model)
    try:
        outputs = observe_layers(model, values, [window_feeds(caches, tokens) for tokens in windows])
    except NotLayered as reason:
        log.info("observing activations on the whole graph at once: %s", reason)
        outputs = _whole_graph_outputs(model, values, windows)
    # Each value samples from its own stream, so the order the values are computed in does not matter.
    return collect_ranges(outputs, {value.name: RangeObserver(observer, np.random.default_rng([seed, index]))
                                    for index, value in enumerate(values)})


def collect_ranges(outputs: Iterator[tuple[list[str], list[np.ndarray]]],
                   observers: dict[str, RangeObserver]) -> dict[str, tuple[float, float]]:
    """Each named array of ``outputs`` shown to its value's observer; then every observer's range."""
    for names, arrays in outputs:
        for name, array in zip(names, arrays, strict=True):
            observers[name].add(array)
    return {name: observer.range() for name, observer in observers.items()}


def _whole_graph_outputs(model: ir.Model, values: list[ir.Value],
                         windows: np.ndarray) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """Per window: the names of ``values`` and their arrays, from one session on the whole graph."""
    session = ModelSession(model, values)
    names = [value.name for value in values]
    for window in windows:
        yield names, session.run(window, names)


class RangeObserver:
    """One value's range over the windows it is shown: min/max, or the percentile or MSE range of a sample
    of ``SAMPLE_PER_WINDOW`` values per window drawn from ``generator`` (which min/max does not need)."""

    def __init__(self, observer: str, generator: np.random.Generator | None = None):
        self.observer, self.generator = observer, generator
        self.low, self.high = np.inf, -np.inf
        self.samples: list[np.ndarray] = []

    def add(self, array: np.ndarray) -> None:
        """One window's array."""
        flat = array.reshape(-1)
        self.low, self.high = min(self.low, float(flat.min())), max(self.high, float(flat.max()))
        if self.observer != "minmax":
            self.samples.append(self.generator.choice(flat, min(SAMPLE_PER_WINDOW, flat.size), replace=False))

    def range(self) -> tuple[float, float]:
        """(low, high), widened to hold zero: zero must be exact (padding, masked positions)."""
        low, high = self.low, self.high
        if self.observer == "percentile":
            sample = np.concatenate(self.samples)
            low, high = float(np.percentile(sample, 100 - PERCENTILE)), float(np.percentile(sample, PERCENTILE))
        elif self.observer == "mse":
            low, high = _mse_range(np.concatenate(self.samples), low, high)
        return min(low, 0.0), max(high, 0.0)


def _mse_range(sample: np.ndarray, low: float, high: float, levels: int = 256, grid: int = 40):
    """The narrowed [low, high] whose 8-bit rounding of ``sample`` has the least squared error."""
    best = None
    for fraction in np.linspace(1.0, 0.3, grid):
        lo, hi = low * fraction, high * fraction
        step = max(hi - lo, 1e-12) / (levels - 1)
        rounded = np.clip(np.round((sample - lo) / step), 0, levels - 1) * step + lo
        error = float(((rounded - sample) ** 2).mean())
        if best is None or error < best[0]:
            best = (error, lo, hi)
    return best[1], best[2]


def insert_qdq(model: ir.Model, ranges: dict[str, tuple[float, float]], activations: str,
               exclude: list[str]) -> int:
    """QuantizeLinear -> DequantizeLinear on each observed value, for its non-excluded quantizable
    consumers only; returns the number of pairs inserted."""
    values = {value.name: value for node in model.graph for value in node.inputs if value is not None}
    inserted = 0
    for name, value_range in sorted(ranges.items()):
        value = values[name]
        quantize, dequantize = qdq_pair(model.graph, value, value_range, activations, f"{name}.act_")
        quantize.outputs[0].shape = value.shape
        dequantize.outputs[0].type, dequantize.outputs[0].shape = value.type, value.shape
        dequantize.outputs[0].name = f"{name}.qdq"
        consumers = [(node, index) for node, index in value.uses()
                     if node.op_type in QUANTIZED_OPS and node.op_type not in exclude]
        first = next(node for node in model.graph if any(node is user for user, _ in consumers))
        model.graph.insert_before(first, [quantize, dequantize])
        for node, index in consumers:
            node.replace_input_with(index, dequantize.outputs[0])
        inserted += 1
    log.info("activation quantization: %d Q/DQ pairs (%s)", inserted, activations)
    return inserted


def qdq_pair(graph: ir.Graph, value: ir.Value, value_range: tuple[float, float], activations: str,
             prefix: str) -> tuple[ir.Node, ir.Node]:
    """QuantizeLinear -> DequantizeLinear of ``value``, asymmetric per tensor over ``value_range`` to the
    ``activations`` integer type, with its scale and zero point registered as ``{prefix}scale`` and
    ``{prefix}zero_point``. The nodes are not in the graph yet: the caller places them, names them, and
    points the readers it chooses at the DequantizeLinear's output."""
    storage, data_type = ACTIVATION_TYPES[activations]
    top = np.iinfo(storage).max
    low, high = value_range
    scale = np.float32(max(high - low, 1e-8) / top)
    zero_point = np.array(np.clip(np.round(-low / scale), 0, top), storage)
    scale_value = new_initializer(graph, f"{prefix}scale", np.array(scale, np.float32))
    zero_value = new_initializer(graph, f"{prefix}zero_point", zero_point)
    quantize = ir.node("QuantizeLinear", [value, scale_value, zero_value])
    dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], scale_value, zero_value])
    quantize.outputs[0].type = ir.TensorType(data_type)
    return quantize, dequantize
