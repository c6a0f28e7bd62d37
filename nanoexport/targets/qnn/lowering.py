"""The qnn target's lowering: LPBQ weights, HTP graph rewrites, activation ranges, parts, compile, runner."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from nanoexport.artifact import Artifact, write_json
from nanoexport.calibration import calibration_path
from nanoexport.calibration.blocks import expand_blocks
from nanoexport.calibration.data import calibration_windows, load_tokenizer
from nanoexport.calibration.qdq import ACTIVATION_TYPES
from nanoexport.config import parse_size
from nanoexport.interface import call_feeds
from nanoexport.errors import NanoexportError
from nanoexport.passes.initializers import new_initializer
from nanoexport.passes import GraphPass, lossy
from nanoexport.passes.kv_cache import specialize
from nanoexport.runtime import cpu_session
from nanoexport.targets import Build
from nanoexport.targets.qnn.options import QnnOptions

log = logging.getLogger(__name__)

# What the provider's htp_arch option accepts (it ignores other values with a warning, measured on 2.7.0).
HTP_ARCHS = ("68", "69", "73", "75", "79", "81")
GRAPHS = {"prefill": "prefill.onnx", "decode": "decode.onnx"}
WEIGHTS_FILE = "model.onnx.data"
COMPILE_REPORT = "qnn_compile.json"
PARTS_FILE = "qnn_parts.json"
LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # model.layers.3.mlp.down_proj.weight -> 3
CACHE_NAME = re.compile(r"^past_key_values\.(\d+)\.")
# Ops the QNN HTP backend accepts as the lowering emits them (checked before writing).
HTP_OPS = frozenset({
    "Add", "And", "Cast", "Concat", "Cos", "DequantizeLinear", "Div", "Equal", "Expand", "Gather", "Less",
    "MatMul", "Mul", "Neg", "QuantizeLinear", "Reshape", "RMSNormalization", "Sigmoid",
    "Sin", "Slice", "Softmax", "Split", "Sub", "Swish", "Transpose", "Unsqueeze", "Where",
})
# ONNX Runtime CPU runs the QDQ graphs as written (float ops between Q/DQ pairs) instead of fusing uint8
# pairs into integer kernels, whose MatMulIntegerToFloat fails on the batched attention MatMuls of W8A8.
QDQ_AS_FLOAT = {"session.disable_quant_qdq": "1"}
LPBQ_LEVELS = 16  # block scale levels HTP computes right: it reads them as 4-bit
MASKED = -10000.0  # additive mask: exp underflows to 0 in fp16 too, unlike the float32 minimum (overflow)


def lowering_passes(build: Build) -> list[GraphPass]:
    """On the canonical graph: the weights in the forms HTP computes right (the shared weights file's)."""
    return [weights_for_htp]


def lower(model: ir.Model, build: Build) -> list[str]:
    """Write the prefill and decode graphs (and, with onnxruntime-qnn, their HTP builds); returns the files."""
    config, folder, settings = build.config, build.folder, build.config.options["qnn"]
    limit = parse_size(settings.max_part_bytes, "--max-part-bytes")  # checked by check_config
    # The shared weights file holds the HTP form; each reloaded graph keeps pointing into it.
    scratch = folder / "canonical.onnx"
    ir.save(model, scratch, external_data=WEIGHTS_FILE)
    graphs = {}
    for name in GRAPHS:
        graphs[name] = ir.load(scratch)
        specialize(graphs[name], build.cache.prefill_chunk if name == "prefill" else 1)
        build.run_passes(graphs[name], htp_graph_passes(build.cache.capacity), graph=name)
    scratch.unlink()
    ranges = observe_weight_outputs(graphs["prefill"], _calibration_windows(build))
    for name in GRAPHS:
        build.run_passes(graphs[name], [quantize_outputs_pass(ranges, config.quant.activations)], graph=name)
    parts = write_parts(graphs, plan_parts(graphs["prefill"], limit, settings.max_part_bytes), folder)
    write_json(folder / PARTS_FILE, {"max_part_bytes": limit, "parts": parts})
    files = [file for part in parts for file in (*part["graphs"].values(), part["weights"])] + [PARTS_FILE]
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        log.warning("qnn: wrote QDQ graphs only; pip install 'nanoexport[qnn]' (onnxruntime-qnn) to compile them "
                    "to HTP context binaries")
        return files
    graph_files = [list(part["graphs"].values()) for part in parts]
    return [*files, *compile_contexts(folder, graph_files, settings)]


def check_settings(settings: QnnOptions) -> int:
    """Refuse SoC and architecture values QNN would ignore or fail on; returns ``max_part_bytes`` in bytes."""
    if not re.fullmatch(r"[0-9]+", settings.soc_model) or int(settings.soc_model) == 0:
        raise NanoexportError(f"--soc-model {settings.soc_model!r} is not a QNN SoC id; give the SoC's number from "
                              "the QNN SDK's list of Snapdragon devices, e.g. 57 (Snapdragon 8 Gen 3)")
    if settings.htp_arch not in HTP_ARCHS:
        raise NanoexportError(f"--htp-arch {settings.htp_arch!r} is not an HTP architecture QNN knows; choose one "
                              f"of {', '.join(HTP_ARCHS)}")
    limit = parse_size(settings.max_part_bytes, "--max-part-bytes")
    if limit < 1:
        raise NanoexportError(f"--max-part-bytes {settings.max_part_bytes!r} is not a size; write it like 1GB "
                              "or 300MB")
    if importlib.util.find_spec("onnxruntime_qnn") is not None:
        _probe_device(settings)
    return limit


def _probe_device(settings: QnnOptions) -> None:
    """One quantized MatMul on the HTP backend: QNN refuses an unknown SoC id only when it creates the device."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    constants = [numpy_helper.from_array(np.ones((8, 4), np.int8), "w"),
                 numpy_helper.from_array(np.array(0.01, np.float32), "s"),
                 numpy_helper.from_array(np.array(32768, np.uint16), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["m"]),
             helper.make_node("QuantizeLinear", ["m", "s", "z"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    options = qnn_session_options(settings)
    options.log_severity_level = 4  # the provider's own lines would break the one-line error below
    try:
        ort.InferenceSession(model.SerializeToString(), options)
    except Exception:
        raise NanoexportError(f"QNN's HTP backend cannot create a device for --soc-model {settings.soc_model} "
                              f"(--htp-arch {settings.htp_arch}); give a SoC id from the QNN SDK's list of "
                              "Snapdragon devices, e.g. 57 (Snapdragon 8 Gen 3)") from None


def htp_graph_passes(capacity: int) -> list[GraphPass]:
    """A specialized static-cache graph -> the form HTP runs (see the module docstring), as passes."""

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


def check_ops(graph: ir.Model, name: str) -> None:
    for node in graph.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in HTP_OPS:
            raise NanoexportError(f"{name} graph has op {node.op_type} ({node.name}), which the qnn target cannot "
                                  "run on HTP; report the model")


def _node(graph: ir.Graph, before: ir.Node, op_type: str, inputs, name: str, **attributes) -> ir.Value:
    node = ir.node(op_type, inputs, attributes=attributes, name=name)
    graph.insert_before(before, node)
    node.outputs[0].name = name
    return node.outputs[0]


# --- weights ---------------------------------------------------------------------------------------------


@lossy
def weights_for_htp(model: ir.Model) -> None:
    """Blocked ``DequantizeLinear -> Cast`` weights -> the forms HTP computes right: int4 as LPBQ (block
    scales re-expressed, integers rounded again to them), int8 per output channel."""
    graph = model.graph
    for dequantize in [node for node in graph if _is_blocked_weight(node)]:
        cast = dequantize.outputs[0].uses()[0][0]
        weight = cast.outputs[0]
        _drop_activation_qdq(weight)
        quant, scale = dequantize.inputs[0], dequantize.inputs[1]
        if len(dequantize.inputs) > 2 and dequantize.inputs[2] is not None:
            raise NanoexportError(f"HTP block quantization is symmetric but {quant.name} has zero points; "
                                  "drop --asymmetric")
        if quant.dtype not in (ir.DataType.INT4, ir.DataType.INT8):
            raise NanoexportError(f"HTP takes int4 or int8 blocked weights, not {quant.dtype.name.lower()} "
                                  f"({quant.name}); use --quant int4 or int8")
        block_size = dequantize.attributes.get_int("block_size")
        base = quant.name.removesuffix(".quant")
        block_scales = scale.const_value.numpy().astype(np.float32)
        if quant.dtype == ir.DataType.INT8:
            integers, channel_scale = per_channel_weights(quant.const_value.numpy(), block_scales, block_size)
            htp_weight = _node(graph, dequantize, "DequantizeLinear",
                               [new_initializer(graph, f"{base}.channel_quant", integers),
                                new_initializer(graph, f"{base}.channel_scale", channel_scale)],
                               f"{base}.per_channel", axis=1)
        else:
            integers, block_levels, channel_scale = lpbq_weights(quant.const_value.numpy(), block_scales, block_size)
            levels = new_initializer(graph, f"{base}.block_levels", block_levels)
            per_channel = new_initializer(graph, f"{base}.channel_scale", channel_scale)
            # The provider tells int4 from the zero point's type: without one it reads the integers as int8.
            zero = new_initializer(graph, f"{base}.zero_point", np.zeros(block_levels.shape, integers.dtype))
            block_scale = _node(graph, dequantize, "DequantizeLinear", [levels, per_channel], f"{base}.block_scale",
                                axis=1)
            htp_weight = _node(graph, dequantize, "DequantizeLinear",
                               [new_initializer(graph, f"{base}.lpbq_quant", integers), block_scale, zero],
                               f"{base}.lpbq", axis=0, block_size=block_size)
        weight.replace_all_uses_with(htp_weight)
        graph.remove([cast, dequantize], safe=True)
    common.RemoveUnusedNodesPass()(model)  # and the canonical integers, scales and weight Q/DQ constants


def _is_blocked_weight(node: ir.Node) -> bool:
    if node.op_type != "DequantizeLinear" or node.attributes.get_int("block_size", 0) == 0:
        return False
    uses = node.outputs[0].uses()
    return node.inputs[0].const_value is not None and len(uses) == 1 and uses[0][0].op_type == "Cast"


def _drop_activation_qdq(weight: ir.Value) -> None:
    """Q -> DQ pairs on a weight (calibration treats every MatMul input as an activation) read the weight."""
    for quantize, _ in list(weight.uses()):
        if quantize.op_type != "QuantizeLinear":
            continue
        for dequantize, _ in list(quantize.outputs[0].uses()):
            dequantize.outputs[0].replace_all_uses_with(weight)
            quantize.graph.remove(dequantize, safe=True)
        quantize.graph.remove(quantize, safe=True)


def _dequantize(quant: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """Our weights ``[K, N]`` as the canonical DequantizeLinear gives them, in float32."""
    return quant.astype(np.float32) * expand_blocks(scale, block_size, quant.shape[0])


def per_channel_weights(quant: np.ndarray, scale: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 integers ``[K, N]`` and block scales -> (int8 integers, float32 scale per output channel): our
    dequantized weights rounded again to one scale per column, the int8 form HTP takes with uint8 and
    uint16 activations alike (block-wise int8 it refuses beside uint8 activations)."""
    weights = _dequantize(quant, scale, block_size)
    channel = np.abs(weights).max(axis=0) / 127
    channel = np.where(channel > 0, channel, 1.0).astype(np.float32)
    return np.clip(np.round(weights / channel), -127, 127).astype(np.int8), channel


def lpbq_weights(quant: np.ndarray, scale: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int4 integers ``[K, N]`` and block scales ``[K / block, N]`` -> LPBQ (integers, uint8 levels, float32
    per-channel scale): each block's scale is ``level * channel scale`` with level 1 to 16.

    HTP reads block scale levels as 4 bits: levels above 16 compute wrong values. Sixteen levels cannot hold
    every block scale, so each block takes the level that best reproduces its dequantized weights, which are
    then rounded again to that level's grid. A column's largest block keeps its scale (level 16).
    """
    rows, columns = quant.shape
    weights = _dequantize(quant, scale, block_size).reshape(-1, block_size, columns)
    channel = np.abs(scale).max(axis=0) / LPBQ_LEVELS
    channel = np.where(channel > 0, channel, 1.0).astype(np.float32)
    low, high = ml_dtypes.iinfo(quant.dtype).min, ml_dtypes.iinfo(quant.dtype).max
    best_error = np.full(scale.shape, np.inf, np.float32)
    best_level = np.ones(scale.shape, np.uint8)
    for level in range(1, LPBQ_LEVELS + 1):
        step = level * channel
        error = np.square(weights - np.clip(np.round(weights / step), low, high) * step).sum(axis=1)
        better = error < best_error
        best_error, best_level = np.where(better, error, best_error), np.where(better, level, best_level)
    step = (best_level * channel)[:, None, :]
    integers = np.clip(np.round(weights / step), low, high).reshape(rows, columns).astype(quant.dtype)
    return integers, best_level.astype(np.uint8), channel


def _calibration_windows(build: Build) -> np.ndarray:
    """Prefill chunks of the calibration text quantization read (the same file, found the same way)."""
    checkpoint, quant = build.checkpoint, build.config.quant
    folder = Path(checkpoint.source) if checkpoint.source else None
    source = calibration_path(quant, folder)
    tokenizer = load_tokenizer(checkpoint.tokenizer_files)
    return calibration_windows(source, tokenizer, quant.calib_samples, build.cache.prefill_chunk, quant.seed)


def observe_weight_outputs(model: ir.Model, windows: np.ndarray) -> dict[str, tuple[float, float]]:
    """Min/max of each weight MatMul output that calibration left float, over prefill calls on ``windows``.

    HTP runs a MatMul by a quantized weight only with a quantized output too; calibration quantizes the inputs of
    the next arithmetic op, which a Split or Reshape in between (the fused q/k/v projection) hides.
    """

    values = [node.outputs[0] for node in model.graph
              if _reads_quantized_weight(node) and not _is_quantized(node.outputs[0])]
    model.graph.outputs.extend(values)
    try:
        session = cpu_session(model, session_config=QDQ_AS_FLOAT)
    finally:
        del model.graph.outputs[-len(values):]
    names = [value.name for value in values]
    low, high = np.full(len(names), np.inf), np.full(len(names), -np.inf)
    for window in windows:
        for index, output in enumerate(session.run(names, _first_chunk_feeds(session, window))):
            low[index], high[index] = min(low[index], output.min()), max(high[index], output.max())
    return {name: (min(float(lo), 0.0), max(float(hi), 0.0)) for name, lo, hi in zip(names, low, high)}


def _first_chunk_feeds(session, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """A prefill call on ``tokens`` with an empty cache."""
    inputs = {value.name: value for value in session.get_inputs()}
    feeds = {name: np.zeros(value.shape, np.float32) for name, value in inputs.items()
             if name.startswith("past_key_values.")}
    return feeds | call_feeds(tokens, 0, len(tokens), capacity=inputs["attention_mask"].shape[1])


def _reads_quantized_weight(node: ir.Node) -> bool:
    producer = node.inputs[1].producer() if node.op_type == "MatMul" else None
    return producer is not None and producer.op_type == "DequantizeLinear" and \
        producer.inputs[0].const_value is not None


def _is_quantized(value: ir.Value) -> bool:
    uses = value.uses()
    return bool(uses) and all(node.op_type == "QuantizeLinear" for node, _ in uses)


def quantize_outputs_pass(ranges: dict[str, tuple[float, float]], activations: str) -> GraphPass:
    @lossy
    def quantize_weight_outputs(model: ir.Model) -> None:
        """A Q -> DQ pair after each weight MatMul output calibration left float (HTP needs them quantized)."""
        quantize_outputs(model, ranges, activations)

    return quantize_weight_outputs


def quantize_outputs(model: ir.Model, ranges: dict[str, tuple[float, float]], activations: str) -> None:
    """A Q -> DQ pair (``activations`` type, asymmetric per tensor, as calibration's) after each named value."""
    storage, data_type = ACTIVATION_TYPES[activations]
    top = np.iinfo(storage).max
    graph = model.graph
    producers = {node.outputs[0].name: node for node in graph}
    for name, (low, high) in sorted(ranges.items()):
        node = producers[name]
        value = node.outputs[0]
        scale = np.float32(max(high - low, 1e-8) / top)
        scale_value = new_initializer(graph, f"{name}.out_scale", np.array(scale, np.float32))
        zero_point = np.array(np.clip(np.round(-low / scale), 0, top), storage)
        zero = new_initializer(graph, f"{name}.out_zero_point", zero_point)
        uses = list(value.uses())
        quantize = ir.node("QuantizeLinear", [value, scale_value, zero], name=f"{name}.out_q")
        dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], scale_value, zero], name=f"{name}.out_dq")
        quantize.outputs[0].name, quantize.outputs[0].type = f"{name}.out_q", ir.TensorType(data_type)
        dequantize.outputs[0].name = f"{name}.out_qdq"
        graph.insert_after(node, [quantize, dequantize])
        for user, index in uses:
            user.replace_input_with(index, dequantize.outputs[0])


# --- rotary, KV cache, attention ------------------------------------------------------------------------


def rotary_tables(model: ir.Model, capacity: int) -> None:
    """``Cos``/``Sin`` of ``position * inv_freq`` -> tables of ``capacity`` rows gathered by ``position_ids``."""
    graph = model.graph
    positions = next(value for value in graph.inputs if value.name == "position_ids")
    for node in [node for node in graph if node.op_type in ("Cos", "Sin")]:
        inv_freq = _inverse_frequencies(node.inputs[0])
        if inv_freq is None:
            raise NanoexportError(f"rotary angles at {node.name} are not position_ids * a constant frequency "
                                  "table; the qnn target supports the default rotary only")
        angles = np.arange(capacity, dtype=np.float32)[:, None] * inv_freq[None, :]
        function = np.cos if node.op_type == "Cos" else np.sin
        table = new_initializer(graph, f"rotary.{node.op_type.lower()}_table", function(angles).astype(np.float32))
        rows = _node(graph, node, "Gather", [table, positions], f"rotary.{node.op_type.lower()}", axis=0)
        shape = new_initializer(graph, f"rotary.{node.op_type.lower()}_shape", np.array(node.outputs[0].shape.numpy()))
        result = _node(graph, node, "Reshape", [rows, shape], f"rotary.{node.op_type.lower()}_rows")
        node.outputs[0].replace_all_uses_with(result)
        graph.remove(node, safe=True)


def _inverse_frequencies(angles: ir.Value) -> np.ndarray | None:
    """The constant side of ``angles = positions * inv_freq``, flattened."""
    producer = angles.producer()
    if producer is None or producer.op_type != "Mul":
        return None
    constants = [value.const_value for value in producer.inputs if value.const_value is not None]
    return constants[0].numpy().astype(np.float32).reshape(-1) if len(constants) == 1 else None


def decompose_rotary(model: ir.Model) -> None:
    """``RotaryEmbedding`` (halves layout) -> Split, Mul, Sub, Add, Concat: QNN's own RotaryEmbedding gave
    wrong values on the HTP emulator (measured: 6.5 max-abs on the demo model's first layer)."""
    graph = model.graph
    for node in [node for node in graph if node.op_type == "RotaryEmbedding"]:
        attributes = node.attributes
        if attributes.get_int("interleaved", 0) or attributes.get_int("rotary_embedding_dim", 0) or \
                len(node.inputs) > 3 or node.inputs[0].shape.rank() != 4:
            raise NanoexportError(f"{node.name}: only whole-head, non-interleaved rotary on [batch, heads, seq, "
                                  "head_dim] lowers to HTP yet; report the model")
        heads, cos, sin = node.inputs[:3]
        name = node.name or node.outputs[0].name
        axes = new_initializer(graph, f"{name}.heads_axis", np.array([1], np.int64))
        cos = _node(graph, node, "Unsqueeze", [cos, axes], f"{name}.cos")
        sin = _node(graph, node, "Unsqueeze", [sin, axes], f"{name}.sin")
        split = ir.node("Split", [heads], attributes={"axis": -1, "num_outputs": 2}, num_outputs=2,
                        name=f"{name}.halves")
        graph.insert_before(node, split)
        first, second = split.outputs
        first.name, second.name = f"{name}.first", f"{name}.second"

        def product(x, y, suffix):
            return _node(graph, node, "Mul", [x, y], f"{name}.{suffix}")

        rotated_first = _node(graph, node, "Sub", [product(first, cos, "first_cos"),
                                                   product(second, sin, "second_sin")], f"{name}.rotated_first")
        rotated_second = _node(graph, node, "Add", [product(second, cos, "second_cos"),
                                                    product(first, sin, "first_sin")], f"{name}.rotated_second")
        rotated = _node(graph, node, "Concat", [rotated_first, rotated_second], f"{name}.rotated", axis=-1)
        node.outputs[0].replace_all_uses_with(rotated, replace_graph_outputs=True)
        output_name = node.outputs[0].name
        graph.remove(node, safe=True)
        rotated.name = output_name


def new_rows_cache(model: ir.Model, capacity: int) -> None:
    """``TensorScatter`` cache writes -> attention over ``Concat(past, new)``; presents are the new rows."""
    graph = model.graph
    writes = [node for node in graph if node.op_type == "TensorScatter"]
    if not writes:
        raise NanoexportError("the qnn target needs the static KV cache; drop --kv-cache")
    tokens = next(value for value in graph.inputs if value.name == "input_ids").shape[1]
    mask = _attention_bias(graph, capacity, tokens)
    for write in writes:
        past, rows = write.inputs[0], write.inputs[1]
        present = write.outputs[0]
        keys = _node(graph, write, "Concat", [past, rows], f"{present.name}.attended", axis=2)
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
    first = graph.node(0)
    slots = new_initializer(graph, "mask.slots", np.arange(capacity, dtype=np.int64))
    written = _node(graph, first, "Less", [slots, inputs["cache_position"]], "mask.before_call")
    marked = _node(graph, first, "Cast", [inputs["attention_mask"]], "mask.marked", to=ir.DataType.BOOL)
    visible = _node(graph, first, "And", [written, marked], "mask.past_visible")
    zero = new_initializer(graph, "mask.zero", np.array(0.0, np.float32))
    masked = new_initializer(graph, "mask.masked", np.array(MASKED, np.float32))
    past = _node(graph, first, "Where", [visible, zero, masked], "mask.past_bias")
    past_shape = new_initializer(graph, "mask.past_shape", np.array([1, 1, tokens, capacity], np.int64))
    past = _node(graph, first, "Expand", [past, past_shape], "mask.past_rows")
    causal = np.where(np.tril(np.ones((tokens, tokens), bool)), 0.0, MASKED).astype(np.float32)
    new = new_initializer(graph, "mask.causal_bias", causal[None, None])
    return _node(graph, first, "Concat", [past, new], "mask.bias", axis=3)


def decompose_attention(model: ir.Model) -> None:
    """``Attention`` -> MatMul, Softmax, MatMul; query heads grouped per key/value head instead of repeating keys."""
    graph = model.graph
    for node in [node for node in graph if node.op_type == "Attention"]:
        attributes = node.attributes
        if attributes.get_int("is_causal", 0) or attributes.get_float("softcap", 0.0) or len(node.outputs) > 1:
            raise NanoexportError(f"{node.name}: causal, softcapped or multi-output Attention does not lower to "
                                  "HTP yet; report the model")
        query, keys, values, bias = node.inputs[:4]
        _, heads, tokens, head_dim = query.shape.numpy()
        kv_heads = keys.shape[1]
        group = heads // kv_heads
        scale = attributes.get_float("scale", 1 / np.sqrt(head_dim))
        name = node.name or node.outputs[0].name

        def constant(suffix, array):
            return new_initializer(graph, f"{name}.{suffix}", np.asarray(array))

        grouped = _node(graph, node, "Reshape", [query, constant("grouped_shape", [1, kv_heads, group * tokens,
                                                                                    head_dim])], f"{name}.grouped")
        keys_t = _node(graph, node, "Transpose", [keys], f"{name}.keys_t", perm=[0, 1, 3, 2])
        scores = _node(graph, node, "MatMul", [grouped, keys_t], f"{name}.scores")
        scores = _node(graph, node, "Mul", [scores, constant("scale", np.float32(scale))], f"{name}.scaled")
        rows_bias = bias if group == 1 else _node(graph, node, "Concat", [bias] * group, f"{name}.bias", axis=2)
        scores = _node(graph, node, "Add", [scores, rows_bias], f"{name}.masked")
        weights = _node(graph, node, "Softmax", [scores], f"{name}.weights", axis=-1)
        mixed = _node(graph, node, "MatMul", [weights, values], f"{name}.mixed")
        output = _node(graph, node, "Reshape", [mixed, constant("heads_shape", [1, heads, tokens, head_dim])],
                       f"{name}.heads")
        node.outputs[0].replace_all_uses_with(output, replace_graph_outputs=True)
        graph.remove(node, safe=True)


# --- parts -----------------------------------------------------------------------------------------------


def layer_labels(graph: ir.Graph) -> dict[ir.Node, int]:
    """Each node's layer: the highest layer whose weights or KV cache it depends on; -1 for none (the embedding,
    the mask, the rotary tables). The final norm and ``lm_head`` come out as the last layer."""
    layer_of = {}
    for value in graph.inputs:
        if match := CACHE_NAME.match(value.name):
            layer_of[value] = int(match[1])
    for name, value in graph.initializers.items():
        if match := LAYER_NAME.search(name):
            layer_of[value] = int(match[1])
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
            match = LAYER_NAME.search(value.name)
            slot = int(match[1]) if match else -1 if labels[node] < 0 else layers
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


def settings_of(artifact: Artifact) -> QnnOptions:
    """The SoC settings the artifact was built for (the defaults for artifacts written before the options)."""
    return QnnOptions(**artifact.manifest["config"].get("qnn", {}))


# --- compile ---------------------------------------------------------------------------------------------


def qnn_session_options(settings: QnnOptions, extra: dict[str, str] | None = None,
                        provider: dict[str, str] | None = None):
    """Session options that put every node on the QNN provider's HTP backend (for ``settings``' SoC) or fail;
    ``extra``: session configuration entries, ``provider``: more provider options."""
    import onnxruntime as ort
    import onnxruntime_qnn

    _register_qnn(ort, onnxruntime_qnn)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (extra or {}).items():
        options.add_session_config_entry(key, value)
    devices = [device for device in ort.get_ep_devices() if device.ep_name == "QNNExecutionProvider"]
    options.add_provider_for_devices(devices, {"backend_path": onnxruntime_qnn.get_qnn_htp_path(),
                                               "soc_model": settings.soc_model, "htp_arch": settings.htp_arch,
                                               **(provider or {})})
    return options


def _register_qnn(ort, onnxruntime_qnn) -> None:
    if not any(device.ep_name == "QNNExecutionProvider" for device in ort.get_ep_devices()):
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())


def compile_contexts(folder: Path, graph_files: list[list[str]], settings: QnnOptions) -> list[str]:
    """EPContext model and HTP context binary per graph file (``graph_files``: per part, its graphs), or per
    part with ``share_weights``: its graphs in one binary holding their weights once. Returns the files
    written."""
    import onnxruntime as ort

    def files() -> set[str]:
        return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}

    before = files()
    seconds = {}
    sharing = {"enable_htp_weight_sharing": "1"} if settings.share_weights else {}
    for part_files in graph_files:
        for index, file_name in enumerate(part_files):
            started = time.perf_counter()
            entries = {"ep.context_enable": "1", "ep.context_embed_mode": "0",
                       "ep.context_file_path": str(folder / context_file(file_name))}
            if settings.share_weights:  # the part's last graph closes its shared binary
                entries |= {"ep.share_ep_contexts": "1",
                            "ep.stop_share_ep_contexts": "1" if index == len(part_files) - 1 else "0"}
            try:
                ort.InferenceSession(str(folder / file_name), qnn_session_options(settings, entries, sharing))
            except Exception as error:  # the provider's message names the node it could not place or build
                raise NanoexportError(f"QNN could not compile {file_name} for HTP: {str(error).splitlines()[0]}") \
                    from None
            seconds[file_name] = round(time.perf_counter() - started, 2)
    written = sorted(files() - before)
    write_json(folder / COMPILE_REPORT, {"soc_model": settings.soc_model, "htp_arch": settings.htp_arch,
                                         "share_weights": settings.share_weights, "seconds": seconds,
                                         "files": written})
    log.info("qnn: compiled for HTP (soc %s, v%s) in %s s", settings.soc_model, settings.htp_arch, seconds)
    return [*written, COMPILE_REPORT]


def context_file(file_name: str) -> str:
    return file_name.replace(".onnx", "_ctx.onnx")


# --- validation ------------------------------------------------------------------------------------------


class Runner:
    """Runs a qnn artifact through the explicit-cache interface, writing the new rows into the buffers.

    The parts run in order, each fed the hidden state the one before it gave. ``backend="htp"``: the QNN
    provider's HTP backend (emulated on x86) for the artifact's SoC, no CPU fallback, on the compiled EPContext
    models when the artifact has them; ``"cpu"``: the same QDQ graphs on ONNX Runtime CPU. Default: HTP when
    onnxruntime-qnn is installed.
    """

    def __init__(self, artifact: Artifact, backend: str | None = None):
        import onnxruntime as ort

        if backend is None:
            backend = "htp" if importlib.util.find_spec("onnxruntime_qnn") else "cpu"
        self.backend = backend
        files = artifact.manifest["model_files"]
        settings = settings_of(artifact)
        self.parts = []  # per part: graph name -> session
        for part in parts_of(artifact):
            sessions = {}
            for name, file_name in part["graphs"].items():
                if backend == "htp":
                    compiled = context_file(file_name)
                    # The emulator cannot load a weight-shared binary: compile the same QDQ graph in the session.
                    loadable = compiled in files and not settings.share_weights
                    path = artifact.file(compiled if loadable else file_name)
                    sessions[name] = ort.InferenceSession(str(path), qnn_session_options(settings))
                else:
                    sessions[name] = cpu_session(artifact.file(file_name), session_config=QDQ_AS_FLOAT)
            self.parts.append(sessions)

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = "decode" if feeds["input_ids"].shape[1] == 1 else "prefill"
        values = dict(feeds)
        for sessions in self.parts:
            session = sessions[name]
            names = [output.name for output in session.get_outputs()]
            values.update(zip(names, session.run(names, {value.name: values[value.name]
                                                         for value in session.get_inputs()})))
        outputs = {"logits": values["logits"]}
        start = int(feeds["cache_position"][0])
        for past in feeds:
            if past.startswith("past_key_values."):
                present = past.replace("past_key_values.", "present.", 1)
                buffer, rows = feeds[past].copy(), values[present]
                buffer[:, :, start : start + rows.shape[2]] = rows[:, :, : buffer.shape[2] - start]
                outputs[present] = buffer
        return outputs


def validation_notes(artifact: Artifact) -> list[str]:
    """HTP against ONNX Runtime CPU on the same QDQ graphs: backend error, apart from quantization error."""
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        return ["validated on ONNX Runtime CPU only; pip install 'nanoexport[qnn]' to run the HTP emulator too"]
    from nanoexport.validate.decoding import ArtifactDecoder, prompts_for

    kv_cache = artifact.manifest["io"]["kv_cache"]
    htp = ArtifactDecoder(Runner(artifact, "htp"), kv_cache)
    cpu = ArtifactDecoder(Runner(artifact, "cpu"), kv_cache)
    worst, agree, positions = 0.0, 0, 0
    for prompt in prompts_for(artifact.path, htp.vocab_size):
        ours, theirs = htp.full_logits(prompt), cpu.full_logits(prompt)
        worst = max(worst, float(np.abs(ours - theirs).max()))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        positions += len(prompt)
    settings = settings_of(artifact)
    notes = [
        f"HTP (QNN provider, soc {settings.soc_model}, every node on QNN) vs ONNX Runtime CPU on the same QDQ "
        f"graphs: logits max-abs {worst:.4f}, top-1 agreement {agree / positions:.3f} over {positions} positions",
    ]
    if settings.share_weights:
        notes.append("HTP ran the QDQ graphs compiled again: the x86 emulator cannot load the weight-shared "
                     "context binaries, which were not run")
    return notes
