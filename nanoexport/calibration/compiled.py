"""The data-free clipping search of ``blocks.rtn`` as one compiled kernel.

numpy runs each of the search's ~10 array operations per narrowed range as its own pass over the weights, so
the search of the Qwen2.5-0.5B config took 15.7 s of a 34 s export. torch.compile (inductor, C++ for the CPU)
fuses a candidate's rounding, error and sum into one loop over the weights on every core: 5x faster on a
896 x 4864 matrix, after a compile that costs about 14 s once per machine (inductor keeps it in its cache)
and about 1.5 s per process after that, so ``rtn`` only brings it in for matrices large enough to pay.

The kernel does the arithmetic of the numpy search in the same order and precision
(``emulate_precision_casts`` keeps the fp16 roundings inductor would otherwise skip), so it stores the same
integers and scales: only the order of the 32-or-so additions of a block's error differs, which could break an
exact tie between two candidates differently.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

# Below this many weights in a matrix the numpy search is quick enough that a compile would not pay off: the
# bundled demo's largest matrix (256 x 1408) stays below it, Qwen2.5-0.5B's smallest merged one (896 x 896) not.
COMPILED_MIN_ELEMENTS = 1 << 19

# Block-columns per kernel call: bounds the kernel's [blocks, candidates, columns] buffers (~20 MB each).
CHUNK_BLOCK_COLUMNS = 1 << 18

_FLOAT16 = torch.finfo(torch.float16)
_FLOAT32 = torch.finfo(torch.float32)


def searched_blocks(blocks: np.ndarray, shrinks: np.ndarray, levels: tuple[int, int], midpoint: int,
                    asymmetric: bool, half_scales: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Blocked weights ``[blocks, block_size, columns]`` searched over the narrowing factors ``shrinks``:
    the integers (int8 whatever the format's signedness, blocked layout), scales and zero points
    ``[blocks, columns]`` of each block's least error candidate. ``midpoint`` is a symmetric unsigned
    format's implicit zero point (0 for signed).

    None when the kernel is unavailable: once compiling has failed in this process (no C++ compiler, say),
    the caller keeps the numpy search, which gives the same result more slowly."""
    if _failed:
        return None
    kernel = _compiled()
    weights, factors = torch.from_numpy(blocks), torch.from_numpy(np.asarray(shrinks, np.float32))
    integers = torch.empty(blocks.shape, dtype=torch.int8)
    scales, zero_points = torch.empty(blocks.shape[::2]), torch.empty(blocks.shape[::2])
    step = max(1, CHUNK_BLOCK_COLUMNS // blocks.shape[2])
    try:
        for start in range(0, len(weights), step):
            end = start + step
            integers[start:end], scales[start:end], zero_points[start:end] = kernel(
                weights[start:end], factors, float(levels[0]), float(levels[1]), float(midpoint), asymmetric,
                half_scales)
    except Exception as error:  # inductor's failures (compiler, headers) are many kinds; numpy still serves
        _give_up(error)
        return None
    return integers.numpy(), scales.numpy(), zero_points.numpy()


def _search(blocks: torch.Tensor, shrinks: torch.Tensor, low: float, high: float, midpoint: float,
            asymmetric: bool, half_scales: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[blocks, block_size, columns]`` -> the chosen candidate's integers (same shape, int8), scales and zero points
    ``[blocks, columns]``, as ``blocks._search_columns`` chooses without a Hessian (``_block_extremes``,
    ``_range_scales``, ``_round_blocks``, ``_dequantize_blocks``; the first of equal errors wins).

    Candidates go in a new dimension 1, ``[blocks, candidates, block_size, columns]``; a block's error is
    summed over dimension 2 with the columns innermost, so each column's sum runs row after row, in numpy's
    order (a tree order would break exact ties differently)."""
    factors = shrinks[None, :, None, None]
    if asymmetric:
        minimum = blocks.amin(1, keepdim=True).clamp_max(0)[:, None] * factors
        maximum = blocks.amax(1, keepdim=True).clamp_min(0)[:, None] * factors
        scales = _stored((maximum - minimum) / (high - low), half_scales)
        zero_points = torch.clamp(torch.round(low - minimum / scales), low, high)
    else:
        extreme = torch.gather(blocks, 1, blocks.abs().argmax(1, keepdim=True))[:, None]
        scales = _stored(extreme * factors / (low - midpoint), half_scales)
        zero_points = torch.full_like(scales, midpoint)
    weights = blocks[:, None]
    dequantized = (torch.clamp(torch.round(weights / scales + zero_points), low, high) - zero_points) * scales
    if half_scales:
        dequantized = dequantized.to(torch.float16).to(torch.float32)
    best = torch.square(dequantized - weights).sum(2).argmin(1, keepdim=True)[:, :, None]
    scale, zero_point = scales.gather(1, best)[:, 0], zero_points.gather(1, best)[:, 0]
    integers = torch.clamp(torch.round(blocks / scale + zero_point), low, high).to(torch.int8)
    return integers, scale[:, 0], zero_point[:, 0]


def _stored(scales: torch.Tensor, half: bool) -> torch.Tensor:
    """``blocks.stored_scale``: never zero, clipped to the stored type's range, rounded to it."""
    info = _FLOAT16 if half else _FLOAT32
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    magnitude = scales.abs().clamp(info.tiny, info.max)
    if half:
        magnitude = magnitude.to(torch.float16).to(torch.float32)
    return torch.copysign(magnitude, scales)


_failed = False


def _give_up(error: Exception) -> None:
    global _failed
    _failed = True
    log.warning("the compiled clipping search is unavailable here (%s: %s); the numpy search gives the same "
                "result more slowly", type(error).__name__, str(error).strip().splitlines()[0][:200] if str(error)
                else "")


@functools.cache
def _compiled() -> Callable[..., torch.Tensor]:
    # One kernel for every matrix shape (dynamic); no pool of compile workers, whose memory would count
    # against the export's peak.
    return torch.compile(_search, dynamic=True,
                         options={"emulate_precision_casts": True, "compile_threads": 1})
