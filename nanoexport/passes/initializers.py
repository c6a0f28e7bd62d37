"""One way to add a constant to a graph, for the passes, the quantizers and the targets alike."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer named ``name``; its shape and type come from the array."""
    value = ir.val(name, const_value=ir.Tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value
