"""Mixed precision under a size budget: each layer's sensitivity, then the cheapest loss that fits.

A layer's sensitivity to a format is the KL divergence of the model's next-token distribution when only
that layer is quantized to it (round to nearest), measured on calibration windows on ONNX Runtime. The
weights under consideration are fed as graph inputs, so one session serves every measurement.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from nanoexport.calibration.activations import ModelSession
from nanoexport.calibration.blocks import WeightFormat, rtn
from nanoexport.config import QuantConfig
from nanoexport.errors import NanoexportError

log = logging.getLogger(__name__)

SENSITIVITY_WINDOWS = 4


def ladder(weight_type: str) -> list[str]:
    """Formats a layer may take, smallest first."""
    return [weight_type, "fp16"] if weight_type == "int8" else [weight_type, "int8"]


def layer_bytes(weight_type: str, elements: int, config: QuantConfig) -> float:
    if weight_type == "float":
        return 4.0 * elements
    if weight_type == "fp16":
        return 2.0 * elements
    return WeightFormat(weight_type, config.block_size, config.asymmetric, config.scale_dtype).bits_per_weight() \
        * elements / 8


def fit_budget(model: ir.Model, plans: list, config: QuantConfig, budget: int, windows: np.ndarray) -> None:
    """Set each adjustable plan's ``weight_type`` so the weights fit ``budget`` bytes with the least KL."""
    adjustable = [plan for plan in plans if plan.weight_type == config.weights]
    linear_weights = {id(plan.linear.initializer) for plan in plans}
    fixed_bytes = sum(value.const_value.nbytes for value in model.graph.initializers.values()
                      if id(value) not in linear_weights and value.const_value is not None)
    fixed_bytes += sum(layer_bytes(plan.weight_type, int(np.prod(plan.linear.shape)), config)
                       for plan in plans if plan not in adjustable)

    def size(choice: dict[int, int]) -> float:
        return fixed_bytes + sum(layer_bytes(ladder(plan.weight_type)[choice[i]], int(np.prod(plan.linear.shape)),
                                             config) for i, plan in enumerate(adjustable))

    lowest = {i: 0 for i in range(len(adjustable))}
    if size(lowest) > budget:
        raise NanoexportError(f"--size-budget {config.size_budget} is below the smallest reachable size "
                              f"({size(lowest) / 1e9:.3f} GB with {config.weights} everywhere allowed); raise it")
    sensitivity = _sensitivities(model, adjustable, config, windows[:SENSITIVITY_WINDOWS])
    choice = {i: 1 for i in range(len(adjustable))}
    while size(choice) > budget:
        def cost(i: int) -> float:
            plan = adjustable[i]
            elements = int(np.prod(plan.linear.shape))
            saved = layer_bytes(ladder(plan.weight_type)[1], elements, config) - layer_bytes(plan.weight_type,
                                                                                             elements, config)
            return (sensitivity[i][0] - sensitivity[i][1]) / saved

        i = min((i for i in choice if choice[i] == 1), key=cost)
        choice[i] = 0
    for i, plan in enumerate(adjustable):
        plan.weight_type = ladder(plan.weight_type)[choice[i]]
    log.info("size budget: %.1f MB planned of %.1f MB", size(choice) / 1e6, budget / 1e6)


def _sensitivities(model: ir.Model, plans: list, config: QuantConfig, windows: np.ndarray) -> list[list[float]]:
    """``[layer][rung]``: KL from the float model when only that layer takes that rung of its ladder."""
    weights = [plan.linear.initializer for plan in plans]
    session = ModelSession(model, [], graph_inputs=weights)
    floats = {value.name: value.const_value.numpy() for value in weights}
    logits_name = model.graph.outputs[0].name
    reference = [session.run(window, [logits_name], floats)[0] for window in windows]
    results = []
    for plan in plans:
        row = []
        for weight_type in ladder(plan.weight_type):
            feeds = dict(floats)
            feeds[plan.linear.initializer.name] = _rounded(plan.linear, weight_type, config)
            row.append(float(np.mean([_kl(ref, session.run(window, [logits_name], feeds)[0])
                                      for ref, window in zip(reference, windows)])))
        results.append(row)
        log.debug("sensitivity %s: %s", plan.linear.name, row)
    return results


def _rounded(linear, weight_type: str, config: QuantConfig) -> np.ndarray:
    matrix = linear.matrix()
    if weight_type == "fp16":
        rounded = matrix.astype(np.float16).astype(np.float32)
    else:
        fmt = WeightFormat(weight_type, config.block_size, config.asymmetric, config.scale_dtype)
        rounded = rtn(matrix, fmt).dequantize()
    return np.ascontiguousarray(rounded.T if linear.transposed else rounded)


def _kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(other))."""
    def log_softmax(logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(other)
    return float((np.exp(p) * (p - q)).sum(-1).mean())
