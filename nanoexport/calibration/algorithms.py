"""Data-aware weight quantizers: GPTQ and AWQ, on one weight matrix ``[K, N]`` and its input statistics.

Both see the layer through what calibration recorded about its input ``x`` (``[tokens, K]``):
GPTQ the Hessian proxy ``H = 2 x^T x / tokens``, AWQ the mean magnitude of each input channel and a
sample of input rows.
"""

from __future__ import annotations

import numpy as np

from nanoexport.calibration.blocks import (
    QuantizedWeight,
    WeightFormat,
    block_range_scales,
    quantize_with,
    rtn,
    stored_scale,
)

GPTQ_COLUMN_BATCH = 128  # input rows updated together before the lazy batch update of the rest


def gptq(weight: np.ndarray, hessian: np.ndarray, fmt: WeightFormat, damp: float = 0.01,
         act_order: bool = False) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): quantize input rows one at a time, spreading each row's rounding error
    over the rows not yet quantized through the inverse Hessian.

    Block scales are set from the error-updated weights when the first row of a block comes up. With
    ``act_order`` rows go in order of decreasing Hessian diagonal while the scales stay those of the
    original row order ("static groups"), so the stored blocks are still contiguous runs of rows.
    """
    weight = weight.astype(np.float64).copy()
    rows = weight.shape[0]
    hessian = hessian.astype(np.float64).copy()
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[dead] = 0.0
    hessian[np.diag_indices(rows)] += damp * np.mean(np.diag(hessian))

    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(rows)
    static_scales = block_range_scales(weight.astype(np.float32), fmt) if act_order else None
    weight = weight[order]
    hessian = hessian[np.ix_(order, order)]
    # Upper Cholesky factor of H^-1: row i holds how row i's error propagates to the rows after it.
    inverse = np.linalg.inv(np.linalg.cholesky(hessian))
    upper = np.linalg.cholesky(inverse.T @ inverse).T

    block_count = -(-rows // fmt.block_size)
    scales = np.zeros((block_count, weight.shape[1]), np.float32)
    zero_points = np.zeros_like(scales) if fmt.has_zero_point else None
    if static_scales is not None:
        scales[:], zero_points = static_scales[0], static_scales[1]
    values = np.zeros(weight.shape, np.uint8 if fmt.levels[0] >= 0 else np.int8)

    for start in range(0, rows, GPTQ_COLUMN_BATCH):
        end = min(start + GPTQ_COLUMN_BATCH, rows)
        errors = np.zeros((end - start, weight.shape[1]))
        for i in range(start, end):
            original_row = order[i]
            block = original_row // fmt.block_size
            if not act_order and original_row % fmt.block_size == 0:
                block_scales, block_zero_points = block_range_scales(weight[i : i + fmt.block_size], fmt)
                scales[block] = block_scales[0]
                if zero_points is not None:
                    zero_points[block] = block_zero_points[0]
            row_format = WeightFormat(fmt.dtype, 1, fmt.asymmetric, fmt.scale_dtype)
            row_zero = None if zero_points is None else zero_points[block : block + 1]
            quantized = quantize_with(weight[i : i + 1].astype(np.float32), scales[block : block + 1], row_zero,
                                      row_format)
            values[original_row] = quantized[0]
            dequantized = QuantizedWeight(quantized, scales[block : block + 1], row_zero, row_format).dequantize()[0]
            error = (weight[i] - dequantized) / upper[i, i]
            weight[i + 1 : end] -= np.outer(upper[i, i + 1 : end], error)
            errors[i - start] = error
        weight[end:] -= upper[start:end, end:].T @ errors
    return QuantizedWeight(values, scales, zero_points, fmt)


def awq(weight: np.ndarray, channel_magnitude: np.ndarray, inputs: np.ndarray, fmt: WeightFormat,
        hessian: np.ndarray | None = None, grid: int = 20) -> tuple[QuantizedWeight, np.ndarray]:
    """AWQ (Lin et al. 2023): protect the weights of salient input channels by scaling them up before
    quantization and the inputs down by the same factor.

    Searches ``s = magnitude^alpha`` over ``alpha`` in [0, 1) for the smallest output error on the sampled
    ``inputs``; returns the quantized ``diag(s) @ weight`` and ``s`` (the graph must divide its input by it).
    With ``hessian`` the block scales are then refitted by ``estimate_scales``.
    """
    weight = weight.astype(np.float32)
    inputs = inputs.astype(np.float32)
    reference = inputs @ weight
    importance = (inputs**2).mean(0)
    best = None
    for alpha in np.arange(grid) / grid:
        scale = np.maximum(channel_magnitude, 1e-8) ** alpha
        scale = (scale / np.sqrt(scale.max() * scale.min())).astype(np.float32)
        quantized = rtn(weight * scale[:, None], fmt, importance / scale**2, grid=1)
        error = float((((inputs / scale) @ quantized.dequantize() - reference) ** 2).mean())
        if best is None or error < best[0]:
            best = (error, scale)
    scale = best[1]
    # The chosen scaling, then the per-block scale search that plain RTN does, under the same importance,
    # then (given the Hessian) scales refitted to the layer's output.
    scaled = weight * scale[:, None]
    quantized = rtn(scaled, fmt, importance / scale**2)
    if hessian is not None:
        quantized = estimate_scales(scaled, quantized, hessian / np.outer(scale, scale))
    return quantized, scale



def estimate_scales(weight: np.ndarray, quantized: QuantizedWeight, hessian: np.ndarray,
                    rounds: int = 3) -> QuantizedWeight:
    """Refit each block's scale to the layer's output, not its weights (like NNCF's scale estimation).

    For fixed integers ``q`` the scale minimizing ``(w - s q)^T H_b (w - s q)`` (``H_b`` the block's part of
    the Hessian) has a closed form; the integers are then re-rounded under it. Each block and column keeps
    whichever of the candidates has the least output error.
    """
    fmt = quantized.format
    rows, columns = weight.shape
    size = fmt.block_size
    if rows % size or fmt.dtype == "nf4":
        return quantized
    count = rows // size
    block_hessians = np.stack([hessian[b * size : (b + 1) * size, b * size : (b + 1) * size] for b in range(count)])
    blocks = weight.astype(np.float64).reshape(count, size, columns)

    def output_error(candidate: QuantizedWeight) -> np.ndarray:
        error = blocks - candidate.dequantize().reshape(count, size, columns)
        return (error * (block_hessians @ error)).sum(1)

    best, best_error = quantized, output_error(quantized)
    for _ in range(rounds):
        levels = best.values.astype(np.float64)
        if best.zero_points is not None:
            levels = levels - np.repeat(best.zero_points, size, axis=0)
        levels = levels.reshape(count, size, columns)
        weighted = block_hessians @ levels
        numerator, denominator = (weighted * blocks).sum(1), (weighted * levels).sum(1)
        fitted = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), best.scales)
        scales = stored_scale(fitted.astype(np.float32), fmt)
        candidate = QuantizedWeight(quantize_with(weight, scales, best.zero_points, fmt), scales, best.zero_points,
                                    fmt)
        error = output_error(candidate)
        better = error < best_error
        if not better.any():
            break
        expanded = np.repeat(better, size, axis=0)
        best = QuantizedWeight(np.where(expanded, candidate.values, best.values),
                               np.where(better, candidate.scales, best.scales), best.zero_points, fmt)
        best_error = np.where(better, error, best_error)
    return best
