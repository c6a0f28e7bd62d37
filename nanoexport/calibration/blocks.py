"""Block-wise weight quantization arithmetic: weight matrices ``[K, N]`` (input dim first), blocks along K.

Everything here is numpy on one matrix at a time. A block holds ``block_size`` consecutive input rows of one
output column and has one scale (and one zero point when asymmetric); a last partial block is allowed only
when the caller pads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The 16 NF4 levels (QLoRA): quantiles of a unit normal, scaled to [-1, 1], with an exact zero.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)


@dataclass(frozen=True)
class WeightFormat:
    """How one weight matrix is stored: integer type, symmetry, block size, scale precision."""

    dtype: str  # int4 | uint4 | int8 | nf4
    block_size: int
    asymmetric: bool = False
    scale_dtype: str = "fp16"  # fp16 | fp32

    @property
    def bits(self) -> int:
        return 8 if self.dtype == "int8" else 4

    @property
    def levels(self) -> tuple[int, int]:
        """Smallest and largest stored integer."""
        if self.dtype in ("nf4", "uint4"):
            return 0, 15
        return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1

    @property
    def has_zero_point(self) -> bool:
        """Unsigned integers always carry one (8 when symmetric): ONNX has no implicit midpoint."""
        return self.dtype != "nf4" and (self.asymmetric or self.dtype == "uint4")

    def bits_per_weight(self) -> float:
        scale_bits = 16 if self.scale_dtype == "fp16" else 32
        zero_bits = self.bits if self.has_zero_point else 0
        return self.bits + (scale_bits + zero_bits) / self.block_size


@dataclass
class QuantizedWeight:
    """Integers ``[K, N]`` (codebook indices for nf4), scales and zero points ``[ceil(K / block), N]``."""

    values: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    format: WeightFormat

    def dequantize(self) -> np.ndarray:
        rows = self.values.shape[0]
        scales = expand_blocks(self.scales.astype(np.float32), self.format.block_size, rows)
        if self.format.dtype == "nf4":
            return NF4_CODEBOOK[self.values] * scales
        levels = self.values.astype(np.float32)
        if self.zero_points is not None:
            levels -= expand_blocks(self.zero_points.astype(np.float32), self.format.block_size, rows)
        if self.format.scale_dtype == "fp16":
            # DequantizeLinear computes in its scale's type: the product is rounded to fp16 (exact in fp32 first).
            return (levels * scales).astype(np.float16).astype(np.float32)
        return levels * scales


def expand_blocks(per_block: np.ndarray, block_size: int, rows: int) -> np.ndarray:
    """``[blocks, N]`` -> ``[rows, N]``, each block's entry repeated over its rows."""
    return np.repeat(per_block, block_size, axis=0)[:rows]


def stored_scale(scale: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """The scale as it will be stored (fp16 rounding included), never zero, as float32 for arithmetic."""
    dtype = np.float16 if fmt.scale_dtype == "fp16" else np.float32
    scale = np.where(scale == 0, 1.0, scale)
    smallest = np.finfo(dtype).tiny
    stored = np.clip(np.abs(scale), smallest, np.finfo(dtype).max).astype(dtype).astype(np.float32)
    return np.copysign(stored, scale)


def block_view(weight: np.ndarray, block_size: int) -> np.ndarray:
    """``[K, N]`` -> ``[blocks, block_size, N]``, a last partial block padded with zeros."""
    rows, columns = weight.shape
    blocks = -(-rows // block_size)
    padded = np.zeros((blocks * block_size, columns), np.float32)
    padded[:rows] = weight
    return padded.reshape(blocks, block_size, columns)


def block_range_scales(weight: np.ndarray, fmt: WeightFormat, shrink: np.ndarray | float = 1.0):
    """Round-to-nearest scales (and zero points) of every block, its range narrowed by ``shrink``.

    Symmetric integers map the block's largest-magnitude value to the most negative level (-8 for int4),
    which has one more step than the positive side; asymmetric ones spread [min, max] over all levels.
    """
    blocks = block_view(weight, fmt.block_size)
    low, high = fmt.levels
    if fmt.dtype == "nf4":
        return stored_scale(np.abs(blocks).max(1) * shrink, fmt), None
    if fmt.asymmetric:
        minimum = np.minimum(blocks.min(1), 0) * shrink
        maximum = np.maximum(blocks.max(1), 0) * shrink
        scales = stored_scale((maximum - minimum) / (high - low), fmt)
        zero_points = np.clip(np.round(low - minimum / scales), low, high)
        return scales, zero_points
    flat = blocks.transpose(0, 2, 1)
    index = np.abs(flat).argmax(-1)
    signed_max = np.take_along_axis(flat, index[..., None], -1)[..., 0]
    midpoint = (high + 1) // 2 if fmt.dtype == "uint4" else 0
    scales = stored_scale(signed_max * shrink / (low - midpoint), fmt)
    return scales, (np.full(scales.shape, midpoint, np.float32) if midpoint else None)


def quantize_with(weight: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, fmt: WeightFormat):
    """Round ``weight`` to the nearest level under fixed per-block ``scales``/``zero_points``."""
    rows = weight.shape[0]
    full_scales = expand_blocks(scales, fmt.block_size, rows)
    if fmt.dtype == "nf4":
        normalized = weight / full_scales
        return np.abs(normalized[..., None] - NF4_CODEBOOK).argmin(-1).astype(np.uint8)
    low, high = fmt.levels
    shifted = weight / full_scales
    if zero_points is not None:
        shifted = shifted + expand_blocks(zero_points, fmt.block_size, rows)
    return np.clip(np.round(shifted), low, high).astype(np.int8 if low < 0 else np.uint8)


def rtn(weight: np.ndarray, fmt: WeightFormat, importance: np.ndarray | None = None,
        grid: int = 20) -> QuantizedWeight:
    """Round to nearest, with each block's scale chosen from ``grid`` narrowed ranges to minimize its error.

    The error of a block is the squared difference summed over its rows, weighted by ``importance`` (the mean
    squared activation of each input row) when given; with ``grid`` 1 the scale is the plain range.
    """
    weight = weight.astype(np.float32)
    row_weight = np.ones(weight.shape[0], np.float32) if importance is None else importance.astype(np.float32)
    best_error = best = None
    for shrink in np.linspace(1.0, 0.5, grid) if grid > 1 else [1.0]:
        scales, zero_points = block_range_scales(weight, fmt, shrink)
        values = quantize_with(weight, scales, zero_points, fmt)
        error = QuantizedWeight(values, scales, zero_points, fmt).dequantize() - weight
        block_error = block_view(error**2 * row_weight[:, None], fmt.block_size).sum(1)
        if best is None:
            best_error, best = block_error, (scales, zero_points)
            continue
        better = block_error < best_error
        best_error = np.where(better, block_error, best_error)
        best = (np.where(better, scales, best[0]),
                None if zero_points is None else np.where(better, zero_points, best[1]))
    scales, zero_points = best
    return QuantizedWeight(quantize_with(weight, scales, zero_points, fmt), scales, zero_points, fmt)
