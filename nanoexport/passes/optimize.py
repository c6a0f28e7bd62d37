"""onnxscript's optimizer without its de-duplication of initializers."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer
import onnxscript.rewriter

from nanoexport.passes.matching import sibling_matching

# onnxscript's default rules; the multi-output one (two Slices -> Split) tries siblings, not all pairs of Slices.
DEFAULT_RULES = [sibling_matching(rule) for rule in onnxscript.rewriter._DEFAULT_REWRITE_RULES]


def optimize(model: ir.Model) -> None:
    """What ``onnxscript.optimizer.optimize_ir`` runs (inlining, two rounds of constant folding and its
    default rewrite rules, then its clean-ups), except ``DeduplicateInitializersPass``; its rules' matching is
    ``sibling_matching``'s.

    That pass merges equal weights of different layers (the all-ones norms and zero biases of a random-weight
    checkpoint), leaving a layer reading a weight named for another, and cuts at layer boundaries go by the
    names: the qnn target could not split Qwen2.5-1.5B into parts.
    """
    common.InlinePass()(model)
    for _ in range(2):
        onnxscript.optimizer.fold_constants(model)
        onnxscript.rewriter.rewrite(model, DEFAULT_RULES)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)
