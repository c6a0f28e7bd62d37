"""The quantized weights a coreml artifact stores, read back for the manifest's digests.

Each block-quantized weight is a ``constexpr_blockwise_shift_scale`` op named after the canonical integers'
initializer (``.transposed`` appended where it is read transposed; see ``mil_weight_name``), its integers, fp16
scales and offsets stored in the package's weight file. Prefill and decode share them; each is read once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from nanoexport.digests import QuantizedWeight, layer_name
from nanoexport.targets.coreml.interpreter import Interpreter
from nanoexport.targets.coreml.package import PACKAGE
from nanoexport.targets.coreml.weights import name_of_mil_weight

TRANSPOSED = ".transposed"


def stored_weights(folder: Path) -> Iterator[tuple[str, QuantizedWeight]]:
    """Each block-quantized weight of ``folder``'s package as (canonical layer name, integers, scales, offsets)."""
    interpreter = Interpreter(folder / PACKAGE)
    seen = set()
    for function in interpreter.functions.values():
        for op in function.block_specializations[function.opset].operations:
            name = layer_name(name_of_mil_weight(op.outputs[0].name).removesuffix(TRANSPOSED)) if op.outputs else ""
            if op.type != "constexpr_blockwise_shift_scale" or name in seen:
                continue
            inputs = interpreter.immediate_inputs(op)
            if "data" not in inputs or "scale" not in inputs:
                continue  # a codebook's levels (nf4), computed by another op
            seen.add(name)
            yield name, QuantizedWeight(inputs["data"], inputs["scale"], inputs.get("offset"))
