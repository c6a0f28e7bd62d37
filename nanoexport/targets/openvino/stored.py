"""The quantized weights an openvino artifact stores, read back for the manifest's digests.

The lowering stores each linear's weights output-major (``[N, K]`` integers, ``[N, K / block]`` fp16 scales)
under its canonical initializer's name with ``.output_major`` appended (``.partN`` before it where a merged
projection was cut); an embedding table keeps its name and layout. The IR keeps those names on its Constants.
4-bit constants come back packed two to a byte.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from xml.etree import ElementTree

import numpy as np

from nanoexport.digests import QuantizedWeight, layer_name, unpack_nibbles
from nanoexport.errors import NanoexportError
from nanoexport.targets.openvino.files import MODEL_FILE

SUFFIX = ".output_major"
QUANTIZED = re.compile(r"\.quant(?=(\.part\d+)?(\.output_major)?$)")  # the integers' name; scales: ".scale"
INTEGER_TYPES = {"i4": True, "u4": False, "i8": True, "u8": False}  # element type -> signed
ELEMENT_DTYPES = {"i8": np.int8, "u8": np.uint8, "f16": np.float16, "f32": np.float32}


def stored_weights(folder: Path) -> Iterator[tuple[str, QuantizedWeight]]:
    """Each quantized weight of ``folder``'s IR as (canonical layer name, integers, scales, zero points).

    Read from the IR's Constant records (type, shape, bytes in the .bin) one weight at a time: OpenVINO's
    ``read_model`` maps the whole .bin, and every page read stayed in the process's resident memory, which set
    the peak of the Qwen2.5-1.5B export (3.6 GB, 1.3x its bf16 bytes)."""
    constants = _constants(folder / MODEL_FILE)
    with open(folder / Path(MODEL_FILE).with_suffix(".bin"), "rb") as weights:
        for name, constant in sorted(constants.items()):
            # A linear's integers are output-major; an embedding table's (read by a Gather) stay as they were.
            if not QUANTIZED.search(name) or constant.element not in INTEGER_TYPES or len(constant.shape) != 2:
                continue
            scales = constants.get(QUANTIZED.sub(".scale", name))
            points = constants.get(QUANTIZED.sub(".zero_point", name))
            if scales is None:
                continue
            zero_points = None if points is None else _array(weights, points)
            yield layer_name(name, SUFFIX), QuantizedWeight(_array(weights, constant), _array(weights, scales),
                                                            zero_points)


@dataclass(frozen=True)
class _Constant:
    element: str  # OpenVINO's element type name: i4, u8, f16...
    shape: tuple[int, ...]
    offset: int
    size: int


def _constants(xml: Path) -> dict[str, _Constant]:
    """The IR's Constants by friendly name."""
    constants = {}
    for layer in ElementTree.parse(xml).getroot().iter("layer"):
        data = layer.find("data")
        if layer.get("type") != "Const" or data is None:
            continue
        shape = tuple(int(size) for size in data.get("shape", "").split(",") if size.strip())
        constants[layer.get("name")] = _Constant(data.get("element_type"), shape, int(data.get("offset")),
                                                 int(data.get("size")))
    return constants


def _array(weights: BinaryIO, constant: _Constant) -> np.ndarray:
    """``constant``'s values, 4-bit ones unpacked (low nibble first)."""
    weights.seek(constant.offset)
    data = weights.read(constant.size)
    if len(data) != constant.size:
        raise NanoexportError(f"{weights.name} ends before a constant the IR places at offset {constant.offset}; "
                              "re-export the artifact")
    if constant.element in ("i4", "u4"):
        return unpack_nibbles(np.frombuffer(data, np.uint8), signed=constant.element == "i4").reshape(constant.shape)
    return np.frombuffer(data, ELEMENT_DTYPES[constant.element]).reshape(constant.shape)
