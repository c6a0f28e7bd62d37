"""The canonical ONNX graph -> one MIL function, op by op, for one fixed sequence length.

Dtypes: float tensors become fp16, Core ML's precision on the GPU and the Neural Engine. The exception is
float arithmetic on integers (rotary angles computed from positions): it stays fp32 until it meets an fp16
tensor, because fp16 rounds the angles near position 300 by up to 0.06 rad and cannot even hold positions
past 2048. Integers become int32 (Core ML tensors have no int64).

KV cache: the ``past_key_values.{i}.*`` inputs become states. Each ``TensorScatter`` into one reads its
state, writes this call's rows at ``cache_position`` with ``slice_update`` and stores the result back; the
``present.*`` outputs disappear, because the state is the output.

Weights: a ``MatMul`` by a constant ``[in, out]`` matrix becomes ``linear`` over the ``[out, in]`` matrix
(the layout Core ML's own converters give ``linear``), and a block-wise ``DequantizeLinear`` weight becomes
``constexpr_blockwise_shift_scale`` over the same integers and scales. An nf4 weight (codebook indices)
becomes ``constexpr_lut_to_dense`` over the same indices and levels, scaled per block by
``constexpr_blockwise_shift_scale``.

One file, longer than most: it is the table of ONNX op -> MIL converters (one short method each on
``_Lowering``), which reads best as one list; splitting it by op family would scatter the shared dtype rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import coremltools as ct
import numpy as np
import onnx_ir as ir
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, Var, types

from nanoexport.errors import NanoexportError
from nanoexport.targets.coreml.weights import WeightStore, mil_weight_name, read_external

CACHE_PREFIX = "past_key_values."
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
INTEGER_TYPES = (ir.DataType.INT64, ir.DataType.INT32)
# ONNX weight integer type -> the numpy dtype coremltools reads as that MIL type
WEIGHT_INTEGERS = {
    ir.DataType.INT4: types.np_int4_dtype,
    ir.DataType.UINT4: types.np_uint4_dtype,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
}
MIL_DTYPE_NAMES = {types.fp16: "fp16", types.fp32: "fp32", types.int32: "int32", types.bool: "bool"}


def state_name(cache_input: str) -> str:
    """``past_key_values.3.key`` -> ``key_cache_3``: MIL names are identifiers."""
    _, layer, kind = cache_input.split(".")
    return f"{kind}_cache_{layer}"


def lower_graph(model: ir.Model, store: WeightStore | None = None) -> Program:
    """A one-function MIL program (function ``main``) computing ``model``'s logits; the KV cache in states.

    ``model`` must be specialized: every shape static. With a ``store``, large constants go to it and the
    program holds its placeholders (save it with ``package.write_package`` and the same store).
    """
    graph = model.graph
    specs = {}
    for value in graph.inputs:
        if value.name.startswith(CACHE_PREFIX):
            specs[state_name(value.name)] = mb.StateTensorSpec(tuple(value.shape), dtype=types.fp16)
        else:
            specs[value.name] = mb.TensorSpec(tuple(value.shape), dtype=_mil_dtype(value.dtype))
    # Op names come from the builder's process-wide counters: restart them so that lowering the same graph
    # twice in one process gives the same names, and so the same bytes.
    mb.name_count.clear()
    with Function(specs, opset_version=ct.target.iOS18) as function:
        lowering = _Lowering(graph, function.inputs, store.hold if store is not None else np.asarray)
        function.set_outputs([lowering.run()])
    program = Program()
    program.add_function("main", function)
    return program


def _mil_dtype(dtype: ir.DataType):
    if dtype in FLOAT_TYPES:
        return types.fp16
    if dtype in INTEGER_TYPES:
        return types.int32
    if dtype == ir.DataType.BOOL:
        return types.bool
    raise NanoexportError(f"the coreml target has no tensor type for ONNX {dtype.name}")


class _Lowering:
    """Lowers one graph's nodes in order, mapping each ONNX value to its MIL var."""

    def __init__(self, graph: ir.Graph, inputs: dict[str, Var], hold: Callable[[np.ndarray], np.ndarray]):
        self.graph = graph
        self.hold = hold  # every array the program keeps passes through it (see weights.WeightStore)
        self.vars: dict[ir.Value, Var] = {}
        self.states: dict[ir.Value, Var] = {}
        # Outputs of nodes whose inputs are all constant (weight transposes, dequantization): lowered only
        # when a consumer needs them as a tensor, so that a MatMul can take them as a weight instead.
        self.deferred: set[ir.Value] = set()
        self.memo: dict[tuple, Var] = {}
        for value in graph.inputs:
            if value.name.startswith(CACHE_PREFIX):
                self.states[value] = inputs[state_name(value.name)]
            else:
                self.vars[value] = inputs[value.name]

    def run(self) -> Var:
        for node in self.graph:
            if all(value is None or self.is_constant(value) for value in node.inputs):
                self.deferred.update(node.outputs)
            else:
                self.lower_node(node)
        logits = self.var(next(value for value in self.graph.outputs if value.name == "logits"))
        logits.set_name("logits")
        return logits

    def lower_node(self, node: ir.Node) -> None:
        lowering = LOWERINGS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if lowering is None:
            name = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            raise NanoexportError(
                f"the coreml target has no lowering for ONNX op {name} (node {node.name}); export with "
                "--target onnx, or report the model"
            )
        for value, var in zip(node.outputs, lowering(self, node)):
            self.vars[value] = var

    # --- values -------------------------------------------------------------------------------------------

    def is_constant(self, value: ir.Value) -> bool:
        return value in self.deferred or value.const_value is not None or _constant_node(value) is not None

    def constant(self, value: ir.Value | None) -> np.ndarray | None:
        """The value's array when it is an initializer or a Constant node's output.

        A weight on disk is read afresh at each call and not kept (see ``weights.read_external``).
        """
        if value is None:
            return None
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            return read_external(tensor)
        if tensor is not None:
            return tensor.numpy()
        node = _constant_node(value)
        if node is not None:
            return node.attributes["value"].as_tensor().numpy()
        return None

    def required_constant(self, node: ir.Node, index: int) -> np.ndarray:
        array = self.constant(node.inputs[index]) if index < len(node.inputs) else None
        if array is None:
            raise NanoexportError(f"{node.op_type} node {node.name} needs a constant input {index}; report the model")
        return array

    def var(self, value: ir.Value) -> Var:
        if value in self.vars:
            return self.vars[value]
        if value in self.states:
            raise NanoexportError(f"{value.name} is read other than by a TensorScatter; report the model")
        array = self.constant(value)
        if array is not None:
            return self.const(array, value.name)
        if value not in self.deferred:
            raise NanoexportError(f"value {value.name} has no producer; the graph is not in canonical form")
        weight = self.weight(value)  # a dequantized matrix stays compressed also where it is gathered
        if weight is None:
            self.lower_node(value.producer())
            weight = self.vars[value]
        return weight

    def const(self, array: np.ndarray, key: str, dtype=None) -> Var:
        """A constant (fp16 for floats unless ``dtype`` says otherwise), created once per ``key`` and dtype."""
        array = np.asarray(array)
        if dtype is None:
            dtype = types.fp16 if np.issubdtype(array.dtype, np.floating) else _numpy_mil_dtype(array.dtype)
        numpy_dtype = {types.fp16: np.float16, types.fp32: np.float32, types.int32: np.int32, types.bool: bool}
        return self.once(("const", key, dtype), lambda: mb.const(val=self.hold(array.astype(numpy_dtype[dtype]))))

    def once(self, key: tuple, build: Callable[[], Var]) -> Var:
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]

    def cast(self, var: Var, dtype) -> Var:
        if var.dtype == dtype:
            return var
        return self.once(("cast", var.name, dtype), lambda: mb.cast(x=var, dtype=MIL_DTYPE_NAMES[dtype]))

    def operands(self, *values: ir.Value) -> list[Var]:
        """Inputs of an elementwise op in one dtype: constants take the tensors' dtype, fp32 meets fp16 as fp16."""
        arrays = [self.constant(value) for value in values]
        tensors = {value: self.var(value) for value, array in zip(values, arrays) if array is None}
        floats = {var.dtype for var in tensors.values() if types.is_float(var.dtype)}
        float_dtype = types.fp16 if types.fp16 in floats or not floats else types.fp32
        result = []
        for value, array in zip(values, arrays):
            if array is not None:
                result.append(self.const(array, value.name, float_dtype if array.dtype.kind == "f" else None))
            else:
                var = tensors[value]
                result.append(self.cast(var, float_dtype) if types.is_float(var.dtype) else var)
        return result

    def scalar(self, number: float, like: Var) -> Var:
        return self.const(np.array(number), f"scalar {number!r}", like.dtype)

    # --- weights ------------------------------------------------------------------------------------------

    def weight(self, value: ir.Value, transpose: bool = False) -> Var | None:
        """The constant matrix ``value`` (transposed if asked) as a MIL constant, or None when it is computed.

        Follows float casts and transposes down to an initializer or a block-wise ``DequantizeLinear``, so a
        quantized weight stays compressed whichever way it is used (a tied embedding is also the output head).
        """
        array = self.constant(value)
        if array is not None:
            if array.ndim != 2:
                return None
            return self.const(array.T if transpose else array, f"{value.name}^T" if transpose else value.name)
        node = value.producer()
        if value not in self.deferred or node is None:
            return None
        if node.op_type == "Cast" and ir.DataType(node.attributes.get_int("to")) in FLOAT_TYPES:
            return self.weight(node.inputs[0], transpose)  # fp16 weights, or fp16 scales, computed in fp32
        if node.op_type == "Transpose" and list(node.attributes.get_ints("perm", [1, 0])) == [1, 0]:
            return self.weight(node.inputs[0], not transpose)
        if node.op_type == "DequantizeLinear":
            return self.once(("weight", node.name, transpose), lambda: self.blockwise_weight(node, transpose))
        if node.op_type == "Reshape" and (nf4 := self.codebook_parts(node)) is not None:
            return self.once(("weight", node.name, transpose), lambda: self.codebook_weight(*nf4, transpose))
        return None

    def codebook_parts(self, matrix: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(indices, levels, block scales) of an nf4 weight as quantization expands it, else None:
        ``Reshape(Mul(Reshape(Gather(levels, Cast(indices))), Cast(Unsqueeze(scales))))``, where
        specialization may have folded the small constant steps (casts, unsqueezes) already."""
        def producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
            node = value.producer() if value is not None else None
            return node if node is not None and node.op_type == op_type else None

        scaled = producer(matrix.inputs[0], "Mul")
        blocks = scaled and producer(scaled.inputs[0], "Reshape")
        gather = blocks and producer(blocks.inputs[0], "Gather")
        if gather is None:
            return None
        index = producer(gather.inputs[1], "Cast")
        indices = self.constant(index.inputs[0] if index is not None else gather.inputs[1])
        levels, blocked_shape = self.constant(gather.inputs[0]), self.constant(blocks.inputs[1])
        scales = self.folded(scaled.inputs[1])
        if any(array is None for array in (indices, levels, blocked_shape, scales)):
            return None
        if indices.ndim != 2 or levels.size > 16 or scales.ndim != 3:
            return None
        block_axis = next((axis for axis in range(3) if scales.shape[axis] == 1 and blocked_shape[axis] != 1), None)
        return None if block_axis is None else (indices, levels, scales.squeeze(block_axis))

    def folded(self, value: ir.Value) -> np.ndarray | None:
        """A constant reached through Cast and Unsqueeze nodes (dtype left as stored), or None."""
        array = self.constant(value)
        node = value.producer()
        if array is not None or node is None:
            return array
        inner = self.folded(node.inputs[0]) if node.op_type in ("Cast", "Unsqueeze") else None
        if inner is None or node.op_type == "Cast":
            return inner
        axes = self.constant(node.inputs[1])
        return None if axes is None else np.expand_dims(inner, tuple(int(axis) for axis in axes))

    def codebook_weight(self, indices: np.ndarray, levels: np.ndarray, scales: np.ndarray, transpose: bool) -> Var:
        """An nf4 weight -> ``constexpr_lut_to_dense`` over the same 4-bit indices with the 16 levels as one
        shared table, then ``constexpr_blockwise_shift_scale`` by the same block scales (coremltools' own
        chain for palettization with scales). One table per block would cost 16 fp16 entries per block."""
        def laid_out(array: np.ndarray) -> np.ndarray:
            return array.T if transpose else array

        table = np.zeros(16, np.float16)
        table[: levels.size] = levels
        levels_per_weight = mb.constexpr_lut_to_dense(
            indices=self.hold(laid_out(indices.astype(np.uint8)).astype(types.np_uint4_dtype)),
            lut=table.reshape(1, 1, 16, 1),
        )
        return mb.constexpr_blockwise_shift_scale(data=levels_per_weight,
                                                  scale=self.hold(laid_out(scales).astype(np.float16)))

    def blockwise_weight(self, node: ir.Node, transpose: bool) -> Var:
        """``DequantizeLinear(q, scale, zero_point, block_size=B)`` of a matrix -> ``constexpr_blockwise_shift_scale``
        over the same integers, scales and zero points (transposed together when asked)."""
        q, scale = (self.constant(value) for value in node.inputs[:2])
        zero_point = self.constant(node.inputs[2]) if len(node.inputs) > 2 else None
        stored = node.inputs[0].const_value
        integers = WEIGHT_INTEGERS.get(stored.dtype) if stored is not None else None
        if q is None or scale is None or q.ndim != 2 or node.attributes.get_int("block_size", 0) <= 0 or not integers:
            raise NanoexportError(
                f"DequantizeLinear node {node.name}: only constant block-wise int4/uint4/int8/uint8 matrices lower "
                "to Core ML; quantize with a block size"
            )

        def laid_out(array: np.ndarray) -> np.ndarray:
            return array.T if transpose else array

        # Scales in fp16, the precision the weight is computed in (the canonical graph stores fp16 scales). Named
        # after the canonical integers, so that the manifest's digests can tell which layer the package stores.
        return mb.constexpr_blockwise_shift_scale(
            name=mil_weight_name(node.inputs[0].name + (".transposed" if transpose else "")),
            data=self.hold(laid_out(q.astype(np.int16)).astype(integers)),
            scale=self.hold(laid_out(scale).astype(np.float16)),
            offset=None if zero_point is None else self.hold(laid_out(zero_point.astype(np.int16)).astype(integers)),
        )


def _constant_node(value: ir.Value) -> ir.Node | None:
    """The Constant node (with a tensor ``value``) that produces ``value``, if one does."""
    node = value.producer()
    return node if node is not None and node.op_type == "Constant" and "value" in node.attributes else None


def _numpy_mil_dtype(dtype: np.dtype):
    if dtype == np.bool_:
        return types.bool
    if np.issubdtype(dtype, np.integer):
        return types.int32
    raise NanoexportError(f"the coreml target has no constant type for {dtype}")


# --- op lowerings: (lowering, node) -> one MIL var per ONNX output ---------------------------------------------


def _binary(mil_op) -> Callable:
    def lower(lw: _Lowering, node: ir.Node) -> list[Var]:
        x, y = lw.operands(node.inputs[0], node.inputs[1])
        return [mil_op(x=x, y=y)]

    return lower


def _unary(mil_op) -> Callable:
    def lower(lw: _Lowering, node: ir.Node) -> list[Var]:
        return [mil_op(x=lw.var(node.inputs[0]))]

    return lower


def _div(lw: _Lowering, node: ir.Node) -> list[Var]:
    x, y = lw.operands(node.inputs[0], node.inputs[1])
    if not types.is_float(x.dtype):
        raise NanoexportError(f"Div node {node.name} divides integers; the coreml target lowers float Div only")
    return [mb.real_div(x=x, y=y)]


def _cast(lw: _Lowering, node: ir.Node) -> list[Var]:
    if node.inputs[0].dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        raise NanoexportError(
            f"Cast node {node.name} unpacks 4-bit integers outside a quantized weight form the coreml target "
            "knows (block-wise DequantizeLinear, nf4 codebook); quantize with --quant int4, or report the model"
        )
    x = lw.var(node.inputs[0])
    to = ir.DataType(node.attributes.get_int("to"))
    if to not in FLOAT_TYPES:
        dtype = _mil_dtype(to)
    elif types.is_float(x.dtype):
        dtype = x.dtype  # a float keeps its precision
    elif x.dtype == types.bool:
        dtype = types.fp16
    else:
        dtype = types.fp32  # integers (positions) stay exact: see the module docstring
    return [lw.cast(x, dtype)]


def _unsqueeze(lw: _Lowering, node: ir.Node) -> list[Var]:
    x, axes = lw.var(node.inputs[0]), lw.required_constant(node, 1)
    rank = x.rank + len(axes)
    return [mb.expand_dims(x=x, axes=sorted(int(axis) % rank for axis in axes))]


def _reshape(lw: _Lowering, node: ir.Node) -> list[Var]:
    return [mb.reshape(x=lw.var(node.inputs[0]), shape=list(node.outputs[0].shape))]  # static after specialize


def _transpose(lw: _Lowering, node: ir.Node) -> list[Var]:
    x = lw.var(node.inputs[0])
    perm = list(node.attributes.get_ints("perm", list(reversed(range(x.rank)))))
    return [mb.transpose(x=x, perm=perm)]


def _split(lw: _Lowering, node: ir.Node) -> list[Var]:
    x = lw.var(node.inputs[0])
    axis = node.attributes.get_int("axis", 0) % x.rank
    sizes = [value.shape[axis] for value in node.outputs]  # static after specialize, with or without a sizes input
    return list(mb.split(x=x, split_sizes=sizes, axis=axis))


def _slice(lw: _Lowering, node: ir.Node) -> list[Var]:
    x = lw.var(node.inputs[0])
    starts, ends = lw.required_constant(node, 1), lw.required_constant(node, 2)
    axes = lw.constant(node.inputs[3]) if len(node.inputs) > 3 else None
    steps = lw.constant(node.inputs[4]) if len(node.inputs) > 4 else None
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    begin, end, stride = [0] * x.rank, list(x.shape), [1] * x.rank
    for axis, start, stop, step in zip(axes, starts, ends, steps):
        if step < 1:
            raise NanoexportError(f"Slice node {node.name} steps backwards; the coreml target lowers forward slices")
        axis = int(axis) % x.rank
        begin[axis], end[axis], stride[axis] = slice(int(start), int(stop), int(step)).indices(x.shape[axis])
    return [mb.slice_by_index(x=x, begin=begin, end=end, stride=stride)]


def _gather(lw: _Lowering, node: ir.Node) -> list[Var]:
    data, indices = lw.var(node.inputs[0]), lw.var(node.inputs[1])
    return [mb.gather(x=data, indices=indices, axis=node.attributes.get_int("axis", 0))]


def _matmul(lw: _Lowering, node: ir.Node) -> list[Var]:
    weight = lw.weight(node.inputs[1], transpose=True)
    if weight is not None:
        return [mb.linear(x=lw.var(node.inputs[0]), weight=weight)]
    x, y = lw.operands(node.inputs[0], node.inputs[1])
    return [mb.matmul(x=x, y=y)]


def _gemm(lw: _Lowering, node: ir.Node) -> list[Var]:
    attributes = node.attributes
    plain = attributes.get_float("alpha", 1.0) == 1.0 and attributes.get_float("beta", 1.0) == 1.0
    if not plain or attributes.get_int("transA", 0):
        raise NanoexportError(f"Gemm node {node.name} scales or transposes its input; report the model")
    weight = lw.weight(node.inputs[1], transpose=not attributes.get_int("transB", 0))
    if weight is None:
        raise NanoexportError(f"Gemm node {node.name} multiplies by a computed matrix; report the model")
    bias = lw.constant(node.inputs[2]) if len(node.inputs) > 2 else None
    bias = None if bias is None else lw.const(bias, node.inputs[2].name)
    return [mb.linear(x=lw.var(node.inputs[0]), weight=weight, bias=bias)]


def _gelu(lw: _Lowering, node: ir.Node) -> list[Var]:
    mode = "TANH_APPROXIMATION" if node.attributes.get_string("approximate", "none") == "tanh" else "EXACT"
    return [mb.gelu(x=lw.var(node.inputs[0]), mode=mode)]


def _swish(lw: _Lowering, node: ir.Node) -> list[Var]:
    x = lw.var(node.inputs[0])
    alpha = node.attributes.get_float("alpha", 1.0)
    if alpha == 1.0:
        return [mb.silu(x=x)]
    return [mb.mul(x=x, y=mb.sigmoid(x=mb.mul(x=x, y=lw.scalar(alpha, x))))]


def _normalized_axes(node: ir.Node, rank: int) -> list[int]:
    return list(range(node.attributes.get_int("axis", -1) % rank, rank))


def _layer_norm(lw: _Lowering, node: ir.Node) -> list[Var]:
    x = lw.var(node.inputs[0])
    scale = lw.const(lw.required_constant(node, 1), node.inputs[1].name)
    bias = lw.constant(node.inputs[2]) if len(node.inputs) > 2 else None
    bias = None if bias is None else lw.const(bias, node.inputs[2].name)
    epsilon = np.float16(node.attributes.get_float("epsilon", 1e-5))
    return [mb.layer_norm(x=x, axes=_normalized_axes(node, x.rank), gamma=scale, beta=bias, epsilon=epsilon)]


def _rms_norm(lw: _Lowering, node: ir.Node) -> list[Var]:
    """RMSNormalization as a layer norm over ``[x, -x]``, whose mean is zero: ``x / sqrt(mean(x^2) + eps)``.

    Squaring in fp16 overflows past 256; a fused layer norm keeps its statistics to itself (the form Anemll
    uses on the Neural Engine).
    """
    x = lw.var(node.inputs[0])
    if _normalized_axes(node, x.rank) != [x.rank - 1]:
        raise NanoexportError(f"RMSNormalization node {node.name} normalizes more than the last axis; report the model")
    mirrored = mb.concat(values=[x, mb.mul(x=x, y=lw.scalar(-1.0, x))], axis=-1)
    epsilon = np.float16(node.attributes.get_float("epsilon", 1e-5))
    normalized = mb.layer_norm(x=mirrored, axes=[-1], epsilon=epsilon)
    half = mb.slice_by_index(x=normalized, begin=[0] * x.rank, end=list(x.shape))
    return [mb.mul(x=half, y=lw.const(lw.required_constant(node, 1), node.inputs[1].name))]


def _rotary_embedding(lw: _Lowering, node: ir.Node) -> list[Var]:
    """Non-interleaved rotation of the first ``rotary_embedding_dim`` channels by gathered cos/sin ``[b, s, r/2]``."""
    x = lw.var(node.inputs[0])
    if len(node.inputs) > 3 and node.inputs[3] is not None or node.attributes.get_int("interleaved", 0) or x.rank != 4:
        raise NanoexportError(
            f"RotaryEmbedding node {node.name}: the coreml target lowers the non-interleaved form on [batch, heads, "
            "sequence, head_dim] with gathered cos/sin; report the model"
        )
    head_dim = x.shape[-1]
    half = (node.attributes.get_int("rotary_embedding_dim", 0) or head_dim) // 2

    def per_head(value: ir.Value) -> Var:  # [batch, 1, sequence, half]: one angle for every head
        return lw.once(("rotary", value.name), lambda: mb.expand_dims(x=lw.cast(lw.var(value), x.dtype), axes=[1]))

    cos, sin = per_head(node.inputs[1]), per_head(node.inputs[2])
    sizes = [half, half] + ([head_dim - 2 * half] if 2 * half < head_dim else [])
    first, second, *rest = mb.split(x=x, split_sizes=sizes, axis=-1)
    rotated_first = mb.sub(x=mb.mul(x=first, y=cos), y=mb.mul(x=second, y=sin))
    rotated_second = mb.add(x=mb.mul(x=second, y=cos), y=mb.mul(x=first, y=sin))
    return [mb.concat(values=[rotated_first, rotated_second, *rest], axis=-1)]


def _tensor_scatter(lw: _Lowering, node: ir.Node) -> list[Var]:
    """The KV-cache write: rows of ``update`` into the state at ``cache_position`` along ``axis``."""
    past, update, position = node.inputs
    state = lw.states.get(past)
    if state is None or node.attributes.get_string("mode", "linear") != "linear":
        raise NanoexportError(
            f"TensorScatter node {node.name}: the coreml target writes the KV-cache inputs linearly (--kv-cache "
            "static) only"
        )
    update = lw.cast(lw.var(update), types.fp16)
    axis = node.attributes.get_int("axis", -2) % update.rank
    position = lw.var(position)  # [batch] = [1]
    zeros = [lw.const(np.zeros(count, np.int32), f"zeros {count}") for count in (axis, update.rank - axis - 1)]
    begin = mb.concat(values=[part for part in (zeros[0], position, zeros[1]) if part.shape != (0,)], axis=0)
    end = mb.add(x=begin, y=lw.const(np.array(update.shape, np.int32), f"shape {update.shape}"))
    written = mb.slice_update(x=mb.read_state(input=state), update=update, begin=begin, end=end)
    mb.coreml_update_state(state=state, value=written)
    return [written]


def _attention(lw: _Lowering, node: ir.Node) -> list[Var]:
    """ONNX Attention over [batch, heads, sequence, head_dim] with a mask ``[batch, 1, sequence, capacity]``.

    Grouped-query attention folds each KV head's query heads into the sequence axis (a reshape, and the
    mask tiled per group), so the cache is never repeated.
    """
    attributes = node.attributes
    query, key, value = (lw.cast(lw.var(v), types.fp16) for v in node.inputs[:3])
    mask_value = node.inputs[3] if len(node.inputs) > 3 else None
    extra_inputs = [v for v in node.inputs[4:] if v is not None]
    extra_outputs = [v for v in node.outputs[1:] if v.uses() or v.is_graph_output()]
    if query.rank != 4 or mask_value is None or extra_inputs or extra_outputs or attributes.get_int("is_causal", 0):
        raise NanoexportError(
            f"Attention node {node.name}: the coreml target lowers the canonical form (4-D inputs, an explicit "
            "mask, no past/present) only; report the model"
        )
    batch, query_heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    group = query_heads // kv_heads
    mask = lw.var(mask_value)
    mask = mask if mask.dtype == types.bool else lw.cast(mask, types.fp16)
    if mask.shape[1] != 1:
        raise NanoexportError(f"Attention node {node.name} has a per-head mask; report the model")
    query = mb.reshape(x=query, shape=[batch, kv_heads, group * length, head_dim])
    if group > 1 and mask.shape[2] > 1:
        mask = mb.tile(x=mask, reps=[1, 1, group, 1])
    scale = attributes.get_float("scale", 1 / math.sqrt(head_dim))
    softcap = attributes.get_float("softcap", 0.0)
    if softcap:
        output = _softcapped_attention(lw, query, key, value, mask, scale, softcap)
    else:
        if not math.isclose(scale, 1 / math.sqrt(head_dim), rel_tol=1e-6):  # the fused op scales by 1/sqrt(d)
            query = mb.mul(x=query, y=lw.scalar(scale * math.sqrt(head_dim), query))
        output = mb.scaled_dot_product_attention(query=query, key=key, value=value, attn_mask=mask)
    return [mb.reshape(x=output, shape=[batch, query_heads, length, head_dim])]


def _softcapped_attention(lw: _Lowering, query, key, value, mask, scale: float, softcap: float) -> Var:
    """Attention with ``softcap * tanh(scores / softcap)`` before the mask (Gemma 2): no fused op has it."""
    scores = mb.mul(x=mb.matmul(x=query, y=key, transpose_y=True), y=lw.scalar(scale, query))
    scores = mb.mul(x=mb.tanh(x=mb.real_div(x=scores, y=lw.scalar(softcap, query))), y=lw.scalar(softcap, query))
    if mask.dtype == types.bool:
        scores = mb.select(cond=mask, a=scores, b=lw.scalar(float(np.finfo(np.float16).min), scores))
    else:
        scores = mb.add(x=scores, y=mask)
    return mb.matmul(x=mb.softmax(x=scores, axis=-1), y=value)


LOWERINGS: dict[str, Callable[[_Lowering, ir.Node], list[Var]]] = {
    "Add": _binary(mb.add),
    "Sub": _binary(mb.sub),
    "Mul": _binary(mb.mul),
    "Div": _div,
    "LessOrEqual": _binary(mb.less_equal),
    "Greater": _binary(mb.greater),
    "And": _binary(mb.logical_and),
    "Cos": _unary(mb.cos),
    "Sin": _unary(mb.sin),
    "Sigmoid": _unary(mb.sigmoid),
    "Tanh": _unary(mb.tanh),
    "Gelu": _gelu,
    "Swish": _swish,
    "Cast": _cast,
    "Unsqueeze": _unsqueeze,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "LayerNormalization": _layer_norm,
    "RMSNormalization": _rms_norm,
    "RotaryEmbedding": _rotary_embedding,
    "TensorScatter": _tensor_scatter,
    "Attention": _attention,
}
