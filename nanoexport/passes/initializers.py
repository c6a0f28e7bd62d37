"""One way to add a constant to a graph, for the passes, the quantizers and the targets alike."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer named ``name``; its shape and type come from the array."""
    value = ir.val(name, const_value=ir.Tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def lazy_initializer(graph: ir.Graph, name: str, compute: Callable[[], ir.TensorProtocol], dtype: ir.DataType,
                     shape: list[int]) -> ir.Value:
    """Register an initializer whose data ``compute()`` gives when a stage reads it, and is not kept: weights
    derived from others (a merged projection) cost memory only while they are read."""
    tensor = ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(shape), name=name)
    value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value
