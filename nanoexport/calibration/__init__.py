"""Calibration and block-wise weight quantization of the canonical graph.

``quantize(model, config, ...)`` decides a format per linear layer (type, block size, symmetry; overrides
by name; a size budget spent where the logits are most sensitive), captures calibration activations on
ONNX Runtime when the algorithm needs them, quantizes each weight with RTN, scale estimation (SE), GPTQ or
AWQ, and puts the integers in the graph as blocked ``DequantizeLinear`` (see ``graph.py``). It returns the
plan, which the manifest records.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from nanoexport.calibration import qdq
from nanoexport.calibration.activations import InputStatistics
from nanoexport.calibration.algorithms import awq, gptq
from nanoexport.calibration.blocks import WeightFormat, rtn
from nanoexport.calibration.data import calibration_windows, load_tokenizer
from nanoexport.calibration.graph import (
    Linear,
    find_embeddings,
    find_linears,
    replace_weight,
    scale_input,
    to_float16,
)
from nanoexport.calibration.layerwise import capture_layers
from nanoexport.config import QuantConfig, parse_size
from nanoexport.errors import NanoexportError
from nanoexport.progress import Countdown

log = logging.getLogger(__name__)

WEIGHT_TYPES = ("none", "fp16", "int4", "uint4", "int8", "nf4")
ALGORITHMS = ("rtn", "se", "gptq", "awq")
DEFAULT_CALIBRATION_FILE = "calibration.txt"


@dataclass
class LayerPlan:
    linear: Linear
    weight_type: str  # a WEIGHT_TYPES entry, or "float"

    def format(self, config: QuantConfig) -> WeightFormat:
        return WeightFormat(self.weight_type, config.block_size, config.asymmetric, config.scale_dtype)

    def bits_per_weight(self, config: QuantConfig) -> float:
        if self.weight_type == "float":
            return 32.0
        if self.weight_type == "fp16":
            return 16.0
        return self.format(config).bits_per_weight()


def check_config(config: QuantConfig) -> None:
    """Refuse settings no quantizer can honour, naming the setting and its choices."""
    choices = {"weights": WEIGHT_TYPES, "algo": ALGORITHMS, "scale_dtype": ("fp16", "fp32"),
               "activations": ("none", "a16", "a8"), "observer": ("minmax", "percentile", "mse")}
    for setting, allowed in choices.items():
        value = config.algorithm if setting == "algo" else getattr(config, setting)  # an unset algo is valid
        if value not in allowed:
            raise NanoexportError(f"quant {setting} {value!r} is not one of {', '.join(allowed)}")
    for pattern, weight_type in config.overrides.items():
        if weight_type not in (*WEIGHT_TYPES[1:], "float"):
            raise NanoexportError(f"quant override {pattern} = {weight_type!r}: choose one of "
                                  f"float, {', '.join(WEIGHT_TYPES[1:])}")
    if not 16 <= config.block_size <= 256 or config.block_size & (config.block_size - 1):
        raise NanoexportError(f"--block-size must be a power of two from 16 to 256, not {config.block_size}")
    if config.weights == "nf4" and config.asymmetric:
        raise NanoexportError("nf4 is symmetric by construction; drop --asymmetric")


def plan_layers(model: ir.Model, config: QuantConfig) -> list[LayerPlan]:
    """Each linear layer and the weight type it gets: an override, fp16 if kept (``keep_float``), else
    ``config.weights``.

    A kept layer is stored in fp16, never fp32: in a 4-bit model the fp32 output head was most of the bytes
    (Qwen2.5-0.5B's openvino artifact: 746 MB, of which 544 MB the tied head) for no measurable accuracy
    (every target's validation passes with it in fp16). An override ``float`` keeps fp32 where wanted."""
    plans = []
    for linear in [*find_linears(model), *find_embeddings(model)]:
        weight_type = next((kind for pattern, kind in config.overrides.items()
                            if fnmatch.fnmatchcase(linear.name, pattern)), None)
        if weight_type is None:
            kept = any(fnmatch.fnmatchcase(linear.name, pattern) for pattern in config.keep_float)
            weight_type = "fp16" if kept else config.weights
        plan = LayerPlan(linear, weight_type)
        _check_blocks(plan, config)
        plans.append(plan)
    return plans


def _check_blocks(plan: LayerPlan, config: QuantConfig) -> None:
    rows = plan.linear.shape[0]
    if plan.weight_type in ("float", "fp16") or rows % config.block_size == 0:
        return
    if plan.weight_type == "nf4":
        raise NanoexportError(f"block size {config.block_size} does not divide the input dimension {rows} of "
                              f"{plan.linear.name}, and nf4 blocks cannot be padded; choose a block size dividing it")
    if not config.pad_blocks:
        raise NanoexportError(
            f"block size {config.block_size} does not divide the input dimension {rows} of {plan.linear.name}; "
            "choose a block size that divides it, or pass --pad-blocks"
        )


def quantize(
    model: ir.Model,
    config: QuantConfig,
    tokenizer_files: dict[str, bytes],
    checkpoint_folder: Path | None,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """Quantize ``model``'s linear weights in place as ``config`` says; returns the plan for the manifest."""
    check_config(config)
    if config.weights == "none" and config.activations == "none":
        return None
    report = on_progress or (lambda _: None)
    plans = plan_layers(model, config) if config.weights != "none" else []
    windows = None
    if config.algorithm != "rtn" or config.size_budget or config.activations != "none":
        calibration = calibration_path(config, checkpoint_folder)
        windows = calibration_windows(calibration, load_tokenizer(tokenizer_files), config.calib_samples,
                                      config.calib_window, config.seed)
    if config.size_budget:
        from nanoexport.calibration.budget import fit_budget

        report("sensitivity of each layer")
        fit_budget(model, plans, config, parse_size(config.size_budget, "--size-budget"), windows)
    if plans:
        _quantize_weights(model, plans, config, windows, report)
    common.RemoveUnusedNodesPass()(model)  # the float weights (and norm scales AWQ folded into) left behind
    summary = _plan_summary(plans, config)
    if config.activations != "none":
        report(f"activations: {config.observer} observers")
        values = qdq.activation_inputs(model, config.activation_exclude)
        ranges = qdq.observe(model, values, windows, config.observer, config.seed)
        pairs = qdq.insert_qdq(model, ranges, config.activations, config.activation_exclude)
        summary["activations"] = {"type": config.activations, "observer": config.observer, "tensors": pairs}
    summary["weights_bytes"] = sum(value.const_value.nbytes for value in model.graph.initializers.values()
                                   if value.const_value is not None)
    if config.size_budget and summary["weights_bytes"] > parse_size(config.size_budget, "--size-budget"):
        raise NanoexportError(f"the quantized weights take {summary['weights_bytes']:,} bytes, over "
                              f"--size-budget {config.size_budget}; report this with the model")
    return summary


def calibration_path(config: QuantConfig, checkpoint_folder: Path | None) -> Path:
    """``--calib``, else ``calibration.txt`` in the checkpoint folder; refuses when neither exists."""
    if config.calib:
        return Path(config.calib)
    if checkpoint_folder is not None and (checkpoint_folder / DEFAULT_CALIBRATION_FILE).is_file():
        return checkpoint_folder / DEFAULT_CALIBRATION_FILE
    if config.algorithm != "rtn":
        needs = f"--algo {config.algorithm}"
    else:
        needs = "--size-budget" if config.size_budget else f"--activations {config.activations}"
    raise NanoexportError(f"{needs} needs calibration data and none was given; pass --calib FILE "
                          "(text, JSONL or a folder)")


def _quantize_weights(model: ir.Model, plans: list[LayerPlan], config: QuantConfig, windows, report) -> None:
    by_layer = {id(plan.linear.matmul): plan for plan in plans}
    quantized = [plan for plan in plans if plan.weight_type not in ("float", "fp16")]
    for plan in plans:
        if plan.weight_type == "fp16":
            to_float16(model, plan.linear)
    countdown = Countdown(config.algorithm, len(quantized), report)
    # Embedding tables have no activations to calibrate on: round to nearest, first, so that calibration
    # sees the model with its quantized table.
    for plan in quantized:
        if config.algorithm == "rtn" or plan.linear.embedding:
            replace_weight(model, plan.linear, rtn(plan.linear.matrix(), plan.format(config)))
            countdown.advance(plan.linear.name)
    linears = [plan.linear for plan in quantized if config.algorithm != "rtn" and not plan.linear.embedding]
    if not linears:
        return
    for group, statistics in capture_layers(model, linears, windows):
        readers = Counter(linear.input.name for linear in group)
        for linear in group:
            name = linear.input.name
            readers[name] -= 1
            # The last layer reading an input takes its statistics out of ``statistics``, so that a Hessian is
            # freed once quantized with (the next layer is captured before this loop lets go of ``statistics``).
            _quantize_calibrated(model, linear, by_layer[id(linear.matmul)].format(config),
                                 statistics.pop(name) if not readers[name] else statistics[name], config)
            countdown.advance(linear.name)


def _quantize_calibrated(model: ir.Model, linear: Linear, fmt: WeightFormat, stats: InputStatistics,
                         config: QuantConfig) -> None:
    """Quantize ``linear`` in place by ``config.algorithm`` (not rtn) from its input statistics."""
    weight = linear.matrix()
    if config.algorithm == "gptq":
        replace_weight(model, linear, gptq(weight, stats.hessian, fmt, config.gptq_damp, config.gptq_act_order))
    elif config.algorithm == "se" or linear.transposed:
        # Scale estimation; and AWQ's fallback for a tied weight, which also feeds the embedding
        # Gather, so that AWQ's input scaling would distort it.
        replace_weight(model, linear, rtn(weight, fmt, hessian=stats.hessian))
    else:
        result, input_scale = awq(weight, stats.magnitude, stats.hessian, fmt)
        replace_weight(model, linear, result)
        if input_scale is not None:
            scale_input(model, linear, input_scale)


def _plan_summary(plans: list[LayerPlan], config: QuantConfig) -> dict[str, Any]:
    # Bits per weight of the layers that took a quantized format, not of those kept (in fp16) beside them.
    kept = ("float",) if config.weights == "fp16" else ("float", "fp16")
    quantized = [plan for plan in plans if plan.weight_type not in kept]
    weights = sum(np.prod(plan.linear.shape) for plan in quantized)
    bits = sum(plan.bits_per_weight(config) * np.prod(plan.linear.shape) for plan in quantized)
    return {
        "layers": {plan.linear.name: plan.weight_type for plan in plans},
        # Each layer's bits per weight (scales and zero points included), which the reports plot.
        "layer_bits": {plan.linear.name: round(float(plan.bits_per_weight(config)), 4) for plan in plans},
        "quantized_weights": int(weights),
        "bits_per_weight": round(float(bits / weights), 4) if weights else None,
        "algorithm": config.algorithm,
    }
