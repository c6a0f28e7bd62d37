"""Weights in the forms HTP computes right: int4 as LPBQ, int8 per output channel (a lossy pass).

HTP takes int4 block quantization as LPBQ: block scales that are levels 1..16 of one float scale per output
channel (on the onnxruntime-qnn 2.7 emulator, higher levels compute wrong values). Each block takes the level
that best reproduces our dequantized block, and our integers are rounded again to it (on the demo model:
weight error 1.17x the canonical int4's). int8 weights become per output channel (the provider refuses
block-wise int8 beside uint8 activations), also rounded again from our dequantized weights.
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern

from nanoexport.calibration.blocks import expand_blocks
from nanoexport.calibration.graph import packed_four_bit
from nanoexport.errors import NanoexportError
from nanoexport.passes import lossy
from nanoexport.targets.qnn.rules import apply_rules, constant, keeps_own_name, named

log = logging.getLogger(__name__)

LPBQ_LEVELS = 16  # block scale levels HTP computes right: it reads them as 4-bit


class HtpWeight(pattern.RewriteRuleClassBase):
    """A blocked ``DequantizeLinear -> Cast`` weight -> LPBQ (int4: block levels dequantized by a per-channel
    scale, then the integers by them) or one scale per output channel (int8)."""

    def pattern(self, op, quant, scale):
        dequantized = op.DequantizeLinear(quant, scale, _allow_other_inputs=True, _allow_other_attributes=True,
                                          _outputs=["dequantized"])
        return op.Cast(dequantized, _allow_other_attributes=True, _outputs=["weight"])

    def check(self, context, dequantized, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = dequantized.producer()
        if not _is_blocked_weight(node):
            return result.fail("not a blocked constant weight", node)
        if refusal := _refusal(node):
            return result.fail(refusal, node)
        return result

    def rewrite(self, op, quant, scale, dequantized, weight, **_):
        block_size = dequantized.producer().attributes.get_int("block_size")
        base = quant.name.removesuffix(".quant")
        block_scales = scale.const_value.numpy().astype(np.float32)
        keeps_own_name(weight)
        if quant.dtype == ir.DataType.INT8:
            integers, channel_scale = per_channel_weights(quant.const_value.numpy(), block_scales, block_size)
            return named(op, "DequantizeLinear", constant(op, f"{base}.channel_quant", integers),
                         constant(op, f"{base}.channel_scale", channel_scale), name=f"{base}.per_channel", axis=1)
        integers, block_levels, channel_scale = lpbq_weights(quant.const_value.numpy(), block_scales, block_size)
        levels = constant(op, f"{base}.block_levels", block_levels)
        per_channel = constant(op, f"{base}.channel_scale", channel_scale)
        # The provider tells int4 from the zero point's type: without one it reads the integers as int8.
        zero = constant(op, f"{base}.zero_point", np.zeros(block_levels.shape, integers.dtype))
        block_scale = named(op, "DequantizeLinear", levels, per_channel, name=f"{base}.block_scale", axis=1)
        # Two integers to a byte, as the file holds them: held a byte each, the model's int4 weights took
        # twice their size until written (1.3 GB on a 1.5B model).
        packed = op.initializer(packed_four_bit(f"{base}.lpbq_quant", integers, integers.dtype.type),
                                name=f"{base}.lpbq_quant")
        return named(op, "DequantizeLinear", packed, block_scale, zero, name=f"{base}.lpbq", axis=0,
                     block_size=block_size)


@lossy
def weights_for_htp(model: ir.Model) -> None:
    """Blocked ``DequantizeLinear -> Cast`` weights -> the forms HTP computes right: int4 as LPBQ (block
    scales re-expressed, integers rounded again to them), int8 per output channel."""
    count = apply_rules(pattern.RewriteRuleSet([HtpWeight.rule()]), model)
    log.info("weights_for_htp: %d weights", count)
    for node in model.graph:
        if _is_blocked_weight(node):
            raise NanoexportError(_refusal(node))
    common.RemoveUnusedNodesPass()(model)  # and the canonical integers and scales


def _is_blocked_weight(node: ir.Node) -> bool:
    if node.op_type != "DequantizeLinear" or node.attributes.get_int("block_size", 0) == 0:
        return False
    uses = node.outputs[0].uses()
    return node.inputs[0].const_value is not None and len(uses) == 1 and uses[0][0].op_type == "Cast"


def _refusal(dequantize: ir.Node) -> str | None:
    """Why a blocked weight has no HTP form, or None."""
    quant = dequantize.inputs[0]
    if dequantize.attributes.get_int("axis", 1) != 0:  # blocks along a row: a table Gather reads, [rows, width]
        table = quant.name.removesuffix(".quant")
        return (f"the qnn target looks embedding tables up in float, but {table} is quantized; keep it float: "
                f"--keep-float 'lm_head,*embed_tokens,{table.removesuffix('.weight')}'")
    if len(dequantize.inputs) > 2 and dequantize.inputs[2] is not None:
        return f"HTP block quantization is symmetric but {quant.name} has zero points; drop --asymmetric"
    if quant.dtype not in (ir.DataType.INT4, ir.DataType.INT8):
        return (f"HTP takes int4 or int8 blocked weights, not {quant.dtype.name.lower()} ({quant.name}); use "
                "--quant int4 or int8")
    return None


def _dequantize(quant: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """Our weights ``[K, N]`` as the canonical DequantizeLinear gives them, in float32."""
    return quant.astype(np.float32) * expand_blocks(scale, block_size, quant.shape[0])


def per_channel_weights(quant: np.ndarray, scale: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 integers ``[K, N]`` and block scales -> (int8 integers, float32 scale per output channel): our
    dequantized weights rounded again to one scale per column, the int8 form HTP takes with uint8 and
    uint16 activations alike (block-wise int8 it refuses beside uint8 activations)."""
    weights = _dequantize(quant, scale, block_size)
    channel = np.abs(weights).max(axis=0) / 127
    channel = np.where(channel > 0, channel, 1.0).astype(np.float32)
    return np.clip(np.round(weights / channel), -127, 127).astype(np.int8), channel


def lpbq_weights(quant: np.ndarray, scale: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int4 integers ``[K, N]`` and block scales ``[K / block, N]`` -> LPBQ (integers, uint8 levels, float32
    per-channel scale): each block's scale is ``level * channel scale`` with level 1 to 16.

    HTP reads block scale levels as 4 bits: levels above 16 compute wrong values. Sixteen levels cannot hold
    every block scale, so each block takes the level that best reproduces its dequantized weights, which are
    then rounded again to that level's grid. A column's largest block keeps its scale (level 16).
    """
    rows, columns = quant.shape
    weights = _dequantize(quant, scale, block_size).reshape(-1, block_size, columns)
    channel = np.abs(scale).max(axis=0) / LPBQ_LEVELS
    channel = np.where(channel > 0, channel, 1.0).astype(np.float32)
    low, high = ml_dtypes.iinfo(quant.dtype).min, ml_dtypes.iinfo(quant.dtype).max
    best_error = np.full(scale.shape, np.inf, np.float32)
    best_level = np.ones(scale.shape, np.uint8)
    for level in range(1, LPBQ_LEVELS + 1):
        step = level * channel
        error = np.square(weights - np.clip(np.round(weights / step), low, high) * step).sum(axis=1)
        better = error < best_error
        best_error, best_level = np.where(better, error, best_error), np.where(better, level, best_level)
    step = (best_level * channel)[:, None, :]
    integers = np.clip(np.round(weights / step), low, high).reshape(rows, columns).astype(quant.dtype)
    return integers, best_level.astype(np.uint8), channel
