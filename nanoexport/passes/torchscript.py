"""Rules for graphs from torch's TorchScript exporter (``dynamo=False``), the one Optimum's ONNX export uses.

That exporter writes every size it reads as ``Gather(Shape(x), i)`` with a scalar index, also where the size
is static (a head's width: rotary splits each head at ``Shape(q)[3] / 2``). onnxscript's constant folding
only folds a Gather of a shape by a 1-D index, so these sizes stay computed and the fusion rules, which want
constant slice bounds, do not match. ``StaticSizeOfShape`` turns the static ones into constants; constant
folding then finishes the arithmetic on them. ``RotaryAnglesByProduct`` writes the rotary angles as the dynamo
capture does, which is the form the onnx target's GroupQueryAttention lowering reads its frequencies from.
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


TORCHSCRIPT_RULES = pattern.RewriteRuleSet([StaticSizeOfShape.rule(), RotaryAnglesByProduct.rule()])
