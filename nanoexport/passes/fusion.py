"""Fusions to canonical ONNX ops, declared as pattern/replacement rules on onnx-ir (onnxscript's rewriter).

The dynamo exporter at opset 23 already emits ``RMSNormalization``, ``RotaryEmbedding`` and ``Attention``
for most families; these rules take the rest of the way, and fuse what the TorchScript exporter (Optimum's
ONNX files) writes op by op.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern

from nanoexport.passes.initializers import lazy_initializer, new_initializer

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


class EagerAttention(pattern.RewriteRuleClassBase):
    """Attention spelled out (``softmax(q @ k^T * scale [softcapped] + mask) @ v``) -> ``Attention``.

    Families that keep eager attention for a soft cap (Gemma 2: ``cap * tanh(scores / cap)``, applied
    before the mask, as ``Attention``'s ``softcap`` is) export it op by op.
    """

    def __init__(self, name: str, softcapped: bool):
        super().__init__(name)
        self.softcapped = softcapped

    def pattern(self, op, query, key, value, scale, cap, mask):
        scores = op.Mul(op.MatMul(query, op.Transpose(key, perm=[0, 1, 3, 2])), scale)
        if self.softcapped:
            scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
        return op.MatMul(op.Softmax(op.Add(scores, mask), axis=-1), value)

    def check(self, context, query, key, value, scale, cap, mask, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        constants = (scale, cap) if self.softcapped else (scale,)
        for constant in constants:
            if constant.const_value is None or constant.const_value.size != 1:
                return result.fail("scale and cap must be scalar constants", constant)
        return _check_operands(result, query, key, value, mask)

    def rewrite(self, op, query, key, value, scale, cap, mask, **_):
        softcap = float(cap.const_value.numpy().item()) if self.softcapped else 0.0
        return op.Attention(query, key, value, mask, scale=float(scale.const_value.numpy().item()), softcap=softcap)


class SplitScaleAttention(pattern.RewriteRuleClassBase):
    """Attention as torch's TorchScript exporter writes ``scaled_dot_product_attention`` (Optimum's ONNX files)
    -> ``Attention``.

    The query and the transposed key are each scaled by the square root of the scale before their product,
    the mask is added, and with ``nan_guarded`` the softmax's NaNs (rows with every position masked) become
    zeros. ``Attention`` gives such rows no NaN-free value either way; their outputs are padding that no
    later position reads. A mask built as ``Where(allowed, 0, -inf)`` is passed as its boolean condition,
    the form the dynamo capture gives ``Attention``, so that the targets' lowerings see one canonical mask.
    """

    def __init__(self, name: str, nan_guarded: bool):
        super().__init__(name)
        self.nan_guarded = nan_guarded

    def pattern(self, op, query, key, value, query_scale, key_scale, mask, zero):
        key_transposed = op.Mul(op.Transpose(key, perm=[0, 1, 3, 2]), key_scale)
        weights = op.Softmax(op.Add(op.MatMul(op.Mul(query, query_scale), key_transposed), mask), axis=-1)
        if self.nan_guarded:
            weights = op.Where(op.IsNaN(weights), zero, weights)
        return op.MatMul(weights, value)

    def check(self, context, query, key, value, query_scale, key_scale, mask, zero=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for constant in (query_scale, key_scale, *([zero] if self.nan_guarded else [])):
            if constant.const_value is None or constant.const_value.size != 1:
                return result.fail("the scales and the NaN replacement must be scalar constants", constant)
        if self.nan_guarded and zero.const_value.numpy().item() != 0:
            return result.fail("NaNs must become zeros", zero)
        return _check_operands(result, query, key, value, mask)

    def rewrite(self, op, query, key, value, query_scale, key_scale, mask, **_):
        scale = float(query_scale.const_value.numpy().item()) * float(key_scale.const_value.numpy().item())
        return op.Attention(query, key, value, _boolean_condition(mask) or mask, scale=scale)


def _check_operands(result: pattern.MatchResult, query: ir.Value, key: ir.Value, value: ir.Value,
                    mask: ir.Value) -> pattern.MatchResult:
    """What ``Attention`` takes from a decomposed attention: 4-D query, key and value, an additive mask."""
    for tensor in (query, key, value):
        if tensor.shape is None or tensor.shape.rank() != 4:
            return result.fail("query, key and value must be 4-D [batch, heads, seq, head_dim]", tensor)
    if mask.dtype != query.dtype:
        return result.fail("the mask must be additive, of the query's type", mask)
    return result


def _boolean_condition(mask: ir.Value) -> ir.Value | None:
    """``allowed`` of an additive mask built as ``Where(allowed, 0, -inf)``, else None."""
    node = mask.producer()
    if node is None or node.op_type != "Where" or node.domain not in ("", "ai.onnx"):
        return None
    allowed, kept, hidden = node.inputs
    if kept.const_value is None or hidden.const_value is None or kept.const_value.size != 1 \
            or hidden.const_value.size != 1:
        return None
    if kept.const_value.numpy().item() != 0 or hidden.const_value.numpy().item() != -np.inf:
        return None
    return allowed


class RMSNormByParts(pattern.RewriteRuleClassBase):
    """``scale * x * (1 / sqrt(mean(x^2) + eps))`` over the last axis -> ``RMSNormalization``.

    How torch's TorchScript exporter writes transformers' RMS norms (onnxscript's rule wants a ``Reciprocal``
    and a ReduceMean that names every attribute).
    """

    def pattern(self, op, x, axes, epsilon, one, scale):
        mean_square = op.ReduceMean(op.Pow(x, 2.0), axes, _allow_other_attributes=True, _outputs=["mean_square"])
        return op.Mul(scale, op.Mul(x, op.Div(one, op.Sqrt(op.Add(mean_square, epsilon)))))

    def check(self, context, x, axes, epsilon, one, scale, mean_square, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.shape is None or x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            return result.fail("x must be a float tensor of known rank", x)
        attributes = mean_square.producer().attributes
        if attributes.get_int("keepdims", 1) != 1 or attributes.get_int("noop_with_empty_axes", 0) != 0:
            return result.fail("the mean must keep its axis", mean_square)
        if axes.const_value is None or axes.const_value.numpy().tolist() not in ([-1], [x.shape.rank() - 1]):
            return result.fail("the mean must run over the last axis only", axes)
        for constant in (epsilon, one):
            if constant.const_value is None or constant.const_value.size != 1:
                return result.fail("epsilon and the numerator must be scalar constants", constant)
        if one.const_value.numpy().item() != 1:
            return result.fail("the numerator must be 1", one)
        if scale.const_value is None or scale.shape is None or scale.shape.rank() != 1 \
                or scale.shape[0] != x.shape[x.shape.rank() - 1]:
            return result.fail("the scale must be a constant per feature", scale)
        return result

    def rewrite(self, op, x, epsilon, scale, **_):
        return op.RMSNormalization(x, scale, axis=-1, epsilon=float(epsilon.const_value.numpy().item()))


class TanhGelu(pattern.RewriteRuleClassBase):
    """GELU's tanh approximation written out (GPT-2's ``gelu_new``) -> ``Gelu(approximate="tanh")``.

    0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
    """

    def pattern(self, op, x):
        inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, 3.0), 0.044715)), math.sqrt(2 / math.pi))
        return op.Mul(op.Mul(x, 0.5), op.Add(op.Tanh(inner), 1.0))

    def rewrite(self, op, x, **_):
        return op.Gelu(x, approximate="tanh")


class SiLU(pattern.RewriteRuleClassBase):
    """``x * Sigmoid(x)``, the gate activation of SwiGLU MLPs -> ``Swish`` (opset 24), one kernel."""

    def __init__(self, name: str, sigmoid_first: bool):
        super().__init__(name)
        self.sigmoid_first = sigmoid_first

    def pattern(self, op, x):
        return op.Mul(op.Sigmoid(x), x) if self.sigmoid_first else op.Mul(x, op.Sigmoid(x))

    def rewrite(self, op, x, **_):
        return op.Swish(x, alpha=1.0)


class LinearGemm(pattern.RewriteRuleClassBase):
    """``Gemm(x, W[, b])`` with a constant weight matrix ``W`` ``[K, N]`` (GPT-2's Conv1D) -> ``MatMul(x, W)
    [+ b]``: the linear layer as the canonical graph holds every other family's, which quantization and the
    targets' kernels look for (left a Gemm, GPT-2's projections were silently kept float by ``--quant int4``)."""

    def __init__(self, name: str, with_bias: bool):
        super().__init__(name)
        self.with_bias = with_bias

    def pattern(self, op, x, weight, bias):
        operands = (x, weight, bias) if self.with_bias else (x, weight)
        return op.Gemm(*operands, _allow_other_attributes=True, _outputs=["output"])

    def check(self, context, x, weight, output, bias=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        attributes = output.producer().attributes
        if attributes.get_float("alpha", 1.0) != 1.0 or attributes.get_float("beta", 1.0) != 1.0:
            return result.fail("alpha and beta must be 1", output)
        if attributes.get_int("transA", 0) or attributes.get_int("transB", 0):
            return result.fail("neither operand may be transposed", output)
        if not _is_weight_matrix(weight) or (bias is not None and bias.const_value is None):
            return result.fail("the weight and bias must be constants", weight)
        return result

    def rewrite(self, op, x, weight, bias=None, **_):
        product = op.MatMul(x, weight)
        return product if bias is None else op.Add(product, bias)


SWISH_OPSET = 24
FUSION_RULES = pattern.RewriteRuleSet([
    TanhGelu.rule(),
    LinearGemm.rule("linear gemm with bias", with_bias=True),
    LinearGemm.rule("linear gemm", with_bias=False),
    SiLU.rule("silu", sigmoid_first=False),
    SiLU.rule("silu, sigmoid first", sigmoid_first=True),
    EagerAttention.rule("softcapped eager attention", softcapped=True),
    EagerAttention.rule("eager attention", softcapped=False),
    SplitScaleAttention.rule("split-scale attention, NaN-guarded", nan_guarded=True),
    SplitScaleAttention.rule("split-scale attention", nan_guarded=False),
    *RMSNormByParts.rule().commute(),
    AttentionOnSharedKVHeads.rule(),
])
MAX_ROUNDS = 4  # a rewrite can expose another (eager attention first, then its KV repeat)


def _is_weight_matrix(value: ir.Value) -> bool:
    return value.const_value is not None and value.shape is not None and value.shape.rank() == 2


def _merged_name(names: list[str]) -> str:
    """``a.q_proj.weight.T``, ``a.k_proj.weight.T`` -> ``a.q_proj+k_proj.weight.T``: one name, every part."""
    parts = [name.split(".") for name in names]
    prefix = 0
    while all(len(p) > prefix + 1 and p[prefix] == parts[0][prefix] for p in parts):
        prefix += 1
    suffix = 0
    while all(len(p) > prefix + suffix + 1 and p[-1 - suffix] == parts[0][-1 - suffix] for p in parts):
        suffix += 1
    middles = [".".join(p[prefix : len(p) - suffix]) for p in parts]
    return ".".join([*parts[0][:prefix], "+".join(middles), *parts[0][len(parts[0]) - suffix :]])


def _concatenation(parts: list[ir.TensorProtocol]):
    """The merged weight when it is read: the parts side by side, read (from the checkpoint) only then."""
    return lambda: ir.tensor(np.concatenate([part.numpy() for part in parts], axis=1))


def merge_projections(model: ir.Model) -> None:
    """MatMuls of one input by several weight matrices -> one MatMul by the concatenated weights, then Split.

    Merges the query/key/value projections and the gate/up projections: one larger kernel call per token
    instead of several small ones. A constant bias Add after a part (Qwen2's query, key and value) joins
    the merge as one Add of the concatenated biases before the Split, zeros for a part without one. Sibling
    MatMuls that share an input have no single root, which onnxscript's pattern matcher cannot anchor, so
    this groups them by their input directly. The merged weights are computed when read (by a quantizer or a
    writer), one at a time: merging holds no weights in memory.
    """
    graph = model.graph
    siblings: dict[ir.Value, list[ir.Node]] = {}
    for node in graph:
        if node.op_type == "MatMul" and _is_weight_matrix(node.inputs[1]):
            siblings.setdefault(node.inputs[0], []).append(node)
    merged_count = 0
    for x, nodes in siblings.items():
        if len(nodes) < 2:
            continue
        weights = [node.inputs[1] for node in nodes]
        name = _merged_name([weight.name for weight in weights])
        merged = lazy_initializer(graph, name, _concatenation([w.const_value for w in weights]), weights[0].dtype,
                                  [weights[0].shape[0], sum(w.shape[1] for w in weights)])
        sizes = new_initializer(graph, f"{name}/sizes", np.array([w.shape[1] for w in weights], np.int64))
        tape = ir.tape.Tape()
        projection = tape.op("MatMul", [x, merged])
        biased = [_bias_add(node) for node in nodes]
        if any(biased):
            dtype = weights[0].dtype.numpy()  # not the weight's data: reading it would load it
            bias = new_initializer(graph, f"{name}/bias", np.concatenate([
                found[1].const_value.numpy() if found else np.zeros(weight.shape[1], dtype)
                for found, weight in zip(biased, weights)
            ]))
            projection = tape.op("Add", [projection, bias])
        parts = tape.op_multi_out("Split", [projection, sizes], attributes={"axis": -1}, num_outputs=len(nodes))
        graph.insert_before(nodes[0], tape.nodes)
        for node, found, part in zip(nodes, biased, parts):
            add = found[0] if found else None
            old = (add or node).outputs[0]
            part.shape, part.type = old.shape, old.type
            old.replace_all_uses_with(part, replace_graph_outputs=True)
            part.name, old.name = old.name, f"{old.name}.unmerged"
            if add is not None:
                graph.remove(add, safe=True)
            graph.remove(node, safe=True)
        merged_count += 1
    log.info("merge_projections: %d groups", merged_count)


def _bias_add(matmul: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """The Add of a constant 1-D bias, one per output feature, that alone reads ``matmul``'s output, and the bias."""
    product = matmul.outputs[0]
    uses = product.uses()
    if len(uses) != 1 or product.is_graph_output() or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    bias = add.inputs[1] if add.inputs[0] is product else add.inputs[0]
    if (bias.const_value is None or bias.dtype != product.dtype or bias.shape is None or bias.shape.rank() != 1
            or bias.shape[0] != matmul.inputs[1].shape[1]):
        return None
    return add, bias


def rebuilt_weight(op, weight: ir.Value, dequantized: ir.Value | None, cast: ir.Value | None,
                   constant: Callable[[ir.Value], ir.Value], axis: int | None = None) -> ir.Value:
    """In a rewrite, a weight matched as a float initializer, or as ``DequantizeLinear`` [-> ``Cast``] of
    initializers, built again with each of its constants replaced by ``constant(value)``; ``axis``, when
    given, replaces the DequantizeLinear's (a transposed layout blocks along the other axis)."""
    if dequantized is None:
        return constant(weight)
    node = dequantized.producer()
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    if axis is not None:
        attributes["axis"] = axis
    rebuilt = op.DequantizeLinear(*map(constant, node.inputs), **attributes)
    if cast is not None:
        rebuilt = op.Cast(rebuilt, to=cast.producer().attributes.get_int("to"))
    return rebuilt


class UnmergedProjection(pattern.RewriteRuleClassBase):
    """A Split of one MatMul by merged constant weights -> a MatMul per part, by its columns of the weights.

    ``merge_projections`` undone, for runtimes whose kernels gain nothing from it: ONNX Runtime and the
    OpenVINO CPU plugin run the Split as copies of every part, and OpenVINO fuses the SwiGLU gate's Swish
    into a FullyConnected only when the gate has a MatMul of its own. Blocked weights (``DequantizeLinear``
    along the input rows, then an optional Cast) are cut into whole columns, so every integer and scale
    stays what it was; a merged bias Add, into an Add of its part per projection.
    """

    def __init__(self, name: str, parts: int, dequantized: bool, cast: bool, biased: bool):
        super().__init__(name)
        self.parts, self.dequantized, self.cast, self.biased = parts, dequantized, cast, biased

    def pattern(self, op, x, weight, sizes, bias):
        if self.dequantized:
            weight = op.DequantizeLinear(weight, _allow_other_inputs=True, _outputs=["dequantized"])
            if self.cast:
                weight = op.Cast(weight, _outputs=["cast"])
        merged = op.MatMul(x, weight, _outputs=["merged"])
        if self.biased:
            merged = op.Add(merged, bias, _outputs=["merged_bias"])
        return op.Split(merged, sizes, _allow_other_attributes=True, _outputs=self.parts)

    def check(self, context, x, weight, sizes, merged, bias=None, merged_bias=None, dequantized=None,
              **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        split = (merged_bias or merged).uses()[0].node
        if split.attributes.get_int("axis", 0) not in (-1, merged.shape.rank() - 1 if merged.shape else -1):
            return result.fail("the split must cut the output features", split)
        if bias is not None and (bias.shape is None or bias.shape.rank() != 1):
            return result.fail("a 1-D bias only", bias)
        constants = [weight, sizes, *(dequantized.producer().inputs[1:] if dequantized is not None else []),
                     *([bias] if bias is not None else [])]
        if any(value is None or value.const_value is None for value in constants):
            return result.fail("the weights and split sizes must be initializers", split)
        if weight.shape is None or weight.shape.rank() != 2:
            return result.fail("a 2-D weight only", weight)
        if dequantized is not None and dequantized.producer().attributes.get_int("axis", 1) not in (0, -2):
            return result.fail("blocks must run along the input rows, so that columns are whole", dequantized)
        return result

    def rewrite(self, op, x, weight, sizes, merged, bias=None, merged_bias=None, dequantized=None, cast=None,
                **_):
        bounds = np.cumsum([0, *sizes.const_value.numpy().tolist()]).tolist()
        outputs = []
        for part, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            def columns(value: ir.Value, part=part, start=start, stop=stop) -> ir.Value:
                name = f"{value.name}.part{part}"
                return op.initializer(_column_slice(value.const_value, start, stop, name), name=name)

            outputs.append(op.MatMul(x, rebuilt_weight(op, weight, dequantized, cast, columns)))
            if bias is not None:
                outputs[-1] = op.Add(outputs[-1], columns(bias))
        for new, old in zip(outputs, (merged_bias or merged).uses()[0].node.outputs):
            new.shape, new.type = old.shape, old.type
            if bias is not None:  # the MatMul before the bias Add has the same shape
                product = new.producer().inputs[0]
                product.shape, product.type = old.shape, old.type
        return outputs


def _column_slice(source: ir.TensorProtocol, start: int, stop: int, name: str) -> ir.LazyTensor:
    """Columns ``start:stop`` of the last axis (of weights ``[K, N]``, scales and zero points ``[K / block, N]``,
    biases ``[N]``), cut when the tensor is written: the merged weight is then the only copy held."""
    shape = ir.Shape([*source.shape[:-1], stop - start])
    return ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(source.numpy()[..., start:stop])),
                         dtype=source.dtype, shape=shape, name=name)


def unmerge_projections(model: ir.Model) -> int:
    """Merged projections still split -> a MatMul per part (see ``UnmergedProjection``); returns how many.

    A target calls it after lowering whatever reads a merged projection packed (ONNX Runtime's
    GroupQueryAttention reads query, key and value from one). The merged weights go with the merge, so that
    a weights file written next holds each projection once.
    """
    rules = pattern.RewriteRuleSet([
        UnmergedProjection.rule(f"{parts}-way {form} projection{' with bias' if biased else ''}", parts=parts,
                                dequantized=form != "float", cast=form == "cast", biased=biased)
        for parts in (2, 3) for form in ("float", "dequantized", "cast") for biased in (True, False)
    ])
    count = rules.apply_to_model(model)
    if count:
        common.RemoveUnusedNodesPass()(model)
    log.info("unmerge_projections: %d", count)
    return count


def fuse(model: ir.Model) -> None:
    """Rewrite the subgraphs ``FUSION_RULES`` match into canonical ops, keeping the logits."""
    total = 0
    for _ in range(MAX_ROUNDS):
        count = FUSION_RULES.apply_to_model(model)
        total += count
        if not count:
            break
    if any(node.op_type == "Swish" and node.domain in ("", "ai.onnx") for node in model.graph):
        model.opset_imports[""] = max(model.opset_imports.get("", SWISH_OPSET), SWISH_OPSET)
    log.info("fuse: %d rewrites", total)
