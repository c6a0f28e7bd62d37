"""Rules for graphs from torch's TorchScript exporter (``dynamo=False``), the one Optimum's ONNX export uses.

That exporter writes every size it reads as ``Gather(Shape(x), i)`` with a scalar index, also where the size
is static (a head's width: rotary splits each head at ``Shape(q)[3] / 2``; GPT-2 scales attention by
``1 / sqrt(Shape(q)[-1:])``). onnxscript's constant folding only folds a Gather of a shape by a 1-D index, and
no Slice of a shape with a symbolic dimension, so these sizes stay computed and the fusion rules, which want
constant slice bounds and scales, do not match. ``StaticSizeOfShape`` and ``StaticSliceOfShape`` turn the
static ones into constants; constant folding then finishes the arithmetic on them. ``RotaryAnglesByProduct``
writes the rotary angles as the dynamo capture does, which is the form the onnx target's GroupQueryAttention
lowering reads its frequencies from. ``TiedHead`` gives a tied checkpoint's head back its table.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


class StaticSizeOfShape(pattern.RewriteRuleClassBase):
    """``Gather(Shape(x), i)`` with a scalar ``i`` -> the constant size, when ``x``'s dimension ``i`` is static."""

    def pattern(self, op, x, index):
        return op.Gather(op.Shape(x, _allow_other_attributes=True, _outputs=["shape"]), index, axis=0)

    def check(self, context, x, index, shape, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if index.const_value is None or index.const_value.numpy().ndim != 0:
            return result.fail("only a scalar constant index", index)
        if x.shape is None:
            return result.fail("the shape of x is not known", x)
        attributes = shape.producer().attributes
        sizes = list(x.shape)[attributes.get_int("start", 0) : attributes.get_int("end", len(x.shape))]
        position = int(index.const_value.numpy())
        if not -len(sizes) <= position < len(sizes) or not isinstance(sizes[position], int):
            return result.fail(f"dimension {position} of x is not static", x)
        return result

    def rewrite(self, op, x, index, shape, **_):
        attributes = shape.producer().attributes
        sizes = list(x.shape)[attributes.get_int("start", 0) : attributes.get_int("end", len(x.shape))]
        return op.Constant(value=ir.tensor(np.array(sizes[int(index.const_value.numpy())], np.int64)))


class StaticSliceOfShape(pattern.RewriteRuleClassBase):
    """``Slice(Shape(x), starts, ends[, axes, steps])`` -> the constant sizes, when the dimensions it keeps are
    static."""

    def pattern(self, op, x, starts, ends):
        shape = op.Shape(x, _allow_other_attributes=True, _outputs=["shape"])
        return op.Slice(shape, starts, ends, _allow_other_inputs=True, _outputs=["sliced"])

    def check(self, context, x, shape, sliced, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.shape is None:
            return result.fail("the shape of x is not known", x)
        bounds = sliced.producer().inputs[1:]
        if any(bound is None or bound.const_value is None for bound in bounds):
            return result.fail("only constant slice bounds", sliced)
        if len(bounds) > 2 and bounds[2].const_value.numpy().tolist() not in ([0], [-1]):
            return result.fail("a shape has one axis", bounds[2])
        if not all(isinstance(size, int) for size in _sliced_sizes(x, shape, sliced)):
            return result.fail("a dimension it keeps is not static", x)
        return result

    def rewrite(self, op, x, shape, sliced, **_):
        return op.Constant(value=ir.tensor(np.array(_sliced_sizes(x, shape, sliced), np.int64)))


def _sliced_sizes(x: ir.Value, shape: ir.Value, sliced: ir.Value) -> list[int | ir.SymbolicDim]:
    """The sizes ``sliced``, a Slice of ``shape`` (a Shape of ``x``, with its start and end), holds."""
    attributes = shape.producer().attributes
    sizes = list(x.shape)[attributes.get_int("start", 0) : attributes.get_int("end", len(x.shape))]
    bounds = [int(bound.const_value.numpy().reshape(-1)[0]) for bound in sliced.producer().inputs[1:]]
    step = bounds[3] if len(bounds) > 3 else 1
    return sizes[slice(bounds[0], bounds[1], step)]


class RotaryAnglesByProduct(pattern.RewriteRuleClassBase):
    """transformers' rotary angles as a batched MatMul, ``(inv_freq[None, :, None] @ positions[:, None, :])^T``
    -> ``positions[..., None] * inv_freq``: one product per element either way, so the values are the same."""

    def pattern(self, op, inv_freq, shape, position_ids, axes):
        positions = op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT)
        return op.Transpose(op.MatMul(op.Expand(inv_freq, shape), positions), perm=[0, 2, 1])

    def check(self, context, inv_freq, position_ids, axes, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if axes.const_value is None or axes.const_value.numpy().tolist() != [1]:
            return result.fail("the positions must be unsqueezed to [batch, 1, seq]", axes)
        if position_ids.shape is None or position_ids.shape.rank() != 2:
            return result.fail("the positions must be [batch, seq]", position_ids)
        if inv_freq.const_value is None or inv_freq.dtype != ir.DataType.FLOAT or inv_freq.shape is None \
                or inv_freq.shape.rank() != 3 or inv_freq.shape[0] != 1 or inv_freq.shape[2] != 1:
            return result.fail("the frequencies must be a float constant [1, n, 1]", inv_freq)
        return result

    def rewrite(self, op, inv_freq, position_ids, **_):
        frequencies = op.initializer(ir.tensor(inv_freq.const_value.numpy().reshape(-1)), name=f"{inv_freq.name}/flat")
        positions = op.Cast(op.Unsqueeze(position_ids, op.Constant(value_ints=[-1])), to=ir.DataType.FLOAT)
        return op.Mul(positions, frequencies)


class TiedHead(pattern.RewriteRuleClassBase):
    """The output head's weight, a transposed copy of the embedding ``table`` -> ``Transpose(table)``.

    Where a checkpoint ties its head to its embedding (Qwen2's small models, GPT-2), the TorchScript exporter
    folds the head's transposed table into an initializer of its own: the artifact would carry the table
    twice and quantize it as two layers. The torch capture reads the head as the table transposed, which the
    quantizers and the targets take as one tied layer. A rule per model, bound to its table.
    """

    def __init__(self, table: ir.Value):
        super().__init__("tied head")
        self.table = table

    def pattern(self, op, x, head):
        return op.MatMul(x, head)

    def check(self, context, x, head, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        table = self.table
        if head.const_value is None or head.shape is None or table.shape is None \
                or list(head.shape) != list(reversed(list(table.shape))) or head.dtype != table.dtype:
            return result.fail("the weight is not a constant of the transposed table's shape and type", head)
        # Read once per candidate, and only for the one matrix of the table's size: the head.
        if not np.array_equal(head.const_value.numpy(), table.const_value.numpy().T):
            return result.fail("the weight differs from the transposed table: the head is not tied", head)
        return result

    def rewrite(self, op, x, head, **_):
        name = head.name
        head.name = f"{name}/untied"  # the copy goes unused, and is removed with the unused initializers
        return op.MatMul(x, op.Transpose(self.table, perm=[1, 0], _outputs=[name]))


TORCHSCRIPT_RULES = pattern.RewriteRuleSet([
    StaticSizeOfShape.rule(), StaticSliceOfShape.rule(), RotaryAnglesByProduct.rule(),
])
