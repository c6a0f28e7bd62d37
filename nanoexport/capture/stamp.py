"""Capture a deep decoder by tracing three of its layers and stamping out the rest in ONNX.

Tracing costs time in proportion to the ops traced: capturing Qwen2.5-0.5B's 24 layers took 22.6 s of a 57 s
export (7.5 s with three traced), the onnxruntime-genai builder's whole export 16.5 s. Decoder layers of one
attention type are the same computation on their own weights and cache, so a trace of three layers holds
everything: the first keeps what the exporter hoists out of the loop of layers (constants the later ones
share), the third is the template, and what the third reads from the second shows where each copy reads
from the copy before it.
"""

from __future__ import annotations

import ast
import copy
import re

import onnx_ir as ir

from nanoexport.interface import io_names

TRACED_LAYERS = 3  # the hoisting layer, the previous layer and the template
LAYER_SCOPE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|$)")  # model.layers.3.mlp, transformer.h.3.attn
SCOPES = "pkg.torch.onnx.name_scopes"


class LayersDiffer(ValueError):
    """The traced layers are not copies of one another: the model needs a full trace."""


def stampable(hf_config) -> bool:
    """Whether ``hf_config``'s layers are alike (one attention type) and more than a trace of three."""
    layer_types = getattr(hf_config, "layer_types", None) or []
    return hf_config.num_hidden_layers > TRACED_LAYERS + 1 and len(set(layer_types)) <= 1


def traced_config(hf_config):
    """``hf_config`` cut to the layers the trace holds."""
    config = copy.deepcopy(hf_config)
    config.num_hidden_layers = TRACED_LAYERS
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:TRACED_LAYERS]
    return config


def stamp_layers(model: ir.Model, num_layers: int) -> None:
    """Grow ``model``, traced with three layers, to ``num_layers`` by copying its last layer.

    Copy ``i`` reads copy ``i - 1`` where the template reads the layer before it, ``past_key_values.{i}`` and
    the weights of layer ``i`` (initializers named for it, for ``bind_weights`` to point at the checkpoint),
    and what the template reads from anywhere else. The graph's inputs and outputs become those of
    ``num_layers`` layers; what read the last traced layer (the final norm) reads the last copy.
    Raises ``LayersDiffer``, ``model`` untouched, if the traced layers do not pair op for op.
    """
    graph = model.graph
    layers: dict[int, list[ir.Node]] = {}
    for node in graph:
        layer = _layer_of(node)
        if layer is not None:
            layers.setdefault(layer, []).append(node)
    inputs = {value.name: value for value in graph.inputs}
    previous, template = (_cache_readers(inputs, index) + layers.get(index, [])
                          for index in (TRACED_LAYERS - 2, TRACED_LAYERS - 1))
    if not layers.get(TRACED_LAYERS - 1) or [n.op_type for n in previous] != [n.op_type for n in template]:
        raise LayersDiffer("the traced decoder layers differ op for op")
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for node in template for attr in node.attributes.values()):
        raise LayersDiffer("the template layer holds a subgraph, which stamping does not copy")
    outputs = {value.name: value for value in graph.outputs}
    # The template's values -> the same values of the layer being made; starts as the identity (layer 2).
    last = {old: old for node in template for old in node.outputs}
    from_previous = {p_out: t_out for p, t in zip(previous, template) for p_out, t_out in zip(p.outputs, t.outputs)}
    made: list[ir.Node] = []
    for layer in range(TRACED_LAYERS, num_layers):
        current: dict[ir.Value, ir.Value] = {}

        def source(value: ir.Value | None) -> ir.Value | None:
            if value is None:
                return None
            if value in current:
                return current[value]
            if value in from_previous:
                return last[from_previous[value]]
            if value.is_initializer() and _renamed(value.name, layer) != value.name:
                return _layer_weight(graph, value, _renamed(value.name, layer))
            if value.name in inputs and _renamed(value.name, layer) != value.name:
                return _layer_input(graph, inputs, value, _renamed(value.name, layer))
            return value

        for node in template:
            clone = ir.Node(node.domain, node.op_type, [source(value) for value in node.inputs],
                            list(node.attributes.values()), overload=node.overload, num_outputs=len(node.outputs),
                            name=_renamed(node.name, layer) if node.name else None, version=node.version,
                            metadata_props={key: _renamed(text, layer) for key, text in node.metadata_props.items()})
            for old, new in zip(node.outputs, clone.outputs):
                new.name = f"{old.name}.layer{layer}" if old.name else None
                new.shape, new.type = old.shape, old.type
                current[old] = new
            made.append(clone)
        last = {old: current[old] for old in last}
        for name, value in list(outputs.items()):
            renamed = _renamed(name, layer)
            if renamed != name and value in current:
                outputs[renamed] = current[value]
                current[value].name = renamed
    graph.insert_after(template[-1], made)
    copies = set(made)
    for old, new in last.items():  # the final norm and head read the last layer
        for user, index in list(old.uses()):
            if _layer_of(user) is None and user not in copies:
                user.replace_input_with(index, new)
    input_names, output_names = io_names(num_layers)
    graph.inputs[:] = [inputs[name] for name in input_names]
    graph.outputs[:] = [outputs[name] for name in output_names]


def _cache_readers(inputs: dict[str, ir.Value], layer: int) -> list[ir.Node]:
    """The nodes outside every layer's scope that read ``layer``'s cache inputs for that layer alone (the
    exporter's Identity on each), in graph order: each copy needs its own."""
    readers = [user for kind in ("key", "value") for user, _ in inputs[f"past_key_values.{layer}.{kind}"].uses()
               if _layer_of(user) is None]
    return [reader for reader in readers
            if all(_layer_of(user) == layer for output in reader.outputs for user, _ in output.uses())]


def _layer_of(node: ir.Node) -> int | None:
    """The decoder layer whose module recorded ``node``, from the exporter's name scopes."""
    scopes = node.metadata_props.get(SCOPES)
    if not scopes:
        return None
    for scope in ast.literal_eval(scopes):
        match = LAYER_SCOPE.search(scope or "")
        if match:
            return int(match.group(1))
    return None


def _renamed(text: str, layer: int) -> str:
    """``text`` (a name or name scopes) naming the template layer, made to name ``layer``."""
    template = TRACED_LAYERS - 1
    text = re.sub(rf"((?:^|\.|')(?:layers|h)\.){template}(?=\.|$|')", rf"\g<1>{layer}", text)
    return re.sub(rf"^(past_key_values|present)\.{template}\.", rf"\g<1>.{layer}.", text)


def _layer_weight(graph: ir.Graph, template: ir.Value, name: str) -> ir.Value:
    """The initializer ``name``, made like ``template`` on first use; its data stays the template's until
    ``bind_weights`` points it at the checkpoint."""
    if name not in graph.initializers:
        weight = ir.Value(name=name, shape=template.shape, type=template.type, const_value=template.const_value)
        graph.register_initializer(weight)
    return graph.initializers[name]


def _layer_input(graph: ir.Graph, inputs: dict[str, ir.Value], template: ir.Value, name: str) -> ir.Value:
    """The graph input ``name``, made like ``template`` on first use."""
    if name not in inputs:
        inputs[name] = ir.Value(name=name, shape=template.shape, type=template.type)
    return inputs[name]
