"""One static-shape canonical graph (prefill or decode) as the body of a Relax function.

Our own converter rather than TVM's ONNX frontend: the frontend has no converter for ``Attention``-23,
``RotaryEmbedding`` or ``TensorScatter`` and copies INT4 initializers one byte an element, and the
canonical graph needs only a few dozen operators. Every shape is static by now (``specialize``), so shape
operators (Reshape, Unsqueeze, Squeeze, Split sizes) take their output shapes from the graph.

Weights stay as the canonical graph stores them, passed in as the function's parameters: a
``DequantizeLinear`` over packed integers, or a ``Transpose`` of a weight, is held as a description
(``Quantized``, ``Transposed``) until its consumer is known. A MatMul consuming it runs one of our
kernels (``kernels``), which reads the packed integers or the untransposed weight in place; any other
consumer gets the weight materialized. An operator without a lowering is refused by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from tvm import relax

from nanoexport.errors import NanoexportError
from nanoexport.targets.tvm import kernels, model_ops
from nanoexport.targets.tvm.model_ops import attr as _attr, shape as _shape

DTYPES = {
    ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
    ir.DataType.DOUBLE: "float64", ir.DataType.INT64: "int64", ir.DataType.INT32: "int32",
    ir.DataType.INT8: "int8", ir.DataType.UINT8: "uint8", ir.DataType.BOOL: "bool",
}
QUANTIZED = {ir.DataType.INT4: "INT4", ir.DataType.UINT4: "UINT4", ir.DataType.INT8: "INT8",
             ir.DataType.UINT8: "UINT8"}
op = relax.op


@dataclass(frozen=True)
class Quantized:
    """A blocked ``DequantizeLinear`` over packed parameters, not yet computed; ``dtype``: what it gives."""

    packed: relax.Expr
    scale: relax.Expr
    zero: relax.Expr | None
    blocking: kernels.Blocking
    dtype: str


@dataclass(frozen=True)
class Transposed:
    """A 2-D weight (float or ``Quantized``) transposed, not yet computed."""

    weight: relax.Expr | Quantized


class GraphConverter:
    """Emits the nodes of one graph into the current dataflow block of ``bb``."""

    def __init__(self, bb: relax.BlockBuilder, params: dict[str, relax.Var], quantized: set[str]):
        self.bb = bb
        self.params = params  # initializer name -> the function's parameter
        self.quantized = quantized  # names of the packed-integer parameters
        self.values: dict[str, object] = {}  # value name -> relax expression, numpy constant or weight description

    def convert(self, graph: ir.Graph, inputs: dict[str, relax.Var]) -> list[relax.Expr]:
        self.values.update(inputs)
        for name, initializer in graph.initializers.items():
            self.values[name] = self.params[name] if name in self.params else initializer.const_value.numpy()
        for node in graph:
            lowering = OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if lowering is None:
                raise NanoexportError(f"the tvm target has no lowering for the {node.domain or 'ai.onnx'} operator "
                                      f"{node.op_type} (node {node.name}); report the model")
            for value, result in zip(node.outputs, lowering(self, node)):
                self.values[value.name] = result
        return [self.expr(value) for value in graph.outputs]

    def value(self, value: ir.Value | None):
        return None if value is None or value.name == "" else self.values[value.name]

    def expr(self, value: ir.Value | None) -> relax.Expr | None:
        """The value as a Relax expression: constants become Relax constants, weight descriptions computed."""
        return self.materialize(self.value(value))

    def materialize(self, held) -> relax.Expr | None:
        if isinstance(held, np.ndarray):
            return relax.const(held, str(held.dtype))
        if isinstance(held, Transposed):
            return self.bb.emit(op.permute_dims(self.materialize(held.weight), [1, 0]))
        if isinstance(held, Quantized):
            return self.bb.emit_te(kernels.bind(kernels.dequantize, blocking=held.blocking, dtype=held.dtype),
                                   *self._weight_args(held))
        return held

    def constant(self, value: ir.Value | None, node: ir.Node) -> np.ndarray | None:
        held = self.value(value)
        if held is not None and not isinstance(held, np.ndarray):
            raise NanoexportError(f"the tvm target needs {value.name} of {node.op_type} {node.name} to be a "
                                  "constant; report the model")
        return held

    def emit(self, expr: relax.Expr) -> list[relax.Expr]:
        return [self.bb.emit(expr)]

    @staticmethod
    def _weight_args(held: Quantized) -> list[relax.Expr]:
        return [held.packed, held.scale] + ([held.zero] if held.zero is not None else [])


def _elementwise(function: Callable) -> Callable:
    return lambda c, node: c.emit(function(*[c.expr(value) for value in node.inputs]))


def _reshape(c: GraphConverter, node: ir.Node) -> list[relax.Expr]:
    return c.emit(op.reshape(c.expr(node.inputs[0]), _shape(node.outputs[0])))


def _cast(c: GraphConverter, node: ir.Node) -> list:
    dtype = DTYPES[ir.DataType(_attr(node, "to"))]
    held = c.value(node.inputs[0])
    if isinstance(held, Quantized) and dtype.startswith("float"):
        return [dataclasses.replace(held, dtype=dtype)]
    return c.emit(op.astype(c.expr(node.inputs[0]), dtype))


def _transpose(c: GraphConverter, node: ir.Node) -> list:
    held = c.value(node.inputs[0])
    perm = list(_attr(node, "perm", range(len(node.inputs[0].shape))[::-1]))
    if perm == [1, 0] and (isinstance(held, Quantized) or (isinstance(held, relax.Var) and held in c.params.values())):
        return [Transposed(held)]
    return c.emit(op.permute_dims(c.expr(node.inputs[0]), perm))


def _split(c: GraphConverter, node: ir.Node) -> list[relax.Expr]:
    axis = _attr(node, "axis", 0) % len(node.inputs[0].shape)
    sizes = [_shape(output)[axis] for output in node.outputs]
    parts = c.bb.emit(op.split(c.expr(node.inputs[0]), np.cumsum(sizes)[:-1].tolist(), axis))
    return [c.bb.emit(relax.TupleGetItem(parts, i)) for i in range(len(sizes))]


def _slice(c: GraphConverter, node: ir.Node) -> list[relax.Expr]:
    shape = _shape(node.inputs[0])
    starts, ends = (c.constant(value, node) for value in node.inputs[1:3])
    axes = c.constant(node.inputs[3], node) if len(node.inputs) > 3 else None
    steps = c.constant(node.inputs[4], node) if len(node.inputs) > 4 else None
    axes = list(range(len(starts))) if axes is None else [int(a) % len(shape) for a in axes]
    steps = [1] * len(starts) if steps is None else steps.tolist()
    if any(step < 1 for step in steps):
        raise NanoexportError(f"the tvm target lowers Slice with positive steps only (node {node.name}); "
                              "report the model")
    bounds = [slice(int(s), int(e), int(t)).indices(shape[a]) for s, e, t, a in zip(starts, ends, steps, axes)]
    return c.emit(op.strided_slice(c.expr(node.inputs[0]), axes, [b[0] for b in bounds], [b[1] for b in bounds],
                                   [b[2] for b in bounds]))


def _gather(c: GraphConverter, node: ir.Node) -> list[relax.Expr]:
    axis = _attr(node, "axis", 0)
    held = c.value(node.inputs[0])
    if isinstance(held, Quantized) and axis == 0:  # a quantized embedding: dequantize the rows read only
        indices = c.expr(node.inputs[1])
        return [c.bb.emit_te(kernels.bind(kernels.quantized_gather, blocking=held.blocking, dtype=held.dtype),
                             indices, *c._weight_args(held))]
    # "clip": a token id out of range must not read outside the table (TVM's "fast" mode would).
    return c.emit(op.take(c.expr(node.inputs[0]), c.expr(node.inputs[1]), axis, mode="clip"))


def _matmul(c: GraphConverter, node: ir.Node) -> list[relax.Expr]:
    return [_product(c, c.expr(node.inputs[0]), c.value(node.inputs[1]))]


def _product(c: GraphConverter, x: relax.Expr, weight) -> relax.Expr:
    """``x @ weight``, our kernels reading a quantized or transposed weight where it is stored."""
    transposed = isinstance(weight, Transposed)
    inner = weight.weight if transposed else weight
    if isinstance(inner, Quantized):
        return c.bb.emit_te(kernels.bind(kernels.quantized_matmul, blocking=inner.blocking, transposed=transposed),
                            x, *c._weight_args(inner))
    if transposed:
        return c.bb.emit_te(kernels.transposed_matmul, x, inner)
    if isinstance(weight, relax.Var) and weight in c.params.values() and len(weight.ty.shape) == 2:
        return c.bb.emit_te(kernels.weight_matmul, x, weight)
    return c.bb.emit(op.matmul(x, c.materialize(weight)))


def _gemm(c: GraphConverter, node: ir.Node) -> list[relax.Expr]:
    a = c.expr(node.inputs[0])
    if _attr(node, "transA", 0):
        a = c.bb.emit(op.permute_dims(a, [1, 0]))
    b = c.value(node.inputs[1])
    if _attr(node, "transB", 0):
        b = b.weight if isinstance(b, Transposed) else Transposed(b) if isinstance(b, (Quantized, relax.Var)) \
            else c.bb.emit(op.permute_dims(c.materialize(b), [1, 0]))
    y = _product(c, a, b)
    alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
    if alpha != 1.0:
        y = c.bb.emit(op.multiply(y, relax.const(alpha, "float32")))
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = c.expr(node.inputs[2])
        if beta != 1.0:
            bias = c.bb.emit(op.multiply(bias, relax.const(beta, "float32")))
        y = c.bb.emit(op.add(y, bias))
    return [y]


def _dequantize_linear(c: GraphConverter, node: ir.Node) -> list:
    packed = c.value(node.inputs[0])
    if node.inputs[0].name not in c.quantized or node.inputs[0].name not in c.params:
        raise NanoexportError(f"the tvm target dequantizes weights only, not the activation {node.inputs[0].name} "
                              f"(node {node.name}); export without --activations")
    rows, cols = _shape(node.inputs[0])
    axis = _attr(node, "axis", 1) % 2
    block_size = _attr(node, "block_size", 0)
    scale = c.expr(node.inputs[1])
    zero = c.expr(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    scale_shape = _shape(node.inputs[1])
    if len(scale_shape) < 2:  # per-axis or per-tensor: one block spans the whole other axis
        axis, block_size = (0, rows) if len(scale_shape) == 0 or axis == 1 else (1, cols)
        blocked = [1, cols] if axis == 0 else [rows, 1]
        scale = c.bb.emit(op.reshape(scale, blocked))
        if zero is not None:
            if c.quantized and QUANTIZED[node.inputs[0].dtype] in ("INT4", "UINT4"):
                raise NanoexportError(f"the tvm target reads 4-bit zero points of blocked weights only "
                                      f"(node {node.name}); report the model")
            zero = c.bb.emit(op.reshape(zero, blocked))
    blocking = kernels.Blocking(rows, cols, QUANTIZED[node.inputs[0].dtype], axis, block_size)
    return [Quantized(packed, scale, zero, blocking, DTYPES[node.outputs[0].dtype])]


def _unary(function: Callable) -> Callable:
    return lambda c, node: c.emit(function(c.expr(node.inputs[0])))


OPS: dict[str, Callable[[GraphConverter, ir.Node], list]] = {
    "Add": _elementwise(op.add), "Sub": _elementwise(op.subtract), "Mul": _elementwise(op.multiply),
    "Div": _elementwise(op.divide), "Pow": _elementwise(op.power), "Where": _elementwise(op.where),
    "Equal": _elementwise(op.equal), "Less": _elementwise(op.less), "LessOrEqual": _elementwise(op.less_equal),
    "Greater": _elementwise(op.greater), "GreaterOrEqual": _elementwise(op.greater_equal),
    "And": _elementwise(op.logical_and), "Or": _elementwise(op.logical_or),
    "Max": _elementwise(op.maximum), "Min": _elementwise(op.minimum),
    "Mod": lambda c, node: c.emit((op.mod if _attr(node, "fmod", 0) else op.floor_mod)(
        c.expr(node.inputs[0]), c.expr(node.inputs[1]))),
    "Not": _unary(op.logical_not), "Neg": _unary(op.negative), "Sqrt": _unary(op.sqrt), "Exp": _unary(op.exp),
    "Cos": _unary(op.cos), "Sin": _unary(op.sin), "Tanh": _unary(op.tanh), "Sigmoid": _unary(op.sigmoid),
    "Erf": _unary(op.erf), "Abs": _unary(op.abs), "Identity": lambda c, node: [c.value(node.inputs[0])],
    "Reshape": _reshape, "Unsqueeze": _reshape, "Squeeze": _reshape, "Flatten": _reshape,
    "Expand": lambda c, node: c.emit(op.broadcast_to(c.expr(node.inputs[0]), _shape(node.outputs[0]))),
    "Cast": _cast, "Transpose": _transpose, "Split": _split, "Slice": _slice, "Gather": _gather,
    "Concat": lambda c, node: c.emit(op.concat([c.expr(v) for v in node.inputs], _attr(node, "axis"))),
    "Softmax": lambda c, node: c.emit(op.nn.softmax(c.expr(node.inputs[0]), _attr(node, "axis", -1))),
    "MatMul": _matmul, "Gemm": _gemm, "DequantizeLinear": _dequantize_linear,
}
OPS.update(model_ops.OPS)
