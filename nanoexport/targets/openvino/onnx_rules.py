"""The openvino target's ONNX-side passes: edits of the canonical graph, run by the pipeline's pass manager
before OpenVINO's ONNX frontend reads it, that give the frontend and the CPU plugin the graph they handle best.

Each pass is a named function ``(ir.Model) -> int`` that changes the model in place, keeps its logits and
returns (and logs) how many places it changed. ``lowering.lowering_passes`` lists them in the order they run.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern

from nanoexport.passes.fusion import rebuilt_weight

log = logging.getLogger(__name__)

PAST_PREFIX = "past_key_values."  # the canonical graph's cache inputs
# Ops between the query's Reshape into heads and Attention that keep the head axis where it is.
HEAD_PRESERVING_OPS = ("RMSNormalization", "Transpose", "RotaryEmbedding")


def static_heads(model: ir.Model) -> int:
    """Reshape each attention's query, key and value into a constant number of heads; returns the count.

    The exporter reshapes ``[batch, seq, hidden]`` to ``[batch, seq, -1, head_dim]``. With the head count
    unknown, OpenVINO's ``Attention`` conversion assumes as many query heads as KV heads and fails (GQA),
    and openvino-genai's PagedAttention conversion leaves the heads of its output reshape unknown, so the CPU
    plugin runs the Transposes around attention instead of folding them (8 more nodes a step on the demo
    model). Shape inference knows the counts; writing them into the Reshapes gives OpenVINO the same
    knowledge, as PyTorch's frontend has it for optimum-intel's IRs.
    """
    # A walk, not a rule: the new shape constants are named by the graph's counter in attention order
    # (query, key, value), and a rule would visit the Reshapes in graph order (GPT-2 reshapes the query last).
    reshapes = [_head_reshape(value) for node in model.graph if node.op_type == "Attention"
                for value in map(_new_heads, node.inputs[:3])]
    changed = 0
    for reshape in filter(None, reshapes):
        heads, head_dim = reshape.outputs[0].shape[2:]
        shape = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([0, 0, heads, head_dim], np.int64))})
        model.graph.insert_before(reshape, [shape])
        reshape.replace_input_with(1, shape.outputs[0])
        reshape.attributes.pop("allowzero", None)  # 0 now means "copy batch and sequence from the input"
        changed += 1
    log.info("static_heads: %d", changed)
    return changed


def _new_heads(value: ir.Value) -> ir.Value:
    """An attention input without the cache: a Concat of the past and the new heads gives the new heads."""
    producer = value.producer()
    return producer.inputs[-1] if producer is not None and producer.op_type == "Concat" else value


def _head_reshape(value: ir.Value) -> ir.Node | None:
    """The Reshape of ``[batch, seq, hidden]`` into ``[batch, seq, heads, head_dim]`` that ``value`` comes from."""
    node = value.producer()
    while node is not None and node.op_type in HEAD_PRESERVING_OPS:
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Reshape":
        return None
    flat, heads = node.inputs[0].shape, node.outputs[0].shape
    if flat is None or heads is None or flat.rank() != 3 or heads.rank() != 4:
        return None
    if heads[:2] != flat[:2] or not all(isinstance(d, int) for d in heads[2:]):
        return None
    return node


class BatchFromInputIds(pattern.RewriteRuleClassBase):
    """``Shape(past_key_values.*)[0:1]`` -> ``Shape(input_ids)[0:1]``: the batch size read from the tokens.

    The exporter takes the batch dimension from whichever input it met first, a ``past_key_values`` one.
    openvino-genai's PagedAttention conversion (its default on CPU) removes the cache inputs with the
    attention that reads them, and a Reshape still reading the batch from a removed input fails the
    conversion, so genai falls back to the slower stateful pipeline.
    """

    def __init__(self, input_ids: ir.Value):
        super().__init__("batch from input_ids")
        self.input_ids = input_ids

    def pattern(self, op, past):
        return op.Shape(past, _allow_other_attributes=True, _outputs=["batch"])

    def check(self, context, past, batch, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if past.name is None or not past.name.startswith(PAST_PREFIX):
            return result.fail("only the shape of a past_key_values input", past)
        attributes = batch.producer().attributes
        if attributes.get_int("start", 0) != 0 or attributes.get_int("end") != 1:
            return result.fail("only its batch dimension, [0:1]", batch)
        return result

    def rewrite(self, op, batch, **_):
        shape = batch.producer()
        # The node keeps its name: OpenVINO names the layers it converts the node into after it.
        return op.Shape(self.input_ids, _name=shape.name,
                        **{name: attr.value for name, attr in shape.attributes.items()})


def batch_from_input_ids(model: ir.Model) -> int:
    """Read the batch size from ``input_ids`` where the graph reads it from a past input (see
    ``BatchFromInputIds``); returns the count."""
    input_ids = next(value for value in model.graph.inputs if value.name == "input_ids")
    count = pattern.RewriteRuleSet([BatchFromInputIds.rule(input_ids=input_ids)]).apply_to_model(model)
    log.info("batch_from_input_ids: %d", count)
    return count


class OutputMajorWeight(pattern.RewriteRuleClassBase):
    """MatMul by weights stored ``[K, N]`` -> MatMul by the Transpose of the same weights stored ``[N, K]``.

    The canonical graph stores a linear's weights input-major, ``[K, N]``; the CPU plugin's FullyConnected
    reads them output-major and, given ours, keeps a transposed copy beside the mapped .bin: a prompt and a
    step of the Qwen2.5-0.5B config peaked at 3,713 MiB against 3,028 MiB for optimum-intel's output-major
    IR (the 686 MiB are about its decoder weights in bf16), and at 3,028 MiB once stored output-major. For
    blocked integers (blocks along K: ``[N, K / block, block]`` in the plugin's compressed FullyConnected,
    optimum-intel's layout) the int4 config peaked at 1,464 MiB input-major, 1,441 MiB output-major,
    optimum-intel's IR at 1,422 MiB. Every weight, integer and scale stays the same; only their order in the
    .bin changes. The frontend folds the Transpose into the MatMul.
    """

    def __init__(self, name: str, dequantized: bool, cast: bool):
        super().__init__(name)
        self.dequantized, self.cast = dequantized, cast

    def pattern(self, op, x, weight):
        if self.dequantized:
            weight = op.DequantizeLinear(weight, _allow_other_inputs=True, _outputs=["dequantized"])
            if self.cast:  # fp16 scales
                weight = op.Cast(weight, _outputs=["cast"])
        return op.MatMul(x, weight, _outputs=["product"])

    def check(self, context, weight, dequantized=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        read = dequantized if dequantized is not None else weight
        constants = dequantized.producer().inputs if dequantized is not None else [weight]
        if any(value is None or value.const_value is None for value in constants) or not (
                dequantized is not None or weight.is_initializer()):
            return result.fail("weights, scales and zero points must be initializers", read)
        if weight.shape is None or weight.shape.rank() != 2 or any(v.shape.rank() > 2 for v in constants):
            return result.fail("a 2-D weight only", weight)
        if len(read.uses()) != 1:
            return result.fail("the weight must feed this MatMul alone", read)
        return result

    def rewrite(self, op, x, weight, product, dequantized=None, cast=None, **_):
        def output_major(value: ir.Value) -> ir.Value:  # per-channel 1-D scales stay as they are
            source = value.const_value
            if len(source.shape) != 2:
                return op.initializer(ir.tensor(source.numpy()), name=f"{value.name}.output_major")
            # Transposed as it is written: done now, a packed int4 weight would be held unpacked, a byte each.
            transposed = ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(source.numpy().T)), dtype=source.dtype,
                                       shape=ir.Shape(list(reversed(source.shape))), name=f"{value.name}.output_major")
            return op.initializer(transposed, name=transposed.name)

        axis = None if dequantized is None else 1 - dequantized.producer().attributes.get_int("axis", 1) % 2
        stored = rebuilt_weight(op, weight, dequantized, cast, output_major, axis)
        product_major = op.MatMul(x, op.Transpose(stored, perm=[1, 0]))
        product_major.shape, product_major.type = product.shape, product.type
        return product_major


def output_major_weights(model: ir.Model) -> int:
    """Store each linear's weights, float or blocked integers, output-major (see ``OutputMajorWeight``);
    returns how many. NF4 weights, a codebook lookup rather than a DequantizeLinear, stay input-major."""
    rules = pattern.RewriteRuleSet([
        OutputMajorWeight.rule(f"output-major {form} weight", dequantized=form != "float", cast=form == "cast")
        for form in ("cast", "dequantized", "float")
    ])
    count = rules.apply_to_model(model)
    if count:
        common.RemoveUnusedNodesPass()(model)
    log.info("output_major_weights: %d", count)
    return count
