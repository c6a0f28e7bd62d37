"""The quantized weights an openvino artifact stores, read back for the manifest's digests.

The lowering stores each linear's weights output-major (``[N, K]`` integers, ``[N, K / block]`` fp16 scales)
under its canonical initializer's name with ``.output_major`` appended (``.partN`` before it where a merged
projection was cut); an embedding table keeps its name and layout, its integers and scales in blocks
(``[N, blocks, block]``, ``[N, blocks, 1]``) where the compressed Gather reads them so. The IR keeps those names
on its Constants. 4-bit constants come back packed two to a byte.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from nanoexport.digests import QuantizedWeight, layer_name, unpack_nibbles
from nanoexport.targets.openvino.files import MODEL_FILE, WEIGHTS_FILE
from nanoexport.targets.openvino.ir_check import IrConstant, check_ir

SUFFIX = ".output_major"
QUANTIZED = re.compile(r"\.quant(?=(\.part\d+)?(\.output_major)?$)")  # the integers' name; scales: ".scale"
INTEGER_TYPES = {"i4": True, "u4": False, "i8": True, "u8": False}  # element type -> signed
ELEMENT_DTYPES = {"i8": np.int8, "u8": np.uint8, "f16": np.float16, "f32": np.float32}


def stored_weights(folder: Path) -> Iterator[tuple[str, QuantizedWeight]]:
    """Each quantized weight of ``folder``'s IR as (canonical layer name, integers, scales, zero points).

    Read from the IR's Constant records (``check_ir``'s, checked against the .bin) one weight at a time:
    OpenVINO's ``read_model`` maps the whole .bin, and every page read stayed in the process's resident memory,
    which set the peak of the Qwen2.5-1.5B export (3.6 GB, 1.3x its bf16 bytes)."""
    constants = check_ir(folder / MODEL_FILE, folder / WEIGHTS_FILE)
    with open(folder / WEIGHTS_FILE, "rb") as weights:
        for name, constant in sorted(constants.items()):
            # A linear's integers are output-major; an embedding table's (read by a Gather) stay as they were.
            blocked = len(constant.shape) in (2, 3)
            if not QUANTIZED.search(name) or constant.element_type not in INTEGER_TYPES or not blocked:
                continue
            scales = constants.get(QUANTIZED.sub(".scale", name))
            points = constants.get(QUANTIZED.sub(".zero_point", name))
            if scales is None:
                continue
            rows = constant.shape[0]
            zero_points = None if points is None else _array(weights, points).reshape(rows, -1)
            yield layer_name(name, SUFFIX), QuantizedWeight(_array(weights, constant).reshape(rows, -1),
                                                            _array(weights, scales).reshape(rows, -1), zero_points)


def _array(weights: BinaryIO, constant: IrConstant) -> np.ndarray:
    """``constant``'s values, 4-bit ones unpacked (low nibble first); ``check_ir`` placed its bytes in the file."""
    weights.seek(constant.offset)
    data = weights.read(constant.size)
    if constant.element_type in ("i4", "u4"):
        values = unpack_nibbles(np.frombuffer(data, np.uint8), signed=INTEGER_TYPES[constant.element_type])
        return values.reshape(constant.shape)
    return np.frombuffer(data, ELEMENT_DTYPES[constant.element_type]).reshape(constant.shape)
