"""The qnn graphs as files, whole or in parts: each part a run of consecutive layers with its own weights file.

When the weights of one graph would exceed ``--max-part-bytes``, the layers are split into consecutive parts,
each a folder ``part{p}/`` with its own ``prefill.onnx``, ``decode.onnx`` and ``model.onnx.data``. Part 0
reads ``input_ids`` and holds the embedding, the last part holds the final norm and ``lm_head`` and gives
``logits``; between parts flows ``hidden_states.{k}`` (the residual stream entering layer ``k``), and each part
takes and gives only its own layers' KV cache. ``qnn_parts.json`` lists the parts in order with their layers,
files and I/O (one part, the top-level files, when the model fits). Every graph is checked against the ops
HTP accepts before it is written.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common

from nanoexport.artifact import Artifact
from nanoexport.errors import NanoexportError
from nanoexport.passes.initializers import layer_of as initializer_layer

log = logging.getLogger(__name__)

GRAPHS = {"prefill": "prefill.onnx", "decode": "decode.onnx"}
WEIGHTS_FILE = "model.onnx.data"
PARTS_FILE = "qnn_parts.json"
CACHE_NAME = re.compile(r"^past_key_values\.(\d+)\.")
# Ops the QNN HTP backend accepts as the lowering emits them (checked before writing).
HTP_OPS = frozenset({
    "Add", "And", "Cast", "Concat", "Cos", "DequantizeLinear", "Div", "Equal", "Expand", "Gather", "Less",
    "MatMul", "Mul", "Neg", "QuantizeLinear", "Reshape", "RMSNormalization", "Sigmoid",
    "Sin", "Slice", "Softmax", "Split", "Sub", "Swish", "Transpose", "Unsqueeze", "Where",
})


def check_ops(model: ir.Model, name: str) -> None:
    """Refuse, naming it, a node of ``model`` (the ``name`` graph) outside ``HTP_OPS``."""
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in HTP_OPS:
            raise NanoexportError(f"{name} graph has op {node.op_type} ({node.name}), which the qnn target cannot "
                                  "run on HTP; report the model")


def layer_labels(graph: ir.Graph) -> dict[ir.Node, int]:
    """Each node's layer: the highest layer whose weights or KV cache it depends on; -1 for none (the embedding,
    the mask, the rotary tables). The final norm and ``lm_head`` come out as the last layer."""
    layer_of = {}
    for value in graph.inputs:
        if match := CACHE_NAME.match(value.name):
            layer_of[value] = int(match[1])
    for name, value in graph.initializers.items():
        if (layer := initializer_layer(name)) is not None:
            layer_of[value] = layer
    labels = {}
    for node in graph:
        label = max((layer_of.get(value, -1) for value in node.inputs if value is not None), default=-1)
        labels[node] = label
        for value in node.outputs:
            layer_of[value] = label
    return labels


def _num_layers(graph: ir.Graph) -> int:
    return sum(1 for value in graph.inputs if CACHE_NAME.match(value.name) and value.name.endswith(".key"))


def plan_parts(model: ir.Model, limit: int, limit_text: str) -> list[range]:
    """Consecutive layer ranges whose weights (in the weights file) each fit ``limit`` bytes; part 0 also holds
    the embedding, the last part the final norm and ``lm_head``. Refuses a layer that fits no part."""
    graph = model.graph
    labels, layers = layer_labels(graph), _num_layers(graph)
    # Which parts need each stored weight: its layer by name, else the embedding's part (read before any
    # layer) or the head's (read after); a tied embedding is needed by both.
    slots: dict[ir.Value, set[int]] = {}
    for node in graph:
        for value in node.inputs:
            if value is None or not value.is_initializer() or not isinstance(value.const_value, ir.ExternalTensor):
                continue
            layer = initializer_layer(value.name)
            slot = layer if layer is not None else -1 if labels[node] < 0 else layers
            slots.setdefault(value, set()).add(slot)

    def size(first: int, last: int) -> int:
        wanted = {*range(first, last + 1), *([-1] if first == 0 else []), *([layers] if last == layers - 1 else [])}
        return sum(value.const_value.nbytes for value, needs in slots.items() if needs & wanted)

    ranges, start = [], 0
    for layer in range(layers):
        if layer > start and size(start, layer) > limit:
            ranges.append(range(start, layer))
            start = layer
        if size(start, layer) > limit:
            alone = sum(value.const_value.nbytes for value, needs in slots.items() if layer in needs)
            what = "one decoder layer" if alone > limit else \
                "the embedding with the first layer" if layer == 0 else "the last layer with the final norm and lm_head"
            raise NanoexportError(f"--max-part-bytes {limit_text} ({limit:,} bytes) is less than {what} "
                                  f"({size(start, layer):,} bytes of weights); parts hold whole layers, so raise it")
    ranges.append(range(start, layers))
    return ranges


def write_parts(graphs: dict[str, ir.Model], ranges: list[range], folder: Path) -> list[dict]:
    """Write each part's prefill and decode graphs and their one weights file; returns the parts' entries.

    One part: the whole graphs at the top of the artifact, reading ``model.onnx.data`` already there. Several:
    each part is cut from a reloaded copy of the whole graphs, and its weights move to its own folder.
    """
    if len(ranges) == 1:
        for name, file_name in GRAPHS.items():
            check_ops(graphs[name], name)
            ir.save(graphs[name], folder / file_name)
        return [_part_entry(graphs, ranges[0], "")]
    whole = {name: folder / f"whole_{file_name}" for name, file_name in GRAPHS.items()}
    for name, path in whole.items():
        ir.save(graphs[name], path)
    entries = []
    for index, layers in enumerate(ranges):
        part = f"part{index}"
        (folder / part).mkdir()
        pieces = {name: cut_part(ir.load(path), layers) for name, path in whole.items()}
        _own_weights(pieces, folder / part)
        for name, file_name in GRAPHS.items():
            check_ops(pieces[name], f"{part} {name}")
            ir.save(pieces[name], folder / part / file_name)
        entries.append(_part_entry(pieces, layers, f"{part}/"))
    for path in whole.values():
        path.unlink()
    (folder / WEIGHTS_FILE).unlink()
    log.info("qnn: %d parts, layers %s", len(ranges), [list(layers) for layers in ranges])
    return entries


def cut_part(model: ir.Model, layers: range) -> ir.Model:
    """The whole graph cut down to ``layers``: ``hidden_states.{first}`` in (or ``input_ids`` for the first
    part), ``hidden_states.{stop}`` out (or ``logits`` for the last), and the KV cache of these layers only."""
    graph = model.graph
    labels, count = layer_labels(graph), _num_layers(graph)
    inner = hidden_state(graph, labels, layers.start) if layers.start > 0 else None
    outer = hidden_state(graph, labels, layers.stop) if layers.stop < count else None
    outputs = {value.name: value for value in graph.outputs}
    if inner is not None:
        hidden = ir.Value(name=f"hidden_states.{layers.start}", shape=inner.shape, type=inner.type)
        inner.replace_all_uses_with(hidden)
        graph.inputs.insert(0, hidden)
    if outer is not None:
        outer.name = f"hidden_states.{layers.stop}"
    kept = [outer if outer is not None else outputs["logits"]]
    kept += [outputs[f"present.{layer}.{kind}"] for layer in layers for kind in ("key", "value")]
    graph.outputs.clear()
    graph.outputs.extend(kept)
    common.RemoveUnusedNodesPass()(model)
    for value in [value for value in graph.inputs if not value.uses()]:
        graph.inputs.remove(value)
    return model


def hidden_state(graph: ir.Graph, labels: dict[ir.Node, int], layer: int) -> ir.Value:
    """The one value computed before ``layer`` that ``layer`` and later ones read: the residual stream.

    A Q -> DQ pair calibration put on it counts as the value itself (the pair moves to the later part).
    """
    crossing = {}
    for node in graph:
        if labels[node] < layer:
            continue
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and 0 <= labels[producer] < layer:
                value = _before_qdq(value)
                crossing[value.name] = value
    if len(crossing) != 1:
        raise NanoexportError(f"{len(crossing)} values pass from layer {layer - 1} to layer {layer} "
                              f"({', '.join(sorted(crossing)[:3])}), not one hidden state; the qnn target cannot "
                              "split this model into parts: raise --max-part-bytes or report the model")
    return next(iter(crossing.values()))


def _before_qdq(value: ir.Value) -> ir.Value:
    dequantize = value.producer()
    if dequantize.op_type != "DequantizeLinear" or dequantize.inputs[0].producer() is None:
        return value
    quantize = dequantize.inputs[0].producer()
    if quantize.op_type != "QuantizeLinear" or quantize.inputs[0].const_value is not None:
        return value
    return quantize.inputs[0]


def _own_weights(pieces: dict[str, ir.Model], folder: Path) -> None:
    """Move the stored weights the ``pieces`` read into one ``model.onnx.data`` in ``folder``, shared by them."""
    stored = {}
    for piece in pieces.values():
        for name, value in piece.graph.initializers.items():
            if isinstance(value.const_value, ir.ExternalTensor):
                stored.setdefault(name, value)
    holder_values = [ir.Value(name=name, shape=value.shape, type=value.type, const_value=value.const_value)
                     for name, value in stored.items()]
    holder = ir.Model(ir.Graph([], [], nodes=[], initializers=holder_values, opset_imports={"": 23}), ir_version=10)
    scratch = folder / "weights.onnx"
    ir.save(holder, scratch, external_data=WEIGHTS_FILE)
    moved = ir.load(scratch).graph.initializers
    for piece in pieces.values():
        for name, value in piece.graph.initializers.items():
            if name in moved:
                value.const_value = moved[name].const_value
    scratch.unlink()


def _part_entry(graphs: dict[str, ir.Model], layers: range, prefix: str) -> dict:
    def describe(value: ir.Value) -> dict:
        return {"name": value.name, "dtype": value.dtype.name.lower(), "shape": list(value.shape.numpy())}

    return {
        "layers": list(layers),
        "graphs": {name: f"{prefix}{file_name}" for name, file_name in GRAPHS.items()},
        "weights": f"{prefix}{WEIGHTS_FILE}",
        "io": {name: {"inputs": [describe(value) for value in graph.graph.inputs],
                      "outputs": [describe(value) for value in graph.graph.outputs]}
               for name, graph in graphs.items()},
    }


def parts_of(artifact: Artifact) -> list[dict]:
    """The artifact's parts in order (one part of the top-level graphs for artifacts written before parts)."""
    if PARTS_FILE in artifact.manifest["model_files"]:
        return json.loads(artifact.file(PARTS_FILE).read_text(encoding="utf-8"))["parts"]
    return [{"graphs": dict(GRAPHS), "weights": WEIGHTS_FILE}]

