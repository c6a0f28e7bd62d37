"""The tvm target's own kernels, written in TVM's tensor expressions: a matmul that reads quantized weights
packed as the canonical graph stores them and dequantizes each element inside its loop, and the KV-cache
write at ``cache_position``.

Packed weights are the raw bytes of the canonical initializer, flat: INT4/UINT4 two elements a byte, the
first in the low nibble (ONNX's packing), INT8/UINT8 one a byte. A weight element is ``(q - zero_point) *
scale`` in the activations' type (float32), as ONNX Runtime's MatMulNBits computes it: the canonical
``DequantizeLinear`` rounds that product to the fp16 scale's type first, which moves a weight by at most half
an fp16 step and cost two conversions per element in the kernel's inner loop (the demo's int4 decode call:
1.6 ms with them, 1.1 ms without).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx

# Blocks ``schedules`` schedules: x @ W with W [..., K, N], and x @ W.T with W [..., N, K].
WEIGHT_MATMULS = ("dequantize_matmul", "weight_matmul", "attention_values")
TRANSPOSED_MATMULS = ("dequantize_matmul_transposed", "matmul_transposed", "attention_scores")
DEQUANTIZED_WEIGHT = "dequantize_weight"
QUANT_TYPES = {"INT4": (4, True), "UINT4": (4, False), "INT8": (8, True), "UINT8": (8, False)}


@dataclass(frozen=True)
class Blocking:
    """How a 2-D quantized weight is laid out: its shape, element type and the axis its scale blocks run along."""

    rows: int
    cols: int
    quant_type: str  # a key of QUANT_TYPES
    axis: int  # 0: a scale per block of ``block_size`` rows and per column; 1: per row and block of columns
    block_size: int

    @property
    def bits(self) -> int:
        return QUANT_TYPES[self.quant_type][0]

    @property
    def signed(self) -> bool:
        return QUANT_TYPES[self.quant_type][1]

    @property
    def scale_cols(self) -> int:
        return self.cols if self.axis == 0 else -(-self.cols // self.block_size)


def _integer(packed: te.Tensor, flat, bits: int, signed: bool):
    """Element ``flat`` of a flat packed integer tensor, as int32."""
    if bits == 8:
        return packed[flat].astype("int32")
    nibble = (packed[flat // 2].astype("int32") >> ((flat % 2) * 4)) & 15
    return (nibble ^ 8) - 8 if signed else nibble


def weight_element(blocking: Blocking, packed: te.Tensor, scale: te.Tensor, zero: te.Tensor | None, row, col,
                   dtype: str):
    """The dequantized weight at ``(row, col)``, as the canonical graph computes it, in ``dtype``."""
    value = _integer(packed, row * blocking.cols + col, blocking.bits, blocking.signed)
    size = blocking.block_size
    block_row, block_col = (row // size, col) if blocking.axis == 0 else (row, col // size)
    if zero is not None:
        value = value - _integer(zero, block_row * blocking.scale_cols + block_col, blocking.bits, blocking.signed)
    # The integers and scales are the canonical ones; the product is exact in float32 (see the module's note).
    return value.astype(dtype) * scale[block_row, block_col].astype(dtype)


def quantized_matmul(x: te.Tensor, packed: te.Tensor, scale: te.Tensor, zero: te.Tensor | None = None, *,
                     blocking: Blocking, transposed: bool) -> te.Tensor:
    """``x @ W`` (or ``x @ W.T`` when ``transposed``) for the packed weight ``W``, dequantized in the loop: the
    weight, as ``[K, N]``, is its own stage (``dequantize_weight``), which ``schedules`` computes inside the
    matmul, per element for one token, per strip of columns shared by all the tokens of a prefill."""
    reduced = blocking.cols if transposed else blocking.rows
    outputs = blocking.rows if transposed else blocking.cols
    k = te.reduce_axis((0, reduced), "k")

    def element(row, col):
        return weight_element(blocking, packed, scale, zero, *((col, row) if transposed else (row, col)), x.dtype)

    weight = te.compute((reduced, outputs), element, name=DEQUANTIZED_WEIGHT)
    return te.compute((*x.shape[:-1], outputs),
                      lambda *index: te.sum(x[(*index[:-1], k)] * weight[k, index[-1]], axis=k),
                      name="dequantize_matmul_transposed" if transposed else "dequantize_matmul")


def dequantize(packed: te.Tensor, scale: te.Tensor, zero: te.Tensor | None = None, *, blocking: Blocking,
               dtype: str) -> te.Tensor:
    """The whole weight dequantized (for the rare weight read by something else than a MatMul: a Gather)."""
    return te.compute((blocking.rows, blocking.cols),
                      lambda row, col: weight_element(blocking, packed, scale, zero, row, col, dtype),
                      name="dequantize")


def weight_matmul(x: te.Tensor, weight: te.Tensor) -> te.Tensor:
    """``x @ weight`` for a float weight ``[K, N]`` (our block, so that ``schedules`` finds it)."""
    k = te.reduce_axis((0, weight.shape[0]), "k")
    return te.compute((*x.shape[:-1], weight.shape[1]),
                      lambda *index: te.sum(x[(*index[:-1], k)] * weight[k, index[-1]], axis=k),
                      name="weight_matmul")


def transposed_matmul(x: te.Tensor, weight: te.Tensor) -> te.Tensor:
    """``x @ weight.T`` reading ``weight`` ``[N, K]`` in place (a tied embedding as the output projection)."""
    k = te.reduce_axis((0, weight.shape[1]), "k")
    return te.compute((*x.shape[:-1], weight.shape[0]),
                      lambda *index: te.sum(x[(*index[:-1], k)] * weight[index[-1], k], axis=k),
                      name="matmul_transposed")


def attention_scores(q: te.Tensor, k: te.Tensor) -> te.Tensor:
    """``q @ k.T`` per batch and KV head: q ``[b, kv, rows, d]``, k ``[b, kv, slots, d]``."""
    d = te.reduce_axis((0, q.shape[3]), "d")
    return te.compute((*q.shape[:3], k.shape[2]),
                      lambda b, h, i, j: te.sum(q[b, h, i, d] * k[b, h, j, d], axis=d), name="attention_scores")


def attention_values(p: te.Tensor, v: te.Tensor) -> te.Tensor:
    """``p @ v`` per batch and KV head: p ``[b, kv, rows, slots]``, v ``[b, kv, slots, d]``."""
    s = te.reduce_axis((0, v.shape[2]), "s")
    return te.compute((*p.shape[:3], v.shape[3]),
                      lambda b, h, i, j: te.sum(p[b, h, i, s] * v[b, h, s, j], axis=s), name="attention_values")


def cache_write(past: te.Tensor, update: te.Tensor, position: te.Tensor, circular: bool) -> te.Tensor:
    """``past`` ``[batch, heads, slots, dim]`` with the rows of ``update`` written from ``position[batch]`` on,
    wrapping round the slots when ``circular`` (ONNX ``TensorScatter`` on axis 2, linear or circular)."""
    slots, rows = past.shape[2], update.shape[2]

    def element(b, h, s, d):
        offset = s.astype("int64") - position[b]
        if circular:
            offset = tirx.floormod(offset, slots)
        inside = tirx.all(offset >= 0, offset < rows)
        return tirx.if_then_else(inside, update[b, h, tirx.max(tirx.min(offset, rows - 1), 0), d], past[b, h, s, d])

    return te.compute(past.shape, element, name="cache_write")


def quantized_gather(indices: te.Tensor, packed: te.Tensor, scale: te.Tensor, zero: te.Tensor | None = None, *,
                     blocking: Blocking, dtype: str) -> te.Tensor:
    """Rows ``indices`` of the packed weight, dequantized (a quantized embedding read by token ids)."""
    return te.compute((*indices.shape, blocking.cols),
                      lambda *index: weight_element(blocking, packed, scale, zero, indices[index[:-1]], index[-1],
                                                    dtype),
                      name="dequantize_gather")


def bind(kernel, **settings):
    """``kernel`` with its Python settings fixed, for ``BlockBuilder.emit_te`` (which takes tensors only) and
    named after the kernel."""

    def bound(*tensors):
        return kernel(*tensors, **settings)

    bound.__name__ = kernel.__name__
    return bound
