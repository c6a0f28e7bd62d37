"""Calibration layer by layer: one decoder layer's float weights in memory at a time, each layer fed the
outputs of the layers before it as already quantized (the order of the GPTQ paper and of AutoGPTQ).

The canonical graph is cut at the residual stream entering each decoder layer (the input of its
``input_layernorm``) and entering the final norm. A *segment* is what lies between two cuts (the last one
ends at the output head). Everything upstream of the first cut that depends on the graph inputs (the
embedding lookup, rotary tables, attention masks) is the *prelude*: it runs once per calibration window and
its values are kept, as are the residual stream's (``windows x tokens x hidden`` float32, twice: the
largest buffers besides one segment's statistics).

For each segment in order: an ONNX Runtime session on that segment alone (``onnx_ir`` extraction; its
weights are read from the checkpoint as the session is built, and dropped with it) records the inputs of
its linear layers; the caller quantizes them; a second session on the segment, now quantized, computes the
residual stream the next segment sees. A graph that cannot be cut this way (no such norms, or a value that
skips a layer) is calibrated whole, as ``activations.capture_groups`` does.

Activation observers (``observe_layers``) take the same cuts for any values, wherever they lie: the prelude,
then one session per segment computing its observed values and the next residual stream. Only the residual
stream is kept between sessions: each segment computes again the prelude values it reads.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from nanoexport.calibration.activations import (
    InputStatistics,
    StatisticsAccumulator,
    cache_inputs,
    capture_groups,
    window_feeds,
)
from nanoexport.calibration.graph import Linear
from nanoexport.passes.initializers import is_final_norm
from nanoexport.runtime import cpu_session

log = logging.getLogger(__name__)

LAYER_NORM = re.compile(r"(?:^|\.)layers\.(\d+)\.input_layernorm\.weight$")


@dataclass
class Segment:
    """The graph between the residual stream ``start`` and ``end`` (``None``: the output head)."""

    start: ir.Value
    end: ir.Value | None
    linears: list[Linear]
    inputs: list[ir.Value]  # what it reads from outside: ``start``, prelude values, graph inputs


class NotLayered(Exception):
    """The graph cannot be calibrated segment by segment; the message says why."""


def residual_cuts(model: ir.Model) -> list[ir.Value]:
    """The residual stream entering each decoder layer, then the final norm, in layer order."""
    layers: dict[int, ir.Value] = {}
    final = None
    for node in model.graph:
        if node.op_type != "RMSNormalization" or node.inputs[1] is None:
            continue
        name = node.inputs[1].name or ""
        if match := LAYER_NORM.search(name):
            # The first such norm of a layer: its post-attention norm may read the same weight, when the two
            # were equal (all ones in a random-weight checkpoint) and merge_duplicate_initializers shared them.
            layers.setdefault(int(match.group(1)), node.inputs[0])
        elif is_final_norm(name):
            final = node.inputs[0]
    if not layers or final is None or sorted(layers) != list(range(len(layers))):
        raise NotLayered("no input_layernorm per layer and final norm found")
    return [layers[index] for index in range(len(layers))] + [final]


def _downstream(values: list[ir.Value]) -> set[ir.Node]:
    """Every node that reads ``values`` or what is computed from them."""
    reached: set[ir.Node] = set()
    stack = list(values)
    while stack:
        for node, _ in stack.pop().uses():
            if node not in reached:
                reached.add(node)
                stack.extend(node.outputs)
    return reached


def _frontier(outputs: list[ir.Value], stops: set[ir.Value], runtime: set[ir.Node],
              inside: set[ir.Node] | None) -> list[ir.Value]:
    """Walking back from ``outputs``: the values a segment must be fed. The walk stops at ``stops``, at graph
    inputs, and at values computed outside ``inside`` from the graph inputs (a node in ``runtime``); values
    computed from constants alone become part of the segment. ``inside`` None: no limit (the prelude)."""
    found: dict[int, ir.Value] = {}
    seen: set[int] = set()
    stack = list(outputs)
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        producer = value.producer()
        if value in stops or (producer is None and not value.is_initializer()):
            found[id(value)] = value
        elif producer is not None and inside is not None and producer not in inside and producer in runtime:
            found[id(value)] = value
        elif producer is not None:
            stack.extend(value for value in producer.inputs if value is not None)
    return list(found.values())


def segments(model: ir.Model, linears: list[Linear]) -> list[Segment]:
    """The graph's segments with their linear layers; raises ``NotLayered`` if some linear falls outside
    them or a segment reads a value computed in an earlier one other than its residual stream."""
    cuts = residual_cuts(model)
    runtime = _downstream(list(model.graph.inputs))
    reach = [_downstream([cut]) for cut in cuts]
    earlier = reach[0]
    result = []
    assigned: set[int] = set()
    for index, cut in enumerate(cuts):
        inside = reach[index] - reach[index + 1] if index + 1 < len(cuts) else reach[index]
        members = [linear for linear in linears if linear.matmul in inside]
        assigned.update(id(linear) for linear in members)
        end = cuts[index + 1] if index + 1 < len(cuts) else None
        outputs = ([end] if end is not None else []) + [linear.input for linear in members]
        if not outputs:
            continue
        inputs = _frontier(outputs, {cut}, runtime, inside)
        leaks = [value.name for value in inputs if value is not cut and value.producer() in earlier]
        if leaks:
            raise NotLayered(f"segment {index} reads {leaks[0]} from an earlier layer")
        result.append(Segment(cut, end, members, inputs))
    if len(assigned) != len(linears):
        raise NotLayered("a linear layer lies outside the decoder layers")
    return result


def _session(model: ir.Model, inputs: list[ir.Value], outputs: list[ir.Value],
             session_config: dict[str, str] | None = None):
    graph = ir.convenience.extract(model.graph, inputs=inputs, outputs=outputs)
    _gather_before_cast(graph)
    return cpu_session(ir.Model(graph, ir_version=model.ir_version, functions=list(model.functions.values())),
                       session_config=session_config)


def _gather_before_cast(graph: ir.Graph) -> None:
    """Make each Gather from a cast initializer (an embedding table kept in fp16) gather from the initializer
    and cast the rows it took: the same values, and ONNX Runtime no longer folds the Cast into a float32 copy
    of the whole table (544 MB for Qwen2.5-0.5B's, beside the fp16 one) in the session that runs it."""
    for node in list(graph):
        cast = node.inputs[0].producer() if node.op_type == "Gather" and node.inputs else None
        if cast is None or cast.op_type != "Cast" or not cast.inputs[0].is_initializer():
            continue
        rows = ir.Node("", "Gather", [cast.inputs[0], node.inputs[1]], attributes=list(node.attributes.values()))
        cast_rows = ir.Node("", "Cast", rows.outputs, attributes=list(cast.attributes.values()))
        graph.insert_before(node, [rows, cast_rows])
        gathered = node.outputs[0]
        cast_rows.outputs[0].shape, cast_rows.outputs[0].type = gathered.shape, gathered.type
        gathered.replace_all_uses_with(cast_rows.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        cast_rows.outputs[0].name = gathered.name  # sessions are asked for their outputs by name
        if not cast.outputs[0].uses() and not cast.outputs[0].is_graph_output():
            graph.remove(cast, safe=True)


def _feeds(values: list[ir.Value], window: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a session on ``values`` is fed from one window's inputs and computed values."""
    return {value.name: window[value.name] for value in values}


def capture_layers(
    model: ir.Model, linears: list[Linear], windows: np.ndarray,
) -> Iterator[tuple[list[Linear], dict[str, InputStatistics]]]:
    """For each decoder layer in order: its linears and their input statistics over ``windows``, computed
    with every earlier layer as the caller has quantized it by the time it asks for the next layer."""
    try:
        parts = segments(model, linears)
    except NotLayered as reason:
        log.info("calibrating the whole graph at once: %s", reason)
        yield from capture_groups(model, linears, windows)
        return
    outside = {id(value) for value in model.graph.inputs} | {id(part.start) for part in parts}
    prelude_values = {id(value): value for part in parts for value in part.inputs if id(value) not in outside}
    prelude_outputs = [parts[0].start, *prelude_values.values()]
    prelude_inputs = _frontier(prelude_outputs, set(), set(), None)
    caches = cache_inputs(model)
    feeds = [window_feeds(caches, tokens) for tokens in windows]
    session = _session(model, prelude_inputs, prelude_outputs)
    names = [value.name for value in prelude_outputs]
    for window_feed in feeds:
        window_feed.update(zip(names, session.run(names, _feeds(prelude_inputs, window_feed))))
    del session
    accumulator = StatisticsAccumulator()
    tokens = len(windows) * windows.shape[1]
    for index, part in enumerate(parts):
        wanted = sorted({linear.input.name for linear in part.linears})
        statistics: dict[str, InputStatistics] = {}
        if wanted:
            session = _session(model, part.inputs, [linear.input for linear in part.linears])
            for window_feed in feeds:
                accumulator.add(wanted, session.run(wanted, _feeds(part.inputs, window_feed)))
            del session
            statistics = accumulator.collect(tokens)
            log.info("captured inputs of %d layers in segment %d over %d tokens", len(part.linears), index, tokens)
        yield part.linears, statistics
        if part.end is not None:
            # The segment as the caller left it (quantized) gives the next one its input.
            session = _session(model, part.inputs, [part.end])
            for window_feed in feeds:
                window_feed[part.end.name] = session.run([part.end.name], _feeds(part.inputs, window_feed))[0]
                del window_feed[part.start.name]
            del session


@dataclass
class Stage:
    """One session of a layer-wise observation: it reads ``inputs`` (graph inputs, and ``start``, the
    residual stream; None for the prelude), computes the ``observed`` values lying in it and ``carried``, the
    residual stream the next stage reads (none after the last)."""

    start: ir.Value | None
    inputs: list[ir.Value]
    observed: list[ir.Value]
    carried: list[ir.Value]


def observation_stages(model: ir.Model, values: list[ir.Value]) -> list[Stage]:
    """The prelude, then each segment up to the last one holding one of ``values``, each with the values it
    computes (none at all for no ``values``); raises ``NotLayered`` if the graph cannot be cut or a segment
    reads an earlier layer's value."""
    cuts = residual_cuts(model)
    runtime = _downstream(list(model.graph.inputs))
    reach = [_downstream([cut]) for cut in cuts]  # nested: each cut is computed from the one before
    observed: list[list[ir.Value]] = [[] for _ in range(len(cuts) + 1)]  # the prelude's, then each segment's
    if not values:
        return []
    for value in values:
        # Its segment is the last one whose residual stream it is computed from; none: the prelude.
        observed[sum(1 for reached in reach if value.producer() in reached)].append(value)
    stages = []
    for index in range(1, max(index for index, found in enumerate(observed) if found) + 1):
        cut = cuts[index - 1]
        end = [cuts[index]] if index < len(cuts) else []
        inside = reach[index - 1] - reach[index] if index < len(cuts) else reach[index - 1]
        outputs = _unique(end + observed[index])
        leaks = [value.name for value in _frontier(outputs, {cut}, runtime, inside)
                 if value is not cut and value.producer() in reach[0]]
        if leaks:
            raise NotLayered(f"segment {index - 1} reads {leaks[0]} from an earlier layer")
        # The prelude values it reads (masks, rotary tables) are computed again from the graph inputs: kept
        # for every window they would outweigh a layer (a static cache's attention biases, one per layer).
        stages.append(Stage(cut, _frontier(outputs, {cut}, set(), None), observed[index], end))
    graph_inputs = {id(value) for value in model.graph.inputs}
    outputs = _unique([cuts[0]] + [value for value in observed[0] if id(value) not in graph_inputs])
    prelude = Stage(None, _frontier(outputs, set(), set(), None), observed[0], [cuts[0]])
    return [prelude, *stages]


def _unique(values: list[ir.Value]) -> list[ir.Value]:
    """``values`` in order, each once."""
    return list({id(value): value for value in values}.values())


def observe_layers(model: ir.Model, values: list[ir.Value], feeds: list[dict[str, np.ndarray]],
                   session_config: dict[str, str] | None = None) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """``values`` computed on each window's graph inputs ``feeds``, stage by stage (``observation_stages``):
    for each stage in order and each window in order, the names of the values the stage computes and their
    arrays. Only one stage's session (its weights and activations) is alive at a time; ``session_config``
    goes to every session. Raises ``NotLayered`` at once, before running anything, if the graph cannot be
    cut: the caller can still observe it whole."""
    return _run_stages(model, observation_stages(model, values), [dict(feed) for feed in feeds], session_config)


def _run_stages(model: ir.Model, stages: list[Stage], windows: list[dict[str, np.ndarray]],
                session_config: dict[str, str] | None) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    graph_inputs = {id(value) for value in model.graph.inputs}
    for index, stage in enumerate(stages):
        # An observed graph input is in the window's feeds already; what is observed but not carried is
        # dropped after its window, so only the residual stream is kept for every window.
        outputs = _unique(stage.carried + [value for value in stage.observed if id(value) not in graph_inputs])
        names = [value.name for value in outputs]
        observed = [value.name for value in stage.observed]
        session = _session(model, stage.inputs, outputs, session_config)
        for window in windows:
            computed = dict(zip(names, session.run(names, _feeds(stage.inputs, window))))
            if stage.start is not None:
                del window[stage.start.name]  # read by this stage alone (``observation_stages`` checked)
            window.update((value.name, computed[value.name]) for value in stage.carried)
            yield observed, [computed[name] if name in computed else window[name] for name in observed]
        del session
        log.info("observed %d values in stage %d of %d", len(observed), index, len(stages))
