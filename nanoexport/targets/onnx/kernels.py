"""ONNX Runtime's fused kernels as rewrite rules on the canonical graph, and the pass that applies them.

Residual Add + RMSNormalization -> SkipSimplifiedLayerNormalization; blocked 4- or 8-bit DequantizeLinear ->
MatMul / Gather -> MatMulNBits / GatherBlockQuantized over our integers and scales, re-laid out as the
kernels read them; Swish -> QuickGelu. All are ``com.microsoft`` ops, which ONNX shape inference does not
know: the rewrites record the output shapes themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern

from nanoexport.passes import GraphPass
from nanoexport.targets.onnx.stored import SHIFTED, UNSHIFTED


class SkipRMSNorm(pattern.RewriteRuleClassBase):
    """Residual Add feeding an RMSNormalization -> ONNX Runtime's SkipSimplifiedLayerNormalization.

    One kernel reads both addends once and returns the normalized value and the sum (the next residual).
    """

    def pattern(self, op, x, skip, weight):
        total = op.Add(x, skip)
        normalized = op.RMSNormalization(total, weight, _allow_other_attributes=True, _outputs=["normalized"])
        return normalized, total

    def check(self, context, x, skip, weight, normalized, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        norm = normalized.producer()
        if norm.attributes.get_int("axis", -1) not in (-1, 2):
            return result.fail("only normalization over the last axis fuses")
        if x.shape is None or skip.shape is None or x.shape != skip.shape or x.shape.rank() != 3:
            return result.fail("both addends must be [batch, sequence, hidden] of one shape")
        if weight.shape is None or weight.shape.rank() != 1:
            return result.fail("the scale must be 1-D", weight)
        return result

    def rewrite(self, op, x, skip, weight, normalized, **_):
        epsilon = normalized.producer().attributes.get_float("epsilon", 1e-5)
        outputs = op.SkipSimplifiedLayerNormalization(
            x, skip, weight, epsilon=epsilon, _domain="com.microsoft", _outputs=4
        )
        # ONNX shape inference does not know vendor ops: record the shapes it cannot work out.
        statistics_shape = ir.Shape([*x.shape[:-1], 1])
        for value, shape in zip(outputs, (x.shape, statistics_shape, statistics_shape, x.shape)):
            value.shape, value.type = shape, ir.TensorType(ir.DataType.FLOAT)
        output, _mean, _inverse_std, total = outputs
        output.type = total.type = x.type
        return output, total


BITS = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}
SIGNED = (ir.DataType.INT4, ir.DataType.INT8)


def _blocked_weight(values, scales, weight, axis: int) -> pattern.MatchResult:
    """Whether ``weight`` is a blocked 4- or 8-bit DequantizeLinear of initializers, blocks along ``axis``,
    that ONNX Runtime's n-bit kernels can read as stored."""
    result = pattern.MatchResult()
    node = weight.producer()
    if values.const_value is None or scales.const_value is None:
        return result.fail("the integers and scales must be initializers")
    if values.dtype not in BITS:
        return result.fail("4- or 8-bit weights only", values)
    if node.attributes.get_int("axis", 1) != axis or values.shape is None or values.shape.rank() != 2:
        return result.fail(f"blocks must run along axis {axis} of a 2-D weight")
    block = node.attributes.get_int("block_size", 0)
    if block < 16 or block & (block - 1) or values.shape[axis] % block:
        return result.fail(f"block size {block} is not a power of two >= 16 dividing the blocked axis")
    return result


def _dequantized(op, cast: bool, zero_point: bool, values, scales, zero_points):
    inputs = [values, scales, zero_points] if zero_point else [values, scales]
    weight = op.DequantizeLinear(*inputs, _allow_other_attributes=True, _outputs=["weight"])
    return op.Cast(weight, to=ir.DataType.FLOAT) if cast else weight


def _unsigned(values: ir.Value) -> np.ndarray:
    """The integers as MatMulNBits stores them: unsigned, around its default zero point (8 for 4 bits, 128
    for 8) when signed."""
    integers = values.const_value.numpy().astype(np.int16)
    return (integers + (1 << (BITS[values.dtype] - 1)) if values.dtype in SIGNED else integers).astype(np.uint8)


def _bytes_suffix(values: ir.Value) -> str:
    """How the kernel's bytes are named, which says how to read them back (stored.py)."""
    return (SHIFTED if values.dtype in SIGNED else UNSHIFTED).removeprefix(".")


def _kernel_initializer(op, source: ir.Value, suffix: str, make: Callable[[], np.ndarray], dtype: ir.DataType,
                        shape: list[int]) -> ir.Value:
    """The initializer ``{source.name}.{suffix}`` holding ``make()``, made once: a tied output head and the
    embedding lookup read the same packed integers and scales rather than a copy each. It is computed when
    written (or run), so the pass holds no second copy of the model's integers."""
    name = f"{source.name}.{suffix}"
    existing = source.graph.initializers.get(name) if source.graph is not None else None
    if existing is not None:
        return existing
    tensor = ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(make())), dtype=dtype, shape=ir.Shape(shape),
                           name=name)
    return op.initializer(tensor, name=name)


def _packed_integers(op, values: ir.Value, block: int, by_output: Callable[[np.ndarray], np.ndarray],
                     columns: int, rows: int) -> ir.Value:
    """MatMulNBits' B: ``[N, blocks, block * bits / 8]`` bytes; 4-bit integers two a byte, low nibble first."""
    bits = BITS[values.dtype]

    def pack() -> np.ndarray:
        stored = by_output(_unsigned(values)).reshape(columns, rows // block, block)
        return stored if bits == 8 else (stored[..., 0::2] | (stored[..., 1::2] << 4)).astype(np.uint8)

    return _kernel_initializer(op, values, _bytes_suffix(values), pack, ir.DataType.UINT8,
                               [columns, rows // block, block * bits // 8])


def _packed_zero_points(op, zero_points: ir.Value, values: ir.Value, by_output: Callable[[np.ndarray], np.ndarray],
                        columns: int, blocks: int) -> ir.Value:
    """MatMulNBits' zero points, flat: ``[N * blocks]`` bytes at 8 bits; at 4, two a byte, each row padded to
    whole bytes. Shifted as the integers are (named alike)."""
    bits = BITS[values.dtype]

    def pack() -> np.ndarray:
        points = by_output(_unsigned(zero_points))  # [N, blocks]
        if bits == 4:
            padded = np.zeros((columns, blocks + blocks % 2), np.uint8)
            padded[:, :blocks] = points
            points = padded[:, 0::2] | (padded[:, 1::2] << 4)
        return points.reshape(-1)

    per_row = blocks if bits == 8 else -(-blocks // 2)
    return _kernel_initializer(op, zero_points, _bytes_suffix(values), pack, ir.DataType.UINT8, [columns * per_row])


def _float_scales(op, scales: ir.Value, by_output: Callable[[np.ndarray], np.ndarray], columns: int,
                  blocks: int) -> ir.Value:
    """The block scales as MatMulNBits takes them for float32 activations: ``[N, blocks]`` float32."""
    return _kernel_initializer(op, scales, "nbits", lambda: by_output(scales.const_value.numpy().astype(np.float32)),
                               ir.DataType.FLOAT, [columns, blocks])


class BlockwiseMatMul(pattern.RewriteRuleClassBase):
    """MatMul by a blocked 4- or 8-bit DequantizeLinear weight -> ONNX Runtime's MatMulNBits.

    MatMulNBits reads the packed integers directly, one kernel instead of expanding the weight to float on
    every call. The integers and scales are ours, re-laid out ([N, blocks, block * bits / 8] bytes, fp32
    scales).
    ``transposed`` matches a tied output head, ``MatMul(x, Transpose(weight [N, K]))``: that layout is
    already MatMulNBits' own. The dequantized weight may have other readers (the tied embedding's Gather),
    so matched nodes stay until the unused-node sweep.
    """

    def __init__(self, name: str, cast: bool, zero_point: bool, transposed: bool, accuracy_level: int):
        super().__init__(name, remove_nodes=False)
        self.cast, self.zero_point, self.transposed = cast, zero_point, transposed
        self.accuracy_level = accuracy_level

    def pattern(self, op, x, values, scales, zero_points):
        weight = _dequantized(op, self.cast, self.zero_point, values, scales, zero_points)
        return op.MatMul(x, op.Transpose(weight, perm=[1, 0]) if self.transposed else weight)

    def check(self, context, x, values, scales, weight, zero_points=None, **_) -> pattern.MatchResult:
        # Blocks run along K: axis 0 of a [K, N] weight, axis 1 of a transposed [N, K] one.
        result = _blocked_weight(values, scales, weight, axis=1 if self.transposed else 0)
        if result and x.dtype != ir.DataType.FLOAT:
            return result.fail("float32 activations only", x)
        return result

    def rewrite(self, op, x, values, scales, weight, zero_points=None, **_):
        block = weight.producer().attributes.get_int("block_size")

        def by_output(array: np.ndarray) -> np.ndarray:  # [N, ...] whatever the stored layout
            return array if self.transposed else array.T

        rows, columns = tuple(values.shape)[::-1] if self.transposed else tuple(values.shape)
        blocks, bits = rows // block, BITS[values.dtype]
        packed = _packed_integers(op, values, block, by_output, columns, rows)
        inputs = [x, packed, _float_scales(op, scales, by_output, columns, blocks)]
        if zero_points is not None:
            inputs.append(_packed_zero_points(op, zero_points, values, by_output, columns, blocks))
        return op.MatMulNBits(*inputs, K=rows, N=columns, bits=bits, block_size=block,
                              accuracy_level=self.accuracy_level, _domain="com.microsoft")


class BlockwiseGather(pattern.RewriteRuleClassBase):
    """Embedding lookup in a blocked 4- or 8-bit ``[vocab, hidden]`` weight -> ONNX Runtime's
    GatherBlockQuantized.

    Only the looked-up rows are dequantized, not the whole table on every call. Symmetric weights are read
    from the bytes and float32 scales MatMulNBits takes (the kernel's default zero point for bytes is 8 or
    128, as MatMulNBits'), so a tied output head and the embedding share one copy. Asymmetric 4-bit weights
    are read as our integers, scales and zero points unchanged, 8-bit ones from MatMulNBits' bytes and zero
    points (the kernel takes 8-bit integers as bytes only); the kernel returns the scales' dtype.
    """

    def __init__(self, name: str, cast: bool, zero_point: bool):
        super().__init__(name, remove_nodes=False)  # a tied output head reads the same dequantized weight
        self.cast, self.zero_point = cast, zero_point

    def pattern(self, op, values, scales, zero_points, indices):
        weight = _dequantized(op, self.cast, self.zero_point, values, scales, zero_points)
        return op.Gather(weight, indices, _allow_other_attributes=True, _outputs=["rows"])

    def check(self, context, values, scales, weight, rows, zero_points=None, **_) -> pattern.MatchResult:
        result = _blocked_weight(values, scales, weight, axis=1)
        if result and rows.producer().attributes.get_int("axis", 0) != 0:
            return result.fail("rows must be gathered along axis 0")
        return result

    def rewrite(self, op, values, scales, weight, indices, zero_points=None, **_):
        block = weight.producer().attributes.get_int("block_size")
        bits = BITS[values.dtype]
        attributes = dict(gather_axis=0, quantize_axis=1, bits=bits, block_size=block, _domain="com.microsoft")
        vocab, hidden = tuple(values.shape)
        float_scales = zero_points is None and (self.cast or scales.dtype == ir.DataType.FLOAT)
        # MatMulNBits' bytes, shared with a tied head; the kernel takes 8-bit integers as bytes only.
        if float_scales or bits == 8:
            if zero_points is not None:
                points = _packed_zero_points(op, zero_points, values, lambda array: array, vocab, hidden // block)
                zero_points = op.Reshape(points, op.Constant(value_ints=[vocab, hidden // block]))
            packed = _packed_integers(op, values, block, lambda array: array, vocab, hidden)
            # The kernel wants the bytes 2-D; ONNX Runtime folds this Reshape of an initializer at load.
            values = op.Reshape(packed, op.Constant(value_ints=[vocab, hidden * bits // 8]))
        if float_scales:
            scales = _float_scales(op, scales, lambda array: array, vocab, hidden // block)
            return op.GatherBlockQuantized(values, indices, scales, **attributes)
        inputs = [values, indices, scales] + ([zero_points] if zero_points is not None else [])
        rows = op.GatherBlockQuantized(*inputs, **attributes)
        return op.Cast(rows, to=ir.DataType.FLOAT) if self.cast else rows


class SwishAsQuickGelu(pattern.RewriteRuleClassBase):
    """``Swish`` -> ONNX Runtime's ``QuickGelu`` (``x * Sigmoid(alpha * x)``), the same function as one kernel.

    ONNX Runtime has no Swish kernel: it inlines the function as Cast, Mul, Sigmoid, Mul, four nodes per layer.
    """

    def pattern(self, op, x):
        return op.Swish(x, _allow_other_attributes=True, _outputs=["activated"])

    def check(self, context, x, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("float32 only", x)
        return result

    def rewrite(self, op, x, activated, **_):
        alpha = activated.producer().attributes.get_float("alpha", 1.0)
        return op.QuickGelu(x, alpha=alpha, _domain="com.microsoft")


def ort_kernel_rules(accuracy_level: int) -> pattern.RewriteRuleSet:
    """Canonical ops -> ONNX Runtime's fused kernels; ``accuracy_level`` is MatMulNBits' compute type
    (0: as the activations, 4: int8 activations)."""
    variants = [(cast, zero) for cast in (True, False) for zero in (True, False)]
    return pattern.RewriteRuleSet([
        SkipRMSNorm.rule(),
        SwishAsQuickGelu.rule(),
        *(BlockwiseMatMul.rule(f"n-bit {'tied head ' if transposed else ''}matmul{' after cast' if cast else ''}"
                               f"{' with zero points' if zero else ''}", cast=cast, zero_point=zero,
                               transposed=transposed, accuracy_level=accuracy_level)
          for transposed in (True, False) for cast, zero in variants),
        *(BlockwiseGather.rule(f"n-bit gather{' after cast' if cast else ''}{' with zero points' if zero else ''}",
                               cast=cast, zero_point=zero)
          for cast, zero in variants),
    ])


def ort_kernels_pass(dynamic_int8: bool) -> GraphPass:
    """The ORT kernel rules as a pass; ``dynamic_int8``: n-bit MatMuls quantize activations to int8."""

    def ort_kernels(model: ir.Model) -> None:
        """Blocked 4- and 8-bit weights -> MatMulNBits / GatherBlockQuantized, residual Add + RMSNormalization ->
        SkipSimplifiedLayerNormalization, Swish -> QuickGelu; the logits stay within rounding."""
        if ort_kernel_rules(accuracy_level=4 if dynamic_int8 else 0).apply_to_model(model):
            model.opset_imports.setdefault("com.microsoft", 1)
            common.RemoveUnusedNodesPass()(model)  # the integers as DequantizeLinear had them, now re-laid out
            _omit_unread_outputs(model.graph, "SkipSimplifiedLayerNormalization")

    return ort_kernels


def _omit_unread_outputs(graph: ir.Graph, op_type: str) -> None:
    """Leave unnamed the optional outputs of ``op_type`` that nothing reads.

    ONNX Runtime computes and allocates every output a node names: the mean and inverse deviation of a
    SkipSimplifiedLayerNormalization, never read, cost 5% of the demo's int4 decode step.
    """
    # A walk, not a rule: it renames outputs and replaces no node, which a rewrite rule cannot express.
    for node in graph:
        if node.op_type == op_type and node.domain == "com.microsoft":
            for value in node.outputs[1:]:
                if not value.uses() and not value.is_graph_output():
                    value.name = ""
