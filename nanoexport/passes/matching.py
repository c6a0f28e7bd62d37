"""Rewrite rules whose pattern has several output nodes, matched in time linear in the graph.

onnxscript's matcher tries a multi-output pattern's first output node at every node of the graph and, for each,
every combination of same-typed nodes for the other outputs: on a 24-layer model, 1,100 nodes by 50 Concats
squared, which took 85 s of a 150 s export. The patterns here have each further output feeding the first
(a layer's new cache feeds its attention), so the candidates are the first node's ancestors of that type.
"""

from __future__ import annotations

import itertools

import onnx_ir as ir
from onnxscript.rewriter import _matcher, pattern
from onnxscript.rewriter._basics import MatchResult


class AncestorOutputsMatcher(_matcher.SimplePatternMatcher):
    """Matches a multi-output pattern whose other output nodes are ancestors of its first, within its depth."""

    def match(self, model, graph_or_function, node, *, verbose=0, remove_nodes=True, tracer=None) -> MatchResult:
        if self.pattern.has_single_output_node:
            return super().match(model, graph_or_function, node, verbose=verbose, remove_nodes=remove_nodes,
                                 tracer=tracer)
        first, *others = self.pattern.output_nodes
        if first.op_identifier() not in (None, node.op_identifier()):
            return MatchResult().fail("the first output node's op does not match")
        self._tracer = tracer
        self._graph = graph_or_function if isinstance(graph_or_function, ir.Graph) else graph_or_function.graph
        ancestors = _ancestors(node, depth=self.pattern.num_nodes())
        candidates = [[node]] + [
            [a for a in ancestors if other.op_identifier() in (None, a.op_identifier())] for other in others
        ]
        match = MatchResult().fail("no ancestors fit the pattern's other outputs")
        for combination in itertools.product(*candidates):
            self._init_match(verbose)
            match = self._multi_match(combination, check_removable=remove_nodes)
            if match:
                return match
        return match


def _ancestors(node: ir.Node, depth: int) -> list[ir.Node]:
    """The nodes producing ``node``'s inputs, transitively, up to ``depth`` steps back, in discovery order."""
    found: dict[ir.Node, None] = {}
    frontier = [node]
    for _ in range(depth):
        frontier = [value.producer() for current in frontier for value in current.inputs
                    if value is not None and value.producer() is not None and value.producer() not in found]
        found.update(dict.fromkeys(frontier))
    return list(found)


def multi_output_rule(rule: pattern.RewriteRuleClassBase) -> pattern.RewriteRule:
    """``rule`` as ``RewriteRuleClassBase.rule`` makes it, matched by ``AncestorOutputsMatcher``."""
    return pattern.RewriteRule(
        rule.pattern,
        rule.rewrite,
        rule.check,
        matcher=AncestorOutputsMatcher,
        name=rule.name,
        remove_nodes=rule.remove_nodes,
        graph_pre_visitor=rule.setup,
        graph_post_visitor=rule.cleanup,
        as_function=rule.as_function,
    )
