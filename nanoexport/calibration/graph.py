"""Where quantized weights live in the canonical graph, and how they get there.

A linear layer is a ``MatMul`` whose second input is a weight matrix: an initializer ``[K, N]``, or the
transpose of one ``[N, K]`` (a tied embedding used as the output head). Quantized, the initializer is
replaced by a blocked ``DequantizeLinear`` (opset 21+) over packed integers, blocks along K:

    values INT4/UINT4/INT8 [K, N], scales FLOAT16/FLOAT [ceil(K/B), N] (, zero points)
        -> DequantizeLinear(axis=0, block_size=B) [-> Cast(FLOAT) when the scales are FLOAT16] -> MatMul

NF4 stores codebook indices (UINT4) and expands them with ``Gather`` over the 16 levels, then scales each
block. Every target reads these integers and scales as they are, so artifacts agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from nanoexport.calibration.blocks import NF4_CODEBOOK, QuantizedWeight
from nanoexport.passes.initializers import lazy_initializer, new_initializer, register_tensor

STORAGE_TYPES = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "int8": np.int8, "nf4": ml_dtypes.uint4}


@dataclass
class Linear:
    """One quantizable weight matrix, seen as ``[K, N]`` whatever its stored layout."""

    name: str  # the weight's name without ``.weight.T``: ``model.layers.0.mlp.down_proj``
    matmul: ir.Node  # for an embedding table, its Gather
    initializer: ir.Value
    transposed: bool  # stored ``[N, K]`` and transposed in the graph (a tied embedding)
    embedding: bool = False  # a lookup table, not a MatMul: rows looked up, no activations to calibrate on

    @property
    def input(self) -> ir.Value:
        """The activations the MatMul multiplies (not defined for an embedding table)."""
        return self.matmul.inputs[0]

    def matrix(self) -> np.ndarray:
        """The float weight ``[K, N]``."""
        array = self.initializer.const_value.numpy().astype(np.float32, copy=False)  # lazy weights: read as float32
        return array.T if self.transposed else array

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = self.initializer.shape
        return (columns, rows) if self.transposed else (rows, columns)


def find_linears(model: ir.Model) -> list[Linear]:
    """Every MatMul by a float weight matrix, in graph order; a matrix two MatMuls share counts once (it is
    quantized once, and both read the result)."""
    linears = []
    seen: set[int] = set()
    for node in model.graph:
        if node.op_type != "MatMul":
            continue
        weight = node.inputs[1]
        producer = weight.producer()
        transposed = producer is not None and producer.op_type == "Transpose"
        source = producer.inputs[0] if transposed else weight
        if transposed and list(producer.attributes.get_ints("perm", [1, 0])) != [1, 0]:
            continue
        if source.const_value is None or source.shape is None or source.shape.rank() != 2:
            continue
        if source.dtype != ir.DataType.FLOAT or not source.is_initializer() or id(source) in seen:
            continue
        seen.add(id(source))
        linears.append(Linear(_layer_name(weight.name or source.name), node, source, transposed))
    return linears


def find_embeddings(model: ir.Model) -> list[Linear]:
    """Embedding tables ``[vocab, hidden]`` that only Gathers read (a table the output head shares is quantized
    as the head). Seen like a tied head, ``[K = hidden, N = vocab]`` stored transposed, so blocks run along
    the hidden size and a quantized table lowers as a tied head's does (ONNX Runtime's GatherBlockQuantized)."""
    tables = []
    for node in model.graph:
        table = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
        if table is None or not table.is_initializer() or table.const_value is None or table.dtype != ir.DataType.FLOAT:
            continue
        if table.shape is None or table.shape.rank() != 2 or node.attributes.get_int("axis", 0) != 0:
            continue
        if any(user.op_type != "Gather" for user, _ in table.uses()) or any(t.initializer is table for t in tables):
            continue
        # Initializers carry the capture wrapper's "model." before the parameter's name (``FlatCacheLM``).
        name = table.name.removeprefix("model.").removesuffix(".weight")
        tables.append(Linear(name, node, table, transposed=True, embedding=True))
    return tables


def _layer_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight.T")


def replace_weight(model: ir.Model, linear: Linear, quantized: QuantizedWeight) -> None:
    """Put ``quantized`` in place of ``linear``'s float initializer (every use of it, e.g. a tied Gather)."""
    graph = model.graph
    fmt = quantized.format
    base = linear.initializer.name
    axis = 1 if linear.transposed else 0

    def stored(array: np.ndarray) -> np.ndarray:
        return array.T if linear.transposed else array

    def add(suffix: str, array: np.ndarray) -> ir.Value:
        return new_initializer(graph, f"{base}.{suffix}", array)

    scale_type = np.float16 if fmt.scale_dtype == "fp16" else np.float32
    if fmt.bits == 4:
        name = f"{base}.quant"
        values = register_tensor(graph, packed_four_bit(name, stored(quantized.values), STORAGE_TYPES[fmt.dtype]))
    else:
        values = add("quant", stored(quantized.values).astype(STORAGE_TYPES[fmt.dtype]))
    scales = add("scale", stored(quantized.scales).astype(scale_type))
    nodes: list[ir.Node] = []
    if fmt.dtype == "nf4":
        nodes += _nf4_expansion(add, values, scales, fmt.block_size, axis, linear.initializer.shape)
    else:
        inputs = [values, scales]
        if quantized.zero_points is not None:
            zero_points = stored(quantized.zero_points).astype(STORAGE_TYPES[fmt.dtype])
            inputs.append(add("zero_point", zero_points))
        nodes.append(ir.node("DequantizeLinear", inputs, attributes={"axis": axis, "block_size": fmt.block_size}))
    if scale_type is np.float16 and fmt.dtype != "nf4":
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], attributes={"to": ir.DataType.FLOAT}))
    weight = nodes[-1].outputs[0]
    weight.shape, weight.type = linear.initializer.shape, linear.initializer.type
    graph.insert_before(_first_user(graph, linear.initializer), nodes)
    linear.initializer.replace_all_uses_with(weight)
    del graph.initializers[base]
    weight.name = f"{base}.dequantized"


def packed_four_bit(name: str, values: np.ndarray, dtype: type) -> ir.PackedTensor:
    """``values`` (int8/uint8 levels) as a 4-bit tensor held two to a byte, as ONNX stores them (first value in
    the low nibble): unpacked, every int4 weight of a model would cost a byte until it is written."""
    nibbles = np.ascontiguousarray(values).reshape(-1).view(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    data_type = ir.DataType.INT4 if dtype is ml_dtypes.int4 else ir.DataType.UINT4
    return ir.PackedTensor(packed, data_type, shape=values.shape, name=name)


def _nf4_expansion(add, indices: ir.Value, scales: ir.Value, block_size: int, axis: int,
                   shape: ir.Shape) -> list[ir.Node]:
    """indices -> codebook levels -> times each block's scale, in plain ONNX ops; FLOAT out."""
    rows, columns = shape
    if axis == 0:
        blocked_shape, scale_axis = [rows // block_size, block_size, columns], 1
    else:
        blocked_shape, scale_axis = [rows, columns // block_size, block_size], 2
    index = ir.node("Cast", [indices], attributes={"to": ir.DataType.INT32})
    levels = ir.node("Gather", [add("codebook", NF4_CODEBOOK), index.outputs[0]])
    blocks = ir.node("Reshape", [levels.outputs[0], add("blocked_shape", np.array(blocked_shape, np.int64))])
    block_scales = ir.node("Unsqueeze", [scales, add("scale_axis", np.array([scale_axis], np.int64))])
    float_scales = ir.node("Cast", [block_scales.outputs[0]], attributes={"to": ir.DataType.FLOAT})
    scaled = ir.node("Mul", [blocks.outputs[0], float_scales.outputs[0]])
    matrix = ir.node("Reshape", [scaled.outputs[0], add("matrix_shape", np.array([rows, columns], np.int64))])
    return [index, levels, blocks, block_scales, float_scales, scaled, matrix]


def _first_user(graph: ir.Graph, value: ir.Value) -> ir.Node:
    users = {id(node) for node, _ in value.uses()}
    return next(node for node in graph if id(node) in users)


def to_float16(model: ir.Model, linear: Linear) -> None:
    """Store ``linear``'s weight as FLOAT16, cast back to FLOAT where it is used. A weight read lazily from the
    checkpoint stays lazy: its fp16 copy is made when a stage reads it, and not kept (Qwen2.5-0.5B's tied
    embedding, 272 MB in fp16, was held through the whole of a layer-by-layer calibration)."""
    graph = model.graph
    base = linear.initializer.name
    source = linear.initializer.const_value
    if isinstance(source, ir.LazyTensor):
        half = lazy_initializer(graph, f"{base}.fp16", lambda: ir.tensor(source.numpy().astype(np.float16)),
                                ir.DataType.FLOAT16, list(source.shape))
    else:
        half = new_initializer(graph, f"{base}.fp16", source.numpy().astype(np.float16))
    cast = ir.node("Cast", [half], attributes={"to": ir.DataType.FLOAT})
    cast.outputs[0].shape, cast.outputs[0].type = linear.initializer.shape, linear.initializer.type
    graph.insert_before(_first_user(graph, linear.initializer), [cast])
    linear.initializer.replace_all_uses_with(cast.outputs[0])
    del graph.initializers[base]
    cast.outputs[0].name = f"{base}.dequantized"


def scale_input(model: ir.Model, linear: Linear, divisor: np.ndarray) -> None:
    """Make ``linear`` see its input divided by ``divisor`` (per input channel), as AWQ needs.

    Folded into the scale of an RMSNormalization that feeds only this layer (free at run time);
    otherwise a Mul by ``1 / divisor`` goes in front of the MatMul.
    """
    graph = model.graph
    x = linear.input
    producer = x.producer()
    inverse = (1.0 / divisor).astype(np.float32)
    name = f"{linear.initializer.name}.input_scale"
    if (producer is not None and producer.op_type == "RMSNormalization" and len(x.uses()) == 1
            and producer.inputs[1].const_value is not None):
        gamma = producer.inputs[1].const_value.numpy().astype(np.float32)
        producer.replace_input_with(1, new_initializer(graph, name, gamma * inverse))
        return
    factor = new_initializer(graph, name, inverse)
    multiply = ir.node("Mul", [x, factor])
    multiply.outputs[0].shape, multiply.outputs[0].type = x.shape, x.type
    graph.insert_before(linear.matmul, [multiply])
    linear.matmul.replace_input_with(0, multiply.outputs[0])
