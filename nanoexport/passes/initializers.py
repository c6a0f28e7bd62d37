"""One way to add a constant to a graph, for the passes, the quantizers and the targets alike."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import numpy as np
import onnx_ir as ir


# Tensor metadata (``tensor.meta``, never serialized): a function giving a digest of the tensor's bytes without
# materializing them as float32, set where weights are bound to a checkpoint (see capture/weights.py).
FINGERPRINT = "nanoexport.fingerprint"
# model.layers.3.mlp.down_proj.weight -> 3; GPT-2's transformer.h.3.attn.c_attn.weight -> 3
LAYER_OF_NAME = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
FINAL_NORM_NAME = re.compile(r"(?:^|\.)norm\.weight$")  # model.norm.weight, after the last layer


def layer_of(name: str) -> int | None:
    """The decoder layer a weight's name puts it in, or None (embedding, final norm, head)."""
    match = LAYER_OF_NAME.search(name)
    return int(match[1]) if match else None


def is_final_norm(name: str) -> bool:
    """Whether a weight's name makes it the final norm's, which starts the output head."""
    return FINAL_NORM_NAME.search(name) is not None and layer_of(name) is None


def fingerprint(tensor: ir.TensorProtocol) -> str:
    """A digest equal for two tensors exactly when their dtype, shape and bytes are equal."""
    described = f"{tensor.dtype.name}{tuple(tensor.shape)}"
    digest = tensor.meta.get(FINGERPRINT) if hasattr(tensor, "meta") else None  # not in TensorProtocol
    if digest is not None:
        return f"{described}:{digest()}"
    data = np.ascontiguousarray(tensor.numpy())  # a transposed view is copied, one tensor at a time
    return f"{described}:{hashlib.sha256(data.view(np.uint8)).hexdigest()}"


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer named ``name``; its shape and type come from the array."""
    return register_tensor(graph, ir.Tensor(np.ascontiguousarray(array), name=name))


def register_tensor(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    """Register ``tensor`` as an initializer under its own name, shape and type."""
    value = ir.val(tensor.name, const_value=tensor)
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
