"""The quantized weights an openvino artifact stores, read back for the manifest's digests.

The lowering stores each linear's weights output-major (``[N, K]`` integers, ``[N, K / block]`` fp16 scales)
under its canonical initializer's name with ``.output_major`` appended (``.partN`` before it where a merged
projection was cut); an embedding table keeps its name and layout. The IR keeps those names on its Constants.
4-bit constants come back packed two to a byte.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openvino as ov

from nanoexport.digests import QuantizedWeight, layer_name, unpack_nibbles
from nanoexport.targets.openvino.files import MODEL_FILE

SUFFIX = ".output_major"
QUANTIZED = re.compile(r"\.quant(?=(\.part\d+)?(\.output_major)?$)")  # the integers' name; scales: ".scale"
INTEGER_TYPES = {"i4": True, "u4": False, "i8": True, "u8": False}  # element type -> signed


def stored_weights(folder: Path) -> Iterator[tuple[str, QuantizedWeight]]:
    """Each quantized weight of ``folder``'s IR as (canonical layer name, integers, scales, zero points)."""
    constants = {node.get_friendly_name(): node for node in ov.Core().read_model(folder / MODEL_FILE).get_ordered_ops()
                 if node.get_type_name() == "Constant"}
    for name, node in sorted(constants.items()):
        element = node.get_element_type().get_type_name()
        # A linear's integers are output-major; an embedding table's (read by a Gather) stay as they were.
        if not QUANTIZED.search(name) or element not in INTEGER_TYPES or len(node.shape) != 2:
            continue
        data = node.get_data()
        if element in ("i4", "u4"):
            data = unpack_nibbles(data, signed=INTEGER_TYPES[element])
        integers = np.asarray(data).reshape(tuple(node.shape))
        scales = constants.get(QUANTIZED.sub(".scale", name))
        points = constants.get(QUANTIZED.sub(".zero_point", name))
        if scales is None:
            continue
        zero_points = None
        if points is not None:
            point_data = points.get_data()
            if points.get_element_type().get_type_name() in ("i4", "u4"):
                point_data = unpack_nibbles(point_data, signed=points.get_element_type().get_type_name() == "i4")
            zero_points = np.asarray(point_data).reshape(tuple(points.shape))
        yield layer_name(name, SUFFIX), QuantizedWeight(integers, np.asarray(scales.get_data()), zero_points)
