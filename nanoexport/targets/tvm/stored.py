"""The quantized weights a tvm artifact stores, read back for the manifest's digests.

``params.safetensors`` holds each packed weight flat, as the canonical initializer's bytes (4-bit: two integers
a byte, low nibble first), its scales and zero points as the canonical graph has them; ``signatures.json``
says, per packed weight, its shape, integer type, scale and zero point.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nanoexport.digests import QuantizedWeight, layer_name, unpack_nibbles
from nanoexport.targets.tvm.compile import PARAMS, SIGNATURES


def _integers(packed: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    if kind in ("INT4", "UINT4"):
        return unpack_nibbles(packed, signed=kind == "INT4")[:count].reshape(shape)
    return packed.reshape(shape)


def stored_weights(folder: Path) -> Iterator[tuple[str, QuantizedWeight]]:
    """Each packed weight of ``folder`` as (canonical layer name, integers, scales, zero points)."""
    from safetensors import safe_open

    quantized = json.loads((folder / SIGNATURES).read_text(encoding="utf-8")).get("quantized", {})
    with safe_open(str(folder / PARAMS), framework="numpy") as params:
        for name, weight in sorted(quantized.items()):
            scales = params.get_tensor(weight["scale"])
            zero = weight["zero_point"]
            points = None if zero is None else _integers(params.get_tensor(zero), weight["type"], scales.shape)
            integers = _integers(params.get_tensor(name), weight["type"], tuple(weight["shape"]))
            yield layer_name(name), QuantizedWeight(integers, scales, points)
