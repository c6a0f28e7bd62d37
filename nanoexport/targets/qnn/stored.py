"""The quantized weights a qnn artifact stores, read back for the manifest's digests.

The lowering re-expresses our weights in the forms HTP computes right (see ``weights``): int4 as LPBQ, integers
``{layer}.lpbq_quant`` ``[K, N]`` dequantized by block scales that are uint8 levels ``{layer}.block_levels``
``[K / block, N]`` times a float32 scale per output channel ``{layer}.channel_scale``; int8 as one scale per
output channel (``{layer}.channel_quant``). Both are rounded again from our weights, so their digests differ
from the canonical ones by design, and the manifest records by how much.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from nanoexport.digests import QuantizedWeight, layer_name, read_array
from nanoexport.targets.qnn.parts import GRAPHS, PARTS_FILE


def stored_weights(folder: Path) -> Iterator[tuple[str, QuantizedWeight]]:
    """Each weight of ``folder``'s prefill graphs (decode reads the same) as (canonical layer name, integers,
    effective block scales): LPBQ's levels times channel scales, or one per-channel scale as a single block."""
    parts = json.loads((folder / PARTS_FILE).read_text(encoding="utf-8"))["parts"] if (
        folder / PARTS_FILE).is_file() else [{"graphs": dict(GRAPHS)}]
    for part in parts:
        initializers = ir.load(folder / part["graphs"]["prefill"]).graph.initializers

        def array(name: str) -> np.ndarray:
            # Copied and unmapped: mapped, a part's pages stayed resident until the loop left it (2.1 GB for
            # the Qwen2.5-1.5B config's 500 MB parts).
            return read_array(initializers[name].const_value)

        for name in sorted(initializers):
            if name.endswith(".lpbq_quant"):
                base = name.removesuffix(".lpbq_quant")
                scales = array(f"{base}.block_levels").astype(np.float32) * array(f"{base}.channel_scale").astype(
                    np.float32)  # per block: level x the column's scale
            elif name.endswith(".channel_quant"):
                base = name.removesuffix(".channel_quant")
                scales = array(f"{base}.channel_scale").astype(np.float32)[None]
            else:
                continue
            yield layer_name(base), QuantizedWeight(array(name), scales)
