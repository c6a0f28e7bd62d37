"""How the qnn target's rewrite rules build and apply their replacements, keeping the artifacts' names.

The qnn graphs have always named each new node and its output alike (``{node}.grouped``), and kept the names
of the constants they add; these helpers give onnxscript's rewriter the same names, so that the files the
rules write are byte for byte those the earlier hand-written edits wrote.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RULE_NAME_TAG, pattern


def named(op, op_type: str, *inputs: ir.Value, name: str, **attributes) -> ir.Value:
    """A node of the replacement whose node and output are both called ``name``."""
    return op.op(op_type, *inputs, _name=name, _outputs=[name], **attributes)


def constant(op, name: str, array: np.ndarray) -> ir.Value:
    """An initializer of the replacement called ``name`` (as ``new_initializer`` makes them)."""
    array = np.ascontiguousarray(array)
    return op.initializer(ir.Tensor(array, name=name), name=name)


def keeps_own_name(replaced: ir.Value) -> None:
    """Call in ``rewrite``: the rewriter names a replacement after the value it replaces; this replacement
    keeps its own name (the one the artifacts have always had), so the replaced value gives its name up."""
    replaced.name = None


def apply_rules(rules: pattern.RewriteRuleSet, model: ir.Model) -> int:
    """Apply ``rules`` to ``model``; returns how many rewrites. The nodes they add carry no rule-name metadata
    (the rewriter tags them; the artifacts' graphs never had it)."""
    before = set(model.graph)
    count = rules.apply_to_model(model)
    for node in model.graph:
        if node not in before:
            node.metadata_props.pop(RULE_NAME_TAG, None)
    return count
