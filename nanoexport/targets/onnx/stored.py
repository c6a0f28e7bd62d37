"""The quantized weights an onnx artifact stores, read back for the manifest's digests.

4- and 8-bit weights run as ``MatMulNBits`` (and a quantized embedding as ``GatherBlockQuantized``) over bytes
named after the canonical initializer with ``.nbits`` or ``.ubits`` appended: ``[N, blocks, block * bits / 8]``,
4-bit integers two a byte, low nibble first, fp32 scales ``[N, blocks]``. ``.nbits`` bytes hold signed
integers + 2^(bits-1) (the kernels' default zero point), their zero points shifted alike; ``.ubits`` bytes hold
unsigned integers as they are. Other quantized weights stay blocked ``DequantizeLinear`` as in the canonical
graph.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from nanoexport.digests import QuantizedWeight, blocked_dequantize_weights, layer_name, read_array, unpack_nibbles
from nanoexport.targets.onnx import DECODE_FILE, MODEL_FILE, PREFILL_FILE

# The kernels' bytes are named after the canonical integers plus one of these, which says how to read them.
SHIFTED, UNSHIFTED = ".nbits", ".ubits"


def stored_weights(folder: Path) -> Iterator[tuple[str, QuantizedWeight]]:
    """Each quantized weight of ``folder``'s graphs as (canonical layer name, integers, scales, zero points),
    each once (prefill and decode graphs read the same weights)."""
    seen = set()
    for file_name in (MODEL_FILE, PREFILL_FILE, DECODE_FILE):
        if not (folder / file_name).is_file():
            continue
        model = ir.load(folder / file_name)
        # One weight at a time: a list of them held every layer's unpacked integers at once (int16: 7.6 GB for
        # the 3.8B model; reading its artifact back peaked at 9.5 GB).
        for name, weight in itertools.chain(_kernel_weights(model), blocked_dequantize_weights(model)):
            if name not in seen:
                seen.add(name)
                yield name, weight


def _kernel_weights(model: ir.Model) -> Iterator[tuple[str, QuantizedWeight]]:
    for node in model.graph:
        if node.domain != "com.microsoft" or node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        bits = node.attributes.get_int("bits", 4)
        if node.op_type == "MatMulNBits":
            packed, scales = node.inputs[1], node.inputs[2]
            points = node.inputs[3] if len(node.inputs) > 3 else None
            columns, rows = node.attributes.get_int("N"), node.attributes.get_int("K")
        else:
            packed, scales = node.inputs[0], node.inputs[2]
            points = node.inputs[3] if len(node.inputs) > 3 else None
            # The bytes (and zero points) shared with a tied output head, reshaped for the lookup.
            packed, points = (value.producer().inputs[0] if value is not None and value.producer() is not None
                              and value.producer().op_type == "Reshape" else value for value in (packed, points))
            if packed.const_value is None or scales.const_value is None:
                continue
            if not packed.name.endswith((SHIFTED, UNSHIFTED)):  # ours unchanged (asymmetric)
                zero_points = read_array(points.const_value) if points is not None else None
                yield layer_name(packed.name), QuantizedWeight(read_array(packed.const_value),
                                                               read_array(scales.const_value), zero_points)
                continue
            columns = scales.shape[0]
            rows = packed.const_value.size * 8 // bits // columns
        if packed.const_value is None or scales.const_value is None:
            continue
        shift = (1 << (bits - 1)) if packed.name.endswith(SHIFTED) else 0
        integers = _unpacked(read_array(packed.const_value), bits).reshape(columns, rows).astype(np.int16) - shift
        zero_points = None
        if points is not None:
            blocks = scales.shape[1]
            zero_points = _unpacked(read_array(points.const_value), bits).reshape(columns, -1)[:, :blocks]
            zero_points = zero_points.astype(np.int16) - shift
        yield layer_name(packed.name, SHIFTED, UNSHIFTED), QuantizedWeight(integers, read_array(scales.const_value),
                                                                          zero_points)



def _unpacked(stored: np.ndarray, bits: int) -> np.ndarray:
    """The unsigned integers of a kernel's bytes: one a byte at 8 bits, two (low nibble first) at 4."""
    return stored.reshape(-1) if bits == 8 else unpack_nibbles(stored, signed=False)
