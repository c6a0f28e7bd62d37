"""Attention over the growing cache -> ONNX Runtime's GroupQueryAttention, as rewrite rules and one pass.

The kernel appends each call's keys and values to the cache itself, in place when past and present share
a buffer (what lets onnxruntime-genai hand it one buffer per layer), applies rotary from cos/sin caches
indexed by ``position_ids``, and masks causally within each layer's window. The inputs every layer shares
(``CacheFeeds``) are computed once at the top of the graph from its inputs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx_ir.tape import Tape
from onnxscript.rewriter import pattern

from nanoexport.passes import GraphPass
from nanoexport.passes.matching import multi_output_rule

HEADS_PERM = [0, 2, 1, 3]  # [batch, seq, heads, head_dim] <-> [batch, heads, seq, head_dim]
PAST_KEY = re.compile(r"past_key_values\.(\d+)\.key")

log = logging.getLogger(__name__)


@dataclass
class CacheFeeds:
    """GroupQueryAttention's inputs that every layer shares, computed once from the graph's inputs."""

    position_ids: ir.Value
    seqlens_k: ir.Value  # [batch] int32: cache slots after this call, minus one
    total_sequence_length: ir.Value  # int32 scalar: attention_mask's width
    query_lengths: ir.Value  # [batch] int32: new tokens per row (batched multi-token calls after a past need it)
    # [batch, 1, tokens, slots] float: 0, or the lowest float where attention_mask is 0; None when every mask
    # entry is 1 by contract (``padded_batches`` off).
    padding_bias: ir.Value | None


class _RotaryAngles(pattern.PatternBase):
    """``position_ids * inv_freq``: the angles whose cos and sin a rotary cache indexed by position holds."""

    def pattern(self, op, position_ids, axes, inv_freq):
        return op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)

    def check(self, context, position_ids, inv_freq, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if position_ids.name != "position_ids" or position_ids not in context.graph_or_function.inputs:
            return result.fail("the angles are not computed from the position_ids input", position_ids)
        if inv_freq.const_value is None or inv_freq.const_value.numpy().squeeze().ndim != 1:
            return result.fail("the frequencies must be a 1-D constant", inv_freq)
        return result


ROTARY_ANGLES = _RotaryAngles()


def _split_heads(op, x, name: str):
    """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]; Qwen3 RMS-normalizes each head on the way."""
    heads = op.Reshape(x, pattern.ANY_VALUE, _outputs=[f"{name}_heads"])
    normalized = op.RMSNormalization(heads, pattern.ANY_VALUE, _outputs=[f"{name}_normalized"])
    return op.Transpose(pattern.OrValue([normalized, heads]), perm=HEADS_PERM)


class GroupQueryAttentionOnCache(pattern.RewriteRuleClassBase):
    """One layer's attention over the growing cache -> ONNX Runtime's GroupQueryAttention.

    [RotaryEmbedding on q and k ->] Concat(past, new) -> Attention, between the reshapes that split and merge
    the heads, becomes one kernel that appends the new keys and values to the cache itself, in place when
    past and present share a buffer, and applies rotary from cos/sin caches indexed by ``position_ids``.

    GroupQueryAttention masks causally over cache slots, within ``local_window_size`` slots where the layer has
    a window: the mask the exporter builds for these causal decoders, which the static KV-cache rewrite rebuilds
    the same way. Every row's cache holds all ``attention_mask`` slots, padding included, as with the Concat;
    a bias from ``attention_mask`` hides the padding, so left-padded batches stay exact, unless the feeds
    have no bias (every mask entry 1 by contract).
    """

    def __init__(self, name: str, rotary: bool, feeds: CacheFeeds, windows: list[int | None], max_positions: int):
        super().__init__(name)
        self.rotary = rotary
        self.feeds = feeds
        self.windows = windows
        self.max_positions = max_positions
        self.inv_freq: ir.Value | None = None  # the frequency table check found, for rewrite
        self.rotary_caches: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}  # one cos/sin pair per frequency table

    def pattern(self, op, query, key, value, past_key, past_value, mask, cos, sin, merged_shape):
        query_heads = _split_heads(op, query, "query")
        key_heads = _split_heads(op, key, "key")
        value_heads = op.Transpose(op.Reshape(value, pattern.ANY_VALUE, _outputs=["value_heads"]), perm=HEADS_PERM)
        if self.rotary:
            query_heads = op.RotaryEmbedding(query_heads, cos, sin, _outputs=["query_rotated"])
            key_heads = op.RotaryEmbedding(key_heads, cos, sin, _outputs=["key_rotated"])
        present_key = op.Concat(past_key, key_heads, _outputs=["present_key"])
        present_value = op.Concat(past_value, value_heads, _outputs=["present_value"])
        attention = op.Attention(query_heads, present_key, present_value, mask, _outputs=["attention"])
        # Phi-3 reshapes the attention to the shape it already has before merging the heads.
        attention = pattern.OrValue([op.Reshape(attention, pattern.ANY_VALUE, _outputs=["reshaped"]), attention])
        merged = op.Reshape(op.Transpose(attention, perm=HEADS_PERM), merged_shape, _outputs=["merged"])
        return merged, present_key, present_value

    def check(self, context, query, key, value, past_key, past_value, mask, cos, sin, query_heads, key_heads,
              value_heads, present_key, present_value, attention, reshaped=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for flat, heads in ((query, query_heads), (key, key_heads), (value, value_heads)):
            if not _splits_last_axis(flat, heads):
                return result.fail("a reshape must split [batch, seq, hidden] into static heads", heads)
        heads, kv_heads, head_dim = query_heads.shape[2], key_heads.shape[2], query_heads.shape[3]
        if value_heads.shape[2:] != key_heads.shape[2:] or key_heads.shape[3] != head_dim or heads % kv_heads:
            return result.fail(f"{heads} query heads cannot share {kv_heads} key/value heads of one head size")
        graph_inputs = context.graph_or_function.inputs
        if past_key not in graph_inputs or past_value not in graph_inputs or not PAST_KEY.fullmatch(past_key.name):
            return result.fail("keys and values must extend the past_key_values inputs", past_key)
        for concat in (present_key.producer(), present_value.producer()):
            if concat.attributes.get_int("axis") not in (-2, 2):
                return result.fail("the cache must grow along the sequence axis", concat)
        attributes = attention.producer().attributes
        if attributes.get_int("is_causal", 0) or attributes.get_int("qk_matmul_output_mode", 0):
            return result.fail("only Attention with an explicit mask and one output lowers")
        if mask.shape is None or mask.shape.rank() != 4:
            return result.fail("the mask must be [batch, 1, tokens, slots]", mask)
        if reshaped is not None and reshaped.shape != attention.shape:
            return result.fail("the reshape after attention must keep the shape", reshaped)
        return self._check_rotary(context, cos, sin, head_dim, **_) if self.rotary else result

    def _check_rotary(self, context, cos, sin, head_dim, query_rotated, key_rotated, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        query_attributes, key_attributes = query_rotated.producer().attributes, key_rotated.producer().attributes
        if query_attributes.get_int("interleaved", 0) != key_attributes.get_int("interleaved", 0):
            return result.fail("query and key must rotate the same way")
        if query_attributes.get_int("rotary_embedding_dim", 0) not in (0, head_dim):
            return result.fail("only rotary over the whole head lowers", query_rotated)
        angles = _shared_angles(cos, sin)
        if angles is None or angles.producer() is None:
            return result.fail("cos and sin must be Cos and Sin of the same computed angles", cos)
        match = ROTARY_ANGLES.match(context.model, context.graph_or_function, angles.producer(),
                                    check_nodes_are_removable=False)
        if not match:
            return result.fail("the rotary angles are not position_ids * inv_freq (scaled rotary stays unfused)", cos)
        self.inv_freq = match.bindings["inv_freq"]
        if self.inv_freq.const_value.numpy().size * 2 != head_dim:
            return result.fail("the frequency table must cover half the head", self.inv_freq)
        return result

    def rewrite(self, op, query, key, value, past_key, past_value, merged_shape, query_heads, attention, merged,
                query_normalized=None, key_normalized=None, query_rotated=None, **_):
        heads, kv_heads, head_dim = query_heads.shape[2], past_key.shape[1], query_heads.shape[3]
        attributes = attention.producer().attributes
        window = self.windows[int(PAST_KEY.fullmatch(past_key.name).group(1))]
        feeds = self.feeds
        rotary_inputs = [*self._rotary_caches(op), feeds.position_ids] if self.rotary else [None, None, None]
        output, present_key, present_value = op.GroupQueryAttention(
            _normalized_heads(op, query, query_normalized, head_dim),
            _normalized_heads(op, key, key_normalized, head_dim),
            value, past_key, past_value, feeds.seqlens_k, feeds.total_sequence_length, *rotary_inputs,
            feeds.padding_bias, None, None, None, None, None, feeds.query_lengths,
            num_heads=heads,
            kv_num_heads=kv_heads,
            scale=attributes.get_float("scale", 1 / np.sqrt(head_dim)),
            softcap=attributes.get_float("softcap", 0.0),
            local_window_size=window or -1,
            do_rotary=int(self.rotary),
            rotary_interleaved=query_rotated.producer().attributes.get_int("interleaved", 0) if self.rotary else 0,
            _domain="com.microsoft",
            _outputs=3,
        )
        # ONNX shape inference does not know vendor ops: the output is [batch, seq, heads * head_dim].
        output.shape, output.type = ir.Shape([*query.shape[:2], heads * head_dim]), query.type
        if merged.shape is not None and merged.shape == output.shape:
            return output, present_key, present_value
        return op.Reshape(output, merged_shape), present_key, present_value  # GPT-2 merges batch and sequence too

    def _rotary_caches(self, op) -> tuple[ir.Value, ir.Value]:
        """cos and sin of each position below the context length, [positions, head_dim / 2], in float32 as the graph."""
        if self.inv_freq not in self.rotary_caches:
            positions = np.arange(self.max_positions, dtype=np.float32)[:, None]
            angles = positions * self.inv_freq.const_value.numpy().reshape(1, -1).astype(np.float32)
            self.rotary_caches[self.inv_freq] = tuple(
                op.initializer(ir.tensor(np.ascontiguousarray(f(angles))), name=f"{self.inv_freq.name}/{f.__name__}")
                for f in (np.cos, np.sin)
            )
        return self.rotary_caches[self.inv_freq]


def _shared_angles(cos: ir.Value, sin: ir.Value) -> ir.Value | None:
    """The angles when ``cos`` and ``sin`` are Cos and Sin of one value."""
    cos_node, sin_node = cos.producer(), sin.producer()
    if cos_node is None or sin_node is None or (cos_node.op_type, sin_node.op_type) != ("Cos", "Sin"):
        return None
    return cos_node.inputs[0] if cos_node.inputs[0] is sin_node.inputs[0] else None


def _splits_last_axis(flat: ir.Value, heads: ir.Value) -> bool:
    """Whether ``heads`` ([batch, seq, heads, head_dim], static heads) is ``flat`` ([batch, seq, hidden]) reshaped."""
    if flat.shape is None or heads.shape is None or flat.shape.rank() != 3 or heads.shape.rank() != 4:
        return False
    return heads.shape[:2] == flat.shape[:2] and all(isinstance(d, int) for d in heads.shape[2:])


def _normalized_heads(op, flat, normalized, head_dim: int):
    """``flat`` as GroupQueryAttention takes it; Qwen3's per-head RMSNormalization applied again when it had one."""
    if normalized is None:
        return flat
    norm = normalized.producer()
    attributes = {name: attr.value for name, attr in norm.attributes.items()}
    heads = op.Reshape(flat, op.Constant(value_ints=[0, 0, -1, head_dim]))
    return op.Reshape(op.RMSNormalization(heads, norm.inputs[1], **attributes), op.Constant(value_ints=[0, 0, -1]))


class PackedQKV(pattern.RewriteRuleClassBase):
    """GroupQueryAttention on the query, key and value parts of one Split -> on the unsplit projection.

    The kernel reads the parts in place: one node and one copy fewer per layer.
    """

    def pattern(self, op, projection):
        query, key, value = op.Split(projection, _allow_other_inputs=True, _outputs=3)
        return op.GroupQueryAttention(query, key, value, _allow_other_inputs=True, _domain="com.microsoft",
                                      _outputs=["output", "present_key", "present_value"])

    def check(self, context, output, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        query = output.producer().inputs[0]
        split = query.producer()
        if query.shape is None or query.shape.rank() != 3 or split.attributes.get_int("axis", 0) not in (-1, 2):
            return result.fail("the split must cut [batch, seq, hidden] along hidden", split)
        return result

    def rewrite(self, op, projection, output, **_):
        attention = output.producer()
        attributes = {name: attr.value for name, attr in attention.attributes.items()}
        outputs = op.GroupQueryAttention(projection, None, None, *attention.inputs[3:], _domain="com.microsoft",
                                         _outputs=3, **attributes)
        for new, old in zip(outputs, attention.outputs):
            new.shape, new.type = old.shape, old.type
        return outputs


def group_query_attention_pass(hf_config, windows: tuple[int | None, ...], padded_batches: bool) -> GraphPass:
    """GroupQueryAttention for ``hf_config``'s model with each layer's attention ``windows``;
    ``padded_batches``: hide the attention_mask's zero slots (a bias per call), or take every entry as 1."""

    def group_query_attention(model: ir.Model) -> None:
        """Each layer's attention over the growing cache -> GroupQueryAttention, which appends to the cache
        inside the kernel; query, key and value stay packed where one projection makes them."""
        _use_group_query_attention(model, hf_config, windows, padded_batches)

    return group_query_attention


def _use_group_query_attention(model: ir.Model, hf_config, windows, padded_batches: bool) -> None:
    feeds = _cache_feeds(model.graph, padded_batches)
    max_positions = context_length(hf_config)
    rules = pattern.RewriteRuleSet([
        multi_output_rule(GroupQueryAttentionOnCache(name, rotary, feeds, windows, max_positions))
        for name, rotary in (("GQA with rotary", True), ("GQA", False))
    ])
    count = rules.apply_to_model(model)
    packed = pattern.RewriteRuleSet([multi_output_rule(PackedQKV())]).apply_to_model(model)
    common.RemoveUnusedNodesPass()(model)  # the mask and rotary angles the kernel computes itself
    log.info("GroupQueryAttention: %d layers, %d with packed QKV", count, packed)
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)


def _cache_feeds(graph: ir.Graph, padded_batches: bool) -> CacheFeeds:
    """Insert the nodes computing ``CacheFeeds`` at the top of ``graph``; unused ones go with the unused nodes."""
    inputs = {value.name: value for value in graph.inputs}
    tape = Tape()  # records the nodes in creation order, inserted together once all are made

    def constant(array) -> ir.Value:
        return tape.op("Constant", [], {"value": ir.tensor(np.asarray(array))})

    mask = inputs["attention_mask"]
    batch = tape.op("Shape", [mask], {"start": 0, "end": 1})
    tokens = tape.op("Shape", [inputs["input_ids"]], {"start": 1, "end": 2})
    slots = tape.op("Squeeze", [tape.op("Shape", [mask], {"start": 1, "end": 2})])
    total_sequence_length = tape.op("Cast", [slots], {"to": ir.DataType.INT32})
    slot_bias = tape.op("Where", [tape.op("Cast", [mask], {"to": ir.DataType.BOOL}), constant(np.float32(0)),
                                  constant(np.finfo(np.float32).min)])  # finite: a fully padded row stays a number
    feeds = CacheFeeds(
        position_ids=inputs["position_ids"],
        seqlens_k=tape.op("Expand", [tape.op("Sub", [total_sequence_length, constant(np.int32(1))]), batch]),
        total_sequence_length=total_sequence_length,
        query_lengths=tape.op("Cast", [tape.op("Expand", [tokens, batch])], {"to": ir.DataType.INT32}),
        padding_bias=tape.op("Expand", [tape.op("Unsqueeze", [slot_bias, constant([1, 2])]),
                                        tape.op("Concat", [constant([1, 1]), tokens, constant([1])], {"axis": 0})])
        if padded_batches else None,
    )
    graph.insert_before(graph.node(0), tape.nodes)
    return feeds


def context_length(hf_config) -> int:
    """The longest sequence the model was trained for: the rotary caches' length and genai's context."""
    return getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", 2048)
