"""Data-aware weight quantizers: GPTQ and AWQ, on one weight matrix ``[K, N]`` and its input statistics.

Both see the layer through what calibration recorded about its input ``x`` (``[tokens, K]``): the Hessian
proxy ``H = 2 x^T x / tokens``, and for AWQ also the mean magnitude of each input channel. Both choose
block scales by the data (``rtn(hessian=...)``: clip search and scale estimation against the output error),
and both keep our RTN's result for a layer where it has the smaller output error on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanoexport.calibration.blocks import RTN_COLUMNS, QuantizedWeight, WeightFormat, quantize_with, rtn

GPTQ_COLUMN_BATCH = 128  # input rows updated together before the lazy batch update of the rest
GPTQ_PIECE_BYTES = 64 << 20  # float64 bytes of the output columns worked on at once


def gptq(weight: np.ndarray, hessian: np.ndarray, fmt: WeightFormat, damp: float = 0.1,
         act_order: bool = False) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): quantize input rows one at a time, spreading each row's rounding error
    over the rows not yet quantized through the inverse Hessian.

    Block scales are set from the error-updated weights when the first row of a block comes up, by the
    data-aware search of ``rtn(hessian=...)`` on that block. With ``act_order`` rows go in order of
    decreasing Hessian diagonal while the scales stay those of the original row order ("static groups"), so
    the stored blocks are still contiguous runs of rows. Where our RTN (plain or data-aware) has the smaller
    output error on the calibration data, the layer keeps it.

    Output columns never mix, so they are worked on in pieces of ``GPTQ_PIECE_BYTES`` of float64: the whole
    matrix in float64, with its error-updated copy and three candidates' dequantized weights, held ten times
    its float32 bytes (5.5 GB for Qwen2.5-0.5B's tied output head). Each candidate's output error is summed
    over the pieces, and the layer keeps the candidate with the least total, as one piece would choose.
    """
    weight = np.asarray(weight, np.float32)
    rows, columns = weight.shape
    factors = _factors(hessian, damp, act_order, fmt.block_size)

    # Whole multiples of rtn's own column pieces, so that its searches see the same pieces as on the whole
    # matrix (its batched matmuls round the same way): the result is the one-piece result.
    width = max(1, GPTQ_PIECE_BYTES // (8 * rows * RTN_COLUMNS)) * RTN_COLUMNS
    pieces: list[list[QuantizedWeight]] = []
    totals = np.zeros(3)
    for start in range(0, columns, width):
        piece = weight[:, start : start + width]
        candidates = [_gptq_columns(piece, factors, fmt), rtn(piece, fmt),
                      rtn(piece, fmt, hessian=hessian)]
        totals += [output_error(piece, candidate.dequantize(), hessian) for candidate in candidates]
        pieces.append(candidates)
    best = int(np.argmin(totals))  # the first of equal totals, as min() kept it
    chosen = [candidates[best] for candidates in pieces]
    if len(chosen) == 1:
        return chosen[0]
    zero_points = None if chosen[0].zero_points is None else np.concatenate([q.zero_points for q in chosen], 1)
    return QuantizedWeight(np.concatenate([q.values for q in chosen], 1),
                           np.concatenate([q.scales for q in chosen], 1), zero_points, fmt)


@dataclass
class _Factors:
    """What GPTQ's row-by-row pass reads of a layer's damped Hessian ``H``."""

    dead: np.ndarray  # rows whose input is always zero
    order: np.ndarray  # the order rows are quantized in
    damped: np.ndarray | None  # ``H`` itself, kept only for act_order's static scales
    blocks: list[np.ndarray]  # without act_order: the diagonal blocks of ``H``, ``block_size`` rows each
    upper: np.ndarray  # the upper Cholesky factor of ``H^-1`` in row order


def _factors(hessian: np.ndarray, damp: float, act_order: bool, block_size: int) -> _Factors:
    """The damped Hessian factored for GPTQ: row i of the upper Cholesky factor of its inverse holds how row
    i's error propagates to the rows after it.

    Every [K, K] float64 matrix is dropped as soon as it has served: numpy's ``inv`` holds three of its own
    and ``cholesky`` two. With two copies of the damped Hessian and every intermediate alive to the end, a
    4864-row layer held eight such matrices with the caller's Gram and Hessian (1.4 GB, the peak of a GPTQ
    export of Qwen2.5-0.5B); now five at most with the caller's Hessian (six with act_order), and two after.
    """
    rows = len(hessian)
    damped = np.array(hessian, np.float64)
    dead = np.diag(damped) == 0
    damped[dead, dead] = 1.0
    damped[np.diag_indices(rows)] += damp * np.mean(np.diag(damped))
    order = np.argsort(-np.diag(damped), kind="stable") if act_order else np.arange(rows)
    ordered = damped[np.ix_(order, order)] if act_order else damped
    lower = np.linalg.cholesky(ordered)
    del ordered
    blocks = [] if act_order else [damped[start : start + block_size, start : start + block_size].copy()
                                   for start in range(0, rows, block_size)]
    if not act_order:
        damped = None
    inverse = np.linalg.inv(lower)
    del lower
    product = inverse.T @ inverse
    del inverse
    return _Factors(dead, order, damped, blocks, np.linalg.cholesky(product).T)


def _gptq_columns(piece: np.ndarray, factors: _Factors, fmt: WeightFormat) -> QuantizedWeight:
    """GPTQ's row-by-row pass over some output columns of a layer, given its factored Hessian."""
    order, upper, act_order = factors.order, factors.upper, factors.damped is not None
    weight = piece.astype(np.float64)
    weight[factors.dead] = 0.0
    rows = weight.shape[0]
    static = rtn(weight.astype(np.float32), fmt, hessian=factors.damped) if act_order else None
    weight = weight[order]
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
                searched = rtn(weight[rows_of_block].astype(np.float32), fmt, hessian=factors.blocks[block])
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
    return QuantizedWeight(values, scales, zero_points, fmt)


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
    hessian = np.asarray(hessian, np.float64)  # read only: no copy of a [K, K] matrix
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
