"""KV-cache rewrite: the captured growing cache (Concat) -> a fixed-capacity cache written in place.

Static interface (batch and sequence length stay symbolic; the cache does not grow):
    input_ids       [batch, sequence_length]       int64
    position_ids    [batch, sequence_length]       int64   rotary positions
    attention_mask  [batch, capacity]              int64   1 for cache slots that hold real tokens,
                                                           including the ones written by this call
    cache_position  [batch]                        int64   slot of this call's first token
    past_key_values.{i}.key/.value  [batch, kv_heads, capacity, head_dim]
outputs ``logits`` and ``present.{i}.key/.value`` of the same fixed shape: the buffers after the write
(``TensorScatter``, opset 24). A query at slot ``p`` sees slots ``<= p`` that the mask marks valid, and
in a sliding-window layer only the last ``window`` of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from nanoexport.errors import NanoexportError
from nanoexport.passes.optimize import optimize

STATIC_OPSET = 24


def static_kv_cache(model: ir.Model, capacity: int, windows: list[int | None], circular: bool = False) -> None:
    """Rewrite ``model``'s explicit growing cache into buffers of ``capacity`` slots written at ``cache_position``.

    Requires the canonical form: each layer's ``present`` is ``Concat(past, new, axis=-2)`` and the
    layers' ``Attention`` nodes, in order, read those presents. ``windows`` gives each layer's attention
    window (None: full attention). Logits for the tokens of a call are unchanged.

    ``circular``: position ``p`` goes to slot ``p % capacity``, so generation runs past the capacity with
    attention over the last ``capacity`` positions (a sliding window). Exact for one-token calls, and for
    longer calls while nothing they need is overwritten (``cache_position + tokens <= capacity``).
    """
    graph = model.graph
    inputs = {value.name: value for value in graph.inputs}
    concats = _cache_concats(graph)
    attentions = [node for node in graph if node.op_type == "Attention"]
    presents = {concat.outputs[0] for concat in concats}
    if not attentions or any(node.inputs[1] not in presents or node.inputs[2] not in presents for node in attentions):
        raise NanoexportError(
            "the static KV cache needs every attention fused into Attention reading the cache; this model's "
            "attention is not fused yet: use --kv-cache dynamic"
        )
    if len(attentions) != len(windows):
        raise NanoexportError(
            f"found {len(attentions)} Attention nodes for {len(windows)} layers; this graph is not in canonical form"
        )
    batch = inputs["input_ids"].shape[0]
    cache_position = ir.val("cache_position", ir.DataType.INT64, [batch])
    attention_mask = ir.val("attention_mask", ir.DataType.INT64, [batch, capacity])
    masks = {}
    for window in dict.fromkeys(windows):
        mask_nodes, masks[window] = _visibility_mask(inputs["input_ids"], attention_mask, cache_position, capacity,
                                                     window, circular)
        graph.insert_before(graph.node(0), mask_nodes)

    for concat in concats:
        past, update = concat.inputs
        past.shape = ir.Shape([past.shape[0], past.shape[1], capacity, past.shape[3]])
        mode = "circular" if circular else "linear"
        write = ir.node(
            "TensorScatter", [past, update, cache_position], attributes={"axis": 2, "mode": mode},
            name=f"{concat.outputs[0].name}/write",
        )
        written = write.outputs[0]
        written.shape, written.type = past.shape, past.type
        graph.insert_before(concat, write)
        grown = concat.outputs[0]
        grown.replace_all_uses_with(written, replace_graph_outputs=True)
        written.name, grown.name = grown.name, f"{grown.name}.grown"
        graph.remove(concat, safe=True)
    for node, window in zip(attentions, windows):
        node.replace_input_with(3, masks[window])
    common.RemoveUnusedNodesPass()(model)  # the exporter's mask code for a growing cache

    old_mask = inputs["attention_mask"]
    if old_mask.uses():
        raise NanoexportError("the attention mask feeds more than the attention; this graph is not in canonical form")
    index = graph.inputs.index(old_mask)
    graph.inputs[index] = attention_mask
    graph.inputs.insert(index + 1, cache_position)
    model.opset_imports[""] = max(model.opset_imports.get("", 0), STATIC_OPSET)


def _cache_concats(graph: ir.Graph) -> list[ir.Node]:
    outputs = {value.name: value for value in graph.outputs}
    concats = []
    for name, value in outputs.items():
        if not name.startswith("present."):
            continue
        node = value.producer()
        if node is None or node.op_type != "Concat" or not node.inputs[0].name.startswith("past_key_values."):
            raise NanoexportError(f"{name} is not a Concat of the past cache; this graph is not in canonical form")
        concats.append(node)
    return concats


def _visibility_mask(input_ids, attention_mask, cache_position, capacity: int, window: int | None,
                     circular: bool) -> tuple[Sequence[ir.Node], ir.Value]:
    """Bool ``[batch, 1, sequence_length, capacity]``: which cache slots each query may attend to.

    Returns the nodes, in order and not yet in a graph, and the mask they compute.
    """
    tape = ir.tape.Tape()

    def constant(array) -> ir.Value:
        return tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(array))})

    slots = constant(np.arange(capacity, dtype=np.int64))
    sequence = tape.op("Squeeze", [tape.op("Shape", [input_ids], attributes={"start": 1, "end": 2})])
    offsets = tape.op("Range", [constant(np.int64(0)), sequence, constant(np.int64(1))])
    start = tape.op("Unsqueeze", [cache_position, constant([1])])  # [batch, 1]
    # position of each query token: [batch, seq, 1]
    query_positions = tape.op("Unsqueeze", [tape.op("Add", [start, offsets]), constant([2])])
    if circular:
        # After this call's writes, slot j holds the latest position <= last that is j modulo the capacity.
        last = tape.op("Sub", [tape.op("Add", [start, sequence]), constant(np.int64(1))])  # [batch, 1]
        back = tape.op("Mod", [tape.op("Sub", [last, slots]), constant(np.int64(capacity))])
        slot_positions = tape.op("Unsqueeze", [tape.op("Sub", [last, back]), constant([1])])  # [batch, 1, capacity]
    else:
        slot_positions = slots
    visible = tape.op("LessOrEqual", [slot_positions, query_positions])  # causal: [batch, seq, capacity]
    if window:
        window_start = tape.op("Sub", [query_positions, constant(np.int64(window))])
        visible = tape.op("And", [visible, tape.op("Greater", [slot_positions, window_start])])
    valid = tape.op("Unsqueeze", [tape.op("Cast", [attention_mask], attributes={"to": ir.DataType.BOOL}),
                                  constant([1])])
    mask = tape.op("Unsqueeze", [tape.op("And", [visible, valid]), constant([1])])
    return tape.nodes, mask


def specialize(model: ir.Model, sequence_length: int) -> None:
    """Fix batch to 1 and the new-token count to ``sequence_length``, and make every shape in the graph static.

    For a static-cache graph, this gives the prefill (a chunk of tokens) or decode (one token) graph.
    Raises when a value's shape stays unknown or symbolic.
    """
    graph = model.graph
    if "cache_position" not in {value.name for value in graph.inputs}:
        raise NanoexportError("a prefill/decode split needs a fixed-size KV cache: add --kv-cache static or sliding")
    sizes = {"batch_size": 1, "sequence_length": sequence_length}
    for value in [*graph.inputs, *graph.outputs]:
        value.shape = ir.Shape([sizes.get(str(d), d) if isinstance(d, ir.SymbolicDim) else d for d in value.shape])
    boundary = {*graph.inputs, *graph.outputs, *graph.initializers.values()}
    for node in graph:
        for value in node.outputs:
            if value not in boundary:
                value.shape = None  # the tracer's symbolic shapes; inferred again below
    optimize(model)
    common.ShapeInferencePass()(model)
    if any(node.op_type == "Shape" for node in graph):
        # The folder infers no shape through some fused ops (RMSNormalization): a Shape of their output, as
        # Optimum's graphs take for their reshapes, is folded once onnx's inference has given it.
        optimize(model)
        common.ShapeInferencePass()(model)
    dynamic = [
        value.name for node in graph for value in node.outputs
        if value.shape is None or not value.shape.is_static()
    ]
    if dynamic:
        raise NanoexportError(
            f"{len(dynamic)} values keep a dynamic shape at sequence length {sequence_length} "
            f"(first: {dynamic[0]}); report the model"
        )
