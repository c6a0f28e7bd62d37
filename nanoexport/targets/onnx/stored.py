"""The quantized weights an onnx artifact stores, read back for the manifest's digests.

4-bit weights run as ``MatMulNBits`` (and a quantized embedding as ``GatherBlockQuantized``) over bytes named
after the canonical initializer with ``.nbits`` appended: ``[N, blocks, block / 2]``, two integers a byte, low
nibble first, signed integers stored +8 (the kernel's default zero point), fp32 scales ``[N, blocks]``. Other
quantized weights stay blocked ``DequantizeLinear`` as in the canonical graph.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from nanoexport.digests import QuantizedWeight, blocked_dequantize_weights, layer_name, read_array, unpack_nibbles
from nanoexport.targets.onnx import DECODE_FILE, MODEL_FILE, PREFILL_FILE

SUFFIX = ".nbits"
DEFAULT_ZERO_POINT = 8  # what MatMulNBits and GatherBlockQuantized subtract from bytes without zero points


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
        if node.op_type == "MatMulNBits":
            packed, scales = node.inputs[1], node.inputs[2]
            points = node.inputs[3] if len(node.inputs) > 3 else None
            columns, rows = node.attributes.get_int("N"), node.attributes.get_int("K")
        else:
            packed, scales = node.inputs[0], node.inputs[2]
            points = node.inputs[3] if len(node.inputs) > 3 else None
            if packed.producer() is not None and packed.producer().op_type == "Reshape":
                packed = packed.producer().inputs[0]  # the bytes shared with a tied output head
            if packed.const_value is None or scales.const_value is None:
                continue
            if packed.dtype != ir.DataType.UINT8:  # our integers, scales and zero points unchanged (asymmetric)
                zero_points = read_array(points.const_value) if points is not None else None
                yield layer_name(packed.name), QuantizedWeight(read_array(packed.const_value),
                                                               read_array(scales.const_value), zero_points)
                continue
            columns = scales.shape[0]
            rows = packed.const_value.size * 2 // columns
        if packed.const_value is None or scales.const_value is None:
            continue
        integers = unpack_nibbles(read_array(packed.const_value), signed=False).reshape(columns, rows).astype(np.int16)
        zero_points = None
        if points is None:
            integers -= DEFAULT_ZERO_POINT  # our signed integers, as the kernel reads them
        else:
            blocks = scales.shape[1]
            zero_points = unpack_nibbles(read_array(points.const_value), signed=False).reshape(columns, -1)[:, :blocks]
        yield layer_name(packed.name, SUFFIX), QuantizedWeight(integers, read_array(scales.const_value), zero_points)

