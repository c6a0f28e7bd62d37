"""Schedules of our weight-matmul kernels on CPUs.

TVM's default CPU rules (dlight's GEMV) take only matrix-vector products whose reduction runs along the
weight's contiguous axis. Our weights are ``[K, N]`` (the canonical graph's ``x @ W``), so the reduction runs
across rows: each kernel here is scheduled to give every thread a strip of output columns, walk the rows
once, and compute a vector of neighbouring columns per row (contiguous in the weight, packed or not).
Without this the legalized kernels run on one core, one element at a time.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from nanoexport.targets.tvm.kernels import DEQUANTIZED_WEIGHT, TRANSPOSED_MATMULS, WEIGHT_MATMULS

TILES = (64, 32, 16, 8, 4, 2)  # columns a thread computes per row: the largest that divides N
ROWS = (4, 2)  # rows (tokens) computed together per pass over a weight strip


def _divisor(extent: int, choices: tuple[int, ...]) -> int:
    return next((choice for choice in choices if extent % choice == 0), 1)


def _block(schedule: s_tir.Schedule, name: str):
    try:
        return schedule.get_sblock(name)
    except Exception:  # TVM raises its own error for a block the function does not hold
        return None


def _schedule(function: tirx.PrimFunc, block_name: str) -> tirx.PrimFunc:
    schedule = s_tir.Schedule(function)
    block = schedule.get_sblock(block_name)
    producer = _block(schedule, DEQUANTIZED_WEIGHT)
    *spatial, rows, columns, reduction = schedule.get_loops(block)
    many = int(schedule.get(rows).extent) > 1
    if producer is not None and not many:
        schedule.compute_inline(producer)  # one token: each weight element dequantized where it is used
        producer = None
    tile = _divisor(int(schedule.get(columns).extent), TILES)
    # Several tokens (prefill): a thread's strip of columns is dequantized once and serves every token, a
    # few tokens per pass over it.
    row_tile = _divisor(int(schedule.get(rows).extent), ROWS)
    rows_outer, rows_inner = schedule.split(rows, factors=[None, row_tile])
    outer, inner = schedule.split(columns, factors=[None, tile])
    schedule.reorder(*spatial, outer, rows_outer, reduction, rows_inner, inner)
    strips = schedule.fuse(*spatial, outer)
    schedule.parallel(strips)
    if producer is not None:
        schedule.compute_at(producer, strips)
    init = schedule.decompose_reduction(block, reduction)
    # The update runs its rows and columns unrolled, which LLVM's SLP vectorizer turns into vector code (an
    # explicit vectorize refuses the reduction once its init is split off).
    for loop in (rows_inner, inner):
        if int(schedule.get(loop).extent) > 1:
            schedule.unroll(loop)
    if tile > 1:
        schedule.vectorize(schedule.get_loops(init)[-1])
    return schedule.mod["main"].with_attr("tir.is_scheduled", True)


def _schedule_transposed(function: tirx.PrimFunc, block_name: str) -> tirx.PrimFunc:
    """``x @ W.T`` with ``W`` ``[N, K]``: threads over output columns, each row of ``W`` reduced in vector-wide
    partial sums (rfactor), then summed."""
    schedule = s_tir.Schedule(function)
    block = schedule.get_sblock(block_name)
    producer = _block(schedule, DEQUANTIZED_WEIGHT)
    if producer is not None:
        schedule.compute_inline(producer)
    *spatial, columns, reduction = schedule.get_loops(block)
    width = int(schedule.get(reduction).extent)
    lanes = next((tile for tile in (16, 8, 4, 2) if width % tile == 0), 1)
    parallel = schedule.fuse(*spatial, columns)
    if lanes > 1:
        outer, inner = schedule.split(reduction, factors=[None, lanes])
        partial = schedule.rfactor(inner, 0)
        *_, partial_outer, partial_inner = schedule.get_loops(partial)
        schedule.reorder(partial_outer, partial_inner)
        schedule.vectorize(partial_inner)
        schedule.compute_at(partial, parallel)
    schedule.parallel(parallel)
    return schedule.mod["main"].with_attr("tir.is_scheduled", True)


@tvm.transform.module_pass(opt_level=0, name="ScheduleWeightMatmuls")
def schedule_weight_matmuls(module: tvm.IRModule, _context) -> tvm.IRModule:
    """Every PrimFunc holding one of our weight-matmul blocks, scheduled as above (fused epilogues as they are)."""
    updated = {}
    for global_var, function in module.functions.items():
        if not isinstance(function, tirx.PrimFunc) or function.attrs and function.attrs.get("tir.is_scheduled"):
            continue
        for name in (*WEIGHT_MATMULS, *TRANSPOSED_MATMULS):
            if _block(s_tir.Schedule(function), name) is None:
                continue
            # A quantized x @ W.T reads its [K, N] view by strips too: on the 0.5B config's int4 head (151936 x
            # 896) 54 ms a decode call against 88 ms with the row-wise partial sums below.
            transposed = name in TRANSPOSED_MATMULS and name != "dequantize_matmul_transposed"
            updated[global_var] = _schedule_transposed(function, name) if transposed else _schedule(function, name)
            break
    for global_var, function in updated.items():
        module[global_var] = function
    return module
