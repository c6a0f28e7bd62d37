"""Rules for graphs from torch's TorchScript exporter (``dynamo=False``), the one Optimum's ONNX export uses.

That exporter writes every size it reads as ``Gather(Shape(x), i)`` with a scalar index, also where the size
is static (a head's width: rotary splits each head at ``Shape(q)[3] / 2``). onnxscript's constant folding
only folds a Gather of a shape by a 1-D index, so these sizes stay computed and the fusion rules, which want
constant slice bounds, do not match. ``STATIC_SIZE_RULES`` turns the static ones into constants; constant
folding then finishes the arithmetic on them.
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


STATIC_SIZE_RULES = pattern.RewriteRuleSet([StaticSizeOfShape.rule()])
