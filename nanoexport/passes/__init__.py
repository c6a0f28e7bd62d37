"""Graph passes: named functions from an ONNX graph to an ONNX graph, run in order with statistics.

Each pass changes the model in place and keeps its numbers: the graph computes the same logits before and
after (the tests run both on ONNX Runtime).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

log = logging.getLogger(__name__)

GraphPass = Callable[[ir.Model], None]


def strip_metadata(model: ir.Model) -> None:
    """Drop doc strings and metadata (the exporter's stack traces name files on the exporting machine)."""
    common.ClearMetadataAndDocStringPass()(model)


def fold_constants(model: ir.Model) -> None:
    """Fold constant subgraphs and shape arithmetic; inline functions."""
    onnxscript.optimizer.optimize_ir(model)


def remove_unused(model: ir.Model) -> None:
    """Remove nodes, functions and opset imports that no output depends on."""
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedFunctionsPass()(model)
    common.RemoveUnusedOpsetsPass()(model)


def eliminate_identity(model: ir.Model) -> None:
    """Remove Identity nodes that only rename a value."""
    common.IdentityEliminationPass()(model)


CLEANUP: list[GraphPass] = [strip_metadata, fold_constants, eliminate_identity, remove_unused]


@dataclass
class PassStats:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def run_passes(
    model: ir.Model, passes: list[GraphPass], on_pass: Callable[[str], None] | None = None
) -> list[PassStats]:
    """Run ``passes`` in order on ``model`` (in place); returns time and node counts per pass."""
    stats = []
    for graph_pass in passes:
        if on_pass is not None:
            on_pass(graph_pass.__name__)
        before = count_nodes(model)
        started = time.perf_counter()
        graph_pass(model)
        stats.append(PassStats(graph_pass.__name__, time.perf_counter() - started, before, count_nodes(model)))
        log.debug("pass %s: %d -> %d nodes", graph_pass.__name__, before, stats[-1].nodes_after)
    return stats
