"""Block-wise weight quantization arithmetic: weight matrices ``[K, N]`` (input dim first), blocks along K.

Everything here is numpy on one matrix at a time. A block holds ``block_size`` consecutive input rows of one
output column and has one scale (and one zero point when asymmetric); a last partial block is allowed only
when the caller pads.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from nanoexport.calibration.compiled import COMPILED_MIN_ELEMENTS, searched_blocks

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
            return _through_float16(levels * scales)
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
    return _range_scales(_block_extremes(block_view(weight, fmt.block_size), fmt), fmt, shrink)


def _block_extremes(blocks: np.ndarray, fmt: WeightFormat) -> tuple[np.ndarray, ...]:
    """What a block's range scale is made from, ``[blocks, N]`` each: the largest magnitude (nf4), the
    minimum and maximum with zero (asymmetric), or the value of largest magnitude with its sign."""
    if fmt.dtype == "nf4":
        return (np.abs(blocks).max(1),)
    if fmt.asymmetric:
        return np.minimum(blocks.min(1), 0), np.maximum(blocks.max(1), 0)
    flat = blocks.transpose(0, 2, 1)
    index = np.abs(flat).argmax(-1)
    return (np.take_along_axis(flat, index[..., None], -1)[..., 0],)


def _range_scales(extremes: tuple[np.ndarray, ...], fmt: WeightFormat, shrink: np.ndarray | float):
    low, high = fmt.levels
    if fmt.dtype == "nf4":
        return stored_scale(extremes[0] * shrink, fmt), None
    if fmt.asymmetric:
        minimum, maximum = extremes[0] * shrink, extremes[1] * shrink
        scales = stored_scale((maximum - minimum) / (high - low), fmt)
        zero_points = np.clip(np.round(low - minimum / scales), low, high)
        return scales, zero_points
    midpoint = (high + 1) // 2 if fmt.dtype == "uint4" else 0
    scales = stored_scale(extremes[0] * shrink / (low - midpoint), fmt)
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


# Columns per piece of work: a piece of a 4864-row matrix is then about 1 MB, which stays in a core's cache
# through the ~10 array operations of each clipping step.
RTN_COLUMNS = 64


def rtn(weight: np.ndarray, fmt: WeightFormat, grid: int = 20, hessian: np.ndarray | None = None) -> QuantizedWeight:
    """Round to nearest, with each block's scale chosen from ``grid`` narrowed ranges to minimize its error.

    The error of a block is the squared difference summed over its rows; with ``grid`` 1 the scale is the
    plain range.

    Given the layer's ``hessian`` (``x^T x`` of its calibration inputs, ``[K, K]``), the error is instead the
    block's share of the layer's output error, ``e^T H_b e`` (``H_b`` the block's diagonal part of the
    Hessian), so the search clips by the data, as AWQ's clip search does. Each narrowed range is then
    followed by its *scale estimation* (as NNCF's): the integers it rounds to fix the scale of least output
    error in closed form, the weights are rounded again under that scale, and the better of the two counts.

    Columns are independent, so they are searched in cache-sized pieces on every core (numpy releases the GIL).
    Without a Hessian a large matrix's candidates are scored by one compiled kernel instead (``compiled.py``).
    """
    weight = np.asarray(weight, dtype=np.float32)
    rows, columns = weight.shape
    blocks = -(-rows // fmt.block_size)
    hessians = None if hessian is None else block_hessians(hessian, fmt.block_size)
    # float32 factors: numpy's default float64 ones widened every candidate's rounding to float64, twice the
    # memory traffic of the search (0.34 -> 0.16 s on a 896 x 4864 matrix, one core); the choices differ only
    # at ties (428 of the 190M bytes Qwen2.5-0.5B's int4 onnx artifact stores).
    shrinks = np.linspace(1.0, 0.5, grid, dtype=np.float32) if grid > 1 else [1.0]
    if hessian is None and grid > 1 and fmt.dtype != "nf4" and weight.size >= COMPILED_MIN_ELEMENTS:
        searched = _compiled_search(weight, fmt, shrinks)
        if searched is not None:
            return searched
    values = np.empty((rows, columns), np.int8 if fmt.levels[0] < 0 else np.uint8)
    scales = np.empty((blocks, columns), np.float32)
    zero_points = np.empty((blocks, columns), np.float32) if fmt.has_zero_point else None

    def search(start: int) -> None:
        end = min(start + RTN_COLUMNS, columns)
        piece = _search_columns(np.ascontiguousarray(weight[:, start:end]), fmt, hessians, shrinks)
        values[:, start:end] = piece.values
        scales[:, start:end] = piece.scales
        if zero_points is not None:
            zero_points[:, start:end] = piece.zero_points

    starts = range(0, columns, RTN_COLUMNS)
    if len(starts) == 1:
        search(0)
    else:
        list(_workers().map(search, starts))
    return QuantizedWeight(values, scales, zero_points, fmt)


def _compiled_search(weight: np.ndarray, fmt: WeightFormat, shrinks: np.ndarray) -> QuantizedWeight | None:
    """``rtn``'s data-free search by the compiled kernel; None when the kernel is unavailable."""
    midpoint = (fmt.levels[1] + 1) // 2 if fmt.dtype == "uint4" and not fmt.asymmetric else 0
    searched = searched_blocks(block_view(weight, fmt.block_size), shrinks, fmt.levels, midpoint, fmt.asymmetric,
                               fmt.scale_dtype == "fp16")
    if searched is None:
        return None
    levels, scales, zero_points = searched
    stored = levels if fmt.levels[0] < 0 else levels.view(np.uint8)  # 0..15 read the same in either type
    return QuantizedWeight(stored.reshape(-1, weight.shape[1])[: weight.shape[0]], scales,
                           zero_points if fmt.has_zero_point else None, fmt)


def block_hessians(hessian: np.ndarray, block_size: int) -> np.ndarray:
    """The diagonal blocks of a ``[K, K]`` Hessian, ``[blocks, block_size, block_size]`` float32 (a last
    partial block padded with zeros)."""
    count = -(-hessian.shape[0] // block_size)
    blocks = np.zeros((count, block_size, block_size), np.float32)
    for index in range(count):  # slices, not a padded copy of the whole Hessian (K^2 floats)
        part = hessian[index * block_size : (index + 1) * block_size, index * block_size : (index + 1) * block_size]
        blocks[index, : len(part), : len(part)] = part
    return blocks


def _search_columns(weight: np.ndarray, fmt: WeightFormat, hessians: np.ndarray | None,
                    shrinks: Sequence[float]) -> QuantizedWeight:
    """``rtn`` on a few columns, in the blocked layout ``[blocks, block_size, columns]`` throughout (the
    arithmetic of ``quantize_with`` and ``QuantizedWeight.dequantize`` without their expanded copies).

    ``hessians`` (``[blocks, block_size, block_size]``, from ``block_hessians``) make the error the output's
    and bring the least-squares refit of each candidate's scale."""
    rows = weight.shape[0]
    blocks = block_view(weight, fmt.block_size)
    extremes = _block_extremes(blocks, fmt)
    low, high = fmt.levels
    best_error = best_scales = best_zero_points = None

    def consider(scales: np.ndarray, zero_points: np.ndarray | None, levels: np.ndarray) -> None:
        nonlocal best_error, best_scales, best_zero_points
        error = _dequantize_blocks(levels, scales, zero_points, fmt)
        error -= blocks
        if hessians is not None:
            block_error = (error * (hessians @ error)).sum(1)
        else:
            block_error = np.square(error, out=error).sum(1)
        if best_error is None:
            best_error, best_scales, best_zero_points = block_error, scales, zero_points
            return
        better = block_error < best_error
        best_error = np.where(better, block_error, best_error)
        best_scales = np.where(better, scales, best_scales)
        if zero_points is not None:
            best_zero_points = np.where(better, zero_points, best_zero_points)

    for shrink in shrinks:
        scales, zero_points = _range_scales(extremes, fmt, shrink)
        levels = _round_blocks(blocks, scales, zero_points, fmt)
        if hessians is not None and fmt.dtype != "nf4":
            fitted = _fitted_scales(blocks, levels, zero_points, hessians, scales)
            fitted = stored_scale(fitted.astype(np.float32), fmt)
            consider(fitted, zero_points, _round_blocks(blocks, fitted, zero_points, fmt))
        consider(scales, zero_points, levels)
    levels = _round_blocks(blocks, best_scales, best_zero_points, fmt)
    stored = levels.astype(np.int8 if low < 0 else np.uint8)  # nf4 indices: levels 0..15
    return QuantizedWeight(stored.reshape(-1, weight.shape[1])[:rows], best_scales, best_zero_points, fmt)


def _dequantize_blocks(levels: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                       fmt: WeightFormat) -> np.ndarray:
    """The weights that ``levels`` (float32, blocked, from ``_round_blocks``) stand for, as DequantizeLinear
    computes them; may overwrite ``levels``."""
    if fmt.dtype == "nf4":
        return NF4_CODEBOOK[levels.astype(np.intp)] * scales[:, None]
    if zero_points is not None:
        levels -= zero_points[:, None]
    levels *= scales[:, None]
    if fmt.scale_dtype == "fp16":
        return _through_float16(levels)
    return levels


def _fitted_scales(blocks: np.ndarray, levels: np.ndarray, zero_points: np.ndarray | None,
                   hessians: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """For fixed integers ``q`` the scale minimizing ``(w - s q)^T H_b (w - s q)``: ``q^T H_b w / q^T H_b q``
    per block and column (``fallback`` where the integers are all zero)."""
    centered = levels if zero_points is None else levels - zero_points[:, None]
    weighted = hessians @ centered
    numerator = (weighted * blocks).sum(1)
    denominator = (weighted * centered).sum(1)
    usable = denominator > 0
    return np.where(usable, numerator / np.where(usable, denominator, 1), fallback)


def _through_float16(array: np.ndarray) -> np.ndarray:
    """``array.astype(float16).astype(float32)``, bit for bit (both round to nearest even), with the CPU's
    conversion instructions: numpy's float16 cast is scalar code, 25x slower, and was most of the search."""
    return torch.from_numpy(array).to(torch.float16).to(torch.float32).numpy()


def _round_blocks(blocks: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                  fmt: WeightFormat) -> np.ndarray:
    """The nearest level of every weight, as float32 integers (codebook indices for nf4), blocked layout."""
    shifted = blocks / scales[:, None]
    if fmt.dtype == "nf4":
        return np.abs(shifted[..., None] - NF4_CODEBOOK).argmin(-1)
    if zero_points is not None:
        shifted += zero_points[:, None]
    low, high = fmt.levels
    return np.clip(np.round(shifted, out=shifted), low, high, out=shifted)


@functools.cache
def _workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="nanoexport-rtn")
