"""A specialized static-cache graph -> the form HTP runs, as four named passes (``htp_graph_passes``).

- rotary: ``Cos``/``Sin`` of ``position_ids * inv_freq`` become tables of ``capacity`` rows gathered by
  ``position_ids``;
- ``RotaryEmbedding`` becomes Split, Mul, Sub, Add, Concat: QNN's own gave wrong values on the HTP emulator
  (measured: 6.5 max-abs on the demo model's first layer);
- KV cache: HTP has no scatter into a graph input, so attention reads ``Concat(past, new rows)`` and
  ``present.{i}.key/value`` give only the new rows, which the host writes into its buffer;
- attention: ``Attention`` becomes MatMul -> Softmax -> MatMul, query heads grouped per key/value head (no
  repeated cache), under an additive mask built from ``attention_mask`` and ``cache_position``.

Each refuses, naming the node, what it cannot lower.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx_ir.tape import Tape
from onnxscript.rewriter import pattern

from nanoexport.errors import NanoexportError
from nanoexport.passes import GraphPass
from nanoexport.passes.initializers import new_initializer
from nanoexport.targets.qnn.rules import apply_rules, constant, keeps_own_name, named

log = logging.getLogger(__name__)

MASKED = -10000.0  # additive mask: exp underflows to 0 in fp16 too, unlike the float32 minimum (overflow)


def htp_graph_passes(capacity: int) -> list[GraphPass]:
    """The passes, in order, for a graph whose cache holds ``capacity`` slots."""

    def rotary_as_tables(model: ir.Model) -> None:
        """Cos/Sin of the rotary angles -> tables of ``capacity`` rows gathered by ``position_ids``."""
        rotary_tables(model, capacity)

    def cache_as_new_rows(model: ir.Model) -> None:
        """Attention reads Concat(past, new rows); ``present`` outputs only the new rows."""
        new_rows_cache(model, capacity)
        common.ShapeInferencePass()(model)  # the attended keys' shapes, which the attention rewrite reads

    def attention_as_matmuls(model: ir.Model) -> None:
        """Attention -> MatMul, Softmax, MatMul over grouped heads under an additive mask."""
        decompose_attention(model)
        common.RemoveUnusedNodesPass()(model)
        common.ShapeInferencePass()(model)

    return [rotary_as_tables, decompose_rotary, cache_as_new_rows, attention_as_matmuls]


def _refuse_leftovers(model: ir.Model, op_types: tuple[str, ...], message: str) -> None:
    """Raise ``message`` (``{node}``: the node's name) for a node of ``op_types`` the rules left."""
    for node in model.graph:
        if node.op_type in op_types:
            raise NanoexportError(message.format(node=node.name))


# --- rotary ----------------------------------------------------------------------------------------------


class RotaryTable(pattern.RewriteRuleClassBase):
    """``Cos`` (or ``Sin``) of ``position * inv_freq`` -> a table of ``capacity`` rows, gathered by
    ``positions`` and reshaped to the shape the function gave."""

    def __init__(self, name: str, function: str, capacity: int, positions: ir.Value):
        super().__init__(name)
        self.function, self.capacity, self.positions = function, capacity, positions

    def pattern(self, op, angles):
        function = op.Cos if self.function == "Cos" else op.Sin
        return function(angles, _outputs=["result"])

    def check(self, context, angles, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if _inverse_frequencies(angles) is None:
            return result.fail("the angles are not positions * a constant frequency table", angles)
        return result

    def rewrite(self, op, angles, result, **_):
        kind = self.function.lower()
        angle_rows = np.arange(self.capacity, dtype=np.float32)[:, None] * _inverse_frequencies(angles)[None, :]
        function = np.cos if self.function == "Cos" else np.sin
        table = constant(op, f"rotary.{kind}_table", function(angle_rows).astype(np.float32))
        rows = named(op, "Gather", table, self.positions, name=f"rotary.{kind}", axis=0)
        shape = constant(op, f"rotary.{kind}_shape", np.array(result.shape.numpy()))
        keeps_own_name(result)
        return named(op, "Reshape", rows, shape, name=f"rotary.{kind}_rows")


def _inverse_frequencies(angles: ir.Value) -> np.ndarray | None:
    """The constant side of ``angles = positions * inv_freq``, flattened."""
    producer = angles.producer()
    if producer is None or producer.op_type != "Mul":
        return None
    constants = [value.const_value for value in producer.inputs if value.const_value is not None]
    return constants[0].numpy().astype(np.float32).reshape(-1) if len(constants) == 1 else None


def rotary_tables(model: ir.Model, capacity: int) -> None:
    """``Cos``/``Sin`` of ``position * inv_freq`` -> tables of ``capacity`` rows gathered by ``position_ids``."""
    positions = next(value for value in model.graph.inputs if value.name == "position_ids")
    tables = [RotaryTable.rule(f"{function} table", function=function, capacity=capacity, positions=positions)
              for function in ("Cos", "Sin")]
    count = apply_rules(pattern.RewriteRuleSet(tables), model)
    log.info("rotary_tables: %d tables", count)
    _refuse_leftovers(model, ("Cos", "Sin"), "rotary angles at {node} are not position_ids * a constant frequency "
                                             "table; the qnn target supports the default rotary only")


class RotaryAsArithmetic(pattern.RewriteRuleClassBase):
    """``RotaryEmbedding`` (halves layout, whole heads, ``[batch, heads, seq, head_dim]``) -> Split, Mul, Sub,
    Add, Concat."""

    def pattern(self, op, heads, cos, sin):
        return op.RotaryEmbedding(heads, cos, sin, _allow_other_attributes=True, _outputs=["rotated"])

    def check(self, context, heads, rotated, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        attributes = rotated.producer().attributes
        if attributes.get_int("interleaved", 0) or attributes.get_int("rotary_embedding_dim", 0):
            return result.fail("interleaved or partial rotary", rotated)
        if heads.shape is None or heads.shape.rank() != 4:
            return result.fail("the heads must be 4-D [batch, heads, seq, head_dim]", heads)
        return result

    def rewrite(self, op, heads, cos, sin, rotated, **_):
        name = rotated.producer().name or rotated.name
        axes = constant(op, f"{name}.heads_axis", np.array([1], np.int64))
        cos = named(op, "Unsqueeze", cos, axes, name=f"{name}.cos")
        sin = named(op, "Unsqueeze", sin, axes, name=f"{name}.sin")
        first, second = op.Split(heads, axis=-1, num_outputs=2, _name=f"{name}.halves",
                                 _outputs=[f"{name}.first", f"{name}.second"])

        def product(x, y, suffix):
            return named(op, "Mul", x, y, name=f"{name}.{suffix}")

        rotated_first = named(op, "Sub", product(first, cos, "first_cos"), product(second, sin, "second_sin"),
                              name=f"{name}.rotated_first")
        rotated_second = named(op, "Add", product(second, cos, "second_cos"), product(first, sin, "first_sin"),
                               name=f"{name}.rotated_second")
        return named(op, "Concat", rotated_first, rotated_second, name=f"{name}.rotated", axis=-1)


def decompose_rotary(model: ir.Model) -> None:
    """``RotaryEmbedding`` (halves layout) -> Split, Mul, Sub, Add, Concat: QNN's own RotaryEmbedding gave
    wrong values on the HTP emulator (measured: 6.5 max-abs on the demo model's first layer)."""
    count = apply_rules(pattern.RewriteRuleSet([RotaryAsArithmetic.rule()]), model)
    log.info("decompose_rotary: %d rotaries", count)
    _refuse_leftovers(model, ("RotaryEmbedding",), "{node}: only whole-head, non-interleaved rotary on [batch, "
                                                   "heads, seq, head_dim] lowers to HTP yet; report the model")


# --- KV cache --------------------------------------------------------------------------------------------


def new_rows_cache(model: ir.Model, capacity: int) -> None:
    """``TensorScatter`` cache writes -> attention over ``Concat(past, new)``; presents are the new rows."""
    # A walk, not a rule: a rule gives every reader of the replaced value one replacement, but here attention
    # reads Concat(past, new rows) while the graph output becomes the new rows themselves.
    graph = model.graph
    writes = [node for node in graph if node.op_type == "TensorScatter"]
    if not writes:
        raise NanoexportError("the qnn target needs the static KV cache; drop --kv-cache")
    tokens = next(value for value in graph.inputs if value.name == "input_ids").shape[1]
    mask = _attention_bias(graph, capacity, tokens)
    for write in writes:
        past, rows = write.inputs[0], write.inputs[1]
        present = write.outputs[0]
        tape = Tape()
        keys = _step(tape, "Concat", [past, rows], f"{present.name}.attended", axis=2)
        graph.insert_before(write, tape.nodes)
        for node, index in list(present.uses()):
            node.replace_input_with(index, keys)
        name = present.name
        graph.outputs[graph.outputs.index(present)] = rows
        graph.remove(write, safe=True)
        rows.name = name
    for node in graph:
        if node.op_type == "Attention":
            node.replace_input_with(3, mask)


def _attention_bias(graph: ir.Graph, capacity: int, tokens: int) -> ir.Value:
    """Float ``[1, 1, tokens, capacity + tokens]``: 0 where a query may look, ``MASKED`` elsewhere.

    Past slots are visible when ``attention_mask`` marks them and they precede ``cache_position`` (later
    slots hold stale rows the host has not overwritten yet); the new rows causally.
    """
    inputs = {value.name: value for value in graph.inputs}
    tape = Tape()
    slots = new_initializer(graph, "mask.slots", np.arange(capacity, dtype=np.int64))
    written = _step(tape, "Less", [slots, inputs["cache_position"]], "mask.before_call")
    marked = _step(tape, "Cast", [inputs["attention_mask"]], "mask.marked", to=ir.DataType.BOOL)
    visible = _step(tape, "And", [written, marked], "mask.past_visible")
    zero = new_initializer(graph, "mask.zero", np.array(0.0, np.float32))
    masked = new_initializer(graph, "mask.masked", np.array(MASKED, np.float32))
    past = _step(tape, "Where", [visible, zero, masked], "mask.past_bias")
    past_shape = new_initializer(graph, "mask.past_shape", np.array([1, 1, tokens, capacity], np.int64))
    past = _step(tape, "Expand", [past, past_shape], "mask.past_rows")
    causal = np.where(np.tril(np.ones((tokens, tokens), bool)), 0.0, MASKED).astype(np.float32)
    new = new_initializer(graph, "mask.causal_bias", causal[None, None])
    bias = _step(tape, "Concat", [past, new], "mask.bias", axis=3)
    graph.insert_before(graph.node(0), tape.nodes)
    return bias


def _step(tape: Tape, op_type: str, inputs: list[ir.Value], name: str, **attributes) -> ir.Value:
    """A node on ``tape`` whose node and output are both called ``name``."""
    return tape.op(op_type, inputs, attributes, name=name, output=ir.Value(name=name))


# --- attention -------------------------------------------------------------------------------------------


class AttentionAsMatMuls(pattern.RewriteRuleClassBase):
    """``Attention`` with an additive mask -> MatMul, Softmax, MatMul; the query heads sharing a key/value head
    are grouped into its rows instead of repeating the keys and values."""

    def pattern(self, op, query, keys, values, bias):
        return op.Attention(query, keys, values, bias, _allow_other_attributes=True, _outputs=["attended"])

    def check(self, context, query, keys, attended, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = attended.producer()
        if node.attributes.get_int("is_causal", 0) or node.attributes.get_float("softcap", 0.0):
            return result.fail("causal or softcapped attention", node)
        if len(node.outputs) > 1:
            return result.fail("an Attention that also gives its cache or scores", node)
        if not (query.shape and query.shape.is_static() and keys.shape and isinstance(keys.shape[1], int)):
            return result.fail("the query and key head counts must be static", query)
        return result

    def rewrite(self, op, query, keys, values, bias, attended, **_):
        node = attended.producer()
        _, heads, tokens, head_dim = query.shape.numpy()
        kv_heads = keys.shape[1]
        group = heads // kv_heads
        scale = node.attributes.get_float("scale", 1 / np.sqrt(head_dim))
        name = node.name or attended.name
        grouped_shape = constant(op, f"{name}.grouped_shape", np.asarray([1, kv_heads, group * tokens, head_dim]))
        grouped = named(op, "Reshape", query, grouped_shape, name=f"{name}.grouped")
        keys_t = named(op, "Transpose", keys, name=f"{name}.keys_t", perm=[0, 1, 3, 2])
        scores = named(op, "MatMul", grouped, keys_t, name=f"{name}.scores")
        scores = named(op, "Mul", scores, constant(op, f"{name}.scale", np.asarray(np.float32(scale))),
                       name=f"{name}.scaled")
        rows_bias = bias if group == 1 else named(op, "Concat", *[bias] * group, name=f"{name}.bias", axis=2)
        scores = named(op, "Add", scores, rows_bias, name=f"{name}.masked")
        weights = named(op, "Softmax", scores, name=f"{name}.weights", axis=-1)
        mixed = named(op, "MatMul", weights, values, name=f"{name}.mixed")
        heads_shape = constant(op, f"{name}.heads_shape", np.asarray([1, heads, tokens, head_dim]))
        keeps_own_name(attended)
        return named(op, "Reshape", mixed, heads_shape, name=f"{name}.heads")


def decompose_attention(model: ir.Model) -> None:
    """``Attention`` -> MatMul, Softmax, MatMul; query heads grouped per key/value head instead of repeating keys."""
    count = apply_rules(pattern.RewriteRuleSet([AttentionAsMatMuls.rule()]), model)
    log.info("decompose_attention: %d attentions", count)
    _refuse_leftovers(model, ("Attention",), "{node}: causal, softcapped or multi-output Attention does not lower "
                                             "to HTP yet; report the model")
