"""The openvino target's OpenVINO-side edits of the model the ONNX frontend read, before it is saved: the
stateful cache openvino-genai expects, the attention forms the CPU plugin's fused kernels want, NF4
constants, quantized embedding tables in the form its compressed Gather reads, the compile options the IR
carries, and names that do not depend on what ran before.

Pattern edits are ``openvino.passes.MatcherPass`` classes (a ``WrapType`` pattern and a rewrite of what it
matched), each run on its own by a ``Manager`` through a function that returns how many places it changed;
``lowering.lower`` calls them in order. Edits that are not a pattern over nodes stay plain functions.
"""

from __future__ import annotations

import re

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from openvino._offline_transformations import apply_make_stateful_transformation
from openvino.passes import AnyInput, Manager, Matcher, MatcherPass, Or, WrapType, consumers_count, type_matches

from nanoexport.calibration.blocks import NF4_CODEBOOK
from nanoexport.config import QuantConfig
from nanoexport.errors import NanoexportError
from nanoexport.targets.openvino.onnx_rules import PAST_PREFIX

PRESENT_PREFIX = "present."
ATTENTION = "opset13.ScaledDotProductAttention"
GATHERS = ["opset1.Gather", "opset7.Gather", "opset8.Gather"]
# Weight types that leave the model in float: its KV cache is kept in f16 rather than the CPU plugin's u8.
FLOAT_WEIGHTS = ("none", "fp16")
AUTO_NAME = re.compile(r"(?P<type>[A-Za-z0-9]+)_\d+(?P<output>(\.\d+)?)")


class RewritePass(MatcherPass):
    """A MatcherPass that counts its rewrites: a subclass builds its pattern, keeping the pattern nodes it
    reads back, and rewrites each match (``matched`` maps those nodes to the outputs they matched), or
    returns False where a condition the pattern cannot state fails."""

    def __init__(self):
        super().__init__()
        self.count = 0

        def callback(matcher: Matcher) -> bool:
            changed = self.rewrite(matcher.get_pattern_value_map())
            self.count += changed
            return changed

        self.register_matcher(Matcher(self.pattern(), type(self).__name__), callback)

    def pattern(self) -> ov.Node:
        raise NotImplementedError

    def rewrite(self, matched: dict[ov.Node, ov.Output]) -> bool:
        raise NotImplementedError


def _run(model: ov.Model, rewrite_pass: RewritePass) -> int:
    """Run ``rewrite_pass`` over ``model`` (in topological order, as GraphRewrite does); returns its count."""
    manager = Manager()
    manager.register_pass(rewrite_pass)
    manager.run_passes(model)
    model.validate_nodes_and_infer_types()
    return rewrite_pass.count


def make_stateful(model: ov.Model) -> None:
    """Turn the explicit cache into ReadValue/Assign states, as optimum-intel does for openvino-genai.

    ``beam_idx`` (int32 ``[batch]``) selects which cache row each batch row continues from: genai's beam
    search reorders the cache through it. New states start empty: ``[batch, kv_heads, 0, head_dim]``.
    """
    # Not a pattern: it adds a model input and reorders every past input, then hands them to OpenVINO's
    # own stateful transformation.
    past = [value for value in model.inputs if value.get_any_name().startswith(PAST_PREFIX)]
    if not past:
        raise NanoexportError("the graph has no past_key_values inputs; this graph is not in canonical form")
    batch = model.input("input_ids").get_partial_shape()[0]
    beam_idx = ops.parameter(ov.PartialShape([batch]), ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    model.add_parameters([beam_idx])
    for value in past:
        users = value.get_target_inputs()
        reordered = ops.gather(value, beam_idx, ops.constant(np.int64(0)))
        for user in users:
            user.replace_source_output(reordered.output(0))
    model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(model, {value.get_any_name(): present_name(value.get_any_name())
                                               for value in past})
    batch_of_input_ids = ops.gather(ops.shape_of(model.input("input_ids"), "i64"),
                                    ops.constant(np.array([0], np.int64)), ops.constant(np.int64(0)))
    _run(model, EmptyInitialState(batch_of_input_ids.output(0)))


def present_name(past_name: str) -> str:
    return PRESENT_PREFIX + past_name.removeprefix(PAST_PREFIX)


class EmptyInitialState(RewritePass):
    """Each ReadValue starts from zeros of ``[batch of input_ids, kv_heads, 0, head_dim]``."""

    def __init__(self, batch: ov.Output):
        self.batch = batch
        super().__init__()

    def pattern(self) -> ov.Node:
        self.state = WrapType(["opset3.ReadValue", "opset6.ReadValue"])
        return self.state

    def rewrite(self, matched) -> bool:
        state = matched[self.state].get_node()
        _, kv_heads, _, head_dim = state.get_output_partial_shape(0)
        rest = ops.constant(np.array([kv_heads.get_length(), 0, head_dim.get_length()], np.int64))
        zeros = ops.broadcast(ops.constant(np.zeros((), state.get_output_element_type(0).to_dtype())),
                              ops.concat([self.batch, rest], 0))
        state.set_arguments([zeros])
        return True


class KvHeadsBroadcast(RewritePass):
    """KV heads repeated for attention by Tile (then Reshape) -> by a bidirectional Broadcast (see
    ``broadcast_kv_heads``). Same values: the Tile repeats only axes of length 1."""

    def pattern(self) -> ov.Node:
        self.tile = WrapType("opset1.Tile", [AnyInput(), WrapType("opset1.Constant")])
        return WrapType("opset1.Reshape", [self.tile, AnyInput()], _is_attention_key_or_value)

    def rewrite(self, matched) -> bool:
        tile = matched[self.tile].get_node()
        if not _repeats_unit_axes(tile):
            return False
        repeats = tile.input_value(1).get_node().get_data().astype(np.int64)
        broadcast = ops.broadcast(tile.input_value(0), ops.constant(repeats), broadcast_spec="BIDIRECTIONAL")
        tile.output(0).replace(broadcast.output(0))
        return True


def _repeats_unit_axes(tile: ov.Node) -> bool:
    """Whether ``tile``, by constant repeats, repeats only axes of length 1 (so Broadcast is the same)."""
    shape = tile.input_value(0).get_partial_shape()
    return all(count == 1 or (shape[axis].is_static and shape[axis].get_length() == 1)
               for axis, count in enumerate(tile.input_value(1).get_node().get_data()))


def _is_attention_key_or_value(value: ov.Output) -> bool:
    return any(user.get_node().get_type_name() == "ScaledDotProductAttention" and user.get_index() in (1, 2)
               for user in value.get_target_inputs())


def broadcast_kv_heads(model: ov.Model) -> int:
    """Repeat KV heads for grouped-query attention with Broadcast instead of Tile; returns the count.

    The frontend's ``Attention`` repeats them with Unsqueeze -> Tile -> Reshape. The CPU plugin fuses the
    cache (ReadValue -> Gather -> Concat -> Assign) into its attention kernel, which then appends in place
    instead of copying the cache each step, only when the repeat is a bidirectional Broadcast, the form
    PyTorch's ``repeat_kv`` converts to.
    """
    return _run(model, KvHeadsBroadcast())


def _mask(attention: ov.Output) -> ov.Output | None:
    node = attention.get_node()
    return node.input_value(3) if node.get_input_size() >= 4 else None


def _has_boolean_mask(attention: ov.Output) -> bool:
    mask = _mask(attention)
    return mask is not None and mask.get_element_type() == ov.Type.boolean


def _has_float_mask(attention: ov.Output) -> bool:
    mask = _mask(attention)  # a boolean one is -inf inside the kernel
    return mask is not None and mask.get_element_type() != ov.Type.boolean


class AdditiveMask(RewritePass):
    """Attention with a boolean mask -> with the float mask Select(mask, 0, -inf), one per mask (see
    ``additive_attention_mask``)."""

    def __init__(self):
        self.additive: dict[ov.Output, ov.Output] = {}  # one float mask for each boolean one
        super().__init__()

    def pattern(self) -> ov.Node:
        self.attention = WrapType(ATTENTION, _has_boolean_mask)
        return self.attention

    def rewrite(self, matched) -> bool:
        attention = matched[self.attention].get_node()
        mask = attention.input_value(3)
        if mask not in self.additive:
            dtype = attention.get_output_element_type(0).to_dtype()
            self.additive[mask] = ops.select(mask, ops.constant(np.array(0, dtype)),
                                             ops.constant(np.array(-np.inf, dtype))).output(0)
        attention.input(3).replace_source_output(self.additive[mask])
        return True


def additive_attention_mask(model: ov.Model) -> int:
    """Give attention a float mask (0 or -inf) where it has a boolean one; returns how many attentions changed.

    The frontend passes ``Attention``-23's boolean mask on as it is (opset 24's conversion already makes it
    float). The CPU plugin's fused attention-with-cache kernel ran three times slower with the boolean mask
    (0.86 ms against 0.29 ms a decode step on the int4 demo model), for the same logits to the bit.
    """
    return _run(model, AdditiveMask())


def _read_only_by_its_nan_guard(attention: ov.Output) -> bool:
    """Select(IsNaN(out), ConvertLike(0, out), out) reads it, and nothing else: ConvertLike for its type only."""
    users = sorted(user.get_node().get_type_name() for user in attention.get_target_inputs())
    return users in (["IsNaN", "Select"], ["ConvertLike", "IsNaN", "Select"])


class NanGuardDropped(RewritePass):
    """Select(IsNaN(attention), 0, attention) -> attention, its float mask clamped to the lowest float16 (see
    ``drop_nan_guards``)."""

    def __init__(self):
        self.clamped: dict[ov.Output, ov.Output] = {}  # one clamped mask for each mask
        super().__init__()

    def pattern(self) -> ov.Node:
        self.attention = WrapType(ATTENTION, lambda out: _has_float_mask(out) and _read_only_by_its_nan_guard(out))
        self.is_nan = WrapType("opset10.IsNaN", AnyInput())
        self.guard = WrapType("opset1.Select", [self.is_nan, AnyInput(), self.attention])
        return self.guard

    def rewrite(self, matched) -> bool:
        attention = matched[self.attention]
        # The pattern leaves IsNaN's input open: OpenVINO's matcher does not check that a pattern node used
        # twice matched one output.
        if matched[self.is_nan].get_node().input_value(0) != attention:
            return False
        mask = attention.get_node().input_value(3)
        if mask not in self.clamped:
            # Lowest float16: still finite wherever the plugin computes in f16 or bf16.
            lowest = ops.constant(np.array(np.finfo(np.float16).min, mask.get_element_type().to_dtype()))
            self.clamped[mask] = ops.maximum(mask, lowest).output(0)
        attention.get_node().input(3).replace_source_output(self.clamped[mask])
        matched[self.guard].replace(attention)
        return True


def drop_nan_guards(model: ov.Model) -> int:
    """Clamp attention masks to a finite lowest value and drop the NaN guard after attention; returns the count.

    The frontend follows each ``Attention`` with Select(IsNaN(out), 0, out), for rows whose every key is
    masked (-inf everywhere can give NaN: a left-padded row's padding; the CPU kernel returns numbers there
    anyway, other devices' need not). With the mask clamped, such a row averages its masked keys instead,
    finite, and every other row is unchanged, its masked keys still weighing exp(-65504) = 0. Without the
    guard the CPU plugin folds the Transposes around attention into the kernel (with ``static_heads``, 74
    nodes run a demo decode step instead of 81, optimum-intel's IR 73).
    """
    return _run(model, NanGuardDropped())


def _is_nf4_codebook(table: ov.Output) -> bool:
    # The size first: this sees the table of every Gather tried, the embedding's too.
    return (int(np.prod(list(table.get_shape()))) == NF4_CODEBOOK.size
            and np.array_equal(table.get_node().get_data().reshape(-1), NF4_CODEBOOK))


class Nf4Constant(RewritePass):
    """Reshape(Gather(NF4 codebook, Convert(u4 indices))) into blocks -> Convert(nf4 Constant of those blocks)
    (see ``compress_nf4``)."""

    def pattern(self) -> ov.Node:
        self.indices = WrapType("opset1.Constant", type_matches(ov.Type.u4))
        self.lookup = WrapType(GATHERS, [WrapType("opset1.Constant", _is_nf4_codebook),
                                         WrapType("opset1.Convert", self.indices), AnyInput()], consumers_count(1))
        self.blocks = WrapType("opset1.Reshape", [self.lookup, AnyInput()])
        return self.blocks

    def rewrite(self, matched) -> bool:
        blocks = matched[self.blocks].get_node()
        codes = ov.Tensor(ov.Type.nf4, blocks.get_output_shape(0))
        # u4 and nf4 pack alike, two codes a byte; a Reshape keeps the order.
        codes.data[...] = matched[self.indices].get_node().get_data()
        levels = ops.convert(ops.constant(codes), matched[self.lookup].get_element_type())
        blocks.output(0).replace(levels.output(0))
        return True


def compress_nf4(model: ov.Model) -> int:
    """NF4 codebook lookups (Gather of the 16 levels by u4 indices) -> nf4 Constants; returns the count.

    Our codebook is OpenVINO's nf4 one, so the indices are the nf4 codes, bit for bit. The constant takes the
    blocked shape of the Reshape after the lookup, so that Convert -> Multiply by the block scales is the
    pattern the CPU plugin runs as a 4-bit FullyConnected instead of folding it into an fp32 matrix.
    """
    return _run(model, Nf4Constant())


def _is_integer_constant(output: ov.Output) -> bool:
    return output.get_element_type() in (ov.Type.i4, ov.Type.u4, ov.Type.i8, ov.Type.u8)


class BlockedTableConstants(RewritePass):
    """A blocked decompression read by a Gather, as the ONNX frontend builds it (Reshape of the ``[N, K]``
    integers into blocks -> Convert -> (Subtract of the Unsqueezed ``[N, blocks]`` zero points, when asymmetric
    ->) Multiply by Unsqueeze of the ``[N, blocks]`` scales -> Reshape to the ShapeOf of the integers) -> the
    same with ``[N, blocks, block]`` integer and ``[N, blocks, 1]`` scale (and zero point) Constants and a
    constant shape (see ``compress_embedding_tables``)."""

    def pattern(self) -> ov.Node:
        self.integers = WrapType("opset1.Constant", _is_integer_constant)
        self.blocked = WrapType("opset1.Reshape", [self.integers, AnyInput()])
        self.levels = WrapType("opset1.Convert", self.blocked)
        self.scales = WrapType("opset1.Constant")
        self.unsqueezed = WrapType("opset1.Unsqueeze", [self.scales, WrapType("opset1.Constant")])
        self.zero_points = WrapType("opset1.Constant", _is_integer_constant)
        self.unsqueezed_points = WrapType("opset1.Unsqueeze", [self.zero_points, WrapType("opset1.Constant")])
        shifted = WrapType("opset1.Subtract", [self.levels, WrapType("opset1.Convert", self.unsqueezed_points)])
        self.product = Or([WrapType("opset1.Multiply", [self.levels, self.unsqueezed]),
                           WrapType("opset1.Multiply", [shifted, self.unsqueezed])])
        self.table = WrapType("opset1.Reshape", [self.product, AnyInput()])
        return self.table

    def rewrite(self, matched) -> bool:
        table = matched[self.table].get_node()
        if not any(target.get_node().get_type_name() == "Gather"
                   for output in _through_converts(table.output(0)) for target in output.get_target_inputs()):
            return False
        reshapes = [(self.integers, self.blocked), (self.scales, self.unsqueezed)]
        if self.zero_points in matched:
            reshapes.append((self.zero_points, self.unsqueezed_points))
        for pattern_node, reshaped in reshapes:
            source = matched[pattern_node].get_node()
            values = ov.Tensor(source.get_element_type(), matched[reshaped].get_shape())
            values.data[...] = source.get_data().reshape(values.data.shape)  # 4-bit: the packed bytes, in order
            constant = ops.constant(values)
            constant.set_friendly_name(source.get_friendly_name())
            matched[reshaped].replace(constant.output(0))
        shape = ops.constant(np.array(list(table.get_output_shape(0)), np.int64))
        table.input(1).replace_source_output(shape.output(0))
        return True


def _through_converts(output: ov.Output) -> list[ov.Output]:
    """``output`` and the outputs of the Converts that read it."""
    return [output, *(target.get_node().output(0) for target in output.get_target_inputs()
                      if target.get_node().get_type_name() == "Convert")]


def compress_embedding_tables(model: ov.Model) -> int:
    """Give the CPU plugin's compressed Gather the decompression it matches; returns the count.

    Its pattern starts from a Convert of the integer Constant itself (and a constant reshape to 2-D): the
    frontend's Reshape of the Constant into blocks, and its ShapeOf, hid the table, so the plugin expanded it
    to fp32 when compiling (Qwen2.5-0.5B's tied embedding: 544 MB). The blocked Constants hold the same
    bytes; a tied head reads them too, as the same FullyConnected decompression.
    """
    return _run(model, BlockedTableConstants())


def set_runtime_options(model: ov.Model, quant: QuantConfig) -> None:
    """The compile options an IR carries (``rt_info`` ``runtime_options``), which OpenVINO applies when it compiles.

    A float model gets an f16 KV cache, as optimum-intel gives its float exports: the CPU plugin's default,
    u8, costs a float model accuracy (0.037 on the demo's KV consistency) and, on the demo in openvino-genai,
    7-11% of its decode speed. Quantized models keep the default, as optimum-intel leaves them.

    ``quant.dynamic_int8`` is the CPU plugin's default for quantized weights (activations quantized to int8
    in groups of 32, as optimum-intel's IRs run); turned off, a quantized model asks for float activations
    (``DYNAMIC_QUANTIZATION_GROUP_SIZE`` 0).
    """
    if quant.weights in FLOAT_WEIGHTS:
        model.set_rt_info("f16", ["runtime_options", "KV_CACHE_PRECISION"])
    elif not quant.dynamic_int8:
        model.set_rt_info("0", ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])


def name_deterministically(model: ov.Model) -> None:
    """Nodes and tensors that OpenVINO names ``<Type>_<n>`` from a process-wide counter get ``<Type>_<position>``
    instead, so the same graph gives the same XML whatever ran before it in the process."""
    # Not a pattern: every node is renamed after its position in the model.
    for position, node in enumerate(model.get_ordered_ops()):
        node.set_friendly_name(_numbered(node.get_friendly_name(), position))
        for output in node.outputs():
            names = output.get_tensor().get_names()
            if names:
                output.get_tensor().set_names({_numbered(name, position) for name in names})


def _numbered(name: str, position: int) -> str:
    match = AUTO_NAME.fullmatch(name)
    return f"{match['type']}_{position}{match['output']}" if match else name
