"""Graph passes: named functions from an ONNX graph to an ONNX graph, run in order with statistics.

Each pass changes the model in place and keeps its numbers: the graph computes the same logits before and
after. ``run_passes(..., verify=True)`` checks that on ONNX Runtime after every pass and names the pass
that moved the logits.
"""

from __future__ import annotations

import ast
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as basic_rules

from nanoexport.errors import NanoexportError
from nanoexport.passes.fusion import fuse, merge_projections
from nanoexport.passes.initializers import fingerprint, layer_of
from nanoexport.passes.optimize import optimize
from nanoexport.passes.kv_cache import static_kv_cache as rewrite_static_kv_cache
from nanoexport.passes.verify import GraphRunner

log = logging.getLogger(__name__)

GraphPass = Callable[[ir.Model], None]


def lossy(graph_pass: GraphPass) -> GraphPass:
    """Mark a pass that changes the numbers on purpose (a target re-rounding weights or quantizing
    activations): verification measures and records its logits change but does not stop on it."""
    graph_pass.lossy = True
    return graph_pass


def name_weights(model: ir.Model) -> None:
    """Name each linear layer's weight matrix after its module (``model.layers.0.mlp.down_proj.weight.T``).

    The exporter folds the transposed weights into anonymous initializers; their module is recorded only in
    the node metadata, which ``strip_metadata`` drops. Quantization plans and per-layer overrides refer to
    layers by these names. Nothing is computed differently.
    """
    for node in model.graph:
        if node.op_type != "MatMul" or len(node.inputs) != 2:
            continue
        weight = node.inputs[1]
        module = _module_of(node)
        is_constant = weight.const_value is not None or (
            weight.producer() is not None and weight.producer().op_type == "Transpose"
            and weight.producer().inputs[0].const_value is not None
        )
        if module is None or not is_constant or len(weight.uses()) != 1 or weight.is_graph_output():
            continue
        name = f"{module}.weight.T"
        if weight.is_initializer():
            model.graph.initializers.pop(weight.name)
            weight.name = name
            model.graph.register_initializer(weight)
        else:
            weight.name = name


def _module_of(node: ir.Node) -> str | None:
    """The dotted module path the exporter recorded for ``node``, without our wrapper's ``model.`` prefix."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    paths = [scope for scope in ast.literal_eval(scopes) if scope]
    if len(paths) < 2:
        return None
    module = paths[-2]  # the last scope is the op itself (``linear``)
    return module.removeprefix("model.")


def strip_metadata(model: ir.Model) -> None:
    """Drop doc strings and metadata (the exporter's stack traces name files on the exporting machine)."""
    common.ClearMetadataAndDocStringPass()(model)


def fold_constants(model: ir.Model) -> None:
    """Fold constant subgraphs and shape arithmetic; inline functions.

    What ``onnxscript.optimizer.optimize_ir`` runs, except its de-duplication of initializers (see
    ``optimize.optimize``); ``merge_duplicate_initializers`` de-duplicates, within a layer.
    """
    optimize(model)


def infer_shapes(model: ir.Model) -> None:
    """Record the shape and type of every value that ONNX shape inference can work out."""
    common.ShapeInferencePass()(model)


class AddOfZeros(pattern.RewriteRuleClassBase):
    """``x + zeros`` -> ``x``, where broadcasting the zeros leaves ``x``'s shape and type as they are.

    A checkpoint's all-zero biases (projections initialized and never trained, as in random-weight models)
    would otherwise cost an Add per projection and keep the query, key and value projections from merging.
    """

    def pattern(self, op, x, zeros):
        return op.Add(x, zeros)

    def check(self, context, x, zeros, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if zeros.const_value is None or x.dtype != zeros.dtype or x.shape is None or zeros.shape is None:
            return result.fail("only a constant of x's type and a known shape", zeros)
        if zeros.shape.rank() > x.shape.rank() or any(
            size != 1 and size != x.shape[x.shape.rank() - zeros.shape.rank() + axis]
            for axis, size in enumerate(zeros.shape)
        ):
            return result.fail("broadcasting the constant would change x's shape", zeros)
        if np.any(zeros.const_value.numpy()):
            return result.fail("the constant is not all zeros", zeros)
        return result

    def rewrite(self, op, x, **_):
        return op.Identity(x)


NO_OP_RULES = pattern.RewriteRuleSet([
    *AddOfZeros.rule().commute(),
    basic_rules.no_op_cast_rule,
    basic_rules.no_op_expand_rule,
    basic_rules.no_op_transpose_rule,
    basic_rules.transpose_transpose_rule,
    basic_rules.reshape_reshape_rule,
    basic_rules.unsqueeze_unsqueeze_rule,
])


def eliminate_no_ops(model: ir.Model) -> None:
    """Casts to the type a value already has, Adds of zeros, and Expand/Transpose/Reshape chains that change nothing."""
    log.info("eliminate_no_ops: %d rewrites", NO_OP_RULES.apply_to_model(model))


def eliminate_identity(model: ir.Model) -> None:
    """Remove Identity nodes that only rename a value."""
    common.IdentityEliminationPass()(model)


def merge_duplicate_initializers(model: ir.Model) -> None:
    """Let initializers with identical dtype, shape and bytes share one tensor: the first in graph order.

    Only within one decoder layer (or among weights of none, like a tied embedding and head): a weight
    named for layer 2 must not serve layer 3, since cuts at layer boundaries (the qnn target's parts,
    layer-wise calibration) go by the names. Random-weight checkpoints have identical norm weights (all
    ones) in every layer, and merging them put layer 3's norm on a layer-2 weight.

    Graph inputs and outputs keep their own tensor (merging an output would rename it). Hand-walked
    because onnx-ir's ``DeduplicateHashedInitializersPass`` hashes ``numpy()`` in place, which fails on
    the transposed weights ``fold_constants`` leaves as non-contiguous views, and would widen every
    checkpoint weight to float32 to hash it; ``fingerprint`` hashes a checkpoint's stored bytes instead.
    """
    seen: dict[tuple[str, int | None], ir.Value] = {}
    for name, value in list(model.graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or value.is_graph_input() or value.is_graph_output():
            continue
        key = (fingerprint(tensor), layer_of(name))
        if key not in seen:
            seen[key] = value
            continue
        value.replace_all_uses_with(seen[key])
        del model.graph.initializers[name]


def remove_unused(model: ir.Model) -> None:
    """Remove nodes, functions and opset imports that no output depends on."""
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedFunctionsPass()(model)
    common.RemoveUnusedOpsetsPass()(model)


PASSES: list[GraphPass] = [
    name_weights, strip_metadata, fold_constants, infer_shapes, eliminate_no_ops, eliminate_identity,
    merge_duplicate_initializers, fuse, merge_projections, remove_unused,
]
PASS_NAMES = [graph_pass.__name__ for graph_pass in PASSES]


def static_kv_cache_pass(capacity: int, windows: list[int | None], circular: bool) -> GraphPass:
    """The KV-cache rewrite as a pass, bound to the cache's capacity, each layer's window and the write mode."""

    def static_kv_cache(model: ir.Model) -> None:
        """Growing Concat cache -> fixed-capacity buffers written at cache_position (see kv_cache.py)."""
        rewrite_static_kv_cache(model, capacity, windows, circular)

    return static_kv_cache


def select_passes(only: list[str] | None = None, skip: list[str] | None = None) -> list[GraphPass]:
    """The passes named in ``only`` (default: all), minus ``skip``, in pipeline order."""
    for name in [*(only or []), *(skip or [])]:
        if name not in PASS_NAMES:
            raise NanoexportError(f"unknown pass {name!r}; passes: {', '.join(PASS_NAMES)}")
    chosen = set(only) if only else set(PASS_NAMES)
    return [p for p in PASSES if p.__name__ in chosen and p.__name__ not in (skip or [])]


@dataclass
class PassStats:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    logits_change: float | None = None  # max-abs change of the logits, when verified


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def run_passes(
    model: ir.Model,
    passes: list[GraphPass],
    on_pass: Callable[[str], None] | None = None,
    verify: bool = False,
    tolerance: float = 1e-4,
    fix: str = "skip it with --skip-passes {name} and report the model",
) -> list[PassStats]:
    """Run ``passes`` in order on ``model`` (in place); returns time and node counts per pass.

    With ``verify``, the graph runs on ONNX Runtime before and after each pass on fixed inputs, and a
    pass that moves the logits by more than ``tolerance`` stops the pipeline with its name and ``fix``
    (a ``lossy`` pass's change is recorded and logged instead).
    """
    runner = GraphRunner(model) if verify else None
    logits = runner.logits(model) if runner else None
    stats = []
    for graph_pass in passes:
        name = graph_pass.__name__
        if on_pass is not None:
            on_pass(name)
        before = count_nodes(model)
        started = time.perf_counter()
        graph_pass(model)
        stat = PassStats(name, time.perf_counter() - started, before, count_nodes(model))
        if runner is not None:
            new_logits = runner.logits(model)
            stat.logits_change = float(abs(new_logits - logits).max())
            if getattr(graph_pass, "lossy", False):
                log.info("pass %s changes the logits on purpose: %.3g", name, stat.logits_change)
            elif stat.logits_change > tolerance:
                raise NanoexportError(
                    f"pass {name} changed the logits by {stat.logits_change:.3g} (> {tolerance:g}); "
                    + fix.format(name=name)
                )
            logits = new_logits
        stats.append(stat)
        log.debug("pass %s: %d -> %d nodes", name, before, stat.nodes_after)
    return stats
