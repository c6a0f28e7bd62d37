"""Data-aware weight quantizers: GPTQ and AWQ, on one weight matrix ``[K, N]`` and its input statistics.

Both see the layer through what calibration recorded about its input ``x`` (``[tokens, K]``): the Hessian
proxy ``H = 2 x^T x / tokens``, and for AWQ also the mean magnitude of each input channel. Both choose
block scales by the data (``rtn(hessian=...)``: clip search and scale estimation against the output error),
and both keep our RTN's result for a layer where it has the smaller output error on the calibration data.
"""

from __future__ import annotations

import numpy as np

from nanoexport.calibration.blocks import QuantizedWeight, WeightFormat, quantize_with, rtn

GPTQ_COLUMN_BATCH = 128  # input rows updated together before the lazy batch update of the rest


def gptq(weight: np.ndarray, hessian: np.ndarray, fmt: WeightFormat, damp: float = 0.1,
         act_order: bool = False) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): quantize input rows one at a time, spreading each row's rounding error
    over the rows not yet quantized through the inverse Hessian.

    Block scales are set from the error-updated weights when the first row of a block comes up, by the
    data-aware search of ``rtn(hessian=...)`` on that block. With ``act_order`` rows go in order of
    decreasing Hessian diagonal while the scales stay those of the original row order ("static groups"), so
    the stored blocks are still contiguous runs of rows. Where our RTN (plain or data-aware) has the smaller
    output error on the calibration data, the layer keeps it.
    """
    original, original_hessian = weight.astype(np.float32), hessian
    weight = weight.astype(np.float64).copy()
    rows = weight.shape[0]
    hessian = hessian.astype(np.float64).copy()
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[dead] = 0.0
    hessian[np.diag_indices(rows)] += damp * np.mean(np.diag(hessian))

    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(rows)
    static = rtn(weight.astype(np.float32), fmt, hessian=hessian) if act_order else None
    weight = weight[order]
    hessian = hessian[np.ix_(order, order)]
    # Upper Cholesky factor of H^-1: row i holds how row i's error propagates to the rows after it.
    inverse = np.linalg.inv(np.linalg.cholesky(hessian))
    upper = np.linalg.cholesky(inverse.T @ inverse).T

    block_count = -(-rows // fmt.block_size)
    scales = np.zeros((block_count, weight.shape[1]), np.float32)
    zero_points = np.zeros_like(scales) if fmt.has_zero_point else None
    if static is not None:
        scales[:], zero_points = static.scales, static.zero_points
    values = np.zeros(weight.shape, np.uint8 if fmt.levels[0] >= 0 else np.int8)

    for start in range(0, rows, GPTQ_COLUMN_BATCH):
        end = min(start + GPTQ_COLUMN_BATCH, rows)
        errors = np.zeros((end - start, weight.shape[1]))
        for i in range(start, end):
            original_row = order[i]
            block = original_row // fmt.block_size
            if not act_order and original_row % fmt.block_size == 0:
                rows_of_block = slice(i, i + fmt.block_size)
                searched = rtn(weight[rows_of_block].astype(np.float32), fmt,
                               hessian=hessian[rows_of_block, rows_of_block])
                scales[block] = searched.scales[0]
                if zero_points is not None:
                    zero_points[block] = searched.zero_points[0]
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
    candidates = [QuantizedWeight(values, scales, zero_points, fmt), rtn(original, fmt),
                  rtn(original, fmt, hessian=original_hessian)]
    return min(candidates, key=lambda candidate: output_error(original, candidate.dequantize(), original_hessian))


def output_error(weight: np.ndarray, dequantized: np.ndarray, hessian: np.ndarray) -> float:
    """The layer's output error on its calibration inputs, ``tr(E^T H E)`` with ``E`` the weight error
    (``H = x^T x`` up to a constant: the mean squared output difference, up to the same constant)."""
    error = (dequantized - weight).astype(np.float64)
    return float((error * (hessian @ error)).sum())


def awq(weight: np.ndarray, channel_magnitude: np.ndarray, hessian: np.ndarray, fmt: WeightFormat,
        grid: int = 20) -> tuple[QuantizedWeight, np.ndarray | None]:
    """AWQ (Lin et al. 2023) with its clip search and scale estimation: protect the weights of salient input
    channels by scaling them up before quantization and the inputs down by the same factor.

    The scaling ``s = magnitude^alpha``, ``alpha`` in (0, 1), is searched for the least output error on the
    calibration inputs (measured through their Hessian, every calibration token counted) with plain rounding,
    as the paper does; the chosen scaling is then quantized with the data-aware clip search and scale
    estimation of ``rtn(hessian=...)``. The unscaled weight, by our plain RTN and by that same data-aware
    search, competes with it, so on the calibration data the result is never worse than RTN's. Returns the
    quantized ``diag(s) @ weight`` and ``s`` (the graph must divide its input by it), or ``None`` for ``s``
    when leaving the weight unscaled won.
    """
    weight = weight.astype(np.float32)
    hessian = hessian.astype(np.float64)
    best_alpha = None
    for alpha in np.arange(1, grid) / grid:
        scale = _awq_scale(channel_magnitude, alpha)
        searched = rtn(weight * scale[:, None], fmt, grid=1).dequantize() / scale[:, None]
        error = output_error(weight, searched, hessian)
        if best_alpha is None or error < best_alpha[0]:
            best_alpha = (error, scale)
    scale = best_alpha[1]
    candidates = [
        (rtn(weight, fmt), None),
        (rtn(weight, fmt, hessian=hessian), None),
        (rtn(weight * scale[:, None], fmt, hessian=hessian / np.outer(scale, scale)), scale),
    ]

    def error_of(candidate: tuple[QuantizedWeight, np.ndarray | None]) -> float:
        quantized, input_scale = candidate
        dequantized = quantized.dequantize()
        if input_scale is not None:
            dequantized = dequantized / input_scale[:, None]
        return output_error(weight, dequantized, hessian)

    return min(candidates, key=error_of)


def _awq_scale(channel_magnitude: np.ndarray, alpha: float) -> np.ndarray:
    scale = np.maximum(channel_magnitude, 1e-8) ** alpha
    return (scale / np.sqrt(scale.max() * scale.min())).astype(np.float32)
