"""The qnn graphs as files, whole or in parts: each part a run of consecutive layers with its own weights file.

When the weights of one graph would exceed ``--max-part-bytes``, the layers are split into consecutive parts,
each a folder ``part{p}/`` with its own ``prefill.onnx``, ``decode.onnx`` and ``model.onnx.data``. Part 0
reads ``input_ids`` and holds the embedding, the last part holds the final norm and ``lm_head`` and gives
``logits`` (either may be a part of its own, without layers, when a large vocabulary would not fit beside
one); between parts flows ``hidden_states.{k}`` (the residual stream entering layer ``k``; for ``k`` the layer
count, entering the final norm), and each part takes and gives only its own layers' KV cache.
``qnn_parts.json`` lists the parts in order with their layers, files and I/O (one part, the top-level files,
when the model fits). Every graph is checked against the ops HTP accepts before it is written.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common

from nanoexport.artifact import Artifact
from nanoexport.capture.checkpoint import DEMO_MODEL
from nanoexport.errors import NanoexportError
from nanoexport.passes.initializers import is_final_norm
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


def check_table_fits(model: str, limit: int, limit_text: str) -> None:
    """Refuse, before any work, a part limit below the embedding table: HTP looks it up in fp16, no part can split
    it, and the exact check (``plan_parts``) only comes after calibration. Sized from ``config.json`` when
    ``model`` is a local folder (the demo's when empty); anything else is left to ``plan_parts``."""
    folder = Path(model) if model else DEMO_MODEL
    try:
        settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    sizes = [settings.get(key) for key in ("vocab_size", "hidden_size")]
    if sizes[1] is None:
        sizes[1] = settings.get("n_embd")  # GPT-2's name
    if not all(isinstance(size, int) and size > 0 for size in sizes):
        return
    table = 2 * sizes[0] * sizes[1]
    if table > limit:
        raise NanoexportError(f"--max-part-bytes {limit_text} ({limit:,} bytes) is less than the embedding table "
                              f"({table:,} bytes: {sizes[0]:,} x {sizes[1]:,} in fp16, which HTP looks up in float); "
                              "raise it")


def unit_labels(graph: ir.Graph) -> dict[ir.Node, int]:
    """Each node's unit: the highest layer whose weights or KV cache it depends on; -1 for none (the embedding,
    the mask, the rotary tables); the layer count for the final norm and what follows it (the head). A model
    whose final norm is not named ``norm.weight`` has its head in the last layer's unit."""
    count = _num_layers(graph)
    unit_of = {}
    for value in graph.inputs:
        if match := CACHE_NAME.match(value.name):
            unit_of[value] = int(match[1])
    for name, value in graph.initializers.items():
        if (layer := initializer_layer(name)) is not None:
            unit_of[value] = layer
    labels = {}
    for node in graph:
        if any(value is not None and value.is_initializer() and is_final_norm(value.name)
               for value in node.inputs):
            label = count
        else:
            label = max((unit_of.get(value, -1) for value in node.inputs if value is not None), default=-1)
        labels[node] = label
        for value in node.outputs:
            unit_of[value] = label
    return labels


def _num_layers(graph: ir.Graph) -> int:
    return sum(1 for value in graph.inputs if CACHE_NAME.match(value.name) and value.name.endswith(".key"))


def plan_parts(model: ir.Model, limit: int, limit_text: str) -> list[range]:
    """Consecutive ranges of units whose weights (in the weights file) each fit ``limit`` bytes. Units: -1 the
    embedding, 0 .. layers-1 the decoder layers, ``layers`` the final norm and ``lm_head``; the embedding and
    the head may each be a part of their own, so that a large vocabulary does not set the smallest part. Refuses
    a unit (or the embedding or head with the layer it cannot be cut from) that fits no part."""
    graph = model.graph
    labels, layers = unit_labels(graph), _num_layers(graph)
    needs = _units_needing(graph, labels)
    slots: dict[ir.Value, set[int]] = {}
    for node in graph:
        for value in node.inputs:
            if value is not None and value.is_initializer() and isinstance(value.const_value, ir.ExternalTensor):
                slots.setdefault(value, set()).update(needs[node])

    def size(first: int, last: int) -> int:
        return sum(value.const_value.nbytes for value, needs in slots.items() if needs & {*range(first, last + 1)})

    def cuttable(unit: int) -> bool:
        if 0 < unit < layers:
            return True
        try:  # the embedding and the head come off only where one hidden state crosses to them
            hidden_state(graph, labels, unit)
        except NanoexportError:
            return False
        return True

    ranges, start = [], -1
    for unit in range(-1, layers + 1):
        if unit > start and size(start, unit) > limit and cuttable(unit):
            ranges.append(range(start, unit))
            start = unit
        if size(start, unit) > limit:
            what = _unit_name(unit, layers, head_apart=layers in labels.values()) if unit == start else \
                "the embedding with the first layer" if unit == 0 else "the last layer with the final norm and lm_head"
            raise NanoexportError(f"--max-part-bytes {limit_text} ({limit:,} bytes) is less than {what} "
                                  f"({size(start, unit):,} bytes of weights); parts hold whole layers, so raise it")
    ranges.append(range(start, layers + 1))
    return ranges


def _units_needing(graph: ir.Graph, labels: dict[ir.Node, int]) -> dict[ir.Node, set[int]]:
    """The units whose part must hold each node: its own, for a node of a layer or the head; the embedding for
    one computed from ``input_ids``; for the rest (the mask, the rotary tables, a cast of the head's weight),
    every unit that reads what it computes, as each part computes them again."""
    from_tokens = _reached_from(graph, "input_ids")
    needs: dict[ir.Node, set[int]] = {}
    for node in reversed(list(graph)):
        if labels[node] >= 0:
            needs[node] = {labels[node]}
        elif any(value in from_tokens for value in node.outputs):
            needs[node] = {-1}
        else:
            needs[node] = {unit for value in node.outputs for use in value.uses() for unit in needs[use.node]}
    return needs


def _unit_name(unit: int, layers: int, head_apart: bool) -> str:
    if unit == layers - 1 and not head_apart:
        return "the last layer with the final norm and lm_head"
    return "the embedding" if unit < 0 else "the final norm and lm_head" if unit == layers else "one decoder layer"


def write_parts(graphs: dict[str, ir.Model], ranges: list[range], folder: Path) -> list[dict]:
    """Write each part's prefill and decode graphs and their one weights file; returns the parts' entries.

    ``ranges``: the parts' units as ``plan_parts`` gives them. One part: the whole graphs at the top of the
    artifact, reading ``model.onnx.data`` already there. Several: each part is cut from a reloaded copy of the
    whole graphs, and its weights move to its own folder.
    """
    count = _num_layers(graphs["prefill"].graph)
    if len(ranges) == 1:
        for name, file_name in GRAPHS.items():
            check_ops(graphs[name], name)
            ir.save(graphs[name], folder / file_name)
        return [_part_entry(graphs, _layers_of(ranges[0], count), "")]
    whole = {name: folder / f"whole_{file_name}" for name, file_name in GRAPHS.items()}
    for name, path in whole.items():
        ir.save(graphs[name], path)
    entries = []
    for index, units in enumerate(ranges):
        part = f"part{index}"
        (folder / part).mkdir()
        pieces = {name: cut_part(ir.load(path), units) for name, path in whole.items()}
        _own_weights(pieces, folder / part)
        for name, file_name in GRAPHS.items():
            check_ops(pieces[name], f"{part} {name}")
            ir.save(pieces[name], folder / part / file_name)
        entries.append(_part_entry(pieces, _layers_of(units, count), f"{part}/"))
    for path in whole.values():
        path.unlink()
    (folder / WEIGHTS_FILE).unlink()
    log.info("qnn: %d parts, units %s (-1: the embedding, %d: the head)", len(ranges),
             [[units.start, units.stop - 1] for units in ranges], count)
    return entries


def _layers_of(units: range, count: int) -> list[int]:
    return [unit for unit in units if 0 <= unit < count]


def cut_part(model: ir.Model, units: range) -> ir.Model:
    """The whole graph cut down to ``units`` (see ``plan_parts``): ``hidden_states.{first}`` in (or
    ``input_ids`` when the part holds the embedding), ``hidden_states.{stop}`` out (or ``logits`` when it holds
    the head), and the KV cache of its layers only."""
    graph = model.graph
    labels, count = unit_labels(graph), _num_layers(graph)
    inner = hidden_state(graph, labels, units.start) if units.start >= 0 else None
    outer = hidden_state(graph, labels, units.stop) if units.stop <= count else None
    outputs = {value.name: value for value in graph.outputs}
    if inner is not None:
        hidden = ir.Value(name=f"hidden_states.{units.start}", shape=inner.shape, type=inner.type)
        inner.replace_all_uses_with(hidden)
        graph.inputs.insert(0, hidden)
    if outer is not None:
        outer.name = f"hidden_states.{units.stop}"
    kept = [outer if outer is not None else outputs["logits"]]
    kept += [outputs[f"present.{layer}.{kind}"] for layer in _layers_of(units, count) for kind in ("key", "value")]
    graph.outputs.clear()
    graph.outputs.extend(kept)
    common.RemoveUnusedNodesPass()(model)
    for value in [value for value in graph.inputs if not value.uses()]:
        graph.inputs.remove(value)
    return model


def hidden_state(graph: ir.Graph, labels: dict[ir.Node, int], unit: int) -> ir.Value:
    """The one value computed before ``unit`` that ``unit`` and later ones read: the residual stream (for the
    first layer, the embedding's output: computed from ``input_ids``, unlike the mask and rotary tables).

    A Q -> DQ pair calibration put on it counts as the value itself (the pair moves to the later part).
    """
    from_tokens = _reached_from(graph, "input_ids") if unit == 0 else set()
    crossing = {}
    for node in graph:
        if labels[node] < unit:
            continue
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is None:
                continue
            if (0 <= labels[producer] < unit) if unit > 0 else (labels[producer] < 0 and value in from_tokens):
                value = _before_qdq(value)
                crossing[value.name] = value
    if len(crossing) != 1:
        raise NanoexportError(f"{len(crossing)} values pass from unit {unit - 1} to unit {unit} "
                              f"({', '.join(sorted(crossing)[:3])}), not one hidden state; the qnn target cannot "
                              "split this model into parts: raise --max-part-bytes or report the model")
    return next(iter(crossing.values()))


def _reached_from(graph: ir.Graph, input_name: str) -> set[ir.Value]:
    """The values computed from the graph input ``input_name``."""
    reached = {value for value in graph.inputs if value.name == input_name}
    for node in graph:
        if any(value in reached for value in node.inputs if value is not None):
            reached.update(node.outputs)
    return reached


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


def _part_entry(graphs: dict[str, ir.Model], layers: list[int], prefix: str) -> dict:
    def describe(value: ir.Value) -> dict:
        return {"name": value.name, "dtype": value.dtype.name.lower(), "shape": list(value.shape.numpy())}

    return {
        "layers": layers,
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

