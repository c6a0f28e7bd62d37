"""Rewrite rules whose pattern has several output nodes, matched in time linear in the graph.

onnxscript's matcher tries a multi-output pattern's first output node at every node of the graph and, for each,
every combination of same-typed nodes for the other outputs: on a 24-layer model, 1,100 nodes by 50 Concats
squared, which took 85 s of a 150 s export (and onnxscript's own two-Slices -> Split rule 6 s of the capture's
clean-up). In each pattern here the other output nodes sit next to the first in a known way, so the
candidates are those few nodes.
"""

from __future__ import annotations

import copy
import itertools

import onnx_ir as ir
from onnxscript.rewriter import _matcher, pattern
from onnxscript.rewriter._basics import MatchResult


class _NearbyOutputsMatcher(_matcher.SimplePatternMatcher):
    """Matches a multi-output pattern, taking the candidates for its other output nodes from ``nearby``."""

    def nearby(self, node: ir.Node) -> list[ir.Node]:
        raise NotImplementedError

    def match(self, model, graph_or_function, node, *, verbose=0, remove_nodes=True, tracer=None) -> MatchResult:
        if self.pattern.has_single_output_node:
            return super().match(model, graph_or_function, node, verbose=verbose, remove_nodes=remove_nodes,
                                 tracer=tracer)
        first, *others = self.pattern.output_nodes
        if first.op_identifier() not in (None, node.op_identifier()):
            return MatchResult().fail("the first output node's op does not match")
        self._tracer = tracer
        self._graph = graph_or_function if isinstance(graph_or_function, ir.Graph) else graph_or_function.graph
        nearby = self.nearby(node)
        candidates = [[node]] + [
            [near for near in nearby if other.op_identifier() in (None, near.op_identifier())] for other in others
        ]
        match = MatchResult().fail("no nearby nodes fit the pattern's other outputs")
        for combination in itertools.product(*candidates):
            self._init_match(verbose)
            match = self._multi_match(combination, check_removable=remove_nodes)
            if match:
                return match
        return match


class AncestorOutputsMatcher(_NearbyOutputsMatcher):
    """For patterns whose other output nodes feed the first, within the pattern's size (a layer's new cache
    feeds its attention)."""

    def nearby(self, node: ir.Node) -> list[ir.Node]:
        found: dict[ir.Node, None] = {}
        frontier = [node]
        for _ in range(self.pattern.num_nodes()):
            frontier = [value.producer() for current in frontier for value in current.inputs
                        if value is not None and value.producer() is not None and value.producer() not in found]
            found.update(dict.fromkeys(frontier))
        return list(found)


class SiblingOutputsMatcher(_NearbyOutputsMatcher):
    """For patterns whose other output nodes read one of the first's inputs (two Slices of one tensor)."""

    def nearby(self, node: ir.Node) -> list[ir.Node]:
        users = {user: None for value in node.inputs if value is not None for user, _ in value.uses()}
        return [user for user in users if user is not node]


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


def sibling_matching(rule: pattern.RewriteRule) -> pattern.RewriteRule:
    """``rule``, made elsewhere, matched by ``SiblingOutputsMatcher`` when its pattern has several output nodes."""
    if rule._target_pattern.has_single_output_node:  # onnxscript has no public accessor for a rule's pattern
        return rule
    faster = copy.copy(rule)
    faster._matcher = SiblingOutputsMatcher(rule._target_pattern)
    return faster
