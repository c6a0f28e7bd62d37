"""Block-wise weight quantization arithmetic: weight matrices ``[K, N]`` (input dim first), blocks along K.

Everything here works on one matrix at a time, numpy in and out (torch inside, for every core). A block
holds ``block_size`` consecutive input rows of one output column and has one scale (and one zero point when
asymmetric); a last partial block is allowed only when the caller pads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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
        zero_points = None if self.zero_points is None else torch.from_numpy(self.zero_points.astype(np.float32))
        values = _block_view(torch.from_numpy(self.values.astype(np.float32)), self.format.block_size)
        weights = _dequantize(values, torch.from_numpy(self.scales.astype(np.float32)), zero_points, self.format)
        return _rows(weights, self.values.shape[0]).numpy()


def expand_blocks(per_block: np.ndarray, block_size: int, rows: int) -> np.ndarray:
    """``[blocks, N]`` -> ``[rows, N]``, each block's entry repeated over its rows."""
    return np.repeat(per_block, block_size, axis=0)[:rows]


# The arithmetic below runs in torch, which spreads each elementwise step over every core; the numpy
# functions are its interface for the quantizers that work in numpy (GPTQ row by row, AWQ, the budget).

def _float_type(fmt: WeightFormat) -> torch.dtype:
    return torch.float16 if fmt.scale_dtype == "fp16" else torch.float32


def _stored_scale(scale: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    info = torch.finfo(_float_type(fmt))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    stored = scale.abs().clamp(info.tiny, info.max).to(_float_type(fmt)).float()
    return torch.copysign(stored, scale.float())


def _block_view(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    rows, columns = weight.shape
    blocks = -(-rows // block_size)
    if blocks * block_size == rows:
        return weight.reshape(blocks, block_size, columns)
    padded = torch.zeros((blocks * block_size, columns), dtype=torch.float32)
    padded[:rows] = weight
    return padded.reshape(blocks, block_size, columns)


@dataclass
class _BlockExtremes:
    """What the range of each block depends on, computed once for every candidate narrowing."""

    magnitude: torch.Tensor  # largest |w| (nf4)
    signed_max: torch.Tensor  # the value of largest magnitude, with its sign (symmetric)
    minimum: torch.Tensor  # min(block, 0) (asymmetric)
    maximum: torch.Tensor  # max(block, 0) (asymmetric)

    @classmethod
    def of(cls, blocks: torch.Tensor) -> _BlockExtremes:
        index = blocks.abs().argmax(1, keepdim=True)
        signed_max = torch.take_along_dim(blocks, index, 1)[:, 0]
        return cls(signed_max.abs(), signed_max, blocks.amin(1).clamp(max=0), blocks.amax(1).clamp(min=0))


def _range_scales(extremes: _BlockExtremes, fmt: WeightFormat, shrink: float | torch.Tensor = 1.0):
    """Scales (and zero points) ``[blocks, N]``; the range arithmetic in float64, as the scale is then rounded
    once to its stored type."""
    low, high = fmt.levels
    if fmt.dtype == "nf4":
        return _stored_scale(extremes.magnitude.double() * shrink, fmt), None
    if fmt.asymmetric:
        minimum, maximum = extremes.minimum.double() * shrink, extremes.maximum.double() * shrink
        scales = _stored_scale((maximum - minimum) / (high - low), fmt)
        return scales, torch.clamp(torch.round(low - minimum / scales), low, high).float()
    midpoint = (high + 1) // 2 if fmt.dtype == "uint4" else 0
    scales = _stored_scale(extremes.signed_max.double() * shrink / (low - midpoint), fmt)
    return scales, (torch.full_like(scales, midpoint) if midpoint else None)


def _quantize(blocks: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
              fmt: WeightFormat) -> torch.Tensor:
    """``[blocks, block_size, N]`` weights -> integers of the same shape (codebook indices for nf4)."""
    shifted = blocks / scales[:, None]
    if fmt.dtype == "nf4":
        return (shifted[..., None] - torch.from_numpy(NF4_CODEBOOK)).abs().argmin(-1).to(torch.uint8)
    low, high = fmt.levels
    if zero_points is not None:
        shifted = shifted + zero_points[:, None]
    return torch.clamp(torch.round(shifted), low, high).to(torch.int8 if low < 0 else torch.uint8)


def _dequantize(values: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                fmt: WeightFormat) -> torch.Tensor:
    """Integers ``[blocks, block_size, N]`` -> the weights DequantizeLinear gives, same shape."""
    if fmt.dtype == "nf4":
        return torch.from_numpy(NF4_CODEBOOK)[values.long()] * scales[:, None]
    levels = values.float()
    if zero_points is not None:
        levels = levels - zero_points[:, None]
    # DequantizeLinear computes in its scale's type: the product is rounded to fp16 (exact in fp32 first).
    return (levels * scales[:, None]).to(_float_type(fmt)).float()


def _rounding_error(blocks: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                    fmt: WeightFormat, row_weight: torch.Tensor | None) -> torch.Tensor:
    """Squared error of each block ``[blocks, N]`` rounded under ``scales``: ``_dequantize(_quantize(...))``
    minus the weights, fused into in-place steps on one buffer (this is the hot loop of ``rtn``)."""
    if fmt.dtype == "nf4":
        error = _dequantize(_quantize(blocks, scales, zero_points, fmt), scales, zero_points, fmt) - blocks
    else:
        low, high = fmt.levels
        error = blocks / scales[:, None]
        if zero_points is not None:
            error.add_(zero_points[:, None]).round_().clamp_(low, high).sub_(zero_points[:, None])
        else:
            error.round_().clamp_(low, high)
        error = error.mul_(scales[:, None]).to(_float_type(fmt)).float().sub_(blocks)
    error.square_()
    if row_weight is not None:
        error.mul_(row_weight)
    return error.sum(1)


def _rows(blocks: torch.Tensor, rows: int) -> torch.Tensor:
    """``[blocks, block_size, N]`` -> ``[rows, N]``, without the padding of a last partial block."""
    return blocks.reshape(-1, blocks.shape[-1])[:rows]


def _numpy(value: torch.Tensor | None) -> np.ndarray | None:
    return None if value is None else value.numpy()


def stored_scale(scale: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """The scale as it will be stored (fp16 rounding included), never zero, as float32 for arithmetic."""
    return _stored_scale(torch.from_numpy(np.asarray(scale, np.float64)), fmt).numpy()


def block_view(weight: np.ndarray, block_size: int) -> np.ndarray:
    """``[K, N]`` -> ``[blocks, block_size, N]``, a last partial block padded with zeros."""
    return _block_view(torch.from_numpy(np.asarray(weight, np.float32)), block_size).numpy()


def block_range_scales(weight: np.ndarray, fmt: WeightFormat, shrink: np.ndarray | float = 1.0):
    """Round-to-nearest scales (and zero points) of every block, its range narrowed by ``shrink``.

    Symmetric integers map the block's largest-magnitude value to the most negative level (-8 for int4),
    which has one more step than the positive side; asymmetric ones spread [min, max] over all levels.
    """
    extremes = _BlockExtremes.of(_block_view(torch.from_numpy(np.asarray(weight, np.float32)), fmt.block_size))
    shrink = torch.from_numpy(np.asarray(shrink, np.float64)) if isinstance(shrink, np.ndarray) else float(shrink)
    scales, zero_points = _range_scales(extremes, fmt, shrink)
    return scales.numpy(), _numpy(zero_points)


def quantize_with(weight: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, fmt: WeightFormat):
    """Round ``weight`` to the nearest level under fixed per-block ``scales``/``zero_points``."""
    zero = None if zero_points is None else torch.from_numpy(np.asarray(zero_points, np.float32))
    blocks = _block_view(torch.from_numpy(np.asarray(weight, np.float32)), fmt.block_size)
    values = _quantize(blocks, torch.from_numpy(np.asarray(scales, np.float32)), zero, fmt)
    return _rows(values, weight.shape[0]).numpy()


def rtn(weight: np.ndarray, fmt: WeightFormat, importance: np.ndarray | None = None,
        grid: int = 20) -> QuantizedWeight:
    """Round to nearest, with each block's scale chosen from ``grid`` narrowed ranges to minimize its error.

    The error of a block is the squared difference summed over its rows, weighted by ``importance`` (the mean
    squared activation of each input row) when given; with ``grid`` 1 the scale is the plain range.
    """
    rows = weight.shape[0]
    blocks = _block_view(torch.from_numpy(np.ascontiguousarray(weight, np.float32)), fmt.block_size)
    row_weight = None
    if importance is not None:
        row_weight = _block_view(torch.from_numpy(np.asarray(importance, np.float32))[:, None], fmt.block_size)
    extremes = _BlockExtremes.of(blocks)
    best_error = best_scales = best_zero_points = None
    for shrink in np.linspace(1.0, 0.5, grid) if grid > 1 else [1.0]:
        scales, zero_points = _range_scales(extremes, fmt, float(shrink))
        block_error = _rounding_error(blocks, scales, zero_points, fmt, row_weight)
        if best_error is None:
            best_error, best_scales, best_zero_points = block_error, scales, zero_points
            continue
        better = block_error < best_error
        best_error = torch.where(better, block_error, best_error)
        best_scales = torch.where(better, scales, best_scales)
        if zero_points is not None:
            best_zero_points = torch.where(better, zero_points, best_zero_points)
    values = _rows(_quantize(blocks, best_scales, best_zero_points, fmt), rows)
    return QuantizedWeight(values.numpy(), best_scales.numpy(), _numpy(best_zero_points), fmt)
