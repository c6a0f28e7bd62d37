"""The onnx target's lowering: ONNX Runtime's kernels (MatMulNBits, GatherBlockQuantized,
SkipSimplifiedLayerNormalization, GroupQueryAttention) as rewrite rules and passes, and the files it writes."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern

from nanoexport.artifact import Artifact, write_json
from nanoexport.capture.checkpoint import Checkpoint
from nanoexport.interface import kv_shape
from nanoexport.passes import GraphPass
from nanoexport.passes.fusion import unmerge_projections
from nanoexport.passes.kv_cache import specialize
from nanoexport.runtime import cpu_session
from nanoexport.targets import Build

MODEL_FILE = "model.onnx"
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
WEIGHTS_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
GENAI_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HEADS_PERM = [0, 2, 1, 3]  # [batch, seq, heads, head_dim] <-> [batch, heads, seq, head_dim]
PAST_KEY = re.compile(r"past_key_values\.(\d+)\.key")

log = logging.getLogger(__name__)


class SkipRMSNorm(pattern.RewriteRuleClassBase):
    """Residual Add feeding an RMSNormalization -> ONNX Runtime's SkipSimplifiedLayerNormalization.

    One kernel reads both addends once and returns the normalized value and the sum (the next residual).
    """

    def pattern(self, op, x, skip, weight):
        total = op.Add(x, skip)
        normalized = op.RMSNormalization(total, weight, _allow_other_attributes=True, _outputs=["normalized"])
        return normalized, total

    def check(self, context, x, skip, weight, normalized, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        norm = normalized.producer()
        if norm.attributes.get_int("axis", -1) not in (-1, 2):
            return result.fail("only normalization over the last axis fuses")
        if x.shape is None or skip.shape is None or x.shape != skip.shape or x.shape.rank() != 3:
            return result.fail("both addends must be [batch, sequence, hidden] of one shape")
        if weight.shape is None or weight.shape.rank() != 1:
            return result.fail("the scale must be 1-D", weight)
        return result

    def rewrite(self, op, x, skip, weight, normalized, **_):
        epsilon = normalized.producer().attributes.get_float("epsilon", 1e-5)
        outputs = op.SkipSimplifiedLayerNormalization(
            x, skip, weight, epsilon=epsilon, _domain="com.microsoft", _outputs=4
        )
        # ONNX shape inference does not know vendor ops: record the shapes it cannot work out.
        statistics_shape = ir.Shape([*x.shape[:-1], 1])
        for value, shape in zip(outputs, (x.shape, statistics_shape, statistics_shape, x.shape)):
            value.shape, value.type = shape, ir.TensorType(ir.DataType.FLOAT)
        output, _mean, _inverse_std, total = outputs
        output.type = total.type = x.type
        return output, total


def _four_bit_weight(values, scales, weight, axis: int) -> pattern.MatchResult:
    """Whether ``weight`` is a blocked 4-bit DequantizeLinear of initializers, blocks along ``axis``, that
    ONNX Runtime's 4-bit kernels can read as stored."""
    result = pattern.MatchResult()
    node = weight.producer()
    if values.const_value is None or scales.const_value is None:
        return result.fail("the integers and scales must be initializers")
    if values.dtype not in (ir.DataType.INT4, ir.DataType.UINT4):
        return result.fail("4-bit weights only", values)
    if node.attributes.get_int("axis", 1) != axis or values.shape is None or values.shape.rank() != 2:
        return result.fail(f"blocks must run along axis {axis} of a 2-D weight")
    block = node.attributes.get_int("block_size", 0)
    if block < 16 or block & (block - 1) or values.shape[axis] % block:
        return result.fail(f"block size {block} is not a power of two >= 16 dividing the blocked axis")
    return result


def _dequantized(op, cast: bool, zero_point: bool, values, scales, zero_points):
    inputs = [values, scales, zero_points] if zero_point else [values, scales]
    weight = op.DequantizeLinear(*inputs, _allow_other_attributes=True, _outputs=["weight"])
    return op.Cast(weight, to=ir.DataType.FLOAT) if cast else weight


def _nibbles(values: ir.Value) -> np.ndarray:
    """The integers as MatMulNBits stores them: unsigned, around a zero point of 8 when signed."""
    integers = values.const_value.numpy().astype(np.int16)
    return (integers + 8 if values.dtype == ir.DataType.INT4 else integers).astype(np.uint8)


def _kernel_initializer(op, source: ir.Value, suffix: str, make: Callable[[], np.ndarray]) -> ir.Value:
    """The initializer ``{source.name}.{suffix}`` holding ``make()``, made once: a tied output head and the
    embedding lookup read the same packed integers and scales rather than a copy each."""
    name = f"{source.name}.{suffix}"
    existing = source.graph.initializers.get(name) if source.graph is not None else None
    if existing is not None:
        return existing
    return op.initializer(ir.tensor(np.ascontiguousarray(make())), name=name)


def _packed_nibbles(op, values: ir.Value, block: int, by_output: Callable[[np.ndarray], np.ndarray]) -> ir.Value:
    """MatMulNBits' B: ``[N, blocks, block / 2]`` bytes, two integers each, low nibble first."""
    def pack() -> np.ndarray:
        stored = by_output(_nibbles(values))
        columns, rows = stored.shape
        stored = stored.reshape(columns, rows // block, block)
        return (stored[..., 0::2] | (stored[..., 1::2] << 4)).astype(np.uint8)

    return _kernel_initializer(op, values, "nbits", pack)


def _float_scales(op, scales: ir.Value, by_output: Callable[[np.ndarray], np.ndarray]) -> ir.Value:
    """The block scales as MatMulNBits takes them for float32 activations: ``[N, blocks]`` float32."""
    return _kernel_initializer(op, scales, "nbits",
                               lambda: by_output(scales.const_value.numpy().astype(np.float32)))


class BlockwiseMatMul(pattern.RewriteRuleClassBase):
    """MatMul by a blocked 4-bit DequantizeLinear weight -> ONNX Runtime's MatMulNBits.

    MatMulNBits reads the packed integers directly, one kernel instead of expanding the weight to float on
    every call. The integers and scales are ours, re-laid out ([N, blocks, block/2] bytes, fp32 scales).
    ``transposed`` matches a tied output head, ``MatMul(x, Transpose(weight [N, K]))``: that layout is
    already MatMulNBits' own. The dequantized weight may have other readers (the tied embedding's Gather),
    so matched nodes stay until the unused-node sweep.
    """

    def __init__(self, name: str, cast: bool, zero_point: bool, transposed: bool, accuracy_level: int):
        super().__init__(name, remove_nodes=False)
        self.cast, self.zero_point, self.transposed = cast, zero_point, transposed
        self.accuracy_level = accuracy_level

    def pattern(self, op, x, values, scales, zero_points):
        weight = _dequantized(op, self.cast, self.zero_point, values, scales, zero_points)
        return op.MatMul(x, op.Transpose(weight, perm=[1, 0]) if self.transposed else weight)

    def check(self, context, x, values, scales, weight, zero_points=None, **_) -> pattern.MatchResult:
        # Blocks run along K: axis 0 of a [K, N] weight, axis 1 of a transposed [N, K] one.
        result = _four_bit_weight(values, scales, weight, axis=1 if self.transposed else 0)
        if result and x.dtype != ir.DataType.FLOAT:
            return result.fail("float32 activations only", x)
        return result

    def rewrite(self, op, x, values, scales, weight, zero_points=None, **_):
        block = weight.producer().attributes.get_int("block_size")

        def by_output(array: np.ndarray) -> np.ndarray:  # [N, ...] whatever the stored layout
            return array if self.transposed else array.T

        packed = _packed_nibbles(op, values, block, by_output)
        columns, blocks = packed.const_value.shape[:2]
        rows = values.const_value.shape[1 if self.transposed else 0]
        inputs = [x, packed, _float_scales(op, scales, by_output)]
        if zero_points is not None:
            points = by_output(_nibbles(zero_points))  # [N, blocks]
            padded = np.zeros((columns, blocks + blocks % 2), np.uint8)
            padded[:, :blocks] = points
            packed_points = padded[:, 0::2] | (padded[:, 1::2] << 4)
            inputs.append(op.initializer(ir.tensor(np.ascontiguousarray(packed_points.reshape(-1))),
                                         name=f"{zero_points.name}.nbits"))
        return op.MatMulNBits(*inputs, K=rows, N=columns, bits=4, block_size=block,
                              accuracy_level=self.accuracy_level, _domain="com.microsoft")


class BlockwiseGather(pattern.RewriteRuleClassBase):
    """Embedding lookup in a blocked 4-bit ``[vocab, hidden]`` weight -> ONNX Runtime's GatherBlockQuantized.

    Only the looked-up rows are dequantized, not the whole table on every call. Symmetric weights are read
    from the bytes and float32 scales MatMulNBits takes (the kernel's default zero point for bytes is 8, as
    MatMulNBits'), so a tied output head and the embedding share one copy. Asymmetric weights are read as
    our integers, scales and zero points unchanged; the kernel returns the scales' dtype.
    """

    def __init__(self, name: str, cast: bool, zero_point: bool):
        super().__init__(name, remove_nodes=False)  # a tied output head reads the same dequantized weight
        self.cast, self.zero_point = cast, zero_point

    def pattern(self, op, values, scales, zero_points, indices):
        weight = _dequantized(op, self.cast, self.zero_point, values, scales, zero_points)
        return op.Gather(weight, indices, _allow_other_attributes=True, _outputs=["rows"])

    def check(self, context, values, scales, weight, rows, zero_points=None, **_) -> pattern.MatchResult:
        result = _four_bit_weight(values, scales, weight, axis=1)
        if result and rows.producer().attributes.get_int("axis", 0) != 0:
            return result.fail("rows must be gathered along axis 0")
        return result

    def rewrite(self, op, values, scales, weight, indices, zero_points=None, **_):
        block = weight.producer().attributes.get_int("block_size")
        attributes = dict(gather_axis=0, quantize_axis=1, bits=4, block_size=block, _domain="com.microsoft")
        if zero_points is None and (self.cast or scales.dtype == ir.DataType.FLOAT):
            packed = _packed_nibbles(op, values, block, by_output=lambda array: array)
            vocab, hidden = values.const_value.shape
            # The kernel wants the bytes 2-D; ONNX Runtime folds this Reshape of an initializer at load.
            table = op.Reshape(packed, op.Constant(value_ints=[vocab, hidden // 2]))
            return op.GatherBlockQuantized(table, indices, _float_scales(op, scales, lambda array: array),
                                           **attributes)
        inputs = [values, indices, scales] + ([zero_points] if zero_points is not None else [])
        rows = op.GatherBlockQuantized(*inputs, **attributes)
        return op.Cast(rows, to=ir.DataType.FLOAT) if self.cast else rows


class SwishAsQuickGelu(pattern.RewriteRuleClassBase):
    """``Swish`` -> ONNX Runtime's ``QuickGelu`` (``x * Sigmoid(alpha * x)``), the same function as one kernel.

    ONNX Runtime has no Swish kernel: it inlines the function as Cast, Mul, Sigmoid, Mul, four nodes per layer.
    """

    def pattern(self, op, x):
        return op.Swish(x, _allow_other_attributes=True, _outputs=["activated"])

    def check(self, context, x, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("float32 only", x)
        return result

    def rewrite(self, op, x, activated, **_):
        alpha = activated.producer().attributes.get_float("alpha", 1.0)
        return op.QuickGelu(x, alpha=alpha, _domain="com.microsoft")


def ort_kernel_rules(accuracy_level: int) -> pattern.RewriteRuleSet:
    """Canonical ops -> ONNX Runtime's fused kernels; ``accuracy_level`` is MatMulNBits' compute type
    (0: as the activations, 4: int8 activations)."""
    variants = [(cast, zero) for cast in (True, False) for zero in (True, False)]
    return pattern.RewriteRuleSet([
        SkipRMSNorm.rule(),
        SwishAsQuickGelu.rule(),
        *(BlockwiseMatMul.rule(f"4-bit {'tied head ' if transposed else ''}matmul{' after cast' if cast else ''}"
                               f"{' with zero points' if zero else ''}", cast=cast, zero_point=zero,
                               transposed=transposed, accuracy_level=accuracy_level)
          for transposed in (True, False) for cast, zero in variants),
        *(BlockwiseGather.rule(f"4-bit gather{' after cast' if cast else ''}{' with zero points' if zero else ''}",
                               cast=cast, zero_point=zero)
          for cast, zero in variants),
    ])


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


def lowering_passes(build: Build) -> list[GraphPass]:
    """The canonical graph -> ONNX Runtime's kernels. Split graphs get their kernels per specialized graph
    (in ``lower``): ONNX shape inference, which specializing runs, does not know the vendor ops."""
    if build.cache.split_prefill_decode:
        return [unmerge_projections]  # ONNX Runtime runs a Split as copies
    options = build.config.options["onnx"]
    passes = []
    if build.cache.form == "dynamic":
        passes.append(group_query_attention_pass(build.checkpoint.config, build.cache.windows, options.padded_batches))
    # After GroupQueryAttention, which reads query, key and value packed.
    return [*passes, unmerge_projections, ort_kernels_pass(build.config.quant.dynamic_int8)]


def lower(model: ir.Model, build: Build) -> list[str]:
    """Write ``model`` into the build folder for ONNX Runtime; returns the model files written."""
    folder = build.folder
    if not build.cache.split_prefill_decode:
        genai_files = []
        if build.cache.form == "dynamic":
            genai_files = _write_genai_config(folder, build.checkpoint, _appends_in_kernel(model))
        ir.save(model, folder / MODEL_FILE, external_data=WEIGHTS_FILE)
        return [MODEL_FILE, WEIGHTS_FILE, *genai_files]
    # Reloaded copies are cheap (weights stay on disk) and their initializers keep pointing into the one
    # weights file, which each specialized graph then references rather than copies.
    ir.save(model, folder / MODEL_FILE, external_data=WEIGHTS_FILE)
    kernels = ort_kernels_pass(build.config.quant.dynamic_int8)
    for name, file_name, sequence_length in (("prefill", PREFILL_FILE, build.cache.prefill_chunk),
                                             ("decode", DECODE_FILE, 1)):
        graph = ir.load(folder / MODEL_FILE)
        specialize(graph, sequence_length)  # before the vendor ops, which ONNX shape inference does not know
        build.run_passes(graph, [kernels], graph=name)
        ir.save(graph, folder / file_name)
    (folder / MODEL_FILE).unlink()
    return [PREFILL_FILE, DECODE_FILE, WEIGHTS_FILE]


def ort_kernels_pass(dynamic_int8: bool) -> GraphPass:
    """The ORT kernel rules as a pass; ``dynamic_int8``: 4-bit MatMuls quantize activations to int8."""

    def ort_kernels(model: ir.Model) -> None:
        """Blocked 4-bit weights -> MatMulNBits / GatherBlockQuantized, residual Add + RMSNormalization ->
        SkipSimplifiedLayerNormalization, Swish -> QuickGelu; the logits stay within rounding."""
        if ort_kernel_rules(accuracy_level=4 if dynamic_int8 else 0).apply_to_model(model):
            model.opset_imports.setdefault("com.microsoft", 1)
            common.RemoveUnusedNodesPass()(model)  # the integers as DequantizeLinear had them, now re-laid out
            _omit_unread_outputs(model.graph, "SkipSimplifiedLayerNormalization")

    return ort_kernels


def _omit_unread_outputs(graph: ir.Graph, op_type: str) -> None:
    """Leave unnamed the optional outputs of ``op_type`` that nothing reads.

    ONNX Runtime computes and allocates every output a node names: the mean and inverse deviation of a
    SkipSimplifiedLayerNormalization, never read, cost 5% of the demo's int4 decode step.
    """
    for node in graph:
        if node.op_type == op_type and node.domain == "com.microsoft":
            for value in node.outputs[1:]:
                if not value.uses() and not value.is_graph_output():
                    value.name = ""


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
    max_positions = _context_length(hf_config)
    rules = pattern.RewriteRuleSet([
        GroupQueryAttentionOnCache.rule(name, rotary, feeds, windows, max_positions)
        for name, rotary in (("GQA with rotary", True), ("GQA", False))
    ])
    count = rules.apply_to_model(model)
    packed = pattern.RewriteRuleSet([PackedQKV.rule()]).apply_to_model(model)
    common.RemoveUnusedNodesPass()(model)  # the mask and rotary angles the kernel computes itself
    log.info("GroupQueryAttention: %d layers, %d with packed QKV", count, packed)
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)


def _appends_in_kernel(model: ir.Model) -> bool:
    """Whether every layer appends to its cache inside GroupQueryAttention, so that genai may pass one
    buffer as both past and present."""
    presents = [value for value in model.graph.outputs if value.name.startswith("present.")]
    return bool(presents) and all(value.producer().op_type == "GroupQueryAttention" for value in presents)


def _cache_feeds(graph: ir.Graph, padded_batches: bool) -> CacheFeeds:
    """Insert the nodes computing ``CacheFeeds`` at the top of ``graph``; unused ones go with the unused nodes."""
    inputs = {value.name: value for value in graph.inputs}
    nodes: list[ir.Node] = []

    def add(op_type, node_inputs, **attributes) -> ir.Value:
        nodes.append(ir.node(op_type, node_inputs, attributes=attributes))
        return nodes[-1].outputs[0]

    def constant(array) -> ir.Value:
        return add("Constant", [], value=ir.tensor(np.asarray(array)))

    mask = inputs["attention_mask"]
    batch = add("Shape", [mask], start=0, end=1)
    tokens = add("Shape", [inputs["input_ids"]], start=1, end=2)
    total_sequence_length = add("Cast", [add("Squeeze", [add("Shape", [mask], start=1, end=2)])], to=ir.DataType.INT32)
    slot_bias = add("Where", [add("Cast", [mask], to=ir.DataType.BOOL), constant(np.float32(0)),
                              constant(np.finfo(np.float32).min)])  # finite: a fully padded row stays a number
    feeds = CacheFeeds(
        position_ids=inputs["position_ids"],
        seqlens_k=add("Expand", [add("Sub", [total_sequence_length, constant(np.int32(1))]), batch]),
        total_sequence_length=total_sequence_length,
        query_lengths=add("Cast", [add("Expand", [tokens, batch])], to=ir.DataType.INT32),
        padding_bias=add("Expand", [add("Unsqueeze", [slot_bias, constant([1, 2])]),
                                    add("Concat", [constant([1, 1]), tokens, constant([1])], axis=0)])
        if padded_batches else None,
    )
    graph.insert_before(graph.node(0), nodes)
    return feeds


def _context_length(hf_config) -> int:
    return getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", 2048)


def _write_genai_config(folder: Path, checkpoint: Checkpoint, shares_buffer: bool) -> list[str]:
    """onnxruntime-genai's description of the decoder (greedy search by default); returns the files written.

    ``shares_buffer``: genai allocates each layer's cache once at full length and passes it as both past and
    present, which the graph must write in place (GroupQueryAttention does; a Concat would not).
    """
    hf = checkpoint.config
    kv_heads, head_dim = kv_shape(hf)
    eos = hf.eos_token_id if hf.eos_token_id is not None else 0
    first_eos = eos[0] if isinstance(eos, list) else eos
    context = _context_length(hf)
    genai = {
        "model": {
            # genai's gpt2 type expects one combined past tensor per layer; its generic decoder reads ours.
            "type": "llama" if hf.model_type == "gpt2" else hf.model_type,
            "bos_token_id": hf.bos_token_id if hf.bos_token_id is not None else first_eos,
            "eos_token_id": eos,
            "pad_token_id": hf.pad_token_id if hf.pad_token_id is not None else first_eos,
            "vocab_size": hf.vocab_size,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": head_dim,
                "hidden_size": hf.hidden_size,
                "num_attention_heads": hf.num_attention_heads,
                "num_hidden_layers": hf.num_hidden_layers,
                "num_key_value_heads": kv_heads,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context, "min_length": 0,
            "past_present_share_buffer": shares_buffer, "early_stopping": True, "length_penalty": 1.0,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
    write_json(folder / GENAI_CONFIG, genai)
    # genai reads the tokenizer from the folder that holds genai_config.json.
    tokenizer_files = sorted(name for name in checkpoint.tokenizer_files if name in GENAI_TOKENIZER_FILES)
    for name in tokenizer_files:
        (folder / name).write_bytes(checkpoint.tokenizer_files[name])
    return [GENAI_CONFIG, *tokenizer_files]


class Runner:
    """Runs an onnx-target artifact on ONNX Runtime CPU, one call per forward step."""

    def __init__(self, artifact: Artifact):
        files = artifact.manifest["model_files"]

        def session(file_name: str):
            return cpu_session(artifact.file(file_name))

        if PREFILL_FILE in files:
            self.sessions = {"prefill": session(PREFILL_FILE), "decode": session(DECODE_FILE)}
        else:
            self.sessions = {"prefill": session(MODEL_FILE)}
        self.output_names = [output.name for output in self.sessions["prefill"].get_outputs()]

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        one_token = feeds["input_ids"].shape[1] == 1
        session = self.sessions["decode"] if one_token and "decode" in self.sessions else self.sessions["prefill"]
        return dict(zip(self.output_names, session.run(self.output_names, feeds)))
