"""Fusions to canonical ONNX ops, declared as pattern/replacement rules on onnx-ir (onnxscript's rewriter).

The dynamo exporter at opset 23 already emits ``RMSNormalization``, ``RotaryEmbedding`` and ``Attention``
for most families; these rules take the rest of the way.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnxscript.rewriter import pattern

log = logging.getLogger(__name__)


def _repeated_kv(op, kv, expanded_shape, merged_shape):
    """transformers' ``repeat_kv``: [B, kv_heads, T, D] -> [B, kv_heads * n_rep, T, D]."""
    return op.Reshape(op.Expand(op.Unsqueeze(kv, [2]), expanded_shape), merged_shape, _allow_other_attributes=True)


class AttentionOnSharedKVHeads(pattern.RewriteRuleClassBase):
    """Attention over KV heads repeated to the query head count -> Attention on the KV heads themselves.

    ``Attention`` (opset 23) takes fewer KV heads than query heads when the query head count is a
    multiple of them (grouped-query attention), so the repeat and its copy of the cache disappear.
    """

    def pattern(self, op, query, key, value, mask, key_expanded, key_merged, value_expanded, value_merged):
        return op.Attention(
            query,
            _repeated_kv(op, key, key_expanded, key_merged),
            _repeated_kv(op, value, value_expanded, value_merged),
            mask,
            _allow_other_attributes=True,
            _outputs=["attention"],
        )

    def check(self, context, query, key, value, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for tensor in (query, key, value):
            if tensor.shape is None or tensor.shape.rank() != 4:
                return result.fail("query, key and value must be 4-D [batch, heads, seq, head_dim]", tensor)
        query_heads, key_heads, value_heads = query.shape[1], key.shape[1], value.shape[1]
        if not all(isinstance(heads, int) for heads in (query_heads, key_heads, value_heads)):
            return result.fail("head counts must be static")
        if key_heads != value_heads or query_heads % key_heads:
            return result.fail(f"{query_heads} query heads are not a multiple of {key_heads} KV heads")
        return result

    def rewrite(self, op, query, key, value, mask, attention, **_):
        attributes = attention.producer().attributes
        return op.Attention(query, key, value, mask, **{name: attr.value for name, attr in attributes.items()})


FUSION_RULES = pattern.RewriteRuleSet([AttentionOnSharedKVHeads.rule()])


def fuse(model: ir.Model) -> None:
    """Rewrite the subgraphs ``FUSION_RULES`` match into canonical ops, keeping the logits."""
    count = FUSION_RULES.apply_to_model(model)
    log.info("fuse: %d rewrites", count)
