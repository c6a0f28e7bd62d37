"""Lowerings of the canonical graph's model operators, which TVM's ONNX frontend does not convert:
``Attention`` (opset 23, grouped KV heads), ``RotaryEmbedding``, ``TensorScatter`` (the static KV-cache
write), and the normalizations and activations (``RMSNormalization``, ``LayerNormalization``, ``Swish``,
``Gelu``), each as Relax operators or one of our kernels. Each takes the converter and the node and returns
the node's outputs; what the canonical graph never holds (an attribute we do not lower) is refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from tvm import relax

from nanoexport.errors import NanoexportError
from nanoexport.targets.tvm import kernels

op = relax.op


def shape(value: ir.Value) -> list[int]:
    return [int(d) for d in value.shape]


def attr(node: ir.Node, name: str, default=None):
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def _refuse(node: ir.Node, what: str) -> NanoexportError:
    return NanoexportError(f"the tvm target does not lower {node.op_type} with {what} (node {node.name}); "
                           "report the model")


def _axes_from(node: ir.Node, rank: int) -> list[int]:
    return list(range(attr(node, "axis", -1) % rank, rank))


def rms_normalization(c, node: ir.Node) -> list[relax.Expr]:
    x = node.inputs[0]
    return c.emit(op.nn.rms_norm(c.expr(x), c.expr(node.inputs[1]), _axes_from(node, len(x.shape)),
                                 attr(node, "epsilon", 1e-5)))


def layer_normalization(c, node: ir.Node) -> list[relax.Expr]:
    x, scale = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    beta = c.expr(bias) if bias is not None else relax.const(np.zeros(shape(scale), np.float32))
    if len(node.outputs) > 1 and any(output.uses() for output in node.outputs[1:]):
        raise _refuse(node, "its mean or inverse deviation read")
    return c.emit(op.nn.layer_norm(c.expr(x), c.expr(scale), beta, _axes_from(node, len(x.shape)),
                                   attr(node, "epsilon", 1e-5)))


def swish(c, node: ir.Node) -> list[relax.Expr]:
    x = c.expr(node.inputs[0])
    alpha = attr(node, "alpha", 1.0)
    if alpha == 1.0:
        return c.emit(op.nn.silu(x))
    gate = c.bb.emit(op.sigmoid(op.multiply(x, relax.const(alpha, "float32"))))
    return c.emit(op.multiply(x, gate))


def gelu(c, node: ir.Node) -> list[relax.Expr]:
    approximate = attr(node, "approximate", "none")
    if approximate not in ("none", "tanh"):
        raise _refuse(node, f"approximate={approximate!r}")
    function = op.nn.gelu_tanh if approximate == "tanh" else op.nn.gelu
    return c.emit(function(c.expr(node.inputs[0])))


def reduce_mean(c, node: ir.Node) -> list[relax.Expr]:
    axes = c.constant(node.inputs[1], node) if len(node.inputs) > 1 else attr(node, "axes")
    axes = None if axes is None else [int(a) for a in axes]
    return c.emit(op.mean(c.expr(node.inputs[0]), axes, bool(attr(node, "keepdims", 1))))


def rotary_embedding(c, node: ir.Node) -> list[relax.Expr]:
    """ONNX ``RotaryEmbedding``-23 on ``[batch, heads, seq, dim]`` (or ``[batch, seq, hidden]`` with
    ``num_heads``), cos and sin ``[batch, seq, dim/2]`` or a table gathered by ``position_ids``."""
    bb, x_value = c.bb, node.inputs[0]
    x = c.expr(x_value)
    x_shape = shape(x_value)
    cos, sin = c.expr(node.inputs[1]), c.expr(node.inputs[2])
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        positions = c.expr(node.inputs[3])
        cos, sin = bb.emit(op.take(cos, positions, 0)), bb.emit(op.take(sin, positions, 0))
    if len(x_shape) == 3:
        heads = attr(node, "num_heads", 0)
        if not heads:
            raise _refuse(node, "3-D input and no num_heads")
        x = bb.emit(op.reshape(x, [x_shape[0], x_shape[1], heads, x_shape[2] // heads]))
        cos, sin = bb.emit(op.expand_dims(cos, 2)), bb.emit(op.expand_dims(sin, 2))
    else:
        cos, sin = bb.emit(op.expand_dims(cos, 1)), bb.emit(op.expand_dims(sin, 1))
    dims = [int(d) for d in x.ty.shape]
    dim = dims[-1]
    rotary = attr(node, "rotary_embedding_dim", 0) or dim
    half = rotary // 2
    lead = dims[:-1]
    if attr(node, "interleaved", 0):
        pairs = bb.emit(op.reshape(op.strided_slice(x, [len(lead)], [0], [rotary]), [*lead, half, 2]))
        first = bb.emit(op.reshape(op.strided_slice(pairs, [len(lead) + 1], [0], [1]), [*lead, half]))
        second = bb.emit(op.reshape(op.strided_slice(pairs, [len(lead) + 1], [1], [2]), [*lead, half]))
    else:
        first = bb.emit(op.strided_slice(x, [len(lead)], [0], [half]))
        second = bb.emit(op.strided_slice(x, [len(lead)], [half], [rotary]))
    new_first = bb.emit(op.subtract(op.multiply(first, cos), op.multiply(second, sin)))
    new_second = bb.emit(op.add(op.multiply(second, cos), op.multiply(first, sin)))
    if attr(node, "interleaved", 0):
        stacked = op.concat([op.expand_dims(new_first, -1), op.expand_dims(new_second, -1)], -1)
        parts = [bb.emit(op.reshape(stacked, [*lead, rotary]))]
    else:
        parts = [new_first, new_second]
    if rotary < dim:
        parts.append(bb.emit(op.strided_slice(x, [len(lead)], [rotary], [dim])))
    y = bb.emit(op.concat(parts, -1)) if len(parts) > 1 else parts[0]
    return c.emit(op.reshape(y, x_shape)) if len(x_shape) == 3 else [y]


def tensor_scatter(c, node: ir.Node) -> list[relax.Expr]:
    """The KV-cache write: ``update`` into ``past`` along the sequence axis from ``write_indices[batch]``."""
    past = node.inputs[0]
    if len(past.shape) != 4 or attr(node, "axis", -2) % 4 != 2:
        raise _refuse(node, "a cache other than [batch, heads, seq, dim] written along seq")
    mode = attr(node, "mode", "linear")
    if mode not in ("linear", "circular"):
        raise _refuse(node, f"mode={mode!r}")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        position = c.expr(node.inputs[2])
    else:
        position = relax.const(np.zeros(shape(past)[:1], np.int64))
    return [c.bb.emit_te(kernels.bind(kernels.cache_write, circular=mode == "circular"), c.expr(past),
                         c.expr(node.inputs[1]), position)]


def attention(c, node: ir.Node) -> list[relax.Expr]:
    """ONNX ``Attention``-23 on 4-D inputs, grouped KV heads read without repeating them: the query heads of
    one KV head are stacked along the sequence axis, so each KV head takes one batched matmul."""
    if len(node.inputs) > 4 and any(value is not None and value.name for value in node.inputs[4:]):
        raise _refuse(node, "past key/value or nonpad_kv_seqlen inputs")
    if any(output.uses() or output.is_graph_output() for output in node.outputs[1:] if output is not None):
        raise _refuse(node, "present or qk outputs read")
    if attr(node, "is_causal", 0):
        raise _refuse(node, "is_causal=1 (the canonical graph masks explicitly)")
    q_value, k_value, v_value = node.inputs[:3]
    if len(q_value.shape) != 4:
        raise _refuse(node, "3-D inputs")
    batch, heads, length, dim = shape(q_value)
    kv_heads, slots = shape(k_value)[1], shape(k_value)[2]
    value_dim = shape(v_value)[3]
    group = heads // kv_heads
    bb = c.bb
    scale = attr(node, "scale", 1.0 / math.sqrt(dim))
    q = bb.emit(op.reshape(c.expr(q_value), [batch, kv_heads, group * length, dim]))
    scores = bb.emit_te(kernels.attention_scores, q, c.expr(k_value))
    scores = bb.emit(op.reshape(op.multiply(scores, relax.const(scale, "float32")), [batch, heads, length, slots]))
    softcap = attr(node, "softcap", 0.0)
    if softcap:
        cap = relax.const(softcap, "float32")
        scores = bb.emit(op.multiply(op.tanh(op.divide(scores, cap)), cap))
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    if mask is not None and mask.name:
        if mask.dtype == ir.DataType.BOOL:
            lowest = relax.const(np.finfo(np.float32).min, "float32")
            scores = bb.emit(op.where(c.expr(mask), scores, lowest))
        else:
            scores = bb.emit(op.add(scores, c.expr(mask)))
    probabilities = bb.emit(op.reshape(op.nn.softmax(scores, -1), [batch, kv_heads, group * length, slots]))
    y = bb.emit_te(kernels.attention_values, probabilities, c.expr(v_value))
    return [bb.emit(op.reshape(y, [batch, heads, length, value_dim]))]


OPS: dict[str, Callable] = {
    "RMSNormalization": rms_normalization, "LayerNormalization": layer_normalization, "Swish": swish,
    "Gelu": gelu, "ReduceMean": reduce_mean, "RotaryEmbedding": rotary_embedding,
    "TensorScatter": tensor_scatter, "Attention": attention,
}
